"""Time to the first batch: how long the ranks take to find their data (list the files or read the shard index),
build their loaders and receive their first training batch.

    torchrun --nproc_per_node=2 scripts/startup.py --config configs/convnext_t.yaml data.root=/data/imagenet
    torchrun --nproc_per_node=2 scripts/startup.py --config configs/convnext_t.yaml data.root=/data/imagenet \
        data.cache_file_list=false      # every rank walks the tree, as torchvision's ImageFolder does
    torchrun --nproc_per_node=2 scripts/startup.py --config configs/convnext_t.yaml data.name=shards \
        data.root=/data/imagenet-shards

Timed from a barrier after the process group is up (Python's and torch's imports are the same in every case); the
figures are the slowest rank's. The last stdout line is a JSON record.
"""
from __future__ import annotations

import argparse
import json
import time

import distributed_utils as du
from core.cli import run_main
from data import start_epoch
from engine.build import build_data, start_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args()
    cfg, ctx = start_run(args.config, args.overrides, training=True)
    env = ctx.env
    du.barrier()
    start = time.perf_counter()
    data = build_data(cfg, ctx, training=True)
    listed = time.perf_counter() - start
    start_epoch(data.train_loader, 0)
    next(iter(data.train_loader))
    first_batch = time.perf_counter() - start
    slowest = [max(times) for times in zip(*du.all_gather_object((listed, first_batch)))]
    record = {"data": cfg.data.name, "root": cfg.data.hf_name if cfg.data.name == "hf" else cfg.data.root,
              "cache_file_list": cfg.data.cache_file_list,
              "world_size": env.world_size, "train_images": data.info.train_size, "val_images": data.info.val_size,
              "data_sets_s": round(slowest[0], 3), "first_batch_s": round(slowest[1], 3)}
    du.print0(f"{env.world_size} rank(s): data sets built in {record['data_sets_s']:.2f} s, first batch after "
              f"{record['first_batch_s']:.2f} s ({data.info.train_size} + {data.info.val_size} images)")
    du.print0(json.dumps(record))


if __name__ == "__main__":
    run_main(main)
