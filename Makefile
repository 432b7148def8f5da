# One command to run the server, one to run the tests; both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip

.PHONY: serve test setup setup-test lint bench clean

serve: setup ## install and run the server with its embedded default (lite engine, one node)
	$(BIN)/musetalk-stream serve

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	touch $@

setup-test: $(VENV)/.installed-test

# torch is pinned to 2.13.0 here: on the CI machines that is a CPU build on local disk.
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test,musetalk]"
	touch $@

test: setup-test ## run the whole test suite
	$(BIN)/python -m pytest -q

lint: setup-test ## ruff on everything, mypy strict on the server and the engines
	$(BIN)/ruff check stream_server inference bench tests examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var
