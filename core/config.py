"""The run configuration: a typed schema with defaults, read from YAML plus dotted overrides.

    cfg = load_config("configs/convnext_t.yaml", ["optim.lr=1e-3", "data.batch_size=64"])
    cfg.optim.lr  # 0.001

Every key is declared below with its type and default, so a typo or a wrong type is caught
before anything runs, with a one-line message that names the key and the way out.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from core.errors import UserError
from core.files import atomic_write


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message is meant for the user as is."""


@dataclass
class ModelCfg:
    """Fields are create_model() keyword arguments (create_model(**cfg.model.create_args())), but for stem_init,
    which needs the training data and is applied by train.py."""
    name: str = "convnext_tiny"
    drop_path: float = 0.1  # stochastic depth rate of the last block; rises linearly from 0
    layer_scale_init: float = 1e-6  # 0 disables layer scale
    head_init_scale: float = 1.0
    patch_size: int = 4  # stem kernel = stride; 2 suits 28-32 px images
    depths: list = field(default_factory=list)  # blocks in each of the 4 stages; [] keeps the variant's
    dims: list = field(default_factory=list)  # channels of each of the 4 stages; [] keeps the variant's
    pretrained: str = ""  # weights to start from: ours, official release, timm (.pth/.bin/.safetensors)
    pretrained_ema: bool = False  # take the EMA weights of a training checkpoint
    pretrained_head: bool = True  # false: a fresh head even when the checkpoint's fits (other classes, same count)
    stem_init: str = "default"  # default (truncated normal) | whiten (patch whitening of the training images)

    def create_args(self) -> dict:
        """The create_model() keyword arguments."""
        args = dataclasses.asdict(self)
        del args["stem_init"]
        return args


@dataclass
class DataCfg:
    name: str = "imagefolder"
    root: str = ""
    img_size: int = 224
    batch_size: int = 128  # per process
    eval_batch_size: int = 0  # per process; 0 means 2 x batch_size
    num_workers: int = -1  # loader processes per process; -1: its share of the node's cores, less one for itself
    prefetch_factor: int = 2  # batches each loader worker prepares ahead
    num_classes: int = 0  # 0 means: what the data set has
    recipe: str = "imagenet"  # imagenet (timm RandAugment recipe) | small (pad-crop + flip, 28-32 px)
    crop_pct: float = 0.875  # imagenet recipe's eval: output side / resized side (timm's meaning)
    crop_mode: str = "center"  # imagenet recipe's eval view, timm's: center | squash | border (data.jpeg)
    mean: list = field(default_factory=list)  # per-channel normalisation mean, 0-1 ([]: the data set's)
    std: list = field(default_factory=list)  # per-channel normalisation std ([]: the data set's)
    dct_scaling: bool = False  # imagenet recipe: decode crops >= 2x img_size at 1/2-1/8 scale (faster on big photos)
    classes: list = field(default_factory=list)  # keep only these class indices, relabelled 0..k-1 ([]: all)
    train_limit: int = 0  # train on a fixed random subset of this many images (0: all), for quick experiments
    skip_corrupt: bool = False  # imagefolder, shards, hf: skip unreadable images with a warning instead of stopping
    cache_file_list: bool = True  # imagefolder: rank 0 lists the files once, cached beside them (data.file_list)
    download: bool = False  # fetch fashion_mnist / cifar with torchvision when missing (needs network)
    hf_name: str = ""  # data.name=hf: a hub id (ILSVRC/imagenet-1k), or a folder of parquet files or save_to_disk
    hf_config: str = ""  # the hub data set's configuration ("": its default)
    hf_revision: str = ""  # a branch, tag or commit of the hub repository ("": main)
    hf_train_split: str = "train"
    hf_val_split: str = "validation"
    hf_image_column: str = ""  # "": the one Image feature
    hf_label_column: str = ""  # "": the one ClassLabel feature; an integer column when named
    synthetic_train_size: int = 512
    synthetic_val_size: int = 101  # deliberately not a multiple of common world sizes


