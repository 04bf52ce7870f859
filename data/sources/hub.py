"""Image data sets of the Hugging Face hub (`data.name=hf`), read by index from their memory-mapped Arrow files.

    data.name=hf data.hf_name=ILSVRC/imagenet-1k                # a hub id: its cache, or a download
    data.name=hf data.hf_name=/data/my-set                       # a folder of parquet files, or of save_to_disk
    python scripts/hub_prefetch.py ILSVRC/imagenet-1k    # fill the cache once and show splits and columns

The `datasets` library (an optional dependency: `pip install -e '.[hf]'`) finds the data set and, the first time,
downloads it and converts it to Arrow files in its cache (HF_DATASETS_CACHE, under HF_HOME); rank 0 does that while
the other ranks wait, then they read the same cache. With HF_HUB_OFFLINE=1 a hub id is read from that cache, or
from a snapshot that `hf download --repo-type dataset <id>` left in the hub cache (HF_HUB_CACHE).

Training then reads neither through `datasets` nor through its PIL decoding: each process (each loader worker)
memory-maps the Arrow files itself, and sample i is row i's encoded image bytes, decoded by the same JPEG pipeline
as an image folder's files. So the recipes, exact evaluation and bitwise resume hold as on a folder, and the data
set object that goes to a worker is a list of file names and the labels.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

import distributed_utils as du
from core.config import DataCfg
from data.decoding.jpeg import load, read_source
from data.sources.base import DataError, ImageSource, check_labels, first_line
from data.sources.splits import Splits

INSTALL = "pip install -e '.[hf]' (or pip install datasets)"


def import_datasets(quiet: bool = False):
    """The `datasets` module, or a DataError saying how to install it. quiet: no progress bars or warnings."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.name=hf needs the optional package 'datasets', which is not installed; {INSTALL}") \
            from None
    if quiet:
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    return datasets


# --- finding the data set --------------------------------------------------------------------------------------

def load_dict(name: str, config: str = "", revision: str = "", quiet: bool = False) -> dict:
    """The splits of data set `name` as `datasets.Dataset`s: a save_to_disk folder as saved; a hub id or a folder
    of data files through `load_dataset` (which downloads and converts on first use); a hub id that `load_dataset`
    cannot find (offline, never converted) from its snapshot in the hub cache. DataError when none of these does."""
    datasets = import_datasets(quiet)
    if os.path.isfile(os.path.join(name, "state.json")):
        raise DataError(f"'{name}' holds one saved split (a Dataset), not a DatasetDict; save the splits together "
                        f"(DatasetDict({{'train': ..., 'validation': ...}}).save_to_disk(...))")
    if os.path.isfile(os.path.join(name, "dataset_dict.json")):
        try:
            return dict(datasets.load_from_disk(name))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read the saved data set '{name}' ({first_line(e)}); save it again") from None
    try:
        return dict(datasets.load_dataset(name, config or None, revision=revision or None))
    except (ConnectionError, FileNotFoundError) as e:  # also: not cached while offline, no such data set
        snapshot = _hub_snapshot(name, revision)
        if snapshot is None:
            raise DataError(_not_found(name, e)) from None
        return load_dict(snapshot, config, quiet=quiet)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:  # e.g. an unknown config
        raise DataError(f"cannot load data set '{name}'{f' config {config!r}' if config else ''} "
                        f"({first_line(e)}); check data.hf_name and data.hf_config") from None


def _is_path(name: str) -> bool:
    return os.path.exists(name) or name.startswith(("/", ".", "~")) or name.count("/") > 1


