"""RandAugment on a whole uint8 batch, on the batch's device: timm's ops, magnitudes and draws, per image.

    augment = BatchRandAugment("rand-m9-mstd0.5-inc1", fill=(124, 116, 104))
    images = augment(images)            # uint8 (N, C, H, W) in, uint8 out, each image with its own ops

timm parses the config string (`rand_augment_transform`), so every option it knows (m, n, p, mstd, mmax, inc, t)
means the same here. Per image and layer, the op (uniform, or timm's weights), whether it applies (p), the
magnitude noise and the sign of signed ops are drawn as timm draws them; the arguments follow timm's level
functions; each op then reproduces its PIL definition (as timm calls it) on every image of the batch that drew it:
- point ops (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd): one 256-entry table per image and
  channel, built from per-image histograms where the op needs them (PIL's ImageOps formulas), applied by one gather;
- enhance ops (Color, Contrast, Brightness, Sharpness): PIL's blend of the image with its degenerate (greyscale
  by ITU-R 601-2 in PIL's integer form, the greyscale mean, black, the 3x3 SMOOTH filter), truncated as PIL does;
- geometric ops (Rotate, ShearX/Y, TranslateX/Y): one affine map per image (PIL's matrices, about the centre for
  Rotate), resampled with PIL's bicubic kernel (a = -1, edges repeated, truncation) and the fill colour outside.
Results equal PIL's but for float rounding (the tests bound it per op). The draws come from torch's generator on
the host (`generator`, default the global one), so which images get which op is known without waiting on the device,
and a checkpointed generator state replays them. `plan` turns them on the host into each step's image indices,
arguments and matrices, which travel to the device in one copy that does not wait for it (data.staging); `apply`
then runs the steps there without reading anything back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image
from timm.data import auto_augment
from timm.data.auto_augment import rand_augment_transform
from torch import Tensor

from data.staging import Staged, Staging, wide_dtype

POINT_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "PosterizeOriginal",
             "Solarize", "SolarizeIncreasing", "SolarizeAdd")
ENHANCE_OPS = ("Color", "ColorIncreasing", "Contrast", "ContrastIncreasing", "Brightness", "BrightnessIncreasing",
               "Sharpness", "SharpnessIncreasing")
AFFINE_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "TranslateX", "TranslateY")
POINT_KINDS = ("Invert", "Posterize", "Solarize", "SolarizeAdd", "AutoContrast", "Equalize")  # ops less suffixes
ENHANCE_KINDS = ("Color", "Contrast", "Brightness", "Sharpness")
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
                    steps.append(Step(stage.add(affine, torch.long), pil_affine,
                                      {"matrices": stage.add(matrices), "fill": fill, "axis": axis}))
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
    """One layer's op family on the images that drew it: `fn(images, **params)`, the Staged params on the device."""
    rows: Staged  # the images' indices in the batch
    fn: Callable[..., Tensor]
    params: dict[str, Any]

    def run(self, images: Tensor) -> Tensor:
        return self.fn(images, **{k: v.get() if isinstance(v, Staged) else v for k, v in self.params.items()})


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


# --- point ops: a table per image and channel ---------------------------------------------------------------

def histograms(images: Tensor, by_sorting: Optional[bool] = None) -> Tensor:
    """(N, C, 256) int64 pixel counts of uint8 (N, C, H, W) images.

    On the CPU one bincount; on an accelerator (by_sorting, default there) each channel sorted and cut at every
    level, because bincount reads its output's size back from the device (a wait) and scatter_add_ is not
    deterministic on CUDA.
    """
    n, c = images.shape[:2]
    flat = images.reshape(n * c, -1)
    if not (by_sorting if by_sorting is not None else images.device.type != "cpu"):
        offsets = torch.arange(n * c, device=images.device).view(n * c, 1) * 256
        return torch.bincount((flat.long() + offsets).view(-1), minlength=n * c * 256).view(n, c, 256)
    ordered = flat.sort(dim=1).values.int()
    levels = torch.arange(257, device=images.device, dtype=torch.int32).expand(n * c, 257).contiguous()
    below = torch.searchsorted(ordered, levels)  # pixels under each level
    return (below[:, 1:] - below[:, :-1]).view(n, c, 256)


def autocontrast_lut(hist: Tensor) -> Tensor:
    """PIL's ImageOps.autocontrast (no cutoff) per channel: lowest and highest present values to 0 and 255."""
    present = hist > 0
    levels = torch.arange(256, device=hist.device)
    lo = torch.where(present, levels, 256).amin(-1, keepdim=True)
    hi = torch.where(present, levels, -1).amax(-1, keepdim=True)
    scale = 255.0 / (hi - lo).clamp(min=1).to(wide_dtype(hist.device))
    stretched = torch.trunc(levels * scale - lo * scale).clamp(0, 255).long()  # int() of ix * scale + offset
    return torch.where(hi > lo, stretched, levels)


