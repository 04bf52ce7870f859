"""A one-call check of the trainer on a machine with a CUDA GPU: does it train, resume, run DDP and evaluate
correctly there, and how fast is ConvNeXt-T? About 5 minutes on an H100/H200 (at most 8).

    bash scripts/gpu_check.sh [--out DIR]            # or: make gpu-check
    bash scripts/gpu_check.sh --dry-run              # (or GPU_CHECK_DRY_RUN=1) the same steps on the CPU

Each step is reported ok, failed (with the error and its log) or skipped (with the reason):
  train_<fp32|bf16|fp16>[_compile]  configs/debug.yaml for one epoch in each precision (fp16 with the gradient
                  scaler), eager and under torch.compile: exit 0, on the GPU, finite losses, checkpoints written;
  resume_bitwise  train.deterministic=true: resumed (--resume) from a mid-epoch step checkpoint of an uninterrupted
                  run, the run ends with last.pth weights and EMA torch.equal to that run's;
  ddp_gloo        2 ranks under torchrun on the one GPU, dist.backend=gloo, train.deterministic=true;
  ddp_nccl        the same with NCCL, where at least 2 GPUs are visible;
  eval_exact      eval.py on 1 and 2 processes over ddp_gloo's checkpoint and 101 validation images: 101 samples
                  both times, top-1 within one image of each other and of the top-1 the training run logged;
  speed[_compile] scripts/benchmark.py on ConvNeXt-T, 224 px, bf16, channels_last: img/s, MFU against the
                  data sheet, peak memory (bare step and the trainer's step);
  eval_speed      eval.py on ConvNeXt-T (random weights) over synthetic images: img/s, data loading included;
  profile         train.py on ConvNeXt-T with train.profile: a torch.profiler trace of 5 steps after warm-up and
                  the milliseconds of a step and of its data wait, forward, backward and optimizer (device time);
  checkpoint      scripts/checkpoint_benchmark.py on ConvNeXt-B's state: how long a save holds the ranks, written
                  inline against in the background (at most a quarter of it: the device-to-host copy alone);
  input           can this node's CPUs feed its GPU? ConvNeXt-T's training step on the generated JPEG test bed
                  (python -m data.testbed) with the real loader, a worker per core but one, against the same step
                  on a batch held on the device (scripts/benchmark.py, pipeline/trainer), and the loader's
                  images/s per core.
The dry run uses the same counts (steps, batch sizes, warm-up, evaluation sizes) with a tiny model at 32 px, in the
precision the CPU has, so a count that cannot work on the GPU fails there first.
The correctness steps run a few at a time (the GPU has room); the speed steps run alone afterwards (in the dry run
with the others). Every run writes
under --out (default: a new temporary folder), one <step>.out/.err log per command. The last stdout line is the
JSON summary; the exit code is 1 when a step failed. Without CUDA (and without --dry-run) it prints one line and
exits 0.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial

import torch

from engine.precision import native_bf16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(ROOT, "configs", "debug.yaml")
CONVNEXT_T = os.path.join(ROOT, "configs", "convnext_t.yaml")
AMPS = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}
RESUME_FROM = 2  # step_000000002.pth: mid epoch 0 (4 steps an epoch of 16 images)
ORDER = [f"train_{a}{c}" for a in AMPS for c in ("", "_compile")] + [
    "resume_bitwise", "ddp_gloo", "ddp_nccl", "eval_exact", "speed", "speed_compile", "eval_speed", "profile",
    "checkpoint", "input"]
CONVNEXT_B = os.path.join(ROOT, "configs", "convnext_b.yaml")


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
    eval_size: int = 5000  # synthetic validation images of eval_speed
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
PROFILE_WAIT = 5  # steps before the profile step's trace warms up


class Failed(Exception):
    """A step's check did not hold; the message says what and where its log is."""


class Skipped(Exception):
    """A step that cannot run here; the message is the reason."""


