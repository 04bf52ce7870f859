"""How indices are split over processes: padded and shuffled for training, exact for evaluation."""
from __future__ import annotations

from typing import Iterator

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


def build_train_sampler(dataset: Dataset, num_replicas: int, rank: int, seed: int) -> DistributedSampler:
    """The one place the training sampler is made, so resuming mid-epoch can swap it out."""
    return DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                              drop_last=True)
