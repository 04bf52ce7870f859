#!/usr/bin/env bash
# One call that checks the trainer on a CUDA GPU (training in fp32/bf16/fp16, eager and compiled; bitwise resume;
# DDP; ConvNeXt-T speed; exact evaluation) and prints a JSON summary as its last line; see scripts/gpu_check.py.
#   bash scripts/gpu_check.sh [--out DIR] [--dry-run]      (PYTHON=... picks another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" scripts/gpu_check.py "$@"
