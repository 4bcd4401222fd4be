# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs secagg, runs the main job
#   make test   creates .venv, installs the dev extras, runs lint, types and the whole suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TYPECHECK := build/typecheck

.PHONY: demo test lint typecheck unit bench proto clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.base

demo: $(VENV)/.base
	$(BIN)/secagg simulate --clients 50 --dim 100000 --dropout 0.1 --drop-stage random

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow setuptools' editable import hook, so it checks a tree of links laid
# out as the installed package (kernels/ and service/ as secagg.kernels, secagg.service).
typecheck: $(VENV)/.dev
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/secagg
	for f in secagg/*; do ln -s "$$PWD/$$f" $(TYPECHECK)/secagg/; done
	ln -s "$$PWD/kernels" $(TYPECHECK)/secagg/kernels
	ln -s "$$PWD/service" $(TYPECHECK)/secagg/service
	cd $(TYPECHECK) && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p secagg

unit: $(VENV)/.dev
	$(BIN)/python -m pytest -q

test: lint typecheck unit

bench: $(VENV)/.dev
	$(BIN)/python -m pytest benchmarks -q --benchmark-only

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache .hypothesis
