"""An ImageNet-like JPEG ImageFolder made on the spot, for tests and loader benchmarks without ImageNet.

    paths = make_jpeg_testbed("/tmp/bed", num_images=500, num_classes=10)
    # /tmp/bed/train/c0000/0000000.JPEG, ... ; ImageFolder("/tmp/bed/train") reads it

What makes it stand in for ImageNet where decoding and augmentation costs are concerned:
- sizes: the long side is 500 px for most images (500x375, 375x500, 500x333, 500x500, ...), some are
  smaller (long side 160-499 px) and some larger (501-1000 px); about 2% are greyscale, as in ImageNet;
- content: a 1/f amplitude spectrum (the statistics of natural images) with strongly correlated colour
  channels, plus a few objects with edges of their own, lit by a soft gradient and with a little sensor
  noise, so that JPEG sizes, equalisation and the other RandAugment ops behave as on photos;
- files: baseline JPEG with 4:2:0 chroma subsampling at quality 90, about 110 KB on average.

Every image depends only on (seed, its index), so the output is byte-identical for the same arguments
(given the same numpy and Pillow builds), whichever worker process made it.
"""
from __future__ import annotations

import io
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from core.cli import run_main
from core.errors import UserError

# Chroma fields are weaker than luminance: RGB channels of photos correlate at about 0.9.
_OPPONENT_TO_RGB = np.array([[1.0, 0.8, 0.4],
                             [1.0, -0.2, 0.4],
                             [1.0, -0.6, -0.9]], dtype=np.float32)
_CHROMA_GAIN = np.array([1.0, 0.22, 0.18], dtype=np.float32)
_GREY_FRACTION = 0.02
_SPECTRUM_SLOPE = 1.0  # amplitude ~ 1/f^slope
_NOISE_STD = 3.0  # sensor noise in 8-bit units; sets how much fine detail the JPEG must keep


def make_jpeg_testbed(root: str, num_images: int, num_classes: int, seed: int = 0, quality: int = 90,
                      split: str = "train", workers: int | None = None) -> list[str]:
    """Write `num_images` JPEGs as an ImageFolder `root/<split>/<class>/<index>.JPEG` and return their paths.

    Image i belongs to class i % num_classes (folders c0000, c0001, ...); each class has a colour cast of
    its own so a model can learn something from the set.

    Args:
        root: folder to write into; created if missing, existing files of the same names are overwritten.
        num_images: how many images in all.
        num_classes: how many class folders (at most num_images, so that none is empty).
        seed: selects the images; the same seed gives byte-identical files.
        quality: JPEG quality (ImageNet's photos are mostly around 90).
        split: the sub-folder of `root`, e.g. "train" or "val".
        workers: processes to encode with; by default up to the CPU count, one for small sets.

    Returns:
        The paths written, in index order.
    """
    if not 1 <= num_classes <= num_images:
        raise UserError(f"need 1 <= classes <= images, got {num_classes} classes for {num_images} images; ask "
                        f"for fewer classes or more images")
    folder = os.path.join(root, split)
    for label in range(num_classes):
        os.makedirs(os.path.join(folder, _class_name(label)), exist_ok=True)
    jobs = [(folder, index, index % num_classes, seed, quality) for index in range(num_images)]
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if num_images >= 32 else 1
    if workers <= 1:
        return [_write_image(*job) for job in jobs]
    # fork: the children need nothing but this module, and spawn would re-import the caller's main module.
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(_write_image, *zip(*jobs), chunksize=8))


