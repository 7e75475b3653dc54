# The front door: `make serve` and `make test` work on a fresh machine with Python 3.11 and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the release the project is tested with (on a machine with a local CPU wheel
# of it, that wheel is what pip takes). `make install CONSTRAINTS=` lifts the pin;
# `pip install .` never applies it.
CONSTRAINTS ?= constraints/cpu.txt
PIP_CONSTRAINT_FLAGS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
CONFIG ?=
PYTEST_ARGS ?=

.PHONY: install serve test lint typecheck unit bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_CONSTRAINT_FLAGS) -e '.[dev]'
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/guardrail serve $(if $(CONFIG),--config $(CONFIG))

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
