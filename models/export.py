"""Write a checkpoint's model out: its weights as a plain state dict (official or timm layout, .pth or
.safetensors), or for serving as an ONNX file, a torch.export program (.pt2) or a folder in timm's hub layout.

    python -m models.export --checkpoint runs/x/checkpoints/best.pth --layout timm --out convnext_atto.safetensors
    python -m models.export --checkpoint runs/x/checkpoints/last.pth --layout official --out release.pth --ema
    python -m models.export --checkpoint best.pth --format onnx --out model.onnx --check-images photos/
    python -m models.export --checkpoint best.pth --format pt2 --out model.pt2
    python -m models.export --checkpoint best.pth --format timm-folder --out convnext_ft/

The official layout loads with `load_state_dict(strict=True)` into facebookresearch/ConvNeXt's model of the same
variant (and into ours); the timm layout into `timm.create_model("convnext_<variant>", num_classes=...,
in_chans=...)`. The serving formats take float NCHW images at the eval view's size (the run's config, or
key=value overrides: data.img_size=384 ...) in batches of any size and give the logits; each is checked against the
PyTorch model before it is written, and records the class names and the view.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from core.cli import run_main
from core.errors import UserError
from core.files import atomic_write, save_checkpoint
from models.keys import official_to_timm, to_official, unwrap_checkpoint, variant_of
from models.pretrained import STEM, read_weights, resolve_weights
from models.serving.check import check_inputs
from models.serving.graph import DEFAULT_OPSET, write_onnx, write_pt2
from models.serving.source import CLASS_NAMES, load_source
from models.serving.timm_folder import write_timm_folder
from models.view import describe

# timm 1.0.31 builds these variants with 1x1-conv MLPs (conv_mlp=True), whose weights carry two more dims.
TIMM_CONV_MLP = ("atto", "femto", "pico", "nano")
SERVING = {"onnx": "an ONNX file", "pt2": "a torch.export program", "timm-folder": "a timm hub folder"}


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


def write(sd: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Atomically: a half-written file never takes the name. `metadata` goes into a .safetensors file's header; a
    .pth file stays a plain state dict."""
    if path.endswith(".safetensors"):
        from safetensors.torch import save  # a dependency of timm
        atomic_write(path, lambda f: f.write(save(sd, metadata=metadata)))
    else:
        save_checkpoint(sd, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="ours, an official release file, timm weights, a hub "
                        "name or a timm folder")
    parser.add_argument("--format", default="state-dict", choices=["state-dict", *SERVING])
    parser.add_argument("--layout", choices=["official", "timm"], help="the state dict's key layout")
    parser.add_argument("--out", required=True, help="FILE.pth or FILE.safetensors; FILE.onnx; FILE.pt2; FOLDER")
    parser.add_argument("--ema", action="store_true", help="the EMA weights of a training checkpoint")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="the ONNX opset (default: %(default)s)")
    parser.add_argument("--check-images", metavar="FOLDER", default="", help="also check the export on these "
                        "images (up to 64, searched recursively), preprocessed with the eval view")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="the eval view, over the checkpoint's: "
                        "data.img_size, data.crop_pct, data.crop_mode, aug.interpolation, data.mean, data.std")
    args = parser.parse_args(argv)
    if args.format == "state-dict" and not args.layout:
        raise UserError("a state dict needs --layout official or --layout timm (or give --format onnx, pt2 or "
                        "timm-folder)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.format != "state-dict":
        return export_for_serving(args)
    obj = read_weights(resolve_weights(args.checkpoint))
    sd = export(obj, args.layout, args.ema)
    names = obj.get(CLASS_NAMES) if isinstance(obj, dict) else None
    if args.out.endswith(".safetensors") and not names:
        head = to_official(sd).get("head.weight")
        names = [str(i) for i in range(len(head) if head is not None else 0)]
        print("note: no class names in the checkpoint (older checkpoints lack them): outputs named by index",
              file=sys.stderr)
    write(sd, args.out, {CLASS_NAMES: json.dumps(names, ensure_ascii=False)} if names else None)
    variant = variant_of(to_official(sd))
    print(f"wrote {len(sd)} tensors ({args.layout} layout, {'convnext_' + variant if variant else 'custom'}"
          f"{', EMA' if args.ema else ''}) to {args.out}", file=sys.stderr)


def export_for_serving(args: argparse.Namespace) -> None:
    source = load_source(args.checkpoint, args.ema, args.overrides)
    weights = export(source.model.state_dict(), "timm") if args.format == "timm-folder" else None  # refused early
    for note in source.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"eval view: {describe(source.view)}", file=sys.stderr)
    inputs = check_inputs(source.view, args.check_images)
    if args.format == "onnx":
        line = write_onnx(source, args.out, inputs, args.opset)
    elif args.format == "pt2":
        line = write_pt2(source, args.out, inputs)
    else:
        line = write_timm_folder(source, args.out, weights, inputs, write)
    print(line, file=sys.stderr)
    print(f"wrote {SERVING[args.format]} of {source.name}{' (EMA)' if args.ema else ''}, "
          f"{len(source.class_names)} classes, to {args.out}", file=sys.stderr)


def cli() -> None:
    """The console script's entry point."""
    run_main(main)


if __name__ == "__main__":
    cli()