def _hub_snapshot(name: str, revision: str) -> str | None:
    """The folder of `name`'s files in the hub cache (`hf download --repo-type dataset`), or None."""
    if _is_path(name):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return snapshot_download(name, repo_type="dataset", revision=revision or None, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _not_found(name: str, error: BaseException) -> str:
    if _is_path(name):
        return (f"no data set at '{name}' ({first_line(error)}); point data.hf_name at a hub id, a folder of "
                f"parquet files or a save_to_disk folder")
    from datasets import config
    from huggingface_hub import constants
    return (f"data set '{name}' is not in the datasets cache '{config.HF_DATASETS_CACHE}' nor in the hub cache "
            f"'{constants.HF_HUB_CACHE}', and the hub does not have it or cannot be reached "
            f"({first_line(error)}); check data.hf_name, or fill the cache where there is network: "
            f"'python scripts/hub_prefetch.py {name}' (or 'hf download --repo-type dataset {name}')")


def check_split(splits: dict, name: str, split: str, key: str) -> None:
    if split not in splits:
        raise DataError(f"data set '{name}' has no split '{split}' (it has: {', '.join(splits)}); set {key}")


def columns(split, name: str, image_column: str = "", label_column: str = "") -> tuple[str, str, list[str] | None]:
    """(image column, label column, class names or None) of a `datasets.Dataset`: found by their features (an
    Image, a ClassLabel), or the ones named, checked. DataError naming the columns there are."""
    datasets = import_datasets()
    features = split.features
    described = ", ".join(f"{c} ({type(f).__name__})" for c, f in features.items())

    def find(wanted: str, kinds: tuple, what: str, key: str) -> str:
        if wanted:
            if wanted not in features or not isinstance(features[wanted], kinds):
                raise DataError(f"data set '{name}' has no {what} column '{wanted}' (columns: {described}); "
                                f"set {key}")
            return wanted
        found = [c for c, f in features.items() if isinstance(f, kinds[:1])]
        if len(found) != 1:
            which = f"{len(found)} {what} columns" if found else f"no {what} column"
            raise DataError(f"data set '{name}' has {which} (columns: {described}); name one with {key}")
        return found[0]

    image = find(image_column, (datasets.Image, datasets.Value), "image", "data.hf_image_column")
    label = find(label_column, (datasets.ClassLabel, datasets.Value), "label", "data.hf_label_column")
    if isinstance(features[image], datasets.Value) and features[image].dtype not in ("binary", "large_binary"):
        raise DataError(f"data set '{name}' column '{image}' holds {features[image].dtype}, not images; "
                        f"set data.hf_image_column (columns: {described})")
    if isinstance(features[label], datasets.Value) and not features[label].dtype.startswith(("int", "uint")):
        raise DataError(f"data set '{name}' column '{label}' holds {features[label].dtype}, not class indices; "
                        f"set data.hf_label_column (columns: {described})")
    names = features[label].names if isinstance(features[label], datasets.ClassLabel) else None
    return image, label, names


def arrow_files(split, name: str, split_name: str) -> list[str]:
    """The Arrow files a `datasets.Dataset` reads, in row order."""
    files = [f["filename"] for f in split.cache_files]
    if not files or split._indices is not None:
        raise DataError(f"data set '{name}' split '{split_name}' is not a plain set of Arrow files (held in memory, "
                        f"or a selection of rows); save it with save_to_disk and point data.hf_name at the folder")
    return files


# --- reading ---------------------------------------------------------------------------------------------------

class ArrowImages:
    """The encoded images of one column of Arrow files, by row, memory-mapped by each process on first use: pickled
    (to a spawned loader worker, a writer process) it is only the file names.

    Args:
        files: Arrow files in the stream format `datasets` writes, in row order.
        column: an Image feature's (struct of bytes and path) or plain binary.
        title: '<data set> <split>', for messages ('<title> row <row>' names an image).
    """

    def __init__(self, files: Sequence[str], column: str, title: str):
        self.files, self.column, self.title = list(files), column, title
        self._pid, self._chunks, self._starts = None, [], np.zeros(1, dtype=np.int64)

    def __getitem__(self, row: int) -> memoryview:
        """Row `row`'s encoded image, without a copy (or the file its path names, where the bytes are absent)."""
        if self._pid != os.getpid():
            self._open()
        chunk = int(np.searchsorted(self._starts, row, side="right")) - 1
        images, paths = self._chunks[chunk]
        value = images[row - int(self._starts[chunk])]
        if value.is_valid:
            return memoryview(value.as_buffer())
        path = paths[row - int(self._starts[chunk])] if paths is not None else None
        if path is None or not path.is_valid:
            raise DataError(f"'{self.row_name(row)}' has no image (neither bytes nor a path)")
        return memoryview(read_source(path.as_py())[0])

    def row_name(self, row: int) -> str:
        return f"{self.title} row {row}"

    def _open(self) -> None:
        import pyarrow as pa  # installed with datasets
        try:
            tables = [pa.ipc.open_stream(pa.memory_map(path)).read_all() for path in self.files]
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"cannot read the Arrow files of {self.title} ({first_line(e)}); delete them from the "
                            f"datasets cache and load the data set again") from None
        chunks = pa.concat_tables(tables).column(self.column).chunks  # no copy: views of the maps
        self._chunks = [(c.field("bytes"), c.field("path")) if pa.types.is_struct(c.type) else (c, None)
                        for c in chunks]
        self._starts = np.cumsum([0] + [len(c) for c in chunks])
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": None, "_chunks": []}  # each process maps the files itself


