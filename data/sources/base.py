"""What every image source is, and what is done once above all of them: decoding, the checks, skip counting.

A source is one split of labelled images read by index. It gives its labels (one int64 array), `read(i)` (a file's
path, its encoded bytes, or an already decoded uint8 (C, H, W) tensor) and `name(i)` (for messages), and a copy of
itself holding some of its samples (`_select`). The base turns that into a map-style data set of (image, label):
`decode` (the recipe's decoder, set with `with_decoder`) runs on what `read` returns, an unreadable image stops the
run with one line naming it or (skip_corrupt) is skipped and counted, and `subset` narrows a split without changing
it. Per-sample data lives in flat numpy arrays (PackedStrings for names): a forked loader worker reads them without
touching a Python object per sample, so it shares their pages with its parent instead of copying them through
reference counts (the long-standing pytorch/pytorch#13246).
"""
from __future__ import annotations

import copy
import sys
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from core.errors import DataError


class DataChanged(DataError):
    """The data changed since it was indexed: not one bad image but a stale index, so never skipped."""


class UnreadableImage(DataError):
    """One image that cannot be read; `what` says which and why, without the way out that the message adds (a
    prediction reports it in the image's row instead of stopping)."""

    def __init__(self, what: str, way_out: str = ""):
        super().__init__(f"{what}; {way_out}" if way_out else what)
        self.what = what


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# What readers and decoders raise on bytes that are not an image they can read.
UNREADABLE = (DataError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def check_labels(labels: np.ndarray, num_classes: int, name: Callable[[int], str], way_out: str,
                 unit: str = "samples") -> None:
    """DataError naming (by name(i)) the first of `labels` outside 0..num_classes-1, and how many such there are."""
    bad = np.nonzero((labels < 0) | (labels >= num_classes))[0]
    if len(bad):
        i = int(bad[0])
        raise DataError(f"'{name(i)}' has label {int(labels[i])}, outside 0..{num_classes - 1} ({len(bad)} such "
                        f"{unit}); {way_out}")


class SkipCount:
    """Images skipped, in shared memory: one slot per loader worker, so no two processes write one slot; `total()`
    reads the sum back in the main process."""

    SLOTS = 64  # loader workers beyond this share slots (and may undercount)

    def __init__(self):
        self._skips = torch.zeros(self.SLOTS + 1, dtype=torch.int64).share_memory_()

    def add(self) -> None:
        worker = get_worker_info()
        self._skips[0 if worker is None else 1 + worker.id % self.SLOTS] += 1

    def total(self) -> int:
        return int(self._skips.sum())


class ImageSource(Dataset):
    """One split of labelled images, by index: subclasses give read, name and _select, and may set a default
    `decode` (what read returns -> image; None: as read).

    Args:
        labels: the label of every sample, in sample order.
        skip_corrupt: skip unreadable images (None in their place, counted) instead of stopping.
    """

    decode: Optional[Callable[[object], object]] = None

    def __init__(self, labels: Sequence[int] | np.ndarray, skip_corrupt: bool = False):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.skip_corrupt = skip_corrupt
        self.skips = SkipCount()

    def read(self, i: int) -> object:
        """Sample i as a path, encoded bytes or a decoded uint8 (C, H, W) tensor."""
        raise NotImplementedError

    def name(self, i: int) -> str:
        """Sample i's name in messages: a path, '<shard>:<member>', '<data set> <split> row <row>'."""
        raise NotImplementedError

    def _select(self, keep: np.ndarray) -> "ImageSource":
        """A copy holding the samples at `keep` but for their labels (subset sets those)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Optional[tuple[object, int]]:
        try:
            image = self.read(i) if self.decode is None else self.decode(self.read(i))
        except UNREADABLE as e:
            self._unreadable(i, e)
            return None
        return image, int(self.labels[i])

    def subset(self, keep: np.ndarray, relabel: Optional[np.ndarray] = None) -> "ImageSource":
        """The samples at `keep` (ascending indices), labels mapped through `relabel` when given; self unchanged."""
        out = self._select(np.asarray(keep))
        out.labels = self.labels[keep] if relabel is None else np.asarray(relabel)[self.labels[keep]]
        return out

    def batch(self, indices: Sequence[int]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The samples at `indices` as one uint8 batch and their labels, where the source holds them so (in
        memory); None: they are read one by one."""
        return None

    def with_decoder(self, decode: Callable[[object], object]) -> "ImageSource":
        """This source decoding with `decode` (what read returns -> image), so that a failure is caught, and
        skipped, where the image is read."""
        out = copy.copy(self)
        out.decode = decode
        return out

    def skipped(self) -> int:
        """Images skipped so far (skip_corrupt), by this process and its loader workers."""
        return self.skips.total()

    def _unreadable(self, i: int, e: BaseException) -> None:
        """Stop with one line naming sample i, or (skip_corrupt) warn and count it."""
        if isinstance(e, DataChanged):
            raise e
        name = self.name(i)
        if not self.skip_corrupt:
            # A decoder handed bytes calls them '<bytes>'; the source knows their name.
            what = (str(e).replace("'<bytes>'", f"'{name}'") if isinstance(e, DataError)
                    else f"cannot read image '{name}' ({first_line(e)})")
            raise UnreadableImage(what, "replace or delete it, or set data.skip_corrupt=true to skip unreadable "
                                        "images") from None
        self.skips.add()
        print(f"warning: skipped unreadable image '{name}' (data.skip_corrupt)", file=sys.stderr)


class PackedStrings:
    """Many strings in two flat arrays, their UTF-8 bytes (surrogateescape: file names need not be UTF-8) and
    where each ends: a million paths cost their bytes and 8 bytes each, and no Python object a worker would touch.

    Args:
        strings: the strings, in order.
    """

    def __init__(self, strings: Sequence[str] = ()):
        encoded = [s.encode(errors="surrogateescape") for s in strings]
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)

    @classmethod
    def split(cls, buffer: np.ndarray, count: int, separator: int = 0) -> "PackedStrings":
        """The `count` strings of `buffer` (uint8), joined by `separator` bytes as `joined` writes them, without a
        Python object per string; ValueError when the buffer holds another count."""
        cuts = np.flatnonzero(buffer == separator)
        found = len(cuts) + 1 if len(buffer) else 0
        if found != count:
            raise ValueError(f"{found} strings where {count} were expected")
        out = cls()
        if count:
            out.data, out.ends = np.delete(buffer, cuts), np.append(cuts, len(buffer)) - np.arange(count)
        return out

    def joined(self, separator: int = 0) -> bytes:
        """The strings' bytes with `separator` between them (what `split` reads back)."""
        return np.insert(self.data, self.ends[:-1], separator).tobytes()

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        start = int(self.ends[i - 1]) if i > 0 else 0
        return self.data[start:int(self.ends[i])].tobytes().decode(errors="surrogateescape")

    def take(self, keep: np.ndarray) -> "PackedStrings":
        """The strings at `keep`, in that order."""
        starts = np.concatenate([[0], self.ends[:-1]])[keep]
        lengths = self.ends[keep] - starts
        out = PackedStrings()
        out.ends = np.cumsum(lengths, dtype=np.int64)
        out.data = (self.data[np.repeat(starts - (out.ends - lengths), lengths) + np.arange(int(out.ends[-1]))]
                    if len(lengths) and out.ends[-1] else np.zeros(0, dtype=np.uint8))
        return out
