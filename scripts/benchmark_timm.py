"""timm's side of scripts/benchmark.py's comparisons: its convnext built as ours (--vs-timm) and its own train
loader of the same recipe (--modes timm_loader)."""
from __future__ import annotations

import os

import torch

import distributed_utils as du
from core.config import Config
from core.errors import UserError
from data import loader_workers
from data.augment.timm_reference import allow_zero_bit_posterize
from data.loaders.recipes import mean_std
from models import stage_shapes


def timm_twin(cfg: Config, num_classes: int, in_chans: int, device: torch.device, our_params: int):
    """timm's convnext_<variant> with our model options, its own defaults otherwise (conv_mlp for atto..nano);
    refused unless it has as many parameters as ours. (Not FLOPs: on the CPU ours runs the patchify and small-map
    depthwise convs as matrix products (engine/cpu_convs.py), whose FLOPs torch counts differently.)"""
    import timm

    m = cfg.model
    if cfg.train.grad_checkpointing not in (0, 4):
        raise UserError("--vs-timm compares train.grad_checkpointing 0 or 4 only (timm checkpoints all stages or none)")
    depths, dims = stage_shapes(m.name, m.depths, m.dims)
    model = timm.create_model(m.name, depths=depths, dims=dims, num_classes=num_classes, in_chans=in_chans,
                              drop_path_rate=m.drop_path, ls_init_value=m.layer_scale_init or None,
                              patch_size=m.patch_size, head_init_scale=m.head_init_scale)
    model.set_grad_checkpointing(cfg.train.grad_checkpointing == 4)
    theirs = sum(p.numel() for p in model.parameters())
    if theirs != our_params:  # e.g. patch_size < 4, where timm adds a stride-2 downsampler to stage 0
        raise UserError(f"--vs-timm: timm's {m.name} has {theirs:,} parameters with these options, ours "
                        f"{our_params:,}: not the same network, so not comparable (try model.patch_size=4)")
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    return model.to(device, memory_format=fmt)


def timm_loader(cfg: Config, env: du.DistEnv, device: torch.device):
    """timm's own train loader (create_loader) of the config's imagenet recipe over data.root/train, with the same
    workers and batch: what timm's train.py runs."""
    from timm.data import ImageDataset, create_loader

    if cfg.data.name != "imagefolder" or cfg.data.recipe != "imagenet":
        raise UserError("--modes timm_loader compares loaders on an image folder: set data.name=imagefolder, "
                        "data.recipe=imagenet and data.root")
    mean, std = mean_std(cfg.data.name)
    loader = create_loader(
        ImageDataset(os.path.join(cfg.data.root, "train")), cfg.data.img_size, cfg.data.batch_size,
        is_training=True, re_prob=cfg.aug.reprob, re_mode="pixel", hflip=cfg.aug.hflip, color_jitter=None,
        auto_augment=cfg.aug.rand_augment or None, interpolation=cfg.aug.interpolation, mean=mean, std=std,
        num_workers=loader_workers(cfg.data), distributed=env.distributed, pin_memory=device.type == "cuda",
        device=device, use_prefetcher=device.type == "cuda", persistent_workers=loader_workers(cfg.data) > 0)
    allow_zero_bit_posterize(loader.dataset.transform)  # before the workers start; Pillow >= 13 refuses 0 bits
    return loader
