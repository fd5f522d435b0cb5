# fmh-engine: `make demo` runs the main job on the built-in synthetic chip,
# `make test` runs the whole test suite. Both create .venv and install what they need.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PY          := $(VENV)/bin/python
PIP         := $(VENV)/bin/pip
STAMP_RT    := $(VENV)/.stamp-runtime
STAMP_DEV   := $(VENV)/.stamp-dev
STAMP_JIT   := $(VENV)/.stamp-jit
PYTEST_ARGS ?=

.PHONY: demo test install dev bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools

$(STAMP_RT): setup.py | $(PY)
	$(PIP) install -q -e .
	touch $@

# The test set-up pins a CPU build of torch (an unpinned torch pulls a multi-GB CUDA build);
# override with `make test TORCH_SPEC=...`.
$(STAMP_DEV): setup.py $(STAMP_RT)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev,train]"
	touch $@

install: $(STAMP_RT)
dev: $(STAMP_DEV)

# The Numba kernels compile on first use and are cached: compile them once, on a short
# detection run, before the live demo, so that compilation does not stall a live source.
$(STAMP_JIT): $(STAMP_RT)
	@echo "compiling the front-end kernels once (cached for later runs)..."
	$(VENV)/bin/fmh detect "sim://?frames=1500&seed=0" --out $(VENV)/jit-warmup --no-clips --quiet
	rm -rf $(VENV)/jit-warmup
	touch $@

demo: $(STAMP_JIT)
	$(VENV)/bin/fmh demo

test: $(STAMP_DEV)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

bench: $(STAMP_DEV)
	$(PY) -m bench all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
