"""predict.py's images/s against timm's building blocks doing the same job on the same JPEGs and weights.

    python scripts/testbed.py /tmp/bed                      # 100 validation JPEGs in /tmp/bed/val
    python scripts/benchmark_predict.py /tmp/bed/val --repeats 3

Ours: `python predict.py` on a checkpoint of a seeded ConvNeXt-T (configs/convnext_t.yaml's eval view: 224 px,
crop_pct 0.875, bicubic) in fp32 and NCHW, as timm's script runs by default (the recipe's bf16 is emulated, many
times slower, on a CPU without AVX512-BF16); its own speed line (the prediction loop, loader workers included,
start-up not). timm's: not its inference.py (not shipped in the wheel) but what that script builds:
timm.data.create_dataset + create_loader (eval transforms at the same view, the same workers and batch) and
timm.create_model('convnext_tiny') holding the same weights, softmax and top-5 per batch, timed from the first
batch asked for to the last. Repeats alternate the two, so a machine that speeds up or slows down shifts both.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import timm
import torch
from timm.data import create_dataset, create_loader

from core.config import load_config, to_dict
from data import loader_workers
from models import create_model
from models.keys import official_to_timm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIEW = ["data.img_size=224", "data.crop_pct=0.875", "aug.interpolation=bicubic", "data.name=synthetic",
        "train.amp=none", "train.channels_last=false"]  # as timm's inference.py runs by default: fp32, NCHW


def ours(checkpoint: str, folder: str, batch: int) -> float:
    """predict.py's images/s, from its last line on stderr."""
    out = os.path.join(os.path.dirname(checkpoint), "predictions.csv")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), "--checkpoint", checkpoint, folder,
                           "--out", out, f"data.eval_batch_size={batch}"], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"predict.py failed: {proc.stderr.strip()}")
    return float(re.search(r"\(([\d.]+) img/s\)", proc.stderr.splitlines()[-1])[1])


@torch.no_grad()
def timms(model: torch.nn.Module, folder: str, batch: int, workers: int) -> float:
    """timm's dataset, loader and model: images/s of softmax + top-5 over the folder."""
    dataset = create_dataset("", root=folder)
    loader = create_loader(dataset, input_size=(3, 224, 224), batch_size=batch, use_prefetcher=False,
                           interpolation="bicubic", crop_pct=0.875, num_workers=workers)
    start, count = time.perf_counter(), 0
    for images, _ in loader:
        model(images).softmax(1).topk(5)
        count += len(images)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a folder of images (e.g. the test bed's val/)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    cfg = load_config(os.path.join(ROOT, "configs", "convnext_t.yaml"), VIEW)
    torch.manual_seed(0)
    model = create_model(**cfg.model.create_args(), num_classes=1000).eval()
    theirs = timm.create_model("convnext_tiny", num_classes=1000).eval()
    theirs.load_state_dict(official_to_timm(model.state_dict()))
    workers = loader_workers(cfg.data)  # what predict.py's loader gets on this machine
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "convnext_t.pth")
        torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, checkpoint)
        runs = [(ours(checkpoint, args.folder, args.batch), timms(theirs, args.folder, args.batch, workers))
                for _ in range(args.repeats)]
    for i, (a, b) in enumerate(runs):
        print(f"repeat {i}: predict.py {a:.2f} img/s, timm {b:.2f} img/s, ratio {a / b:.3f}")
    record = {"ours_img_per_s": statistics.median(a for a, _ in runs),
              "timm_img_per_s": statistics.median(b for _, b in runs),
              "ours_over_timm": statistics.median(a / b for a, b in runs), "workers": workers,
              "threads": torch.get_num_threads(), "batch": args.batch, "images": len(create_dataset("", args.folder))}
    print(json.dumps(record))


if __name__ == "__main__":
    main()
