"""A one-call check of the trainer on a machine with a CUDA GPU: does it train, resume, run DDP and evaluate
correctly there, and how fast is ConvNeXt-T? It ends within --budget-s (default 420 s), the most important steps first.

    bash scripts/gpu_check.sh [--out DIR] [--budget-s S]        # or: make gpu-check
    bash scripts/gpu_check.sh --dry-run                         # (or GPU_CHECK_DRY_RUN=1) the same steps on the CPU
    PYTHON=python3 bash scripts/gpu_check.sh --budget-s 420     # a fresh GPU machine: its own CUDA torch, no venv

Each step is reported ok, failed (with the error and its log), skipped (with the reason) or stopped (cut short,
by the budget's end or a signal); in the order of what matters most, which is the order they start in:
  train_<fp32|bf16|fp16>[_compile]  configs/debug.yaml for one epoch in each precision (fp16 with the gradient
                  scaler), eager and under torch.compile: exit 0, on the GPU, finite losses, checkpoints written;
  resume_bitwise  train.deterministic=true: resumed (--resume) from a mid-epoch step checkpoint of an uninterrupted
                  run, the run ends with last.pth weights and EMA torch.equal to that run's;
  ddp_gloo        2 ranks under torchrun on the one GPU, dist.backend=gloo, train.deterministic=true;
  ddp_nccl        the same with NCCL, where at least 2 GPUs are visible;
  eval_exact      eval.py on 1 and 2 processes over ddp_gloo's checkpoint and 101 validation images: 101 samples
                  both times, top-1 within one image of each other and of the top-1 the training run logged;
  speed[_compile] scripts/benchmark.py on ConvNeXt-T, 224 px, bf16, channels_last: img/s, MFU against the
                  data sheet, peak memory (bare step and the trainer's step); with --forbid-syncs, so a host-device
                  sync in a timed training step (batch transform, mixup, forward, backward, optimizer, EMA; the
                  steps that log excepted) fails the step, naming the line that made it;
  profile         train.py on ConvNeXt-T with train.profile: a torch.profiler trace of 5 steps after warm-up and
                  the milliseconds of a step and of its data wait, forward, backward and optimizer (device time);
  checkpoint      scripts/checkpoint_benchmark.py on ConvNeXt-B's state: how long a save holds the ranks, written
                  inline against in the background (at most a quarter of it: the device-to-host copy alone);
  input           can this node's CPUs feed its GPU? ConvNeXt-T's training step on the generated JPEG test bed
                  (python scripts/testbed.py) with the real loader, a worker per core but one, against the same step
                  on a batch held on the device (scripts/benchmark.py, pipeline/trainer), the loader's images/s per
                  core, and its JPEG decoder: "region (libjpeg-turbo)" or "pillow";
  eval_speed      eval.py's loop (engine.loop.evaluate) on ConvNeXt-T (random weights) over the real evaluation
                  loader of synthetic images at steady state: img/s after the loader's workers started and cuDNN
                  tuned in untimed warm-up batches (scripts/benchmark.py --modes eval).
The budget: STEPS (gpu_check_plan.py) holds each step's expected seconds on the GPU and in the dry run. A step
starts only while the budget's remaining time holds it, else it is skipped ("budget: N s left, step needs about
M s"; a later, shorter step may still run). Every command's timeout is clipped to the budget: one still running at
its end is stopped, and so is its step (a hang, or a step slower than STEPS says), so the check ends within the
budget. The correctness steps run a few at a time (the GPU has room); the timed steps then run alone (in the dry run
with the others).
Output: under --out (default: a new temporary folder) one <step>.out/.err log per command, and summary.json,
rewritten after every step. The last stdout line is that JSON: its state (ok, failed, cut short by the budget or by
a signal), each step's result with its seconds and expected_s, the steps ran, failed, stopped and skipped_for_budget,
the interpreter, torch, CUDA and the GPU. SIGTERM or SIGINT (Ctrl-C) stops the running commands, skips the rest and
ends with the JSON too (exit 128 + the signal's number); otherwise the exit code is 0 when the state is ok, else 1.
Without CUDA (and without --dry-run) it prints one line and exits 0.
Any Python with a CUDA torch runs it (gpu_check.sh picks $PYTHON, else .venv/bin/python, else python3; the project
needs no install: its folder goes on the path). A Python older than pyproject.toml's requires-python, or a torch or
torchvision missing or older than its floor there, is refused in one line (exit 2): those come with the machine's
CUDA, never from here. The other dependencies it lacks (timm, PyYAML, tqdm, tensorboard, ...) it installs at
requirements.txt's versions with `pip install --user` (into the venv, where the Python is a venv's) and says so; with
--no-install, or where pip fails (offline), it refuses in one line that names them and the pip command. gpu_check.sh
builds the loader's JPEG region decoder (data/decoding/_jpeg_region.so) where a C compiler and libjpeg's headers exist.
The dry run uses the same counts (steps, batch sizes, warm-up, evaluation sizes) with a tiny model at 32 px, in the
precision the CPU has, so a count that cannot work on the GPU fails there first.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time

STARTED = time.monotonic()  # the budget counts from here: the imports below are part of the call

# scripts/, beside this file; these three import nothing of the project, nor torch.
from gpu_check_plan import DRY, GPU  # noqa: E402
from gpu_check_preflight import Refused, preflight  # noqa: E402
from gpu_check_runner import Stop  # noqa: E402

STOP = Stop()
if __name__ == "__main__":  # before the imports below, which take seconds: a signal from here on ends with the JSON
    for _signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_signal, STOP.on_signal)

try:
    import torch
except ImportError:  # a Python without torch: preflight() refuses it in one line
    torch = None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="", help="folder for every run's output (default: a new temporary folder)")
    parser.add_argument("--dry-run", action="store_true",
                        help="every step on the CPU at tiny sizes (also GPU_CHECK_DRY_RUN=1): tests the plumbing")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds the whole check may take (default 420); steps that do not fit are skipped")
    parser.add_argument("--no-install", action="store_true",
                        help="refuse, naming them, where dependencies other than torch are missing, instead of "
                             "installing them with pip")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s:g}")
    return args


def about(dry: bool, installed_now: list[str]) -> dict:
    """The interpreter and what it runs on, for the summary."""
    return {"python": sys.executable, "installed": installed_now, "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": "cpu" if dry else torch.cuda.get_device_name(0),
            "gpus": 0 if dry else torch.cuda.device_count()}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        installed_now = preflight(args.no_install)
    except Refused as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    dry = args.dry_run or os.environ.get("GPU_CHECK_DRY_RUN", "") not in ("", "0")
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to check")
        return 0
    from gpu_check_steps import Check  # only now: it imports the project, which needs what preflight vouched for

    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="gpu_check_"))
    os.makedirs(out, exist_ok=True)
    check = Check(DRY if dry else GPU, out, dry, args.budget_s, STOP, about(dry, installed_now), started=STARTED)
    print(f"gpu_check: {'dry run on the CPU' if dry else 'on ' + check.about['device']}, within {args.budget_s:g} s; "
          f"every run's output in {out}", flush=True)
    check.run_all()
    summary = check.finish()
    print(json.dumps(summary))
    return 128 + STOP.signum if STOP.by else 0 if summary["gpu_check"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
