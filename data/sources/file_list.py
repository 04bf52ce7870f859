"""The file list of an image folder (root/<class>/**/<image>), scanned once and cached for every rank and restart.

Walking 1.28M files costs minutes on a network file system, and ImageFolder walks the tree in every process.
Here rank 0 reuses the cached list while the tree is unchanged, or scans it (with a progress bar) and writes the
cache; the other ranks then read the cache. The list is torchvision ImageFolder's: classes in sorted order, files
in sorted walk order, with the same extensions. It is held as flat arrays (PackedStrings paths, an int64 label array),
never as a Python object per file: reading ImageNet-22K's 14.2M names takes seconds and their bytes' worth of memory.

The cache is `<root>/<split>.files.json`, beside the split folder, or under $XDG_CACHE_HOME/convnext-trainer when
the data's folder is read-only: a JSON header line (classes, images per class, the folders walked with their
modification times) and then the images' paths relative to the split folder, NUL-separated. Adding, removing or
renaming an image changes its folder's time, so one stat per folder (1,001 for ImageNet) tells whether the list
still holds. Delete the file to force a new scan.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

import distributed_utils as du
from core.files import atomic_write
from data.sources.base import DataError, PackedStrings

FORMAT = 2


@dataclass
class FileList:
    folder: str  # the split folder, absolute
    classes: list[str]
    paths: PackedStrings  # relative to `folder`, ImageFolder's order
    labels: np.ndarray  # int64, one per path
    folders: dict[str, int]  # every folder walked (relative to `folder`) -> its mtime in ns

    @property
    def samples(self) -> list[tuple[str, int]]:
        """ImageFolder's samples, (absolute path, label): a Python object per file, for tools, not loaders."""
        return [(os.path.join(self.folder, self.paths[i]), int(label)) for i, label in enumerate(self.labels)]


def _class_names(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise DataError(f"'{folder}' does not exist; data.name=imagefolder needs data.root to hold train/ and val/, "
                        f"each with one sub-folder of images per class")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise DataError(f"no class folders in '{folder}'; give it one sub-folder of images (.jpg, .png, ...) per "
                        f"class")
    return classes


def scan(folder: str, progress: bool = False) -> FileList:
    """Walk `folder` as ImageFolder does; DataError when it has no class folders or a class has no images."""
    classes = _class_names(folder)
    root = os.path.abspath(folder)
    folders = {".": os.stat(root).st_mtime_ns}
    names: list[bytes] = []  # each class's relative paths, NUL-separated: one object per class, not per file
    counts = []
    # delay: a folder listed within 2 s shows no bar (and a bad-input message stays the one line on stderr)
    for name in tqdm(classes, desc=f"listing {folder}", unit="class", disable=not progress, delay=2):
        found = images_under(os.path.join(root, name), root, folders)
        if not found:
            raise DataError(f"no usable images in '{os.path.join(folder, name)}' (extensions "
                            f"{', '.join(IMG_EXTENSIONS)}); add images or remove the folder")
        names.append("\0".join(found).encode(errors="surrogateescape"))
        counts.append(len(found))
    return _file_list(root, classes, b"\0".join(names), counts, folders)


def images_under(top: str, start: str, folders: dict[str, int] | None = None) -> list[str]:
    """The image files (IMG_EXTENSIONS) under `top`, recursively, in sorted walk order, as paths relative to
    `start`; each folder walked is noted in `folders` (relative to `start`) with its modification time."""
    found = []
    for path, _, files in sorted(os.walk(top, followlinks=True)):
        rel = os.path.relpath(path, start)
        if folders is not None:
            folders[rel] = os.stat(path).st_mtime_ns
        found += [os.path.join(rel, f) for f in sorted(files) if is_image_file(f)]
    return found


def is_image_file(path: str) -> bool:
    """Whether the name ends as an image file does (torchvision's IMG_EXTENSIONS, any case)."""
    return path.lower().endswith(IMG_EXTENSIONS)


def _file_list(folder: str, classes: list[str], names: bytes, counts: list[int],
               folders: dict[str, int]) -> FileList:
    """A FileList from NUL-separated relative paths and the images per class (a class's images are consecutive)."""
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), counts)
    return FileList(folder, classes, PackedStrings.split(np.frombuffer(names, np.uint8), len(labels)), labels,
                    folders)


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
    """The cached list of `folder` when one exists and (`check`) the tree has not changed since; else None."""
    folder = os.path.abspath(folder)
    for path in cache_paths(folder):
        try:
            with open(path, "rb") as f:
                header = json.loads(f.readline())
                body = f.read()
        except (OSError, ValueError):
            continue
        if (header.get("format") != FORMAT or header.get("folder") != folder
                or header.get("extensions") != list(IMG_EXTENSIONS)
                or (check and not _unchanged(folder, header["folders"]))):
            continue
        try:
            return _file_list(folder, header["classes"], body, header["counts"], header["folders"])
        except ValueError:  # a damaged file: scan again
            continue
    return None


def write_cache(folder: str, listing: FileList) -> str | None:
    """Write the cache in the first writable place; its path, or None when none is (every rank then scans)."""
    folder = os.path.abspath(folder)
    counts = np.bincount(listing.labels, minlength=len(listing.classes)).tolist()
    header = {"format": FORMAT, "folder": folder, "extensions": list(IMG_EXTENSIONS), "classes": listing.classes,
              "counts": counts, "folders": listing.folders}

    def write(f) -> None:
        f.write(json.dumps(header).encode() + b"\n")
        f.write(listing.paths.joined())

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
