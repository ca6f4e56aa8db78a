# llm-ds: every target runs in .venv, which `make install` creates.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# The wheel index torch comes from; empty: pip's own (the CPU build on this kind of machine, where
# pip is set up for it; elsewhere on Linux, PyPI's default CUDA build). E.g.
# TORCH_INDEX=https://download.pytorch.org/whl/cpu (CPU only) or .../whl/cu128 (CUDA 12.8).
TORCH_INDEX ?=
CONFIG ?= llm_ds/configs/tiny.yaml
DS_CONFIG ?= ds_configs/zero2.json
ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: install sysdeps test test-unit test-floors lint format train smoke bench bench-memory bench-gpu bench-data bench-logging bench-checkpoint docker docker-smoke smoke-multinode clean

install: $(STAMP)

# A torch that is already installed is kept (a CUDA machine's own build); otherwise $(TORCH),
# the CPU build by default, goes in before anything can pull a CUDA build as a dependency. The package
# then goes in beside that very torch, so a torch outside setup.cfg's range stops the install (pip names
# both) instead of being swapped for another build.
$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "keeping torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "installing $(TORCH)$(if $(TORCH_INDEX), from $(TORCH_INDEX))"; \
		$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"; \
	fi
	@$(PY) -m pip install -q -e ".[dev]" "torch==$$($(PY) -c 'import torch; print(torch.__version__)')"
	@$(MAKE) --no-print-directory sysdeps
	@touch $@

# System packages, from apt where we are root: libaio for NVMe offload (DeepSpeed's async_io op);
# pdsh and OpenSSH for multi-node launches and the two-node tests.
sysdeps:
	@missing=""; \
	[ -f /usr/include/libaio.h ] || missing="$$missing libaio-dev"; \
	command -v pdsh >/dev/null || missing="$$missing pdsh"; \
	[ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	command -v ssh >/dev/null || missing="$$missing openssh-client"; \
	if [ -z "$$missing" ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
		echo "warning: missing$$missing (NVMe offload and multi-node runs need them); install them with your package manager"; \
	fi

test: install sysdeps
	$(PY) -m pytest -q

test-unit: install
	$(PY) -m pytest -q tests/unit

# The suite against the floor of every range in setup.cfg, in $(FLOORS_VENV): what proves the floors.
# PYTEST_ARGS narrows it (e.g. PYTEST_ARGS=tests/unit); torch's floor comes from TORCH_INDEX, as in install.
FLOORS_VENV ?= .venv-floors
PYTEST_ARGS ?=
test-floors: install sysdeps
	@test -x $(FLOORS_VENV)/bin/python || $(PYTHON) -m venv $(FLOORS_VENV)
	@$(PY) -c "from importlib.metadata import requires; from packaging.requirements import Requirement; \
		reqs = [r for r in map(Requirement, requires('llm-ds')) if r.name != 'llm-ds']; \
		print('\n'.join(sorted({f'{r.name}==' + min(s.version for s in r.specifier if s.operator == '>=') for r in reqs})))" \
		> $(FLOORS_VENV)/floors.txt
	@echo "floors: $$(tr '\n' ' ' < $(FLOORS_VENV)/floors.txt)"
	@$(FLOORS_VENV)/bin/python -m pip install -q --upgrade pip
	@$(FLOORS_VENV)/bin/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) \
		"$$(grep '^torch==' $(FLOORS_VENV)/floors.txt)"
	@$(FLOORS_VENV)/bin/python -m pip install -q -c $(FLOORS_VENV)/floors.txt -e ".[dev]"
	$(FLOORS_VENV)/bin/python -m pip list --format freeze > $(FLOORS_VENV)/installed.txt
	LLM_DS_FLOORS=1 $(FLOORS_VENV)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint docker/Dockerfile

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Every local GPU where there are GPUs, else 2 CPU ranks.
RANKS_ARG = $(shell $(PY) -c "import torch; print('' if torch.cuda.device_count() else '--num_gpus 2')" 2>/dev/null)

train: install
	$(VENV)/bin/deepspeed $(RANKS_ARG) llm_ds/train.py --config $(CONFIG) --ds_config $(DS_CONFIG) $(ARGS)

# About a minute: 2 ranks, ZeRO-2, 40 steps, loss must fall and summary.json appear.
smoke: install
	$(VENV)/bin/deepspeed $(RANKS_ARG) llm_ds/train.py --config $(CONFIG) --ds_config ds_configs/zero2.json \
		--set train.max_steps=40 --set train.eval_interval=0 --set checkpoint.interval=0 \
		--set train.run_name=smoke --set checkpoint.resume=never $(ARGS)
	$(PY) -c "import json,sys; s=json.load(open('runs/smoke/summary.json')); \
		print('smoke: loss %.3f -> %.3f' % (s['first_train_loss'], s['final_eval_loss'])); \
		sys.exit(0 if s['final_eval_loss'] < s['first_train_loss'] - 0.5 else 1)"

# Two nodes on this machine (127.0.0.2 and 127.0.0.3, an sshd each, pdsh): the deepspeed --hostfile
# path trains like one node with two ranks, and a lost node stops the job, which a rerun resumes.
smoke-multinode: install
	$(PY) -m pytest -q tests/dist/test_multinode.py

# Side by side on CPU: a plain PyTorch loop against llm-ds (ZeRO 0-3, 1 and 2 ranks), packed against
# padded, then memory per rank (bench-memory) and what checkpoints cost (bench-checkpoint); writes
# bench/results/cpu.json.
bench: install
	$(PY) bench/bench_cpu.py
	$(PY) bench/bench_memory.py
	$(PY) bench/bench_checkpoint.py

# What a checkpoint costs training: none, foreground and background saves (checkpoint.async) of a 24M-parameter
# GPT-2, alternated; writes bench/results/checkpoint.json.
bench-checkpoint: install
	$(PY) bench/bench_checkpoint.py

# Memory per rank of a 29.5M-parameter GPT-2 under ZeRO 0-3, CPU and NVMe offload, 2 ranks: model
# states and peak, against the ZeRO paper's bytes per parameter and `llm-ds plan`'s prediction.
bench-memory: install
	$(PY) bench/bench_memory.py

# One CUDA GPU: GPT-2 124M, sequence 1024, bf16; plain PyTorch against llm-ds ZeRO-1/2, with and without
# torch.compile; with two GPUs or more also data-parallel 2 against tensor-parallel 2 and 2 pipeline stages;
# writes bench/results/gpu-<card>.json.
bench-gpu: install
	PY=$(PY) bash bench/gpu.sh

# Data pipeline figures: tokenize+pack throughput, padding waste, cache; writes bench/results/data.json.
bench-data: install
	$(PY) bench/bench_data.py

# The per-step cost of logging: log_interval 1 versus 100; writes bench/results/logging.json.
bench-logging: install
	$(PY) bench/bench_logging.py

# The image for cloud GPU nodes (needs a Docker engine): CUDA base, CUDA torch, DeepSpeed's ops built for CUDA
# and checked. DOCKER_ARGS passes more, e.g. --build-arg TORCH_CUDA_ARCH_LIST=8.6.
DOCKER_ARGS ?=
docker:
	docker build -f docker/Dockerfile -t llm-ds:latest $(DOCKER_ARGS) .

# The same Dockerfile built here (Debian base, CPU torch, ops for the CPU accelerator) and run as
# containers: help, a worker without a key, a two-node job across containers, docker stop saves.
docker-smoke: install
	PY=$(PY) bash docker/smoke.sh

clean:
	rm -rf runs .pytest_cache .ruff_cache
