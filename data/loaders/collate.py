"""Collating samples into batches: unreadable images dropped, images stacked channels_last in the worker's shared
memory."""
from __future__ import annotations

import torch
from torch.utils.data import default_collate, get_worker_info

from data.sources import DataError


def readable(samples: list) -> list:
    """The samples whose image could be read (a skipped unreadable image arrives as None)."""
    kept = [s for s in samples if s is not None]
    if not kept:
        raise DataError(f"all {len(samples)} images of a batch were unreadable; check the data set's files")
    return kept


def keep_batch(batch):
    """collate_fn for BatchTransformed: its batches arrive already stacked."""
    return batch


def collate_readable(batch: list):
    """collate_fn for PerSampleTransformed: the readable samples' images stacked channels_last (see stack_nhwc),
    their labels by default collation."""
    samples = readable(batch)
    images = [image for image, _ in samples]
    return stack_nhwc(images), default_collate([label for _, label in samples])


def stack_nhwc(images: list[torch.Tensor]) -> torch.Tensor:
    """(C, H, W) images -> an (N, C, H, W) batch laid out channels_last, in shared memory inside a loader worker.

    The decoder and resize leave each image in HWC memory, and the device's first step wants the batch
    channels_last: stacking them so is a plain copy, where a contiguous NCHW batch would transpose every image in
    the worker and transpose it back after the copy to the device."""
    c, h, w = images[0].shape
    if get_worker_info() is not None:  # as default_collate: straight into the memory that goes to the main process
        storage = images[0]._typed_storage()._new_shared(len(images) * c * h * w, device=images[0].device)
        out = images[0].new(storage).resize_(len(images), h, w, c)
    else:
        out = images[0].new_empty(len(images), h, w, c)
    torch.stack([image.permute(1, 2, 0) for image in images], 0, out=out)
    return out.permute(0, 3, 1, 2)