def testbed_image(index: int, label: int, seed: int = 0) -> Image.Image:
    """Image `index` of the test bed made with `seed`, as a PIL image (RGB, or L for the greyscale ones)."""
    rng = np.random.default_rng([seed, index])
    width, height = _image_size(rng)
    pixels = _scene(rng, height, width, _class_tint(seed, label))
    if rng.random() < _GREY_FRACTION:
        return Image.fromarray(pixels).convert("L")
    return Image.fromarray(pixels)


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    """`image` encoded as a baseline JPEG with 4:2:0 chroma subsampling, the way most photos are stored."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling="4:2:0")
    return buffer.getvalue()


def folder_as_parquet(root: str, out: str, rows_per_file: int = 500) -> dict[str, int]:
    """The image folder root/train and root/val written as a Hugging Face hub data set (data.name=hf) would be
    stored: out/data/<split>-NNNNN-of-NNNNN.parquet with val named `validation`, a column `image` (struct of the
    file's bytes and name) and an int64 `label`, the features (Image, ClassLabel of the class folders) as JSON under
    the schema metadata key `huggingface`. Rows are in the folder's sample order (ImageFolder's), so row i is image
    i of the folder. Written with pyarrow alone (installed with `datasets`). Returns the row count per split."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.sources.file_list import scan

    counts = {}
    for split, hub_split in (("train", "train"), ("val", "validation")):
        if not os.path.isdir(os.path.join(root, split)):
            continue
        listing = scan(os.path.join(root, split))
        features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": listing.classes}}
        metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
        parts = [listing.samples[i:i + rows_per_file] for i in range(0, len(listing.samples), rows_per_file)]
        os.makedirs(os.path.join(out, "data"), exist_ok=True)
        for n, part in enumerate(parts):
            images = []
            for path, _ in part:
                with open(path, "rb") as f:
                    images.append({"bytes": f.read(), "path": os.path.basename(path)})
            table = pa.table({"image": images, "label": pa.array([label for _, label in part], pa.int64())})
            pq.write_table(table.replace_schema_metadata(metadata),
                           os.path.join(out, "data", f"{hub_split}-{n:05d}-of-{len(parts):05d}.parquet"))
        counts[split] = len(listing.samples)
    return counts


def _class_name(label: int) -> str:
    return f"c{label:04d}"


def _write_image(folder: str, index: int, label: int, seed: int, quality: int) -> str:
    path = os.path.join(folder, _class_name(label), f"{index:07d}.JPEG")
    with open(path, "wb") as f:
        f.write(jpeg_bytes(testbed_image(index, label, seed), quality))
    return path


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) drawn to resemble ImageNet's: long side mostly 500, aspect mostly 4:3 or 3:2."""
    group = rng.random()
    if group < 0.65:
        long_side = 500
    elif group < 0.87:
        long_side = int(rng.integers(160, 500))
    else:
        long_side = int(rng.integers(501, 1001))
    aspect = rng.choice([4 / 3, 3 / 2, 1.0, rng.uniform(1.0, 1.8)], p=[0.55, 0.2, 0.1, 0.15])
    short_side = max(100, round(long_side / aspect))
    return (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)


def _class_tint(seed: int, label: int) -> np.ndarray:
    """A per-class shift of the opponent-colour means, the learnable signal of the set."""
    return np.random.default_rng([seed, 1 << 40, label]).normal(0.0, [8.0, 10.0, 10.0]).astype(np.float32)