class Check:
    def __init__(self, profile: Profile, out: str, dry: bool):
        self.p, self.out, self.dry = profile, out, dry
        self.device = "cpu" if dry else "cuda:0"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "TORCHINDUCTOR_CACHE_DIR": os.path.join(out, "inductor_cache")}  # cold compiles: the worst case
        if dry:  # the CPU even on a machine with a GPU; one thread a process, as the tests run (2 cores, shared)
            self.env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        self.extra_env: dict[str, str] = {}
        self.results: dict[str, dict] = {}
        self.lock = threading.Lock()

    # -- running commands ------------------------------------------------------------------------------------------

    def run(self, name: str, args: list[str], nproc: int = 1) -> str:
        """Run a repo command (under torchrun with nproc > 1) with its output in <out>/<name>.out/.err; its stdout,
        or Failed on a non-zero exit or past the timeout."""
        launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                       if nproc > 1 else [])
        log = os.path.join(self.out, name)
        with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
            proc = subprocess.Popen(launcher + args, cwd=ROOT, env={**self.env, **self.extra_env},
                                    stdout=out, stderr=err)
            try:
                code = proc.wait(timeout=self.p.timeout)
            except subprocess.TimeoutExpired:
                stop(proc)
                raise Failed(f"{name}: still running after {self.p.timeout} s, stopped; log {log}.err")
        if code != 0:
            raise Failed(f"{name}: exit {code}: {tail(log + '.err')} (log {log}.err)")
        with open(log + ".out") as f:
            return f.read()

    def train(self, name: str, *overrides: str, nproc: int = 1, resume: str = "") -> str:
        """train.py on debug.yaml into <out>/<name>; its stdout."""
        args = ["train.py", "--config", DEBUG] + (["--resume", resume] if resume else [])
        return self.run(name, args + [f"output_dir={self.dir(name)}", *self.p.tiny, *overrides], nproc=nproc)

    def dir(self, name: str) -> str:
        return os.path.join(self.out, name)

    # -- the steps -------------------------------------------------------------------------------------------------

    def step(self, name: str, fn, *args) -> dict:
        """Run one step, record and print its result: ok with its figures, skipped with the reason, failed with
        the error."""
        start = time.perf_counter()
        try:
            result = {"status": "ok", **fn(*args)}
        except Skipped as e:
            result = {"status": "skipped", "reason": str(e)}
        except Failed as e:
            result = {"status": "failed", "error": str(e)}
        except Exception as e:  # a bug or an unreadable file: this step fails, the others still run
            result = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        result["seconds"] = round(time.perf_counter() - start, 1)
        self.results[name] = result
        line = f"gpu_check: {name} {result['status']} in {result['seconds']} s" + "".join(
            f"; {result[k]}" for k in ("reason", "error") if k in result)
        with self.lock:  # whole lines from concurrent steps
            print(line, flush=True)
        return result

    def train_amp(self, name: str, amp: str, compile_: bool) -> dict:
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
        out = os.path.join(self.out, name + ".json")
        args = ["scripts/benchmark.py", "--config", CONVNEXT_T, *self.p.bench, "--modes", "bare,trainer",
                "--json", out, *speed_overrides(self.p), f"train.compile={str(compile_).lower()}"]
        self.run(name, args)
        with open(out) as f:
            r = json.load(f)
        figures = {"device": r["device"], "model": model_name(self.p), "batch": r["global_batch"], "amp": r["amp"],
                   "steps": r["steps"], "warmup": r["warmup"], "repeats": r["repeats"],
                   "peak_tflops": r["peak_tflops"], "peak_source": r["peak_source"]}
        for mode in ("bare", "trainer"):
            figures.update({f"{mode}_img_per_s": r[f"{mode}_img_per_s"], f"{mode}_mfu": r.get("mfu", {}).get(mode),
                            f"{mode}_peak_mem_mb": r["peak_mem_mb"][mode]})
        return figures

    def eval_speed(self) -> dict:
        overrides = [*speed_overrides(self.p), f"data.synthetic_val_size={self.p.eval_size}"]
        weights = os.path.join(self.out, "eval_speed_weights.pth")
        write_random_weights(weights, overrides)
        result = last_json(self.run("eval_speed", ["eval.py", "--config", CONVNEXT_T, "--checkpoint", weights,
                                                   *overrides]))
        if result["samples"] != self.p.eval_size:
            raise Failed(f"eval.py counted {result['samples']} images of {self.p.eval_size}")
        return {"img_per_s": result["img_per_s"], "samples": result["samples"], "model": model_name(self.p),
                "includes": "data loading (synthetic images made on the fly)"}

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
        self.run("input_bed", ["-m", "data.testbed", bed, "--train", str(self.p.bed_images), "--val", "10"])
        workers = max(1, len(os.sched_getaffinity(0)) - 1)  # one core for the training process itself
        out = os.path.join(self.out, "input.json")
        overrides = [*speed_overrides(self.p), "data.name=imagefolder", f"data.root={bed}", "data.recipe=imagenet",
                     f"data.num_workers={workers}", f"data.batch_size={self.p.input_batch}"]
        self.run("input", ["scripts/benchmark.py", "--config", CONVNEXT_T, *self.p.input_bench, "--modes",
                           "trainer,pipeline,loader", "--json", out, *overrides])
        with open(out) as f:
            r = json.load(f)
        return {"model": model_name(self.p), "batch": r["global_batch"], "workers": r["loader_workers"],
                "cores": r["loader_cores"], "trainer_img_per_s": r["trainer_img_per_s"],
                "pipeline_img_per_s": r["pipeline_img_per_s"], "pipeline_over_trainer": r["pipeline_over_trainer"],
                "loader_img_per_s": r["loader_img_per_s"], "loader_img_per_s_per_core": r["loader_img_per_s_per_core"]}

    # -- the whole check -------------------------------------------------------------------------------------------

    def ddp_then_eval(self) -> None:
        """eval_exact evaluates ddp_gloo's run, so follows it."""
        self.step("ddp_gloo", self.ddp, "ddp_gloo", "gloo")
        self.step("eval_exact", self.eval_exact)

    def run_all(self) -> dict[str, dict]:
        trains = [(f"train_{a}{'_compile' * c}", amp, c) for c in (True, False) for a, amp in AMPS.items()]
        jobs = [partial(self.step, name, self.train_amp, name, amp, c) for name, amp, c in trains]
        # Longest first (the compiled runs, then the runs of several commands), so the slowest does not start last.
        jobs[3:3] = [self.ddp_then_eval, partial(self.step, "resume_bitwise", self.resume_bitwise)]
        jobs.append(partial(self.step, "ddp_nccl", self.ddp, "ddp_nccl", "nccl"))
        timed = [partial(self.step, name, self.speed, name, compile_)
                 for name, compile_ in (("speed", False), ("speed_compile", True))]
        timed += [partial(self.step, name, getattr(self, name))
                  for name in ("eval_speed", "profile", "checkpoint", "input")]
        if self.dry:  # figures that mean nothing: no need to run alone
            self.concurrently(jobs + timed)
        else:
            self.concurrently(jobs)
            for job in timed:  # alone on the machine: clean figures
                job()
        return {name: self.results[name] for name in ORDER}

    def concurrently(self, jobs: list) -> None:
        """Run the jobs a few at a time, each of their commands on one thread, off each other's cores."""
        self.extra_env = {"OMP_NUM_THREADS": "1"}
        with concurrent.futures.ThreadPoolExecutor(self.p.jobs) as pool:  # threads that wait on subprocesses
            futures = [pool.submit(job) for job in jobs]
            try:
                for future in futures:
                    future.result()
            except KeyboardInterrupt:  # Ctrl-C reached the running commands too: start no more
                pool.shutdown(cancel_futures=True)
                raise
        self.extra_env = {}


