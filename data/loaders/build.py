"""Building the data sets and their DataLoaders for a run: the splits in their recipe, train loaders that shuffle
resumably, eval loaders that see every sample once, worker processes that leave stop signals to their rank."""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

import distributed_utils as du
from core.config import AugCfg, DataCfg
from data.augment.batch import BatchNormalize
from data.loaders.collate import collate_readable, keep_batch
from data.loaders.recipes import apply_recipe, data_mean_std
from data.loaders.samplers import ExactShardSampler, build_train_sampler
from data.loaders.transformed import BatchTransformed, PerSampleTransformed
from data.sources import DataError, load_splits


@dataclass
class DatasetInfo:
    num_classes: int
    in_chans: int
    train_size: int  # 0 when the train split was not built
    val_size: int  # 0 when there is no validation split (training without evaluation)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]


def build_datasets(data_cfg: DataCfg, aug_cfg: AugCfg, train: bool = True,
                   seed: int = 0) -> tuple[Dataset | None, Dataset | None, DatasetInfo]:
    """(train set or None when train=False, val set or None where training has none, info); items are (uint8 CHW
    image, label): batch_transforms finishes them on the device."""
    splits = load_splits(data_cfg, train)
    mean, std = data_mean_std(data_cfg)
    train_set = (apply_recipe(splits.train, data_cfg, aug_cfg, True, seed)
                 if splits.train is not None else None)
    val_set = apply_recipe(splits.val, data_cfg, aug_cfg, False) if splits.val is not None else None
    info = DatasetInfo(splits.num_classes, splits.in_chans, len(train_set) if train_set is not None else 0,
                       len(val_set) if val_set is not None else 0, mean, std,
                       splits.class_names or [str(i) for i in range(splits.num_classes)])
    return train_set, val_set, info


def skipped_images(dataset: BatchTransformed | PerSampleTransformed) -> int:
    """Unreadable images skipped so far (data.skip_corrupt) by this process's loaders of `dataset`."""
    return dataset.source.skipped()


def loader_workers(data_cfg: DataCfg) -> int:
    """data.num_workers, or for -1 this process's share of the node's cores less the one it needs itself."""
    return data_cfg.num_workers if data_cfg.num_workers >= 0 else du.cores_per_process() - 1


def leave_stop_signals_to_the_rank(worker_id: int) -> None:
    """worker_init_fn: the rank's stop signals are the rank's. torchrun sends SIGTERM to each rank's process group,
    so a loader worker would die of it while the rank still needs batches to reach the agreed step and checkpoint:
    the worker moves to a process group of its own. SIGUSR1 (SLURM's early warning, which some SLURM setups send
    to every process of the step) it ignores. SIGTERM itself stays fatal, so the rank (and multiprocessing at
    exit) can still end its workers; a rank that is killed outright takes them with it (DataLoader's watchdog)."""
    os.setpgrp()
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _loader_options(dataset: Dataset, data_cfg: DataCfg) -> dict:
    workers = loader_workers(data_cfg)
    return dict(
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        prefetch_factor=data_cfg.prefetch_factor if workers > 0 else None,
        worker_init_fn=leave_stop_signals_to_the_rank if workers > 0 else None,
        collate_fn=keep_batch if isinstance(dataset, BatchTransformed) else collate_readable,
    )


def build_train_loader(dataset: Dataset, data_cfg: DataCfg, rank: int, world_size: int,
                       seed: int) -> DataLoader:
    """Shuffled, drop_last loader for this rank; call start_epoch(loader, epoch) before each epoch."""
    per_rank = len(dataset) // world_size
    if per_rank < data_cfg.batch_size:
        raise DataError(f"{len(dataset)} training samples over {world_size} process(es) leave {per_rank} per "
                        f"process, less than one batch (data.batch_size={data_cfg.batch_size}); lower "
                        f"data.batch_size")
    sampler = build_train_sampler(dataset, world_size, rank, seed)
    # A generator of its own keeps the worker-seed draw of each new iterator off the global RNG, as in
    # build_eval_loader; the augmentation in workers is seeded by EpochSeeding (start_epoch).
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    loader = DataLoader(dataset, batch_size=data_cfg.batch_size, sampler=sampler, drop_last=True,
                        generator=generator, **_loader_options(dataset, data_cfg))
    return loader


def sample_images(dataset: Dataset, data_cfg: DataCfg, pixels: int = 2 ** 22) -> torch.Tensor:
    """About `pixels` pixels' worth of images spread evenly over `dataset` (no RNG draws but the recipe's own), as
    its recipe yields them, normalised: data statistics for models.whitening. 4,096 images at 32 px, 83 at 224 px."""
    count = min(len(dataset), max(1, pixels // data_cfg.img_size ** 2))
    indices = torch.linspace(0, len(dataset) - 1, count).long().tolist()
    loader = DataLoader(dataset, batch_size=data_cfg.batch_size, sampler=indices, **_loader_options(dataset, data_cfg))
    images = torch.cat([images for images, _ in loader])
    return BatchNormalize(*data_mean_std(data_cfg))(images) if images.dtype == torch.uint8 else images


def start_epoch(loader: DataLoader, epoch: int, start: int = 0) -> None:
    """Point a train loader at `start` samples into `epoch`: the same shuffle on every rank, resumed in place, and
    the same augmentation draws in loader workers whatever happened before (EpochSeeding)."""
    loader.sampler.set_epoch(epoch, start=start)
    seeding = getattr(loader.dataset, "seeding", None)
    if seeding is not None:
        seeding.set_epoch(epoch)


def build_eval_loader(dataset: Dataset, data_cfg: DataCfg, rank: int, world_size: int,
                      collate_fn: Callable | None = None) -> DataLoader:
    """This rank's share of the eval set, every sample on exactly one rank; the last batch may be short.

    Args:
        collate_fn: replaces the recipe's (predict.py's data set yields more than images and labels).
    """
    batch_size = data_cfg.eval_batch_size or 2 * data_cfg.batch_size
    sampler = ExactShardSampler(len(dataset), world_size, rank)
    options = {**_loader_options(dataset, data_cfg), **({"collate_fn": collate_fn} if collate_fn else {})}
    # A generator of its own: creating the iterator draws a worker seed from it, which from the global RNG would shift
    # the training's random streams whenever an eval loader is first used (e.g. after a resume).
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False,
                      generator=torch.Generator().manual_seed(0), **options)
