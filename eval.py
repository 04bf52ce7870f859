"""Evaluate a checkpoint on the validation split, exactly: every image counted once, whatever the world size.

    python eval.py --config configs/fashion_mnist.yaml --checkpoint runs/fashion_mnist/checkpoints/best.pth [--ema]
    python eval.py --config configs/finetune_384_convnext_b.yaml model.pretrained=convnext_base.fb_in22k_ft_in1k_384
    torchrun --nproc_per_node=2 eval.py --config configs/debug.yaml --checkpoint runs/debug/checkpoints/last.pth

Reads this trainer's checkpoints (raw or EMA weights), official release files ({"model": state_dict}) and
timm-layout state dicts. The last line on stdout is one JSON object: top1, top5 (percent), loss, samples, img_per_s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.utils.tensorboard import SummaryWriter

import distributed_utils as du
from core.cli import run_main
from core.config import ConfigError
from core.files import atomic_write
from engine.build import adopt_published_view, build_data, build_model, start_run
from engine.loop import evaluate
from models.keys import load_weights
from models.pretrained import read_weights, resolve_weights


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the YAML recipe the model was trained with")
    parser.add_argument("--checkpoint", default="", help="a weights file (ours, an official release, timm's) or "
                        "a hub name: hf-hub:timm/convnext_tiny.fb_in1k, convnext_tiny.fb_in1k (default: "
                        "model.pretrained); hub weights are evaluated on their published view (size, crop, "
                        "interpolation, mean/std) but for the keys set on the command line")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights of one of our checkpoints")
    parser.add_argument("--per-class", metavar="FILE.json", default="",
                        help="also write per-class top-1 and the confusion matrix there, and the matrix as an image "
                             "to TensorBoard in the file's folder (tb/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    cfg, ctx = start_run(args.config, args.overrides, training=False)
    weights = args.checkpoint or cfg.model.pretrained  # what is evaluated: --checkpoint, else model.pretrained
    if not weights:
        raise ConfigError("nothing to evaluate: give --checkpoint FILE or a hub name, or model.pretrained=...")
    du.print0(adopt_published_view(cfg, weights, args.overrides))
    data = build_data(cfg, ctx, training=False)
    info = data.info
    model = build_model(cfg, info.num_classes, info.in_chans, ctx.device, pretrained=False)
    load_weights(model, read_weights(resolve_weights(weights)), ema=args.ema)  # a file or a hub name

    du.barrier()  # time the evaluation alone, from the same moment on every rank
    start = time.perf_counter()
    metrics = evaluate(model, data.val_loader, ctx.device, cfg.train.amp, cfg.train.channels_last,
                       num_classes=info.num_classes if args.per_class else 0, tta=cfg.aug.tta,
                       batch_transform=data.eval_transform)
    metrics["img_per_s"] = metrics["samples"] / (time.perf_counter() - start)
    confusion = metrics.pop("confusion", None)
    if confusion is not None and ctx.env.is_main:
        write_per_class(args.per_class, confusion, info.class_names)
    du.print0(json.dumps(metrics))


def write_per_class(path: str, confusion: list[list[int]], names: list[str]) -> None:
    """Per-class top-1 and the confusion matrix (rows: true class) as JSON; the row-normalised matrix as an image."""
    counts = torch.tensor(confusion, dtype=torch.float64)
    per_class = (100.0 * counts.diag() / counts.sum(1).clamp(min=1)).tolist()
    folder = os.path.dirname(os.path.abspath(path))
    record = {"classes": names, "per_class_top1": dict(zip(names, per_class)), "confusion": confusion}
    atomic_write(path, lambda f: json.dump(record, f, separators=(",", ":")), binary=False)
    # One cell per 16 px, white = all of the row's images: readable in TensorBoard without a plotting library.
    image = (counts / counts.sum(1, keepdim=True).clamp(min=1)).float()
    image = image.repeat_interleave(16, 0).repeat_interleave(16, 1)
    with SummaryWriter(os.path.join(folder, "tb")) as writer:
        writer.add_image("eval/confusion", image, dataformats="HW")
    worst = min(range(len(names)), key=per_class.__getitem__)
    print(f"per-class top-1 in {path}; lowest: {names[worst]} {per_class[worst]:.2f}", file=sys.stderr)


def cli() -> None:
    """The console script's entry point."""
    run_main(main)


if __name__ == "__main__":
    cli()
