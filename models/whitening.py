"""Patch-whitening initialisation of the stem (`model.stem_init: whiten`).

The stem is a linear map of non-overlapping patches. Setting its filters to the whitening of the training data's
patches (the eigenvectors of their covariance scaled by 1/sqrt(eigenvalue + eps), each also negated) hands the
first block decorrelated inputs of unit variance from the first step, instead of a random projection that
training must first sort out. The technique, and eps = 5e-4, are those of the CIFAR-10 speed runs (Jordan, "94% on
CIFAR-10 in 3.29 Seconds on a Single GPU", arXiv:2404.00498, 2024), where the whitened layer is frozen; here the
filters go on training with the rest. Filters beyond twice the patch dimension keep their random init.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .convnext import ConvNeXt

EIGEN_EPS = 5e-4  # added to the eigenvalues: the flattest directions are not blown up without bound


def patch_whitening(images: torch.Tensor, patch_size: int, eps: float = EIGEN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(filters, mean) of the non-overlapping patch_size x patch_size patches of `images` (N, C, H, W).

    filters: (C * patch_size^2, C, patch_size, patch_size), the whitening directions, largest eigenvalue first;
    mean: the mean patch, flattened. Computed in float64: the small eigenvalues matter.
    """
    patches = F.unfold(images.double(), kernel_size=patch_size, stride=patch_size)  # (N, d, patches per image)
    patches = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    mean = patches.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov((patches - mean).T))  # ascending
    filters = (eigenvectors / (eigenvalues + eps).sqrt()).T.flip(0)
    return filters.reshape(-1, images.shape[1], patch_size, patch_size), mean


@torch.no_grad()
def whiten_stem(model: ConvNeXt, images: torch.Tensor) -> int:
    """Set the stem's filters to +- the patch whitening of `images` (normalised, as the model sees them) and its
    biases so that those filters' outputs are centred; returns how many filters were set."""
    conv = model.downsample_layers[0][0]
    filters, mean = patch_whitening(images, conv.kernel_size[0])
    n = min(len(filters), conv.out_channels // 2)
    signed = torch.cat([filters[:n], -filters[:n]]).to(conv.weight)
    conv.weight[:2 * n] = signed
    conv.bias[:2 * n] = -(signed.flatten(1) @ mean.to(signed))
    return 2 * n
