# nfvi: `make test` and `make reproduce` set themselves up on first use (a .venv in this folder).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision versions installed into the venv; override e.g. TORCH="torch torchvision" for the newest.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
PROFILE ?= quick
# pytest workers (pytest-xdist); each runs torch on one thread, so the suite uses the cores without oversubscribing them
TEST_JOBS ?= 2
export NFVI_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),./data)

.DEFAULT_GOAL := help
.PHONY: help install test test-slow test-fast test-all test-slurm lint reproduce report figures bench clean-outputs

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=smoke|quick|long|paper (reproduce), NFVI_DATA=<data folder>, TORCH=<pip spec>, TEST_JOBS=<pytest workers>"

$(BIN)/nfvi: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e '.[dev,launchers,uci,trackers]'
	@touch $@

install: $(BIN)/nfvi ## create .venv and install nfvi (editable) with dev extras

test: $(BIN)/nfvi ## set up, then run the test suite but its multi-process and SLURM tests (under 10 minutes on 2 CPU cores)
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n $(TEST_JOBS) -m "not slow and not slurm"

test-slow: $(BIN)/nfvi ## the multi-process tests: sweeps on every launcher, Ctrl-C, racing launches, the wheel, the README
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n $(TEST_JOBS) -m "slow and not slurm"

test-fast: test ## the same as make test (an older name)

test-all: test test-slow test-slurm ## every test, as CI runs them

test-slurm: $(BIN)/nfvi ## sweeps on a one-node SLURM cluster the tests start and stop (root; installs slurm-wlm)
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -p no:xdist -m slurm tests/test_slurm.py

lint: $(BIN)/nfvi ## ruff check and format check
	$(BIN)/ruff check nfvi hydra_plugins tests benchmarks
	$(BIN)/ruff format --check nfvi hydra_plugins tests benchmarks

reproduce: $(BIN)/nfvi ## set up, then run the paper's experiments at PROFILE (smoke|quick|long|paper), tables and figures
	PATH=$(abspath $(BIN)):$$PATH bash scripts/reproduce.sh $(PROFILE)

report: $(BIN)/nfvi ## rebuild every table and figure from outputs/
	$(BIN)/nfvi report

figures: $(BIN)/nfvi ## redraw docs/results/ (the tables and figures docs/ quote) from the run records in results/
	$(BIN)/python -m nfvi.records --figures --results results --out docs/results

bench: $(BIN)/nfvi ## speed and quality benchmarks (tables in benchmarks/results/)
	$(BIN)/python -m benchmarks.run

clean-outputs: ## delete outputs/ (all runs!)
	rm -rf outputs/* && touch outputs/.gitkeep
