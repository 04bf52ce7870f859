"""The moving average of the weights: timm's ModelEmaV3 (foreach updates), optionally updated every N steps."""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from timm.utils import ModelEmaV3
from torch import nn


class Ema(ModelEmaV3):
    """ModelEmaV3 updated once every `every` optimizer steps with decay**every.

    The weights move little in a few steps, so this averages over the same horizon as an update per step, for
    1/every of its memory traffic (the whole model read and written), which is a step's worth on small models.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool, every: int = 1):
        super().__init__(model, decay=decay, use_warmup=warmup)
        self.every = every
        self._pairs: tuple[list, list, list] = ([], [], [])
        self._paired_with: Optional[weakref.ref] = None

    def get_decay(self, step: Optional[int] = None) -> float:
        return super().get_decay(step) ** self.every

    def step(self, model: nn.Module, step: int) -> None:
        """Called after each optimizer step; updates on every `every`-th."""
        if step % self.every == 0:
            self.update(model, step=step)

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        """timm's update, except that the two models' tensors are paired once, not through both state_dicts at every
        update: those two module walks took ~1.5 ms for atto, 1.5% of a batch-16 step. The pairs are the Parameter
        and buffer objects themselves (keep_vars), which stay the models' own all run: checkpoints load into them."""
        if self._paired_with is None or self._paired_with() is not model:
            self._paired_with = weakref.ref(model)  # a plain reference would make the model a submodule of the EMA
            pairs = list(zip(self.module.state_dict(keep_vars=True).values(), model.state_dict(keep_vars=True).values()))
            floats = [pair for pair in pairs if pair[0].is_floating_point()]
            self._pairs = ([e for e, _ in floats], [m for _, m in floats],
                           [pair for pair in pairs if not pair[0].is_floating_point()])
        ema_values, model_values, others = self._pairs
        for ema_v, model_v in others:  # integer buffers (BatchNorm's step count) are copied, as timm does
            ema_v.copy_(model_v)
        self._foreach_lerp_(ema_values, model_values, weight=1.0 - self.get_decay(step))
