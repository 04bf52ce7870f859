"""train.profile: a torch.profiler trace of a few training steps after warm-up, and where a step's time goes.

The loop marks its phases (phase("data"), "forward", "backward", "optimizer") with record_function ranges, which
cost nothing while no profiler runs. StepProfiler traces `steps` optimizer steps after `wait` untimed ones and
writes, under <output_dir>/profile/:
  rank<r>.<time>.pt.trace.json   the Chrome-format trace (Perfetto, chrome://tracing, TensorBoard's profiler plugin)
  summary.json                   rank 0's milliseconds per step and per phase (host; device time on CUDA), and the
                                 CUDA allocator's peak where there is CUDA
"""
from __future__ import annotations

import contextlib
import json
import os
from bisect import bisect_left, bisect_right
from itertools import accumulate
from typing import Callable, Iterable, Optional, Protocol

import torch
from torch.autograd import DeviceType, _profiler_enabled
from torch.autograd.profiler_util import Interval, Kernel
from torch.profiler import ProfilerActivity, profile, record_function, schedule, tensorboard_trace_handler

import distributed_utils as du
from core.config import TrainCfg
from core.files import atomic_write

PHASES = ("data", "forward", "backward", "optimizer")


def phase(name: str):
    """A named range in a running profiler's trace ("train/<name>"); nothing otherwise."""
    return record_function(f"train/{name}") if _profiler_enabled() else contextlib.nullcontext()


class StepProfiler:
    """Traces optimizer steps wait+2 .. wait+1+steps of a run (one untimed warm-up step inside the profiler).

    Args:
        steps: optimizer steps to trace.
        out_dir: where the trace and summary.json go.
        device: the run's device; on CUDA its kernels and memory are traced too.
        rank: names this rank's trace file; rank 0 writes summary.json.
        wait: steps before the profiler starts warming up (compilation, cuDNN's algorithm search, allocator growth).
    """

    def __init__(self, steps: int, out_dir: str, device: torch.device, rank: int = 0, wait: int = 5):
        self.steps, self.out_dir, self.device, self.rank = steps, out_dir, device, rank
        self.summary: Optional[dict] = None
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.prof = profile(activities=activities, schedule=schedule(wait=wait, warmup=1, active=steps, repeat=1),
                            on_trace_ready=self._ready, record_shapes=False, profile_memory=device.type == "cuda")
        self.prof.start()

    def step(self) -> None:
        """After each optimizer step."""
        self.prof.step()

    def close(self) -> Optional[dict]:
        """Stop (writing the trace of the steps so far if the run ended inside the traced ones); the summary."""
        self.prof.stop()
        return self.summary

    def _ready(self, prof: profile) -> None:
        tensorboard_trace_handler(self.out_dir, worker_name=f"rank{self.rank}")(prof)
        if self.rank == 0:
            self.summary = summarize(prof, self.device)
            atomic_write(os.path.join(self.out_dir, "summary.json"),
                         lambda f: f.write(json.dumps(self.summary, indent=1) + "\n"), binary=False)


def summarize(prof: profile, device: torch.device) -> dict:
    """Milliseconds per traced step: the whole step and each phase, on the host (and on the device for CUDA)."""
    summary = {**summarize_events(prof.events(), cuda=device.type == "cuda"), "device": str(device)}
    if device.type == "cuda":
        summary["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        summary["cuda_max_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    return summary


class ProfilerEvent(Protocol):
    """What summarize_events reads of a profiler event (torch.autograd.profiler_util.FunctionEvent)."""
    name: str
    device_type: DeviceType
    time_range: Interval  # microseconds
    kernels: list[Kernel]  # the device work (kernels, copies) this host op launched, with its microseconds


def summarize_events(events: Iterable[ProfilerEvent], cuda: bool) -> dict:
    """Milliseconds per traced step, of the whole step and of each phase: on the host, and with `cuda` on the device.

    Only the host's events count for host time: on CUDA the trace also holds the device side of each named range
    (gpu_user_annotation events of the same names, with no host time). A phase's device time is that of the work
    launched while its host range was open, on any thread: autograd runs backward's ops on a device thread of its
    own, outside the main thread's train/backward range and so outside its children.
    """
    host = [e for e in events if e.device_type == DeviceType.CPU]
    steps = [e.time_range for e in host if e.name.startswith("ProfilerStep")]
    n = len(steps) or 1
    per_step: Callable[[float], float] = lambda us: round(us / n / 1e3, 3)
    launches = Launches(host) if cuda else None
    phases = {}
    for name in PHASES:
        windows = [e.time_range for e in host if e.name == f"train/{name}"]
        phases[name] = {"host_ms": per_step(sum(w.end - w.start for w in windows))}
        if launches is not None:
            phases[name]["device_ms"] = per_step(launches.device_us(windows))
    return {"steps": n, "step_ms": per_step(sum(w.end - w.start for w in steps)), "phases": phases}


class Launches:
    """The device time of the work that host ops launched, by when each op started (its launch, near enough)."""

    def __init__(self, host: Iterable[ProfilerEvent]):
        launched = sorted((e.time_range.start, sum(k.duration for k in e.kernels)) for e in host if e.kernels)
        self.starts = [start for start, _ in launched]
        self.cumulative = [0.0, *accumulate(us for _, us in launched)]

    def device_us(self, windows: Iterable[Interval]) -> float:
        """Of the work launched inside the windows (which must not overlap)."""
        total = self.cumulative
        return sum(total[bisect_right(self.starts, w.end)] - total[bisect_left(self.starts, w.start)] for w in windows)


def describe(summary: dict) -> str:
    """One line: the step's milliseconds and each phase's."""
    cuda = summary["device"].startswith("cuda")  # the device's time of its kernels; waiting for data is the host's
    return (f"{summary['step_ms']:.1f} ms a step over {summary['steps']} steps: " + ", ".join(
        f"{name} {v['device_ms' if cuda and name != 'data' else 'host_ms']:.1f}"
        for name, v in summary["phases"].items()) + (" (the device's time but for data)" if cuda else ""))


def start_profiler(train: TrainCfg, output_dir: str, device: torch.device, rank: int) -> Optional[StepProfiler]:
    """train.profile=N: a trace of N steps after train.profile_wait (+1) into <output_dir>/profile; else None."""
    if not train.profile:
        return None
    out, first = os.path.join(output_dir, "profile"), train.profile_wait + 2
    du.print0(f"train.profile: tracing steps {first}-{first + train.profile - 1} into {out}")
    return StepProfiler(train.profile, out, device, rank, wait=train.profile_wait)


def stop_profiler(profiler: Optional[StepProfiler]) -> None:
    """Write the trace (also of a run that ended inside the traced steps) and say where a step's time went."""
    summary = profiler.close() if profiler is not None else None
    if summary:
        du.print0(f"profile: {describe(summary)}")
