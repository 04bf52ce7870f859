"""The sources at ImageNet-22K's size without 14M files: each rank's start-up and memory, and each loader worker's.

    python scripts/data_at_scale.py prepare /tmp/scale --samples 14197122    # once: a few hundred real JPEGs, and
                                                                              # indices of 14.2M samples into them
    python scripts/data_at_scale.py measure /tmp/scale                        # this code's figures (JSON lines)
    PYTHONPATH=/path/to/other/checkout python scripts/data_at_scale.py measure /tmp/scale   # another's, alike

`prepare` writes a small JPEG test bed (scripts/testbed.py), its shards (scripts/shards.py), and then, for the image
folder, a file-list cache (<root>/train.files.json) of `--samples` entries naming its real files in turn, and for the
shards an index (train/index.npz) of as many samples pointing into the real shards, and for the hub sets a save_to_disk
set of as many rows (two bytes of image each: read, never decoded). `measure` then, per source,
times the rank's load of the train split (load_splits: what every rank does at start), and reports the rank's private
memory after it and the growth of its peak resident memory during it, the index's size on disk, and the private memory a forked child (a loader worker) gains by reading
(path or bytes, label) of every `--share`-th sample (copy-on-write through reference counts: pytorch/pytorch#13246).
Private memory is Private_Clean + Private_Dirty of /proc/self/smaps_rollup (Linux only).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from typing import Callable

import numpy as np

from core.config import DataCfg

CLASSES, PER_CLASS = 20, 20  # the real images: 400 training JPEGs
SOURCES = ("imagefolder", "shards", "hf")


def private_mb(kinds: tuple[str, ...] = ("Private_Dirty", "Private_Clean")) -> float:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(kinds)) / 1024


def peak_mb() -> float:
    """The process's peak resident memory so far (Linux: ru_maxrss in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def growth_in_child(read: Callable[[int], object], samples: int, share: int) -> dict[str, float]:
    """MB of private memory a forked child gains reading every `share`-th sample: dirty (pages copied on write, or
    written: memory of its own) and clean (pages of files it mapped alone: the page cache, shared as soon as another
    worker maps the same file)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        before = [private_mb((kind,)) for kind in ("Private_Dirty", "Private_Clean")]
        for i in range(0, samples, share):
            read(i)
        after = [private_mb((kind,)) for kind in ("Private_Dirty", "Private_Clean")]
        os.write(w, json.dumps({"worker_dirty_mb": round(after[0] - before[0], 1),
                                "worker_clean_mb": round(after[1] - before[1], 1)}).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    return json.loads(os.read(r, 256))


def prepare_folder_cache(train: str, samples: int) -> None:
    """<train>.files.json listing `samples` images, each class's real files named in turn (the reader's format:
    a JSON header line, then relative paths joined by NUL)."""
    from data.sources.file_list import FORMAT, cache_paths, scan

    real = scan(train)
    counts = np.diff(np.linspace(0, samples, len(real.classes) + 1).astype(np.int64))
    names = []
    for label, count in enumerate(counts):
        files = [path[len(real.folder) + 1:] for path, lab in real.samples if lab == label]
        names.append("\0".join(files[i % len(files)] for i in range(count)))
    header = {"format": FORMAT, "folder": real.folder, "extensions": _extensions(),
              "classes": real.classes, "counts": counts.tolist(), "folders": real.folders}
    with open(cache_paths(train)[0], "wb") as f:
        f.write(json.dumps(header).encode() + b"\n")
        f.write("\0".join(names).encode())


def _extensions() -> list[str]:
    from torchvision.datasets.folder import IMG_EXTENSIONS
    return list(IMG_EXTENSIONS)


def prepare_shard_index(train: str, samples: int) -> None:
    """train/index.npz of `samples` samples, the real shards' samples repeated in turn."""
    from data.sources.shards import INDEX, ShardIndex

    index = ShardIndex.load(os.path.join(train, INDEX))
    take = np.arange(samples) % len(index.label)
    per_sample = {name: getattr(index, name)[take] for name in ("shard", "offset", "size", "label")}
    ShardIndex(index.shards, index.shard_bytes, index.shard_mtime, **per_sample).save(os.path.join(train, INDEX))


