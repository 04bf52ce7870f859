"""An image folder: root/train/<class>/**/<image>, root/val/<class>/**/<image>, classes in sorted order (torchvision's
ImageFolder layout and order), listed once and cached (data.sources.file_list)."""
from __future__ import annotations

import os

import numpy as np
from torchvision.datasets.folder import default_loader, find_classes

from core.config import DataCfg
from data.sources.base import DataError, ImageSource, PackedStrings
from data.sources.file_list import FileList, list_images
from data.sources.splits import Splits


class FolderImages(ImageSource):
    """One split folder's images; read(i) is the file's path, decoded by Pillow to RGB unless a recipe decodes.

    Args:
        folder: the split folder, one sub-folder per class.
        listing: its file list (list_images: cached, the same on every rank).
        skip_corrupt: skip unreadable images instead of stopping.
    """

    decode = staticmethod(default_loader)  # torchvision's: a PIL RGB image

    def __init__(self, folder: str, listing: FileList, skip_corrupt: bool = False):
        super().__init__([label for _, label in listing.samples], skip_corrupt)
        self.folder, self.classes = os.path.abspath(folder), list(listing.classes)
        start = len(self.folder) + 1
        self.paths = PackedStrings([path[start:] for path, _ in listing.samples])  # relative to the folder

    def read(self, i: int) -> str:
        return os.path.join(self.folder, self.paths[i])

    def name(self, i: int) -> str:
        return self.read(i)

    def _select(self, keep: np.ndarray) -> "FolderImages":
        out = object.__new__(FolderImages)
        out.__dict__.update(self.__dict__, paths=self.paths.take(keep))
        return out


def _class_names(path: str) -> list[str] | None:
    try:
        return find_classes(path)[0]
    except (FileNotFoundError, NotADirectoryError):
        return None


def imagefolder(cfg: DataCfg, train: bool) -> Splits:
    train_dir, val_dir = os.path.join(cfg.root, "train"), os.path.join(cfg.root, "val")
    val = FolderImages(val_dir, list_images(val_dir, cache=cfg.cache_file_list), cfg.skip_corrupt)
    train_set = (FolderImages(train_dir, list_images(train_dir, cache=cfg.cache_file_list), cfg.skip_corrupt)
                 if train else None)
    # Labels are positions in the sorted class list, so val must list exactly the train classes. When only
    # evaluating, the train folder names are still checked if they are there.
    train_classes = train_set.classes if train_set is not None else _class_names(train_dir)
    if train_classes is not None and train_classes != val.classes:
        only_train = sorted(set(train_classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train_classes))[:5]
        raise DataError(f"class folders differ between '{train_dir}' ({len(train_classes)}) and '{val_dir}' "
                        f"({len(val.classes)}): only in train {only_train}, only in val {only_val}; give both "
                        f"the same class sub-folders")
    return Splits(train_set, val, num_classes=len(val.classes), in_chans=3, class_names=list(val.classes))
