"""The imagenet recipe's per-image work for loader workers: image file in, uint8 (3, 224, 224) out.

    train = JpegTrainDecode()     # the random-resized crop, as timm's train transform draws it
    image = train("/data/train/n01440764/n01440764_10026.JPEG")    # torch.uint8, (3, 224, 224)
    val = JpegEvalDecode()        # resize to 256 + centre crop 224, as timm's eval transform

The train side draws the same crop boxes as timm's
`create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic")`, from
the same random generator, and leaves the rest (flip, RandAugment, normalisation, erasing) to the device, where it
runs on the whole uint8 batch (data.batch_aug). It is faster than timm's per-image path because it
- decodes with libjpeg-turbo into a tensor (torchvision.io.decode_image), with no PIL image and no RGB
  conversion copy;
- crops and resizes a uint8 tensor: torch's antialiased bicubic is PIL's filter to within rounding, and its
  uint8 kernel is several times faster than PIL's;
- keeps uint8 to the end (no ToTensor/Normalize in float: a quarter of the bytes to move).

Unreadable files raise `DataError` naming the file.
"""
from __future__ import annotations

import io
import math
import os
import re

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
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


class JpegTrainDecode:
    """Image (file, bytes or uint8 tensor) -> uint8 (C, size, size): the random-resized crop, resized.

    The crop box is drawn from Python's `random` exactly as timm's transform draws it, so the loader's per-sample
    seeding governs it the same way.

    Args:
        size: output side in pixels.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height).
        interpolation: of the resize: bicubic, bilinear or nearest.
    """

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation: str = "bicubic"):
        self.size, self.scale, self.ratio, self.interpolation = size, scale, ratio, interpolation

    def __call__(self, source: Source) -> torch.Tensor:
        image = load(source)
        box = sample_crop(image.shape[2], image.shape[1], self.scale, self.ratio)
        return resize_crop(image, box, self.size, self.interpolation)


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
