"""Write a checkpoint's weights as a plain state dict, in the official or timm layout, as .pth or .safetensors.

    python -m models.export --checkpoint runs/x/checkpoints/best.pth --layout timm --out convnext_atto.safetensors
    python -m models.export --checkpoint runs/x/checkpoints/last.pth --layout official --out release.pth --ema

The official layout loads with `load_state_dict(strict=True)` into facebookresearch/ConvNeXt's model of the same
variant (and into ours); the timm layout into `timm.create_model("convnext_<variant>", num_classes=...,
in_chans=...)`.
"""
from __future__ import annotations

import argparse
import sys

import torch

from core.cli import run_main
from core.errors import UserError
from core.files import atomic_write, save_checkpoint
from models.keys import official_to_timm, to_official, unwrap_checkpoint, variant_of
from models.pretrained import STEM, read_weights

# timm 1.0.31 builds these variants with 1x1-conv MLPs (conv_mlp=True), whose weights carry two more dims.
TIMM_CONV_MLP = ("atto", "femto", "pico", "nano")


def export(obj: object, layout: str, ema: bool = False) -> dict[str, torch.Tensor]:
    """The weights in `obj` (any supported checkpoint) as a plain state dict in `layout`."""
    sd = to_official(unwrap_checkpoint(obj, ema=ema))
    if layout == "official":
        return {k: v.contiguous() for k, v in sd.items()}
    kernel = sd[STEM].shape[-1]
    if kernel != 4:
        raise UserError(f"timm's ConvNeXt has a 4x4 stem and this model's is {kernel}x{kernel} "
                        f"(model.patch_size={kernel}): timm cannot hold it; export with --layout official")
    variant = variant_of(sd)
    return {k: v.contiguous() for k, v in official_to_timm(sd, conv_mlp=variant in TIMM_CONV_MLP).items()}


def write(sd: dict[str, torch.Tensor], path: str) -> None:
    """Atomically: a half-written file never takes the name."""
    if path.endswith(".safetensors"):
        from safetensors.torch import save  # a dependency of timm
        atomic_write(path, lambda f: f.write(save(sd)))
    else:
        save_checkpoint(sd, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="ours, an official release file, or timm weights")
    parser.add_argument("--layout", required=True, choices=["official", "timm"])
    parser.add_argument("--out", required=True, help="FILE.pth or FILE.safetensors")
    parser.add_argument("--ema", action="store_true", help="the EMA weights of a training checkpoint")
    args = parser.parse_args(argv)
    sd = export(read_weights(args.checkpoint), args.layout, args.ema)
    write(sd, args.out)
    variant = variant_of(to_official(sd))
    print(f"wrote {len(sd)} tensors ({args.layout} layout, {'convnext_' + variant if variant else 'custom'}"
          f"{', EMA' if args.ema else ''}) to {args.out}", file=sys.stderr)


def cli() -> None:
    """The console script's entry point."""
    run_main(main)


if __name__ == "__main__":
    cli()
