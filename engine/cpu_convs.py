"""ConvNeXt's two kinds of convolution computed on the CPU as matrix products: the same results, several times faster.

`use_cpu_matrix_convs(model)` switches a built model's patchify convolutions (the stem and the downsamplers) and its
depthwise convolutions to these forms in place. Each module keeps its Parameter objects and only changes class, so
the state dict, an optimizer made before or after, and checkpoints are unaffected. On any other device the forms run
nn.Conv2d's own forward, since they were only measured on the CPU. There, for the small maps of 28-32 px images,
oneDNN's convolution kernels (their weight gradients above all) took half of a ConvNeXt-atto training step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Largest map (pixels) given the dense form of the depthwise convolution: its matrix grows as the square of the map,
# and by 14x14 px oneDNN's kernel is the faster.
DENSE_MAX_PIXELS = 64


class PatchConv2d(nn.Conv2d):
    """A convolution whose stride is its kernel size: it maps each non-overlapping k x k patch on its own, so on the
    CPU it runs as one matrix product of the flattened patches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        n, c, k = x.shape[0], x.shape[1], self.stride[0]
        h, w = x.shape[2] // k, x.shape[3] // k  # as the conv, drop the rows and columns past the last whole patch
        # Patches flattened in (row, column, channel) order: from channels_last memory that is one gather copy.
        patches = x[:, :, :h * k, :w * k].permute(0, 2, 3, 1).reshape(n, h, k, w, k, c).transpose(2, 3)
        weight = self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, k * k * c)
        out = F.linear(patches.reshape(n * h * w, k * k * c), weight, self.bias)
        return out.view(n, h, w, self.out_channels).permute(0, 3, 1, 2)  # NCHW shape, channels_last memory


class DepthwiseConv2d(nn.Conv2d):
    """A k x k depthwise convolution with 'same' zero padding. On the CPU, a map of at most DENSE_MAX_PIXELS pixels
    is convolved as a matrix product: per channel, an (h*w x h*w) matrix holding the kernel weight that links each
    output pixel to each input pixel (zero beyond the kernel's reach), applied to all images at once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if x.device.type != "cpu" or h * w > DENSE_MAX_PIXELS:
            return super().forward(x)
        r = self.kernel_size[0] // 2
        # Each kernel cropped or zero-padded to (2h-1) x (2w-1): one weight for every offset between two pixels.
        offsets = F.pad(self.weight, (w - 1 - r, w - 1 - r, h - 1 - r, h - 1 - r))
        # Its h x w window (i, j) holds the weights that output pixel (h-1-i, w-1-j) gives every input pixel, so
        # the windows in reverse order are the columns of matrix[channel, input pixel, output pixel]. (As channels of
        # one image, not as c images: unfold and its backward loop over images.)
        matrix = F.unfold(offsets.view(1, c, 2 * h - 1, 2 * w - 1), (h, w)).view(c, h * w, h * w).flip(-1)
        rows = x.permute(1, 0, 2, 3).reshape(c, n, h * w).contiguous()  # bmm is slow on strided batches
        out = _ContiguousGrad.apply(torch.baddbmm(self.bias.view(c, 1, 1), rows, matrix))
        return out.view(c, n, h, w).permute(1, 0, 2, 3)


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward makes the gradient contiguous. The gradient of the dense conv's output comes back
    from the block in channels_last memory, a stride-1 batch dimension to bmm's backward, which then falls back to a
    loop over the channels (8x slower at 2x2 px)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _plain(conv: nn.Conv2d) -> bool:
    """Square kernel, no dilation, zero padding: what both matrix forms assume besides their own shape."""
    return (conv.kernel_size[0] == conv.kernel_size[1] and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def is_patch_conv(conv: nn.Conv2d) -> bool:
    """A dense convolution over non-overlapping patches: stride = kernel size, no padding."""
    return _plain(conv) and conv.groups == 1 and conv.stride == conv.kernel_size and conv.padding == (0, 0)


def is_depthwise_conv(conv: nn.Conv2d) -> bool:
    """A depthwise convolution with an odd kernel, stride 1, 'same' padding and a bias (ConvNeXt's 7x7)."""
    k = conv.kernel_size[0]
    return (_plain(conv) and conv.groups == conv.in_channels == conv.out_channels and k % 2 == 1
            and conv.stride == (1, 1) and conv.padding == (k // 2, k // 2) and conv.bias is not None)


def use_cpu_matrix_convs(model: nn.Module) -> int:
    """Switch the model's plain nn.Conv2d modules that have a matrix form to it, in place; returns how many.

    Only the class changes: parameters, buffers, hooks and the module tree stay as they are. Modules switched
    already are left alone, so a second call returns 0.
    """
    switched = 0
    for module in model.modules():
        if type(module) is not nn.Conv2d:
            continue
        form = PatchConv2d if is_patch_conv(module) else DepthwiseConv2d if is_depthwise_conv(module) else None
        if form is not None:
            module.__class__ = form
            switched += 1
    return switched
