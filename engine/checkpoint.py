"""Checkpoints: atomic writes, safe loads, and where to resume from.

A checkpoint is a plain dict of tensors and builtins, so it loads with torch.load(weights_only=True):
a crafted file cannot run code. Model weights are stored in the official ConvNeXt key layout.
"""
from __future__ import annotations

import os
import tempfile

import torch

from engine.errors import CheckpointError


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def save_checkpoint(state: dict, path: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    The rename is atomic, so a crash or a full disk leaves the previous file at `path` intact.
    """
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist; check the path (runs keep theirs under "
                              f"<output_dir>/checkpoints/)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...: all mean "not a usable checkpoint"
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'}); it is corrupt, truncated "
                              f"or not a weights-only checkpoint") from None


def find_resume(output_dir: str) -> str | None:
    """The checkpoint an interrupted run continues from, if any."""
    path = os.path.join(checkpoint_dir(output_dir), "last.pth")
    return path if os.path.isfile(path) else None
