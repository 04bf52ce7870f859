"""RandAugment on a whole uint8 batch, on the batch's device: timm's ops, magnitudes and draws, per image.

    augment = BatchRandAugment("rand-m9-mstd0.5-inc1", fill=(124, 116, 104))
    images = augment(images)            # uint8 (N, C, H, W) in, uint8 out, each image with its own ops

timm parses the config string (`rand_augment_transform`), so every option it knows (m, n, p, mstd, mmax, inc, t)
means the same here. Per image and layer, the op (uniform, or timm's weights), whether it applies (p), the
magnitude noise and the sign of signed ops are drawn as timm draws them; the arguments follow timm's level
functions; each op then reproduces its PIL definition (as timm calls it) on every image of the batch that drew it
(data.augment.pixel_ops):
- point ops (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd): one 256-entry table per image and
  channel, built from per-image histograms where the op needs them (PIL's ImageOps formulas), applied by one gather;
- enhance ops (Color, Contrast, Brightness, Sharpness): PIL's blend of the image with its degenerate (greyscale
  by ITU-R 601-2 in PIL's integer form, the greyscale mean, black, the 3x3 SMOOTH filter), truncated as PIL does;
- geometric ops (Rotate, ShearX/Y, TranslateX/Y): one affine map per image (PIL's matrices, about the centre for
  Rotate), resampled with PIL's bicubic kernel (a = -1, edges repeated, truncation) and the fill colour outside.
Results equal PIL's but for float rounding (the tests bound it per op). The draws come from torch's generator on
the host (`generator`, default the global one), so which images get which op is known without waiting on the device,
and a checkpointed generator state replays them. `plan` turns them on the host into each step's image indices,
arguments and matrices, which travel to the device in one copy that does not wait for it (data.augment.staging); `apply`
then runs the steps there without reading anything back.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence

import torch
from timm.data.auto_augment import rand_augment_transform
from torch import Tensor

from data.augment.pixel_ops import (ENHANCE_KINDS, POINT_KINDS, affine_matrix, enhance_ops, pil_affine,
                                    point_ops)
from data.augment.staging import Staged, Staging

POINT_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "PosterizeOriginal",
             "Solarize", "SolarizeIncreasing", "SolarizeAdd")
ENHANCE_OPS = ("Color", "ColorIncreasing", "Contrast", "ContrastIncreasing", "Brightness", "BrightnessIncreasing",
               "Sharpness", "SharpnessIncreasing")
AFFINE_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "TranslateX", "TranslateY")
# The affine ops by the axis their maps keep on pixel centres (pil_affine's `axis`).
AFFINE_GROUPS = (("x", ("ShearX", "TranslateXRel", "TranslateX")), ("y", ("ShearY", "TranslateYRel", "TranslateY")),
                 (None, ("Rotate",)))
_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude 10 is an op's full strength


def level_args(name: str, magnitude: Tensor, negate: Tensor, translate_pct: float = 0.45) -> Tensor:
    """timm's level_to_arg of op `name` for a float64 tensor of magnitudes; `negate` where timm negates the level.
    TranslateX/Y get the signed fraction of their full shift (affine_matrix scales it by translate_const)."""
    level = magnitude / _DENOM
    sign = torch.where(negate, -1.0, 1.0).double()
    if name == "Rotate":
        return level * 30.0 * sign
    if name in ("ShearX", "ShearY"):
        return level * 0.3 * sign
    if name in ("TranslateXRel", "TranslateYRel"):
        return level * translate_pct * sign
    if name in ("TranslateX", "TranslateY"):
        return level * sign
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return torch.clamp(1.0 + level * 0.9 * sign, min=0.1)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return level * 1.8 + 0.1
    if name == "Posterize":
        return torch.floor(level * 4)
    if name == "PosterizeIncreasing":
        return 4 - torch.floor(level * 4)
    if name == "PosterizeOriginal":
        return torch.floor(level * 4) + 4
    if name == "Solarize":
        return torch.clamp(torch.floor(level * 256), max=256)
    if name == "SolarizeIncreasing":
        return 256 - torch.clamp(torch.floor(level * 256), max=256)
    if name == "SolarizeAdd":
        return torch.clamp(torch.floor(level * 110), max=128)
    return torch.zeros_like(magnitude)  # AutoContrast, Equalize, Invert take no argument


@dataclass
class Draws:
    """One batch's RandAugment draws, host tensors of shape (layers, N)."""
    op: Tensor  # int64 index into the op list
    applied: Tensor  # bool: the op's probability came up
    arg: Tensor  # float64: the op's argument (timm's level_to_arg of the noisy magnitude)


