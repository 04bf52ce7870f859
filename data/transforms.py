"""The two recipes (`data.recipe`) that turn raw images into what the loader yields.

- imagenet: timm's RandAugment recipe. Loader workers decode, crop, resize, flip and RandAugment image by image
  (data.jpeg) and yield uint8; normalisation and random erasing follow on the device over the whole batch
  (data.batch_aug, through `batch_transforms`).
- small: pad-crop + flip (+ random erasing) for 28-32 px images, done on a whole uint8 batch at once,
  because per-image calls would leave a 2-core trainer waiting on the data; yields normalised float32.
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from torch.utils.data import Dataset, default_collate, get_worker_info
from torchvision.transforms.functional import InterpolationMode, pil_to_tensor, resize

from core.config import AugCfg, DataCfg
from data.batch_aug import BatchAugment, BatchNormalize
from data.checked import CheckedReads, DataError
from data.datasets import TensorImages
from data.jpeg import JpegEvalDecode, JpegTrainDecode

MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def mean_std(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of a data set; ImageNet's for imagefolder and synthetic."""
    return MEAN_STD.get(name, (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)))


def imagenet_decode(data_cfg: DataCfg, aug_cfg: AugCfg, train: bool,
                    mean: Sequence[float]) -> JpegTrainDecode | JpegEvalDecode:
    """The imagenet recipe's per-image part, for loader workers: image -> uint8 (C, img_size, img_size)."""
    if not train:
        return JpegEvalDecode(data_cfg.img_size, data_cfg.crop_pct, aug_cfg.interpolation)
    return JpegTrainDecode(data_cfg.img_size, rand_augment=aug_cfg.rand_augment, mean=mean,
                           interpolation=aug_cfg.interpolation, hflip=aug_cfg.hflip)


def batch_transforms(data_cfg: DataCfg, aug_cfg: AugCfg, mean: Sequence[float],
                     std: Sequence[float]) -> tuple[Callable | None, Callable | None]:
    """(train, eval): what the loops do to a batch on the device, after the copy, for the imagenet recipe (uint8
    in, normalised float32 out; in training also random erasing); (None, None) for the small recipe, whose loader
    yields normalised float32 already."""
    if data_cfg.recipe != "imagenet":
        return None, None
    train = BatchAugment(mean, std, hflip=0.0, reprob=aug_cfg.reprob, mode="pixel")  # flipped in the workers
    return train, BatchNormalize(mean, std)


class SmallBatchTransform:
    """The small recipe on a uint8 NCHW batch -> float32 NCHW, each image with its own random draws.

    All randomness comes from torch's global RNG, so torch.manual_seed (and the per-worker seeding of
    DataLoader) makes it reproducible.
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], train: bool,
                 padding: int = 0, hflip: float = 0.0, reprob: float = 0.0, interpolation: str = "bilinear"):
        self.img_size, self.train, self.padding, self.hflip = img_size, train, padding, hflip
        self.interpolation = interpolation
        # Normalising on the 0-255 scale skips a separate /255 pass over the batch.
        self.shift = torch.tensor(mean).view(1, -1, 1, 1) * 255
        self.scale = torch.tensor(std).view(1, -1, 1, 1) * 255
        self.erase = RandomErasing(reprob, mode="pixel", max_count=1, device="cpu") if train and reprob > 0 else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = self._resize(x)
        if self.train and self.padding > 0:
            x = self._random_crop(x)
        if self.train and self.hflip > 0:
            flip = torch.rand(len(x)) < self.hflip
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        x = (x - self.shift) / self.scale
        if self.erase is not None:
            x = self._random_erase(x)
        return x

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        size = (self.img_size, self.img_size)
        if self.interpolation == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        # bicubic overshoots past the 0-255 range; clamp so padding and normalisation see real pixel values
        x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True)
        return x.clamp_(0, 255)

    def _random_crop(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad by `padding` and cut an img_size window at a random offset per image.

        Two gathers (rows, then columns) instead of a Python loop over the batch.
        """
        n, c, s, p = x.shape[0], x.shape[1], self.img_size, self.padding
        padded = F.pad(x, (p, p, p, p))
        top = torch.randint(0, 2 * p + 1, (n, 1, 1, 1))
        left = torch.randint(0, 2 * p + 1, (n, 1, 1, 1))
        rows = (top + torch.arange(s).view(1, 1, s, 1)).expand(n, c, s, s + 2 * p)
        cols = (left + torch.arange(s).view(1, 1, 1, s)).expand(n, c, s, s)
        return padded.gather(2, rows).gather(3, cols)

    def _random_erase(self, x: torch.Tensor) -> torch.Tensor:
        # timm draws its boxes from Python's `random`; seed that from torch's RNG for the duration, so the
        # torch seed governs erasing too, and put the caller's Python RNG state back afterwards.
        state = random.getstate()
        random.seed(int(torch.randint(2 ** 62, ())))
        try:
            return self.erase(x)
        finally:
            random.setstate(state)


