"""The rules a resolved Config must keep beyond its types: allowed values, ranges and the keys that go together;
each broken one a ConfigError whose message names the key and the way out."""
from __future__ import annotations

from typing import Any

from core.config_schema import Config
from core.errors import ConfigError

CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": ("imagefolder", "csv", "shards", "hf", "cifar10", "cifar100", "fashion_mnist", "synthetic"),
    "data.recipe": ("imagenet", "small"),
    "data.crop_mode": ("center", "squash", "border"),
    "model.stem_init": ("default", "whiten"),
    "aug.interpolation": ("bicubic", "bilinear", "nearest"),
    "aug.tta": ("none", "flip", "flip_shift", "flip_x_shift"),
    "optim.lr_scaling": ("linear", "sqrt", "none"),
    "train.amp": ("none", "bf16", "fp16", "auto"),
    "dist.backend": ("auto", "nccl", "gloo"),
}
POSITIVE = ("checkpoint.keep_last", "data.img_size", "data.batch_size", "optim.lr_base_batch", "schedule.epochs",
            "train.accum_steps", "train.log_every", "model.patch_size", "ema.every",
            "data.prefetch_factor")
NON_NEGATIVE = ("data.train_limit", "data.eval_batch_size", "data.num_classes", "optim.lr",
                "optim.weight_decay", "schedule.warmup_epochs", "schedule.min_lr",
                "model.drop_path", "model.layer_scale_init", "aug.mixup", "aug.cutmix",
                "train.clip_grad", "train.threads", "checkpoint.every_steps", "checkpoint.keep_best",
                "train.global_batch", "train.max_bad_steps", "dist.bucket_cap_mb", "train.profile",
                "train.profile_wait", "train.eval_every", "data.max_image_pixels")
UNIT_INTERVAL = ("optim.layer_decay", "aug.smoothing", "aug.reprob", "aug.hflip", "aug.mixup_prob",
                 "aug.mixup_switch_prob", "ema.decay", "model.drop_path")


def get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: Config) -> None:
    """ConfigError, naming the key and what is allowed, for the first value the run cannot use."""
    _check_ranges(cfg)
    if cfg.aug.rand_augment and not cfg.aug.rand_augment.startswith("rand"):
        raise ConfigError(f"aug.rand_augment={cfg.aug.rand_augment!r} is not a timm RandAugment string; give one such "
                          f"as 'rand-m9-mstd0.5-inc1', or '' for none")
    if cfg.model.stem_init == "whiten" and cfg.model.pretrained:
        raise ConfigError("model.stem_init=whiten would overwrite the stem that model.pretrained loads; set "
                          "model.stem_init=default to fine-tune, or drop model.pretrained to train from scratch")
    if (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0) and cfg.data.batch_size % 2:
        raise ConfigError(f"data.batch_size ({cfg.data.batch_size}) must be even for mixup/cutmix (they pair each "
                          f"image with its mirror in the batch); use an even size or set aug.mixup=0 aug.cutmix=0")
    if cfg.optim.layer_decay <= 0 or not 0 <= cfg.optim.freeze_stages <= 4:
        raise ConfigError(f"optim.layer_decay must be in (0, 1] (got {cfg.optim.layer_decay}) and optim.freeze_stages "
                          f"in 0-4 (got {cfg.optim.freeze_stages})")
    for key in ("model.depths", "model.dims"):
        value = get(cfg, key)
        if value and (len(value) != 4 or not all(isinstance(v, int) and v > 0 for v in value)):
            raise ConfigError(f"config key '{key}' must be 4 positive integers, one per stage (or [] for the "
                              f"variant's), got {value}")
    if not 0 <= cfg.train.grad_checkpointing <= 4:
        raise ConfigError(f"train.grad_checkpointing is a number of stages, 0-4; got {cfg.train.grad_checkpointing}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"config key 'optim.betas' must be two numbers, got {cfg.optim.betas}")
    if cfg.schedule.warmup_epochs > cfg.schedule.epochs:
        raise ConfigError(f"schedule.warmup_epochs ({cfg.schedule.warmup_epochs}) exceeds schedule.epochs "
                          f"({cfg.schedule.epochs}); lower warmup_epochs or raise epochs")
    _check_data(cfg)


def _check_ranges(cfg: Config) -> None:
    """Each key within its allowed values or range."""
    for key, allowed in CHOICES.items():
        if get(cfg, key) not in allowed:
            raise ConfigError(f"config key '{key}' is {get(cfg, key)!r}; allowed: {', '.join(allowed)}")
    for key in POSITIVE:
        if get(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {get(cfg, key)}")
    for key in NON_NEGATIVE:
        if get(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {get(cfg, key)}")
    for key in UNIT_INTERVAL:
        if not 0.0 <= get(cfg, key) <= 1.0:
            raise ConfigError(f"config key '{key}' must be within [0, 1], got {get(cfg, key)}")
    if cfg.data.num_workers < -1:
        raise ConfigError(f"data.num_workers is a number of loader processes, 0 to load in the training process or "
                          f"-1 for one per core; got {cfg.data.num_workers}")


def _check_data(cfg: Config) -> None:
    """The data and evaluation keys agree with each other."""
    if not 0 < cfg.data.crop_pct <= 1:
        raise ConfigError(f"data.crop_pct is the eval output's side over the resized side, in (0, 1]; got "
                          f"{cfg.data.crop_pct}")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in cfg.data.mean + cfg.data.std)
    if len(cfg.data.mean) != len(cfg.data.std) or not numbers or not all(v > 0 for v in cfg.data.std):
        raise ConfigError(f"data.mean and data.std must be given together, one number per channel, std > 0 (or both "
                          f"[] for the data set's own); got {cfg.data.mean} and {cfg.data.std}")
    if cfg.checkpoint.keep_best and not cfg.train.eval_every:
        raise ConfigError("checkpoint.keep_best keeps the best evaluated checkpoints, and train.eval_every=0 evaluates "
                          "none; set checkpoint.keep_best=0, or train.eval_every=1 with a validation split")
    if cfg.data.name == "hf" and not cfg.data.hf_name:
        raise ConfigError("data.hf_name is empty; set it to a hub id (e.g. data.hf_name=ILSVRC/imagenet-1k) or to a "
                          "folder of parquet files or of save_to_disk")
    if cfg.data.name not in ("synthetic", "hf") and not cfg.data.root:
        raise ConfigError(f"data.root is empty; set it to the folder holding the {cfg.data.name} data "
                          f"(e.g. data.root=/path/to/data)")
