"""A data set's two splits and what they share (classes, channels), and narrowing them (data.classes,
data.train_limit) without changing the sources they came from."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np
import torch

from data.sources.base import DataError, ImageSource


@dataclass
class Splits:
    train: Optional[ImageSource]  # None when only evaluation was asked for
    val: Optional[ImageSource]  # None when training without one (image folder, csv, shards with no val split)
    num_classes: int
    in_chans: int
    class_names: Optional[list[str]] = None  # None: the data set has none (synthetic, integer labels)


def keep_classes(splits: Splits, classes: Sequence[int]) -> Splits:
    """Only the listed classes, relabelled 0..k-1 in the order given (e.g. a transfer experiment's half)."""
    if len(set(classes)) != len(classes) or not all(0 <= c < splits.num_classes for c in classes):
        raise DataError(f"data.classes={list(classes)} must list distinct class indices in 0..{splits.num_classes - 1}")
    relabel = np.full(splits.num_classes, -1, dtype=np.int64)
    relabel[list(classes)] = np.arange(len(classes))

    def narrow(source: ImageSource) -> ImageSource:
        return source.subset(np.nonzero(relabel[source.labels] >= 0)[0], relabel)

    return replace(splits, train=narrow(splits.train) if splits.train is not None else None,
                   val=narrow(splits.val) if splits.val is not None else None,
                   num_classes=len(classes),
                   class_names=[splits.class_names[c] for c in classes] if splits.class_names else None)


def limit_train(splits: Splits, n: int) -> Splits:
    """A fixed random subset of n training images (the same in every run and on every rank)."""
    if splits.train is None or n >= len(splits.train):
        return splits
    keep = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))[:n].sort().values.numpy()
    return replace(splits, train=splits.train.subset(keep))
