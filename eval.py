"""Evaluate a checkpoint on the validation split, exactly: every image counted once, whatever the world size.

    python eval.py --config configs/fashion_mnist.yaml --checkpoint runs/fashion_mnist/checkpoints/best.pth [--ema]
    torchrun --nproc_per_node=2 eval.py --config configs/debug.yaml --checkpoint runs/debug/checkpoints/last.pth

Reads this trainer's checkpoints (raw or EMA weights), official release files ({"model": state_dict}) and
timm-layout state dicts. The last line on stdout is one JSON object: top1, top5 (percent), loss, samples, img_per_s.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict
import json
import time

import torch

import distributed_utils as du
from data import build_datasets, build_eval_loader
from engine.config import load_config
from engine.loop import evaluate
from models import create_model
from models.keys import load_weights
from models.pretrained import read_weights


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the YAML recipe the model was trained with")
    parser.add_argument("--checkpoint", required=True, help="a .pth file: ours, an official release, or timm's")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights of one of our checkpoints")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    cfg = load_config(args.config, args.overrides)
    ctx = du.setup(cfg.dist.backend, cfg.dist.timeout_s)
    _, val_set, info = build_datasets(cfg.data, cfg.aug, train=False)
    loader = build_eval_loader(val_set, cfg.data, ctx.env.rank, ctx.env.world_size)
    # model.pretrained is a starting point for training; what is evaluated is --checkpoint.
    model = create_model(**{**asdict(cfg.model), "pretrained": ""}, num_classes=info.num_classes,
                         in_chans=info.in_chans)
    load_weights(model, read_weights(args.checkpoint), ema=args.ema)  # .pth, .bin or .safetensors, any layout
    model.to(ctx.device, memory_format=torch.channels_last if cfg.train.channels_last else torch.contiguous_format)

    du.barrier()  # time the evaluation alone, from the same moment on every rank
    start = time.perf_counter()
    metrics = evaluate(model, loader, ctx.device, cfg.train.amp, cfg.train.channels_last)
    metrics["img_per_s"] = metrics["samples"] / (time.perf_counter() - start)
    du.print0(json.dumps(metrics))


if __name__ == "__main__":
    du.run(main)
