"""Data sets by name (`data.name`), as raw images before any recipe.

Each builder returns the train and val splits as datasets of `(image, label)`, where the image is a
uint8 CHW tensor (Fashion-MNIST, CIFAR, synthetic) or a PIL image (imagefolder).
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100, FashionMNIST, ImageFolder
from torchvision.datasets.folder import find_classes

import distributed_utils as du
from core.config import DataCfg
from data.checked import CheckedReads, DataError, first_line
from data.file_list import FileList, list_images, scan

FASHION_MNIST_APT_DIR = "/usr/share/datasets/fashion-mnist"


class TensorImages(Dataset):
    """A whole split held in memory as uint8 NCHW, so a batch costs one indexing op."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def take(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]


class SyntheticImages(Dataset):
    """Noise around a per-class colour cast and coarse pattern, so a smoke run can show learning.

    Sample i comes from a generator seeded with `first_seed + i` and nothing else, so it is the same
    on every rank, in every worker and in every run.
    """

    # torch's CPU generator only uses the low 32 bits of a seed, so the seed ranges of train samples
    # [0, 2^30), val samples [2^30, 2^31) and class prototypes [2^31, 2^32) must stay apart within them.
    VAL_FIRST_SEED = 1 << 30
    _CLASS_SEED = 1 << 31

    def __init__(self, size: int, num_classes: int, img_size: int, first_seed: int):
        self.size, self.num_classes, self.img_size, self.first_seed = size, num_classes, img_size, first_seed

    def __len__(self) -> int:
        return self.size

    def _prototype(self, label: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self._CLASS_SEED + label)
        colour = torch.randn(3, 1, 1, generator=g) * 40
        # A 4x4 pattern blown up to full size survives crops and flips better than fine detail would.
        coarse = torch.randn(1, 3, 4, 4, generator=g) * 30
        pattern = F.interpolate(coarse, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return colour + pattern[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} out of range for {self.size} synthetic images")
        g = torch.Generator().manual_seed(self.first_seed + i)
        label = int(torch.randint(self.num_classes, (), generator=g))
        noise = torch.randn(3, self.img_size, self.img_size, generator=g) * 40
        image = (128 + self._prototype(label) + noise).clamp_(0, 255).to(torch.uint8)
        return image, label


@dataclass
class RawSplits:
    train: Dataset | None  # None when only evaluation was asked for
    val: Dataset
    num_classes: int
    in_chans: int
    class_names: list[str] | None = None  # None: the data set has none (synthetic)


# --- Fashion-MNIST: the original idx files ---------------------------------------------------------

_FASHION_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The label order of Zalando's Fashion-MNIST release (github.com/zalandoresearch/fashion-mnist).
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
_IDX_UBYTE = 0x08  # the idx type code for unsigned bytes, the only one Fashion-MNIST uses


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Parse an idx file of unsigned bytes (the MNIST format), gzipped or not.

    Layout: magic (two zero bytes, type code, number of dims), one big-endian uint32 per dim, the data.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # also a corrupt or truncated gzip stream
        raise DataError(f"cannot read '{path}' ({first_line(e)}); replace it with the original file") from None
    expected = (_IDX_UBYTE << 8) | ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
    header = 4 + 4 * ndim
    if magic != expected or len(raw) < header:
        raise DataError(f"'{path}' is not an idx file of {ndim}-d unsigned bytes (magic {magic:#010x}, "
                        f"expected {expected:#010x}); replace it with the original file")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(dims)):
        raise DataError(f"'{path}' holds {len(raw) - header} bytes of data but its header says {dims}; "
                        f"replace it with the original file")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _idx_path(folder: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _find_fashion_mnist(root: str) -> str | None:
    """The folder holding all four idx files: root itself (the Debian layout) or torchvision's layout."""
    stems = [stem for pair in _FASHION_STEMS.values() for stem in pair]
    for folder in (root, os.path.join(root, "FashionMNIST", "raw")):
        if all(_idx_path(folder, stem) for stem in stems):
            return folder
    return None


def _download_fashion_mnist(cfg: DataCfg) -> str:
    way_out = (f"install it with 'apt-get install dataset-fashion-mnist' (files land in {FASHION_MNIST_APT_DIR}) "
               f"or set data.download=true")
    if not cfg.download:
        raise DataError(f"Fashion-MNIST not found in '{cfg.root}': {way_out}")
    try:
        FashionMNIST(cfg.root, train=True, download=True)  # fetches all four files
    except (OSError, RuntimeError, ValueError) as e:  # no network, HTTP errors, bad checksum
        raise DataError(f"Fashion-MNIST not found in '{cfg.root}' and the download failed ({first_line(e)}): "
                        f"install it with 'apt-get install dataset-fashion-mnist' (files land in "
                        f"{FASHION_MNIST_APT_DIR}) or check the network") from None
    folder = _find_fashion_mnist(cfg.root)
    if folder is None:
        raise DataError(f"Fashion-MNIST downloaded into '{cfg.root}' but its idx files are not there: {way_out}")
    return folder


def _fashion_split(folder: str, split: str) -> TensorImages:
    image_path, label_path = (_idx_path(folder, stem) for stem in _FASHION_STEMS[split])
    images, labels = read_idx(image_path, ndim=3), read_idx(label_path, ndim=1)
    if len(images) != len(labels):
        raise DataError(f"'{image_path}' has {len(images)} images but '{label_path}' has {len(labels)} labels; "
                        f"replace them with the original files")
    return TensorImages(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long())


def _fashion_mnist(cfg: DataCfg, train: bool) -> RawSplits:
    folder = _find_fashion_mnist(cfg.root) or _download_fashion_mnist(cfg)
    return RawSplits(_fashion_split(folder, "train") if train else None, _fashion_split(folder, "val"),
                     num_classes=10, in_chans=1, class_names=FASHION_CLASSES)


# --- CIFAR-10/100 through torchvision --------------------------------------------------------------

def _cifar_split(cfg: DataCfg, train: bool, tv_class: type, title: str,
                 folder: str) -> tuple[TensorImages, list[str]]:
    try:
        ds = tv_class(cfg.root, train=train, download=cfg.download)
    except (OSError, RuntimeError) as e:
        if cfg.download:
            raise DataError(f"{title} is not in '{cfg.root}' and the download failed ({first_line(e)}); "
                            f"check the network or put {folder}/ in data.root") from None
        raise DataError(f"{title} not found in '{cfg.root}' (torchvision looks for "
                        f"'{os.path.join(cfg.root, folder)}'): set data.download=true or point data.root at "
                        f"the folder holding {folder}/") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return TensorImages(images, torch.tensor(ds.targets, dtype=torch.long)), list(ds.classes)


def _cifar(cfg: DataCfg, train: bool, **which) -> RawSplits:
    val, names = _cifar_split(cfg, False, **which)
    train_set = _cifar_split(cfg, True, **which)[0] if train else None
    return RawSplits(train_set, val, num_classes=len(names), in_chans=3, class_names=names)


# --- ImageFolder: root/train/<class>/*, root/val/<class>/* -----------------------------------------

class CheckedImageFolder(ImageFolder, CheckedReads):
    """ImageFolder over a file list (data.file_list: cached, scanned once) that names an unreadable image in its
    error, or (skip_corrupt) yields None for it, counted (CheckedReads).

    `loader` (path -> image) is torchvision's PIL RGB loader unless a recipe sets its own decoder. None samples
    are dropped from their batch by the loader.
    """

    def __init__(self, root: str, skip_corrupt: bool = False, listing: FileList | None = None):
        self._listing = listing or scan(root)
        ImageFolder.__init__(self, root)
        CheckedReads.__init__(self, skip_corrupt)
        self._listing = None  # ImageFolder keeps its own samples and classes

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._listing.classes, {name: i for i, name in enumerate(self._listing.classes)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], **unused) -> list[tuple[str, int]]:
        return list(self._listing.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image | torch.Tensor, int] | None:
        path, label = self.samples[i]
        # The loaders decode every pixel, so a truncated file shows here.
        image = self.checked(lambda: self.loader(path), path)
        return None if image is None else (image, label)


