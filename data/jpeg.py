"""The imagenet recipe's per-image work for loader workers: image file in, uint8 (3, 224, 224) out.

    train = JpegTrainDecode()     # random-resized crop + RandAugment, as timm's train transform
    image = train("/data/train/n01440764/n01440764_10026.JPEG")    # torch.uint8, (3, 224, 224)
    val = JpegEvalDecode()        # resize to 256 + centre crop 224, as timm's eval transform

The train side draws the same crop boxes and the same RandAugment ops and magnitudes as timm's
`create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic")`, from
the same random generators in the same order, and leaves out what is cheaper on a whole uint8 batch on the
device: horizontal flip, normalisation and random erasing. It is faster than timm's per-image path because it
- decodes with libjpeg-turbo into a tensor (torchvision.io.decode_image), with no PIL image and no RGB
  conversion copy;
- crops and resizes a uint8 tensor: torch's antialiased bicubic is PIL's filter to within rounding, and its
  uint8 kernel is several times faster than PIL's;
- keeps uint8 to the end (no ToTensor/Normalize in float: a quarter of the bytes to move);
- runs timm's own RandAugment ops on the 224 x 224 PIL image, except that the shears and translations, for
  which PIL runs a slow per-pixel 2-D filter, run as the equivalent 1-D filters (see `shift_rows`).

Where the flip goes: timm flips before RandAugment; by default this leaves the flip to the device, after
RandAugment. Colour ops commute with a flip; a flip turns Rotate, ShearX and TranslateXRel into the same op
with the opposite sign, which timm draws with equal probability, and commutes with TranslateYRel. ShearY is
the exception: PIL shears about the left edge, which a later flip moves to the right, so with the device's
flip about 3% of images (those that draw ShearY and then a flip) get a shear timm never makes. `hflip=0.5`
flips here instead, at timm's place in the order, for an exact match.

Unreadable files raise `DataError` naming the file.
"""
from __future__ import annotations

import io
import math
import os
import re
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, auto_augment
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.io import ImageReadMode, decode_image

from data.checked import DataError

Source = str | os.PathLike | bytes | torch.Tensor  # a file, its bytes, or an already decoded uint8 (C, H, W) image
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


def load(source: Source) -> torch.Tensor:
    """uint8 (C, H, W): a decoded image as it is, a file or its bytes decoded to RGB."""
    if isinstance(source, torch.Tensor):
        return source
    return decode(*read_source(source))


def read_source(source: str | os.PathLike | bytes) -> tuple[torch.Tensor, str]:
    """The file's bytes as a uint8 tensor, and a name for error messages ("<bytes>" when handed bytes)."""
    if isinstance(source, (bytes, bytearray)):
        return torch.frombuffer(bytearray(source), dtype=torch.uint8), "<bytes>"
    try:
        return torch.from_numpy(np.fromfile(source, dtype=np.uint8)), os.fspath(source)
    except OSError as e:
        raise DataError(f"cannot read image '{os.fspath(source)}' ({e.strerror or e})") from None


def decode(data: torch.Tensor, name: str) -> torch.Tensor:
    """Decode file bytes to uint8 (3, H, W) RGB; greyscale and CMYK JPEGs are converted as PIL would.

    JPEG, PNG, WebP and GIF go through torchvision's decoders (a JPEG comes out laid out HWC in memory);
    formats only PIL reads take PIL. Raises DataError naming `name` when neither can read the bytes.
    """
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as e:
        reason = _reason(e)
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    except Image.UnidentifiedImageError:
        if reason.startswith("Unsupported image file"):
            reason = "neither torchvision nor PIL knows its format"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if reason.startswith("Unsupported image file"):  # a format only PIL knows: PIL's word counts
            reason = _reason(e)
    raise DataError(f"cannot decode image '{name}' ({reason})")


def _reason(e: BaseException) -> str:
    """The message of a decoder error, without torchvision's "function, file.cpp:line, " prefix."""
    text = str(e).strip() or type(e).__name__
    return re.sub(r"^.*?\.cpp:\d+, ", "", text.splitlines()[0])


