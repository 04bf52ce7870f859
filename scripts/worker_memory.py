"""How much private memory a forked loader worker gains by reading its share of a split's samples (copy-on-write).

    python scripts/worker_memory.py                    # 1,281,167 ImageNet-like paths, a worker reading 1 in 8
    python scripts/worker_memory.py --samples 14197122 --share 12

A forked worker shares its parent's pages until it writes to them; reading a Python object writes its reference
count, so a worker that reads its share of a list of (path, label) tuples (what torchvision's ImageFolder holds)
copies nearly every page of the list. The image-folder source keeps its paths and labels in flat arrays
(data.sources.base.PackedStrings) instead. Both are measured side by side, in a child forked from one parent, as
the growth of the child's private memory (/proc/self/smaps_rollup). Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Callable

from data.sources.folder import FileImages

ROOT = "/datasets/imagenet/train"


def private_mb() -> float:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Dirty", "Private_Clean"))) / 1024


def growth_in_child(read: Callable[[int], object], samples: int, share: int) -> float:
    """MB of private memory a forked child gains reading every `share`-th sample."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        before = private_mb()
        for i in range(0, samples, share):
            read(i)
        os.write(w, f"{private_mb() - before:.1f}".encode())
        os._exit(0)
    os.waitpid(pid, 0)
    return float(os.read(r, 64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1_281_167, help="paths in the split (ImageNet-1k's train)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--share", type=int, default=8, help="the worker reads 1 sample in this many")
    args = parser.parse_args()
    samples = [(f"{ROOT}/n{i % args.classes:08d}/n{i % args.classes:08d}_{i}.JPEG", i % args.classes)
               for i in range(args.samples)]
    start = len(ROOT) + 1
    source = FileImages(ROOT, [path[start:] for path, _ in samples], [label for _, label in samples])
    figures = {"samples": args.samples, "share": args.share,
               "tuples_mb": growth_in_child(lambda i: samples[i], args.samples, args.share),
               "folder_source_mb": growth_in_child(lambda i: (source.read(i), int(source.labels[i])), args.samples,
                                                   args.share)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
