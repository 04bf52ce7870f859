"""Checkpoint files: step files with last/best links, retention, the leftovers of a killed write, and reading back
the newest readable one.

A checkpoint is a plain dict of tensors and builtins (engine.checkpointing.state says which), written atomically and
read weights-only (core.files), so a crafted file cannot run code.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Callable

from core.errors import CheckpointError
from core.files import load_checkpoint, save_checkpoint


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def last_checkpoint(output_dir: str) -> dict:
    """The content of a run's last.pth (its newest checkpoint)."""
    return load_checkpoint(os.path.join(checkpoint_dir(output_dir), "last.pth"))


def step_file(output_dir: str, step: int) -> str:
    """The checkpoint of optimizer step `step`."""
    return os.path.join(checkpoint_dir(output_dir), f"step_{step:09d}.pth")


def _link_atomically(src: str, dst: str) -> None:
    """Point `dst` at the file `src` without copying it; readers see the old or the new file, never half of one."""
    tmp = f"{dst}.{os.getpid()}.link"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.link(src, tmp)
    os.replace(tmp, dst)


def _step_files(folder: str) -> list[str]:
    """step_*.pth files, newest first (the zero-padded step sorts as a string)."""
    return sorted(glob.glob(os.path.join(folder, "step_*.pth")), reverse=True)


def best_files(folder: str) -> list[tuple[float, str]]:
    """(top-1, path) of the best_top1_<score>_step_<step>.pth files, best first (the earlier step on a tie)."""
    found = []
    for path in glob.glob(os.path.join(folder, "best_top1_*_step_*.pth")):
        match = BEST_NAME.fullmatch(os.path.basename(path))
        if match:
            found.append((float(match[1]), int(match[2]), path))
    return [(score, path) for score, _, path in sorted(found, key=lambda f: (-f[0], f[1]))]


BEST_NAME = re.compile(r"best_top1_(\d+\.\d+)_step_(\d+)\.pth")


def save_training_checkpoint(state: dict, output_dir: str, step: int, keep_last: int, best: bool = False,
                             score: float | None = None, keep_best: int = 0) -> str:
    """Write step_<step>.pth, then repoint last.pth (and best.pth) at it, then drop all but the newest
    `keep_last` step files. The earlier checkpoints are only deleted once the new one is durable.

    With `keep_best` K and the evaluation's `score` (top-1), the file is also linked as
    best_top1_<score>_step_<step>.pth, and of those only the K best are kept.
    """
    folder = checkpoint_dir(output_dir)
    path = step_file(output_dir, step)
    save_checkpoint(state, path)
    _link_atomically(path, os.path.join(folder, "last.pth"))
    if best:
        _link_atomically(path, os.path.join(folder, "best.pth"))
    if keep_best and score is not None:
        _link_atomically(path, os.path.join(folder, f"best_top1_{score:.4f}_step_{step:09d}.pth"))
        for _, old in best_files(folder)[keep_best:]:
            os.remove(old)
    for old in _step_files(folder)[keep_last:]:
        os.remove(old)  # last.pth and the best links keep their own link to a removed step's data
    return path


def remove_unfinished_writes(output_dir: str) -> list[str]:
    """Delete what a write killed midway left in the checkpoint folder (core.files.atomic_write's hidden temporary
    files, _link_atomically's links), which can be as large as a checkpoint; returns their names. Only for the
    one process that writes there, before it writes."""
    folder = checkpoint_dir(output_dir)
    leftovers = glob.glob(os.path.join(folder, ".*.pth.*.tmp")) + glob.glob(os.path.join(folder, "*.pth.*.link"))
    for path in leftovers:
        os.remove(path)
    return sorted(os.path.basename(path) for path in leftovers)


def resume_candidates(output_dir: str) -> list[str]:
    """Where an interrupted run may continue from, newest first: the step files, then last.pth where it is
    another file (a kill between writing a step file and repointing last.pth leaves last.pth one behind)."""
    folder = checkpoint_dir(output_dir)
    candidates = _step_files(folder)
    last = os.path.join(folder, "last.pth")
    if os.path.isfile(last) and not any(os.path.samefile(last, path) for path in candidates):
        candidates.append(last)
    return candidates


def load_latest(output_dir: str, warn: Callable[[str], None]) -> tuple[str, dict] | None:
    """The newest readable checkpoint of a run, skipping (and reporting) corrupt or truncated ones."""
    candidates = resume_candidates(output_dir)
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            warn(f"warning: {e}; falling back to an older checkpoint")
    if candidates:
        raise CheckpointError(f"none of the checkpoints in {checkpoint_dir(output_dir)} can be read; move the folder "
                              f"away to start afresh, or pass --resume PATH")
    return None
