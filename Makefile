# Two commands from a clean clone (README Quickstart):  make demo   |   make test
# Each sets up what it needs: a virtualenv in .venv with torch pinned FIRST (an unpinned torch drags in several GB
# of CUDA wheels on a CPU machine), then this package with its extras.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# On a GPU machine pick the matching build, e.g.  make demo TORCH_SPEC="torch==2.11.0"
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

## The main job on the embedded default (CPU, mla_tiny).
demo: setup
	$(BIN)/python -m mla_components.main

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check mla_components tests/model

## The whole test suite (what CI runs).
test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info