def _image_folder(path: str, cfg: DataCfg) -> Dataset:
    return CheckedImageFolder(path, cfg.skip_corrupt, list_images(path, cache=cfg.cache_file_list))


def _class_names(path: str) -> list[str] | None:
    try:
        return find_classes(path)[0]
    except (FileNotFoundError, NotADirectoryError):
        return None


def _imagefolder(cfg: DataCfg, train: bool) -> RawSplits:
    train_dir, val_dir = os.path.join(cfg.root, "train"), os.path.join(cfg.root, "val")
    val = _image_folder(val_dir, cfg)
    train_set = _image_folder(train_dir, cfg) if train else None
    # Labels are positions in the sorted class list, so val must list exactly the train classes. When only
    # evaluating, the train folder names are still checked if they are there.
    train_classes = train_set.classes if train_set is not None else _class_names(train_dir)
    if train_classes is not None and train_classes != val.classes:
        only_train = sorted(set(train_classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train_classes))[:5]
        raise DataError(f"class folders differ between '{train_dir}' ({len(train_classes)}) and '{val_dir}' "
                        f"({len(val.classes)}): only in train {only_train}, only in val {only_val}; give both "
                        f"the same class sub-folders")
    return RawSplits(train_set, val, num_classes=len(val.classes), in_chans=3, class_names=list(val.classes))


