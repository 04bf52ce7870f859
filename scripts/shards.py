"""Writing tar shards in the WebDataset layout (data.sources.shards reads them), and indexing shards from elsewhere.

    python scripts/shards.py write /data/imagenet /data/imagenet-shards     # train/ and val/ of an image folder
    python scripts/shards.py write --hf ILSVRC/imagenet-1k /data/in1k-shards  # the splits of a Hugging Face data set
    python scripts/shards.py index /data/some-webdataset                     # shards written by other tools
"""
from __future__ import annotations

import argparse
import io
import os
import random
import tarfile
from dataclasses import dataclass
from functools import partial
from multiprocessing import Pool
from typing import Callable

from PIL import Image
from tqdm import tqdm

from core.cli import run_main
from core.files import atomic_write
from data.sources.base import DataError, first_line
from data.sources.file_list import scan
from data.sources.hub import ArrowImages, load_dict, read_splits
from data.sources.shards import CLASSES, IMAGE_EXTS, build_index, shard_files


# --- writing -----------------------------------------------------------------------------------------------------

def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    """A tar member that depends on its name and bytes alone (no time, owner or mode of the source file)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
    return info, io.BytesIO(data)


@dataclass
class SplitSource:
    """What one split's shards are written from: the samples, and how a writer process reads one."""
    samples: list[tuple[object, str, int]]  # (what `read` takes, member key, label), in sample order
    read: Callable[[object], tuple[bytes, str]]  # item -> (image bytes, member extension); picklable


def file_bytes(path: str) -> tuple[bytes, str]:
    """An image file's bytes and member extension."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    with open(path, "rb") as f:
        return f.read(), "jpg" if ext == "jpeg" else ext


def folder_sources(src: str) -> tuple[dict[str, SplitSource], list[str]]:
    """The train/ and val/ splits of an image folder (whichever are there), and its classes."""
    folders = {split: os.path.join(src, split) for split in ("train", "val") if os.path.isdir(os.path.join(src, split))}
    if not folders:
        raise DataError(f"'{src}' has neither train/ nor val/; point the writer at an image folder's root")
    listings = {split: scan(folder, progress=True) for split, folder in folders.items()}
    classes = [listing.classes for listing in listings.values()]
    if classes[0] != classes[-1]:  # labels are positions in the class list, so both splits need the same one
        raise DataError(f"class folders differ between '{folders['train']}' ({len(classes[0])}) and "
                        f"'{folders['val']}' ({len(classes[-1])}); give both the same class sub-folders")
    return {split: SplitSource([(path, _key(folders[split], path), label) for path, label in listing.samples],
                               file_bytes) for split, listing in listings.items()}, classes[0]


def hf_sources(name: str, config: str = "", train_split: str = "train",
               val_split: str = "validation") -> tuple[dict[str, SplitSource], list[str] | None]:
    """The two splits of a Hugging Face data set (data.sources.hub) that become train/ and val/ (whichever it has), and
    its class names (None where its labels are plain integers). Members are keyed by row."""
    splits = load_dict(name, config)
    present = {role: split for role, split in (("train", train_split), ("val", val_split)) if split in splits}
    if not present:
        raise DataError(f"data set '{name}' has neither split '{train_split}' nor '{val_split}' (it has: "
                        f"{', '.join(splits)}); name them with --train-split and --val-split")
    read, names = read_splits(splits, name, present)
    return {role: SplitSource([(row, f"{row:09d}", int(label)) for row, label in enumerate(images.labels)],
                              partial(_arrow_member, images.images)) for role, images in read.items()}, names


def _arrow_member(images: ArrowImages, row: int) -> tuple[bytes, str]:
    """Row `row`'s image bytes, and the member extension of their format."""
    data = bytes(images[row])
    try:
        with Image.open(io.BytesIO(data)) as image:
            ext = (image.format or "").lower()
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image '{images.row_name(row)}' ({first_line(e)}); fix or drop that row") \
            from None
    ext = {"jpeg": "jpg", "mpo": "jpg", "tiff": "tif"}.get(ext, ext)
    if ext not in IMAGE_EXTS:
        raise DataError(f"'{images.row_name(row)}' is a {ext or 'unknown'} image, which the shard reader does not "
                        f"take ({', '.join(IMAGE_EXTS)}); convert that row")
    return data, ext


def _resized(data: bytes, ext: str, max_side: int, quality: int) -> tuple[bytes, str]:
    """With max_side, an image whose shorter side is longer re-encoded to JPEG with the shorter side at max_side."""
    if max_side <= 0:
        return data, ext
    with Image.open(io.BytesIO(data)) as image:
        if min(image.size) <= max_side:
            return data, ext
        scale = max_side / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        small = image.convert("RGB").resize(size, Image.BICUBIC)
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=quality)
    return out.getvalue(), "jpg"


_read: Callable[[object], tuple[bytes, str]] = file_bytes  # the split's reader, set once in each writer process


def _set_reader(read: Callable[[object], tuple[bytes, str]]) -> None:
    global _read
    _read = read


