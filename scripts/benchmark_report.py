"""scripts/benchmark.py's record and table: medians and ratios of the repeats, FLOP utilisation, the loader modes'
rates per worker and per core, --stages' per-stage times, and the table printed before the JSON."""
from __future__ import annotations

import argparse
import os
import statistics

import data.decoding.jpeg_region as jpeg_region
import distributed_utils as du
import loader_stages  # scripts/, beside this file, as benchmark_modes
from benchmark_modes import LOADER_MODES, NOT_TRAINING
from core.config import Config
from core.errors import UserError
from data import loader_workers


def jpeg_decoder() -> str:
    """What the loader decodes JPEGs with here (data.decoding.jpeg.region_decodable; its workers load the same library)."""
    return "region (libjpeg-turbo)" if jpeg_region.available() else "pillow"


def loader_summary(record: dict, cfg: Config, args: argparse.Namespace, env: du.DistEnv) -> dict:
    """Per worker and per core rates of the loader modes, ours/timm (the median of the repeats' own ratios), and
    the cores per GPU at --gpu-img-per-s. A core is a worker while there are no more workers than cores."""
    workers = max(1, loader_workers(cfg.data)) * env.world_size
    cores = min(workers, len(os.sched_getaffinity(0)))
    out: dict = {"loader_workers": workers, "loader_cores": cores, "gpu_img_per_s": args.gpu_img_per_s}
    for mode in LOADER_MODES:
        if mode in record["img_per_s_repeats"]:
            rate = record[f"{mode}_img_per_s"]
            out[f"{mode}_img_per_s_per_worker"] = rate / workers
            out[f"{mode}_img_per_s_per_core"] = rate / cores
            out[f"{mode}_cores_per_gpu"] = args.gpu_img_per_s / (rate / cores)
    repeats = record["img_per_s_repeats"]
    for top, bottom, name in (("loader", "timm_loader", "loader_over_timm"),
                              ("other_loader", "loader", "other_loader_over_loader")):
        if top in repeats and bottom in repeats:
            out[name] = statistics.median(a / b for a, b in zip(repeats[top], repeats[bottom]))
    return out


def stages_summary(record: dict, cfg: Config, args: argparse.Namespace, transform, raw_images) -> dict:
    """Each stage of both pipelines in ms per image on one thread (--stages files), and the device's batch work
    per image next to the bare step's."""
    if cfg.data.name != "imagefolder" or cfg.data.recipe != "imagenet":
        raise UserError("--stages times the imagenet recipe on an image folder: set data.name=imagefolder, "
                        "data.recipe=imagenet and data.root")
    from torchvision.datasets import ImageFolder

    samples = ImageFolder(os.path.join(cfg.data.root, "train")).samples
    files = [path for path, _ in samples[::max(1, len(samples) // args.stages)][:args.stages]]
    stages = loader_stages.stage_times(cfg, files, args.repeats)
    out: dict = {"stages_ms_per_img": stages, "stages_files": len(files),
                 "stages_ours_over_timm": stages["timm"]["total"] / stages["ours"]["total"]}
    if transform is not None:
        out["device_batch_ms_per_img"] = loader_stages.device_ms_per_image(transform, raw_images, args.repeats)
    if "bare" in record["img_per_s_repeats"]:
        out["step_ms_per_img"] = 1e3 / record["bare_img_per_s"]
    return out


def summarize(rates: dict[str, list[float]], memory: dict[str, float], flops: float, peak: float) -> dict:
    record: dict = {f"{k}_img_per_s": statistics.median(v) for k, v in rates.items()}
    for top, bottom in (("trainer", "bare"), ("pipeline", "trainer"), ("ours_fwd_bwd", "timm_fwd_bwd")):
        if top in rates and bottom in rates:
            short = top.removesuffix("_fwd_bwd") + "_over_" + bottom.removesuffix("_fwd_bwd")
            record[short] = statistics.median(a / b for a, b in zip(rates[top], rates[bottom]))
    record["img_per_s_repeats"] = rates
    record["peak_mem_mb"] = memory
    record["forward_gflops_per_img"] = flops / 1e9
    # Training costs about 3 forwards (the backward computes gradients for inputs and for weights).
    record["train_tflops_per_s"] = {k: 3 * flops * statistics.median(v) / 1e12 for k, v in rates.items()
                                    if k not in NOT_TRAINING}
    if peak:
        record["mfu"] = {k: v / peak for k, v in record["train_tflops_per_s"].items()}
    return record


def print_table(record: dict) -> None:
    cpu = record["device"] == "cpu"
    print(f"\n{record['config']} {' '.join(record['overrides'])} on {record['device']} "
          f"({record['threads']} threads x {record['world_size']} processes): global batch {record['global_batch']},"
          f" amp {record['amp']}, channels_last {record['channels_last']}, compile {record['compile']}, "
          f"grad checkpointing {record['grad_checkpointing']}; median of {record['repeats']} x {record['steps']} steps"
          + (f"; peak resident memory {max(record['peak_mem_mb'].values()):.0f} MB" if cpu else ""))
    for name, values in record["img_per_s_repeats"].items():
        line = f"  {name:14s} {record[name + '_img_per_s']:9.1f} img/s"
        if not cpu:
            line += f"  peak mem {record['peak_mem_mb'][name]:7.0f} MB"
        if name in record["train_tflops_per_s"]:
            line += f"  {record['train_tflops_per_s'][name]:.3f} TFLOP/s"
        if name in record.get("mfu", {}):
            line += f"  MFU {record['mfu'][name]:.1%}"
        print(line + "   repeats: " + " ".join(f"{v:.0f}" for v in values))
    if record["peak_tflops"]:
        print(f"  MFU: of {record['peak_tflops']:.3f} TFLOP/s ({record['peak_source']})")
    ratios = [k for k in ("trainer_over_bare", "pipeline_over_trainer", "ours_over_timm", "loader_over_timm",
                          "other_loader_over_loader") if k in record]
    print("  " + "   ".join(f"{k.replace('_over_', '/')} {record[k]:.3f}" for k in ratios))
    for mode in LOADER_MODES:
        if f"{mode}_img_per_s_per_core" in record:
            print(f"  {mode:14s} {record[f'{mode}_img_per_s_per_core']:7.1f} img/s per core ({record['loader_workers']}"
                  f" workers on {record['loader_cores']} cores): {record[f'{mode}_cores_per_gpu']:.1f} cores per GPU "
                  f"at {record['gpu_img_per_s']:.0f} img/s")
    if "stages_ms_per_img" in record:
        print_stages(record)


def print_stages(record: dict) -> None:
    stages = record["stages_ms_per_img"]
    print(f"  ms per image on one thread ({record['stages_files']} files): " + " | ".join(
        f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in stages[name].items()) for name in stages))
    print(f"  timm/ours per image {record['stages_ours_over_timm']:.3f}"
          + (f"; the device's batch work {record['device_batch_ms_per_img']:.3f} ms per image"
             if "device_batch_ms_per_img" in record else "")
          + (f" next to the step's {record['step_ms_per_img']:.3f}" if "step_ms_per_img" in record else ""))
