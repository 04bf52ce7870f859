"""Tar shards in the WebDataset layout, read by sample index, so exact evaluation and exact resume hold on them.

    python -m data.shards write /data/imagenet /data/imagenet-shards     # train/ and val/ of an image folder
    python -m data.shards index /data/some-webdataset                     # shards written by other tools

Layout: ROOT/train/*.tar and ROOT/val/*.tar, each sample two members, `<key>.jpg` (or .png, .webp, ...) and
`<key>.cls` (its label as decimal text), as WebDataset and timm write them; ROOT/classes.txt (optional) names the
classes, one per line, in label order. ROOT/<split>/index.npz holds, per sample, its shard, the offset and size
of its image bytes and its label; per shard, its size and modification time. A read is then one `pread` on a shard
kept open by the worker (at most `max_open` per worker), and a shard changed since the index was built is caught
at start-up by one stat per shard, instead of walking a million files.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from multiprocessing import Pool
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from core.files import atomic_write
from data.checked import CheckedReads, DataError, check_labels, first_line
from data.file_list import scan
from data.hf_sets import ArrowImages, load_dict, read_splits
from data.jpeg import load

INDEX = "index.npz"
CLASSES = "classes.txt"
IMAGE_EXTS = tuple(ext.lstrip(".") for ext in IMG_EXTENSIONS)  # member extensions read as images: ImageFolder's


def rebuild_hint(split_folder: str) -> str:
    """The way out of a missing or stale index of `split_folder`."""
    return f"rebuild it with 'python -m data.shards index {os.path.dirname(os.path.abspath(split_folder))}'"


@dataclass
class ShardIndex:
    """Where every sample of one split's shards lies."""
    shards: np.ndarray  # file names, sorted
    shard_bytes: np.ndarray  # int64 sizes when indexed
    shard_mtime: np.ndarray  # int64 mtimes (ns) when indexed
    shard: np.ndarray  # int32 per sample: position in `shards`
    offset: np.ndarray  # int64 per sample: where its image bytes start in the shard
    size: np.ndarray  # int64 per sample: how many
    label: np.ndarray  # int64 per sample

    def save(self, path: str) -> None:
        atomic_write(path, lambda f: np.savez(f, **vars(self)))

    @classmethod
    def load(cls, path: str) -> "ShardIndex":
        try:
            with np.load(path, allow_pickle=False) as f:
                return cls(**{name: f[name] for name in cls.__dataclass_fields__})
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"cannot read the shard index '{path}' ({first_line(e)}); "
                            f"{rebuild_hint(os.path.dirname(path))}") from None


def shard_files(folder: str) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".tar")) if os.path.isdir(folder) else []


# --- indexing ----------------------------------------------------------------------------------------------------

def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's key and extension: the extension starts at the first dot of the file name."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower()


def index_shard(path: str) -> tuple[list[tuple[int, int, int]], int, int]:
    """([(offset, size, label)] in member order, file size, mtime) of one shard; DataError naming the shard and
    member for a truncated shard, an image without a label, or a label that is not an integer."""
    stat = os.stat(path)
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > stat.st_size:
                    raise tarfile.ReadError(f"member '{member.name}' runs past the end of the file")
                key, ext = _split_name(member.name)
                if ext == "cls":
                    text = tar.extractfile(member).read().decode(errors="replace").strip()
                    if not text.lstrip("-").isdigit():
                        raise DataError(f"'{path}': member '{member.name}' holds {text[:20]!r}, not an integer "
                                        f"label; rewrite the shard")
                    labels[key] = int(text)
                elif ext in IMAGE_EXTS:
                    images[key] = (member.offset_data, member.size)
    except (tarfile.TarError, EOFError) as e:
        raise DataError(f"'{path}' is not a readable tar shard ({first_line(e)}); it may be truncated: write it "
                        f"again") from None
    missing = [key for key in images if key not in labels]
    if missing:
        raise DataError(f"'{path}': image '{missing[0]}' ({len(missing)} in all) has no '.cls' label member; "
                        f"write the shard with one per image")
    return [(*images[key], labels[key]) for key in images], stat.st_size, stat.st_mtime_ns


def build_index(folder: str, workers: int = 1, progress: bool = True) -> ShardIndex:
    """Index every shard of a split folder (in parallel) and save it as `folder`/index.npz."""
    names = shard_files(folder)
    if not names:
        raise DataError(f"no .tar shards in '{folder}'; write them with 'python -m data.shards write SRC DST'")
    paths = [os.path.join(folder, name) for name in names]
    with Pool(max(1, workers)) as pool:
        results = list(tqdm(pool.imap(index_shard, paths), total=len(paths), desc=f"indexing {folder}",
                            unit="shard", disable=not progress))
    rows = [(s, *row) for s, (members, _, _) in enumerate(results) for row in members]
    columns = np.array(rows, dtype=np.int64).reshape(-1, 4).T
    index = ShardIndex(np.array(names), np.array([r[1] for r in results], dtype=np.int64),
                       np.array([r[2] for r in results], dtype=np.int64), columns[0].astype(np.int32),
                       columns[1], columns[2], columns[3])
    index.save(os.path.join(folder, INDEX))
    return index


