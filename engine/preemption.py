"""Preemption: SIGTERM / SIGUSR1 ask the run to stop; all ranks agree on the step, checkpoint, and exit.

SLURM signals every task (`#SBATCH --signal=B:USR1@120` or its SIGTERM before a kill), torchrun forwards SIGTERM
to its workers; a rank that stopped on its own would leave the others waiting in a collective, so the flag is
all-reduced and every rank sees the same answer at the same step.
"""
from __future__ import annotations

import signal

import distributed_utils as du

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# sysexits' EX_TEMPFAIL: stopped early with a checkpoint, run it again. train.sbatch requeues the job on it.
EXIT_PREEMPTED = 75
CHECK_EVERY = 5  # steps between agreements (a host-side collective: cheap, but a network round trip)


class StopRequest:
    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.received: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received = signum

    def agreed(self, step: int) -> bool:
        """True on every rank, at the same step, once any rank has received a stop signal."""
        if step % CHECK_EVERY:
            return False
        return du.any_rank(self.received is not None)

