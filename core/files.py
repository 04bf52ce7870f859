"""Every file the trainer writes goes through atomic_write; every checkpoint it reads through load_checkpoint.

atomic_write: a crash, a kill or a full disk leaves the previous file intact, never half of a new one.
load_checkpoint: weights-only unpickling, so a crafted file cannot run code.
"""
from __future__ import annotations

import os
import tempfile
from typing import IO, Callable

import torch

from core.errors import CheckpointError, UserError


class WriteError(UserError, OSError):
    """A file that could not be written (full disk, quota, lost mount); the previous file is untouched."""


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind `e`, if any: torch.save's zip writer re-raises a failed write as a RuntimeError."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = True) -> None:
    """Call `write(f)` on a temporary file beside `path`, fsync it, rename it over `path`, fsync the folder.

    Args:
        path: the file to create or replace; its folder is created when missing.
        write: writes the whole content to the open file it is given.
        binary: open the temporary file in binary ('wb') or text ('w') mode.
    """
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from its group, unlike open()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        cause = _os_error(e)
        if cause is not None:  # a full disk, a quota, a lost mount: the user's to fix, in one line
            raise WriteError(f"cannot write '{path}' ({cause.strerror or cause}); the previous file there is "
                             f"untouched. Free space in '{folder}' or set output_dir elsewhere") from None
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_checkpoint(state: dict, path: str) -> None:
    """torch.save `state` to `path` atomically."""
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except WriteError as e:
        raise CheckpointError(f"{e}, then start the run again to resume") from None


def load_checkpoint(path: str) -> dict:
    """A .pth file's contents through weights-only torch.load, on the CPU; one-line errors."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist; check the path (runs keep theirs under "
                              f"<output_dir>/checkpoints/)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...: all mean "not a usable checkpoint"
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'}); it is corrupt, truncated "
                              f"or not a weights-only checkpoint") from None
