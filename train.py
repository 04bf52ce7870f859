"""Train a ConvNeXt image classifier, on one process or many.

    python train.py --config configs/debug.yaml                          # one process, GPU or CPU
    torchrun --nproc_per_node=8 train.py --config configs/convnext_t.yaml
    sbatch scripts/slurm/train.sbatch configs/convnext_t.yaml            # one task per GPU

Any config key can be overridden after the options: `optim.lr=1e-3 data.batch_size=64`.
A run writes <output_dir>/{config.yaml, metrics.jsonl, tb/, checkpoints/{last,best}.pth} and resumes
from checkpoints/last.pth when it is started again with the same output_dir.
"""
from __future__ import annotations

import argparse

import torch

import distributed_utils as du
from core.cli import run_main
from core.config import Config, to_dict
from data import sample_images, skipped_images, start_epoch
from engine.build import RunData, build_model, build_parts, seed_everything, set_up, wrap_model
from engine.checkpointing import Checkpointer, RunState, checkpoint_dir, will_resume
from engine.logging import RunLogger, new_wandb_id, wandb_options
from engine.loop import EpochEnd, TrainParts, evaluate, train_one_epoch
from engine.optim import describe_groups
from engine.preemption import EXIT_PREEMPTED, StopRequest
from engine.profiling import start_profiler, stop_profiler
from models.whitening import whiten_stem


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/fashion_mnist.yaml")
    parser.add_argument("--resume", default="", help="checkpoint to start from "
                        "(default: <output_dir>/checkpoints/last.pth when it exists)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser.parse_args(argv)


def main() -> int:
    stop = StopRequest()  # first, so a stop signal during start-up is kept for the first agreed step
    args = parse_args()
    cfg, ctx, data = set_up(args.config, args.overrides, training=True, write_config=True)
    env, device = ctx.env, ctx.device
    model = training_model(cfg, data, device, env.rank, resuming=will_resume(args.resume, cfg.output_dir))
    parts, global_batch, lr = build_parts(cfg, model, data, device, env.world_size)
    describe_run(cfg, ctx, parts, global_batch, lr, data.steps_per_epoch)

    run = RunState()
    checkpoints = Checkpointer(cfg.output_dir, cfg.checkpoint, run, model=model, ema=parts.ema,
                               optimizer=parts.optimizer, scaler=parts.scaler, config=to_dict(cfg),
                               class_names=data.info.class_names)
    with checkpoints:  # leaves with the last checkpoint on disk, whatever ends the run
        checkpoints.resume(args.resume)
        parts.model = wrap_model(model, cfg, env.distributed, device)
        run.wandb_id = run.wandb_id or (new_wandb_id() if cfg.log.wandb else "")
        logger = RunLogger(cfg.output_dir, enabled=env.is_main, wandb=wandb_options(cfg.log, run.wandb_id, cfg))
        profiler = start_profiler(cfg.train, cfg.output_dir, device, env.rank)
        skipped = skipped_total(data.train_set, device) if cfg.data.skip_corrupt else 0  # the stem's sample's
        stopped = False
        while run.epoch < cfg.schedule.epochs and not stopped:
            start_epoch(data.train_loader, run.epoch, start=run.epoch_samples)
            ended = train_one_epoch(parts, data.train_loader, run, logger=logger, log_every=cfg.train.log_every,
                                    global_batch=global_batch, stop=stop, checkpointer=checkpoints,
                                    on_step=profiler.step if profiler else None)
            stopped = ended is EpochEnd.STOP_REQUESTED
            if stopped:
                checkpoints.save()
                checkpoints.wait()
                du.print0(f"stopped by a signal at epoch {run.epoch}, step {run.step}; checkpoint written, start "
                          f"the run again to continue")
                continue
            if cfg.data.skip_corrupt:
                skipped = report_skipped(data.train_set, run.epoch, skipped, device)
            epoch, top1 = run.epoch, None
            run.end_epoch()
            if evaluates_after(cfg, run.epoch):
                record = evaluate_run(parts, data, cfg, epoch)
                logger.log("eval", record, run.step)
                top1 = max(record["top1"], record.get("ema_top1", -1.0))  # the better of the raw and EMA weights
            checkpoints.save(score=top1)
        stop_profiler(profiler)
        logger.close()
    du.barrier()  # no rank exits (and makes srun kill the rest) before rank 0's checkpoint is on disk
    if stopped:
        return EXIT_PREEMPTED
    best = f"best top-1 {run.best_top1:.2f}" if cfg.train.eval_every else "no evaluation (train.eval_every=0)"
    du.print0(f"done: {best}; checkpoints in {checkpoint_dir(cfg.output_dir)}")
    return 0


def training_model(cfg: Config, data: RunData, device: torch.device, rank: int, resuming: bool) -> torch.nn.Module:
    """The model to train, the same on every rank; then each rank's own random streams."""
    seed_everything(cfg.seed)  # the same init on every rank (DDP would broadcast rank 0's anyway)
    model = build_model(cfg, data.info.num_classes, data.info.in_chans, device)
    if cfg.model.stem_init == "whiten" and not resuming:  # before the EMA copies the model; a resumed run has its stem
        filters = whiten_stem(model, sample_images(data.train_set, cfg.data))
        du.print0(f"model.stem_init=whiten: {filters} of {model.downsample_layers[0][0].out_channels} stem filters "
                  f"set to +- the whitening of the training images' patches")
    seed_everything(cfg.seed + rank)  # augmentation, mixup and drop path differ per rank
    return model


def describe_run(cfg: Config, ctx: du.DistContext, parts: TrainParts, global_batch: int, lr: float,
                 steps_per_epoch: int) -> None:
    if cfg.optim.layer_decay < 1 or cfg.optim.freeze_stages or cfg.optim.head_only:
        du.print0(f"trained parameters by layer, lr scale (optim.layer_decay={cfg.optim.layer_decay:g}): "
                  f"{describe_groups(parts.optimizer.param_groups)}")
    env = ctx.env
    du.print0(f"{env.launcher}: world {env.world_size} on {ctx.device} ({ctx.backend if env.distributed else 'no'} "
              f"backend) | global batch {global_batch} = {cfg.data.batch_size} x {env.world_size} processes x "
              f"{cfg.train.accum_steps} accum | lr {lr:.3g} = {cfg.optim.lr:g} x {global_batch}/"
              f"{cfg.optim.lr_base_batch} ({cfg.optim.lr_scaling}) | {steps_per_epoch} steps/epoch, "
              f"{steps_per_epoch * cfg.schedule.epochs} in all | amp {cfg.train.amp}")
    if not cfg.train.eval_every:
        du.print0("train.eval_every=0: no evaluation, so no best.pth (nor checkpoint.keep_best's files, which need "
                  "one); last.pth and the step files as ever")


def evaluates_after(cfg: Config, epochs_done: int) -> bool:
    """Whether the epoch just ended is evaluated: every train.eval_every epochs and the last; none with 0."""
    every = cfg.train.eval_every
    return bool(every) and (epochs_done == cfg.schedule.epochs or epochs_done % every == 0)


def skipped_total(train_set, device: torch.device) -> int:
    """Collective: the unreadable images (data.skip_corrupt) all ranks have skipped so far."""
    return int(du.all_reduce_sum(torch.tensor([float(skipped_images(train_set))], device=device)).item())


def report_skipped(train_set, epoch: int, before: int, device: torch.device) -> int:
    """Say how many unreadable images all ranks skipped this epoch; returns the total."""
    total = skipped_total(train_set, device)
    if total > before:
        du.print0(f"warning: epoch {epoch} skipped {total - before} unreadable training images (data.skip_corrupt); "
                  f"their paths are in the warnings above")
    return total


def evaluate_run(parts: TrainParts, data: RunData, cfg: Config, epoch: int) -> dict:
    """The eval record: the raw model's metrics, and the EMA's next to them as ema_*."""
    options = dict(amp=cfg.train.amp, channels_last=cfg.train.channels_last, tta=cfg.aug.tta,
                   batch_transform=data.eval_transform)
    record = {"epoch": epoch, **evaluate(parts.raw_model, data.val_loader, parts.device, **options)}
    if parts.ema is not None:
        ema = evaluate(parts.ema.module, data.val_loader, parts.device, **options)
        record.update({f"ema_{k}": v for k, v in ema.items() if k != "samples"})
    du.print0(f"epoch {epoch}: top-1 {record['top1']:.2f} top-5 {record['top5']:.2f} loss {record['loss']:.4f}"
              + (f" | EMA top-1 {record['ema_top1']:.2f}" if parts.ema is not None else "")
              + f" | {record['samples']} images")
    return record


def cli() -> None:
    """The console script's entry point."""
    run_main(main)


if __name__ == "__main__":
    cli()
