"""Preemption: SIGTERM / SIGUSR1 ask the run to stop; all ranks agree on the step, checkpoint, and exit.

SLURM signals every task (`#SBATCH --signal=B:USR1@120` or its SIGTERM before a kill), torchrun forwards SIGTERM
to its workers; a rank that stopped on its own would leave the others waiting in a collective, so the flag is
all-reduced and every rank sees the same answer at the same step.
"""
from __future__ import annotations

import signal

import torch

import distributed_utils as du

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# sysexits' EX_TEMPFAIL: stopped early with a checkpoint, run it again. train.sbatch requeues the job on it.
EXIT_PREEMPTED = 75
CHECK_EVERY = 5  # steps between agreements: a collective and a host sync, so not every step on a GPU


class StopRequest:
    def __init__(self) -> None:
        self.received: int | None = None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received = signum

    def agreed(self, step: int, device: torch.device) -> bool:
        """True on every rank, at the same step, once any rank has received a stop signal."""
        if step % CHECK_EVERY:
            return False
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=device)
        return du.all_reduce_sum(flag).item() > 0


class Preempted(Exception):
    """Raised after the stop checkpoint is written, to unwind the training loop."""
