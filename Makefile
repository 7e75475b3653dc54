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
# The peer `make bench` compares with: LiteLLM's proxy, in a virtualenv of its own so that its
# many pins never touch ours. The same LiteLLM release this project is tested with.
PEER_VENV ?= .venv-litellm
PEER_LITELLM ?= litellm[proxy]==1.106.2

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

$(PEER_VENV)/.installed:
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEER_VENV)/bin/python -m pip install --quiet '$(PEER_LITELLM)'
	touch $@

# Every benchmark, one after another (about 12 minutes on 2 cores); writes benchmarks/RESULTS.md.
bench: install $(PEER_VENV)/.installed
	LITELLM_PROXY_BIN=$(PEER_VENV)/bin/litellm $(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) $(PEER_VENV) .mypy_cache .ruff_cache .pytest_cache
