"""The evaluation view a model expects: side, crop, interpolation and per-channel mean/std, as timm's pretrained
configuration spells it (VIEW_FIELDS; input_size as (C, H, W)). One dict form for every source: a run's config
(`config_view`, what the loaders' eval path does), released weights (models.pretrained.published_view) and the
exports, which carry it to the serving side.
"""
from __future__ import annotations

from typing import Callable

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from core.config import CHOICES, DataCfg, config_from_dict, get, parse_override
from core.errors import ConfigError

VIEW_FIELDS = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")
# config key: timm's field
VIEW_KEYS = {"data.img_size": "input_size", "data.crop_pct": "crop_pct", "data.crop_mode": "crop_mode",
             "aug.interpolation": "interpolation", "data.mean": "mean", "data.std": "std"}
# what else decides the view: the data set (its mean/std) and the recipe (small: the whole image resized)
SOURCE_KEYS = ("data.name", "data.recipe")

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


def config_view(saved: dict | None, overrides: list[str], in_chans: int) -> dict:
    """The view of a run's config (a checkpoint's `config` entry, None: the defaults, ImageNet's 224-px view) with
    `overrides` (key=value, the view's keys only) on top: what its evaluation fed the model. The small recipe
    resizes the whole image to img_size (squash at crop_pct 1)."""
    values = {f"{section}.{key}": (saved or {}).get(section, {}).get(key)
              for section, key in (k.split(".") for k in (*VIEW_KEYS, *SOURCE_KEYS))}
    for text in overrides:
        key, value = parse_override(text)
        if key not in VIEW_KEYS and key not in SOURCE_KEYS:
            raise ConfigError(f"'{text}': an export takes only the view's keys ({', '.join(VIEW_KEYS)}, "
                              f"{', '.join(SOURCE_KEYS)})")
        values[key] = value
    cfg = config_from_dict({key: value for key, value in values.items() if value is not None})
    for key in ("data.crop_mode", "aug.interpolation", "data.recipe"):
        if get(cfg, key) not in CHOICES[key]:
            raise ConfigError(f"{key} is {get(cfg, key)!r}; allowed: {', '.join(CHOICES[key])}")
    data = cfg.data
    mean, std = data_mean_std(data)
    if not (data.img_size > 0 and 0 < data.crop_pct <= 1 and len(mean) == len(std) == in_chans and min(std) > 0):
        raise ConfigError(f"the view does not fit a model of {in_chans} input channels: data.img_size "
                          f"{data.img_size} (> 0), data.crop_pct {data.crop_pct} (in (0, 1]), data.mean {list(mean)} "
                          f"and data.std {list(std)} ({in_chans} values each, std > 0); set them as key=value")
    small = data.recipe == "small"
    return {"input_size": (in_chans, data.img_size, data.img_size), "crop_pct": 1.0 if small else data.crop_pct,
            "crop_mode": "squash" if small else data.crop_mode, "interpolation": cfg.aug.interpolation,
            "mean": tuple(mean), "std": tuple(std)}


def describe(view: dict) -> str:
    """One line: what the model is fed."""
    c, h, w = view["input_size"]
    return (f"{h}x{w} px, {c} channel{'s' if c > 1 else ''}, crop_mode {view['crop_mode']}, crop_pct "
            f"{view['crop_pct']:g}, {view['interpolation']}, mean {list(view['mean'])} std {list(view['std'])}")


def eval_transform(view: dict) -> Callable[[object], torch.Tensor]:
    """PIL image -> normalised float (C, H, W) at the view: timm's eval transform, whose crop the loaders' eval
    decode reproduces (data.decoding.jpeg), after conversion to the model's channels (grey or RGB)."""
    from timm.data import create_transform
    transform = create_transform(input_size=tuple(view["input_size"]), crop_pct=view["crop_pct"],
                                 crop_mode=view["crop_mode"], interpolation=view["interpolation"],
                                 mean=tuple(view["mean"]), std=tuple(view["std"]))
    mode = "L" if view["input_size"][0] == 1 else "RGB"
    return lambda image: transform(image.convert(mode))
