"""The file list of an image folder (root/<class>/**/<image>), scanned once and cached for every rank and restart.

Walking 1.28M files costs minutes on a network file system, and ImageFolder walks the tree in every process.
Here rank 0 reuses the cached list while the tree is unchanged, or scans it (with a progress bar) and writes the
cache; the other ranks then read the cache. The list is torchvision ImageFolder's: classes in sorted order, files
in sorted walk order, with the same extensions.

The cache is `<root>/<split>.files.json`, beside the split folder, or under $XDG_CACHE_HOME/convnext-trainer when
the data's folder is read-only. It records the modification time of every folder it walked: adding, removing or
renaming an image changes its folder's time, so one stat per folder (1,001 for ImageNet) tells whether the list
still holds. Delete the file to force a new scan.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

import distributed_utils as du
from core.files import atomic_write
from data.sources.base import DataError

FORMAT = 2


@dataclass
class FileList:
    classes: list[str]
    samples: list[tuple[str, int]]  # (absolute path, label), ImageFolder's order
    folders: dict[str, int]  # every folder walked (relative to the split folder) -> its mtime in ns


def scan(folder: str, progress: bool = False) -> FileList:
    """Walk `folder` as ImageFolder does; DataError when it has no class folders or a class has no images."""
    if not os.path.isdir(folder):
        raise DataError(f"'{folder}' does not exist; data.name=imagefolder needs data.root to hold train/ and val/, "
                        f"each with one sub-folder of images per class")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise DataError(f"no class folders in '{folder}'; give it one sub-folder of images (.jpg, .png, ...) per "
                        f"class")
    root = os.path.abspath(folder)  # absolute paths, as the cache gives them
    folders = {".": os.stat(root).st_mtime_ns}
    samples: list[tuple[str, int]] = []
    # delay: a folder listed within 2 s shows no bar (and a bad-input message stays the one line on stderr)
    for label, name in enumerate(tqdm(classes, desc=f"listing {folder}", unit="class", disable=not progress, delay=2)):
        found = len(samples)
        for path, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            folders[os.path.relpath(path, root)] = os.stat(path).st_mtime_ns
            samples += [(os.path.join(path, f), label) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
        if len(samples) == found:
            raise DataError(f"no usable images in '{os.path.join(folder, name)}' (extensions "
                            f"{', '.join(IMG_EXTENSIONS)}); add images or remove the folder")
    return FileList(classes, samples, folders)


def cache_paths(folder: str) -> list[str]:
    """Where the cache of `folder`'s list may be, in the order tried: beside it, then the user's cache folder."""
    folder = os.path.abspath(folder)
    digest = hashlib.sha1(folder.encode()).hexdigest()[:16]
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [folder.rstrip(os.sep) + ".files.json",
            os.path.join(user_cache, "convnext-trainer", f"{os.path.basename(folder)}-{digest}.files.json")]


def _unchanged(folder: str, folders: dict[str, int]) -> bool:
    try:
        return all(os.stat(os.path.join(folder, rel)).st_mtime_ns == mtime for rel, mtime in folders.items())
    except OSError:  # a folder that went away
        return False


def read_cache(folder: str, check: bool = True) -> FileList | None:
    """The cached list of `folder` when one exists and (`check`) the tree has not changed since; else None.

    The file is a JSON header line (classes, images per class, folder times) and then the images' paths relative
    to `folder`, NUL-separated: a million of them split in a fraction of a second, faster than walking the tree.
    """
    folder = os.path.abspath(folder)
    for path in cache_paths(folder):
        try:
            with open(path, "rb") as f:
                header = json.loads(f.readline())
                body = f.read().decode(errors="surrogateescape")  # file names need not be UTF-8
        except (OSError, ValueError):
            continue
        if (header.get("format") != FORMAT or header.get("folder") != folder
                or header.get("extensions") != list(IMG_EXTENSIONS)
                or (check and not _unchanged(folder, header["folders"]))):
            continue
        names = body.split("\0") if body else []
        labels = [label for label, count in enumerate(header["counts"]) for _ in range(count)]
        if len(names) != len(labels):
            continue  # a damaged file: scan again
        prefix = folder + os.sep
        return FileList(header["classes"], [(prefix + name, label) for name, label in zip(names, labels)],
                        header["folders"])
    return None


def write_cache(folder: str, listing: FileList) -> str | None:
    """Write the cache in the first writable place; its path, or None when none is (every rank then scans)."""
    folder = os.path.abspath(folder)
    counts = [0] * len(listing.classes)
    for _, label in listing.samples:  # ImageFolder's samples come grouped by label, in label order
        counts[label] += 1
    header = {"format": FORMAT, "folder": folder, "extensions": list(IMG_EXTENSIONS), "classes": listing.classes,
              "counts": counts, "folders": listing.folders}
    start = len(folder) + 1
    body = "\0".join(path[start:] for path, _ in listing.samples)

    def write(f) -> None:
        f.write(json.dumps(header).encode() + b"\n")
        f.write(body.encode(errors="surrogateescape"))

    for path in cache_paths(folder):
        try:
            atomic_write(path, write)
            return path
        except OSError:  # a read-only data folder: try the next place
            continue
    return None


def list_images(folder: str, cache: bool = True) -> FileList:
    """`folder`'s file list, the same on every rank. With `cache`, rank 0 reuses or scans and writes the cache,
    then the other ranks read it (or scan, where they cannot see it); without, every rank scans."""
    if not cache:
        return scan(folder, progress=du.is_main_process())

    def listing(main: bool) -> FileList:
        if not main:  # rank 0 has just checked the tree against the cache: no stat per folder again
            return read_cache(folder, check=False) or scan(folder)
        cached = read_cache(folder)
        if cached is None:
            cached = scan(folder, progress=True)
            write_cache(folder, cached)
        return cached

    return du.main_first(listing)