def check_index(folder: str, index: ShardIndex) -> None:
    """DataError unless the shards in `folder` are the ones indexed, unchanged (one stat per shard)."""
    way_out = rebuild_hint(folder)
    index_path = os.path.join(folder, INDEX)
    present = shard_files(folder)
    if present != list(index.shards):
        extra = sorted(set(present) - set(index.shards))[:3]
        gone = sorted(set(index.shards) - set(present))[:3]
        raise DataError(f"the index '{index_path}' is stale: shards added {extra}, gone {gone}; {way_out}")
    for name, size, mtime in zip(index.shards, index.shard_bytes, index.shard_mtime):
        stat = os.stat(os.path.join(folder, name))
        if (stat.st_size, stat.st_mtime_ns) != (size, mtime):
            what = f"now {stat.st_size} bytes, indexed {size}" if stat.st_size != size else "modified"
            raise DataError(f"the index '{index_path}' is stale: '{name}' changed since it was built ({what}); "
                            f"{way_out}")


# --- reading -----------------------------------------------------------------------------------------------------

class ShardImages(Dataset, CheckedReads):
    """One split's shards as a map-style data set of (image, label).

    `loader` turns a member's bytes into an image (uint8 CHW tensor by default; a recipe sets its decoder).
    Unreadable members name their shard and member, or (skip_corrupt) are skipped and counted.

    Args:
        folder: the split's folder of .tar shards and their index.npz.
        skip_corrupt: skip unreadable images (None in their place) instead of stopping.
        max_open: shards each process keeps open, least recently used closed first.
    """

    def __init__(self, folder: str, skip_corrupt: bool = False, max_open: int = 8):
        CheckedReads.__init__(self, skip_corrupt)
        self.folder, self.max_open = folder, max_open
        index_path = os.path.join(folder, INDEX)
        if not os.path.isfile(index_path):
            what = "no .tar shards" if not shard_files(folder) else f"no index '{index_path}'"
            raise DataError(f"{what} in '{folder}'; data.name=shards needs data.root to hold train/ and val/ "
                            f"folders of shards, with an index: {rebuild_hint(folder)}")
        self.index = ShardIndex.load(index_path)
        check_index(folder, self.index)
        self.loader: Callable[[bytes], object] = load
        self._files: OrderedDict[int, int] = OrderedDict()  # shard -> fd, this process's
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index.label)

    def __getitem__(self, i: int) -> tuple[object, int] | None:
        shard, offset, size = int(self.index.shard[i]), int(self.index.offset[i]), int(self.index.size[i])
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise DataError(f"'{self.member_name(shard, offset)}' ends early: the shard was truncated after "
                            f"indexing; write it again")
        image = self.checked(lambda: self.loader(data), lambda: self.member_name(shard, offset))
        return None if image is None else (image, int(self.index.label[i]))

    def narrow(self, keep: np.ndarray, relabel: Sequence[int] | None) -> "ShardImages":
        """Only the samples at `keep`, labels mapped through `relabel` when given (data.classes, train_limit)."""
        for column in ("shard", "offset", "size", "label"):
            setattr(self.index, column, getattr(self.index, column)[keep])
        if relabel is not None:
            self.index.label = np.asarray(relabel)[self.index.label]
        return self

    @property
    def targets(self) -> list[int]:
        """The labels in sample order, as ImageFolder has them."""
        return self.index.label.tolist()

    def member_name(self, shard: int, offset: int) -> str:
        """'<shard>:<member>' from the tar header before the member's data (for messages)."""
        header = os.pread(self._fd(shard), 512, offset - 512)
        name = header[:100].split(b"\0")[0].decode(errors="replace")
        prefix = header[345:500].split(b"\0")[0].decode(errors="replace")
        return f"{self._path(shard)}:{prefix + '/' + name if prefix else name}"

    def _path(self, shard: int) -> str:
        return os.path.join(self.folder, str(self.index.shards[shard]))

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a loader worker: descriptors are per process
            self._files, self._pid = OrderedDict(), os.getpid()
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        if len(self._files) >= self.max_open:
            os.close(self._files.popitem(last=False)[1])
        self._files[shard] = os.open(self._path(shard), os.O_RDONLY)
        return self._files[shard]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": OrderedDict()}  # a spawned worker opens its own


def read_classes(root: str) -> list[str] | None:
    path = os.path.join(root, CLASSES)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def check_shard_labels(split: ShardImages, num_classes: int, way_out: str) -> None:
    """DataError naming the member of a sample whose label is outside 0..num_classes-1."""
    index = split.index
    check_labels(index.label, num_classes, lambda i: split.member_name(int(index.shard[i]), int(index.offset[i])),
                 way_out)


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
    """The two splits of a Hugging Face data set (data.hf_sets) that become train/ and val/ (whichever it has), and
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
    set's from data.hf_sets.shard_sources) into dst/<split>/<split>-NNNNNN.tar, index them, write classes.txt.

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
    parser = argparse.ArgumentParser(prog="python -m data.shards", description=__doc__,
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
    try:
        if args.command == "write":
            src = (hf_sources(args.src, args.hf_config, args.train_split, args.val_split) if args.hf
                   else args.src)
            counts = write_shards(src, args.dst, args.shard_size, args.max_side, args.quality, args.workers,
                                  shuffle=not args.keep_order)
            print(f"wrote {', '.join(f'{n} {split}' for split, n in counts.items())} images to '{args.dst}'")
        else:
            splits = [s for s in ("train", "val") if shard_files(os.path.join(args.root, s))]
            if not splits:
                raise DataError(f"no .tar shards in '{args.root}/train' or '{args.root}/val'")
            for split in splits:
                built = build_index(os.path.join(args.root, split), args.workers)
                print(f"indexed {len(built.label)} {split} samples in {len(built.shards)} shards")
    except DataError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
