"""How indices are split over processes: padded and shuffled for training, exact for evaluation."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler


class ExactShardSampler(Sampler[int]):
    """Evaluation split with no padding: every index lands on exactly one rank, exactly once.

    DistributedSampler pads with repeats so ranks get equal counts, which would count some samples
    twice in the metrics; here ranks may instead get counts that differ by one (or zero samples when
    there are more ranks than samples).
    """

    def __init__(self, dataset_len: int, num_replicas: int, rank: int):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not within a world of {num_replicas} processes")
        self.dataset_len, self.num_replicas, self.rank = dataset_len, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_len, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.num_replicas))


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (shuffled, drop_last) that can begin an epoch after `start` samples of its global order.

    The epoch's global order is one seeded permutation; rank r of W takes order[start:][r::W]. At start=0 that is
    exactly what DistributedSampler yields. Resuming with the same W and a start that is a multiple of W gives
    each rank the rest of its own sequence; with another W the remaining samples are shared out afresh.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)  # the same permutation as DistributedSampler's
        order = torch.randperm(len(self.dataset), generator=g)[self.start:].tolist()
        return iter(order[self.rank:len(self) * self.num_replicas:self.num_replicas])

    def __len__(self) -> int:
        return max(0, len(self.dataset) - self.start) // self.num_replicas


def build_train_sampler(dataset: Dataset, num_replicas: int, rank: int, seed: int) -> ResumableDistributedSampler:
    """The one place the training sampler is made."""
    return ResumableDistributedSampler(dataset, num_replicas=num_replicas, rank=rank, seed=seed)
