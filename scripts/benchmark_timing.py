"""Timing scripts/benchmark.py's modes: a clock that times a pass's steps after its warm-up (with the sync guard of
--forbid-syncs around the timed ones), and every mode run in turn, repeat after repeat, with its peak memory."""
from __future__ import annotations

import argparse
import os
import resource
import time
import traceback
from typing import Callable, NamedTuple, Optional

import torch

import distributed_utils as du
from core.errors import UserError

SYNC_ERROR = "called a synchronizing CUDA operation"  # torch's message under set_sync_debug_mode("error")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StepClock:
    """Times steps warmup+1 .. warmup+steps of a pass; on a GPU it waits for the queued work at both ends.

    guarded(k) says whether step k of the pass runs under the sync guard (torch.cuda.set_sync_debug_mode("error");
    given on CUDA only): only timed steps can, and the clock's own waits stay outside it.
    """

    def __init__(self, device: torch.device, warmup: int, steps: int,
                 guarded: Optional[Callable[[int], bool]] = None):
        self.device, self.ends, self.guarded = device, (warmup, warmup + steps), guarded
        self.marks: list[float] = []
        self.done = 0  # optimizer steps of the pass so far
        self.guarding = False

    def __call__(self) -> None:  # after each optimizer step of the pass
        self.done += 1
        self.guard(False)
        if self.done in self.ends:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.marks.append(time.perf_counter())
        first, last = self.ends
        self.guard(self.guarded is not None and first <= self.done < last and self.guarded(self.done + 1))

    def guard(self, on: bool) -> None:
        """The sync guard on or off for what runs next (the step after this one)."""
        if on != self.guarding:
            set_sync_guard(on)
            self.guarding = on

    def seconds(self) -> float:
        return self.marks[1] - self.marks[0]


def set_sync_guard(on: bool) -> None:
    torch.cuda.set_sync_debug_mode("error" if on else "default")


class Mode(NamedTuple):
    """One timed loop: run(clock) does --warmup + `steps` units of `images` images (all ranks); guarded(k): step k
    may run under the sync guard (None: no step may)."""
    run: Callable[[StepClock], None]
    images: int
    steps: int
    guarded: Optional[Callable[[int], bool]] = None


def measure(runs: dict[str, Mode], args: argparse.Namespace, device: torch.device,
            yardstick: Optional[Callable[[], tuple[float, int]]] = None) -> tuple[dict, dict, list]:
    """Every mode once per repeat, in turn, then the yardstick if given; returns ({mode: [img/s per repeat]},
    {mode: peak memory MB}, [(yardstick TFLOP/s, matmul size) per repeat])."""
    rates: dict[str, list[float]] = {}
    memory: dict[str, float] = {}
    peaks: list[tuple[float, int]] = []
    for repeat in range(args.repeats):
        for name, mode in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            clock = StepClock(device, args.warmup, mode.steps, mode.guarded)
            timed(name, mode.run, clock)
            rates.setdefault(name, []).append(mode.steps * mode.images / clock.seconds())
            memory[name] = max(memory.get(name, 0.0), peak_memory_mb(device))
        if yardstick:
            peaks.append(yardstick())
        du.print0(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items())
                  + " img/s" + (f", {peaks[-1][1]}^3 matmul {peaks[-1][0]:.3f} TFLOP/s" if peaks else ""))
    return rates, memory, peaks


def timed(name: str, run: Callable[[StepClock], None], clock: StepClock) -> None:
    """run(clock); a sync the guard caught becomes one line naming the mode, the step and the line that synced."""
    try:
        run(clock)
    except RuntimeError as e:
        if not (clock.guarding and SYNC_ERROR in str(e)):
            raise
        raise UserError(f"--forbid-syncs: a host-device sync in {name}'s timed step {clock.done + 1}: "
                        f"{str(e).splitlines()[0]} at {sync_site(e)}") from e
    finally:
        clock.guard(False)  # the rest of the process is not a timed step


def sync_site(error: BaseException) -> str:
    """Where the guard caught a sync: the innermost line of this project's code, and the innermost line of all
    (inside torch, say) where that is another."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if f.filename.startswith(ROOT + os.sep) and "site-packages" not in f.filename]
    sites = ours[-1:] + [f for f in frames[-1:] if not ours or f is not ours[-1]]
    return ", in ".join(f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} `{f.line}`" for f in sites)


def peak_memory_mb(device: torch.device) -> float:
    """The CUDA allocator's peak since the last reset; on a CPU the process's peak resident set so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
