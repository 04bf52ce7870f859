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
import os
from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch import nn

import distributed_utils as du
from core.config import Config, ConfigError, save_config, to_dict
from core.files import load_checkpoint
from data import (batch_transforms, build_datasets, build_eval_loader, build_train_loader, sample_images,
                  skipped_images, start_epoch)
from engine.build import build_model, build_parts, init_process, load_run_config, seed_everything, wrap_model
from engine.checkpoint import (checkpoint_dir, load_latest, resume_candidates, rng_state, save_training_checkpoint,
                               set_rng_state)
from engine.logging import RunLogger, new_wandb_id, wandb_options
from engine.loop import NonFiniteLoss, TrainParts, evaluate, train_one_epoch
from engine.optim import accum_steps_for, describe_groups
from engine.precision import resolve_amp
from engine.preemption import EXIT_PREEMPTED, Preempted, StopRequest
from engine.profiling import StepProfiler, describe
from models.keys import load_weights
from models.whitening import whiten_stem


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/fashion_mnist.yaml")
    parser.add_argument("--resume", default="", help="checkpoint to start from "
                        "(default: <output_dir>/checkpoints/last.pth when it exists)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser.parse_args(argv)


@dataclass
class Progress:
    """Where a run stands: what a checkpoint must record to continue exactly."""
    epoch: int = 0  # the epoch to run (or continue) next
    epoch_samples: int = 0  # samples of that epoch's global order already trained on
    step: int = 0  # optimizer steps done in all
    best_top1: float = -1.0
    wandb_id: str = ""  # the W&B run this run logs to (log.wandb), continued on resume


def checkpoint_state(parts: TrainParts, cfg: Config, progress: Progress) -> dict:
    """Collective: every rank contributes its RNG state; the dict is complete on rank 0."""
    return {"model": parts.raw_model.state_dict(),
            "model_ema": parts.ema.module.state_dict() if parts.ema is not None else None,
            "optimizer": parts.optimizer.state_dict(), "scaler": parts.scaler.state_dict(),
            **asdict(progress), "bad_steps": parts.bad_steps, "world_size": du.get_world_size(),
            "rng": du.all_gather_object(rng_state()), "config": to_dict(cfg)}


def check_finite_weights(parts: TrainParts, progress: Progress) -> None:
    """Refuse to checkpoint NaN/inf weights, so a bad step between loss checks cannot replace a good checkpoint.

    The weights are the same on every rank (DDP), so every rank reaches the same verdict without a collective.
    """
    models = [parts.raw_model] + ([parts.ema.module] if parts.ema is not None else [])
    tensors = [t for m in models for t in m.state_dict().values() if t.is_floating_point()]
    if not torch.isfinite(nn.utils.get_total_norm(tensors)):
        raise NonFiniteLoss(f"the weights became non-finite before the checkpoint at epoch {progress.epoch}, step "
                            f"{progress.step}; nothing was written and the checkpoints on disk are untouched. "
                            f"Lower optim.lr, set train.clip_grad or train.amp=bf16")


def restore(parts: TrainParts, state: dict, rank: int, world_size: int) -> Progress:
    """Load a checkpoint written by checkpoint_state and put this rank's random generators back."""
    load_weights(parts.raw_model, state)
    if parts.ema is not None:
        load_weights(parts.ema.module, state, ema=state.get("model_ema") is not None)
    parts.optimizer.load_state_dict(state["optimizer"])
    if parts.scaler.is_enabled() and not state["scaler"]:  # an enabled GradScaler refuses a disabled one's state
        du.print0("warning: the checkpoint was written without train.amp=fp16 and has no gradient scaler state; "
                  "the fp16 scaler starts afresh")
    else:
        parts.scaler.load_state_dict(state["scaler"])
    parts.bad_steps = state.get("bad_steps", 0)
    if state.get("world_size") == world_size and state.get("rng"):
        set_rng_state(state["rng"][rank])
    else:
        du.print0(f"warning: the checkpoint was written by {state.get('world_size')} processes, this run has "
                  f"{world_size}: the lr follows the new global batch, the epoch continues from the same sample, "
                  f"random streams start afresh")
    return Progress(state["epoch"], state.get("epoch_samples", 0), state["step"], state["best_top1"],
                    state.get("wandb_id", ""))


def resume(parts: TrainParts, resume_path: str, output_dir: str, rank: int, world_size: int) -> Progress:
    """Where the run starts: from --resume, else from the newest readable checkpoint in output_dir, else afresh.
    The loaded checkpoint (16 bytes a parameter of host memory on every rank) is released on return."""
    found = (resume_path, load_checkpoint(resume_path)) if resume_path else load_latest(output_dir, du.print0)
    if not found:
        return Progress()
    progress = restore(parts, found[1], rank, world_size)
    du.print0(f"resumed from {found[0]}: epoch {progress.epoch} (+{progress.epoch_samples} samples), "
              f"{progress.step} steps done, best top-1 {progress.best_top1:.2f}")
    return progress


def start_profiler(cfg: Config, device: torch.device, rank: int) -> StepProfiler | None:
    """train.profile=N: a torch.profiler trace of N steps after train.profile_wait (+1) into <output_dir>/profile."""
    if not cfg.train.profile:
        return None
    out, first = os.path.join(cfg.output_dir, "profile"), cfg.train.profile_wait + 2
    du.print0(f"train.profile: tracing steps {first}-{first + cfg.train.profile - 1} into {out}")
    return StepProfiler(cfg.train.profile, out, device, rank, wait=cfg.train.profile_wait)


def stop_profiler(profiler: StepProfiler | None) -> None:
    """Write the trace (also of a run that ended inside the traced steps) and say where a step's time went."""
    summary = profiler.close() if profiler is not None else None
    if summary:
        du.print0(f"profile: {describe(summary)}")


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


def evaluate_run(parts: TrainParts, loader, cfg: Config, epoch: int, on_device) -> dict:
    """The eval record: the raw model's metrics, and the EMA's next to them as ema_*."""
    options = dict(amp=cfg.train.amp, channels_last=cfg.train.channels_last, tta=cfg.aug.tta, on_device=on_device)
    record = {"epoch": epoch, **evaluate(parts.raw_model, loader, parts.device, **options)}
    if parts.ema is not None:
        ema = evaluate(parts.ema.module, loader, parts.device, **options)
        record.update({f"ema_{k}": v for k, v in ema.items() if k != "samples"})
    du.print0(f"epoch {epoch}: top-1 {record['top1']:.2f} top-5 {record['top5']:.2f} loss {record['loss']:.4f}"
              + (f" | EMA top-1 {record['ema_top1']:.2f}" if parts.ema is not None else "")
              + f" | {record['samples']} images")
    return record


def main() -> int:
    stop = StopRequest()  # first, so a stop signal during start-up is kept for the first agreed step
    args = parse_args()
    cfg = load_run_config(args.config, args.overrides)
    ctx = init_process(cfg)
    env, device = ctx.env, ctx.device
    accum_steps = accum_steps_for(cfg.train, cfg.data.batch_size, env.world_size)  # before anything is written
    if env.is_main:
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    # Set after saving, so config.yaml keeps train.global_batch and train.amp=auto and still fits another machine.
    cfg.train.accum_steps = accum_steps
    cfg.train.amp = resolve_amp(cfg.train.amp, device)

    # Data: every rank builds the same data sets; the samplers split them.
    train_set, val_set, info = build_datasets(cfg.data, cfg.aug, train=True, seed=cfg.seed)
    train_loader = build_train_loader(train_set, cfg.data, env.rank, env.world_size, cfg.seed)
    val_loader = build_eval_loader(val_set, cfg.data, env.rank, env.world_size)
    train_on_device, eval_on_device = batch_transforms(cfg.data, cfg.aug, info.mean, info.std)
    steps_per_epoch = len(train_loader) // cfg.train.accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"an epoch has no optimizer step: {info.train_size} training images < data.batch_size "
                          f"x world size x train.accum_steps; lower data.batch_size or train.accum_steps")

    resuming = bool(args.resume or resume_candidates(cfg.output_dir))

    # Model: the same seed on every rank gives the same init (DDP would broadcast rank 0's anyway).
    seed_everything(cfg.seed)
    model = build_model(cfg, info.num_classes, info.in_chans, device)
    if cfg.model.stem_init == "whiten" and not resuming:  # before the EMA copies the model; a resumed run has its stem
        filters = whiten_stem(model, sample_images(train_set, cfg.data))
        du.print0(f"model.stem_init=whiten: {filters} of {model.downsample_layers[0][0].out_channels} stem filters "
                  f"set to +- the whitening of the training images' patches")
    seed_everything(cfg.seed + env.rank)  # augmentation, mixup and drop path differ per rank

    parts, batch, lr = build_parts(cfg, model, info.num_classes, device, env.world_size, steps_per_epoch,
                                   on_device=train_on_device)
    if cfg.optim.layer_decay < 1 or cfg.optim.freeze_stages or cfg.optim.head_only:
        du.print0(f"trained parameters by layer, lr scale (optim.layer_decay={cfg.optim.layer_decay:g}): "
                  f"{describe_groups(parts.optimizer.param_groups)}")
    du.print0(f"{env.launcher}: world {env.world_size} on {device} ({ctx.backend if env.distributed else 'no'} "
              f"backend) | global batch {batch} = {cfg.data.batch_size} x {env.world_size} processes x "
              f"{cfg.train.accum_steps} accum | lr {lr:.3g} = {cfg.optim.lr:g} x {batch}/{cfg.optim.lr_base_batch} "
              f"({cfg.optim.lr_scaling}) | {steps_per_epoch} steps/epoch, {steps_per_epoch * cfg.schedule.epochs} "
              f"in all | amp {cfg.train.amp}")

    progress = resume(parts, args.resume, cfg.output_dir, env.rank, env.world_size)
    parts.model = wrap_model(model, cfg, env.distributed, device)

    progress.wandb_id = progress.wandb_id or (new_wandb_id() if cfg.log.wandb else "")
    logger = RunLogger(cfg.output_dir, enabled=env.is_main, wandb=wandb_options(cfg.log, progress.wandb_id, cfg))

    def save(best: bool = False, score: float | None = None) -> None:
        check_finite_weights(parts, progress)
        state = checkpoint_state(parts, cfg, progress)
        if env.is_main:
            save_training_checkpoint(state, cfg.output_dir, progress.step, cfg.checkpoint.keep_last, best=best,
                                     score=score, keep_best=cfg.checkpoint.keep_best)

    profiler = start_profiler(cfg, device, env.rank)

    def mid_epoch_checkpoint(step: int, i_step: int, start_samples: int, pass_steps: int) -> None:
        """on_step hook of a pass that started `start_samples` into its epoch and runs `pass_steps` steps:
        checkpoint every checkpoint.every_steps steps and when asked to stop (preemption)."""
        if profiler is not None:
            profiler.step()
        every = cfg.checkpoint.every_steps
        stopping = stop.agreed(step)
        # Not at a pass's last step: the epoch end saves then, after evaluating.
        if stopping or (every and step % every == 0 and i_step < pass_steps):
            progress.step = step
            progress.epoch_samples = start_samples + i_step * batch
            save()
        if stopping:
            raise Preempted(f"stopped by a signal at epoch {progress.epoch}, step {step}; checkpoint written, "
                            f"start the run again to continue")

    skipped = skipped_total(train_set, device) if cfg.data.skip_corrupt else 0  # the stem's sample may have met some
    while progress.epoch < cfg.schedule.epochs:
        epoch, start_samples = progress.epoch, progress.epoch_samples
        start_epoch(train_loader, epoch, start=start_samples)
        pass_steps = len(train_loader) // cfg.train.accum_steps  # fewer than steps_per_epoch when resumed mid-epoch
        on_step = partial(mid_epoch_checkpoint, start_samples=start_samples, pass_steps=pass_steps)
        try:
            progress.step = train_one_epoch(parts, train_loader, epoch=epoch, step=progress.step, logger=logger,
                                            log_every=cfg.train.log_every, global_batch=batch, on_step=on_step)
        except Preempted as e:
            du.print0(str(e))
            stop_profiler(profiler)
            logger.close()
            du.barrier()  # no rank exits (and makes srun kill the rest) before rank 0's checkpoint is on disk
            return EXIT_PREEMPTED
        if cfg.data.skip_corrupt:
            skipped = report_skipped(train_set, epoch, skipped, device)
        progress.epoch, progress.epoch_samples = epoch + 1, 0
        top1 = None
        if epoch + 1 == cfg.schedule.epochs or (epoch + 1) % cfg.train.eval_every == 0:
            record = evaluate_run(parts, val_loader, cfg, epoch, eval_on_device)
            logger.log("eval", record, progress.step)
            top1 = max(record["top1"], record.get("ema_top1", -1.0))  # the better of the raw and EMA weights
        improved = top1 is not None and top1 > progress.best_top1
        if improved:
            progress.best_top1 = top1
        save(best=improved, score=top1)
    stop_profiler(profiler)
    logger.close()
    du.print0(f"done: best top-1 {progress.best_top1:.2f}; checkpoints in {checkpoint_dir(cfg.output_dir)}")
    return 0


def cli() -> None:
    """The console script's entry point."""
    du.run(main)


if __name__ == "__main__":
    cli()
