"""The imagenet recipe's per-image work for loader workers: image file in, uint8 (3, 224, 224) out.

    train = JpegTrainDecode()     # the random-resized crop, as timm's train transform draws it
    image = train("/data/train/n01440764/n01440764_10026.JPEG")    # torch.uint8, (3, 224, 224)
    val = JpegEvalDecode()        # resize to 256 + centre crop 224 as timm's eval transform; also squash, border

The train side draws the same crop boxes as timm's
`create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic")`, from
the same random generator, and leaves the rest (flip, RandAugment, normalisation, erasing) to the device, where it
runs on the whole uint8 batch (data.augment.batch). It is faster than timm's per-image path because it
- decodes only the crop's rows and columns, with libjpeg-turbo straight into a tensor (data.decoding.jpeg_region: the
  same pixels as a whole decode's crop), with no PIL image and no RGB conversion copy;
- crops and resizes a uint8 tensor: torch's antialiased bicubic is PIL's filter to within rounding, and its
  uint8 kernel is several times faster than PIL's;
- keeps uint8 to the end (no ToTensor/Normalize in float: a quarter of the bytes to move).

Unreadable files raise `DataError` naming the file, and so do hostile ones, at little cost: a header claiming more
pixels than the limit (data.max_image_pixels) or than the file's bytes can hold is refused before anything is
allocated (`check_claim`), and libjpeg stops at the first corrupt-data warning (data.decoding.jpeg_region).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
from typing import Iterator

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

import data.decoding.jpeg_region as jpeg_region
from core.errors import DataError

Source = str | os.PathLike | bytes | torch.Tensor  # a file, its bytes, or an already decoded uint8 (C, H, W) image
PILLOW_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what Pillow raises on bad bytes


def load(source: Source, max_pixels: int | None = None) -> torch.Tensor:
    """uint8 (C, H, W): a decoded image as it is, a file or its bytes decoded to RGB (max_pixels: as `decode`)."""
    if isinstance(source, torch.Tensor):
        return source
    return decode(*read_source(source), max_pixels=max_pixels)


def read_source(source: str | os.PathLike | bytes) -> tuple[np.ndarray, str]:
    """The file's bytes as a uint8 array, and a name for error messages ("<bytes>" when handed bytes)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return np.frombuffer(source, dtype=np.uint8), "<bytes>"
    try:
        return np.fromfile(source, dtype=np.uint8), os.fspath(source)
    except OSError as e:
        raise DataError(f"cannot read image '{os.fspath(source)}' ({e.strerror or e})") from None


def decode(data: np.ndarray, name: str, box: tuple[int, int, int, int] | None = None,
           min_side: int = 0, max_pixels: int | None = None) -> torch.Tensor:
    """File bytes to uint8 (3, H, W) RGB, or only the box (top, left, height, width) of the image; with min_side > 0
    a JPEG's box may come out at 1/2, 1/4 or 1/8 scale, still at least min_side on both sides (jpeg_region.decode).

    JPEGs go through libjpeg-turbo (data.decoding.jpeg_region), which decodes only the rows and columns the box
    needs and gives the same pixels as a whole decode's crop; greyscale and CMYK come out as PIL converts them. Other
    formats, and JPEGs where the library is not built, take Pillow. Raises DataError naming `name` for unreadable bytes,
    and, before anything is allocated, for a header claiming more than max_pixels pixels (None: Pillow's limit; 0:
    none) or more than the file's bytes can hold (`check_claim`).
    """
    if region_decodable(data):
        try:
            if box is None or not _ends_whole(data):  # without its end marker: decoded to the end, where a cut shows
                width, height = check_claim(jpeg_region.size(data), data, name, max_pixels)
                full = jpeg_region.decode(data, (0, 0, height, width))
                return full if box is None else _crop(full, box)
            return jpeg_region.decode(data, box, min_side)
        except jpeg_region.RegionError as e:
            raise DataError(f"cannot decode image '{name}' ({e})") from None
    try:
        with open_checked(data, name, max_pixels) as image:
            full = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    except PILLOW_ERRORS as e:
        raise DataError(f"cannot decode image '{name}' ({_reason(e)})") from None
    return full if box is None else _crop(full, box)


