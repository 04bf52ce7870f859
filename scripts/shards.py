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
import fcntl
import hashlib
import io
import json
import os
import random
import resource
import signal
import sys
import tarfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from multiprocessing import Pool
from typing import Callable, Iterator

from PIL import Image
from tqdm import tqdm

from core.cli import run_main
from core.files import atomic_write
from data.sources.base import DataError, first_line
from data.sources.file_list import scan
from data.sources.hub import ArrowImages, load_dict, read_splits
from data.sources.shards import CLASSES, IMAGE_EXTS, INDEX, ShardIndex, build_index, check_index, shard_files


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


# --- the plan, and resuming it -----------------------------------------------------------------------------------

MANIFEST = "manifest.json"  # in DST: the plan of a write, written before its first shard
WRITER_VERSION = 1  # raise when the same plan would give other bytes


def _shard_name(split: str, n: int) -> str:
    return f"{split}-{n:06d}.tar"


def _plan(sources: dict[str, SplitSource], classes: list[str] | None, shard_size: int, max_side: int,
          quality: int, shuffle: bool) -> tuple[dict[str, list[list[tuple[object, str, int]]]], dict]:
    """({split: each shard's samples}, the manifest): what every shard holds, and a digest of all that decides
    the output's bytes (settings, classes, each split's keys and labels in shard order)."""
    if shard_size < 1:
        raise DataError(f"--shard-size is {shard_size}; give it at least 1 image per shard")
    shards, splits = {}, {}
    for split, source in sources.items():
        samples = source.samples
        if split == "train" and shuffle:
            samples = list(samples)
            random.Random(0).shuffle(samples)
        shards[split] = [samples[start:start + shard_size] for start in range(0, len(samples), shard_size)]
        digest = hashlib.sha256()
        for _, key, label in samples:
            digest.update(f"{key}\t{label}\n".encode())
        splits[split] = {"images": len(samples), "shards": len(shards[split]), "samples_sha256": digest.hexdigest()}
    settings = {"writer": WRITER_VERSION, "shard_size": shard_size, "max_side": max_side,
                "quality": quality if max_side > 0 else None, "shuffle": shuffle}
    classes_digest = hashlib.sha256("".join(c + "\n" for c in classes).encode()).hexdigest() if classes else None
    return shards, {"settings": settings, "classes_sha256": classes_digest, "splits": splits}


def _difference(old: dict, new: dict) -> str:
    """What differs between two manifests, in words."""
    settings, splits = old.get("settings", {}), old.get("splits", {})
    for name, value in new["settings"].items():
        if settings.get(name) != value:
            return f"{name} {settings.get(name)} then, {value} now"
    for split in sorted(set(splits) | set(new["splits"])):
        then, now = splits.get(split), new["splits"].get(split)
        if then != now:
            images = [planned["images"] if planned else "no" for planned in (then, now)]
            return (f"{images[0]} {split} images then, {images[1]} now" if images[0] != images[1] else
                    f"the source's {split} file names or labels")
    return "the source's classes"


def _planned(manifest: dict | None) -> dict[str, set[str]]:
    """The shard names of each split that a manifest plans."""
    return {split: {_shard_name(split, n) for n in range(planned["shards"])}
            for split, planned in (manifest or {}).get("splits", {}).items()}


def _read_manifest(dst: str) -> dict | None:
    path = os.path.join(dst, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read '{path}' ({first_line(e)}); add --overwrite to start the write over") from None


def _prepare(dst: str, manifest: dict, overwrite: bool) -> None:
    """Make `dst` ready for the planned write. The same plan resumes; another plan's write, or planned shards
    without a manifest, are refused in one line naming the way out, or with `overwrite` removed first; shards that
    neither plan names are refused, as the index would mix them in."""
    old = _read_manifest(dst)
    new_names, old_names = _planned(manifest), _planned(old)
    for split, names in new_names.items():
        others = sorted(set(shard_files(os.path.join(dst, split))) - names - old_names.get(split, set()))
        if others:
            raise DataError(f"'{os.path.join(dst, split)}' already holds other shards ({others[0]}, ...), which the "
                            f"index would mix in; write to an empty folder")
    if old == manifest:
        return
    if not overwrite and old is not None:
        raise DataError(f"'{dst}' holds a write with other arguments or from another source "
                        f"({_difference(old, manifest)}); rerun it with its own arguments to finish it, or add "
                        f"--overwrite to start over")
    present = {split: sorted(set(shard_files(os.path.join(dst, split))) & names) for split, names in new_names.items()}
    if not overwrite and any(present.values()):
        first = next(os.path.join(split, names[0]) for split, names in present.items() if names)
        raise DataError(f"'{dst}' holds shards without a {MANIFEST} (from another tool or an older writer: {first}, "
                        f"...); write to an empty folder, or add --overwrite to replace them")
    for split in set(old_names) | set(present):
        out = os.path.join(dst, split)
        for name in sorted(set(present.get(split, [])) | old_names.get(split, set()) | {INDEX}):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    atomic_write(os.path.join(dst, MANIFEST), lambda f: json.dump(manifest, f, indent=1, sort_keys=True),
                 binary=False)


def _remove_temporaries(out: str, names: set[str]) -> None:
    """Delete the half-written shards (atomic_write's hidden '.<name>.<random>.tmp') that a killed writer left."""
    for entry in os.listdir(out) if os.path.isdir(out) else []:
        if entry.startswith(".") and entry.endswith(".tmp") and entry[1:].rsplit(".", 2)[0] in names:
            os.remove(os.path.join(out, entry))


@contextmanager
def _locked(dst: str) -> Iterator[None]:
    """Hold `dst`'s lock (created when missing): one writer at a time, as two would delete each other's work."""
    os.makedirs(dst, exist_ok=True)
    fd = os.open(dst, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"another writer is writing to '{dst}' (its processes hold the folder's lock); wait for "
                            f"it to end, or end it") from None
        yield
    finally:
        os.close(fd)


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
    names = [_shard_name(split, n) for n in range(len(shards))]
    _remove_temporaries(out, set(names))
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
    point and run again with the same arguments writes only the missing shards (see _prepare for other cases).
    Prints a line per split and one in all with the images/s. Returns the sample count per split.
    """
    sources, classes = folder_sources(src) if isinstance(src, str) else src
    shards, manifest = _plan(sources, classes, shard_size, max_side, quality, shuffle)
    with _locked(dst):
        _prepare(dst, manifest, overwrite)
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
