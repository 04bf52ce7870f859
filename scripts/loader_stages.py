"""Where a loader worker's time goes, image by image: our imagenet recipe against timm's transform on the same files.

Used by scripts/benchmark.py (loader modes). Both pipelines run in this process on one thread, as a loader worker
does, interleaved pass after pass over the same files; each stage is timed on its own:

    timm   decode (PIL open + RGB) | crop+resize | flip | RandAugment | conversion (ToTensor) | normalisation |
           erasing | collation (float32)
    ours   decode (libjpeg-turbo to a tensor) | crop+resize (uint8 tensor) | collation (uint8); flip, RandAugment,
           normalisation and erasing run on the device over the batch (`device`: BatchAugment's time per image,
           next to the training step's).

The bytes per image that are pinned and copied to the device follow from the dtype: 4 x 224^2 x 3 in float32 for
timm's workers, a quarter of that in uint8 for ours.
"""
from __future__ import annotations

import random
import statistics
import time
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import default_collate

from core.config import Config
from data.augment.batch import BatchAugment
from data.decoding.jpeg import decode, image_size, read_source, resize, sample_crop
from data.augment.timm_reference import allow_zero_bit_posterize
from data.loaders.collate import collate_readable
from data.loaders.recipes import imagenet_decode, mean_std

# timm's transform steps by class name -> the stage they belong to
_TIMM_STAGES = {"RandomResizedCropAndInterpolation": "crop+resize", "RandomHorizontalFlip": "flip",
                "RandAugment": "RandAugment", "MaybeToTensor": "conversion", "ToTensor": "conversion",
                "Normalize": "normalisation", "RandomErasing": "erasing"}


def timm_train_transform(cfg: Config) -> Callable:
    """timm's own train transform of the config's imagenet recipe, as timm's train.py builds it (no prefetcher)."""
    mean, std = mean_std(cfg.data.name)
    transform = create_transform(cfg.data.img_size, is_training=True, hflip=cfg.aug.hflip,
                                 auto_augment=cfg.aug.rand_augment or None, color_jitter=None,
                                 interpolation=cfg.aug.interpolation, mean=mean, std=std,
                                 re_prob=cfg.aug.reprob, re_mode="pixel", re_count=1)
    return allow_zero_bit_posterize(transform)  # Pillow >= 13 refuses 0-bit posterize, which timm can ask for


def _timm_pass(files: Sequence[str], transform, batch: int) -> dict[str, float]:
    totals: dict[str, float] = {}
    outputs = []
    for path in files:
        start = time.perf_counter()
        with Image.open(path) as image:
            x = image.convert("RGB")
        now = _add(totals, "decode", start)
        for step in transform.transforms:
            x = step(x)
            now = _add(totals, _TIMM_STAGES.get(type(step).__name__, type(step).__name__), now)
        outputs.append(x)
    _collate(totals, outputs, batch)
    return totals


def _our_pass(files: Sequence[str], recipe, batch: int) -> dict[str, float]:
    totals: dict[str, float] = {}
    outputs = []
    for path in files:
        start = time.perf_counter()
        data, name = read_source(path)
        box = sample_crop(*image_size(data, name), recipe.scale, recipe.ratio)
        region = decode(data, name, box, recipe.min_side)  # only the crop's rows and columns
        now = _add(totals, "decode", start)
        outputs.append(resize(region, [recipe.size, recipe.size], recipe.interpolation))
        _add(totals, "crop+resize", now)
    _collate(totals, outputs, batch, collate_readable)
    return totals


def _add(totals: dict[str, float], stage: str, since: float) -> float:
    now = time.perf_counter()
    totals[stage] = totals.get(stage, 0.0) + now - since
    return now


def _collate(totals: dict[str, float], images: list, batch: int, collate: Callable = default_collate) -> None:
    start = time.perf_counter()
    for first in range(0, len(images) - batch + 1, batch):
        collate([(image, 0) for image in images[first:first + batch]])
    # only whole batches are collated: charge the per-image cost to every image
    collated = max(batch, len(images) // batch * batch)
    totals["collation"] = (time.perf_counter() - start) * len(images) / collated


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stage_times(cfg: Config, files: Sequence[str], repeats: int, batch: int = 32) -> dict[str, dict[str, float]]:
    """{pipeline: {stage: ms per image}} for "timm" and "ours", each the median over `repeats` interleaved passes
    over `files` on one thread (the same seeds for both), with "total" their sum."""
    ours = imagenet_decode(cfg.data, cfg.aug, True)
    timm = timm_train_transform(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker
    passes: dict[str, list[dict[str, float]]] = {"timm": [], "ours": []}
    try:
        for repeat in range(repeats):
            for name, run in (("timm", lambda: _timm_pass(files, timm, batch)),
                              ("ours", lambda: _our_pass(files, ours, batch))):
                _seed(repeat)
                passes[name].append(run())
    finally:
        torch.set_num_threads(threads)
    result = {}
    for name, runs in passes.items():
        stages = {stage: 1e3 * statistics.median(run[stage] for run in runs) / len(files) for stage in runs[0]}
        result[name] = {**stages, "total": sum(stages.values())}
    return result


def device_ms_per_image(augment: BatchAugment, batch: torch.Tensor, repeats: int) -> float:
    """The batch work our recipe leaves to the device (BatchAugment: flip, RandAugment, normalise, erase), ms per
    image, the median of `repeats` calls on a uint8 batch already there."""
    times = []
    for _ in range(repeats):
        if batch.device.type == "cuda":
            torch.cuda.synchronize(batch.device)
        start = time.perf_counter()
        augment(batch)
        if batch.device.type == "cuda":
            torch.cuda.synchronize(batch.device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times) / len(batch)