def speed_overrides(p: Profile) -> list[str]:
    """ConvNeXt-T's recipe at 224 px, bf16, channels_last, on synthetic images, one optimizer step per batch (in
    the dry run a tiny model at 32 px, in the CPU's precision)."""
    return ["data.name=synthetic", f"train.amp={p.amp}", "train.channels_last=true", "train.global_batch=0",
            "train.accum_steps=1", f"data.batch_size={p.batch}", *p.tiny, *p.tiny_t]


def model_name(p: Profile) -> str:
    return next((o.split("=", 1)[1] for o in p.tiny_t if o.startswith("model.name=")), "convnext_tiny")


def write_random_weights(path: str, overrides: list[str]) -> None:
    """A freshly initialised model of convnext_t.yaml with these overrides, as an official-layout weights file:
    eval.py's speed does not depend on what the weights are."""
    from core.config import load_config
    from models import create_model

    cfg = load_config(CONVNEXT_T, overrides)
    model = create_model(**cfg.model.create_args(), num_classes=10, log=lambda line: None)  # synthetic: 10 classes
    torch.save({"model": model.state_dict()}, path)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (torchrun passes it on to its workers and kills them 30 s later), then SIGKILL."""
    proc.terminate()
    try:
        proc.wait(45)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    dry = args.dry_run or os.environ.get("GPU_CHECK_DRY_RUN", "") not in ("", "0")
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to check")
        return 0
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="gpu_check_"))
    os.makedirs(out, exist_ok=True)
    print(f"gpu_check: {'dry run on the CPU' if dry else 'on the GPU'}; every run's output in {out}", flush=True)
    start = time.perf_counter()
    try:
        steps = Check(DRY if dry else GPU, out, dry).run_all()
    except KeyboardInterrupt:
        print(f"gpu_check: interrupted; the runs so far are in {out}", file=sys.stderr)
        return 130
    failed = [name for name, r in steps.items() if r["status"] == "failed"]
    summary = {"gpu_check": "failed" if failed else "ok", "failed": failed, "dry_run": dry,
               "device": "cpu" if dry else torch.cuda.get_device_name(0),
               "gpus": 0 if dry else torch.cuda.device_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "seconds": round(time.perf_counter() - start, 1), "out": out, "steps": steps}
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