def sample_crop(width: int, height: int, scale: tuple[float, float] = (0.08, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random-resized crop of a width x height image.

    This is timm's own sampler (RandomResizedCropAndInterpolation.get_params) on the full-resolution size, so
    the boxes, and the draws they take from Python's `random`, are exactly timm's.
    """
    size_only = torch.empty(0, height, width)  # all the sampler reads of an image is its size
    return RandomResizedCropAndInterpolation.get_params(size_only, scale, ratio)


def resize(image: torch.Tensor, size: int | list[int], interpolation: str) -> torch.Tensor:
    """uint8 (C, H, W) resized as PIL resizes (antialiased when shrinking, but for nearest): `size` is [h, w], or
    the shorter side's new length."""
    batch = image.unsqueeze(0).contiguous(memory_format=torch.channels_last)  # the layout of torch's uint8 kernels
    mode = TF.InterpolationMode(interpolation)
    return TF.resize(batch, size, mode, antialias=mode != TF.InterpolationMode.NEAREST)[0]


def resize_crop(image: torch.Tensor, box: tuple[int, int, int, int], size: int,
                interpolation: str = "bicubic") -> torch.Tensor:
    """Crop uint8 (C, H, W) to `box` (top, left, height, width) and resize the crop to size x size."""
    top, left, height, width = box
    return resize(image[:, top:top + height, left:left + width], [size, size], interpolation)


def to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 (3, H, W) -> RGB PIL image; (1, H, W) -> greyscale."""
    if image.shape[0] == 1:
        return Image.fromarray(image[0].numpy())
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())


def from_pil(image: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 (C, H, W), a view of an HWC array (stacking a batch copies it anyway)."""
    array = np.array(image)
    return torch.from_numpy(array).unsqueeze(0) if array.ndim == 2 else torch.from_numpy(array).permute(2, 0, 1)


def make_rand_augment(config: str = "rand-m9-mstd0.5-inc1", img_size: int = 224,
                      mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                      interpolation: str = "bicubic") -> Callable[[Image.Image], Image.Image]:
    """timm's RandAugment with the hyper-parameters timm's create_transform gives it, with two changes that
    keep its results: posterize to 0 bits gives black (allow_zero_bit_posterize), and the bicubic shears and
    translations run as 1-D filters (FAST_OPS)."""
    hparams = dict(translate_const=int(img_size * 0.45),
                   img_mean=tuple(min(255, round(255 * m)) for m in mean),
                   interpolation=getattr(Image.Resampling, interpolation.upper()))
    transform = allow_zero_bit_posterize(rand_augment_transform(config, hparams))
    for op in transform.ops:
        op.aug_fn = FAST_OPS.get(op.aug_fn, op.aug_fn)
    return transform


def allow_zero_bit_posterize(transform):
    """timm's RandAugment levels can ask posterize for 0 bits, which Pillow >= 13 rejects with a ValueError (about
    1 image in 500 with rand-m9-mstd0.5-inc1); route those ops through `_posterize`. Takes a RandAugment or a
    transform pipeline holding one (timm's create_transform), and returns it."""
    steps = getattr(transform, "transforms", [transform])
    for op in [op for step in steps for op in getattr(step, "ops", [])]:
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = _posterize
    return transform


def _posterize(image: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)  # keeping no bits leaves black, as Pillow < 13 did
    return auto_augment.posterize(image, bits_to_keep, **kwargs)


class JpegTrainDecode:
    """Image (file, bytes or uint8 tensor) -> uint8 (C, size, size): random-resized crop, resize, flip, RandAugment.

    The crop, the flip and RandAugment draw from Python's `random`, torch's and numpy's global generators exactly
    as timm's transform does, so the loader's per-sample seeding governs them the same way.

    Args:
        size: output side in pixels.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height).
        rand_augment: timm RandAugment config string; "" for none.
        mean: the normalisation mean, whose 8-bit value fills what geometric RandAugment ops uncover.
        interpolation: of the resize and of RandAugment's geometric ops: bicubic, bilinear or nearest.
        hflip: probability of a horizontal flip before RandAugment, at timm's place in the order; 0 leaves
            flipping to the device (BatchAugment), which differs from timm for ShearY only (module docstring).
    """

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), rand_augment: str = "rand-m9-mstd0.5-inc1",
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, interpolation: str = "bicubic", hflip: float = 0.0):
        self.size, self.scale, self.ratio, self.hflip = size, scale, ratio, hflip
        self.interpolation = interpolation
        self.augment = make_rand_augment(rand_augment, size, mean, interpolation) if rand_augment else None

    def __call__(self, source: Source) -> torch.Tensor:
        return self.flip_augment(self.crop(load(source)))

    def crop(self, image: torch.Tensor) -> torch.Tensor:
        """The random-resized crop of a decoded image, at size x size."""
        box = sample_crop(image.shape[2], image.shape[1], self.scale, self.ratio)
        return resize_crop(image, box, self.size, self.interpolation)

    def flip_augment(self, image: torch.Tensor) -> torch.Tensor:
        """The flip (with hflip) and RandAugment of a cropped image."""
        flip = self.hflip > 0 and bool(torch.rand(1) < self.hflip)
        if self.augment is None:
            return image.flip(-1) if flip else image
        pil = to_pil(image)
        if flip:
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # PIL's flip: a fraction of torch's cost here
        augmented = self.augment(pil)
        if augmented is pil and not flip:  # a quarter of the images draw no op: no copy back
            return image
        return from_pil(augmented)


