# The two commands a fresh clone needs:
#   make demo   set up, make sure Fashion-MNIST is installed, train configs/fashion_mnist.yaml
#   make test   set up, make sure Fashion-MNIST is installed, run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data test-tools slurm demo test test-fast gpu-check clean-runs

setup: $(VENV)/.installed data/decoding/_jpeg_region.so

# Re-installs only when the requirements change; torch/torchvision are pinned to builds on local disk. The project
# itself goes in editable (pyproject.toml), so its packages import from anywhere and edits take effect at once.
# torch's CUDA build takes ~5.5 GB: say so up front instead of pip's "No space left on device" halfway through.
$(VENV)/.installed: requirements.txt pyproject.toml
	@free_mb=$$(df -Pm $(dir $(abspath $(VENV))) | awk 'NR == 2 {print $$4}'); if [ "$$free_mb" -lt 6500 ]; then \
	  echo "error: installing needs about 6.5 GB of free disk and only $$free_mb MB are free here; free some space, or set VENV=<a folder on a larger disk>" >&2; exit 1; fi
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-build-isolation -e '.[test]' pytest==9.2.0 \
	  pytest-xdist==3.8.0
	touch $@

# The loader's JPEG region decoder (data/decoding/jpeg_region.c) against libjpeg-turbo; without it the loader decodes
# whole images with Pillow (its decode measured 1.7x slower). Headers: Debian's libjpeg62-turbo-dev (elsewhere
# libjpeg-turbo-devel).
data/decoding/_jpeg_region.so: data/decoding/jpeg_region.c
	@if [ ! -f /usr/include/jpeglib.h ] && [ ! -f /usr/local/include/jpeglib.h ]; then \
	  $(call apt_install,libjpeg62-turbo-dev) || echo "warning: no libjpeg headers; JPEGs will be decoded with Pillow" >&2; fi
	$(CC) -O2 -shared -fPIC -o $@ $< -ljpeg || echo "warning: could not build $@; JPEGs will be decoded with Pillow" >&2

# Debian packages, as root or through sudo: $(call apt_install,PACKAGES).
apt_install = if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q $(1); \
  elif command -v sudo >/dev/null; then sudo apt-get update -q && sudo apt-get install -y -q $(1); \
  else echo "error: $(1) missing; run 'apt-get install $(1)' as root" >&2; false; fi

# Fashion-MNIST comes from Debian's dataset-fashion-mnist (the four original idx .gz files).
data:
	@if [ ! -f $(FMNIST) ]; then $(call apt_install,dataset-fashion-mnist); fi

# strace, with which tests/test_resume.py holds a checkpoint write midway to kill the run during it (skipped without).
test-tools:
	@if ! command -v strace >/dev/null; then $(call apt_install,strace) || true; fi

# A throwaway one-node SLURM on this machine (apt packages as root), for tests/test_slurm.py and trying sbatch;
# `bash scripts/ci/local_slurm.sh stop` ends it. Without it those tests skip.
slurm:
	bash scripts/ci/local_slurm.sh start

# tcmalloc (Debian: libtcmalloc-minimal4), when installed, in place of glibc's malloc: faster on the CPU (README, Speed).
TCMALLOC := $(firstword $(wildcard /usr/lib/*/libtcmalloc_minimal.so.4))

demo: setup data
	$(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC) )$(PY) train.py --config configs/fashion_mnist.yaml

# wandb for the W&B test only, in a folder of its own that the test puts on PYTHONPATH: wherever wandb is importable,
# `import timm` imports it too (about 0.7 s a process here), which every other test process would pay.
WANDB_SITE := $(VENV)/wandb-site
$(WANDB_SITE)/.installed: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --target $(WANDB_SITE) wandb==0.31.0
	touch $@

# The optional `datasets` (data.name=hf) for the tests of Hugging Face data sets; `import timm` does not import it.
$(VENV)/.hf-installed: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-build-isolation -e '.[hf]' datasets==5.2.0
	touch $@

# The optional ONNX exporter and runtime (models.export --format onnx) for the export tests; imported only there.
$(VENV)/.serve-installed: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-build-isolation -e '.[serve]' onnx==1.23.2 \
	  onnxruntime==1.32.0 onnxscript==0.7.2
	touch $@

# On TEST_WORKERS pytest-xdist workers (2: the CI's cores), a test file to each at a time (module fixtures hold runs
# that several tests read); the files with whole runs go first (tests/conftest.py).
TEST_WORKERS ?= 2

test: setup data test-tools $(WANDB_SITE)/.installed $(VENV)/.hf-installed $(VENV)/.serve-installed
	WANDB_SITE=$(abspath $(WANDB_SITE)) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# Everything but the multi-process runs, for a quick edit-test loop.
test-fast: setup $(VENV)/.hf-installed $(VENV)/.serve-installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

# On a machine with a CUDA GPU: train, resume, DDP, speed and exact evaluation in one call (scripts/gpu_check.py)
# within a budget (GPU_CHECK_ARGS="--budget-s 300", say); the last line is a JSON summary. Without CUDA it says so in
# one line. A machine without this venv: PYTHON=python3 bash scripts/gpu_check.sh (README, Tests).
gpu-check: setup
	PYTHON=$(PY) bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

clean-runs:
	rm -rf runs
