"""Reading one image of a data set on disk: a one-line error naming it, or (data.skip_corrupt) a warning and a count.

Shared by the image folder and the tar shards, so both fail, skip and count alike.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from core.errors import UserError


class DataError(UserError):
    """A data set that cannot be found or read; the message names the path and the way out."""


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# What decoders raise on bytes that are not an image they can read.
UNREADABLE = (DataError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def check_labels(labels: np.ndarray, num_classes: int, name: Callable[[int], str], way_out: str,
                 unit: str = "samples") -> None:
    """DataError naming (by name(i)) the first of `labels` outside 0..num_classes-1, and how many such there are."""
    bad = np.nonzero((labels < 0) | (labels >= num_classes))[0]
    if len(bad):
        i = int(bad[0])
        raise DataError(f"'{name(i)}' has label {int(labels[i])}, outside 0..{num_classes - 1} ({len(bad)} such "
                        f"{unit}); {way_out}")


class CheckedReads:
    """Counts the images a data set skipped, in shared memory: one slot per loader worker, so no two processes
    write one slot; `skipped()` reads the total back in the main process."""

    SLOTS = 64  # loader workers beyond this share slots (and may undercount)

    def __init__(self, skip_corrupt: bool):
        self.skip_corrupt = skip_corrupt
        self._skips = torch.zeros(self.SLOTS + 1, dtype=torch.int64).share_memory_()

    def checked(self, read: Callable[[], Any], name: str | Callable[[], str]) -> Any | None:
        """read(), or None (skip_corrupt) when it fails on an unreadable image called `name` (or name())."""
        try:
            return read()
        except UNREADABLE as e:
            name = name if isinstance(name, str) else name()
            if not self.skip_corrupt:
                # A decoder handed bytes (a shard's member) calls them '<bytes>'; the reader knows their name.
                what = (str(e).replace("'<bytes>'", f"'{name}'") if isinstance(e, DataError)
                        else f"cannot read image '{name}' ({first_line(e)})")
                raise DataError(f"{what}; replace or delete it, or set data.skip_corrupt=true to skip unreadable "
                                f"images") from None
        worker = get_worker_info()
        self._skips[0 if worker is None else 1 + worker.id % self.SLOTS] += 1
        print(f"warning: skipped unreadable image '{name}' (data.skip_corrupt)", file=sys.stderr)
        return None

    def skipped(self) -> int:
        """Images skipped so far, by this process and its loader workers."""
        return int(self._skips.sum())