class JpegEvalDecode:
    """Image (file, bytes or uint8 tensor) -> uint8 (C, size, size): resize the shorter side to size / crop_pct
    (antialiased) and keep the centre, as timm's eval transform does before ToTensor.

    Args:
        size: output side in pixels.
        crop_pct: output side / resized shorter side (timm's default 0.875: 224 of 256).
        interpolation: bicubic, bilinear or nearest.
    """

    def __init__(self, size: int = 224, crop_pct: float = 0.875, interpolation: str = "bicubic"):
        self.size, self.interpolation = size, interpolation
        self.scale_size = math.floor(size / crop_pct)

    def __call__(self, source: Source) -> torch.Tensor:
        resized = resize(load(source), self.scale_size, self.interpolation)
        return TF.center_crop(resized, [self.size, self.size])


# --- RandAugment's shears and translations as 1-D filters ----------------------------------------------
# PIL's Image.transform(AFFINE, BICUBIC) maps output pixel (x, y) to the source point
# (a*(x+.5) + b*(y+.5) + c, d*(x+.5) + e*(y+.5) + f). Outside [0, W) x [0, H) it leaves the fill colour;
# inside, it interpolates the 4 x 4 neighbours (edge pixels repeated) with the cubic kernel of a = -1 and
# truncates to uint8. A shear or translation along x keeps the source y on a pixel centre, where that kernel
# is (0, 1, 0, 0): each output row is then a 4-tap filter of the same input row with one fractional offset,
# a few whole-image tensor operations instead of PIL's per-pixel 16-tap loop. The y ops are the x ops on
# the transposed image. Results equal PIL's except that PIL computes in float64 and this in float32, which
# moves about 1 value in 30,000 by 1.

def _rgbx(image: Image.Image) -> torch.Tensor:
    """An RGB image as (H, W) int32, one RGBX pixel per element, so that a gather moves whole pixels."""
    raw = np.frombuffer(image.tobytes("raw", "RGBX"), np.int32)
    with warnings.catch_warnings():  # a read-only buffer, which is only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(raw).view(image.height, image.width)


def _from_rgbx(pixels: torch.Tensor) -> Image.Image:
    height, width = pixels.shape
    return Image.frombytes("RGB", (width, height), pixels.numpy(), "raw", "RGBX")


