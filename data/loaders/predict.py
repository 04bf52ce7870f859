"""What predict.py reads: its inputs (image files or a split of the configured data) in the model's evaluation view,
each sample with its index and label, and an image that cannot be read as the reason why instead of a stop.

    inputs, classes = predict_inputs(cfg.data, cfg.aug, paths)              # or split="val"
    loader = build_eval_loader(inputs, cfg.data, rank, world_size, collate_fn=collate_predicting)
    for images, indices, labels, errors in loader: ...                        # images None: all were unreadable
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset

from core.config import AugCfg, DataCfg
from data.loaders.collate import stack_nhwc
from data.loaders.recipes import apply_recipe
from data.loaders.transformed import BatchTransformed, PerSampleTransformed
from data.sources import DataError, UnreadableImage, given_images, load_splits

SPLITS = ("train", "val")


class Predicting(Dataset):
    """A split in its recipe's evaluation view whose sample i is (image or None, i, label, reason the image could
    not be read or "").

    Args:
        dataset: the split, wrapped by data.loaders.recipes.apply_recipe(train=False).
        name: sample i's name in the output (a path as given, or the source's name for it).
    """

    def __init__(self, dataset: BatchTransformed | PerSampleTransformed, name: Callable[[int], str]):
        self.dataset, self.name, self.labels = dataset, name, dataset.source.labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Optional[torch.Tensor], int, int, str]:
        try:
            image, _ = self.dataset[i]
        except UnreadableImage as e:  # any other error (a changed data set, a bug) still stops
            return None, i, int(self.labels[i]), e.what
        return image, i, int(self.labels[i]), ""


def collate_predicting(batch: list) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """(the readable images stacked channels_last or None, their indices, their labels, (index, reason) of the
    unreadable ones)."""
    read = [sample for sample in batch if sample[0] is not None]
    images = stack_nhwc([image for image, *_ in read]) if read else None
    return (images, torch.tensor([i for _, i, _, _ in read], dtype=torch.long),
            torch.tensor([label for _, _, label, _ in read], dtype=torch.long),
            [(i, error) for image, i, _, error in batch if image is None])


def predict_inputs(data_cfg: DataCfg, aug_cfg: AugCfg, paths: Sequence[str] = (), split: str = "",
                   channels: int = 3) -> tuple[Predicting, Optional[list[str]]]:
    """The images `paths` name (data.sources.given), or with `split` that split of the configured data set; and
    the data set's class names (None for given images, and for a data set without names).

    Args:
        channels: of the model's input: given files are decoded to grey for 1 (the imagenet recipe decodes itself).
    """
    data_cfg = dataclasses.replace(data_cfg, skip_corrupt=False)  # an unreadable image is reported in its row
    if not split:
        source = given_images(paths, channels)
        return Predicting(apply_recipe(source, data_cfg, aug_cfg, train=False), source.paths.__getitem__), None
    if split not in SPLITS:
        raise DataError(f"--split {split}: the splits are {' and '.join(SPLITS)}")
    splits = load_splits(data_cfg, train=split == "train")
    source = splits.train if split == "train" else splits.val
    if source is None:
        raise DataError(f"data.name={data_cfg.name} in '{data_cfg.root}' has no {split} split; give another split "
                        f"or image paths")
    return Predicting(apply_recipe(source, data_cfg, aug_cfg, train=False), source.name), splits.class_names