class HubImages(ImageSource):
    """One split of a hub data set, row `rows[i]` of its Arrow files being sample i; read(i) is the row's encoded
    image, decoded to a uint8 CHW tensor unless a recipe decodes.

    Args:
        images: the split's image column.
        labels: one per row.
        skip_corrupt: skip unreadable images instead of stopping.
    """

    decode = staticmethod(load)

    def __init__(self, images: ArrowImages, labels: np.ndarray, skip_corrupt: bool = False):
        super().__init__(labels, skip_corrupt)
        self.images = images
        self.rows = np.arange(len(self.labels))

    def read(self, i: int) -> memoryview:
        return self.images[int(self.rows[i])]

    def name(self, i: int) -> str:
        return self.images.row_name(int(self.rows[i]))

    def _select(self, keep: np.ndarray) -> "HubImages":
        out = object.__new__(HubImages)
        out.__dict__.update(self.__dict__, rows=self.rows[keep])
        return out


def read_split(split, name: str, split_name: str, image_column: str = "", label_column: str = "",
               skip_corrupt: bool = False) -> tuple[HubImages, list[str] | None]:
    """(the split as HubImages, its class names or None) from a `datasets.Dataset`."""
    image, label, names = columns(split, name, image_column, label_column)
    title = f"{name} {split_name}"
    labels = split.data.column(label)
    if labels.null_count:
        raise DataError(f"'{title}' has {labels.null_count} rows without a label in column '{label}'; pick a labelled "
                        f"split (data.hf_train_split, data.hf_val_split)")
    labels = labels.to_numpy(zero_copy_only=False)
    return HubImages(ArrowImages(arrow_files(split, name, split_name), image, title), labels, skip_corrupt), names


def read_splits(splits: dict, name: str, wanted: dict[str, str], image_column: str = "", label_column: str = "",
                skip_corrupt: bool = False) -> tuple[dict[str, HubImages], list[str] | None]:
    """({role: split as HubImages}, class names or None) of the `datasets.Dataset`s named in `wanted` (role -> split
    name); DataError where their label features name different classes."""
    found = {role: read_split(splits[split], name, split, image_column, label_column, skip_corrupt)
             for role, split in wanted.items()}
    names = [split_names for _, split_names in found.values()]
    if any(n != names[0] for n in names):
        raise DataError(f"data set '{name}': the label features of splits "
                        f"{' and '.join(repr(s) for s in wanted.values())} name different classes; pick splits of "
                        f"one labelling")
    return {role: images for role, (images, _) in found.items()}, names[0]


def open_splits(cfg: DataCfg, train: bool, main: bool) -> tuple[HubImages | None, HubImages | None, int,
                                                                 list[str] | None]:
    """(train or None, val or None, number of classes, class names or None) of data set cfg.hf_name; `main`: the rank
    that prepares it (progress bars) while the others wait to read it."""
    name = cfg.hf_name
    splits = load_dict(name, cfg.hf_config, cfg.hf_revision, quiet=not main)
    # A set of one training split trains without evaluation (train.eval_every=0), as ImageNet-22K's sets have no
    # other; where there are more splits, data.hf_val_split must name one of them.
    has_val = not train or set(splits) != {cfg.hf_train_split}
    wanted = {**({"val": cfg.hf_val_split} if has_val else {}), **({"train": cfg.hf_train_split} if train else {})}
    for role, split in wanted.items():
        check_split(splits, name, split, f"data.hf_{role}_split")
    found, names = read_splits(splits, name, wanted, cfg.hf_image_column, cfg.hf_label_column, cfg.skip_corrupt)
    num_classes = len(names) if names else cfg.num_classes or 1 + max(int(s.labels.max(initial=0))
                                                                      for s in found.values())
    way_out = "fix the labels" if names else "fix the labels or raise data.num_classes"
    for split in found.values():
        check_labels(split.labels, num_classes, split.name, way_out, unit="rows")
    return found.get("train"), found.get("val"), num_classes, names


HF_PREPARE_WAIT_S = 48 * 3600  # a first download of ImageNet (~150 GB) and its conversion can take hours


def hf(cfg: DataCfg, train: bool) -> Splits:
    """data.name=hf: a hub id, or a folder of parquet files or of save_to_disk."""
    # Rank 0 downloads and converts to Arrow where needed; the others then find the same files in the cache.
    train_set, val, num_classes, names = du.main_first(lambda main: open_splits(cfg, train, main),
                                                       wait_s=HF_PREPARE_WAIT_S)
    return Splits(train_set, val, num_classes=num_classes, in_chans=3, class_names=names)


