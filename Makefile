# Every target creates .venv when it is missing; a fresh machine needs only python3 (3.11+) and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config.example.toml
# bench/ is linted once it exists.
LINT_PATHS := worker tests $(wildcard bench)

.PHONY: run test lint check clean bench bench-smoke

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

test: lint
	bash .ci/system-deps
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
	$(BIN)/python -m bench.run --smoke

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
