"""What scripts/gpu_check.py runs: each step's expected seconds, in the order of what matters most (the budget
reads them), and the two profiles of counts and sizes, GPU for the real check and DRY for its dry run on a CPU."""
from __future__ import annotations

import os
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, above scripts/

# Each step's expected seconds (on an H100/H200, in the dry run on 2 CPU cores) in the order of what matters most:
# correctness, then speed, profile, checkpoint, input, evaluation speed. The GPU's are estimates until a GPU run's
# JSON (each step's seconds next to its expected_s) replaces them; the dry run's are about 1.1-1.2x the longest its
# steps took on 2 cores shared with other test runs (load average 5; 1.5-2.5x the usual); 0 where the dry run never
# runs the step (it says why instead).
STEPS: dict[str, tuple[int, int]] = {
    "train_fp32_compile": (120, 0), "train_bf16_compile": (120, 0), "train_fp16_compile": (120, 0),
    "train_fp32": (30, 25), "train_bf16": (30, 25), "train_fp16": (30, 20), "resume_bitwise": (60, 45),
    "ddp_gloo": (45, 30), "ddp_nccl": (45, 0), "eval_exact": (50, 40),
    "speed": (60, 35), "speed_compile": (180, 0), "profile": (60, 35), "checkpoint": (60, 30), "input": (90, 40),
    "eval_speed": (60, 40)}
ORDER = list(STEPS)


@dataclass(frozen=True)
class Profile:
    """How a check runs: GPU for the real one; DRY for its plumbing on a CPU, with the GPU's counts (batches per
    epoch, batch sizes, warm-up, timed steps, evaluation sizes) and only the model and its images made tiny, so
    that whatever would fail on the GPU for reasons of counts fails in the dry run first."""
    tiny: tuple[str, ...] = ()  # overrides that shrink the model of every run
    tiny_t: tuple[str, ...] = ()  # those that shrink convnext_t.yaml's model and images further
    amp: str = "bf16"  # the speed and profile steps' precision ("auto" in the dry run: what the CPU has)
    jobs: int = 4  # correctness steps run at once
    timeout: int = 300  # seconds any one command may take before it is stopped and its step fails
    no_compile: str = ""  # why the compiled runs are skipped ("": they run)
    saves: tuple[str, ...] = ()  # overrides for how the training runs save their checkpoints ((): as configured)
    # The counts, the same in both.
    train: tuple[str, ...] = ("schedule.epochs=1", "data.synthetic_train_size=128")  # debug.yaml: 8 steps of 16
    resume_size: int = 64  # synthetic training images of the resume runs (2 epochs of 4 steps of 16)
    batch: int = 128  # the speed and profile steps' per-GPU batch: convnext_t.yaml's
    bench: tuple[str, ...] = ("--steps", "20", "--warmup", "5", "--repeats", "3")  # benchmark.py's options
    eval_batch: int = 256  # eval_speed's batch: convnext_t.yaml's evaluation batch (2 x its training batch)
    eval_batches: int = 25  # eval_speed's batches a pass over its synthetic split (--warmup of them untimed)
    profile_steps: int = 5  # traced training steps of the profile step, after PROFILE_WAIT (+1)
    bed_images: int = 1000  # training JPEGs of the input step's test bed (the loader goes round them in epochs)
    # The input step's own counts, smaller in the dry run (decoding costs a CPU the same there: the GPU's counts
    # would take minutes); both cross an epoch of the test bed.
    input_bench: tuple[str, ...] = ("--steps", "20", "--warmup", "5", "--repeats", "3", "--loader-steps", "20")
    input_batch: int = 128


GPU = Profile()
DRY = Profile(tiny=("model.depths=[1,1,1,1]", "model.dims=[8,16,16,16]"),
              tiny_t=("model.name=convnext_atto", "data.img_size=32"), amp="auto", jobs=2, timeout=600,
              no_compile="dry run: a compiled debug run took 100-160 s on 2 CPU cores (cold inductor cache)",
              # Inline: a background writer's process costs each run ~3 s of CPU (its `import torch`) on the 2 cores;
              # the checkpoint step still times the background write, and the test suite runs it throughout.
              saves=("checkpoint.background=false",),
              bed_images=32, input_bench=("--steps", "4", "--warmup", "1", "--repeats", "1", "--loader-steps", "4"),
              input_batch=8)
