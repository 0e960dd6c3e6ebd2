# `make train` and `make test` set everything up on a fresh machine, then run.
# Override the torch build with e.g. `make test TORCH_SPEC="torch==2.5.1"` (CUDA wheels: docs/configuration.md).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup train test test-all test-tl3 bench figures clean

setup: $(VENV)/.installed

# PYTHONWARNINGS: setuptools notes, on every editable install, that a folder named like a package may
# shadow it; train/ and analysis/ are the packages, so the note says nothing here.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -e ".[dev]"
	touch $@

train: setup
	$(BIN)/python -m train $(ARGS)

# The default suite (under 10 minutes on 2 CPU cores): everything but the tests marked slow.
test: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Everything, including the slow tests (sweeps through every launcher, DDP, SIGKILL and resume, long runs).
test-all: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The TransformerLens 3.x path (HookedTransformer export and loading) in an environment of its own.
test-tl3:
	test -x .venv-tl3/bin/python || $(PYTHON) -m venv .venv-tl3
	.venv-tl3/bin/pip install -q --upgrade pip
	.venv-tl3/bin/pip install -q "$(TORCH_SPEC)"
	PYTHONWARNINGS="ignore:Editable installation" .venv-tl3/bin/pip install -q -e ".[tl3]" pytest
	.venv-tl3/bin/python -m pytest -q tests/test_export_tl.py tests/test_circuits.py $(PYTEST_ARGS)

# Figures of the newest run (or sweep) under runs/quickstart/ into figures/; ARGS go to the command,
# e.g. `make figures ARGS="--only icl_score,pca"`.
figures: setup
	@run=$$(ls -dt runs/quickstart/*/ 2>/dev/null | head -n 1); \
	if [ -z "$$run" ]; then echo "error: no run under runs/quickstart/ (run \`make train\` first)" >&2; exit 2; fi; \
	echo "$(BIN)/python -m analysis figures $$run --out figures $(ARGS)"; \
	$(BIN)/python -m analysis figures "$$run" --out figures $(ARGS)

# The harness against a plain loop and TransformerLens, then many seeds: process and stacked ensembles
# against parallel processes (ENSEMBLE_ARGS, e.g. "--n 1,4 --steps 100").
bench: setup
	$(BIN)/python scripts/bench.py $(ARGS)
	$(BIN)/python scripts/bench_ensemble.py $(ENSEMBLE_ARGS)

clean:
	rm -rf $(VENV) .venv-tl3 runs outputs
