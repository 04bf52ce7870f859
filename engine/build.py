"""Building a run: the config, the process, the data, the model and everything an optimizer step needs around it.

train.py, eval.py, scripts/benchmark.py and scripts/startup.py all set up through here, so they read the same data
and run the same model the same way.

    cfg, ctx, data = set_up(path, overrides, training=True)
    model = build_model(cfg, data.info.num_classes, data.info.in_chans, ctx.device)
    parts, global_batch, lr = build_parts(cfg, model, data, ctx.device, ctx.env.world_size)
    parts.model = wrap_model(model, cfg, ctx.env.distributed, ctx.device)
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import random
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, Dataset

import distributed_utils as du
from core.config import Config, ConfigError, load_config, parse_override, save_config, validate
from data import DatasetInfo, batch_transforms, build_datasets, build_eval_loader, build_train_loader
from engine.cpu_convs import use_cpu_matrix_convs
from engine.ema import Ema
from engine.loop import TrainParts
from engine.optim import accum_steps_for, create_optimizer, global_batch, lr_at, scaled_lr, schedule_steps
from engine.precision import resolve_amp
from engine.preemption import SIGNALS as STOP_SIGNALS
from models import check_model_name, create_model
from models.pretrained import published_view
from models.view import VIEW_KEYS


@dataclass
class RunData:
    """The data side of a run: the splits, this rank's loaders, and the batch work each leaves to the device."""
    info: DatasetInfo
    val_set: Optional[Dataset]  # None where training has no validation split (train.eval_every=0)
    val_loader: Optional[DataLoader]
    eval_transform: Optional[Callable]
    train_set: Optional[Dataset] = None  # None unless set up for training
    train_loader: Optional[DataLoader] = None
    train_transform: Optional[Callable] = None
    steps_per_epoch: int = 0  # optimizer steps of a whole epoch


def set_up(config_path: str, overrides: Sequence[str] = (), *, training: bool = True,
           write_config: bool = False) -> tuple[Config, du.DistContext, RunData]:
    """Every entry point's start: start_run, then build_data.

    Args:
        write_config: rank 0 then writes <output_dir>/config.yaml as given, before start_run filled in the launch's
            settings (so that it keeps train.global_batch and train.amp=auto and still fits another machine), and
            only once the data is found: a run refused at start writes nothing.
    """
    cfg, ctx, given = _start(config_path, overrides, training)
    data = build_data(cfg, ctx, training=training)
    if write_config and ctx.env.is_main:
        save_config(given, os.path.join(cfg.output_dir, "config.yaml"))
    return cfg, ctx, data


def start_run(config_path: str | None, overrides: Sequence[str] = (), *, training: bool = True,
              saved: dict | None = None) -> tuple[Config, du.DistContext]:
    """The validated config, this process in its group, and the settings that depend on the launch: the gradient
    accumulation a global batch needs (training) and the precision train.amp=auto picks on this device.
    `saved`: a checkpoint's config, in the defaults' place (load_config)."""
    return _start(config_path, overrides, training, saved)[:2]


def _start(config_path: str | None, overrides: Sequence[str], training: bool,
           saved: dict | None = None) -> tuple[Config, du.DistContext, Config]:
    """start_run's (config, context), and the config as given, before the launch's settings were filled in."""
    cfg = load_run_config(config_path, overrides, saved)
    ctx = init_process(cfg)
    given = copy.deepcopy(cfg)
    cfg.train.accum_steps = accum_steps_for(cfg.train, cfg.data.batch_size, ctx.env.world_size) if training else 1
    cfg.train.amp = resolve_amp(cfg.train.amp, ctx.device)
    return cfg, ctx, given


def build_data(cfg: Config, ctx: du.DistContext, *, training: bool = True) -> RunData:
    """The data sets (every rank the same; the samplers split them), this rank's loaders and the batch transforms."""
    rank, world_size = ctx.env.rank, ctx.env.world_size
    train_set, val_set, info = build_datasets(cfg.data, cfg.aug, train=training, seed=cfg.seed)
    if val_set is None and cfg.train.eval_every:
        if cfg.data.name == "hf":
            missing = f"split '{cfg.data.hf_val_split}' in data set '{cfg.data.hf_name}' (data.hf_val_split)"
        else:
            missing = f"validation split in '{cfg.data.root}' (data.name={cfg.data.name})"
        raise ConfigError(f"there is no {missing} and train.eval_every={cfg.train.eval_every} asks for evaluation; "
                          f"set train.eval_every=0 to train without it (no best.pth), or add the split")
    train_transform, eval_transform = batch_transforms(cfg.data, cfg.aug, info.mean, info.std)
    val_loader = build_eval_loader(val_set, cfg.data, rank, world_size) if val_set is not None else None
    data = RunData(info, val_set, val_loader, eval_transform)
    if not training:
        return data
    data.train_set, data.train_transform = train_set, train_transform
    data.train_loader = build_train_loader(train_set, cfg.data, rank, world_size, cfg.seed)
    data.steps_per_epoch = len(data.train_loader) // cfg.train.accum_steps
    if data.steps_per_epoch == 0:
        raise ConfigError(f"an epoch has no optimizer step: {info.train_size} training images < data.batch_size "
                          f"x world size x train.accum_steps; lower data.batch_size or train.accum_steps")
    return data




