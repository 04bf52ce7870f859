"""The plan of a shard write (scripts/shards.py) and resuming it: what every shard holds, the manifest that records
it in DST before the first shard, and the checks that let a rerun with the same arguments finish a killed write while
refusing, in one line, a write that would mix with another."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from core.files import atomic_write
from data.sources.base import DataError, first_line
from data.sources.shards import INDEX, shard_files

if TYPE_CHECKING:
    from shards import SplitSource

MANIFEST = "manifest.json"  # in DST: the plan of a write, written before its first shard
WRITER_VERSION = 1  # raise when the same plan would give other bytes


def shard_name(split: str, n: int) -> str:
    return f"{split}-{n:06d}.tar"


def plan(sources: dict[str, SplitSource], classes: list[str] | None, shard_size: int, max_side: int,
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


def difference(old: dict, new: dict) -> str:
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


def planned(manifest: dict | None) -> dict[str, set[str]]:
    """The shard names of each split that a manifest plans."""
    return {split: {shard_name(split, n) for n in range(planned["shards"])}
            for split, planned in (manifest or {}).get("splits", {}).items()}


def read_manifest(dst: str) -> dict | None:
    path = os.path.join(dst, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read '{path}' ({first_line(e)}); add --overwrite to start the write over") from None


def prepare(dst: str, manifest: dict, overwrite: bool) -> None:
    """Make `dst` ready for the planned write. The same plan resumes; another plan's write, or planned shards
    without a manifest, are refused in one line naming the way out, or with `overwrite` removed first; shards that
    neither plan names are refused, as the index would mix them in."""
    old = read_manifest(dst)
    new_names, old_names = planned(manifest), planned(old)
    for split, names in new_names.items():
        others = sorted(set(shard_files(os.path.join(dst, split))) - names - old_names.get(split, set()))
        if others:
            raise DataError(f"'{os.path.join(dst, split)}' already holds other shards ({others[0]}, ...), which the "
                            f"index would mix in; write to an empty folder")
    if old == manifest:
        return
    if not overwrite and old is not None:
        raise DataError(f"'{dst}' holds a write with other arguments or from another source "
                        f"({difference(old, manifest)}); rerun it with its own arguments to finish it, or add "
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


def remove_temporaries(out: str, names: set[str]) -> None:
    """Delete the half-written shards (atomic_write's hidden '.<name>.<random>.tmp') that a killed writer left."""
    for entry in os.listdir(out) if os.path.isdir(out) else []:
        if entry.startswith(".") and entry.endswith(".tmp") and entry[1:].rsplit(".", 2)[0] in names:
            os.remove(os.path.join(out, entry))


@contextmanager
def locked(dst: str) -> Iterator[None]:
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
