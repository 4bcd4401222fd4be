# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs secagg, runs the main job (federated training demo)
#   make test   creates .venv, installs the dev extras, runs lint, types and the whole suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install -q
# The Flower environment: `secagg[flower,codegen,dp]` as pip resolves it (protobuf 6,
# pycryptodome 3, the floor of our ranges), beside dev's newest versions.
FVENV  := .venv-flower
FBIN   := $(FVENV)/bin
TYPECHECK := build/typecheck
# torch comes first and pinned: the CPU build 2.13.0 is on disk; an unpinned torch pulls
# gigabytes of CUDA wheels.
TORCH  := torch==2.13.0

.PHONY: demo test lint typecheck unit bench bench-quick bench-full bench-smoke flower proto clean

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

$(FVENV)/.flower: pyproject.toml
	$(PYTHON) -m venv $(FVENV)
	$(FBIN)/python -m pip install -q --upgrade pip
	$(FBIN)/python -m pip install -q -e '.[flower,codegen,dp]' 'pytest>=8' 'hypothesis>=6.100'
	touch $@

flower: $(FVENV)/.flower

demo: $(VENV)/.demo
	$(BIN)/secagg demo --out demo-out

# Accuracy against epsilon (docs/dp.md, "Accuracy against epsilon"): demo-out/dp_accuracy.png
# and .json; about 1-2 min on 2 idle cores, so not part of `make demo`.
.PHONY: demo-dp
$(VENV)/.demo-dp: pyproject.toml | $(BIN)/python
	$(PIP) $(TORCH)
	$(PIP) -e '.[demo,dp]'
	touch $@ $(VENV)/.demo

demo-dp: $(VENV)/.demo-dp
	$(BIN)/python -m secagg.service.demo.dp_plot --out demo-out

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

# The Flower environment runs the Flower tests, the stub drift test and the primitives
# (pycryptodome 3.x, protobuf 6 at run time).
FLOWER_TESTS = tests/integrations/test_flower.py tests/integrations/test_flower_config.py \
	tests/integrations/test_flower_he.py tests/integrations/test_flower_example.py \
	tests/integrations/test_flower_dp.py tests/service/test_codegen.py tests/test_ckks_codegen.py \
	tests/test_primitives.py tests/test_protocol.py

unit: unit-main unit-flower

.PHONY: unit-main unit-flower envs
unit-main: $(VENV)/.dev
	$(BIN)/python -m pytest -q

unit-flower: $(FVENV)/.flower
	$(FBIN)/python -m pytest -q -p no:cacheprovider $(FLOWER_TESTS)

envs:
	$(MAKE) --no-print-directory -j2 $(VENV)/.dev $(FVENV)/.flower

# `make test` builds both environments side by side, then runs the main suite (mostly one
# core) beside lint, mypy and the Flower environment's tests (the other core), then the
# benchmark smoke run: on the 2-core CI machine about 2 min less than one after another.
# Any failing part fails the target.
test: envs
	$(MAKE) --no-print-directory -j4 --output-sync=line lint typecheck unit-main unit-flower
	$(MAKE) --no-print-directory bench-smoke

# Scaling suite (docs/benchmarks.md): writes its section of benchmarks/RESULTS.md and
# benchmarks/plots/. pytest's default pattern (test_*.py) does not collect bench_*.py.
BENCH_PYTEST = $(BIN)/python -m pytest -p no:cacheprovider --benchmark-only -o python_files='bench_*.py'

# Quick profile: measured 4 min 12 s on the quiet 2-core machine before the Flower rows;
# 14 min 50 s (8 min 39 s CPU) with them at load 4-10 on the shared box (RESULTS.md).
# The Flower rows (bench_flower.py) run Flower's SecAgg+ in .venv-flower.
bench bench-quick: $(VENV)/.dev $(FVENV)/.flower
	SECAGG_BENCH_PROFILE=quick $(BENCH_PYTEST) -q benchmarks/suite

# Smoke run (part of `make test`, so of CI): every benchmarks/**/bench_*.py once, at the
# tiny profile's toy sizes, timing off (--benchmark-disable), so an API change that breaks a
# benchmark fails CI. Rows go to build/bench-tiny/, never to benchmarks/RESULTS.md. The
# Flower rows run in .venv-flower. About 45 s of CPU time: 1.5-2 min wall on the shared
# 2-core machine (load 1-7).
BENCH_SMOKE = SECAGG_BENCH_PROFILE=tiny $(BIN)/python -m pytest -p no:cacheprovider \
	--benchmark-disable -o python_files='bench_*.py'

bench-smoke: $(VENV)/.dev $(FVENV)/.flower
	$(BENCH_SMOKE) -q benchmarks

# Full profile (1,000 clients, 10^7 parameters) plus every other suite in benchmarks/.
bench-full: $(VENV)/.dev $(FVENV)/.flower
	@echo "make bench-full: several hours on the 2-core machine (1,000 clients, 10^7 parameters)"
	SECAGG_BENCH_PROFILE=full $(BENCH_PYTEST) -q benchmarks

proto: $(FVENV)/.flower
	$(FBIN)/python -m secagg.service.codegen
	$(FBIN)/python -m secagg.ckks_codegen

clean:
	rm -rf $(VENV) $(FVENV) build .pytest_cache .mypy_cache .ruff_cache .hypothesis