def equalize_lut(hist: Tensor) -> Tensor:
    """PIL's ImageOps.equalize per channel: each level to (step // 2 + pixels below it) // step."""
    levels = torch.arange(256, device=hist.device).expand_as(hist)
    last = torch.where(hist > 0, levels, -1).amax(-1, keepdim=True)  # the highest present level
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, last.clamp(min=0))) // 255
    below = torch.cumsum(hist, -1) - hist
    mapped = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)  # PIL clips the table to 8 bits
    flat = ((hist > 0).sum(-1, keepdim=True) <= 1) | (step == 0)
    return torch.where(flat, levels, mapped)


def point_ops(images: Tensor, kinds: Tensor, args: Tensor, stats: Optional[Tensor]) -> Tensor:
    """Invert, Posterize, Solarize, SolarizeAdd, AutoContrast or Equalize, one per image, as one table lookup.

    Args:
        images: uint8 (N, C, H, W).
        kinds: (N,) int64 indices into POINT_KINDS.
        args: (N,) float64 arguments (level_args').
        stats: int64 indices of the images whose op needs their histograms (AutoContrast, Equalize); None: none.
    """
    n, c = images.shape[:2]
    levels = torch.arange(256, device=images.device)
    arg = args.view(n, 1, 1)
    lut = levels.repeat(n, c, 1)

    def rows(kind: str) -> Tensor:
        return (kinds == POINT_KINDS.index(kind)).view(n, 1, 1)

    bits = arg.clamp(0, 8).long()
    lut = torch.where(rows("Invert"), 255 - levels, lut)
    lut = torch.where(rows("Posterize"), levels & (256 - (1 << (8 - bits))), lut)  # keep the top `bits` bits
    lut = torch.where(rows("Solarize"), torch.where(levels >= arg, 255 - levels, levels), lut)
    lut = torch.where(rows("SolarizeAdd"), torch.where(levels < 128, (levels + arg.long()).clamp(max=255), levels), lut)
    if stats is not None:
        hist = histograms(images[stats])
        lut[stats] = torch.where(rows("AutoContrast")[stats], autocontrast_lut(hist), equalize_lut(hist))
    flat = images.reshape(n, c, -1).long()
    return lut.to(torch.uint8).gather(2, flat).view_as(images)


# --- enhance ops: PIL's blend with a degenerate image ----------------------------------------------------------

def greyscale(images: Tensor) -> Tensor:
    """(N, 1, H, W) int32: PIL's RGB -> L, (19595 R + 38470 G + 7471 B + 2^15) >> 16; L images as they are."""
    x = images.int()
    if images.shape[1] == 1:
        return x
    return (x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 0x8000) >> 16


def smooth(images: Tensor) -> Tensor:
    """PIL's filter(SMOOTH) as float32: the 3x3 kernel rounded to 8 bits inside, the border pixels kept."""
    n, c, h, w = images.shape
    x = images.float()
    kernel = torch.ones(c, 1, 3, 3, device=images.device)  # PIL's ImageFilter.SMOOTH, made where it is used
    kernel[:, :, 1, 1] = 5.0
    kernel /= 13
    inner = torch.nn.functional.conv2d(x, kernel, groups=c)
    out = x.clone()
    out[:, :, 1:h - 1, 1:w - 1] = torch.floor(inner + 0.5).clamp(0, 255)
    return out


def enhance_ops(images: Tensor, kinds: Tensor, factors: Tensor, sharp: Optional[Tensor]) -> Tensor:
    """Color, Contrast, Brightness or Sharpness, one per image: PIL's Image.blend(degenerate, image, factor).

    Args:
        images: uint8 (N, C, H, W).
        kinds: (N,) int64 indices into ENHANCE_KINDS.
        factors: (N,) float32 blend factors (level_args').
        sharp: int64 indices of the Sharpness images; None: none.
    """
    n = images.shape[0]
    x = images.float()
    grey = greyscale(images)
    contrast = torch.floor(grey.to(wide_dtype(images.device)).mean((1, 2, 3)) + 0.5)  # int(mean + .5)

    def rows(kind: str) -> Tensor:
        return (kinds == ENHANCE_KINDS.index(kind)).view(n, 1, 1, 1)

    degenerate = grey.float().expand_as(x).clone()
    degenerate = torch.where(rows("Contrast"), contrast.float().view(n, 1, 1, 1), degenerate)
    degenerate = torch.where(rows("Brightness"), 0.0, degenerate)
    if sharp is not None:
        degenerate[sharp] = smooth(images[sharp])
    f = factors.view(n, 1, 1, 1)
    return torch.floor(degenerate + f * (x - degenerate)).clamp_(0, 255).to(torch.uint8)  # (UINT8) of the float


