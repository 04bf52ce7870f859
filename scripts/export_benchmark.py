"""Serving speed of one exported model: ONNX Runtime against eager PyTorch and the torch.export program (.pt2).

    python scripts/export_benchmark.py                                   # convnext_tiny and convnext_atto, 224 px
    python scripts/export_benchmark.py --models convnext_tiny --batches 1,32 --threads 2 --repeats 5

Each model (random weights: speed does not depend on them) is exported once as models.export does it (the same
torch.export capture for the .pt2 program and the ONNX file, whose logits are checked against PyTorch), then every
runtime runs the same batch in turn, repeat after repeat, so that a machine slowing down shifts all of them alike.
Images/s are medians over the repeats, ratios the median of each repeat's own ratio. fp32, inference mode, CPU; each
runtime gets --threads threads. The last stdout line is the JSON record.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from core.cli import run_main
from models import create_model
from models.serving.check import Inputs, compare
from models.serving.graph import DEFAULT_OPSET, onnx_bytes, onnx_runner, program
from models.serving.source import Source
from models.view import config_view

RUNTIMES = ("eager", "pt2", "onnxruntime")


def runtimes(name: str, size: int) -> dict:
    """name -> (batch -> logits) for one model, checked to agree."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=1000).eval()
    source = Source(model, [str(i) for i in range(1000)], config_view(None, [f"data.img_size={size}"], 3))
    module = program(source).module()
    onnx_run = onnx_runner(onnx_bytes(source, DEFAULT_OPSET))
    print(compare(model, onnx_run, Inputs([("random inputs", torch.randn(2, 3, size, size))]), "ONNX Runtime"))
    return {"eager": model, "pt2": module, "onnxruntime": onnx_run}


def seconds(run, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(calls):
            run(x)
    return (time.perf_counter() - start) / calls


def measure(runs: dict, batch: int, size: int, repeats: int, min_s: float) -> dict:
    x = torch.randn(batch, 3, size, size)
    calls = {}
    for key, run in runs.items():  # one call to warm up, and as many calls as make a repeat last min_s
        calls[key] = max(1, round(min_s / max(seconds(run, x, 1), 1e-4)))
    times = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            times[key].append(seconds(run, x, calls[key]))
    speed = {key: batch / statistics.median(t) for key, t in times.items()}
    ratios = {f"onnxruntime_over_{key}": statistics.median(a / b for a, b in zip(times[key], times["onnxruntime"]))
              for key in ("eager", "pt2")}
    return {"img_per_s": speed, **ratios}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="convnext_tiny,convnext_atto")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-s", type=float, default=1.0, help="least seconds a repeat of one runtime lasts")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # ONNX Runtime's session takes torch's count (graph.onnx_runner)
    record = {"threads": args.threads, "size": args.size, "results": []}
    print(f"{'model':<15}{'batch':>6}" + "".join(f"{k + ' img/s':>18}" for k in RUNTIMES) + f"{'ORT/eager':>11}"
          f"{'ORT/pt2':>9}")
    for name in args.models.split(","):
        runs = runtimes(name, args.size)
        for batch in map(int, args.batches.split(",")):
            found = measure(runs, batch, args.size, args.repeats, args.min_s)
            record["results"].append({"model": name, "batch": batch, **found})
            print(f"{name:<15}{batch:>6}" + "".join(f"{found['img_per_s'][k]:>18.1f}" for k in RUNTIMES) +
                  f"{found['onnxruntime_over_eager']:>11.2f}{found['onnxruntime_over_pt2']:>9.2f}", flush=True)
    print(json.dumps(record))


if __name__ == "__main__":
    run_main(main)
