"""Building a run: the process, its seeds, the model and everything an optimizer step needs around it.

train.py, eval.py and scripts/benchmark.py all build through here, so the three run the same model the same way.

    cfg = load_run_config(path, overrides)
    ctx = init_process(cfg)
    model = build_model(cfg, num_classes, in_chans, ctx.device)
    parts, global_batch, lr = build_parts(cfg, model, num_classes, ctx.device, world_size, steps_per_epoch)
    parts.model = wrap_model(model, cfg, distributed, ctx.device)
"""
from __future__ import annotations

import importlib.util
import os
import random
from typing import Callable, Sequence

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn

import distributed_utils as du
from core.config import Config, ConfigError, load_config
from engine.cpu_convs import use_cpu_matrix_convs
from engine.ema import Ema
from engine.loop import TrainParts
from engine.optim import create_optimizer, global_batch, lr_at, scaled_lr, schedule_steps
from models import check_model_name, create_model


def load_run_config(path: str | None, overrides: Sequence[str] = ()) -> Config:
    """The validated config, its model name checked too: before any data is read, which can take minutes."""
    cfg = load_config(path, overrides)
    check_model_name(cfg.model.name)
    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb=true needs the wandb package, which is not installed: pip install wandb "
                          "(or pip install -e '.[wandb]'), or set log.wandb=false")
    return cfg


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # timm's Mixup draws from numpy
    torch.manual_seed(seed)


def init_process(cfg: Config) -> du.DistContext:
    """Join the process group (when launched as several ranks) and set this process's torch options."""
    ctx = du.setup(cfg.dist.backend, cfg.dist.timeout_s, trace_dir=cfg.output_dir)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        # cuBLAS repeats its matmuls only with a fixed workspace; torch refuses deterministic CUDA matmuls without one.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    elif ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv algorithms once
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls left outside autocast
    return ctx


def build_model(cfg: Config, num_classes: int, in_chans: int, device: torch.device,
                pretrained: bool = True) -> nn.Module:
    """The bare ConvNeXt of cfg.model, on the device in the configured layout; on the CPU with its convolutions in
    matrix form when train.cpu_matrix_convs is set (engine.cpu_convs: the same results, faster).

    Args:
        pretrained: load model.pretrained; false where other weights are loaded next (eval.py's --checkpoint).
    """
    args = {**cfg.model.create_args(), **({} if pretrained else {"pretrained": ""})}
    model = create_model(**args, num_classes=num_classes, in_chans=in_chans, log=du.print0)
    model.set_grad_checkpointing(cfg.train.grad_checkpointing)
    if cfg.train.cpu_matrix_convs and device.type == "cpu":
        use_cpu_matrix_convs(model)
    return model.to(device, memory_format=torch.channels_last if cfg.train.channels_last else torch.contiguous_format)


def wrap_model(model: nn.Module, cfg: Config, distributed: bool, device: torch.device) -> nn.Module:
    """What forward runs through: DDP when distributed, compiled with train.compile."""
    if distributed:
        grads_with_param_strides(model)
        # Gradients as views into the all-reduce buckets: no copy in or out of them, and less memory.
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
            bucket_cap_mb=cfg.dist.bucket_cap_mb, static_graph=cfg.dist.static_graph)
    if cfg.train.compile:
        # Compiling the DDP wrapper lets dynamo split graphs at bucket boundaries to overlap the all-reduce.
        model = torch.compile(model)
    return model


def grads_with_param_strides(model: nn.Module) -> int:
    """Make each gradient that differs from its parameter's strides only on size-1 dims a view with the parameter's
    strides (the same memory, no copy); returns how many parameters got that hook.

    oneDNN and the matrix-form depthwise conv give the (C, 1, k, k) depthwise weights' gradients another stride on
    the size-1 dim than the parameter has. Such a stride is never used, but DDP compares strides literally and warns
    that the gradients "may impair performance".
    """
    params = [p for p in model.parameters() if p.requires_grad and 1 in p.shape]
    for param in params:
        param.register_hook(_restride(param.stride()))
    return len(params)


def _restride(stride: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """A gradient hook: the gradient with `stride` if only its size-1 dims' strides differ, else the gradient as is
    (None). Holds the strides, not the parameter, which would then keep itself alive through its own hook."""

    def hook(grad: torch.Tensor) -> torch.Tensor | None:
        pairs = zip(grad.shape, grad.stride(), stride)
        if grad.stride() == stride or any(size > 1 and mine != want for size, mine, want in pairs):
            return None
        return grad.as_strided(grad.shape, stride, grad.storage_offset())

    return hook


def build_loss(cfg: Config, num_classes: int) -> tuple[Mixup | None, nn.Module]:
    """Mixup/cutmix with soft targets (label smoothing folded in), or plain label-smoothed CE when both are off."""
    if cfg.aug.mixup > 0 or cfg.aug.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.aug.mixup, cutmix_alpha=cfg.aug.cutmix, prob=cfg.aug.mixup_prob,
                      switch_prob=cfg.aug.mixup_switch_prob, label_smoothing=cfg.aug.smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    return None, nn.CrossEntropyLoss(label_smoothing=cfg.aug.smoothing)


def build_parts(cfg: Config, model: nn.Module, num_classes: int, device: torch.device, world_size: int,
                steps_per_epoch: int, on_device: Callable | None = None) -> tuple[TrainParts, int, float]:
    """Optimizer, schedule, loss, EMA and precision around the model, and the batch work on the device
    (data.batch_transforms); returns (parts, global batch, peak lr)."""
    # The lr is quoted at optim.lr_base_batch and scaled to the global batch actually used.
    batch = global_batch(cfg.data.batch_size, world_size, cfg.train.accum_steps)
    lr = scaled_lr(cfg.optim.lr, batch, cfg.optim.lr_base_batch, cfg.optim.lr_scaling)
    warmup_steps, total_steps = schedule_steps(cfg.schedule, steps_per_epoch)
    mixup, criterion = build_loss(cfg, num_classes)
    parts = TrainParts(
        model=model, raw_model=model, optimizer=create_optimizer(model, cfg.optim, lr), criterion=criterion,
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16"),
        lr_fn=lambda s: lr_at(s, base_lr=lr, min_lr=cfg.schedule.min_lr, warmup_steps=warmup_steps,
                              total_steps=total_steps),
        device=device, amp=cfg.train.amp, accum_steps=cfg.train.accum_steps, clip_grad=cfg.train.clip_grad,
        channels_last=cfg.train.channels_last, mixup=mixup, on_device=on_device, max_bad_steps=cfg.train.max_bad_steps,
        ema=Ema(model, cfg.ema.decay, cfg.ema.warmup, cfg.ema.every) if cfg.ema.enabled else None)
    return parts, batch, lr


