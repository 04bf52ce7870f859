"""ConvNeXt, "A ConvNet for the 2020s" (Liu et al., CVPR 2022).

Module and parameter names follow the official facebookresearch/ConvNeXt release
(`downsample_layers`, `stages`, `dwconv`, `pwconv1`, ...) so its checkpoints load as they are.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

# name -> (depths, dims). tiny..xlarge: paper Sec. 3, "ConvNeXt variants"; atto..nano: timm's small variants.
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}

LN_EPS = 1e-6  # the paper's LayerNorm epsilon; released weights were trained with it


class Block(nn.Module):
    """dwconv 7x7 -> LN -> Linear 4C -> GELU -> Linear C -> layer scale -> drop path, plus residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        # Linear layers on NHWC are the official 1x1 convs; the names must stay for checkpoint keys.
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # No parameter at all when disabled, so such checkpoints have no `gamma` key (as officially).
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init)) if layer_scale_init > 0 else None
        self.drop_path = DropPath(drop_path)  # identity at rate 0 or in eval; kept to expose the rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXt(nn.Module):
    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = VARIANTS["tiny"][0],
        dims: Sequence[int] = VARIANTS["tiny"][1],
        drop_path: float = 0.0,
        layer_scale_init: float = 1e-6,
        head_init_scale: float = 1.0,
        patch_size: int = 4,
    ):
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"ConvNeXt has 4 stages; got depths={tuple(depths)}, dims={tuple(dims)}")
        self.head_init_scale = head_init_scale
        self.num_features = dims[-1]
        self.checkpoint_stages = 0  # set_grad_checkpointing

        # Index 0 is the stem, 1..3 the downsamplers: the official layout keeps them in one list. LayerNorm2d
        # normalises the channels of NCHW maps (F.layer_norm on an NHWC view).
        stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=patch_size, stride=patch_size),
                             LayerNorm2d(dims[0], eps=LN_EPS))
        self.downsample_layers = nn.ModuleList([stem] + [
            nn.Sequential(LayerNorm2d(dims[i - 1], eps=LN_EPS), nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2))
            for i in range(1, 4)
        ])

        # Linear 0..drop_path over all blocks; plain Python so it also works under a meta-device context.
        n = sum(depths)
        rates = iter([drop_path * i / max(n - 1, 1) for i in range(n)])
        self.stages = nn.ModuleList(
            nn.Sequential(*[Block(dim, next(rates), layer_scale_init) for _ in range(depth)])
            for depth, dim in zip(depths, dims)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=LN_EPS)
        self.apply(_init_weights)
        self.head = self._new_head(num_classes)

    def _new_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.num_features, num_classes)
        _init_weights(head)
        with torch.no_grad():
            head.weight.mul_(self.head_init_scale)
            head.bias.mul_(self.head_init_scale)
        return head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a fresh one (0 classes: no head), on the model's device and dtype."""
        ref = self.norm.weight
        self.head = self._new_head(num_classes).to(device=ref.device, dtype=ref.dtype)

    def set_grad_checkpointing(self, stages: int) -> None:
        """Keep only each block's input for the backward in the first `stages` stages (0-4), and recompute the rest:
        less activation memory (the early stages hold the most), one more forward of those blocks in time."""
        if not 0 <= stages <= len(self.stages):
            raise ValueError(f"grad checkpointing takes 0 to {len(self.stages)} stages, not {stages}")
        self.checkpoint_stages = stages

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled and normalized features, (N, dims[-1])."""
        for i, (downsample, stage) in enumerate(zip(self.downsample_layers, self.stages)):
            x = downsample(x)
            if i < self.checkpoint_stages and torch.is_grad_enabled():
                for block in stage:  # non-reentrant: works under DDP and compile; drop path is replayed exactly
                    x = checkpoint(block, x, use_reentrant=False)
            else:
                x = stage(x)
        return self.norm(x.mean(dim=(-2, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