@dataclass
class AugCfg:
    mixup: float = 0.8  # mixup alpha; 0 disables
    cutmix: float = 1.0  # cutmix alpha; 0 disables
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # timm auto_augment string; "" disables
    reprob: float = 0.25  # random erasing probability
    hflip: float = 0.5
    interpolation: str = "bicubic"
    crop_padding: int = 4  # small recipe: pad then random-crop back to img_size
    tta: str = "none"  # test-time augmentation in every evaluation: none | flip | flip_shift | flip_x_shift


@dataclass
class OptimCfg:
    lr: float = 4e-3  # at a global batch of lr_base_batch
    lr_base_batch: int = 4096
    lr_scaling: str = "linear"  # linear | sqrt | none
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    layer_decay: float = 1.0  # layer-wise lr decay for fine-tuning (official: 0.7-0.8); 1 is off
    freeze_stages: int = 0  # no gradients to the stem and this many stages (0-4)
    head_only: bool = False  # train the classifier alone (a linear probe)


@dataclass
class ScheduleCfg:
    epochs: int = 300
    warmup_epochs: float = 20
    min_lr: float = 1e-6


@dataclass
class EmaCfg:
    enabled: bool = True
    decay: float = 0.9999
    warmup: bool = False  # timm ModelEmaV3 decay warm-up, for short runs
    every: int = 1  # update every N optimizer steps with decay^N: the same average, 1/N of the cost


@dataclass
class TrainCfg:
    amp: str = "none"  # none | bf16 | fp16 | auto (bf16 where the device computes it natively, else none)
    accum_steps: int = 1
    global_batch: int = 0  # images per optimizer step; when set, accum_steps follows from it and the world size
    clip_grad: float = 0.0  # max global grad norm; 0 disables
    max_bad_steps: int = 0  # non-finite-loss steps skipped (with a warning) before stopping; 0: stop at the first
    channels_last: bool = False
    compile: bool = False
    cpu_matrix_convs: bool = True  # on the CPU, run the patchify and small-map depthwise convs as matrix products
    grad_checkpointing: int = 0  # recompute the blocks of the first N stages (0-4) in the backward: less memory
    log_every: int = 50  # optimizer steps between train records
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated); 0: none, no val split needed
    threads: int = 0  # torch intra-op threads per process on CPU; 0 leaves torch's default
    deterministic: bool = False  # torch.use_deterministic_algorithms: bitwise-repeatable runs, slower
    profile: int = 0  # trace this many optimizer steps with torch.profiler into <output_dir>/profile (0: off)
    profile_wait: int = 5  # steps run before the trace starts (one more warms the profiler up)


@dataclass
class CheckpointCfg:
    every_steps: int = 0  # also checkpoint every this many optimizer steps (0: at epoch ends only)
    keep_last: int = 2  # step checkpoints kept; older ones are deleted once a newer one is on disk
    keep_best: int = 0  # also keep the K best evaluated ones, as best_top1_<top-1>_step_<step>.pth (0: best.pth only)
    # Write in a background process: the ranks wait only while rank 0 copies the state to host memory (as much host
    # memory again as the state: 16 bytes a parameter). false: the ranks wait for the whole write.
    background: bool = True


@dataclass
class DistCfg:
    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | nccl | gloo
    timeout_s: int = 1800  # a collective waiting longer than this fails instead of hanging
    bucket_cap_mb: float = 25.0  # DDP gradient bucket size (torch's default); larger means fewer all-reduces
    static_graph: bool = False  # DDP static_graph: the same parameters used every step (true for ConvNeXt)


@dataclass
class LogCfg:
    wandb: bool = False  # also log to Weights & Biases (pip install wandb), from rank 0; WANDB_MODE=offline works
    wandb_project: str = "convnext"
    wandb_name: str = ""  # the run's display name ("": W&B picks one)
    wandb_entity: str = ""  # team or user ("": your default)
    wandb_tags: list = field(default_factory=list)


