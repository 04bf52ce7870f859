"""timm's own RandAugment made usable as the reference the device version is compared with (tests, benchmarks)."""
from __future__ import annotations

from PIL import Image
from timm.data import auto_augment


def allow_zero_bit_posterize(transform):
    """timm's own RandAugment (the reference the device version is compared with) can ask posterize for 0 bits,
    which Pillow >= 13 rejects with a ValueError (about 1 image in 500 with rand-m9-mstd0.5-inc1); route those ops
    through `_posterize`. Takes a timm RandAugment or a transform pipeline holding one, and returns it."""
    steps = getattr(transform, "transforms", [transform])
    for op in [op for step in steps for op in getattr(step, "ops", [])]:
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = _posterize
    return transform


def _posterize(image, bits_to_keep: int, **kwargs):
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)  # keeping no bits leaves black, as Pillow < 13 did
    return auto_augment.posterize(image, bits_to_keep, **kwargs)