# --- geometric ops: PIL's affine transform with its bicubic kernel ------------------------------------------

def affine_matrix(name: str, arg: float, width: int, height: int,
                  translate_const: Optional[float] = None) -> tuple[float, ...]:
    """The (a, b, c, d, e, f) that timm hands PIL's Image.transform(AFFINE) for op `name` (output -> source);
    `arg` is level_args' (TranslateX/Y: the fraction of translate_const pixels, default 45% of the width, as timm's
    create_transform sets it)."""
    if name in ("TranslateX", "TranslateY"):
        arg *= translate_const if translate_const is not None else int(0.45 * width)
    if name == "ShearX":
        m = (1.0, arg, 0.0, 0.0, 1.0, 0.0)
    elif name == "ShearY":
        m = (1.0, 0.0, 0.0, arg, 1.0, 0.0)
    elif name in ("TranslateXRel", "TranslateX"):
        m = (1.0, 0.0, arg * width if name == "TranslateXRel" else arg, 0.0, 1.0, 0.0)
    elif name in ("TranslateYRel", "TranslateY"):
        m = (1.0, 0.0, 0.0, 0.0, 1.0, arg * height if name == "TranslateYRel" else arg)
    else:  # Rotate: PIL's Image.rotate about the centre, expand=False
        angle = -math.radians(arg % 360.0)
        cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
        cx, cy = width / 2, height / 2
        m = (cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)
    return m


def _cubic(v1: Tensor, v2: Tensor, v3: Tensor, v4: Tensor, d: Tensor) -> Tensor:
    """PIL's bicubic in Horner form (a = -1): v2 + d (p2 + d (p3 + d p4))."""
    p2 = v3 - v1
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = v2 - v1 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def pil_affine(images: Tensor, matrices: Tensor, fill: Tensor, axis: Optional[str] = None) -> Tensor:
    """PIL's Image.transform(size, AFFINE, matrix, BICUBIC, fillcolor=fill) per image.

    Output pixel (x, y) samples the source at (a (x + .5) + b (y + .5) + c, d (x + .5) + e (y + .5) + f); a source
    point outside the image leaves the fill colour; inside, the 4 x 4 neighbours (edges repeated) are combined
    along x, then y, with PIL's kernel, and the result clipped and truncated to 8 bits.

    Args:
        images: uint8 (N, C, H, W).
        matrices: (N, 6) float64 (float32 on MPS) on the images' device.
        fill: (C,) uint8 on the images' device.
        axis: "x" where every map keeps source rows on pixel centres (shears and shifts along x), "y" where it
            keeps columns so; the interpolation along the other axis is then skipped.
    """
    n, c, h, w = images.shape
    dev = images.device
    ys = torch.arange(h, device=dev, dtype=wide_dtype(dev)).view(1, h, 1) + 0.5
    xs = torch.arange(w, device=dev, dtype=wide_dtype(dev)).view(1, 1, w) + 0.5
    a, b, cc, d, e, f = (matrices[:, k].view(n, 1, 1) for k in range(6))
    sx, sy = a * xs + b * ys + cc, d * xs + e * ys + f  # (N, H, W) source points
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    x0, y0 = torch.floor(sx - 0.5), torch.floor(sy - 0.5)
    dx, dy = (sx - 0.5 - x0).float().unsqueeze(1), (sy - 0.5 - y0).float().unsqueeze(1)
    x0, y0 = x0.long(), y0.long()
    flat = images.reshape(n, c, h * w).float()

    def tap(row: Tensor, col: Tensor) -> Tensor:
        return flat.gather(2, (row * w + col).view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)

    cols = [(x0 + k).clamp(0, w - 1) for k in (-1, 0, 1, 2)]
    rows = [(y0 + k).clamp(0, h - 1) for k in (-1, 0, 1, 2)]
    if axis == "x":
        value = _cubic(*[tap(rows[1], col) for col in cols], dx)
    elif axis == "y":
        value = _cubic(*[tap(row, cols[1]) for row in rows], dy)
    else:
        value = _cubic(*[_cubic(*[tap(row, col) for col in cols], dx) for row in rows], dy)
    value = value.clamp_(0, 255).to(torch.uint8)  # truncation, as PIL's cast
    return torch.where(inside.unsqueeze(1), value, fill.view(1, c, 1, 1))


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
