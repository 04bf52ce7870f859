"""How long a checkpoint holds the training ranks: a write in the training process against one in the background.

    python scripts/checkpoint_benchmark.py --config configs/convnext_b.yaml
    torchrun --nproc_per_node=2 scripts/checkpoint_benchmark.py --config configs/convnext_t.yaml train.threads=1

The config's model with EMA and AdamW state (one training step in), trained at a small image size on synthetic
data so that a step takes well under a second on a CPU; the state saved is the full model's whatever the image
size. Each repeat, in turn:
  steps      --steps training steps without a checkpoint: the step time;
  inline     one save written in the training process (checkpoint.background=false);
  background one save handed to the writer process, then training steps until its write is on disk.
"Blocked" is the time from the save's start until every rank is past it (a barrier after it): what the ranks lose
to the save. "Write" is the writer's time for the whole file (serialise, write, fsync, rename, prune); the steps
during it show what the background write costs the training, and "cost" adds it all up: the time blocked plus what
the steps during the write took beyond the step time. Figures are medians over the repeats. The last
stdout line is the JSON record.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

import distributed_utils as du
from benchmark_modes import Repeated  # scripts/, beside this file
from core.cli import run_main
from core.config import CheckpointCfg, to_dict
from engine.build import build_model, build_parts, set_up, wrap_model
from engine.checkpointing import Checkpointer, RunState
from engine.checkpointing.writer import tensors_in
from engine.logging import RunLogger
from engine.loop import to_device, train_one_epoch

SMALL = ["data.name=synthetic", "data.img_size=64", "data.batch_size=8", "data.num_workers=0", "ema.enabled=true",
         "model.pretrained=", "train.amp=none", "train.compile=false", "train.global_batch=0",
         "train.accum_steps=1"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=5, help="training steps timed without a checkpoint, a repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="", help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help=f"config overrides, after these: {' '.join(SMALL)}")
    return parser.parse_args(argv)


class Trainer:
    """Training steps of the config's model on one batch held in memory; times each step on rank 0."""

    def __init__(self, parts, batch, global_batch: int):
        self.parts, self.batch, self.global_batch, self.run = parts, batch, global_batch, RunState()
        self.logger = RunLogger("", enabled=False)
        self.times: list[float] = []

    def steps(self, n: int) -> list[float]:
        """Run n steps; their times."""
        self.times, last = [], [time.perf_counter()]

        def clock() -> None:
            now = time.perf_counter()
            self.times.append(now - last[0])
            last[0] = now

        train_one_epoch(self.parts, Repeated(self.batch, n), self.run, logger=self.logger, log_every=10**9,
                        global_batch=self.global_batch, on_step=clock)
        return self.times


def blocked(checkpointer: Checkpointer) -> float:
    """Seconds from a save's start until every rank is past it."""
    du.barrier()
    start = time.perf_counter()
    checkpointer.save()
    du.barrier()
    return time.perf_counter() - start


def steps_until_written(trainer: Trainer, checkpointer: Checkpointer) -> list[float]:
    """Train, a step at a time, until rank 0's background write is on disk (all ranks agree each step)."""
    times: list[float] = []
    while du.any_rank(checkpointer.writer is not None and not checkpointer.writer.done()):
        times += trainer.steps(1)
    checkpointer.wait()
    return times


def main() -> int:
    args = parse_args()
    cfg, ctx, data = set_up(args.config, [*SMALL, *args.overrides], training=True)
    model = build_model(cfg, data.info.num_classes, data.info.in_chans, ctx.device)
    parts, global_batch, _ = build_parts(cfg, model, data, ctx.device, ctx.env.world_size)
    parts.model = wrap_model(model, cfg, ctx.env.distributed, ctx.device)
    images, labels = to_device(*next(iter(data.train_loader)), ctx.device, cfg.train.channels_last)
    trainer = Trainer(parts, (images, labels), global_batch)
    trainer.steps(2)  # warm-up; AdamW's state exists from the first step
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir or None) as folder:
        checkpointers = {kind: Checkpointer(os.path.join(folder, kind), CheckpointCfg(keep_last=1, background=bg),
                                            trainer.run, model=model, ema=parts.ema, optimizer=parts.optimizer,
                                            scaler=parts.scaler, config=to_dict(cfg))
                         for kind, bg in (("inline", False), ("background", True))}
        state_bytes = sum(t.nbytes for t in tensors_in(checkpointers["inline"].state_dict()))
        rows: dict[str, list[float]] = {}
        for repeat in range(args.repeats):
            row = {"step_s": statistics.median(trainer.steps(args.steps)),
                   "inline_blocked_s": blocked(checkpointers["inline"]),
                   "background_blocked_s": blocked(checkpointers["background"])}
            during = steps_until_written(trainer, checkpointers["background"])
            writer = checkpointers["background"].writer
            row.update(background_write_s=writer.last_write_s if writer else 0.0,
                       steps_during_write=len(during), step_during_write_s=statistics.median(during) if during else 0.0,
                       background_cost_s=row["background_blocked_s"] + sum(during) - len(during) * row["step_s"])
            for key, value in row.items():
                rows.setdefault(key, []).append(value)
            du.print0(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
        for checkpointer in checkpointers.values():
            checkpointer.close()
    record = {k: statistics.median(v) for k, v in rows.items()}
    record.update(repeats=rows, model=cfg.model.name, state_gb=state_bytes / 1e9, world_size=ctx.env.world_size,
                  threads=torch.get_num_threads(), device=str(ctx.device), config=args.config, overrides=args.overrides)
    record["blocked_background_over_inline"] = statistics.median(
        b / a for a, b in zip(rows["inline_blocked_s"], rows["background_blocked_s"]))
    du.print0(f"{cfg.model.name}, {record['state_gb']:.2f} GB of state, {ctx.env.world_size} process(es): ranks "
              f"blocked {record['inline_blocked_s']:.3f} s a save written inline, "
              f"{record['background_blocked_s']:.3f} s in the background "
              f"({record['blocked_background_over_inline']:.3f}x), whose write took "
              f"{record['background_write_s']:.2f} s; a step {record['step_s']:.3f} s, {record['step_during_write_s']:.3f} s during the write: "
              f"{record['background_cost_s']:.3f} s lost to a background save in all")
    du.print0(json.dumps(record))
    return 0


if __name__ == "__main__":
    run_main(main)
