"""Writing tar shards in the WebDataset layout (data.sources.shards reads them), and indexing shards from elsewhere.

    python scripts/shards.py write /data/imagenet /data/imagenet-shards     # train/ and val/ of an image folder
    python scripts/shards.py write --hf ILSVRC/imagenet-1k /data/in1k-shards  # the splits of a Hugging Face data set
    python scripts/shards.py index /data/some-webdataset                     # shards written by other tools

A write is restartable: run it again with the same arguments after a kill, a crash or a lost node, and it writes
only the shards that are missing, giving the same bytes as a write never stopped. DST/manifest.json records the plan
(settings, classes, each split's file names and labels in shard order) before the first shard, and each shard is
written under a hidden temporary name and renamed when whole, so a shard under its own name is finished; the
temporaries a killed write left are deleted. Run with other arguments, or from a source whose files or labels
changed, the write is refused in one line; --overwrite then deletes the earlier write's shards and starts over.
(A file whose bytes changed under the same name and label is not noticed: use another DST.) Shards are written
by --workers processes, the output not depending on how many; progress and a final line give the images/s.
"""
from __future__ import annotations

import argparse
import ctypes
import io
import os
import resource
import signal
import sys
import tarfile
import time
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
from data.sources.shards import CLASSES, IMAGE_EXTS, INDEX, ShardIndex, build_index, check_index, shard_files
from shard_plan import locked, plan, prepare, remove_temporaries, shard_name


# --- the sources -------------------------------------------------------------------------------------------------

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


def _start_writer(read: Callable[[object], tuple[bytes, str]]) -> None:
    """A writer process's set-up: the split's reader, and (on Linux) its own end when the main process is killed,
    which would otherwise leave it waiting for work forever, holding the output folder's lock."""
    global _read
    _read = read
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the main process died before the prctl
            os._exit(1)


def _write_shard(job: tuple[str, list[tuple[object, str, int]], int, int]) -> int:
    """Write one shard (atomically: under a hidden temporary name, renamed when whole) from [(item, key, label)];
    returns its sample count."""
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


# --- writing -----------------------------------------------------------------------------------------------------

@dataclass
class Written:
    """What one split's write did: images in all, written by this run, in how many seconds, on how many processes,
    using how many CPU-seconds of them (the measure of throughput per core that a busy machine does not skew)."""
    images: int
    shards: int
    written: int = 0
    written_shards: int = 0
    seconds: float = 0.0
    processes: int = 0
    cpu_seconds: float = 0.0

    def line(self, split: str) -> str:
        head = f"{split}: {self.images} images in {self.shards} shards"
        if not self.written_shards:
            return f"{head}, all there already"
        there = self.shards - self.written_shards
        return (f"{head}; wrote {self.written_shards} shards ({self.written} images) in {self.seconds:.1f} s, "
                f"{_rate(self.written, self.seconds, self.processes, self.cpu_seconds)}" +
                (f"; {there} were there" if there else ""))


def _rate(images: int, seconds: float, processes: int, cpu_seconds: float) -> str:
    return (f"{images / max(seconds, 1e-9):.0f} images/s on {processes} process{'es' if processes != 1 else ''}, "
            f"{images / max(cpu_seconds, 1e-9):.0f} images per CPU-second")


