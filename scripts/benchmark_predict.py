"""predict.py's images/s against timm's inference.py, and timm's building blocks, on the same JPEGs and weights.

    python scripts/testbed.py /tmp/bed                      # 100 validation JPEGs in /tmp/bed/val
    python scripts/benchmark_predict.py /tmp/bed/val --repeats 3 [--timm-inference PATH/inference.py]

Ours: `python predict.py` on a checkpoint of a seeded ConvNeXt-T (configs/convnext_t.yaml's eval view: 224 px,
crop_pct 0.875, bicubic) in fp32 and NCHW, as timm's script runs by default (the recipe's bf16 is emulated, many
times slower, on a CPU without AVX512-BF16); its own speed line (the prediction loop, loader workers included,
start-up not). timm's inference.py (--timm-inference: the script from a checkout of huggingface/pytorch-image-models;
the wheel does not ship it) on the same weights in timm's layout, view, batch and workers, top-5 to a CSV: its own
timing of the loop (the average batch time of its last log line, every batch logged, times the batches), start-up
not counted either. timm's blocks: what that script builds, in this process: timm.data.create_dataset +
create_loader and timm.create_model('convnext_tiny') holding the same weights, softmax and top-5 per batch, timed
from the first batch asked for to the last. Repeats alternate them, so a machine that speeds up or slows down
shifts all alike.
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


def timm_script(script: str, weights: str, folder: str, images: int, batch: int, workers: int) -> float:
    """timm's inference.py's images/s over the folder's `images`: its average batch time (every batch logged) x
    batches."""
    out = os.path.dirname(weights)
    proc = subprocess.run([sys.executable, script, folder, "--model", "convnext_tiny", "--checkpoint", weights,
                           "--num-classes", "1000", "--device", "cpu", "-b", str(batch), "-j", str(workers),
                           "--img-size", "224", "--crop-pct", "0.875", "--interpolation", "bicubic", "--topk", "5",
                           "--log-freq", "1", "--results-dir", out, "--label-type", "none",
                           "--no-console-results"], capture_output=True, text=True, cwd=out)
    logged = re.findall(r"Predict: \[(\d+)/(\d+)\] Time [\d.]+ \(([\d.]+)\)", proc.stdout + proc.stderr)
    if proc.returncode or not logged:
        sys.exit(f"timm's inference.py failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    _, batches, average = logged[-1]
    return images / (float(average) * int(batches))


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
    parser.add_argument("--timm-inference", default="", metavar="PATH",
                        help="timm's inference.py (from a checkout of huggingface/pytorch-image-models at the "
                             "installed timm's version) to time too")
    args = parser.parse_args()
    cfg = load_config(os.path.join(ROOT, "configs", "convnext_t.yaml"), VIEW)
    torch.manual_seed(0)
    model = create_model(**cfg.model.create_args(), num_classes=1000).eval()
    theirs = timm.create_model("convnext_tiny", num_classes=1000).eval()
    theirs.load_state_dict(official_to_timm(model.state_dict()))
    workers = loader_workers(cfg.data)  # what predict.py's loader gets on this machine
    images = len(create_dataset("", args.folder))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, timm_weights = os.path.join(tmp, "convnext_t.pth"), os.path.join(tmp, "convnext_tiny_timm.pth")
        torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, checkpoint)
        torch.save(theirs.state_dict(), timm_weights)
        runs = []
        for i in range(args.repeats):
            run = {"ours": ours(checkpoint, args.folder, args.batch),
                   "timm_blocks": timms(theirs, args.folder, args.batch, workers)}
            if args.timm_inference:
                run["timm_inference_py"] = timm_script(args.timm_inference, timm_weights, args.folder, images,
                                                       args.batch, workers)
            print(f"repeat {i}: " + ", ".join(f"{name} {rate:.2f} img/s" for name, rate in run.items()))
            runs.append(run)
    record = {f"{name}_img_per_s": statistics.median(r[name] for r in runs) for name in runs[0]}
    record.update({f"ours_over_{name}": statistics.median(r["ours"] / r[name] for r in runs)
                   for name in runs[0] if name != "ours"})
    record.update(workers=workers, threads=torch.get_num_threads(), batch=args.batch, images=images)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