@dataclass
class Config:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    aug: AugCfg = field(default_factory=AugCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    ema: EmaCfg = field(default_factory=EmaCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    dist: DistCfg = field(default_factory=DistCfg)
    log: LogCfg = field(default_factory=LogCfg)
    output_dir: str = "runs/default"
    seed: int = 0


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
                "train.profile_wait", "train.eval_every")
UNIT_INTERVAL = ("optim.layer_decay", "aug.smoothing", "aug.reprob", "aug.hflip", "aug.mixup_prob",
                 "aug.mixup_switch_prob", "ema.decay", "model.drop_path")


def _fields(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def all_keys(cfg: Config | None = None) -> list[str]:
    """Every dotted key of the schema, e.g. 'optim.lr'."""
    cfg = cfg or Config()
    keys = []
    for name, f in _fields(cfg).items():
        value = getattr(cfg, name)
        keys += [f"{name}.{k}" for k in _fields(value)] if dataclasses.is_dataclass(value) else [name]
    return keys


def _unknown_key(key: str, cfg: Config) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(cfg), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; valid keys: {', '.join(all_keys(cfg))}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """Check a value against the field's declared type, converting only where nothing can be lost."""
    kind = annotation.replace(" ", "")
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind == "str":
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif kind == "list":
        if isinstance(value, (list, tuple)):
            return list(value)
    raise ConfigError(f"config key '{key}' must be {kind}, got {type(value).__name__} {value!r}")


def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        fields = _fields(node)
        if part not in fields:
            raise _unknown_key(key, cfg)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(node, part)):
                if not isinstance(value, dict):
                    raise ConfigError(f"config key '{key}' is a section; give a mapping or set '{key}.<name>'")
                for sub, sub_value in value.items():
                    _set(cfg, f"{key}.{sub}", sub_value)
                return
            setattr(node, part, _coerce(key, value, str(fields[part].type)))
            return
        node = getattr(node, part)
        if not dataclasses.is_dataclass(node):
            raise _unknown_key(key, cfg)


def get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: Config) -> None:
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


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=1e-3' -> ('optim.lr', 0.001). Values are YAML, so lists and booleans work."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form key.sub=value (e.g. optim.lr=1e-3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist; see configs/ for the shipped ones")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, not {type(data).__name__}")
    return data


def _base_path(path: str, data: dict) -> str | None:
    """The file named by a top-level 'base:' key (removed from data), relative to the folder of path."""
    if "base" not in data:
        return None
    base = data.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"config file '{path}': base must be the path of the YAML file it extends (relative to "
                          f"its folder, or absolute), got {type(base).__name__} {base!r}")
    return os.path.normpath(os.path.join(os.path.dirname(path), os.path.expanduser(base.strip())))


def _apply_file(cfg: Config, path: str, chain: tuple[str, ...] = ()) -> None:
    """Set cfg from a YAML file: its base first (recursively), then its own keys, each overriding one key."""
    data = _read_yaml(path)
    base = _base_path(path, data)
    if base is not None:
        chain = (*chain, path)
        if os.path.realpath(base) in map(os.path.realpath, chain):
            raise ConfigError(f"config files extend each other in a cycle: {' -> '.join((*chain, base))}; "
                              f"remove the base key from one of them")
        if not os.path.isfile(base):
            raise ConfigError(f"config file '{path}': its base '{base}' does not exist; base is a path relative "
                              f"to the folder of '{path}', or absolute")
        _apply_file(cfg, base, chain)
    try:
        for key, value in data.items():
            _set(cfg, str(key), value)
    except ConfigError as e:
        raise ConfigError(f"config file '{path}': {e}") from None


def load_config(path: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- overrides, validated. Raises ConfigError with a one-line message.

    A file may start from another: a top-level 'base: other.yaml' (relative to the file's folder) loads that
    file first (which may have a base of its own); the file's keys then override the base's one by one, so a
    section names only the keys it changes. The resolved Config holds no trace of the base.
    """
    cfg = Config()
    if path:
        _apply_file(cfg, path)
    for text in overrides:
        _set(cfg, *parse_override(text))
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config saved by to_dict (e.g. from a checkpoint)."""
    cfg = Config()
    for key, value in data.items():
        _set(cfg, key, value)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config atomically, so a crash never leaves half a file."""
    atomic_write(path, lambda f: yaml.safe_dump(to_dict(cfg), f, sort_keys=False), binary=False)


__all__ = ["Config", "ConfigError", "load_config", "save_config", "config_from_dict", "to_dict", "all_keys",
           "parse_override", "get"]
