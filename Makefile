# rnnscale: every target sets itself up on a fresh machine (Python 3.10+ on PATH as python3).
#   make quickstart   create .venv, install, build the stdlib corpus + tokenizer, train, print the run
#   make test         create .venv if missing, install .[dev], run the whole test suite
#   make lint         ruff + the import-direction contract
#   make bench        every benchmark beside its peer (~28 min on 2 cores): docs/performance.md
#   make gpu-wheels   here, before a GPU machine's call: the wheels it lacks, into wheels/ (network)
#   make gpu-check    on a CUDA machine (carry wheels/): CUDA tests, ours vs fla, 1.3B training
#                     steps vs Llama, every Triton kernel timed, in < 8 min (docs/performance.md)
#   make sm90         no GPU needed: every Triton kernel compiled for H100/H200, its fit (docs/kernels.md)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch goes in first, and is pinned for every later install: DeepSpeed builds against it, and
# without the pin pip may swap it for another build while resolving torchvision (pulled in by
# mosaicml-streaming). torchvision must come from the same build as torch, or it fails to import.
# On a GPU cluster set TORCH_SPEC to the build that matches your CUDA.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.rnnscale-installed
PYTEST_ARGS ?=

.PHONY: venv quickstart test lint bench clean gpu-check sm90

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@# a venv whose creation was interrupted has python but no pip: make it again
	@$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	@$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	$(PY) -c "from importlib.metadata import version as v; print(f'torch=={v(\"torch\")}\ntorchvision=={v(\"torchvision\")}')" > $(VENV)/constraints.txt
	@$(PY) -c "import deepspeed" 2>/dev/null || $(PIP) install -c $(VENV)/constraints.txt --no-build-isolation deepspeed
	$(PIP) install -c $(VENV)/constraints.txt -e ".[dev]"
	@touch $(STAMP)

QS := runs/quickstart-data
quickstart: $(STAMP) $(QS)/shards/prepare.json
	$(VENV)/bin/rnnscale train configs/quickstart.yaml checkpoint.resume=none
	$(VENV)/bin/rnnscale generate runs/quickstart --prompt "def " --max-new-tokens 48
	@echo
	@echo "run directory:  runs/quickstart (config.yaml, metrics.jsonl, model.safetensors)"
	@echo "checkpoints:    runs/quickstart/checkpoints"
	@echo "TensorBoard:    $(VENV)/bin/rnnscale dashboard runs/quickstart   (http://127.0.0.1:6006)"
	@echo "wandb, offline: runs/quickstart/wandb  ($(VENV)/bin/wandb sync runs/quickstart/wandb/offline-run-*)"
	@echo "where it is:    $(VENV)/bin/rnnscale status runs/quickstart"

# the embedded corpus (the Python standard library's source) and its tokenizer, built once
$(QS)/tokenizer/tokenizer.model: | $(STAMP)
	$(VENV)/bin/rnnscale data tokenizer --builtin python-stdlib --vocab-size 4096 \
		--max-sentences 200000 --out $(QS)/tokenizer

$(QS)/shards/prepare.json: $(QS)/tokenizer/tokenizer.model
	$(VENV)/bin/rnnscale data prepare --builtin python-stdlib \
		--tokenizer $(QS)/tokenizer/tokenizer.model --out $(QS)/shards

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# the tables and figures of docs/performance.md, each benchmark beside a peer in the same run;
# the `bench` extra (fla-core: the kernel benchmark's second peer) with torch held at its pin
bench: $(STAMP)
	@$(PY) -c "import fla, einops" 2>/dev/null || $(PIP) install -c $(VENV)/constraints.txt -e ".[bench]"
	$(PY) benchmarks/suite.py

# on a GPU machine (the device's own python3 with torch, triton and transformers; no network,
# installs nothing: rnnscale from this checkout, what wheels/ holds and the device lacks unpacked
# into a temporary folder): the CUDA tests, ours beside fla's kernels, the 1.3B recipes' training
# steps beside Llama, and each recipe shape's kernels beside the PyTorch path
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out runs/gpu-check

# the pure-Python wheels gpu-check needs and a bare GPU machine (Python 3.12, torch, triton,
# transformers, numpy) lacks, into wheels/ (ignored): fla-core (the peer's kernels) and einops,
# pytest and its dependencies; the device call carries wheels/ (docs/performance.md)
GPU_WHEELS ?= fla-core==0.6.0 einops==0.8.2 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 \
	pygments==2.21.0 packaging==26.4
.PHONY: gpu-wheels
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation py --abi none --platform any -d wheels $(GPU_WHEELS)
	@ls wheels

# every Triton kernel compiled for sm_90 at the recipes' head shapes, here (CPU, no GPU):
# registers, spills, shared memory, fits or not; cached, so a second run takes seconds
sm90: $(STAMP)
	$(PY) -m rnnscale.kernels.sm90

clean:
	rm -rf runs .pytest_cache .ruff_cache build *.egg-info
