"""A folder in timm's Hugging Face hub layout: config.json (architecture, num_classes, label_names, model_args,
pretrained_cfg with the eval view) and model.safetensors (timm's key layout), which
`timm.create_model("local-dir:PATH", pretrained=True)` builds and fills, `timm.data.resolve_data_config({},
model=model)` reading back the view; models.pretrained.read_timm_folder reads it too. Written beside its place,
checked through timm itself, then renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable

import torch

from core.errors import UserError
from core.files import atomic_write

from ..keys import architecture, variant_of
from ..pretrained import TIMM_CONFIG, TIMM_WEIGHTS
from .check import ExportCheckError, Inputs, compare
from .source import CLASS_NAMES, Source

CUSTOM_BASE = "convnext_tiny"  # timm's builder for other depths/dims: its MLP is linear, as export's layout then is


def timm_config(source: Source) -> dict:
    """config.json's content."""
    sd = source.model.state_dict()
    variant = variant_of(sd)
    depths, dims = architecture(sd)
    in_chans, classes = source.view["input_size"][0], len(source.class_names)
    args = {} if variant else {"depths": list(depths), "dims": list(dims)}
    if in_chans != 3:
        args["in_chans"] = in_chans
    if not any(k.endswith(".gamma") for k in sd):
        args["ls_init_value"] = None  # no layer scale
    view = {key: list(v) if isinstance(v, tuple) else v for key, v in source.view.items()}
    pretrained_cfg = {"tag": "", "custom_load": False, **view, "fixed_input_size": False, "num_classes": classes,
                      "first_conv": "stem.0", "classifier": "head.fc"}
    return {"architecture": f"convnext_{variant}" if variant else CUSTOM_BASE, "num_classes": classes,
            "num_features": dims[-1], "label_names": source.class_names, "model_args": args,
            "pretrained_cfg": pretrained_cfg}


def write_timm_folder(source: Source, path: str, weights: dict[str, torch.Tensor], inputs: Inputs,
                      save: Callable) -> str:
    """The folder at `path` from timm-layout `weights` (models.export's), saved with `save(sd, file, metadata)`;
    a previous export there is replaced. Returns the check's line."""
    replaced = _previous_export(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        save(weights, os.path.join(tmp, TIMM_WEIGHTS), {CLASS_NAMES: source.names_json()})
        config = json.dumps(timm_config(source), indent=2, ensure_ascii=False)
        atomic_write(os.path.join(tmp, TIMM_CONFIG), lambda f: f.write(config), binary=False)
        line = check_folder(source, tmp, inputs)
        if replaced:
            os.rename(path, tmp + ".old")
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp + ".old", ignore_errors=True)
    return line


def _previous_export(path: str) -> bool:
    """Whether `path` holds an earlier export to replace; UserError for anything else there."""
    if not os.path.lexists(path):
        return False
    if os.path.isdir(path) and not os.path.islink(path) and set(os.listdir(path)) <= {TIMM_CONFIG, TIMM_WEIGHTS}:
        return True
    raise UserError(f"--out '{path}' exists and is not an export folder (only {TIMM_CONFIG} and {TIMM_WEIGHTS}); "
                    f"remove it or choose another --out")


def check_folder(source: Source, folder: str, inputs: Inputs) -> str:
    """timm builds the folder's model with our weights and our view, or ExportCheckError; the logits' line."""
    import timm
    from timm.data import resolve_data_config
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    resolved = resolve_data_config({}, model=theirs)
    wrong = [f"{key} {resolved.get(key)!r} (ours {value!r})" for key, value in source.view.items()
             if _plain(resolved.get(key)) != _plain(value)]
    if wrong:
        raise ExportCheckError(f"timm reads another view from the folder: {'; '.join(wrong)}; nothing was written")
    return compare(source.model, theirs, inputs, "timm")


def _plain(value: object) -> object:
    return [float(v) for v in value] if isinstance(value, (tuple, list)) else value
