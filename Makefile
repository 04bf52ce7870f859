# The two commands a fresh clone needs:
#   make demo   set up, make sure Fashion-MNIST is installed, train configs/fashion_mnist.yaml
#   make test   set up, make sure Fashion-MNIST is installed, run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data slurm demo test test-fast clean-runs

setup: $(VENV)/.installed

# Re-installs only when requirements.txt changes; torch/torchvision are pinned to builds on local disk.
$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist (the four original idx .gz files).
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -q && sudo apt-get install -y -q dataset-fashion-mnist; \
	  else echo "error: Fashion-MNIST missing; run 'apt-get install dataset-fashion-mnist' as root" >&2; exit 1; fi; \
	fi

# A throwaway one-node SLURM on this machine (apt packages as root), for tests/test_slurm.py and trying sbatch;
# `bash scripts/ci/local_slurm.sh stop` ends it. Without it those tests skip.
slurm:
	bash scripts/ci/local_slurm.sh start

demo: setup data
	$(PY) train.py --config configs/fashion_mnist.yaml

test: setup data
	$(PY) -m pytest -q tests

# Everything but the multi-process runs, for a quick edit-test loop.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

clean-runs:
	rm -rf runs
