"""An exported model against the PyTorch model it came from, before the export takes its name: the same inputs
through both, the largest logit difference held to a tolerance, the top-1 agreement reported.

Inputs: random images (normal, as normalised pixels are), in a batch of another size than the one the export
traced, so the dynamic batch is exercised; and, where given, real images read from a folder and preprocessed with
the model's eval view (models.view.eval_transform).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from core.errors import UserError

from ..view import eval_transform

# Another runtime adds and multiplies in another order (other kernels, fused ops): fp32 rounding that builds up over
# the network's depth, in proportion to the logits' size. 1e-4 of their largest magnitude leaves that room and is
# far below a difference that would change a prediction other than a near tie.
TOLERANCE = 1e-4
RANDOM_BATCH = 3  # not the traced example's 2
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
MAX_IMAGES = 64


class ExportCheckError(UserError):
    """The exported model does not compute what the PyTorch model does."""


@dataclass
class Inputs:
    batches: list[tuple[str, torch.Tensor]]  # (what, float NCHW)

    @property
    def count(self) -> int:
        return sum(len(x) for _, x in self.batches)

    def describe(self) -> str:
        return " and ".join(f"{len(x)} {what}" for what, x in self.batches)


def check_inputs(view: dict, images: str = "", seed: int = 0) -> Inputs:
    """RANDOM_BATCH random inputs at the view's size, then up to MAX_IMAGES images of the folder `images`."""
    g = torch.Generator().manual_seed(seed)
    batches = [("random inputs", torch.randn(RANDOM_BATCH, *view["input_size"], generator=g))]
    if images:
        files = image_files(images)
        transform = eval_transform(view)
        what = f"images of {images}" + (f" (the first {MAX_IMAGES} of {len(files)})" if len(files) > MAX_IMAGES else "")
        batches.append((what, torch.stack([transform(_open(f)) for f in files[:MAX_IMAGES]])))
    return Inputs(batches)


def image_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise UserError(f"--check-images '{folder}' is not a folder; give a folder of images (searched recursively)")
    found = sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not found:
        raise UserError(f"--check-images '{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)}); give a folder "
                        f"that does")
    return found


def _open(path: str):
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"--check-images: cannot read image '{path}' ({e}); remove it or check another folder") \
            from None


def compare(reference: nn.Module, exported: Callable[[torch.Tensor], torch.Tensor], inputs: Inputs,
            runtime: str) -> str:
    """One line of figures: the largest logit difference and the top-1 agreement of `exported` (tensor in, logits
    out) against `reference` on `inputs`; ExportCheckError where the difference exceeds the tolerance."""
    worst, scale, agree = 0.0, 0.0, 0
    for _, x in inputs.batches:
        with torch.no_grad():
            ours, theirs = reference(x).float(), exported(x).float()
        if theirs.shape != ours.shape:
            raise ExportCheckError(f"{runtime} gives logits of shape {tuple(theirs.shape)} for a batch of "
                                   f"{len(x)}; PyTorch {tuple(ours.shape)}")
        worst = max(worst, (theirs - ours).abs().max().item())
        scale = max(scale, ours.abs().max().item())
        agree += (theirs.argmax(1) == ours.argmax(1)).sum().item() if ours.ndim == 2 else len(x)
    limit = TOLERANCE * max(1.0, scale)
    line = (f"check, {runtime} vs PyTorch on {inputs.describe()}: max |logit diff| {worst:.2e} (tolerance "
            f"{limit:.1e}: {TOLERANCE:g} x max(1, max |logit| {scale:.3g})), top-1 agreement {agree}/{inputs.count}")
    if not worst <= limit:  # also a NaN
        raise ExportCheckError(f"{line}: over the tolerance; nothing was written. Export with another --opset or "
                               f"torch version, or report the model")
    return line