def _children_cpu() -> float:
    """CPU-seconds (user and system) of this process's ended and waited-for children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _index_current(out: str) -> bool:
    try:
        check_index(out, ShardIndex.load(os.path.join(out, INDEX)))
        return True
    except DataError:
        return False


def _write_split(split: str, out: str, shards: list[list[tuple[object, str, int]]], source: SplitSource,
                 max_side: int, quality: int, workers: int) -> Written:
    """Write the shards of one split that are not there yet, in parallel processes, then index the split."""
    names = [shard_name(split, n) for n in range(len(shards))]
    remove_temporaries(out, set(names))
    there = set(shard_files(out))
    jobs = [(os.path.join(out, name), samples, max_side, quality)
            for name, samples in zip(names, shards) if name not in there]
    done = Written(sum(map(len, shards)), len(shards), sum(len(job[1]) for job in jobs), len(jobs))
    if jobs:
        done.processes = min(max(1, workers), len(jobs))
        start, cpu = time.perf_counter(), _children_cpu()
        with Pool(done.processes, initializer=_start_writer, initargs=(source.read,)) as pool, \
                tqdm(total=done.images, initial=done.images - done.written, desc=f"writing {out}",
                     unit="image") as bar:
            for count in pool.imap_unordered(_write_shard, jobs):
                bar.update(count)
        done.seconds, done.cpu_seconds = time.perf_counter() - start, _children_cpu() - cpu  # the pool has ended
    if jobs or not _index_current(out):
        build_index(out, workers)
    return done


def _report(dst: str, done: dict[str, Written]) -> None:
    """A line per split, and one in all."""
    for split, written in done.items():
        print(written.line(split))
    images, seconds = sum(w.written for w in done.values()), sum(w.seconds for w in done.values())
    processes, cpu_seconds = max(w.processes for w in done.values()), sum(w.cpu_seconds for w in done.values())
    print(f"wrote {', '.join(f'{w.images} {split}' for split, w in done.items())} images to '{dst}'" +
          (f"; {images} this run in {seconds:.1f} s, {_rate(images, seconds, processes, cpu_seconds)}"
           if images else ", all there already"))


def write_shards(src: str | tuple[dict[str, SplitSource], list[str] | None], dst: str, shard_size: int = 1000,
                 max_side: int = 0, quality: int = 90, workers: int = 1, shuffle: bool = True,
                 overwrite: bool = False) -> dict[str, int]:
    """Shard an image folder's train/ and val/ (or the splits of `src` = (sources, class names), e.g. a hub data
    set's from hf_sources) into dst/<split>/<split>-NNNNNN.tar, index them, write classes.txt.

    With `shuffle`, train samples are spread over the shards in a fixed random order (so a shard mixes classes);
    otherwise, and for val, in the source's order, sample i of the shards being sample i of the source. The same
    input gives byte-identical shards, whatever the number of processes. Restartable: dst/manifest.json records
    the plan before the first shard; a shard is there under its name only once whole, so a write killed at any
    point and run again with the same arguments writes only the missing shards (see prepare for other cases).
    Prints a line per split and one in all with the images/s. Returns the sample count per split.
    """
    sources, classes = folder_sources(src) if isinstance(src, str) else src
    shards, manifest = plan(sources, classes, shard_size, max_side, quality, shuffle)
    with locked(dst):
        prepare(dst, manifest, overwrite)
        done = {split: _write_split(split, os.path.join(dst, split), shards[split], sources[split], max_side,
                                    quality, workers) for split in sources}
        if classes:
            atomic_write(os.path.join(dst, CLASSES), lambda f: f.write("".join(c + "\n" for c in classes)),
                         binary=False)
    _report(dst, done)
    return {split: w.images for split, w in done.items()}


def main(argv: list[str] | None = None) -> None:
    """The command line; a DataError (a missing folder, an unknown split) ends it with one line and exit code 2."""
    parser = argparse.ArgumentParser(prog="python scripts/shards.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="shard an image folder (train/, val/), or a Hugging Face data set "
                                              "(--hf), and index the shards; restartable",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    write.add_argument("--overwrite", action="store_true",
                       help="where DST holds a write with other arguments or from another source (or shards without "
                            "a manifest), delete it and start over instead of refusing")
    index = commands.add_parser("index", help="(re)build ROOT/train/index.npz and ROOT/val/index.npz")
    index.add_argument("root")
    index.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)
    if args.command == "write":
        src = hf_sources(args.src, args.hf_config, args.train_split, args.val_split) if args.hf else args.src
        write_shards(src, args.dst, args.shard_size, args.max_side, args.quality, args.workers,
                     shuffle=not args.keep_order, overwrite=args.overwrite)
        return
    splits = [s for s in ("train", "val") if shard_files(os.path.join(args.root, s))]
    if not splits:
        raise DataError(f"no .tar shards in '{args.root}/train' or '{args.root}/val'")
    for split in splits:
        built = build_index(os.path.join(args.root, split), args.workers)
        print(f"indexed {len(built.label)} {split} samples in {len(built.shards)} shards")


if __name__ == "__main__":
    run_main(main)
