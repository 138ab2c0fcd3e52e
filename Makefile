# minifast: one entry point for set-up, the course, the docs site and the tests.
#   make course   run every notebook at full size and save its outputs
#   make docs     make course, then build the static site into _docs/
#   make site     build the site into _docs/ from the outputs already saved in nbs/ (runs no notebook)
#   make lab      JupyterLab on nbs/ with the project's environment
#   make test     clean/export checks, every notebook at quick size, pytest (the site, the package...)
#   make nbtest | pytest | check-clean | check-export   one part of make test
#   make dist     the sdist and the wheel into dist/ (what .github/workflows/release.yml publishes)
#   make ddp      train the lesson's CNN data-parallel, two processes (examples/train_ddp.py)
#   make gpu-check  the checks that need a GPU, with a report (exits 0 where there is none)
#   make bench    the benchmarks, into bench/RESULTS.md (about 20 minutes; see bench/README.md)
#   make setup    only the virtual environment, .venv/;  make data  only the data;  make clean  removes what was built
#   make tensorboard  TensorBoard on the logs notebook 08 writes
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.minifast-installed

.PHONY: setup data course docs site dist test check-clean check-export nbtest pytest lab bench clean browser ddp gpu-check tensorboard

# --- set-up -----------------------------------------------------------------
$(STAMP): pyproject.toml requirements/dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, on its own, as pip's index offers it: on Linux, PyPI's wheel is the multi-GB CUDA build, and
	# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu (as in CI) gives the CPU build instead
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements/dev.txt
	$(BIN)/pip install -q --no-deps -e .
	# what a fresh install of the wheel needs (torch, minifast's dependencies and theirs), kept on disk so that
	# tests/test_package.py installs the built wheel into a new venv without the network
	$(BIN)/pip download -q -d $(VENV)/wheelhouse torch==2.13.0 .
	touch $(STAMP)

setup: $(STAMP)

# Fashion-MNIST from Debian where we are root on a system with apt; otherwise
# minifast's loader finds it or downloads it into the cache (see nbs/01_data.ipynb).
data: $(STAMP)
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing dataset-fashion-mnist with apt-get"; \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null)); \
	fi
	$(BIN)/python -c "from minifast.data import get_data_dir; print('data:', get_data_dir('fashion_mnist'))"

# --- the course and the site --------------------------------------------------
# Runs every notebook top to bottom in a fresh kernel and writes the outputs back.
course: data
	MINIFAST_SIZE=full $(BIN)/nbdev-test --n-workers 1 --timing --save --cell-timeout 0
	$(BIN)/nbdev-clean

# nbdev processes the executed notebooks, Sphinx (myst-nb, sphinx-book-theme) renders them.
docs: course
	$(BIN)/python tools/build_docs.py

site: setup
	$(BIN)/python tools/build_docs.py

dist: setup
	rm -rf dist && $(BIN)/python -m build --outdir dist .

lab: setup
	$(BIN)/jupyter lab nbs/ $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

bench: data
	$(BIN)/python bench/run.py

# Data-parallel training with two processes on this machine, one thread each (see nbs/09_distributed.ipynb).
ddp: data
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node=2 examples/train_ddp.py

# The checks that need a GPU (notebooks' CUDA paths, a fit with no host sync, DDP on nccl); says so and passes without one.
gpu-check: data
	$(BIN)/python tools/gpu_check.py

# TensorBoard on the runs the notebooks write under runs/ (08_gradients writes runs/08_gradients/); open http://localhost:6006
tensorboard: setup
	mkdir -p runs
	$(BIN)/tensorboard --logdir runs --port 6006

# --- the tests ----------------------------------------------------------------
check-clean: setup
	@before=$$(git status --porcelain -- nbs); $(BIN)/nbdev-clean; after=$$(git status --porcelain -- nbs); \
	if [ "$$before" != "$$after" ]; then echo "nbdev-clean changed notebooks: run nbdev-clean and commit"; git status --short -- nbs; exit 1; fi
	@echo "ok: notebooks are clean"

check-export: setup
	@before=$$(git status --porcelain -- minifast README.md; git diff -- minifast README.md | sha1sum); \
	$(BIN)/nbdev-export; $(BIN)/python tools/make_readme.py; \
	after=$$(git status --porcelain -- minifast README.md; git diff -- minifast README.md | sha1sum); \
	if [ "$$before" != "$$after" ]; then echo "nbdev-export or the README changed: notebooks and library disagree"; git status --short -- minifast README.md; exit 1; fi
	@echo "ok: minifast/ and README.md agree with the notebooks"

# Runs a copy of nbs/ at quick size and saves the outputs there, so the committed notebooks stay
# as they are and tests/test_site.py builds the site from these outputs without a second run.
QUICK_NBS := _quick
nbtest: data
	rm -rf $(QUICK_NBS) && cp -a nbs $(QUICK_NBS)
	MINIFAST_SIZE=quick $(BIN)/nbdev-test $(QUICK_NBS) --n-workers 1 --timing --save
	touch $(QUICK_NBS)/.executed

# Headless Chromium for tests/test_site.py (apt-get, only where it is missing).
browser:
	tools/install_browser.sh

pytest: data browser
	$(BIN)/python -m pytest -q tests/

test: check-clean check-export nbtest pytest
	@echo "make test: all checks passed"

clean:
	rm -rf _docs _proc _quick _full _full03 _full06 jupyter_execute site dist build .pytest_cache test-artifacts
