"""Where the time goes: images/s of the bare model step, of the trainer's step path and of the real data pipeline.

    python scripts/benchmark.py --config configs/fashion_mnist.yaml [--json OUT] [key=value ...]
    torchrun --nproc_per_node=2 scripts/benchmark.py --config configs/debug.yaml
    python scripts/benchmark.py --config configs/convnext_t.yaml data.name=synthetic train.amp=bf16 --vs-timm
    python scripts/benchmark.py --config configs/convnext_t.yaml --modes eval data.name=synthetic \
        data.synthetic_val_size=6400    # evaluation img/s at steady state: 25 batches of 256 a pass
    python scripts/testbed.py /tmp/bed    # 1,000 + 100 ImageNet-like JPEGs
    python scripts/benchmark.py --config configs/convnext_t.yaml --modes bare,loader,timm_loader --stages 200 \
        --steps 2 --loader-steps 20 data.root=/tmp/bed data.num_workers=2 data.batch_size=32
    python scripts/testbed.py /tmp/bed --parquet /tmp/bed_hf    # the same also as a Hugging Face data set
    python scripts/benchmark.py --config configs/convnext_t.yaml --modes loader,other_loader \
        --other-data "data.name=hf data.hf_name=/tmp/bed_hf" data.root=/tmp/bed data.num_workers=2

Three loops with the same model, batch, precision, memory format and optimizer, run in turn repeat after repeat so
that a machine getting faster or slower shifts all three alike:
  bare      forward, backward and optimizer step on one batch held on the device: the ceiling;
  trainer   engine.loop.train_one_epoch on that same batch, with all it does per step: mixup, schedule, EMA, loss
            reduction and logging, the stop-signal check, the DDP wrapper when there are several processes;
  pipeline  the same with the config's real data loader (and its copy to the device);
  eval      engine.loop.evaluate (eval.py's loop) over the real evaluation loader at steady state: its workers
            started and cuDNN tuned in --warmup untimed batches, then the rest of the split's full batches timed.
Three loader modes fetch batches and drop them, with the config's workers: `loader` ours, `other_loader` ours on
another copy of the images (--other-data, e.g. the same test bed as a Hugging Face data set), `timm_loader` timm's
own create_loader with the same recipe on the same image folder (imagenet recipe; its GPU prefetcher where there is
CUDA). Each: images/s per worker and per core, and the cores per GPU at --gpu-img-per-s; other_loader/loader and
ours/timm as ratios. --stages N also times each stage of both pipelines on N files in this process
(scripts/loader_stages.py), and the batch work ours leaves to the device per image next to the bare step's time per
image.
Each repeat times --steps optimizer steps after --warmup untimed ones; figures are medians over the repeats, ratios
the median of each repeat's own ratio. --vs-timm also times forward+backward of timm's convnext_<variant>, built
with the same options, against ours. Model FLOP utilisation (MFU) is against a known GPU's data-sheet peak (bf16/fp16)
or --peak-tflops, times the GPUs in use; on a CPU against the best matmul in the training dtype (2048^3, smaller
where the dtype is emulated), timed after every repeat. --forbid-syncs (CUDA only) runs the timed steps of bare and
trainer under torch.cuda.set_sync_debug_mode("error"), the trainer's log steps excepted (they read the loss back on
purpose): a host-device sync that creeps into a training step fails the run, naming the line that made it. The last
stdout line is the JSON record (also written to --json).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from benchmark_flops import gpus_used, known_peak_tflops, matmul_tflops  # scripts/, beside this file, as the 3 below
from benchmark_modes import MODES, NOT_TRAINING, build_runs
from benchmark_report import jpeg_decoder, loader_summary, print_table, stages_summary, summarize
from benchmark_timing import measure
from core.cli import run_main
from core.files import atomic_write
from data import loader_workers
from engine.build import set_up
from engine.logging import RunLogger
from engine.precision import AMP_DTYPES


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per repeat")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them, every repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default="bare,trainer,pipeline,loader",
                        help=f"comma-separated, timed in this order: {', '.join(MODES)}")
    parser.add_argument("--other-data", default="", metavar="OVERRIDES",
                        help="other_loader: our loader of the config with these data overrides instead, e.g. "
                             "'data.name=hf data.hf_name=/tmp/bed_hf' (other_loader_over_loader: the two data sets)")
    parser.add_argument("--vs-timm", action="store_true", help="also time forward+backward of ours against timm's")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak, for FLOP utilisation")
    parser.add_argument("--loader-steps", type=int, default=0, metavar="N",
                        help="batches the loader modes time per repeat (default: the rest of an epoch after "
                             "--warmup, so that no worker is still prefetching when the next mode starts)")
    parser.add_argument("--stages", type=int, default=0, metavar="N",
                        help="with the loader modes: time each stage of both pipelines on N training files")
    parser.add_argument("--gpu-img-per-s", type=float, default=2400.0,
                        help="a GPU's training rate, for the loader cores it needs (default: ConvNeXt-T, bf16, "
                             "about 3x timm's published RTX 3090 figure)")
    parser.add_argument("--forbid-syncs", action="store_true",
                        help="on CUDA, a host-device sync in a timed step of bare or trainer (log steps excepted) "
                             "fails the run, naming the line (torch.cuda.set_sync_debug_mode); nothing on a CPU")
    parser.add_argument("--json", default="", help="also write the JSON record here")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1 or args.loader_steps < 0:
        parser.error("--warmup, --steps and --repeats must be at least 1")
    args.modes = [m for m in args.modes.split(",") if m]
    args.eval_steps = 0  # the eval mode's timed batches, set where the evaluation split's length is known
    if not args.modes or not set(args.modes) <= set(MODES):
        parser.error(f"--modes takes a comma-separated list of {', '.join(MODES)}; got {','.join(args.modes)!r}")
    if ("other_loader" in args.modes) != bool(args.other_data):
        parser.error("--modes other_loader and --other-data go together")
    return args


def main() -> int:
    args = parse_args()
    cfg, ctx, data = set_up(args.config, args.overrides, training=True)
    env, device = ctx.env, ctx.device
    with tempfile.TemporaryDirectory() as log_dir, open(os.devnull, "w") as devnull:
        logger = RunLogger(log_dir, enabled=env.is_main, bar_file=devnull)  # the bar's work is done, not shown
        runs, flops, global_batch, raw_images = build_runs(cfg, args, env, device, data, logger)
        peak, peak_source = known_peak_tflops(device, cfg.train.amp, args.peak_tflops)
        # On a CPU the yardstick is measured at every repeat, as the machine's speed drifts; its best is the peak.
        # Only for a training mode: the others have no FLOP utilisation.
        yardstick = (lambda: matmul_tflops(AMP_DTYPES[cfg.train.amp] or torch.float32)) \
            if device.type == "cpu" and not peak and set(runs) - set(NOT_TRAINING) else None
        rates, memory, peaks = measure(runs, args, device, yardstick)
        logger.close()
    if peaks:
        peak, n = max(peaks)
        peak_source = f"the best {n}^3 matmul of {len(peaks)} here, all ranks together"
    elif peak:  # a data-sheet peak is one GPU's; the images per second are every rank's
        gpus = gpus_used(device)
        peak, peak_source = peak * gpus, f"{peak_source} x {gpus} GPU{'s' * (gpus > 1)}"
    record = summarize(rates, memory, flops, peak)
    record.update(peak_tflops=peak, peak_source=peak_source, matmul_tflops_repeats=[p for p, _ in peaks])
    record.update(device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                  threads=torch.get_num_threads(), world_size=env.world_size,
                  global_batch=global_batch, config=args.config,
                  overrides=args.overrides, amp=cfg.train.amp, channels_last=cfg.train.channels_last,
                  compile=cfg.train.compile, grad_checkpointing=cfg.train.grad_checkpointing,
                  num_workers=loader_workers(cfg.data), steps=args.steps, loader_steps=args.loader_steps,
                  eval_steps=args.eval_steps, eval_batch=data.val_loader.batch_size if data.val_loader else 0,
                  warmup=args.warmup,
                  repeats=args.repeats, sync_guard=args.forbid_syncs and device.type == "cuda",
                  jpeg_decoder=jpeg_decoder(), torch=torch.__version__)
    record.update(loader_summary(record, cfg, args, env))
    if args.stages:
        record.update(stages_summary(record, cfg, args, data.train_transform, raw_images))
    if env.is_main:
        print_table(record)
        if args.json:
            atomic_write(args.json, lambda f: f.write(json.dumps(record, indent=1) + "\n"), binary=False)
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    run_main(main)