def adopt_published_view(cfg: Config, weights: str, overrides: Sequence[str]) -> str:
    """Evaluate released weights (a hub name) on the view they were published with (models.pretrained.published_view:
    size, crop_pct, crop_mode, interpolation, mean/std) over the config file's, but for the keys the command line
    sets (`overrides`); the imagenet recipe only. Returns the start-up line naming the view and where it came from."""
    view = published_view(weights) if cfg.data.recipe == "imagenet" else None
    values = _view_values(view) if view else {}
    given = {parse_override(text)[0] for text in overrides}
    adopted = [key for key in values if key not in given]
    for key in adopted:
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, values[key])
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"the view published with '{weights}' does not fit this trainer ({e}); set the key on the "
                          f"command line") from None
    kept = [key for key in values if key in given]
    source = f"{weights}'s published view" if adopted else "the config"
    return describe_view(cfg, source + (f"; {', '.join(kept)} from the command line" if kept else ""))


def _view_values(view: dict) -> dict:
    """published_view's fields as config values: a square input_size as its side (a non-square one is left out)."""
    values = {key: view.get(field) for key, field in VIEW_KEYS.items()}
    size = values["data.img_size"]
    values["data.img_size"] = size[-1] if size and size[-1] == size[-2] else None
    return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()
            if value is not None}


def describe_view(cfg: Config, source: str) -> str:
    """One line: what an evaluation feeds the model, and where that was decided."""
    if cfg.data.recipe != "imagenet":
        return f"eval view: {cfg.data.img_size} px, the whole image resized (data.recipe={cfg.data.recipe})"
    stats = f"mean {cfg.data.mean} std {cfg.data.std}" if cfg.data.mean else f"{cfg.data.name}'s mean/std"
    return (f"eval view: {cfg.data.img_size} px, crop_mode {cfg.data.crop_mode}, crop_pct {cfg.data.crop_pct:g}, "
            f"{cfg.aug.interpolation}, {stats} (from {source})")


def load_run_config(path: str | None, overrides: Sequence[str] = (), saved: dict | None = None) -> Config:
    """The validated config, its model name checked too: before any data is read, which can take minutes."""
    cfg = load_config(path, overrides, saved)
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


@dataclass
class ProcessSettings:
    """What running an entry point's main changes for its whole process, beyond its run: the process group
    (du.setup), torch's threads, deterministic mode, cuDNN autotuning and matmul precision (init_process), the
    environment (CUBLAS_WORKSPACE_CONFIG, the rank variables a hand launch exports), the stop signals' handlers
    (engine.preemption) and the random generators (seed_everything).

    A process that outlives one main (the tests run train.py and eval.py inside their own) notes them first and
    restores them after: `with ProcessSettings.kept(): main()`.
    """
    threads: int
    deterministic: tuple[bool, bool]  # enabled, warn only
    cudnn_benchmark: bool
    matmul_precision: str
    environ: dict[str, str]
    handlers: dict[signal.Signals, Any]
    rng: tuple[Any, ...]  # Python's, numpy's, torch's CPU generator, then each GPU's (None if CUDA is not started)

    @classmethod
    def current(cls) -> ProcessSettings:
        deterministic = (torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled())
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return cls(torch.get_num_threads(), deterministic,
                   torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(), dict(os.environ),
                   {sig: signal.getsignal(sig) for sig in STOP_SIGNALS},
                   (random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda))

    def restore(self) -> None:
        """Leave the process group (if any), then put every setting back as noted."""
        du.cleanup()
        torch.set_num_threads(self.threads)
        torch.use_deterministic_algorithms(self.deterministic[0], warn_only=self.deterministic[1])
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        torch.set_float32_matmul_precision(self.matmul_precision)
        os.environ.clear()
        os.environ.update(self.environ)
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)
        python, numpy, cpu, cuda = self.rng
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    @classmethod
    @contextlib.contextmanager
    def kept(cls) -> Iterator[ProcessSettings]:
        """The settings as they are now, restored when the block ends, however it ends."""
        saved = cls.current()
        try:
            yield saved
        finally:
            saved.restore()


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


def build_parts(cfg: Config, model: nn.Module, data: RunData, device: torch.device,
                world_size: int) -> tuple[TrainParts, int, float]:
    """Optimizer, schedule, loss, EMA and precision around the model, and the training batch work on the device
    (data.batch_transforms); returns (parts, global batch, peak lr)."""
    # The lr is quoted at optim.lr_base_batch and scaled to the global batch actually used.
    batch = global_batch(cfg.data.batch_size, world_size, cfg.train.accum_steps)
    lr = scaled_lr(cfg.optim.lr, batch, cfg.optim.lr_base_batch, cfg.optim.lr_scaling)
    warmup_steps, total_steps = schedule_steps(cfg.schedule, data.steps_per_epoch)
    mixup, criterion = build_loss(cfg, data.info.num_classes)
    parts = TrainParts(
        model=model, raw_model=model, optimizer=create_optimizer(model, cfg.optim, lr), criterion=criterion,
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16"),
        lr_fn=lambda s: lr_at(s, base_lr=lr, min_lr=cfg.schedule.min_lr, warmup_steps=warmup_steps,
                              total_steps=total_steps),
        device=device, amp=cfg.train.amp, accum_steps=cfg.train.accum_steps, clip_grad=cfg.train.clip_grad,
        channels_last=cfg.train.channels_last, mixup=mixup, batch_transform=data.train_transform,
        max_bad_steps=cfg.train.max_bad_steps,
        ema=Ema(model, cfg.ema.decay, cfg.ema.warmup, cfg.ema.every) if cfg.ema.enabled else None)
    return parts, batch, lr


