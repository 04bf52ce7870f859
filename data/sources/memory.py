"""Sources held in memory as one uint8 NCHW tensor (Fashion-MNIST, CIFAR-10/100), and synthetic images made on the fly.
"""
from __future__ import annotations

import gzip
import os
from functools import partial
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10, CIFAR100, FashionMNIST

from core.config import DataCfg
from data.sources.base import DataError, ImageSource, first_line
from data.sources.splits import Splits

FASHION_MNIST_APT_DIR = "/usr/share/datasets/fashion-mnist"


class TensorImages(ImageSource):
    """A whole split as uint8 NCHW in memory, so a batch costs one indexing op (`batch`).

    Args:
        images: uint8 (N, C, H, W).
        labels: N labels.
        title: names the split in messages ('<title> image <i>').
    """

    def __init__(self, images: torch.Tensor, labels: Sequence[int] | np.ndarray | torch.Tensor, title: str = "images"):
        super().__init__(np.asarray(labels))
        self.images, self.title = images, title

    def read(self, i: int) -> torch.Tensor:
        return self.images[i]

    def name(self, i: int) -> str:
        return f"{self.title} image {i}"

    def _select(self, keep: np.ndarray) -> "TensorImages":
        return TensorImages(self.images[torch.as_tensor(keep, dtype=torch.long)], self.labels[keep], self.title)

    def batch(self, indices: Sequence[int]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], torch.from_numpy(self.labels[idx.numpy()])


class SyntheticImages(ImageSource):
    """Noise around a per-class colour cast and coarse pattern, so a smoke run can show learning.

    Sample i comes from a generator seeded with `first_seed + i` and nothing else, so it is the same
    on every rank, in every worker and in every run.
    """

    # torch's CPU generator only uses the low 32 bits of a seed, so the seed ranges of train samples
    # [0, 2^30), val samples [2^30, 2^31) and class prototypes [2^31, 2^32) must stay apart within them.
    VAL_FIRST_SEED = 1 << 30
    _CLASS_SEED = 1 << 31

    def __init__(self, size: int, num_classes: int, img_size: int, first_seed: int):
        self.seeds = first_seed + np.arange(size, dtype=np.int64)
        self.num_classes, self.img_size = num_classes, img_size
        super().__init__([int(torch.randint(num_classes, (), generator=torch.Generator().manual_seed(int(s))))
                          for s in self.seeds])

    def _prototype(self, label: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self._CLASS_SEED + label)
        colour = torch.randn(3, 1, 1, generator=g) * 40
        # A 4x4 pattern blown up to full size survives crops and flips better than fine detail would.
        coarse = torch.randn(1, 3, 4, 4, generator=g) * 30
        pattern = F.interpolate(coarse, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return colour + pattern[0]

    def read(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self.seeds):
            raise IndexError(f"sample {i} out of range for {len(self.seeds)} synthetic images")
        g = torch.Generator().manual_seed(int(self.seeds[i]))
        label = int(torch.randint(self.num_classes, (), generator=g))  # drawn first, as the label array was
        noise = torch.randn(3, self.img_size, self.img_size, generator=g) * 40
        return (128 + self._prototype(label) + noise).clamp_(0, 255).to(torch.uint8)

    def name(self, i: int) -> str:
        return f"synthetic image {int(self.seeds[i])}"

    def _select(self, keep: np.ndarray) -> "SyntheticImages":
        out = object.__new__(SyntheticImages)
        out.__dict__.update(self.__dict__, seeds=self.seeds[keep])
        return out


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
    return TensorImages(torch.from_numpy(images).unsqueeze(1), labels, f"Fashion-MNIST {split}")


def fashion_mnist(cfg: DataCfg, train: bool) -> Splits:
    folder = _find_fashion_mnist(cfg.root) or _download_fashion_mnist(cfg)
    return Splits(_fashion_split(folder, "train") if train else None, _fashion_split(folder, "val"),
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
    return TensorImages(images, ds.targets, f"{title} {'train' if train else 'val'}"), list(ds.classes)


def _cifar(cfg: DataCfg, train: bool, **which) -> Splits:
    val, names = _cifar_split(cfg, False, **which)
    train_set = _cifar_split(cfg, True, **which)[0] if train else None
    return Splits(train_set, val, num_classes=len(names), in_chans=3, class_names=names)


cifar10 = partial(_cifar, tv_class=CIFAR10, title="CIFAR-10", folder="cifar-10-batches-py")
cifar100 = partial(_cifar, tv_class=CIFAR100, title="CIFAR-100", folder="cifar-100-python")


def synthetic(cfg: DataCfg, train: bool) -> Splits:
    num_classes = cfg.num_classes or 10
    make = partial(SyntheticImages, num_classes=num_classes, img_size=cfg.img_size)
    return Splits(make(cfg.synthetic_train_size, first_seed=0) if train else None,
                  make(cfg.synthetic_val_size, first_seed=SyntheticImages.VAL_FIRST_SEED),
                  num_classes=num_classes, in_chans=3)
