# Every target creates .venv when it is missing; a fresh machine needs only python3 (3.11+) and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config.example.toml

.PHONY: run test lint check clean

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
	$(BIN)/ruff check worker tests $(wildcard bench)
	$(BIN)/ruff format --check worker tests $(wildcard bench)
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
