"""The two recipes (`data.recipe`) that turn raw images into what the loader yields, and what the device does next.

- imagenet: timm's RandAugment recipe. Loader workers read and decode the random-resized crop, image by image
  (data.decoding.jpeg), and yield uint8 at img_size.
- small: for 28-32 px images; the loader yields the images as uint8 batches, resized to img_size where needed.
Everything after that runs on the device over the whole batch, for both recipes (data.augment.batch, through
`batch_transforms`): flip, RandAugment (imagenet) or pad-crop (small), normalisation and random erasing.
"""
from __future__ import annotations

from typing import Sequence

from core.config import AugCfg, DataCfg
from data.augment.batch import BatchAugment, BatchNormalize
from data.decoding.jpeg import JpegEvalDecode, JpegTrainDecode
from data.loaders.transformed import BatchTransformed, EpochSeeding, PerSampleTransformed
from data.sources import ImageSource
from models.view import MEAN_STD, data_mean_std, mean_std  # the view's statistics, which the exports carry too

__all__ = ["MEAN_STD", "apply_recipe", "batch_transforms", "data_mean_std", "imagenet_decode", "mean_std"]


def imagenet_decode(data_cfg: DataCfg, aug_cfg: AugCfg, train: bool) -> JpegTrainDecode | JpegEvalDecode:
    """The imagenet recipe's per-image part, for loader workers: image -> uint8 (C, img_size, img_size)."""
    if not train:
        fill = tuple(round(255 * v) for v in data_mean_std(data_cfg)[0])  # border's padding, as timm's
        return JpegEvalDecode(data_cfg.img_size, data_cfg.crop_pct, aug_cfg.interpolation, data_cfg.crop_mode, fill,
                              data_cfg.max_image_pixels)
    return JpegTrainDecode(data_cfg.img_size, interpolation=aug_cfg.interpolation, dct_scaling=data_cfg.dct_scaling,
                           max_pixels=data_cfg.max_image_pixels)


def batch_transforms(data_cfg: DataCfg, aug_cfg: AugCfg, mean: Sequence[float],
                     std: Sequence[float]) -> tuple[BatchAugment, BatchNormalize]:
    """(train, eval): what the loops do to a uint8 batch on the device, after the copy: the recipe's augmentation
    and normalisation in training, normalisation in evaluation (float32 out)."""
    imagenet = data_cfg.recipe == "imagenet"
    train = BatchAugment(mean, std, hflip=aug_cfg.hflip, rand_augment=aug_cfg.rand_augment if imagenet else "",
                         crop_padding=0 if imagenet else aug_cfg.crop_padding, reprob=aug_cfg.reprob, mode="pixel")
    return train, BatchNormalize(mean, std)


def apply_recipe(source: ImageSource, data_cfg: DataCfg, aug_cfg: AugCfg, train: bool,
                 seed: int = 0) -> BatchTransformed | PerSampleTransformed:
    """Wrap a raw split so it yields (uint8 image, int64 label) at img_size; a train split's random crops in loader
    workers (imagenet recipe) are seeded by (seed, epoch, sample)."""
    if data_cfg.recipe == "small":
        return BatchTransformed(source, data_cfg.img_size, aug_cfg.interpolation)
    return PerSampleTransformed(source.with_decoder(imagenet_decode(data_cfg, aug_cfg, train)),
                                EpochSeeding(seed) if train else None)
