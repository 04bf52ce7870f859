"""The data sets a loader iterates: a source wrapped in its recipe's per-image or per-batch work, and the seeds that
make a worker's augmentation depend on (seed, epoch, sample) alone."""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info
from torchvision.transforms.functional import InterpolationMode, pil_to_tensor, resize

from data.loaders.collate import readable
from data.sources import ImageSource


class EpochSeeding:
    """Seeds for augmentation in loader workers that depend on (seed, epoch, sample) and on nothing else.

    DataLoader seeds each worker once, so which draws a batch gets depends on which worker it lands on and on what
    that worker did before: a run resumed mid-epoch would augment the rest of the epoch differently. Seeding the
    worker's generators from the epoch and the sample index instead makes a resumed epoch exactly the one it
    would have been. The epoch lives in shared memory, so persistent workers see set_epoch too. In the main
    process (num_workers=0) nothing is reseeded: the run's own generator state, checkpointed, governs.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def seed_worker(self, index: int) -> None:
        if get_worker_info() is None:
            return
        value = ((self.seed * 1_000_003 + int(self._epoch)) * 1_000_000_007 + index) % 2 ** 63
        torch.default_generator.manual_seed(value)  # the CPU's: torch.manual_seed also seeds every device, ~0.16 ms
        random.seed(value)
        np.random.seed(value % 2 ** 32)


class PerSampleTransformed(Dataset):
    """A source whose decoder is the imagenet recipe's per-image work, in the loader, each sample seeded by
    EpochSeeding; the source decodes where it reads, so that an unreadable file is caught, and skipped, there."""

    def __init__(self, source: ImageSource, seeding: EpochSeeding | None = None):
        self.source, self.seeding = source, seeding

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        if self.seeding is not None:
            self.seeding.seed_worker(i)
        return self.source[i]  # None for an unreadable image skipped by the source; the collate drops it


class BatchTransformed(Dataset):
    """Serves whole uint8 batches at img_size through `__getitems__` (the small recipe): one gather of in-memory
    images instead of a per-image call, so that a 2-core trainer does not wait on its data.

    DataLoader hands `__getitems__` the batch's indices; the result is already a batch, so the loader
    must use `keep_batch` as its collate_fn.

    Args:
        source: the raw split; one held in memory serves a batch with one gather (ImageSource.batch).
        img_size: the side the images are resized to where they differ (antialiased).
        interpolation: of that resize: bicubic, bilinear or nearest.
    """

    def __init__(self, source: ImageSource, img_size: int, interpolation: str = "bicubic"):
        self.source, self.size, self.interpolation = source, [img_size, img_size], InterpolationMode(interpolation)

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        held = self.source.batch(indices)
        if held is not None:
            images, labels = held
            return self._resized(images), labels
        samples = readable([self.source[i] for i in indices])
        images = torch.stack([self._as_uint8(image) for image, _ in samples])
        return images, torch.tensor([label for _, label in samples], dtype=torch.long)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        images, labels = self.__getitems__([i])
        return images[0], int(labels[0])

    def _resized(self, images: torch.Tensor) -> torch.Tensor:
        if list(images.shape[-2:]) == self.size:
            return images
        return resize(images, self.size, self.interpolation, antialias=True)

    def _as_uint8(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        # Files on disk come in any size; bring them to img_size so the batch can be stacked.
        if isinstance(image, Image.Image):
            return pil_to_tensor(resize(image, self.size, self.interpolation))
        return self._resized(image)
