"""A batch's small parameters (indices, masks, arguments, matrices) built on the host, sent to the device in one copy.

    stage = Staging(images.device)
    rows = stage.add([0, 3, 5], torch.long)      # host values now ...
    stage.send()                                 # ... one copy for all of them ...
    images[rows.get()]                           # ... device tensors after it

On CUDA a tensor made from a Python list on the device, or a copy from pageable host memory, waits for the GPU to
finish all the work queued before it (cudaMemcpy then a stream sync): a few of those per batch leave the GPU idle
while the host queues the next step. Here the values go into one pinned buffer and travel with one copy that does
not wait (non_blocking); the caching host allocator keeps that buffer until the copy is done.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64 for the sums and coordinates PIL computes in double; float32 where the device has no float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


class Staged:
    """One value's place in a Staging; get() is it on the device once the stage is sent."""

    def __init__(self, stage: "Staging", offset: int, shape: tuple[int, ...], dtype: torch.dtype):
        self.stage, self.offset, self.shape, self.dtype = stage, offset, shape, dtype

    def get(self) -> Tensor:
        sent = self.stage.sent
        if sent is None:
            raise RuntimeError("Staging.send() has not run yet")
        return sent[self.offset:self.offset + math.prod(self.shape)].view(self.shape).to(self.dtype)


class Staging:
    """Collects host values (all exactly representable in the device's wide float: integers below 2**24 on MPS)
    and sends them to `device` in one copy.

    Args:
        device: where the values are used.
    """

    def __init__(self, device: torch.device):
        self.device, self.wide = device, wide_dtype(device)
        self.parts: list[Tensor] = []
        self.size = 0
        self.sent: Optional[Tensor] = None

    def add(self, values: Tensor | Sequence, dtype: Optional[torch.dtype] = None) -> Staged:
        """Stage host values (a tensor or a nested list); get() later returns them on the device as `dtype`
        (default: the wide float)."""
        host = torch.as_tensor(values, dtype=self.wide)
        staged = Staged(self, self.size, tuple(host.shape), dtype or self.wide)
        self.parts.append(host.reshape(-1))
        self.size += host.numel()
        return staged

    def send(self) -> None:
        """The one copy to the device (none where nothing was staged)."""
        if not self.parts:
            return
        pin = self.device.type == "cuda"
        host = torch.empty(self.size, dtype=self.wide, pin_memory=pin)
        torch.cat(self.parts, out=host)
        self.sent = host.to(self.device, non_blocking=pin)
        self.parts = []
