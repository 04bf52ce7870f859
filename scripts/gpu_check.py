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
The budget: STEPS holds each step's expected seconds on the GPU and in the dry run. A step starts only while the
budget's remaining time holds it, else it is skipped ("budget: N s left, step needs about M s"; a later, shorter
step may still run). Every command's timeout is clipped to the budget: one still running at its end is stopped, and
so is its step (a hang, or a step slower than STEPS says), so the check ends within the budget. The correctness steps
run a few at a time (the GPU has room); the timed steps then run alone (in the dry run with the others).
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
import concurrent.futures
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import re
import shlex
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

STARTED = time.monotonic()  # the budget counts from here: the imports below are part of the call


@dataclass
class Stop:
    """The signal that cut the check short ("" while none has): set by the handler, read by every command's wait."""
    by: str = ""
    signum: int = 0

    def on_signal(self, signum: int, frame) -> None:
        # A flag only: each wait stops its command within POLL_S, the steps not started are skipped, the JSON follows.
        if not self.by:
            self.by, self.signum = signal.Signals(signum).name, signum


STOP = Stop()
if __name__ == "__main__":  # before the imports below, which take seconds: a signal from here on ends with the JSON
    for _signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_signal, STOP.on_signal)

try:
    import torch
except ImportError:  # a Python without torch: preflight() refuses it in one line
    torch = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(ROOT, "configs", "debug.yaml")
CONVNEXT_T = os.path.join(ROOT, "configs", "convnext_t.yaml")
CONVNEXT_B = os.path.join(ROOT, "configs", "convnext_b.yaml")
AMPS = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}
RESUME_FROM = 2  # step_000000002.pth: mid epoch 0 (4 steps an epoch of 16 images)
PROFILE_WAIT = 5  # steps before the profile step's trace warms up
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
BUDGET = "budget: "  # how a step skipped for the budget's sake starts its reason
POLL_S = 0.2  # how often a command's wait looks at its timeout, the budget and the stop flag
STOP_GRACE_S = 3  # from SIGTERM to SIGKILL for a command being stopped
RESERVE_S = STOP_GRACE_S + 2  # the budget's end kept free of commands: stopping the last ones, writing the JSON
HEAVY = ("torch", "torchvision")  # built for the machine's CUDA: refused when missing or old, never installed here


# -- can this Python run the check? (before anything of the project is imported) --------------------------------

class Refused(Exception):
    """This Python cannot run the check; the message says why and what to do, in one line."""


def preflight(no_install: bool) -> list[str]:
    """Refused where this Python or its torch cannot run the check; the other dependencies it lacks installed
    (unless no_install); returns the pip specs installed."""
    python_floor, floors = declared()
    if sys.version_info < version_tuple(python_floor):
        raise Refused(f"Python {sys.version.split()[0]} at {sys.executable} is older than the project's "
                      f">={python_floor} (pyproject.toml); set PYTHON to a newer one")
    wrong = unmet(floors)
    heavy = {name: why for name, why in wrong.items() if name in HEAVY}
    if heavy:
        raise Refused(f"{sys.executable}: {described(heavy)}; the project needs "
                      f"{', '.join(f'{name}>={floors[name]}' for name in heavy)} (pyproject.toml): set PYTHON to a "
                      f"Python with a CUDA torch that new")
    if not wrong:
        return []
    specs = [pins().get(name.lower(), f"{name}>={floors[name]}") for name in wrong]
    if no_install:
        raise Refused(f"{sys.executable}: {described(wrong)}; install them: {shlex.join(pip_install(specs))}")
    install(specs, wrong)
    still = unmet(floors)
    if still:
        raise Refused(f"{sys.executable}: {described(still)} after {shlex.join(pip_install(specs))}")
    return specs


def declared() -> tuple[str, dict[str, str]]:
    """pyproject.toml's Python floor and {dependency: lowest version}: the project's one statement of them."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    python = re.search(r'^requires-python = ">=([\d.]+)"', text, re.M).group(1)
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", text, re.M | re.S).group(1)
    return python, dict(re.findall(r'^\s*"([\w.-]+)>=([\d.]+)', dependencies, re.M))


def pins() -> dict[str, str]:
    """requirements.txt's tested versions, {lower-case name: "name==version"}."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        found = (re.match(r"([\w.-]+)==\S+", line) for line in f)
        return {m.group(1).lower(): m.group(0) for m in found if m}


