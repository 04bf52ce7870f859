"""Filling the Hugging Face cache with a data set before training, and showing its splits and columns
(data.sources.hub reads it).

    python scripts/hub_prefetch.py ILSVRC/imagenet-1k    # fill the cache once and show splits and columns
"""
from __future__ import annotations

import argparse
import os

from core.cli import run_main
from data.sources.base import DataError
from data.sources.hub import columns, load_dict


def main(argv: list[str] | None = None) -> None:
    """The command line; a DataError (no such data set, no `datasets`) ends it with one line and exit code 2."""
    parser = argparse.ArgumentParser(prog="python scripts/hub_prefetch.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="hub id (e.g. ILSVRC/imagenet-1k), or a folder of parquet files or save_to_disk")
    parser.add_argument("--config", default="", help="the data set's configuration (data.hf_config)")
    parser.add_argument("--revision", default="", help="a branch, tag or commit of the hub repository")
    args = parser.parse_args(argv)
    splits = load_dict(args.name, args.config, args.revision)
    for split_name, split in splits.items():
        try:
            image, label, names = columns(split, args.name)
            what = f"images in '{image}', labels in '{label}' ({len(names) if names else '?'} classes)"
        except DataError as e:
            what = str(e)
        files = os.path.dirname(split.cache_files[0]["filename"]) if split.cache_files else "memory"
        print(f"{split_name}: {split.num_rows} rows, {what}; Arrow files in {files}")


if __name__ == "__main__":
    run_main(main)
