"""Optimizer and learning-rate schedule: lr scaling with the global batch, AdamW groups, warmup + cosine.

The schedule is a pure function of the optimizer step, so resuming needs nothing but the step.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from engine.config import ConfigError, OptimCfg, ScheduleCfg, TrainCfg


def global_batch(batch_size: int, world_size: int, accum_steps: int) -> int:
    """Images per optimizer step, over all processes."""
    return batch_size * world_size * accum_steps


def accum_steps_for(train: TrainCfg, batch_size: int, world_size: int) -> int:
    """train.accum_steps, or the one that makes train.global_batch from this many processes."""
    if not train.global_batch:
        return train.accum_steps
    per_pass = batch_size * world_size
    if train.global_batch % per_pass:
        raise ConfigError(f"train.global_batch={train.global_batch} is not a multiple of data.batch_size="
                          f"{batch_size} x {world_size} processes = {per_pass}; change data.batch_size or the "
                          f"number of processes, or set train.global_batch=0 to use train.accum_steps")
    derived = train.global_batch // per_pass
    if train.accum_steps not in (1, derived):
        raise ConfigError(f"train.accum_steps={train.accum_steps} disagrees with train.global_batch="
                          f"{train.global_batch} ({derived} steps of {per_pass}); set only one of them")
    return derived


def scaled_lr(lr: float, global_batch_size: int, base_batch: int, scaling: str) -> float:
    """`lr` is quoted for a global batch of `base_batch`; scale it to the batch actually used."""
    ratio = global_batch_size / base_batch
    if scaling == "linear":
        return lr * ratio
    if scaling == "sqrt":
        return lr * math.sqrt(ratio)
    return lr


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on 1-D parameters: norm weights, biases and layer-scale gamma (as the paper's recipe)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def create_optimizer(model: nn.Module, cfg: OptimCfg, lr: float) -> torch.optim.AdamW:
    # foreach keeps the step to a few fused kernels per group instead of one per tensor.
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, foreach=True)


def lr_at(step: int, *, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to base_lr over warmup_steps, then cosine down to min_lr at total_steps.

    Step s is the update about to be made; warmup starts at base_lr / warmup_steps, not 0, so no update is wasted.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def schedule_steps(cfg: ScheduleCfg, steps_per_epoch: int) -> tuple[int, int]:
    """(warmup_steps, total_steps) for a run of cfg.epochs epochs."""
    return round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