def version_tuple(version: str) -> tuple[int, ...]:
    """A version's release numbers: "2.5.0a0+nv24.10" -> (2, 5, 0)."""
    return tuple(int(part) for part in re.match(r"\d+(\.\d+)*", version).group().split("."))


def installed(name: str) -> Optional[str]:
    """The installed version of a distribution (read from its metadata, nothing imported), None where it is not."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def unmet(floors: dict[str, str]) -> dict[str, str]:
    """{dependency: "missing" or "<version> < <floor>"} for each one this Python lacks or has too old."""
    wrong = {}
    for name, floor in floors.items():
        have = installed(name)
        if have is None or version_tuple(have) < version_tuple(floor):
            wrong[name] = "missing" if have is None else f"{have} < {floor}"
    return wrong


def described(wrong: dict[str, str]) -> str:
    return ", ".join(f"{name} {why}" for name, why in wrong.items())  # "timm missing, tqdm 4.50.0 < 4.58"


def in_venv() -> bool:
    return sys.prefix != sys.base_prefix


def pip_install(specs: list[str]) -> list[str]:
    """The pip command that installs the specs for this Python: into its venv, else into the user's site."""
    return [sys.executable, "-m", "pip", "install", *([] if in_venv() else ["--user"]), *specs]


def install(specs: list[str], wrong: dict[str, str]) -> None:
    """pip-install the specs, importable in this process too; Refused where pip fails (no index reachable, say)."""
    print(f"gpu_check: {sys.executable}: {described(wrong)}; installing them: {shlex.join(pip_install(specs))}",
          file=sys.stderr, flush=True)
    command = pip_install(specs) + ["--quiet", "--disable-pip-version-check", "--retries", "1", "--timeout", "15"]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        error = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise Refused(f"{sys.executable}: {described(wrong)}; `{shlex.join(pip_install(specs))}` failed: {error}; "
                      f"install them, or set PYTHON to a Python that has them")
    if not in_venv():  # the user's site folder may be new: this process's path was set before it existed
        site.addsitedir(site.getusersitepackages())
    importlib.invalidate_caches()


# -- the check --------------------------------------------------------------------------------------------------

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
              bed_images=32, input_bench=("--steps", "4", "--warmup", "1", "--repeats", "1", "--loader-steps", "4"),
              input_batch=8)


class Failed(Exception):
    """A step's check did not hold; the message says what and where its log is."""


class Skipped(Exception):
    """A step that cannot run here; the message is the reason."""


class Stopped(Exception):
    """A step whose command was stopped midway, at the budget's end or by a signal: the check was cut short."""


