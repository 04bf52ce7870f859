"""What an export starts from: the network rebuilt from the checkpoint's weights alone (its shapes say depths, dims,
stem, channels and classes, so release files without a config export too), the class names and the eval view."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from core.errors import CheckpointError

from ..convnext import ConvNeXt
from ..keys import StateDict, architecture, load_weights, to_official, unwrap_checkpoint, variant_of
from ..pretrained import STEM, published_view, read_timm_folder, read_weights, resolve_weights, timm_folder
from ..view import config_view

CLASS_NAMES = "class_names"  # the key under which every export records them (metadata, extra files)


@dataclass
class Source:
    model: ConvNeXt  # fp32, on the CPU, in eval mode
    class_names: list[str]
    view: dict  # models.view's form
    notes: list[str] = field(default_factory=list)  # what was assumed, a line each

    @property
    def name(self) -> str:
        variant = variant_of(self.model.state_dict())
        return f"convnext_{variant}" if variant else "custom ConvNeXt"

    def names_json(self) -> str:
        return json.dumps(self.class_names, ensure_ascii=False)


def load_source(checkpoint: str, ema: bool = False, overrides: list[str] = ()) -> Source:
    """The export's start from `checkpoint` (ours, a release file, timm weights, a hub name or a timm folder).

    The view: the checkpoint's run config, else the view published with the weights (hub names, timm folders), else
    the defaults (ImageNet's 224-px view); `overrides` (data.img_size=384, ...) on top of either."""
    if timm_folder(checkpoint):
        sd, names, published = read_timm_folder(checkpoint)
        saved = None
    else:
        obj = read_weights(resolve_weights(checkpoint))
        sd = to_official(unwrap_checkpoint(obj, ema=ema))
        saved = obj.get("config") if isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping) else None
        names = obj.get(CLASS_NAMES) if isinstance(obj, Mapping) else None
        published = published_view(checkpoint) if saved is None else None
    model = network(sd)
    notes = []
    if saved is None and published:
        saved = _as_config(published)
    elif saved is None:
        notes.append("no run config with the weights: the default view (set data.img_size=..., data.mean=[...] "
                     "and the like to change it)")
    classes = model.head.out_features if isinstance(model.head, torch.nn.Linear) else 0
    if not names:
        notes.append(f"no class names with the weights (older checkpoints lack them): outputs named by index, "
                     f"0-{classes - 1}")
        names = [str(i) for i in range(classes)]
    elif len(names) != classes:
        raise CheckpointError(f"the checkpoint names {len(names)} classes and its head has {classes} outputs")
    view = config_view(saved, list(overrides), in_chans=model.downsample_layers[0][0].in_channels)
    return Source(model, [str(n) for n in names], view, notes)


def network(sd: StateDict) -> ConvNeXt:
    """A ConvNeXt of the shapes that official-layout weights have, holding them, in eval mode."""
    depths, dims = architecture(sd)
    stem = sd[STEM]
    model = ConvNeXt(in_chans=stem.shape[1], num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
                     depths=depths, dims=dims, patch_size=stem.shape[-1],
                     layer_scale_init=1e-6 if any(k.endswith(".gamma") for k in sd) else 0)
    load_weights(model, sd, strict=True)
    return model.float().eval()


def _as_config(view: dict) -> dict:
    """A published view as the run-config entries it stands for (a non-square input_size keeps the default side)."""
    _, h, w = view.get("input_size", (3, 224, 224))
    data = {"crop_pct": view.get("crop_pct"), "crop_mode": view.get("crop_mode"), "img_size": h if h == w else None,
            "mean": list(view.get("mean") or []) or None, "std": list(view.get("std") or []) or None}
    return {"data": data, "aug": {"interpolation": view.get("interpolation")}}
