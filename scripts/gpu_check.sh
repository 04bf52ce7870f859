#!/usr/bin/env bash
# One call that checks the trainer on a CUDA GPU within a time budget (training in fp32/bf16/fp16, eager and
# compiled; bitwise resume; DDP; exact evaluation; ConvNeXt-T speed) and prints a JSON summary as its last line; see
# scripts/gpu_check.py.
#   bash scripts/gpu_check.sh [--out DIR] [--budget-s S] [--dry-run] [--no-install]
#   PYTHON=python3 bash scripts/gpu_check.sh --budget-s 420    # a fresh GPU machine: its own CUDA torch, no venv
# The Python: $PYTHON, else the project's .venv/bin/python, else python3. The loader's JPEG region decoder is built
# first where a C compiler and libjpeg's headers exist (the Makefile's rule, without its apt-get); else Pillow decodes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
if ! command -v "$py" >/dev/null; then
  echo "gpu_check: no Python '$py' here; set PYTHON to one with a CUDA torch" >&2
  exit 2
fi
lib=data/decoding/_jpeg_region.so
if [ ! -f "$lib" ] || [ data/decoding/jpeg_region.c -nt "$lib" ]; then
  # Built aside and moved in whole: a process loading the library meanwhile never reads half of one.
  if "${CC:-cc}" -O2 -shared -fPIC -o "$lib.$$" data/decoding/jpeg_region.c -ljpeg 2>/dev/null; then
    mv "$lib.$$" "$lib"
  else
    rm -f "$lib.$$"
    echo "gpu_check: no C compiler or no libjpeg headers here: the loader decodes JPEGs with Pillow" >&2
  fi
fi
# The project's packages for a Python it is not installed into (a GPU machine's own), ahead of anything installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" scripts/gpu_check.py "$@"
