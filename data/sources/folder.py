"""Image files with labels: an image folder (root/train/<class>/**/<image>, root/val/<class>/**/<image>, classes in
sorted order: torchvision's ImageFolder layout and order, listed once and cached by data.sources.file_list), or the
files a CSV lists (data.sources.csv_list)."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from torchvision.datasets.folder import default_loader, find_classes

from core.config import DataCfg
from data.sources.base import DataError, ImageSource, PackedStrings
from data.sources.file_list import list_images
from data.sources.splits import Splits


class FileImages(ImageSource):
    """Image files; read(i) is the file's path, decoded by Pillow to RGB unless a recipe decodes.

    Args:
        folder: where relative paths start.
        paths: one per sample, relative to `folder` or absolute.
        labels: one per sample.
        skip_corrupt: skip unreadable images instead of stopping.
    """

    decode = staticmethod(default_loader)  # torchvision's: a PIL RGB image

    def __init__(self, folder: str, paths: Sequence[str] | PackedStrings, labels: Sequence[int] | np.ndarray,
                 skip_corrupt: bool = False):
        super().__init__(labels, skip_corrupt)
        self.folder = os.path.abspath(folder)
        self.paths = paths if isinstance(paths, PackedStrings) else PackedStrings(paths)

    def read(self, i: int) -> str:
        return os.path.join(self.folder, self.paths[i])

    def name(self, i: int) -> str:
        return self.read(i)

    def _select(self, keep: np.ndarray) -> "FileImages":
        out = object.__new__(FileImages)
        out.__dict__.update(self.__dict__, paths=self.paths.take(keep))
        return out


def folder_images(folder: str, cfg: DataCfg) -> tuple[FileImages, list[str]]:
    """A split folder's images (its file list cached, the same on every rank) and its classes."""
    listing = list_images(folder, cache=cfg.cache_file_list)
    return FileImages(listing.folder, listing.paths, listing.labels, cfg.skip_corrupt), listing.classes


def _class_names(path: str) -> list[str] | None:
    try:
        return find_classes(path)[0]
    except (FileNotFoundError, NotADirectoryError):
        return None


def imagefolder(cfg: DataCfg, train: bool) -> Splits:
    train_dir, val_dir = os.path.join(cfg.root, "train"), os.path.join(cfg.root, "val")
    has_val = not train or os.path.isdir(val_dir)  # training may go without one (train.eval_every=0)
    val, classes = folder_images(val_dir, cfg) if has_val else (None, None)
    train_set, train_classes = folder_images(train_dir, cfg) if train else (None, _class_names(train_dir))
    classes = train_classes if classes is None else classes
    # Labels are positions in the sorted class list, so val must list exactly the train classes. When only
    # evaluating, the train folder names are still checked if they are there.
    if train_classes is not None and train_classes != classes:
        only_train = sorted(set(train_classes) - set(classes))[:5]
        only_val = sorted(set(classes) - set(train_classes))[:5]
        raise DataError(f"class folders differ between '{train_dir}' ({len(train_classes)}) and '{val_dir}' "
                        f"({len(classes)}): only in train {only_train}, only in val {only_val}; give both "
                        f"the same class sub-folders")
    return Splits(train_set, val, num_classes=len(classes), in_chans=3, class_names=list(classes))
