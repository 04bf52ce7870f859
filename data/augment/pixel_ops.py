"""RandAugment's ops as PIL defines them, vectorised over a uint8 batch on its device, each image with its own op
arguments: point ops by lookup table, enhance ops by PIL's blend with a degenerate image, geometric ops by PIL's affine
transform with its bicubic kernel. data.augment.rand_augment draws which image gets which op and calls these."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from data.augment.staging import wide_dtype

POINT_KINDS = ("Invert", "Posterize", "Solarize", "SolarizeAdd", "AutoContrast", "Equalize")  # ops less suffixes
ENHANCE_KINDS = ("Color", "Contrast", "Brightness", "Sharpness")


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