class Check:
    """The steps, run within a budget of seconds counted from `started` (time.monotonic()), and their results."""

    def __init__(self, profile: Profile, out: str, dry: bool, budget_s: float = 420.0, stop: Optional[Stop] = None,
                 about: Optional[dict] = None, started: Optional[float] = None):
        self.p, self.out, self.dry, self.budget = profile, out, dry, budget_s
        self.stop = stop or Stop()
        self.about = about or {}  # the interpreter, torch, CUDA, the device: for the summary
        self.started = time.monotonic() if started is None else started
        self.device = "cpu" if dry else "cuda:0"
        path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH", "")]))  # the project, uninstalled
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path,
                    "TORCHINDUCTOR_CACHE_DIR": os.path.join(out, "inductor_cache")}  # cold compiles: the worst case
        if dry:  # the CPU even on a machine with a GPU; one thread a process, as the tests run (2 cores, shared)
            self.env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        self.extra_env: dict[str, str] = {}
        self.results: dict[str, dict] = {}
        self.lock = threading.Lock()

    # -- running commands ------------------------------------------------------------------------------------------

    def left(self) -> float:
        """Seconds left for commands: the budget less what has passed and RESERVE_S."""
        return self.started + self.budget - RESERVE_S - time.monotonic()

    def run(self, name: str, args: list[str], nproc: int = 1) -> str:
        """Run a repo command (under torchrun with nproc > 1) with its output in <out>/<name>.out/.err; its stdout,
        or Failed on a non-zero exit or past its timeout, Stopped at the budget's end or once a signal came."""
        launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                       if nproc > 1 else [])
        log = os.path.join(self.out, name)
        with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
            # A session of its own: stopping it reaches all it started (torchrun's ranks); and a Ctrl-C reaches
            # this process alone, whose handler leaves the stopping to each command's wait.
            proc = subprocess.Popen(launcher + args, cwd=ROOT, env={**self.env, **self.extra_env}, stdout=out,
                                    stderr=err, start_new_session=True)
            code = self.wait(proc, name, log)
        if code != 0:
            raise Failed(f"{name}: exit {code}: {tail(log + '.err')} (log {log}.err)")
        with open(log + ".out") as f:
            return f.read()

    def wait(self, proc: subprocess.Popen, name: str, log: str) -> int:
        """The command's exit code, or it is stopped: past its timeout, at the budget's end, or once a signal has cut
        the check short."""
        start = time.monotonic()
        try:
            while (code := proc.poll()) is None:
                ran = time.monotonic() - start
                if self.stop.by:
                    raise Stopped(f"{name}: stopped after {ran:.0f} s: the check was cut short by {self.stop.by}")
                if ran > self.p.timeout:
                    raise Failed(f"{name}: still running after {self.p.timeout} s, stopped; log {log}.err")
                if self.left() <= 0:
                    raise Stopped(f"{name}: still running at the end of the budget (--budget-s {self.budget:g}) after "
                                  f"{ran:.0f} s, stopped: a hang, or slower than its STEPS entry; log {log}.err")
                time.sleep(POLL_S)
            return code
        except BaseException:
            stop(proc)
            raise

    def train(self, name: str, *overrides: str, nproc: int = 1, resume: str = "") -> str:
        """train.py on debug.yaml into <out>/<name>; its stdout."""
        args = ["train.py", "--config", DEBUG] + (["--resume", resume] if resume else [])
        return self.run(name, args + [f"output_dir={self.dir(name)}", *self.p.tiny, *overrides], nproc=nproc)

    def benchmark(self, name: str, *options: str) -> dict:
        """scripts/benchmark.py on convnext_t.yaml with these options and overrides; its JSON record."""
        out = os.path.join(self.out, name + ".json")
        self.run(name, ["scripts/benchmark.py", "--config", CONVNEXT_T, "--json", out, *options])
        with open(out) as f:
            return json.load(f)

    def dir(self, name: str) -> str:
        return os.path.join(self.out, name)

    # -- the steps -------------------------------------------------------------------------------------------------

    def expected(self, name: str) -> int:
        """The step's expected seconds here (STEPS; 0 for a name it lacks)."""
        return STEPS.get(name, (0, 0))[1 if self.dry else 0]

    def step(self, name: str, fn: Callable[..., dict], *args) -> dict:
        """Run one step unless the check was cut short or the budget's rest cannot hold it; record and print its
        result (ok with its figures, skipped with the reason, failed with the error, stopped) and rewrite
        summary.json."""
        start, need = time.perf_counter(), self.expected(name)
        try:
            if self.stop.by:
                raise Skipped(f"not started: the check was cut short by {self.stop.by}")
            if need > self.left():
                raise Skipped(f"{BUDGET}{max(0.0, self.left()):.0f} s left, step needs about {need} s")
            result = {"status": "ok", **fn(*args)}
        except Skipped as e:
            result = {"status": "skipped", "reason": str(e)}
        except Stopped as e:
            result = {"status": "stopped", "reason": str(e)}
        except Failed as e:
            result = {"status": "failed", "error": str(e)}
        except Exception as e:  # a bug or an unreadable file: this step fails, the others still run
            result = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        result.update(seconds=round(time.perf_counter() - start, 1), expected_s=need)
        line = f"gpu_check: {name} {result['status']} in {result['seconds']} s" + "".join(
            f"; {result[k]}" for k in ("reason", "error") if k in result)
        with self.lock:  # whole lines and whole summaries from concurrent steps
            self.results[name] = result
            print(line, flush=True)
            self.write_summary("running")
        return result

    def train_amp(self, name: str, amp: str, compile_: bool) -> dict:
        from engine.precision import native_bf16  # here: this module loads without torch, for preflight to refuse

        if compile_ and self.p.no_compile:
            raise Skipped(self.p.no_compile)
        if self.dry and amp == "bf16" and not native_bf16(torch.device("cpu")):
            raise Skipped("dry run: this CPU has no native bf16 (emulated, many times slower than fp32); the dry run "
                          "trains in the precisions the CPU has")
        stdout = self.train(name, *self.p.train, f"train.amp={amp}", f"train.compile={str(compile_).lower()}")
        expect(stdout, f"world 1 on {self.device}", f"| amp {amp}")
        figures = check_run(self.dir(name))
        if amp == "fp16":  # the gradient scaler was on: an enabled GradScaler checkpoints its scale
            figures["grad_scale"] = last_checkpoint(self.dir(name))["scaler"].get("scale")
            if not figures["grad_scale"]:
                raise Failed(f"{name}: no gradient scaler state in last.pth")
        return figures

    def resume_bitwise(self) -> dict:
        exact = [f"data.synthetic_train_size={self.p.resume_size}", "schedule.epochs=2", "train.deterministic=true",
                 "checkpoint.every_steps=2", "checkpoint.keep_last=100"]  # keep the mid-epoch step files
        self.train("resume_reference", *exact)  # the trainer sets CUBLAS_WORKSPACE_CONFIG for deterministic runs
        mid = os.path.join(self.dir("resume_reference"), "checkpoints", f"step_{RESUME_FROM:09d}.pth")
        state = torch.load(mid, weights_only=True, map_location="cpu")
        if not (state["epoch"] == 0 and state["epoch_samples"] > 0):
            raise Failed(f"{mid} is not mid-epoch: epoch {state['epoch']}, +{state['epoch_samples']} samples")
        expect(self.train("resume_resumed", *exact, resume=mid), f"resumed from {mid}")
        ref, resumed = (last_checkpoint(self.dir(n)) for n in ("resume_reference", "resume_resumed"))
        tensors = [(k, part) for part in ("model", "model_ema") for k in ref[part]]
        differ = [f"{part}.{k}" for k, part in tensors if not torch.equal(ref[part][k], resumed[part][k])]
        if differ or ref["step"] != resumed["step"]:
            raise Failed(f"resumed run differs from the uninterrupted one: {len(differ)} tensors, e.g. {differ[:3]}; "
                         f"steps {ref['step']} vs {resumed['step']}")
        return {"tensors_equal": len(tensors), "resumed_from_step": RESUME_FROM, "steps": ref["step"]}

    def ddp(self, name: str, backend: str) -> dict:
        if backend == "nccl" and (self.dry or torch.cuda.device_count() < 2):
            raise Skipped("dry run: no CUDA" if self.dry else f"NCCL needs 2 GPUs (2 ranks on one GPU: NCCL refuses "
                                                              f"to share it); {torch.cuda.device_count()} visible")
        # Deterministic (fixed algorithms, though cuDNN's convolutions keep TF32): eval_exact compares log and eval.py.
        stdout = self.train(name, *self.p.train, f"dist.backend={backend}", "train.deterministic=true", nproc=2)
        device = self.device if backend == "gloo" else "cuda:"  # nccl: each rank on its own GPU
        expect(stdout, f"torchrun: world 2 on {device}", f"({backend} backend)")
        return check_run(self.dir(name))

    def eval_exact(self) -> dict:
        if self.results.get("ddp_gloo", {}).get("status") != "ok":
            raise Skipped("evaluates ddp_gloo's checkpoint, and ddp_gloo did not pass")
        logged = records(self.dir("ddp_gloo"), "eval")[-1]
        last = os.path.join(self.dir("ddp_gloo"), "checkpoints", "last.pth")
        args = ["eval.py", "--config", DEBUG, "--checkpoint", last, *self.p.tiny, "train.deterministic=true"]
        one = last_json(self.run("eval_exact_1", args))
        two = last_json(self.run("eval_exact_2", args + ["dist.backend=gloo"], nproc=2))  # 2 ranks share a GPU
        counts, top1 = [one["samples"], two["samples"], logged["samples"]], [one["top1"], two["top1"], logged["top1"]]
        # Every image counted once, exactly. The top-1 may differ by one image: other batch shapes per process
        # can pick other kernels, whose last-bit differences flip a near-tie of a barely trained model's logits.
        spread = round((max(top1) - min(top1)) * 101 / 100)
        if counts != [101] * 3 or spread > 1:
            raise Failed(f"samples {counts} and top-1 {top1} (eval.py on 1, on 2 processes, the training run's "
                         f"log) should be 101 each and within one image of each other")
        return {"samples": 101, "top1": one["top1"], "top1_spread_images": spread, "img_per_s_1": one["img_per_s"],
                "img_per_s_2": two["img_per_s"]}

    def speed(self, name: str, compile_: bool) -> dict:
        if compile_ and self.p.no_compile:
            raise Skipped(self.p.no_compile)
        r = self.benchmark(name, *self.p.bench, "--modes", "bare,trainer", "--forbid-syncs", *speed_overrides(self.p),
                           f"train.compile={str(compile_).lower()}")
        figures = {"device": r["device"], "model": model_name(self.p), "batch": r["global_batch"], "amp": r["amp"],
                   "steps": r["steps"], "warmup": r["warmup"], "repeats": r["repeats"], "sync_guard": r["sync_guard"],
                   "peak_tflops": r["peak_tflops"], "peak_source": r["peak_source"]}
        for mode in ("bare", "trainer"):
            figures.update({f"{mode}_img_per_s": r[f"{mode}_img_per_s"], f"{mode}_mfu": r.get("mfu", {}).get(mode),
                            f"{mode}_peak_mem_mb": r["peak_mem_mb"][mode]})
        return figures

    def profile(self) -> dict:
        """A short torch.profiler trace of ConvNeXt-T training (train.profile) and where a step's time goes."""
        steps = PROFILE_WAIT + 1 + self.p.profile_steps + 1  # the last step ends the epoch: evaluation, checkpoint
        overrides = [*speed_overrides(self.p), "schedule.epochs=1", "schedule.warmup_epochs=0", "train.log_every=1",
                     f"data.synthetic_train_size={steps * self.p.batch}", f"data.synthetic_val_size={self.p.batch}",
                     f"train.profile={self.p.profile_steps}", f"train.profile_wait={PROFILE_WAIT}",
                     f"output_dir={self.dir('profile')}"]
        expect(self.run("profile", ["train.py", "--config", CONVNEXT_T, *overrides]), "profile: ")
        folder = os.path.join(self.dir("profile"), "profile")
        traces = [f for f in os.listdir(folder) if f.endswith(".pt.trace.json")]
        with open(os.path.join(folder, "summary.json")) as f:
            summary = json.load(f)
        if not traces or summary["steps"] != self.p.profile_steps:
            raise Failed(f"{folder}: traces {traces}, {summary['steps']} steps traced of {self.p.profile_steps}")
        return {"model": model_name(self.p), "batch": self.p.batch, **summary, "trace": os.path.join(folder, traces[0])}

    def checkpoint(self) -> dict:
        """The ranks' time per save, inline and in the background, of ConvNeXt-B's state (a tiny model's in the dry
        run, where the ratio means nothing)."""
        r = last_json(self.run("checkpoint", ["scripts/checkpoint_benchmark.py", "--config", CONVNEXT_B,
                                              "--repeats", "3", "--dir", self.dir("checkpoint"), *self.p.tiny_t]))
        figures = {k: r[k] for k in ("model", "state_gb", "inline_blocked_s", "background_blocked_s",
                                     "background_write_s", "blocked_background_over_inline", "step_s",
                                     "step_during_write_s")}
        if not self.dry and r["blocked_background_over_inline"] > 0.25:
            raise Failed(f"a background save held the ranks {r['background_blocked_s']:.3f} s, more than a quarter "
                         f"of an inline save's {r['inline_blocked_s']:.3f} s: {figures}")
        return figures

    def input(self) -> dict:
        """The trainer's step fed by the real loader from JPEGs against the same step on one batch already on the
        device: a ratio near 1 says this node's cores keep its GPU busy on the imagenet recipe."""
        bed = self.dir("input_bed")
        self.run("input_bed", ["scripts/testbed.py", bed, "--train", str(self.p.bed_images), "--val", "10"])
        workers = max(1, len(os.sched_getaffinity(0)) - 1)  # one core for the training process itself
        r = self.benchmark("input", *self.p.input_bench, "--modes", "trainer,pipeline,loader", *speed_overrides(self.p),
                           "data.name=imagefolder", f"data.root={bed}", "data.recipe=imagenet",
                           f"data.num_workers={workers}", f"data.batch_size={self.p.input_batch}")
        return {"model": model_name(self.p), "batch": r["global_batch"], "workers": r["loader_workers"],
                "cores": r["loader_cores"], "decoder": r["jpeg_decoder"], "trainer_img_per_s": r["trainer_img_per_s"],
                "pipeline_img_per_s": r["pipeline_img_per_s"], "pipeline_over_trainer": r["pipeline_over_trainer"],
                "loader_img_per_s": r["loader_img_per_s"], "loader_img_per_s_per_core": r["loader_img_per_s_per_core"]}

    def eval_speed(self) -> dict:
        """eval.py's loop at steady state: scripts/benchmark.py --modes eval over one pass of eval_batches batches
        a repeat, the first --warmup of them untimed (the loader's workers start, cuDNN tunes the batch's shape)."""
        r = self.benchmark("eval_speed", *self.p.bench, "--modes", "eval", *speed_overrides(self.p),
                           f"data.eval_batch_size={self.p.eval_batch}",
                           f"data.synthetic_val_size={self.p.eval_batches * self.p.eval_batch}")
        return {"img_per_s": r["eval_img_per_s"], "model": model_name(self.p), "batch": r["eval_batch"],
                "timed_batches": r["eval_steps"], "warmup_batches": r["warmup"], "repeats": r["repeats"],
                "peak_mem_mb": r["peak_mem_mb"]["eval"], "workers": r["num_workers"],
                "includes": "data loading (the loader's workers make the synthetic images); not the workers' start "
                            "or cuDNN's tuning"}

    # -- the whole check -------------------------------------------------------------------------------------------

    def ddp_then_eval(self) -> None:
        """eval_exact evaluates ddp_gloo's run, so follows it."""
        self.step("ddp_gloo", self.ddp, "ddp_gloo", "gloo")
        self.step("eval_exact", self.eval_exact)

    def run_all(self) -> None:
        trains = [(f"train_{a}{'_compile' * c}", amp, c) for c in (True, False) for a, amp in AMPS.items()]
        jobs = [partial(self.step, name, self.train_amp, name, amp, c) for name, amp, c in trains]
        # Longest first (the compiled runs, then the runs of several commands), so the slowest does not start last.
        jobs[3:3] = [self.ddp_then_eval, partial(self.step, "resume_bitwise", self.resume_bitwise)]
        jobs.append(partial(self.step, "ddp_nccl", self.ddp, "ddp_nccl", "nccl"))
        timed = [partial(self.step, "speed", self.speed, "speed", False),  # in STEPS's order: what matters most first
                 partial(self.step, "speed_compile", self.speed, "speed_compile", True)]
        timed += [partial(self.step, name, getattr(self, name)) for name in ("profile", "checkpoint", "input",
                                                                             "eval_speed")]
        if self.dry:  # figures that mean nothing: no need to run alone
            self.concurrently(jobs + timed)
        else:
            self.concurrently(jobs)
            for job in timed:  # alone on the machine: clean figures
                job()

    def concurrently(self, jobs: list[Callable[[], object]]) -> None:
        """Run the jobs a few at a time, in order, each of their commands on one thread, off each other's cores."""
        self.extra_env = {"OMP_NUM_THREADS": "1"}
        with concurrent.futures.ThreadPoolExecutor(self.p.jobs) as pool:  # threads that wait on subprocesses
            for future in [pool.submit(job) for job in jobs]:
                future.result()
        self.extra_env = {}

    def summary(self, state: str) -> dict:
        """The JSON of the check so far: its state, the steps' results in STEPS's order (names outside it after)."""
        names = [n for n in ORDER if n in self.results] + [n for n in self.results if n not in STEPS]
        steps = {n: self.results[n] for n in names}
        return {"gpu_check": state, "failed": [n for n in names if steps[n]["status"] == "failed"],
                "stopped": [n for n in names if steps[n]["status"] == "stopped"],
                "ran": [n for n in names if steps[n]["status"] != "skipped"],
                "skipped_for_budget": [n for n in names if steps[n].get("reason", "").startswith(BUDGET)],
                "cut_short_by": self.stop.by or None, "dry_run": self.dry, "budget_s": self.budget, **self.about,
                "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "seconds": round(time.monotonic() - self.started, 1), "out": self.out, "steps": steps}

    def write_summary(self, state: str) -> dict:
        """<out>/summary.json, replaced whole (a reader never sees half of one); the summary written."""
        summary = self.summary(state)
        path = os.path.join(self.out, "summary.json")
        with open(path + ".tmp", "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(path + ".tmp", path)
        return summary

    def finish(self) -> dict:
        """The last summary, its state "ok" only where no step failed or was stopped."""
        statuses = {r["status"] for r in self.results.values()}
        return self.write_summary("failed" if "failed" in statuses else f"cut short by {self.stop.by}" if self.stop.by
                                  else "cut short by the budget" if "stopped" in statuses else "ok")


def speed_overrides(p: Profile) -> list[str]:
    """ConvNeXt-T's recipe at 224 px, bf16, channels_last, on synthetic images, one optimizer step per batch (in
    the dry run a tiny model at 32 px, in the CPU's precision)."""
    return ["data.name=synthetic", f"train.amp={p.amp}", "train.channels_last=true", "train.global_batch=0",
            "train.accum_steps=1", f"data.batch_size={p.batch}", *p.tiny, *p.tiny_t]


def model_name(p: Profile) -> str:
    return next((o.split("=", 1)[1] for o in p.tiny_t if o.startswith("model.name=")), "convnext_tiny")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's session (torchrun with its ranks, a trainer with its checkpoint writer), SIGKILL
    STOP_GRACE_S later."""
    signal_session(proc, signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        signal_session(proc, signal.SIGKILL)
        proc.wait()


def signal_session(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # its process group: the session start_new_session made
    except ProcessLookupError:  # all of it gone already
        pass


def tail(path: str, lines: int = 3) -> str:
    """The last lines of a log, progress-bar redraws left out."""
    with open(path, errors="replace") as f:
        kept = [line.strip() for line in f.read().replace("\r", "\n").splitlines()
                if line.strip() and not line.startswith("epoch ")]
    return " | ".join(kept[-lines:]) or "(no output)"


def expect(stdout: str, *texts: str) -> None:
    missing = [t for t in texts if t not in stdout]
    if missing:
        raise Failed(f"the output lacks {missing}: {stdout.strip().splitlines()[-3:]}")


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def records(run_dir: str, kind: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def last_checkpoint(run_dir: str) -> dict:
    return torch.load(os.path.join(run_dir, "checkpoints", "last.pth"), weights_only=True, map_location="cpu")


def check_run(run_dir: str) -> dict:
    """A finished training run: finite training and evaluation losses, last.pth and a step file; its figures."""
    train, evals = records(run_dir, "train"), records(run_dir, "eval")
    losses = [r["loss"] for r in train] + [r["loss"] for r in evals]
    if not train or not evals or not all(math.isfinite(x) for x in losses):
        raise Failed(f"{run_dir}: {len(train)} train and {len(evals)} eval records, losses {losses}")
    folder = os.path.join(run_dir, "checkpoints")
    files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if "last.pth" not in files or not any(f.startswith("step_") for f in files):
        raise Failed(f"{folder}: checkpoints missing, found {files}")
    return {"loss": train[-1]["loss"], "img_per_s": train[-1]["img_per_s"], "top1": evals[-1]["top1"],
            "steps": train[-1]["step"], "checkpoints": len(files)}


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