def _pink_fields(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Three independent (height, width) fields with a 1/f^slope amplitude spectrum and random phases, each
    with zero mean and unit standard deviation."""
    fy = np.fft.fftfreq(height).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(width).astype(np.float32)[None, :]
    frequency = np.sqrt(fx * fx + fy * fy)
    frequency[0, 0] = np.inf  # no DC term: the mean colour is set separately
    amplitude = frequency ** -_SPECTRUM_SLOPE
    phase = rng.random((3, height, width // 2 + 1), np.float32) * np.float32(2 * np.pi)
    spectrum = np.empty(phase.shape, np.complex64)  # filled part by part: np.exp of complex is far slower
    spectrum.real = amplitude * np.cos(phase)
    spectrum.imag = amplitude * np.sin(phase)
    fields = np.fft.irfft2(spectrum, s=(height, width)).astype(np.float32)
    return fields / fields.std(axis=(1, 2), keepdims=True)


def _to_rgb(opponent: np.ndarray) -> np.ndarray:
    """(3, H, W) luminance/chroma fields -> (H, W, 3) RGB, still float."""
    return np.einsum("ij,jhw->hwi", _OPPONENT_TO_RGB, opponent)


def _scene(rng: np.random.Generator, height: int, width: int, tint: np.ndarray) -> np.ndarray:
    """A background texture with a few textured objects in front and soft lighting, as (H, W, 3) uint8.

    The objects reuse the background's fields at a random offset (np.roll), which decorrelates them from
    what lies behind at a fraction of the cost of fields of their own.
    """
    fields = _pink_fields(rng, height, width)
    image = _to_rgb(_textured(rng, fields, tint))
    for _ in range(int(rng.integers(2, 7))):
        rows, cols, mask = _object_mask(rng, height, width)
        shifted = np.roll(fields, (int(rng.integers(height)), int(rng.integers(width))), axis=(1, 2))
        texture = _to_rgb(_textured(rng, shifted[:, rows, cols], tint))
        image[rows, cols] += mask[..., None] * (texture - image[rows, cols])
    image *= _lighting(rng, height, width)[..., None]
    noise = rng.random(image.shape, np.float32) - np.float32(0.5)  # uniform: as good as Gaussian here, faster
    image += np.float32(_NOISE_STD * 12 ** 0.5) * noise
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def _textured(rng: np.random.Generator, fields: np.ndarray, tint: np.ndarray) -> np.ndarray:
    """Opponent-colour fields around a random mean colour, with a random contrast."""
    mean = np.array([rng.uniform(70, 170), rng.normal(0, 18), rng.normal(0, 18)], np.float32) + tint
    contrast = rng.uniform(25, 60) * _CHROMA_GAIN
    return mean[:, None, None] + contrast[:, None, None] * fields


def _object_mask(rng: np.random.Generator, height: int, width: int) -> tuple[slice, slice, np.ndarray]:
    """An ellipse, rectangle or polygon somewhere in the frame, as the rows and columns of its bounding box
    and a soft-edged float mask in [0, 1] over that box."""
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    rx, ry = rng.uniform(0.05, 0.35) * width, rng.uniform(0.05, 0.35) * height
    blur = float(rng.uniform(0.5, 2.5))  # edges from sharp to slightly out of focus
    margin = int(3 * blur) + 2
    left, top = max(0, int(cx - rx) - margin), max(0, int(cy - ry) - margin)
    right, bottom = min(width, int(cx + rx) + margin + 1), min(height, int(cy + ry) + margin + 1)
    mask = Image.new("L", (right - left, bottom - top), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = cx - left, cy - top
    kind = rng.integers(3)
    if kind == 0:
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    elif kind == 1:
        draw.rectangle((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    else:
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 9))))
        radii = rng.uniform(0.4, 1.0, len(angles))
        draw.polygon([(float(cx + rx * r * np.cos(a)), float(cy + ry * r * np.sin(a)))
                      for a, r in zip(angles, radii)], fill=255)
    soft = np.asarray(mask.filter(ImageFilter.GaussianBlur(blur)), np.float32) / 255.0
    return slice(top, bottom), slice(left, right), soft


def _lighting(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A gentle linear brightness gradient across the frame (gain between about 0.75 and 1.25)."""
    angle = rng.uniform(0, 2 * np.pi)
    ys = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None]
    xs = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]
    return 1.0 + rng.uniform(0.0, 0.5) * (np.cos(angle) * xs + np.sin(angle) * ys)


def main(argv: list[str] | None = None) -> None:
    """python scripts/testbed.py ROOT [--train N] [--val N] [--classes K]: write a test bed with train/ and val/."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", help="folder to write train/ and val/ into")
    parser.add_argument("--train", type=int, default=1000, help="training images")
    parser.add_argument("--val", type=int, default=100, help="validation images")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--links", type=int, default=1,
                        help="names per image: K > 1 adds K-1 hard links to each training image, a tree of many files "
                             "(for start-up timing) at the disk cost of few")
    parser.add_argument("--parquet", default="",
                        help="also write the test bed as a Hugging Face data set of parquet files in this folder")
    args = parser.parse_args(argv)
    try:
        write_testbed(args)
    except OSError as e:
        raise UserError(f"cannot write the test bed under '{args.root}' ({e.strerror or e}); choose a folder you can "
                        f"write to") from None


def write_testbed(args) -> None:
    """The images main's arguments ask for, each split's count and size printed."""
    import itertools

    for split, count, seed in (("train", args.train, args.seed), ("val", args.val, args.seed + 1)):
        paths = make_jpeg_testbed(args.root, count, args.classes, seed=seed, split=split)
        if split == "train":
            for path, k in itertools.product(paths, range(1, args.links)):
                os.link(path, f"{path[:-len('.JPEG')]}-{k}.JPEG")
        sizes = [os.path.getsize(path) for path in paths]
        print(f"{split}: {len(paths)} JPEGs in {os.path.join(args.root, split)}, {sum(sizes) / len(sizes) / 1e3:.1f} KB "
              f"on average")
    if args.parquet:
        counts = folder_as_parquet(args.root, args.parquet)
        print(f"the same as parquet (data.name=hf data.hf_name={args.parquet}): "
              f"{', '.join(f'{n} {split}' for split, n in counts.items())} rows")


if __name__ == "__main__":
    run_main(main)
