# The README's commands.  Each target creates/uses the virtual environment in .venv itself.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# torch 2.13.0: a CPU build where only that wheel is available, the CUDA build from PyPI elsewhere.
TORCH ?= torch==2.13.0
RUN ?= runs/demo
# the demo's training steps: auto = the preset's 450, or as many as fit in 10 minutes counted from
# make's start, installation included, at this CPU's measured speed (src/verydeepvae/demo_steps.py)
DEMO_STEPS ?= auto
STARTED := $(shell date +%s)

.PHONY: install demo test test-fast bench clean-demo

# pip byte-compiles what it installs one file at a time; compileall does it on every core
# (87 s -> 75 s for the whole installation on 2 cores).  Its status is not checked: like pip, it
# meets a few files in third-party packages that are not meant to compile.
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check --no-compile
COMPILE := $(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) "$(TORCH)"
	$(PIP_INSTALL) -e ".[test]"
	$(COMPILE)
	touch $@

# nilearn, the optional [atlas] extra, only for the test that rebuilds the packaged atlas
$(VENV)/.installed-atlas: $(VENV)/.installed
	$(PIP_INSTALL) -e ".[test,atlas]"
	$(COMPILE)
	touch $@

install: $(VENV)/.installed

## Train the demo model on the built-in phantom population, then sample from it.
demo: install
	@steps="$(DEMO_STEPS)"; \
	if [ "$$steps" = auto ]; then steps=$$($(PY) -m verydeepvae.demo_steps --started $(STARTED)) || exit 1; fi; \
	echo "$(VENV)/bin/verydeepvae train --preset demo --set max_steps=$$steps --output $(RUN) --overwrite"; \
	$(VENV)/bin/verydeepvae train --preset demo --set max_steps=$$steps --output $(RUN) --overwrite
	$(VENV)/bin/verydeepvae sample --checkpoint $(RUN) --num 8 --temperature 0.8 --output $(RUN)/samples_t0.8

## The whole test suite, slow end-to-end tests included (what CI runs).
test: install $(VENV)/.installed-atlas
	$(PY) -m pytest

## Only the fast tests.
test-fast: install
	$(PY) -m pytest -m "not slow"

bench: install
	$(PY) bench/phantom.py
	$(PY) bench/data_pipeline.py
	$(PY) bench/sample.py
	$(PY) bench/train_step.py --preset 32 --batch-size 2 --limit

clean-demo:
	rm -rf $(RUN)
