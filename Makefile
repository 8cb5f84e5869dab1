# MX Guard. `make run` starts the guard on conf/guard.toml (memory store);
# `make test` installs what the tests need and runs them; `make unit` runs the
# tests that need neither root nor apt.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= conf/guard.toml
PYTEST_ARGS ?=

.PHONY: run test unit lint bench deps test-deps clean

run: $(BIN)/.installed
	$(BIN)/mx-guard run -c $(CONFIG)

test: test-deps $(BIN)/.installed-test
	$(BIN)/pytest $(PYTEST_ARGS)

# The tests that need no root, no test packages and no servers: seconds, anywhere.
unit: $(BIN)/.installed-test
	$(BIN)/pytest -m unit $(PYTEST_ARGS)

lint: $(BIN)/.installed-test
	$(BIN)/ruff check guard tests
	$(BIN)/mypy --strict guard

bench: test-deps $(BIN)/.installed-test
	$(BIN)/python -m tests.support.bench

# A one-minute tour: Redis, a primary, the guard and Postfix, all private (needs root).
.PHONY: demo
demo: test-deps $(BIN)/.installed-test
	$(BIN)/python -m tests.support.demo

deps:
	sh deploy/install-deps.sh

test-deps: deps
	sh tests/support/install-test-deps.sh

$(BIN)/python:
	$(MAKE) deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(BIN)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(BIN)/.installed

clean:
	rm -rf $(VENV) .mta .mypy_cache .ruff_cache .pytest_cache *.egg-info