def image_size(data: np.ndarray, name: str, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding it; checked as `decode` checks it."""
    try:
        if region_decodable(data):
            return check_claim(jpeg_region.size(data), data, name, max_pixels)
        with open_checked(data, name, max_pixels) as image:
            return image.size
    except (jpeg_region.RegionError, *PILLOW_ERRORS) as e:
        raise DataError(f"cannot decode image '{name}' ({_reason(e)})") from None


@contextlib.contextmanager
def open_checked(data: np.ndarray, name: str, max_pixels: int | None) -> Iterator[Image.Image]:
    """The image Pillow opens from `data` (its header read, nothing decoded), once `check_claim` passes its size.

    Pillow's own limit (Image.MAX_IMAGE_PIXELS, a module setting) is off while it opens the file, so that max_pixels
    alone decides, above Pillow's limit as below it; a loader worker opens one image at a time. Pillow stops at the
    end of the data (a truncated file is an error unless ImageFile.LOAD_TRUNCATED_IMAGES is set), but it does not
    report libjpeg's corrupt-data warnings: a JPEG whose scan ends early at a marker is filled to its claimed size, so
    the claim's check on the file's bytes is what bounds it here.
    """
    limit = pillows_limit() if max_pixels is None else max_pixels
    pillows, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        image = Image.open(io.BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = pillows
    with image:
        check_claim(image.size, data, name, limit)
        yield image


def pillows_limit() -> int:
    """The most pixels Pillow decodes (twice Image.MAX_IMAGE_PIXELS: DecompressionBombError above); 0: none."""
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 0


# Frame headers of arithmetic-coded JPEGs: a code may take less than a bit there, so their bytes bound no size.
ARITHMETIC_FRAMES = (0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
FRAMES = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, *ARITHMETIC_FRAMES)


def check_claim(size: tuple[int, int], data: np.ndarray, name: str, max_pixels: int | None) -> tuple[int, int]:
    """`size` (width, height) from a header, or DataError where decoding it would cost more than a file can ask:

    - more pixels than max_pixels (None: Pillow's limit, `pillows_limit`; 0: no limit): a corrupt header or a
      decompression bomb, which libjpeg and Pillow would allocate whole before finding the data gone;
    - for a Huffman-coded JPEG, fewer bytes than its blocks need: every 8 x 8 block of the full-resolution component
      takes at least one bit (a code is never shorter), so a file of under width x height / 512 bytes cannot hold
      the image; a progressive decode would allocate and clear the whole image's coefficients before finding that.
    """
    width, height = size
    limit = pillows_limit() if max_pixels is None else max_pixels
    if limit and width * height > limit:
        raise DataError(f"image '{name}' claims {width} x {height} pixels, over the {limit:,} a decode may allocate "
                        f"(data.max_image_pixels): a corrupt header or a decompression bomb; remove the file, raise "
                        f"data.max_image_pixels, or skip such files with data.skip_corrupt=true")
    if width * height // 512 > len(data) and _huffman_coded(data):
        raise DataError(f"image '{name}' claims {width} x {height} pixels, more than its {len(data):,} bytes can hold "
                        f"(a truncated or corrupt JPEG); remove the file, or skip such files with "
                        f"data.skip_corrupt=true")
    return size


def _huffman_coded(data: np.ndarray) -> bool:
    """The file is a JPEG whose frame header (the first, walking the segments) is a Huffman-coded one."""
    at = 2
    while jpeg_region.is_jpeg(data) and at + 4 <= len(data) and data[at] == 0xFF:
        marker = int(data[at + 1])
        if marker in FRAMES:
            return marker not in ARITHMETIC_FRAMES
        at += 2 + (int(data[at + 2]) << 8 | int(data[at + 3]))
    return False


def _reason(e: BaseException) -> str:
    if isinstance(e, Image.UnidentifiedImageError):
        return "not a format libjpeg or Pillow reads"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def region_decodable(data: np.ndarray) -> bool:
    return jpeg_region.is_jpeg(data) and jpeg_region.available()


def _ends_whole(data: np.ndarray) -> bool:
    """The file ends with JPEG's end-of-image marker (a truncated one does not)."""
    return len(data) > 2 and data[-2] == 0xFF and data[-1] == 0xD9


def _crop(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    top, left, height, width = box
    return image[:, top:top + height, left:left + width]


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
    return resize(_crop(image, box), [size, size], interpolation)


class JpegTrainDecode:
    """Image (file, bytes or uint8 tensor) -> uint8 (C, size, size): the random-resized crop, resized.

    The crop box is drawn from Python's `random` exactly as timm's transform draws it, so the loader's per-sample
    seeding governs it the same way.

    Args:
        size: output side in pixels.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height).
        interpolation: of the resize: bicubic, bilinear or nearest.
        dct_scaling: let libjpeg decode a crop of at least twice `size` at 1/2, 1/4 or 1/8 scale; faster, and the
            pixels differ from a full-scale decode's by that resampling.
        max_pixels: refuse a file whose header claims more pixels (None: Pillow's limit; 0: none), `check_claim`.
    """

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation: str = "bicubic",
                 dct_scaling: bool = False, max_pixels: int | None = None):
        self.size, self.scale, self.ratio, self.interpolation = size, scale, ratio, interpolation
        self.min_side = size if dct_scaling else 0
        self.max_pixels = max_pixels

    def __call__(self, source: Source) -> torch.Tensor:
        if isinstance(source, torch.Tensor):  # already decoded
            box = sample_crop(source.shape[2], source.shape[1], self.scale, self.ratio)
            return resize_crop(source, box, self.size, self.interpolation)
        data, name = read_source(source)
        box = sample_crop(*image_size(data, name, self.max_pixels), self.scale, self.ratio)
        return resize(decode(data, name, box, self.min_side, self.max_pixels), [self.size, self.size],
                      self.interpolation)


class JpegEvalDecode:
    """Image (file, bytes or uint8 tensor) -> uint8 (C, size, size): timm's eval view, before its ToTensor
    (timm.data.transforms_factory.transforms_imagenet_eval), for each of its crop modes. With scale = floor(size /
    crop_pct):

    - center: the shorter side resized to scale (aspect kept), the centre size x size kept;
    - squash: both sides resized to scale (aspect not kept), the centre kept; at crop_pct 1 the whole image, as the
      official ConvNeXt code evaluates at 384 px;
    - border: the longer side resized to scale (aspect kept), padded with `fill` to size x size where short (the
      centre kept where long): at crop_pct 1 the whole image, letterboxed.

    Args:
        size: output side in pixels.
        crop_pct: output side / resized side (timm's default 0.875: 224 of 256).
        interpolation: bicubic, bilinear or nearest.
        crop_mode: center, squash or border.
        fill: border's padding, one uint8 value per channel (timm: the normalisation mean x 255, rounded).
        max_pixels: refuse a file whose header claims more pixels (None: Pillow's limit; 0: none), `check_claim`.
    """

    def __init__(self, size: int = 224, crop_pct: float = 0.875, interpolation: str = "bicubic",
                 crop_mode: str = "center", fill: tuple[int, ...] = (124, 116, 104), max_pixels: int | None = None):
        if crop_mode not in ("center", "squash", "border"):
            raise ValueError(f"crop_mode is center, squash or border, not {crop_mode!r}")
        self.size, self.interpolation, self.crop_mode, self.fill = size, interpolation, crop_mode, fill
        self.scale_size = math.floor(size / crop_pct)
        self.max_pixels = max_pixels

    def __call__(self, source: Source) -> torch.Tensor:
        image, scale = load(source, self.max_pixels), self.scale_size
        if self.crop_mode == "squash":
            return TF.center_crop(resize_in_pillows_order(image, [scale, scale], self.interpolation),
                                  [self.size, self.size])
        if self.crop_mode == "border":
            fitted = resize(image, longer_side_to(image.shape[1], image.shape[2], scale), self.interpolation)
            return centre_crop_or_pad(fitted, self.size, self.fill)
        return TF.center_crop(resize(image, scale, self.interpolation), [self.size, self.size])


def resize_in_pillows_order(image: torch.Tensor, size: list[int], interpolation: str) -> torch.Tensor:
    """uint8 (C, H, W) resized to `size` [h, w] as `resize`, but with its two passes in Pillow's order where the width
    grows and the height shrinks: Pillow then resamples the height first, torch's kernel the width first, and the
    two orders round and clip the overshoot of the widened rows differently (by several levels at edges). Where
    both sides shrink by different factors the orders can differ too, and are left to torch."""
    height, width = image.shape[1:]
    if size[1] > width and size[0] < height:
        image = resize(image, [size[0], width], interpolation)
    return resize(image, size, interpolation)


def longer_side_to(height: int, width: int, side: int) -> list[int]:
    """[h, w] of a height x width image scaled so that its longer side is `side`, rounded as timm's ResizeKeepRatio
    (longest=1) rounds."""
    ratio = max(height / side, width / side)
    return [round(height / ratio), round(width / ratio)]


def centre_crop_or_pad(image: torch.Tensor, size: int, fill: tuple[int, ...]) -> torch.Tensor:
    """uint8 (C, H, W) -> (C, size, size): padded with `fill` on the short sides (the odd pixel after, as timm's
    center_crop_or_pad places it), then the centre kept where a side is longer."""
    channels, height, width = image.shape
    if height < size or width < size:
        colour = torch.tensor(fill, dtype=image.dtype)[:channels].view(-1, 1, 1)
        canvas = colour.expand(channels, max(height, size), max(width, size)).clone()
        top, left = max(size - height, 0) // 2, max(size - width, 0) // 2
        canvas[:, top:top + height, left:left + width] = image
        image = canvas
    return TF.center_crop(image, [size, size])
