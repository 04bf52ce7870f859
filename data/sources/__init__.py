"""Image sources: one split of labelled images read by index, one class per kind of storage, one table row each.

    splits = load_splits(cfg.data)            # Splits(train, val, num_classes, in_chans, class_names)
    image, label = splits.val[0]              # as the source decodes it (the recipes set their own decoder)

Every source is an ImageSource (data.sources.base): its labels as one array, read(i), name(i) and _select(keep);
decoding, the unreadable-image checks, skip counting and narrowing (data.classes, data.train_limit) happen once, in
the base and in load_splits. Adding a source:
  1. a class in a module of this package: subclass ImageSource, pass the labels to its __init__, return a path,
     encoded bytes or a uint8 (C, H, W) tensor from read(i), a name for messages from name(i), and from
     _select(keep) a copy holding those samples; set `decode` if what read returns is not what a Pillow or
     libjpeg decoder takes (the recipes replace it anyway);
  2. a builder (cfg: DataCfg, train: bool) -> Splits beside it, and its row in SOURCES below (and its name among
     data.name's choices in core/config_validation.py, which checks a config before anything is built; a test holds
     the two lists equal).
"""
from __future__ import annotations

from typing import Callable

from core.config import DataCfg
from data.sources.base import (DataChanged, DataError, ImageSource, PackedStrings, UnreadableImage, check_labels,
                               first_line)
from data.sources.csv_list import csv_list
from data.sources.folder import FileImages, imagefolder
from data.sources.given import NO_LABEL, given_images
from data.sources.hub import HubImages, hf
from data.sources.memory import (FASHION_MNIST_APT_DIR, SyntheticImages, TensorImages, cifar10, cifar100,
                                 fashion_mnist, synthetic)
from data.sources.shards import ShardImages, shards
from data.sources.splits import Splits, keep_classes, limit_train


SOURCES: dict[str, Callable[[DataCfg, bool], Splits]] = {
    "fashion_mnist": fashion_mnist,
    "cifar10": cifar10,
    "cifar100": cifar100,
    "imagefolder": imagefolder,
    "csv": csv_list,
    "shards": shards,
    "hf": hf,  # the optional `datasets` is imported only when a hub set is opened
    "synthetic": synthetic,
}


def load_splits(cfg: DataCfg, train: bool = True) -> Splits:
    """The splits of `cfg.name` (a key of SOURCES, which the config checks), narrowed as data.classes and
    data.train_limit ask; the train split is only read when `train` is true."""
    splits = SOURCES[cfg.name](cfg, train)
    if cfg.classes:
        splits = keep_classes(splits, cfg.classes)
    if cfg.train_limit:
        splits = limit_train(splits, cfg.train_limit)
    if cfg.num_classes and cfg.num_classes != splits.num_classes:
        where = f"'{cfg.hf_name}'" if cfg.name == "hf" else f"{cfg.name} in '{cfg.root}'"
        raise DataError(f"data.num_classes={cfg.num_classes} but {where} has "
                        f"{splits.num_classes} classes; set data.num_classes={splits.num_classes} or 0")
    return splits


__all__ = ["DataChanged", "DataError", "FASHION_MNIST_APT_DIR", "FileImages", "HubImages", "ImageSource", "NO_LABEL",
           "PackedStrings", "SOURCES", "ShardImages", "Splits", "SyntheticImages", "TensorImages", "UnreadableImage",
           "check_labels", "first_line", "given_images", "load_splits"]
