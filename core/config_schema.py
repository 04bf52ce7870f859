"""The run configuration's schema: a dataclass per section, every key declared with its type and default (and
what it means), so that core.config_loading can refuse a typo or a wrong type before anything runs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


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
    crop_mode: str = "center"  # imagenet recipe's eval view, timm's: center | squash | border (data.decoding.jpeg)
    mean: list = field(default_factory=list)  # per-channel normalisation mean, 0-1 ([]: the data set's)
    std: list = field(default_factory=list)  # per-channel normalisation std ([]: the data set's)
    dct_scaling: bool = False  # imagenet recipe: decode crops >= 2x img_size at 1/2-1/8 scale (faster on big photos)
    classes: list = field(default_factory=list)  # keep only these class indices, relabelled 0..k-1 ([]: all)
    train_limit: int = 0  # train on a fixed random subset of this many images (0: all), for quick experiments
    skip_corrupt: bool = False  # imagefolder, shards, hf: skip unreadable images with a warning instead of stopping
    max_image_pixels: int = 178_956_970  # imagenet recipe: refuse images whose header claims more (a corrupt header
    # or a decompression bomb) before decoding; Pillow's limit (2 x PIL.Image.MAX_IMAGE_PIXELS); 0: no limit
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