def _write_shard(job: tuple[str, list[tuple[object, str, int]], int, int]) -> int:
    """Write one shard (atomically) from [(item, key, label)]; returns its sample count."""
    path, samples, max_side, quality = job

    def write(f) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for item, key, label in samples:
                data, ext = _resized(*_read(item), max_side, quality)
                tar.addfile(*_member(f"{key}.{ext}", data))
                tar.addfile(*_member(f"{key}.cls", f"{label}\n".encode()))

    atomic_write(path, write)
    return len(samples)


def _key(folder: str, path: str) -> str:
    """A WebDataset key from the file's path in its split: dots would start the extension, so they become '_'."""
    return os.path.relpath(path, folder).replace(".", "_")


def _shard_jobs(split: str, samples: list[tuple[object, str, int]], out: str, shard_size: int, max_side: int,
                quality: int, shuffle: bool) -> list[tuple[str, list[tuple[object, str, int]], int, int]]:
    """The _write_shard jobs of one split; DataError when `out` holds shards these would not replace."""
    if split == "train" and shuffle:
        samples = list(samples)
        random.Random(0).shuffle(samples)
    jobs = [(os.path.join(out, f"{split}-{n:06d}.tar"), samples[start:start + shard_size], max_side, quality)
            for n, start in enumerate(range(0, len(samples), shard_size))]
    others = sorted(set(shard_files(out)) - {os.path.basename(job[0]) for job in jobs})
    if others:
        raise DataError(f"'{out}' already holds other shards ({others[0]}, ...), which the index would mix "
                        f"in; write to an empty folder")
    return jobs


def write_shards(src: str | tuple[dict[str, SplitSource], list[str] | None], dst: str, shard_size: int = 1000,
                 max_side: int = 0, quality: int = 90, workers: int = 1, shuffle: bool = True) -> dict[str, int]:
    """Shard an image folder's train/ and val/ (or the splits of `src` = (sources, class names), e.g. a hub data
    set's from hf_sources) into dst/<split>/<split>-NNNNNN.tar, index them, write classes.txt.

    With `shuffle`, train samples are spread over the shards in a fixed random order (so a shard mixes classes);
    otherwise, and for val, in the source's order, sample i of the shards being sample i of the source. The same
    input gives byte-identical shards. Everything is checked before anything is written. Returns the sample count
    per split.
    """
    sources, classes = folder_sources(src) if isinstance(src, str) else src
    jobs = {split: _shard_jobs(split, source.samples, os.path.join(dst, split), shard_size, max_side, quality,
                               shuffle) for split, source in sources.items()}
    for split, split_jobs in jobs.items():
        out = os.path.join(dst, split)
        with Pool(max(1, workers), initializer=_set_reader, initargs=(sources[split].read,)) as pool:
            with tqdm(total=len(sources[split].samples), desc=f"writing {out}", unit="image") as bar:
                for count in pool.imap_unordered(_write_shard, split_jobs):
                    bar.update(count)
        build_index(out, workers)
    if classes:
        atomic_write(os.path.join(dst, CLASSES), lambda f: f.write("".join(c + "\n" for c in classes)), binary=False)
    return {split: len(source.samples) for split, source in sources.items()}


def main(argv: list[str] | None = None) -> None:
    """The command line; a DataError (a missing folder, an unknown split) ends it with one line and exit code 2."""
    parser = argparse.ArgumentParser(prog="python scripts/shards.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="shard an image folder (train/, val/), or a Hugging Face data set "
                                              "(--hf), and index the shards")
    write.add_argument("src", help="an image folder's root; with --hf, a hub id or a folder of parquet or save_to_disk")
    write.add_argument("dst")
    write.add_argument("--hf", action="store_true", help="SRC is a Hugging Face data set (data.name=hf)")
    write.add_argument("--hf-config", default="", help="its configuration")
    write.add_argument("--train-split", default="train", help="its split written as train/")
    write.add_argument("--val-split", default="validation", help="its split written as val/")
    write.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    write.add_argument("--max-side", type=int, default=0,
                       help="re-encode images whose shorter side is longer to this many px (0: keep the bytes)")
    write.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    write.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    write.add_argument("--keep-order", action="store_true",
                       help="train samples in the folder's order rather than mixed over the shards")
    index = commands.add_parser("index", help="(re)build ROOT/train/index.npz and ROOT/val/index.npz")
    index.add_argument("root")
    index.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)
    if args.command == "write":
        src = hf_sources(args.src, args.hf_config, args.train_split, args.val_split) if args.hf else args.src
        counts = write_shards(src, args.dst, args.shard_size, args.max_side, args.quality, args.workers,
                              shuffle=not args.keep_order)
        print(f"wrote {', '.join(f'{n} {split}' for split, n in counts.items())} images to '{args.dst}'")
        return
    splits = [s for s in ("train", "val") if shard_files(os.path.join(args.root, s))]
    if not splits:
        raise DataError(f"no .tar shards in '{args.root}/train' or '{args.root}/val'")
    for split in splits:
        built = build_index(os.path.join(args.root, split), args.workers)
        print(f"indexed {len(built.label)} {split} samples in {len(built.shards)} shards")


if __name__ == "__main__":
    run_main(main)