# data.shards and data.hf_sets are imported where used: `python -m data.shards` and `python -m data.hf_sets` run them
# as scripts, which must not find them already imported by the package.

# --- tar shards: root/train/*.tar, root/val/*.tar, each split with its index (data.shards) ---------------------

def _shards(cfg: DataCfg, train: bool) -> RawSplits:
    from data.shards import CLASSES, ShardImages, check_shard_labels, read_classes
    val = ShardImages(os.path.join(cfg.root, "val"), cfg.skip_corrupt)
    train_set = ShardImages(os.path.join(cfg.root, "train"), cfg.skip_corrupt) if train else None
    names = read_classes(cfg.root)
    splits = [s for s in (train_set, val) if s is not None]
    num_classes = len(names) if names else cfg.num_classes or 1 + max(int(s.index.label.max()) for s in splits)
    way_out = (f"fix the labels, or list the classes in '{os.path.join(cfg.root, CLASSES)}'" if names else
               "fix the labels or raise data.num_classes")
    for split in splits:
        check_shard_labels(split, num_classes, way_out)
    return RawSplits(train_set, val, num_classes=num_classes, in_chans=3, class_names=names)


# --- Hugging Face data sets: a hub id, or a folder of parquet files or save_to_disk (data.hf_sets) ---------------

HF_PREPARE_WAIT_S = 48 * 3600  # a first download of ImageNet (~150 GB) and its conversion can take hours


def _hf(cfg: DataCfg, train: bool) -> RawSplits:
    from data.hf_sets import open_splits
    # Rank 0 downloads and converts to Arrow where needed; the others then find the same files in the cache.
    train_set, val, num_classes, names = du.main_first(lambda main: open_splits(cfg, train, main),
                                                       wait_s=HF_PREPARE_WAIT_S)
    return RawSplits(train_set, val, num_classes=num_classes, in_chans=3, class_names=names)


# --- synthetic -------------------------------------------------------------------------------------

def _synthetic(cfg: DataCfg, train: bool) -> RawSplits:
    num_classes = cfg.num_classes or 10
    make = partial(SyntheticImages, num_classes=num_classes, img_size=cfg.img_size)
    return RawSplits(make(cfg.synthetic_train_size, first_seed=0) if train else None,
                     make(cfg.synthetic_val_size, first_seed=SyntheticImages.VAL_FIRST_SEED),
                     num_classes=num_classes, in_chans=3)


