"""The moving average of the weights: timm's ModelEmaV3 (foreach updates), optionally updated every N steps."""
from __future__ import annotations

from typing import Optional

from timm.utils import ModelEmaV3
from torch import nn


class Ema(ModelEmaV3):
    """ModelEmaV3 updated once every `every` optimizer steps with decay**every.

    The weights move little in a few steps, so this averages over the same horizon as an update per step, for
    1/every of its memory traffic (the whole model read and written), which is a step's worth on small models.

    Args:
        model: the model to average (unwrapped: its state_dict keys are the EMA's).
        decay: the decay of one optimizer step.
        warmup: timm's decay warmup (use_warmup).
        every: optimizer steps between updates.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool, every: int = 1):
        super().__init__(model, decay=decay, use_warmup=warmup)
        self.every = every

    def get_decay(self, step: Optional[int] = None) -> float:
        return super().get_decay(step) ** self.every

    def step(self, model: nn.Module, step: int) -> None:
        """Called after each optimizer step; updates on every `every`-th."""
        if step % self.every == 0:
            self.update(model, step=step)