class BatchRandAugment:
    """timm's RandAugment over a uint8 NCHW batch on any device.

    Args:
        config: timm's RandAugment string, e.g. "rand-m9-mstd0.5-inc1".
        fill: colour (one value per channel, 0-255) of what geometric ops uncover; timm uses the mean's.
        translate_const: pixels of TranslateX/Y at magnitude 10; default 45% of the image's width, as timm's
            create_transform sets it.
    """

    def __init__(self, config: str = "rand-m9-mstd0.5-inc1", fill: Sequence[int] = (124, 116, 104),
                 translate_const: Optional[float] = None):
        timm_ra = rand_augment_transform(config, {"img_mean": tuple(fill)})
        ops = timm_ra.ops
        unknown = [op.name for op in ops if op.name not in POINT_OPS + ENHANCE_OPS + AFFINE_OPS]
        if unknown:
            raise ValueError(f"RandAugment '{config}' uses ops the device version does not have: {unknown}; "
                             f"choose ops among {POINT_OPS + ENHANCE_OPS + AFFINE_OPS}")
        self.config, self.names, self.fill = config, [op.name for op in ops], tuple(int(v) for v in fill)
        self.prob, self.magnitude = ops[0].prob, float(ops[0].magnitude)
        self.magnitude_std = ops[0].magnitude_std
        self.magnitude_max = float(ops[0].magnitude_max or _DENOM)
        self.translate_const, self.translate_pct = translate_const, ops[0].hparams.get("translate_pct", 0.45)
        self.num_layers = timm_ra.num_layers
        weights = timm_ra.choice_weights
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r}, fill={self.fill})"

    def draw(self, n: int, generator: Optional[torch.Generator] = None) -> Draws:
        """Per image and layer: which op, whether it applies, its argument; as timm's RandAugment and AugmentOp."""
        layers = self.num_layers
        if self.weights is None:  # timm: uniform choice with replacement
            op = torch.randint(len(self.names), (layers, n), generator=generator)
        else:  # timm: weighted choice of distinct ops per image
            op = torch.multinomial(self.weights.expand(n, -1), layers, replacement=False, generator=generator).t()
        u = torch.rand(3, layers, n, dtype=torch.float64, generator=generator)
        applied = u[0] <= self.prob if self.prob < 1 else torch.ones(layers, n, dtype=torch.bool)
        magnitude = torch.full((layers, n), self.magnitude, dtype=torch.float64)
        if self.magnitude_std == float("inf"):
            magnitude = u[1] * self.magnitude
        elif self.magnitude_std > 0:
            magnitude = magnitude + self.magnitude_std * torch.randn(layers, n, dtype=torch.float64,
                                                                     generator=generator)
        magnitude = magnitude.clamp(0.0, self.magnitude_max)
        negate = u[2] > 0.5
        arg = torch.zeros(layers, n, dtype=torch.float64)
        for k, name in enumerate(self.names):
            chosen = op == k
            if chosen.any():
                arg[chosen] = level_args(name, magnitude[chosen], negate[chosen], self.translate_pct)
        return Draws(op, applied, arg)

    def __call__(self, images: Tensor, generator: Optional[torch.Generator] = None,
                 draws: Optional[Draws] = None) -> Tensor:
        """Args:
            images: uint8 (N, C, H, W), C 1 or 3, any device and memory format; left untouched.
            generator: a CPU torch.Generator for the draws; default torch's global one.
            draws: the draws to apply instead of drawing (tests).
        Returns: uint8 (N, C, H, W) in the input's memory format.
        """
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise TypeError(f"expected a uint8 (N, 1 or 3, H, W) batch, got {images.dtype} {tuple(images.shape)}")
        stage = Staging(images.device)
        steps = self.plan(images.shape, draws if draws is not None else self.draw(len(images), generator), stage)
        stage.send()
        return self.apply(images, steps)

    def plan(self, shape: torch.Size, draws: Draws, stage: Staging) -> list[Step]:
        """The host's half: per layer and op family, which images run it with which parameters, staged for the
        device (`stage.send()` before `apply`)."""
        height, width = shape[-2:]
        fill = stage.add(list(self.fill)[:shape[1]], torch.uint8)
        steps = []
        for layer in range(self.num_layers):
            names = [self.names[k] for k in draws.op[layer].tolist()]
            args = draws.arg[layer].tolist()
            live = [i for i, on in enumerate(draws.applied[layer].tolist()) if on]

            def rows(family: Sequence[str]) -> list[int]:
                return [i for i in live if names[i] in family]
            if point := rows(POINT_OPS):
                steps.append(_point_step(stage, point, [names[i] for i in point], [args[i] for i in point]))
            if enhance := rows(ENHANCE_OPS):
                steps.append(_enhance_step(stage, enhance, [names[i] for i in enhance], [args[i] for i in enhance]))
            for axis, group in AFFINE_GROUPS:  # x-only maps keep the source row on a pixel centre: 4 taps, not 16
                if affine := rows(group):
                    matrices = [affine_matrix(names[i], args[i], width, height, self.translate_const) for i in affine]
                    steps.append(Step(stage.add(affine, torch.long), partial(pil_affine, axis=axis),
                                      {"matrices": stage.add(matrices), "fill": fill}))
        return steps

    @staticmethod
    def apply(images: Tensor, steps: list[Step]) -> Tensor:
        """The device's half: each step on its images, in order; the input is left untouched."""
        if not steps:
            return images
        out = images.contiguous().clone()
        for step in steps:
            index = step.rows.get()
            out[index] = step.run(out[index])
        if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
            return out.contiguous(memory_format=torch.channels_last)
        return out


