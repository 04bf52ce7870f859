"""The checkpointer: when a checkpoint is written, and where a run resumes from.

A checkpoint is one .pth file (engine.checkpointing.files) that torch.load(weights_only=True), eval.py, models.export
and model.pretrained read; what it holds is the table of the run's stateful parts (engine.checkpointing.state: the
model in the official key layout, its EMA, AdamW's state, the gradient scaler, the run's position, every rank's
random generators, the config, the class names). Saving holds the ranks only while rank 0 copies the state to host memory; a writer
process of its own writes it (engine.checkpointing.writer).

    run = RunState()
    with Checkpointer(output_dir, cfg.checkpoint, run, model=..., ema=..., optimizer=..., scaler=...) as checkpoints:
        checkpoints.resume(args.resume)      # --resume, else the newest readable checkpoint of output_dir
        ...                                  # the training loop calls save() when due() and advances `run`
        checkpoints.save(score=top1)         # at the epoch's end; on leaving the block the last write is on disk
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import distributed_utils as du
from core.config import CheckpointCfg
from core.errors import CheckpointError, NonFiniteLoss
from core.files import load_checkpoint
from engine.checkpointing.files import load_latest, remove_unfinished_writes, resume_candidates
from engine.checkpointing.state import RunState, Weights, checkpoint_parts
from engine.checkpointing.writer import BackgroundWriter, InlineWriter, WriteJob
from engine.ema import Ema


def will_resume(resume_path: str, output_dir: str) -> bool:
    """Whether Checkpointer.resume will find a checkpoint (before the model is built, e.g. to skip its set-up)."""
    return bool(resume_path or resume_candidates(output_dir))


class Checkpointer:
    """Saves and restores a run's stateful parts; rank 0 writes, every rank takes part in a save (its RNG state).

    Args:
        output_dir: the run's folder; checkpoints go to <output_dir>/checkpoints.
        cfg: checkpoint.* (every_steps, keep_last, keep_best, background).
        run: the run's position; save() records it, resume() restores it.
        model: the bare model (no DDP or compile wrapper), whose state_dict has the official key layout.
        ema: its moving average, if the run keeps one.
        optimizer, scaler: AdamW and the gradient scaler (disabled unless train.amp=fp16).
        config: the run's config as a dict, stored with every checkpoint.
        class_names: the label of each of the model's outputs, stored with every checkpoint.
    """

    def __init__(self, output_dir: str, cfg: CheckpointCfg, run: RunState, *, model: nn.Module, ema: Optional[Ema],
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, config: dict,
                 class_names: Optional[list[str]] = None):
        self.output_dir, self.cfg, self.run = output_dir, cfg, run
        self.parts = checkpoint_parts(run, model=model, ema=ema, optimizer=optimizer, scaler=scaler, config=config,
                                      class_names=class_names)
        self.weights = [part.module for part in self.parts.values()
                        if isinstance(part, Weights) and part.module is not None]
        self.writer = None
        if du.is_main_process():
            removed = remove_unfinished_writes(output_dir)
            if removed:
                du.print0(f"removed {len(removed)} unfinished checkpoint file(s) of an interrupted write: "
                          f"{', '.join(removed)}")
            cuda = next(model.parameters()).is_cuda
            self.writer = BackgroundWriter(cuda, self._expected_bytes(model)) if cfg.background else InlineWriter()

    def _expected_bytes(self, model: nn.Module) -> int:
        """The state's size once AdamW has its two moments of each trained parameter (each tensor's alignment in
        the writer's memory and the small rest are what the 1% allows for)."""
        weights = sum(t.nbytes for module in self.weights for t in module.state_dict().values())
        moments = 2 * sum(p.nbytes for p in model.parameters() if p.requires_grad)
        return int(1.01 * (weights + moments)) + (1 << 20)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """Leave with the last write on disk, also when the run fails: the exit code then still means what the
        files say. A failed write is raised, unless another error is already on its way."""
        try:
            self.close()
        except CheckpointError as e:
            if error is None:
                raise
            du.print0(f"warning: {e}")

    def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()

    def due(self) -> bool:
        """Whether checkpoint.every_steps asks for a checkpoint after the step just done."""
        return bool(self.cfg.every_steps) and self.run.step % self.cfg.every_steps == 0

    def state_dict(self) -> dict:
        """The checkpoint, part by part. Collective: every rank contributes its random generators' state; the dict is
        complete on rank 0."""
        return {entry: value for part in self.parts.values() for entry, value in part.state_dict().items()}

    def save(self, score: Optional[float] = None) -> None:
        """Checkpoint the run as it stands (collective). With `score` (the epoch's top-1) it becomes best.pth when it
        beats the best so far. Returns once the state is copied; rank 0's writer does the rest."""
        self._check_finite()
        best = score is not None and score > self.run.best_top1
        if best:
            self.run.best_top1 = score
        state = self.state_dict()
        if self.writer is not None:
            self.writer.submit(state, WriteJob(self.output_dir, self.run.step, self.cfg.keep_last, best=best,
                                               score=score, keep_best=self.cfg.keep_best))

    def wait(self) -> None:
        """Block until the last checkpoint is on disk (rank 0; a no-op elsewhere); raise its failure."""
        if self.writer is not None:
            self.writer.wait()

    def _check_finite(self) -> None:
        """Refuse to checkpoint NaN/inf weights, so a bad step between loss checks cannot replace a good checkpoint.
        The weights are the same on every rank (DDP), so every rank reaches the same verdict without a collective."""
        tensors = [t for module in self.weights for t in module.state_dict().values() if t.is_floating_point()]
        if not torch.isfinite(nn.utils.get_total_norm(tensors)):
            raise NonFiniteLoss(f"the weights became non-finite before the checkpoint at epoch {self.run.epoch}, step "
                                f"{self.run.step}; nothing was written and the checkpoints on disk are untouched. "
                                f"Lower optim.lr, set train.clip_grad or train.amp=bf16")

    def resume(self, path: str = "") -> bool:
        """Continue from `path` (--resume), else from the newest readable checkpoint of output_dir; False when there
        is none (a fresh run). The loaded checkpoint (16 bytes a parameter of host memory on every rank) is
        released on return."""
        loaded = (path, load_checkpoint(path)) if path else load_latest(self.output_dir, du.print0)
        if not loaded:
            return False
        self.load_state_dict(loaded[1])
        run = self.run
        du.print0(f"resumed from {loaded[0]}: epoch {run.epoch} (+{run.epoch_samples} samples), {run.step} steps "
                  f"done, best top-1 {run.best_top1:.2f}")
        return True

    def load_state_dict(self, checkpoint: dict) -> None:
        """Put a checkpoint written by state_dict back, part by part, this rank's random generators included."""
        for part in self.parts.values():
            part.load_state_dict(checkpoint)
