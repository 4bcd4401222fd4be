# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs secagg, runs the main job (federated training demo)
#   make test   creates .venv, installs the dev extras, runs lint, types and the whole suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install -q
TYPECHECK := build/typecheck
# torch comes first and pinned: the CPU build 2.13.0 is on disk; an unpinned torch pulls
# gigabytes of CUDA wheels.
TORCH  := torch==2.13.0

.PHONY: demo test lint typecheck unit bench bench-quick bench-full flower proto clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(PIP) $(TORCH)
	$(PIP) -e '.[demo]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(PIP) $(TORCH)
	$(PIP) -e '.[dev]'
	touch $@ $(VENV)/.demo

# flwr 1.42 pins protobuf<7 / pycryptodome<4, which pip cannot resolve beside our stubs; it
# runs fine on the newer versions, so it is installed without its pins (docs/integrations.md).
$(VENV)/.flower: $(VENV)/.dev
	$(PIP) --no-deps flwr==1.42.0
	$(PIP) certifi 'cryptography>=50,<51' 'iterators>=0.0.2,<0.0.3' 'typer>=0.13,<0.21' \
	  'tomli>=2.0.1,<3' 'tomli-w>=1,<2' 'prompt-toolkit>=3.0.52,<4' 'rich>=14,<15' \
	  'pyyaml>=6.0.2,<7' 'requests>=2.33,<3' 'httpx>=0.28.1,<1' 'click>=8,<9' \
	  'sqlalchemy[asyncio]>=2.0.45,<3' 'alembic>=1.18.1,<2'
	touch $@

flower: $(VENV)/.flower

demo: $(VENV)/.demo
	$(BIN)/secagg demo --out demo-out

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check secagg kernels service tests benchmarks

# mypy cannot follow setuptools' editable import hook, so it checks a tree of links laid
# out as the installed package (kernels/ and service/ as secagg.kernels, secagg.service).
typecheck: $(VENV)/.dev
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/secagg
	for f in secagg/*; do ln -s "$$PWD/$$f" $(TYPECHECK)/secagg/; done
	ln -s "$$PWD/kernels" $(TYPECHECK)/secagg/kernels
	ln -s "$$PWD/service" $(TYPECHECK)/secagg/service
	cd $(TYPECHECK) && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p secagg

unit: $(VENV)/.flower
	$(BIN)/python -m pytest -q

test: lint typecheck unit

# Scaling suite (docs/benchmarks.md): writes its section of benchmarks/RESULTS.md and
# benchmarks/plots/. pytest's default pattern (test_*.py) does not collect bench_*.py.
BENCH_PYTEST = $(BIN)/python -m pytest -p no:cacheprovider --benchmark-only -o python_files='bench_*.py'

# Quick profile: under 10 minutes on the 2-core machine (measured 4 min 12 s).
bench bench-quick: $(VENV)/.dev
	SECAGG_BENCH_PROFILE=quick $(BENCH_PYTEST) -q benchmarks/suite

# Full profile (1,000 clients, 10^7 parameters) plus every other suite in benchmarks/.
bench-full: $(VENV)/.dev
	@echo "make bench-full: several hours on the 2-core machine (1,000 clients, 10^7 parameters)"
	SECAGG_BENCH_PROFILE=full $(BENCH_PYTEST) -q benchmarks

proto: $(VENV)/.dev
	$(BIN)/python -m secagg.service.codegen

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache .hypothesis
