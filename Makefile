# Every target creates .venv when it is missing; a fresh machine needs only python3 (3.11+) and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config.example.toml
# bench/ is linted once it exists.
LINT_PATHS := worker tests packaging $(wildcard bench)

.PHONY: run test lint check clean bench bench-smoke deb

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required") if sys.version_info < (3, 11) else None'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/base-worker --config $(CONFIG)

check: $(BIN)/.installed
	$(BIN)/base-worker --check --config $(CONFIG)

lint: $(BIN)/.installed
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

# The first run, as root, installs Debian packages and builds a Debian 12 container root for
# tests/systemd (debootstrap, a few minutes, cached under /var/tmp); later runs reuse both.
test: lint
	@echo "make test: the first run installs missing Debian packages (.ci/system-deps) and builds"
	@echo "make test: a Debian 12 container root for tests/systemd (debootstrap, minutes, cached)"
	bash .ci/system-deps
	$(BIN)/python -m tests.systemd.nspawn
	$(BIN)/python -m pytest

# Benchmarks (docs/performance.md): base-worker against a bare aiohttp baseline, on loopback
# only. They need wrk (Debian package) and install the `fast` extra (uvloop, orjson).
$(BIN)/.installed-fast: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test,fast]'
	touch $@

bench: $(BIN)/.installed-fast
	$(BIN)/python -m bench.run

# Every scenario at tiny sizes, under a minute: keeps the harness from rotting; asserts no timing.
bench-smoke: $(BIN)/.installed-fast
	$(BIN)/python -m bench.queued --tasks 50 --lines 3
	$(BIN)/python -m bench.run --smoke

# The Debian package (packaging/README.md): built from a copy of this tree with Debian's python3,
# checked with lintian. Installs its build tools with apt the first time, like `make test`.
DEB_BUILD_DEPS := dpkg-dev debhelper python3-venv lintian
DEB_TREE := build/deb/base-worker
DEB_EXCLUDE := .git .venv build dist *.egg-info __pycache__ .*_cache bench/results

deb:
	bash .ci/system-deps $(DEB_BUILD_DEPS)
	rm -rf build/deb && mkdir -p $(DEB_TREE) dist
	tar -c $(addprefix --exclude=,$(DEB_EXCLUDE)) . | tar -x -C $(DEB_TREE)
	rm -rf $(DEB_TREE)/debian && cp -r packaging/debian $(DEB_TREE)/debian
	cd $(DEB_TREE) && dpkg-buildpackage --build=binary --no-sign
	deb=$$(cd build/deb && ls base-worker_*.deb) && mv build/deb/$$deb dist/ && \
	lintian --fail-on error,warning --info dist/$$deb && echo "built dist/$$deb"

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