def prepare_hub_set(folder: str, samples: int) -> None:
    """A save_to_disk data set (datasets' layout, as data.name=hf reads it) of `samples` train rows, written with
    pyarrow in the schema datasets gives a small one; each row's image is two bytes, read but never decoded here."""
    import datasets
    import pyarrow as pa

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=CLASSES)})
    rows = {"image": [{"bytes": b"\xff\xd8", "path": None}] * CLASSES, "label": list(range(CLASSES))}
    datasets.DatasetDict({split: datasets.Dataset.from_dict(rows, features=features)
                          for split in ("train", "validation")}).save_to_disk(folder)
    with open(os.path.join(folder, "train", "state.json")) as f:
        path = os.path.join(folder, "train", json.load(f)["_data_files"][0]["filename"])
    schema = pa.ipc.open_stream(pa.memory_map(path)).schema
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, samples, 1_000_000):
            count = min(1_000_000, samples - start)
            images = pa.StructArray.from_arrays([pa.array([b"\xff\xd8"] * count, pa.binary()),
                                                 pa.nulls(count, pa.string())], names=["bytes", "path"])
            labels = pa.array(np.arange(start, start + count) % CLASSES, pa.int64())
            writer.write_batch(pa.record_batch([images, labels], schema=schema))


def prepare(root: str, samples: int) -> None:
    from shards import write_shards
    from testbed import make_jpeg_testbed

    for split, count in (("train", CLASSES * PER_CLASS), ("val", CLASSES)):
        make_jpeg_testbed(os.path.join(root, "folder"), count, CLASSES, seed=len(split), split=split)
    write_shards(os.path.join(root, "folder"), os.path.join(root, "shards"), shard_size=100, shuffle=False)
    prepare_folder_cache(os.path.join(root, "folder", "train"), samples)
    prepare_shard_index(os.path.join(root, "shards", "train"), samples)
    prepare_hub_set(os.path.join(root, "hub"), samples)


def measure(root: str, name: str, share: int) -> dict:
    """One source's figures, in this process (run one source per process: memory is not given back)."""
    from data.sources import load_splits

    folder = {"imagefolder": "folder", "shards": "shards", "hf": "hub"}[name]
    index = {"imagefolder": os.path.join(root, folder, "train.files.json"),
             "shards": os.path.join(root, folder, "train", "index.npz"),
             "hf": os.path.join(root, folder, "train", "data-00000-of-00001.arrow")}[name]
    cfg = DataCfg(name=name, root=os.path.join(root, folder), hf_name=os.path.join(root, folder))
    before, peak, start = private_mb(), peak_mb(), time.perf_counter()
    source = load_splits(cfg).train
    seconds = time.perf_counter() - start
    return {"source": name, "samples": len(source), "index_mb": round(os.path.getsize(index) / 2 ** 20, 1),
            "load_s": round(seconds, 2), "rank_mb": round(private_mb() - before, 1),
            "rank_peak_mb": round(peak_mb() - peak, 1), "share": share,
            **growth_in_child(lambda i: (source.read(i), int(source.labels[i])), len(source), share)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("prepare", "measure"))
    parser.add_argument("root", help="where the simulated data sets are (prepare writes them there)")
    parser.add_argument("--samples", type=int, default=14_197_122, help="samples in the train split (IN-22K's)")
    parser.add_argument("--share", type=int, default=96, help="a worker reads 1 sample in this many (8 ranks x 12)")
    parser.add_argument("--source", choices=SOURCES, default="",
                        help="measure this one in this process (default: each in a process of its own)")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.root, args.samples)
    elif args.source:
        print(json.dumps(measure(args.root, args.source, args.share)))
    else:
        import subprocess
        import sys
        for name in SOURCES:
            subprocess.run([sys.executable, __file__, "measure", args.root, "--source", name, "--share",
                            str(args.share)], check=True)


if __name__ == "__main__":
    main()
