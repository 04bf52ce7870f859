"""The two recipes (`data.recipe`) that turn raw images into what the loader yields, and what the device does next.

- imagenet: timm's RandAugment recipe. Loader workers read and decode the random-resized crop, image by image
  (data.jpeg), and yield uint8 at img_size.
- small: for 28-32 px images; the loader yields the images as uint8 batches, resized to img_size where needed.
Everything after that runs on the device over the whole batch, for both recipes (data.batch_aug, through
`batch_transforms`): flip, RandAugment (imagenet) or pad-crop (small), normalisation and random erasing.
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, default_collate, get_worker_info
from torchvision.transforms.functional import InterpolationMode, pil_to_tensor, resize

from core.config import AugCfg, DataCfg
from data.batch_aug import BatchAugment, BatchNormalize
from data.jpeg import JpegEvalDecode, JpegTrainDecode
from data.sources import DataError, ImageSource

MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def mean_std(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of a data set; ImageNet's for imagefolder and synthetic."""
    return MEAN_STD.get(name, (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)))


def data_mean_std(data_cfg: DataCfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """data.mean and data.std where given, else the data set's own (mean_std)."""
    if data_cfg.mean:
        return tuple(data_cfg.mean), tuple(data_cfg.std)
    return mean_std(data_cfg.name)


def imagenet_decode(data_cfg: DataCfg, aug_cfg: AugCfg, train: bool) -> JpegTrainDecode | JpegEvalDecode:
    """The imagenet recipe's per-image part, for loader workers: image -> uint8 (C, img_size, img_size)."""
    if not train:
        fill = tuple(round(255 * v) for v in data_mean_std(data_cfg)[0])  # border's padding, as timm's
        return JpegEvalDecode(data_cfg.img_size, data_cfg.crop_pct, aug_cfg.interpolation, data_cfg.crop_mode, fill)
    return JpegTrainDecode(data_cfg.img_size, interpolation=aug_cfg.interpolation, dct_scaling=data_cfg.dct_scaling)


def batch_transforms(data_cfg: DataCfg, aug_cfg: AugCfg, mean: Sequence[float],
                     std: Sequence[float]) -> tuple[BatchAugment, BatchNormalize]:
    """(train, eval): what the loops do to a uint8 batch on the device, after the copy: the recipe's augmentation
    and normalisation in training, normalisation in evaluation (float32 out)."""
    imagenet = data_cfg.recipe == "imagenet"
    train = BatchAugment(mean, std, hflip=aug_cfg.hflip, rand_augment=aug_cfg.rand_augment if imagenet else "",
                         crop_padding=0 if imagenet else aug_cfg.crop_padding, reprob=aug_cfg.reprob, mode="pixel")
    return train, BatchNormalize(mean, std)


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
        torch.default_generator.manual_seed(value)  # the CPU's: torch.manual_seed also seeds every device, ~0.16 ms
        random.seed(value)
        np.random.seed(value % 2 ** 32)


class PerSampleTransformed(Dataset):
    """A source whose decoder is the imagenet recipe's per-image work, in the loader, each sample seeded by
    EpochSeeding; the source decodes where it reads, so that an unreadable file is caught, and skipped, there."""

    def __init__(self, source: ImageSource, seeding: EpochSeeding | None = None):
        self.source, self.seeding = source, seeding

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        if self.seeding is not None:
            self.seeding.seed_worker(i)
        return self.source[i]  # None for an unreadable image skipped by the source; the collate drops it


class BatchTransformed(Dataset):
    """Serves whole uint8 batches at img_size through `__getitems__` (the small recipe): one gather of in-memory
    images instead of a per-image call, so that a 2-core trainer does not wait on its data.

    DataLoader hands `__getitems__` the batch's indices; the result is already a batch, so the loader
    must use `keep_batch` as its collate_fn.

    Args:
        source: the raw split; one held in memory serves a batch with one gather (ImageSource.batch).
        img_size: the side the images are resized to where they differ (antialiased).
        interpolation: of that resize: bicubic, bilinear or nearest.
    """

    def __init__(self, source: ImageSource, img_size: int, interpolation: str = "bicubic"):
        self.source, self.size, self.interpolation = source, [img_size, img_size], InterpolationMode(interpolation)

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        held = self.source.batch(indices)
        if held is not None:
            images, labels = held
            return self._resized(images), labels
        samples = readable([self.source[i] for i in indices])
        images = torch.stack([self._as_uint8(image) for image, _ in samples])
        return images, torch.tensor([label for _, label in samples], dtype=torch.long)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        images, labels = self.__getitems__([i])
        return images[0], int(labels[0])

    def _resized(self, images: torch.Tensor) -> torch.Tensor:
        if list(images.shape[-2:]) == self.size:
            return images
        return resize(images, self.size, self.interpolation, antialias=True)

    def _as_uint8(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        # Files on disk come in any size; bring them to img_size so the batch can be stacked.
        if isinstance(image, Image.Image):
            return pil_to_tensor(resize(image, self.size, self.interpolation))
        return self._resized(image)


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
    """collate_fn for PerSampleTransformed: the readable samples' images stacked channels_last (see stack_nhwc),
    their labels by default collation."""
    samples = readable(batch)
    images = [image for image, _ in samples]
    return stack_nhwc(images), default_collate([label for _, label in samples])


def stack_nhwc(images: list[torch.Tensor]) -> torch.Tensor:
    """(C, H, W) images -> an (N, C, H, W) batch laid out channels_last, in shared memory inside a loader worker.

    The decoder and resize leave each image in HWC memory, and the device's first step wants the batch
    channels_last: stacking them so is a plain copy, where a contiguous NCHW batch would transpose every image in
    the worker and transpose it back after the copy to the device."""
    c, h, w = images[0].shape
    if get_worker_info() is not None:  # as default_collate: straight into the memory that goes to the main process
        storage = images[0]._typed_storage()._new_shared(len(images) * c * h * w, device=images[0].device)
        out = images[0].new(storage).resize_(len(images), h, w, c)
    else:
        out = images[0].new_empty(len(images), h, w, c)
    torch.stack([image.permute(1, 2, 0) for image in images], 0, out=out)
    return out.permute(0, 3, 1, 2)


def apply_recipe(source: ImageSource, data_cfg: DataCfg, aug_cfg: AugCfg, train: bool,
                 seed: int = 0) -> BatchTransformed | PerSampleTransformed:
    """Wrap a raw split so it yields (uint8 image, int64 label) at img_size; a train split's random crops in loader
    workers (imagenet recipe) are seeded by (seed, epoch, sample)."""
    if data_cfg.recipe == "small":
        return BatchTransformed(source, data_cfg.img_size, aug_cfg.interpolation)
    return PerSampleTransformed(source.with_decoder(imagenet_decode(data_cfg, aug_cfg, train)),
                                EpochSeeding(seed) if train else None)