class EpochSeeding:
    """Seeds for augmentation in loader workers that depend on (seed, epoch, sample) and on nothing else.

    DataLoader seeds each worker once, so which draws a batch gets depends on which worker it lands on and on what
    that worker did before: a run resumed mid-epoch would augment the rest of the epoch differently. Seeding the
    worker's generators from the epoch and the sample index instead makes a resumed epoch exactly the one it
    would have been. The epoch lives in shared memory, so persistent workers see set_epoch too. In the main
    process (num_workers=0) nothing is reseeded: the run's own generator state, checkpointed, governs.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def seed_worker(self, index: int) -> None:
        if get_worker_info() is None:
            return
        value = ((self.seed * 1_000_003 + int(self._epoch)) * 1_000_000_007 + index) % 2 ** 63
        torch.manual_seed(value)
        random.seed(value)
        np.random.seed(value % 2 ** 32)


class PerSampleTransformed(Dataset):
    """Applies a per-image transform (the imagenet recipe) in the loader, each sample seeded by EpochSeeding.

    transform=None where the source transforms as it reads (an image folder decodes with the recipe's decoder,
    so that an unreadable file is caught, and skipped, where it is read).
    """

    def __init__(self, source: Dataset, transform: Callable[[torch.Tensor], torch.Tensor] | None,
                 seeding: EpochSeeding | None = None):
        self.source, self.transform, self.seeding = source, transform, seeding

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        if self.seeding is not None:
            self.seeding.seed_worker(i)
        sample = self.source[i]
        if sample is None:  # an unreadable image skipped by the source; the collate drops it
            return None
        image, label = sample
        return (self.transform(image) if self.transform is not None else image), label


class BatchTransformed(Dataset):
    """Serves whole batches through `__getitems__`, so a batch transform runs once per batch.

    DataLoader hands `__getitems__` the batch's indices; the result is already a batch, so the loader
    must use `keep_batch` as its collate_fn.
    """

    def __init__(self, source: Dataset, transform: SmallBatchTransform, seeding: EpochSeeding | None = None):
        self.source, self.transform, self.seeding = source, transform, seeding

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.seeding is not None:
            self.seeding.seed_worker(indices[0])  # a batch's first index is its own within an epoch and rank
        images, labels = self._gather(indices)
        return self.transform(images), labels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        images, labels = self.__getitems__([i])
        return images[0], int(labels[0])

    def _gather(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.source, TensorImages):
            return self.source.take(indices)
        samples = readable([self.source[i] for i in indices])
        images = torch.stack([self._as_uint8(image) for image, _ in samples])
        return images, torch.tensor([label for _, label in samples], dtype=torch.long)

    def _as_uint8(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        # Files on disk come in any size; bring them to img_size so the batch can be stacked.
        size = [self.transform.img_size] * 2
        interpolation = InterpolationMode(self.transform.interpolation)
        if isinstance(image, Image.Image):
            return pil_to_tensor(resize(image, size, interpolation))
        return image if list(image.shape[-2:]) == size else resize(image, size, interpolation, antialias=True)


def readable(samples: list) -> list:
    """The samples whose image could be read (a skipped unreadable image arrives as None)."""
    kept = [s for s in samples if s is not None]
    if not kept:
        raise DataError(f"all {len(samples)} images of a batch were unreadable; check the data set's files")
    return kept


def keep_batch(batch):
    """collate_fn for BatchTransformed: its batches arrive already stacked."""
    return batch


def collate_readable(batch: list):
    """collate_fn for PerSampleTransformed: default collation of the samples that were readable."""
    return default_collate(readable(batch))


def apply_recipe(source: Dataset, data_cfg: DataCfg, aug_cfg: AugCfg, train: bool,
                 mean: Sequence[float], std: Sequence[float], seed: int = 0) -> Dataset:
    """Wrap a raw split so it yields (image, int64 label): uint8 for the imagenet recipe, normalised float32 for
    the small one; a train split's augmentation in loader workers is seeded by (seed, epoch, sample)."""
    seeding = EpochSeeding(seed) if train else None
    if data_cfg.recipe == "small":
        transform = SmallBatchTransform(data_cfg.img_size, mean, std, train, padding=aug_cfg.crop_padding,
                                        hflip=aug_cfg.hflip, reprob=aug_cfg.reprob,
                                        interpolation=aug_cfg.interpolation)
        return BatchTransformed(source, transform, seeding)
    decode = imagenet_decode(data_cfg, aug_cfg, train, mean)
    if isinstance(source, CheckedReads):  # an image folder or shards: decode where the file is read, and checked
        source.loader = decode
        return PerSampleTransformed(source, None, seeding)
    return PerSampleTransformed(source, decode, seeding)