BUILDERS: dict[str, Callable[[DataCfg, bool], RawSplits]] = {
    "fashion_mnist": _fashion_mnist,
    "cifar10": partial(_cifar, tv_class=CIFAR10, title="CIFAR-10", folder="cifar-10-batches-py"),
    "cifar100": partial(_cifar, tv_class=CIFAR100, title="CIFAR-100", folder="cifar-100-python"),
    "imagefolder": _imagefolder,
    "shards": _shards,
    "hf": _hf,
    "synthetic": _synthetic,
}


# --- narrowing a split: some classes (data.classes), some images (data.train_limit) ------------------

def _narrow(ds: Dataset, keep: torch.Tensor, relabel: torch.Tensor | None, what: str) -> Dataset:
    """The samples at `keep` (ascending indices), labels mapped through `relabel` when given."""
    if isinstance(ds, TensorImages):
        labels = ds.labels[keep]
        return TensorImages(ds.images[keep], relabel[labels] if relabel is not None else labels)
    if isinstance(ds, ImageFolder):
        kept = [ds.samples[i] for i in keep.tolist()]
        ds.samples = [(path, int(relabel[label])) for path, label in kept] if relabel is not None else kept
        ds.targets = [label for _, label in ds.samples]
        return ds
    if hasattr(ds, "narrow"):  # tar shards, hub data sets
        return ds.narrow(keep.numpy(), relabel.numpy() if relabel is not None else None)
    raise DataError(f"{what} works with fashion_mnist, cifar10/100, imagefolder, shards and hf, not "
                    f"{type(ds).__name__}")


def _labels(ds: Dataset) -> torch.Tensor:
    return ds.labels if isinstance(ds, TensorImages) else torch.tensor(getattr(ds, "targets", []), dtype=torch.long)


def keep_classes(splits: RawSplits, classes: Sequence[int]) -> RawSplits:
    """Only the listed classes, relabelled 0..k-1 in the order given (e.g. a transfer experiment's half)."""
    if len(set(classes)) != len(classes) or not all(0 <= c < splits.num_classes for c in classes):
        raise DataError(f"data.classes={list(classes)} must list distinct class indices in 0..{splits.num_classes - 1}")
    relabel = torch.full((splits.num_classes,), -1, dtype=torch.long)
    relabel[torch.tensor(list(classes))] = torch.arange(len(classes))

    def narrow(ds: Dataset) -> Dataset:
        if isinstance(ds, ImageFolder):
            ds.classes = [ds.classes[c] for c in classes]
        return _narrow(ds, torch.nonzero(relabel[_labels(ds)] >= 0).flatten(), relabel, "data.classes")

    names = [splits.class_names[c] for c in classes] if splits.class_names else None
    return RawSplits(narrow(splits.train) if splits.train is not None else None, narrow(splits.val),
                     num_classes=len(classes), in_chans=splits.in_chans, class_names=names)


def limit_train(splits: RawSplits, n: int) -> RawSplits:
    """A fixed random subset of n training images (the same in every run and on every rank)."""
    if splits.train is None or n >= len(splits.train):
        return splits
    keep = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))[:n].sort().values
    return RawSplits(_narrow(splits.train, keep, None, "data.train_limit"), splits.val, splits.num_classes,
                     splits.in_chans, splits.class_names)


def load_splits(cfg: DataCfg, train: bool = True) -> RawSplits:
    """The raw splits of `cfg.name` (one of BUILDERS, which the config checks); the train split is only read
    when `train` is true."""
    splits = BUILDERS[cfg.name](cfg, train)
    if cfg.classes:
        splits = keep_classes(splits, cfg.classes)
    if cfg.train_limit:
        splits = limit_train(splits, cfg.train_limit)
    if cfg.num_classes and cfg.num_classes != splits.num_classes:
        where = f"'{cfg.hf_name}'" if cfg.name == "hf" else f"{cfg.name} in '{cfg.root}'"
        raise DataError(f"data.num_classes={cfg.num_classes} but {where} has "
                        f"{splits.num_classes} classes; set data.num_classes={splits.num_classes} or 0")
    return splits
