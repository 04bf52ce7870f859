"""Every recipe's augmentation after the crop, on the device over a whole uint8 batch; and eval's normalisation.

The loader hands over uint8 NCHW images (the imagenet recipe: the random-resized crop; the small one: the images as
they are); `BatchAugment` then does what timm's `create_transform(is_training=True, ...)` does after the crop, in
its order, image by image but vectorised over the batch: [the small recipe's pad-crop], horizontal flip,
RandAugment (data.augment.rand_augment), ToTensor + Normalize, and RandomErasing with timm's definition
(`timm.data.random_erasing`). `BatchNormalize` is the eval counterpart.

Random draws come from torch's RNG on the batch's device (or `generator`), so a CUDA batch never waits on the host
per image, and a saved generator state resumes the same draws; RandAugment's come from the host's (see there), and
its plan reaches the device in one copy that does not wait for it (data.augment.staging).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from data.augment.rand_augment import BatchRandAugment
from data.augment.staging import Staging, wide_dtype

ERASE_MODES = ("pixel", "rand", "const")
_ATTEMPTS = 10  # timm's tries at placing a box that fits before giving up on it


class BatchNormalize:
    """uint8 NCHW -> float32 `(x / 255 - mean) / std`, in the input's memory format.

    Args:
        mean: per-channel mean on the 0-1 scale.
        std: per-channel standard deviation on the 0-1 scale.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels and std {len(std)}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        # (x - 255 mean) * (1 / (255 std)), coefficients rounded once from float64
        self._shift = torch.tensor([255 * m for m in self.mean], dtype=torch.float64).float()
        self._scale = torch.tensor([1 / (255 * s) for s in self.std], dtype=torch.float64).float()
        self._per_device: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __call__(self, images: Tensor) -> Tensor:
        """Args:
            images: uint8 (N, C, H, W), any device, contiguous or channels_last.
        """
        self._check(images)
        return self._normalize(images)

    def _check(self, images: Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(f"expected a uint8 (N, C, H, W) batch, got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] != len(self.mean):
            raise ValueError(f"batch has {images.shape[1]} channels, mean/std {len(self.mean)}")

    def _coefficients(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._per_device:
            self._per_device[device] = (self._shift.to(device), self._scale.to(device))
        return self._per_device[device]

    def _normalize(self, images: Tensor) -> Tensor:
        out = images.float()  # keeps the memory format
        shift, scale = self._coefficients(out.device)
        n, c, h, w = out.shape
        if not out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last):
            # NHWC rows of W*C values: a per-channel broadcast with C innermost does not vectorise on the CPU
            rows = out.permute(0, 2, 3, 1).view(n * h, w * c)
            rows.sub_(shift.repeat(w)).mul_(scale.repeat(w))
        else:
            out = out.contiguous()  # dense, for offsets into its storage
            out.sub_(shift.view(1, c, 1, 1)).mul_(scale.view(1, c, 1, 1))
        return out


class BatchAugment(BatchNormalize):
    """Pad-crop, flip, RandAugment, normalise and randomly erase a uint8 NCHW batch; each image gets its own draws.

    The pad-crop (the small recipe's) pads each side with `crop_padding` zeros and keeps a window of the original
    size at a uniformly drawn offset, as torchvision's RandomCrop(size, padding).

    Erasing follows timm's RandomErasing (applied after normalisation): with probability `reprob` an image gets
    a random number of boxes in [min_count, max_count]; each box tries up to 10 times to draw an area fraction
    uniform in [min_area, max_area] / count and an aspect ratio h/w log-uniform in [min_aspect, max_aspect],
    rounds h and w, and is placed uniformly at random if h < H and w < W; after 10 misfits the box is skipped.
    Modes: "pixel" fills with per-pixel N(0, 1) noise, "rand" with one N(0, 1) colour per box, "const" with 0.

    Args:
        mean: per-channel mean on the 0-1 scale.
        std: per-channel standard deviation on the 0-1 scale.
        hflip: probability of a horizontal flip.
        rand_augment: timm's RandAugment string ("rand-m9-mstd0.5-inc1"); "" for none.
        fill: the 0-255 colour geometric RandAugment ops leave uncovered; default the mean's, as timm's.
        crop_padding: pixels of zero padding for the pad-crop; 0 for none.
        reprob: probability that an image is erased.
        mode: "pixel", "rand" or "const".
        min_area: smallest box area, as a fraction of the image.
        max_area: largest box area, as a fraction of the image.
        min_aspect: smallest h/w.
        max_aspect: largest h/w; default 1 / min_aspect.
        min_count: fewest boxes in an erased image.
        max_count: most boxes in an erased image; default min_count.
        host_indexing: write the erased pixels by index, which needs their number on the host (free on the CPU,
            a stream sync on CUDA) but draws noise for those pixels only; False draws it for the whole batch and
            selects with a mask. None: True for CPU batches only. Same boxes either way.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], hflip: float = 0.5, rand_augment: str = "",
                 fill: Optional[Sequence[int]] = None, crop_padding: int = 0, reprob: float = 0.25,
                 mode: str = "pixel", min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                 max_aspect: Optional[float] = None, min_count: int = 1, max_count: Optional[int] = None,
                 host_indexing: Optional[bool] = None):
        super().__init__(mean, std)
        if mode not in ERASE_MODES:
            raise ValueError(f"erase mode {mode!r} is not one of {ERASE_MODES}")
        max_aspect = max_aspect or 1 / min_aspect
        max_count = max_count or min_count
        if not (0 <= hflip <= 1 and 0 <= reprob <= 1 and 0 < min_area <= max_area and 0 < min_aspect <= max_aspect
                and 1 <= min_count <= max_count and crop_padding >= 0):
            raise ValueError("need 0 <= hflip, reprob <= 1; 0 < min_area <= max_area; 0 < min_aspect <= max_aspect; "
                             "1 <= min_count <= max_count; crop_padding >= 0")
        self.hflip, self.reprob, self.mode = hflip, reprob, mode
        self.min_area, self.max_area = min_area, max_area
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.min_count, self.max_count = min_count, max_count
        self.host_indexing = host_indexing
        self.crop_padding = crop_padding
        fill = fill if fill is not None else tuple(min(255, round(255 * m)) for m in self.mean)  # timm's img_mean
        self.rand_augment = BatchRandAugment(rand_augment, fill) if rand_augment else None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(crop_padding={self.crop_padding}, hflip={self.hflip}, "
                f"rand_augment={self.rand_augment}, reprob={self.reprob}, mode={self.mode}, "
                f"area=({self.min_area}, {self.max_area}), count=({self.min_count}, {self.max_count}))")

    def __call__(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Args:
            images: uint8 (N, C, H, W), any device, contiguous or channels_last; left untouched.
            generator: a torch.Generator on the batch's device, or a CPU one (which then seeds one on the device);
                default the device's global RNG.
        Returns: float32 (N, C, H, W) in the input's memory format.
        """
        self._check(images)
        host = images.device.type == "cpu" if self.host_indexing is None else self.host_indexing
        n, dev = images.shape[0], images.device
        on_host = generator if generator is not None and generator.device.type == "cpu" else None
        if on_host is not None and dev.type != "cpu":  # the host generator governs the device's draws through a seed
            generator = torch.Generator(dev)
            generator.manual_seed(int(torch.randint(2**63 - 1, (), generator=on_host)))
        # Every draw but the noise in one call, of a size set by max_count alone (not by hflip or reprob).
        u = torch.rand(n, 5 + self.max_count * (2 * _ATTEMPTS + 2), device=dev, generator=generator,
                       dtype=wide_dtype(dev))
        steps = []
        if self.rand_augment is not None:  # its parameters reach the device in one copy that does not wait for it
            stage = Staging(dev)
            steps = self.rand_augment.plan(images.shape, self.rand_augment.draw(n, on_host), stage)
            stage.send()
        if self.crop_padding > 0:
            images = self._pad_crop(images, u[:, 3], u[:, 4])
        if self.hflip > 0:
            images = self._flip(images, u[:, 0] < self.hflip)
        images = BatchRandAugment.apply(images, steps)
        out = self._normalize(images)
        if self.reprob > 0:
            for top, left, h, w in self._boxes(u, images.shape):
                if host:
                    self._erase_by_index(out, top, left, h, w, generator)
                else:
                    self._erase_by_mask(out, top, left, h, w, generator)
        return out

    @staticmethod
    def _flip(images: Tensor, flip: Tensor) -> Tensor:
        """Mirror the images where `flip`: one gather along W with a column order per image, no host sync."""
        n, c, h, w = images.shape
        cols = torch.arange(w, device=images.device)
        cols = torch.where(flip.unsqueeze(1), cols.flip(0), cols)
        if not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last):
            nhwc = images.permute(0, 2, 3, 1)  # gather allocates contiguous: keep NHWC by working on it
            return nhwc.gather(2, cols.view(n, 1, w, 1).expand(n, h, w, c)).permute(0, 3, 1, 2)
        return images.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))

    def _pad_crop(self, images: Tensor, u_top: Tensor, u_left: Tensor) -> Tensor:
        """Each image shifted by its own (dy, dx) in [-p, p], zeros coming in: the window of a zero-padded image."""
        n, c, h, w = images.shape
        p = self.crop_padding
        top = (u_top * (2 * p + 1)).floor().long().clamp(max=2 * p)
        left = (u_left * (2 * p + 1)).floor().long().clamp(max=2 * p)
        padded = torch.nn.functional.pad(images, (p, p, p, p))
        rows = (top.view(n, 1) + torch.arange(h, device=images.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * p)
        cols = (left.view(n, 1) + torch.arange(w, device=images.device)).view(n, 1, 1, w).expand(n, c, h, w)
        out = padded.gather(2, rows).gather(3, cols)
        if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def _boxes(self, u: Tensor, shape: torch.Size) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """(top, left, h, w) per box slot, each (N,) int64, from the uniforms `u`; h = w = 0 where there is no box.

        Args:
            u: (N, 5 + max_count * (2 * attempts + 2)) uniforms in [0, 1): flip, erase, count, crop top, crop left,
                then per slot area and aspect per attempt, top, left.
            shape: the batch's (N, C, H, W).
        """
        _, _, img_h, img_w = shape
        erased = u[:, 1] < self.reprob
        spread = self.max_count - self.min_count + 1
        count = self.min_count + torch.clamp((u[:, 2] * spread).floor().long(), max=spread - 1)
        lo, hi = self.log_aspect
        boxes = []
        for k, slot in enumerate(u[:, 5:].split(2 * _ATTEMPTS + 2, dim=1)):
            area = (self.min_area + (self.max_area - self.min_area) * slot[:, :_ATTEMPTS]) * (img_h * img_w)
            area = area / count.unsqueeze(1)
            aspect = torch.exp(lo + (hi - lo) * slot[:, _ATTEMPTS:2 * _ATTEMPTS])
            h = torch.round(torch.sqrt(area * aspect)).long()  # round half to even, as Python's round
            w = torch.round(torch.sqrt(area / aspect)).long()
            fits = (h < img_h) & (w < img_w)
            first = fits.long().argmax(1, keepdim=True)  # the first attempt that fits
            placed = fits.gather(1, first).squeeze(1) & erased & (count > k)
            h = torch.where(placed, h.gather(1, first).squeeze(1), 0)
            w = torch.where(placed, w.gather(1, first).squeeze(1), 0)
            # uniform integers in [0, img - size], as random.randint
            top = torch.minimum((slot[:, -2] * (img_h - h + 1)).floor().long(), img_h - h)
            left = torch.minimum((slot[:, -1] * (img_w - w + 1)).floor().long(), img_w - w)
            boxes.append((top, left, h, w))
        return boxes

    def _erase_by_mask(self, out: Tensor, top: Tensor, left: Tensor, h: Tensor, w: Tensor,
                       generator: Optional[torch.Generator]) -> None:
        n, c, img_h, img_w = out.shape
        rows = torch.arange(img_h, device=out.device)
        cols = torch.arange(img_w, device=out.device)
        in_rows = (rows >= top.unsqueeze(1)) & (rows < (top + h).unsqueeze(1))
        in_cols = (cols >= left.unsqueeze(1)) & (cols < (left + w).unsqueeze(1))
        mask = in_rows.view(n, 1, img_h, 1) & in_cols.view(n, 1, 1, img_w)
        if self.mode == "const":
            out.masked_fill_(mask, 0.0)
            return
        size = (n, c, img_h, img_w) if self.mode == "pixel" else (n, c, 1, 1)
        noise = torch.randn(size, device=out.device, generator=generator)
        torch.where(mask, noise, out, out=out)

    def _erase_by_index(self, out: Tensor, top: Tensor, left: Tensor, h: Tensor, w: Tensor,
                        generator: Optional[torch.Generator]) -> None:
        c, dev = out.shape[1], out.device
        sizes = h * w
        total = int(sizes.sum())  # host syncs; free on the CPU
        if total == 0:
            return
        rows = int(h.sum())
        s_n, s_c, s_h, s_w = out.stride()  # out is dense (_normalize): offsets into its storage

        def ragged(values: Tensor, repeats: Tensor, length: int, step: int) -> Tensor:
            """values[i] + j * step for j < repeats[i], all i in order: the offsets of runs of rows or pixels."""
            starts = torch.cumsum(repeats, 0) - repeats
            base = torch.repeat_interleave(values - starts * step, repeats, output_size=length)
            return base + torch.arange(length, device=dev) * step

        corner = torch.arange(len(sizes), device=dev) * s_n + top * s_h + left * s_w
        row_start = ragged(corner, h, rows, s_h)
        pixels = ragged(row_start, torch.repeat_interleave(w, h, output_size=rows), total, s_w)
        offsets = (pixels.unsqueeze(0) + torch.arange(c, device=dev).unsqueeze(1) * s_c).view(-1)
        if self.mode == "const":
            values = torch.zeros(len(offsets), device=dev)
        elif self.mode == "pixel":
            values = torch.randn(len(offsets), device=dev, generator=generator)
        else:
            box = torch.repeat_interleave(torch.arange(len(sizes), device=dev), sizes, output_size=total)
            values = torch.randn(len(sizes), c, device=dev, generator=generator)[box].t().reshape(-1)
        out.as_strided((out.numel(),), (1,)).index_copy_(0, offsets, values)