def shift_rows(pixels: torch.Tensor, offsets: torch.Tensor, fill: Sequence[int]) -> torch.Tensor:
    """Resample each row of (H, W) RGBX `pixels` at x + offsets[y] with PIL's transform kernel.

    Args:
        pixels: (H, W) int32 RGBX pixels.
        offsets: (H,) float64, the source shift of each row in pixels.
        fill: RGB colour for output pixels whose source lies outside the row.

    Returns:
        (H, W) int32 RGBX pixels.
    """
    height, width = pixels.shape
    whole = torch.floor(offsets)
    frac = (offsets - whole).float().view(height, 1)
    columns = (whole.long().view(height, 1) + torch.arange(-1, width + 2)).clamp_(0, width - 1)
    window = torch.gather(pixels, 1, columns).view(torch.uint8).view(height, 4 * (width + 3)).float()
    v1, v2, v3, v4 = (window[:, 4 * k:4 * (k + width)] for k in range(4))
    # PIL's Horner form v2 + d (p2 + d (p3 + d p4)), p2 = v3 - v1, p3 = 2 (v1 - v2) + v3 - v4, p4 = -v1 + v2 - v3 + v4;
    # in place where possible, since every fresh buffer of this size costs page faults.
    a = v1 - v2
    p3 = torch.sub(v3, v4).add_(a, alpha=2)
    p4 = a.sub_(p3)
    value = p4.mul_(frac).add_(p3).mul_(frac)
    value = value.add_(v3).sub_(v1).mul_(frac).add_(v2).clamp_(0, 255)
    out = value.to(torch.int32).to(torch.uint8).view(torch.int32)  # truncation, as PIL's cast; via int32: faster
    source = torch.arange(width, dtype=torch.float64) + 0.5 + offsets.view(height, 1)
    outside = (source < 0) | (source >= width)
    fill_pixel = torch.tensor([*fill, 0], dtype=torch.uint8).view(torch.int32).item()
    return out.view(height, width).masked_fill_(outside, fill_pixel)


def _filter_x(image: Image.Image, offsets: torch.Tensor, fill: Sequence[int]) -> Image.Image:
    return _from_rgbx(shift_rows(_rgbx(image), offsets, fill))


def _filter_y(image: Image.Image, offsets: torch.Tensor, fill: Sequence[int]) -> Image.Image:
    return _from_rgbx(shift_rows(_rgbx(image).t().contiguous(), offsets, fill).t().contiguous())


def _is_bicubic_rgb(image: Image.Image, kwargs: dict) -> bool:
    return image.mode == "RGB" and kwargs.get("resample") == Image.Resampling.BICUBIC


def shear_x(image: Image.Image, factor: float, **kwargs) -> Image.Image:
    """timm's shear_x (source x = x + factor * y, at pixel centres)."""
    if not _is_bicubic_rgb(image, kwargs):
        return auto_augment.shear_x(image, factor, **kwargs)
    centres = torch.arange(image.height, dtype=torch.float64) + 0.5
    return _filter_x(image, factor * centres, kwargs["fillcolor"])


def shear_y(image: Image.Image, factor: float, **kwargs) -> Image.Image:
    """timm's shear_y (source y = y + factor * x, at pixel centres)."""
    if not _is_bicubic_rgb(image, kwargs):
        return auto_augment.shear_y(image, factor, **kwargs)
    centres = torch.arange(image.width, dtype=torch.float64) + 0.5
    return _filter_y(image, factor * centres, kwargs["fillcolor"])


def translate_x_rel(image: Image.Image, pct: float, **kwargs) -> Image.Image:
    """timm's translate_x_rel (source x = x + pct * width)."""
    if not _is_bicubic_rgb(image, kwargs):
        return auto_augment.translate_x_rel(image, pct, **kwargs)
    return _filter_x(image, torch.full((image.height,), pct * image.width, dtype=torch.float64), kwargs["fillcolor"])


def translate_y_rel(image: Image.Image, pct: float, **kwargs) -> Image.Image:
    """timm's translate_y_rel (source y = y + pct * height)."""
    if not _is_bicubic_rgb(image, kwargs):
        return auto_augment.translate_y_rel(image, pct, **kwargs)
    return _filter_y(image, torch.full((image.width,), pct * image.height, dtype=torch.float64), kwargs["fillcolor"])


FAST_OPS: dict[Callable, Callable] = {
    auto_augment.shear_x: shear_x,
    auto_augment.shear_y: shear_y,
    auto_augment.translate_x_rel: translate_x_rel,
    auto_augment.translate_y_rel: translate_y_rel,
}
