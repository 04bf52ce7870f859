"""Tar shards in the WebDataset layout, read by sample index, so exact evaluation and exact resume hold on them.

    python scripts/shards.py write /data/imagenet /data/imagenet-shards     # train/ and val/ of an image folder
    python scripts/shards.py index /data/some-webdataset                     # shards written by other tools

Layout: ROOT/train/*.tar and ROOT/val/*.tar, each sample two members, `<key>.jpg` (or .png, .webp, ...) and
`<key>.cls` (its label as decimal text), as WebDataset and timm write them; ROOT/classes.txt (optional) names the
classes, one per line, in label order. ROOT/<split>/index.npz holds, per sample, its shard, the offset and size
of its image bytes and its label; per shard, its size and modification time. A read is then one `pread` on a shard
kept open by the worker (at most `max_open` per worker), and a shard changed since the index was built is caught
at start-up by one stat per shard, instead of walking a million files.
"""
from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing import Pool

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from core.config import DataCfg
from core.files import atomic_write
from data.decoding.jpeg import load
from data.sources.base import DataChanged, DataError, ImageSource, check_labels, first_line
from data.sources.splits import Splits

INDEX = "index.npz"
SAMPLE_COLUMNS = ("shard", "offset", "size", "label")  # ShardIndex's per-sample columns
CLASSES = "classes.txt"
IMAGE_EXTS = tuple(ext.lstrip(".") for ext in IMG_EXTENSIONS)  # member extensions read as images: ImageFolder's


def rebuild_hint(split_folder: str) -> str:
    """The way out of a missing or stale index of `split_folder`."""
    return f"rebuild it with 'python scripts/shards.py index {os.path.dirname(os.path.abspath(split_folder))}'"


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
        raise DataError(f"no .tar shards in '{folder}'; write them with 'python scripts/shards.py write SRC DST'")
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

class ShardImages(ImageSource):
    """One split's shards; read(i) is a member's image bytes, decoded to a uint8 CHW tensor unless a recipe decodes.

    Args:
        folder: the split's folder of .tar shards and their index.npz.
        skip_corrupt: skip unreadable images instead of stopping.
        max_open: shards each process keeps open, least recently used closed first.
    """

    decode = staticmethod(load)

    def __init__(self, folder: str, skip_corrupt: bool = False, max_open: int = 8):
        index_path = os.path.join(folder, INDEX)
        if not os.path.isfile(index_path):
            what = "no .tar shards" if not shard_files(folder) else f"no index '{index_path}'"
            raise DataError(f"{what} in '{folder}'; data.name=shards needs data.root to hold train/ and val/ "
                            f"folders of shards, with an index: {rebuild_hint(folder)}")
        self.index = ShardIndex.load(index_path)
        check_index(folder, self.index)
        super().__init__(self.index.label, skip_corrupt)
        self.folder, self.max_open = folder, max_open
        self._files: OrderedDict[int, int] = OrderedDict()  # shard -> fd, this process's
        self._pid = os.getpid()

    def read(self, i: int) -> bytes:
        shard, offset, size = int(self.index.shard[i]), int(self.index.offset[i]), int(self.index.size[i])
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise DataChanged(f"'{self.name(i)}' ends early: the shard was truncated after indexing; write it again")
        return data

    def name(self, i: int) -> str:
        """'<shard>:<member>' from the tar header before the member's data."""
        shard, offset = int(self.index.shard[i]), int(self.index.offset[i])
        header = os.pread(self._fd(shard), 512, offset - 512)
        name = header[:100].split(b"\0")[0].decode(errors="replace")
        prefix = header[345:500].split(b"\0")[0].decode(errors="replace")
        return f"{self._path(shard)}:{prefix + '/' + name if prefix else name}"

    def _select(self, keep: np.ndarray) -> "ShardImages":
        out = object.__new__(ShardImages)
        index = ShardIndex(**{**vars(self.index), **{c: getattr(self.index, c)[keep] for c in SAMPLE_COLUMNS}})
        out.__dict__.update(self.__dict__, index=index, _files=OrderedDict())
        return out

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


def shards(cfg: DataCfg, train: bool) -> Splits:
    """data.name=shards: root/train/ and root/val/ folders of indexed shards, root/classes.txt naming the classes."""
    val_dir = os.path.join(cfg.root, "val")  # training may go without one (train.eval_every=0)
    val = ShardImages(val_dir, cfg.skip_corrupt) if not train or os.path.isdir(val_dir) else None
    train_set = ShardImages(os.path.join(cfg.root, "train"), cfg.skip_corrupt) if train else None
    names = read_classes(cfg.root)
    splits = [s for s in (train_set, val) if s is not None]
    num_classes = len(names) if names else cfg.num_classes or 1 + max(int(s.labels.max()) for s in splits)
    way_out = (f"fix the labels, or list the classes in '{os.path.join(cfg.root, CLASSES)}'" if names else
               "fix the labels or raise data.num_classes")
    for split in splits:
        check_labels(split.labels, num_classes, split.name, way_out)
    return Splits(train_set, val, num_classes=num_classes, in_chans=3, class_names=names)