@dataclass
class Step:
    """One layer's op family on the images that drew it: `fn(images, **params)` with each param on the device
    (None stays None: an op family with no image needing it); plain arguments are bound into `fn`."""
    rows: Staged  # the images' indices in the batch
    fn: Callable[..., Tensor]
    params: dict[str, Optional[Staged]]

    def run(self, images: Tensor) -> Tensor:
        return self.fn(images, **{k: None if v is None else v.get() for k, v in self.params.items()})


def _kind(name: str) -> str:
    return name.removesuffix("Increasing").removesuffix("Original")


def _point_step(stage: Staging, rows: list[int], names: list[str], args: list[float]) -> Step:
    kinds = [POINT_KINDS.index(_kind(name)) for name in names]
    stats = [i for i, k in enumerate(kinds) if POINT_KINDS[k] in ("AutoContrast", "Equalize")]
    return Step(stage.add(rows, torch.long), point_ops, {"kinds": stage.add(kinds, torch.long), "args": stage.add(args),
                                                         "stats": stage.add(stats, torch.long) if stats else None})


def _enhance_step(stage: Staging, rows: list[int], names: list[str], factors: list[float]) -> Step:
    kinds = [ENHANCE_KINDS.index(_kind(name)) for name in names]
    sharp = [i for i, k in enumerate(kinds) if ENHANCE_KINDS[k] == "Sharpness"]
    return Step(stage.add(rows, torch.long), enhance_ops,
                {"kinds": stage.add(kinds, torch.long), "factors": stage.add(factors, torch.float32),
                 "sharp": stage.add(sharp, torch.long) if sharp else None})
