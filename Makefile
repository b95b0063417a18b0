# Two commands matter: `make demo` (the embedded default job) and `make test`.
# Both create .venv and install everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# CPU machines take the CPU wheel of torch; GPU users can install their CUDA torch into the venv
# first (or set TORCH_SPEC) and this step keeps it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast clean

# The real tokenizers the model-family tests build on (tests/families.py), fetched from registry
# packages at install time into a cache outside the repo; tests never reach the network.
FIXTURE_SOURCES ?= $(HOME)/.cache/sft_scale/fixture-sources

# The suite mostly waits on one process at a time (start-up, imports, a tiny model's steps): on
# 2 cores a single pytest process keeps about one busy. Two workers use both. `loadfile` keeps
# each test file in one worker, so a module's shared fixtures (a trained run, the local SLURM
# cluster with its munge and /etc/hosts entries) exist once. TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	# DeepSpeed ships as an sdist whose build imports torch: build it against the torch above
	# instead of letting pip fetch another (CUDA, several GB) torch into an isolated build env.
	$(PIP) install --no-build-isolation "deepspeed>=0.17"
	$(PIP) install -e ".[dev]"
	# llama.cpp's GGUF converter, from llama-cpp-python's pinned source package (sft_scale/gguf_export.py).
	$(VENV)/bin/sft-scale gguf setup
	touch $@

$(FIXTURE_SOURCES)/.complete: tests/fetch_sources.py
	SFT_SCALE_FIXTURE_SOURCES=$(FIXTURE_SOURCES) $(PY) tests/fetch_sources.py

demo: install
	$(VENV)/bin/sft-scale demo --output-dir runs/demo

test: install $(FIXTURE_SOURCES)/.complete
	$(PYTEST)

test-fast: install $(FIXTURE_SOURCES)/.complete
	$(PYTEST) -m "not slow"

clean:
	rm -rf runs .pytest_cache
