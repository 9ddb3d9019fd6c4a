# The fork's interface: `make setup`, `make test`, `make smoke`, `make learn`, `make patches`, `make patches-check`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
# CPU machines: these pairs install and import together (x86-64: from the local wheel cache).
ifeq ($(ARCH),aarch64)
TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
endif
PATCH_FILES := $(wildcard patches/*.patch) patches/series patches/upstream.json
PYTEST_ARGS ?=

.PHONY: setup test smoke learn patches patches-check combined-patch clean

setup: $(VENV)/.installed $(VENV)/.materialised

$(VENV)/.torch:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	touch $@

# diffsynth/ = pinned upstream + patches/ (re-made whenever a patch changes; never overwrites edits).
$(VENV)/.materialised: $(VENV)/.torch $(PATCH_FILES) tools/fork.py
	$(PY) tools/fork.py apply
	touch $@

$(VENV)/.installed: $(VENV)/.torch $(VENV)/.materialised setup.py
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

smoke: setup
	bash examples/wanvideo/model_training/full/test_fantasy_world_training.sh

# The learning benchmark (~20 min on 2 CPU cores; not part of `make test`): outputs/learn/report.md.
learn: setup
	bash bench/learn.sh

patches:
	$(PYTHON) tools/fork.py export

patches-check:
	$(PYTHON) tools/fork.py check

combined-patch:
	$(PYTHON) tools/fork.py combined

clean:
	rm -rf outputs dist
