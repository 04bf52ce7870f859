"""The steps of scripts/gpu_check.py: training in each precision, bitwise resume, DDP, exact evaluation, then the
timed ones (speed, profile, checkpoint, input, evaluation speed); each returns its figures or raises Failed or
Skipped. Imported once preflight has vouched for torch and the project's other dependencies."""
from __future__ import annotations

import json
import math
import os
from functools import partial

import torch

from engine.logging import read_metrics
from engine.precision import native_bf16
from gpu_check_plan import ROOT, Profile  # scripts/, beside this file
from gpu_check_runner import Failed, Runner, Skipped

DEBUG = os.path.join(ROOT, "configs", "debug.yaml")
CONVNEXT_T = os.path.join(ROOT, "configs", "convnext_t.yaml")
CONVNEXT_B = os.path.join(ROOT, "configs", "convnext_b.yaml")
AMPS = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}
RESUME_FROM = 2  # step_000000002.pth: mid epoch 0 (4 steps an epoch of 16 images)
PROFILE_WAIT = 5  # steps before the profile step's trace warms up


class Check(Runner):
    """The GPU check's steps, run by run_all within the Runner's budget."""

    # -- the commands they run -----------------------------------------------------------------------------------------

    def train(self, name: str, *overrides: str, nproc: int = 1, resume: str = "") -> str:
        """train.py on debug.yaml into <out>/<name>; its stdout."""
        args = ["train.py", "--config", DEBUG] + (["--resume", resume] if resume else [])
        return self.run(name, args + [f"output_dir={self.dir(name)}", *self.p.tiny, *self.p.saves, *overrides],
                        nproc=nproc)

    def benchmark(self, name: str, *options: str) -> dict:
        """scripts/benchmark.py on convnext_t.yaml with these options and overrides; its JSON record."""
        out = os.path.join(self.out, name + ".json")
        self.run(name, ["scripts/benchmark.py", "--config", CONVNEXT_T, "--json", out, *options])
        with open(out) as f:
            return json.load(f)

    # -- the steps -----------------------------------------------------------------------------------------------------

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
            from engine.checkpointing import last_checkpoint  # here, not above: it imports timm, seconds of the budget
            figures["grad_scale"] = last_checkpoint(self.dir(name))["scaler"].get("scale")
            if not figures["grad_scale"]:
                raise Failed(f"{name}: no gradient scaler state in last.pth")
        return figures

    def resume_bitwise(self) -> dict:
        from engine.checkpointing import last_checkpoint  # here, not above: it imports timm, seconds of the budget

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
        logged = read_metrics(self.dir("ddp_gloo"), "eval")[-1]
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
                     f"output_dir={self.dir('profile')}", *self.p.saves]
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


def speed_overrides(p: Profile) -> list[str]:
    """ConvNeXt-T's recipe at 224 px, bf16, channels_last, on synthetic images, one optimizer step per batch (in
    the dry run a tiny model at 32 px, in the CPU's precision)."""
    return ["data.name=synthetic", f"train.amp={p.amp}", "train.channels_last=true", "train.global_batch=0",
            "train.accum_steps=1", f"data.batch_size={p.batch}", *p.tiny, *p.tiny_t]


def model_name(p: Profile) -> str:
    return next((o.split("=", 1)[1] for o in p.tiny_t if o.startswith("model.name=")), "convnext_tiny")


def expect(stdout: str, *texts: str) -> None:
    missing = [t for t in texts if t not in stdout]
    if missing:
        raise Failed(f"the output lacks {missing}: {stdout.strip().splitlines()[-3:]}")


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def check_run(run_dir: str) -> dict:
    """A finished training run: finite training and evaluation losses, last.pth and a step file; its figures."""
    train, evals = read_metrics(run_dir, "train"), read_metrics(run_dir, "eval")
    losses = [r["loss"] for r in train] + [r["loss"] for r in evals]
    if not train or not evals or not all(math.isfinite(x) for x in losses):
        raise Failed(f"{run_dir}: {len(train)} train and {len(evals)} eval records, losses {losses}")
    folder = os.path.join(run_dir, "checkpoints")
    files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if "last.pth" not in files or not any(f.startswith("step_") for f in files):
        raise Failed(f"{folder}: checkpoints missing, found {files}")
    return {"loss": train[-1]["loss"], "img_per_s": train[-1]["img_per_s"], "top1": evals[-1]["top1"],
            "steps": train[-1]["step"], "checkpoints": len(files)}


