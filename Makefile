# The fork's interface: `make setup`, `make test`, `make test-engines`, `make smoke`, `make learn`, `make patches`, `make patches-check`,
# `make lock` (move the pins forward), `make test-latest` (the suite on the newest releases setup.py allows).
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
# Every package `make setup` installs, pinned (tools/pins.py). One lock per machine architecture.
LOCK := requirements/lock-$(ARCH).txt
ifneq ($(wildcard $(LOCK)),)
CONSTRAINTS := -c $(LOCK)
endif
# Installed before `.[dev]`: DeepSpeed's sdist builds against the venv's torch (an isolated build
# would fetch another torch); Depth Anything 3 without its declared extras (open3d, pycolmap, a
# `numpy<2` pin: the annotator drives the network itself), so with --no-deps.
define install_extras
	$(1) -m pip install -q $(2) --no-build-isolation deepspeed
	$(1) -m pip install -q $(2) --no-deps 'depth-anything-3==0.1.1'
endef
# Nothing from the caller's environment may reach the venv's imports.
CLEAN_ENV := env -u PYTHONPATH -u PYTHONHOME PYTHONNOUSERSITE=1

.PHONY: setup test test-engines smoke learn patches patches-check combined-patch clean lock test-latest latest-venv

setup: $(VENV)/.installed $(VENV)/.materialised

$(VENV)/.torch:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(CONSTRAINTS) $(TORCH_SPEC)
	touch $@

# diffsynth/ = pinned upstream + patches/ (re-made whenever a patch changes; never overwrites edits).
$(VENV)/.materialised: $(VENV)/.torch $(PATCH_FILES) tools/fork.py
	$(PY) tools/fork.py apply
	touch $@

$(VENV)/.installed: $(VENV)/.torch $(VENV)/.materialised setup.py $(wildcard $(LOCK))
	$(call install_extras,$(PY),$(CONSTRAINTS))
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[dev]'
ifeq ($(CONSTRAINTS),)
	@echo "WARNING: no $(LOCK): packages are unpinned on $(ARCH) (make lock writes one)" >&2
else
	$(CLEAN_ENV) $(PY) tools/pins.py check $(LOCK)
endif
	touch $@

test: setup
	$(CLEAN_ENV) $(PY) -m pytest -q $(PYTEST_ARGS) tests

# The engine tests (DDP, ZeRO-2, ZeRO-3, FSDP2 on 2 CPU processes) plus ZeRO-3 with the optimizer offloaded
# as shipped, which builds DeepSpeed's CPU Adam on first use (~5 min): not part of `make test`.
test-engines: setup
	$(CLEAN_ENV) FANTASY_WORLD_TEST_ENGINES=1 $(PY) -m pytest -q $(PYTEST_ARGS) tests/integration/test_engines_cpu.py

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

# The newest releases setup.py allows, in a venv of their own (not CI's: a new release must not block
# a landing). `make lock` freezes such a resolution into $(LOCK); `make test-latest` runs the suite on it.
LATEST_VENV := .venv-latest
latest-venv: $(VENV)/.materialised
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(call install_extras,$(LATEST_VENV)/bin/python,)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade -e '.[dev]'

lock: latest-venv
	$(CLEAN_ENV) $(LATEST_VENV)/bin/python tools/pins.py freeze $(LOCK)

test-latest: latest-venv
	$(CLEAN_ENV) $(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests
