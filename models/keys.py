"""Checkpoint key layouts and weight loading.

Our models use the official facebookresearch/ConvNeXt names; timm's `convnext_*` models use
another layout. Both kinds of checkpoints load through `load_weights`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from core.errors import CheckpointError

from .convnext import VARIANTS

StateDict = Mapping[str, torch.Tensor]

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_MODEL_ENTRIES = ("model", "state_dict")  # official release files use "model"
_EMA_ENTRIES = ("model_ema", "ema", "state_dict_ema")  # the last is timm's train script

# (official, timm) key prefixes; {i} {j} {k} stand for indices. The first match wins, so the stem
# (downsample_layers.0) must come before the other downsamplers. Layout read off timm 1.0.31's
# timm.models.convnext.ConvNeXt: stage 0 has no downsample, the final norm lives in the head.
_RULES = [
    ("downsample_layers.0.{k}.", "stem.{k}."),
    ("downsample_layers.{i}.{k}.", "stages.{i}.downsample.{k}."),
    ("stages.{i}.{j}.dwconv.", "stages.{i}.blocks.{j}.conv_dw."),
    ("stages.{i}.{j}.norm.", "stages.{i}.blocks.{j}.norm."),
    ("stages.{i}.{j}.pwconv1.", "stages.{i}.blocks.{j}.mlp.fc1."),
    ("stages.{i}.{j}.pwconv2.", "stages.{i}.blocks.{j}.mlp.fc2."),
    ("stages.{i}.{j}.gamma", "stages.{i}.blocks.{j}.gamma"),
    ("norm.", "head.norm."),
    ("head.", "head.fc."),
]
_TIMM_MLP_WEIGHTS = ("mlp.fc1.weight", "mlp.fc2.weight")


class CheckpointMismatchError(CheckpointError):
    """Checkpoint weights that do not fit the model (missing/unexpected keys, other shapes)."""


def _renamer(pairs: list[tuple[str, str]]):
    """Key -> key function from (source, target) prefix templates; unknown keys pass through."""
    compiled = [(re.compile(re.sub(r"\{(\w)\}", r"(?P<\1>\\d+)", src.replace(".", r"\."))), dst) for src, dst in pairs]

    def rename(key: str) -> str:
        for pattern, dst in compiled:
            if m := pattern.match(key):
                return dst.format(**m.groupdict()) + key[m.end():]
        return key

    return rename


_to_timm = _renamer(_RULES)
_to_official = _renamer([(timm, official) for official, timm in _RULES])


def strip_prefixes(sd: StateDict) -> dict[str, torch.Tensor]:
    """A copy without the leading DDP / torch.compile wrapper prefixes, however they are stacked. Keys keep their
    order when all carry the same prefixes, as a wrapped model's do."""
    out = dict(sd)
    while any(key.startswith(WRAPPER_PREFIXES) for key in out):
        for prefix in WRAPPER_PREFIXES:
            consume_prefix_in_state_dict_if_present(out, prefix)
    return out


def unwrap_checkpoint(obj: object, ema: bool = False) -> StateDict:
    """The state dict inside what torch.load returned: a plain one, or the `model`/`state_dict`
    entry of a training checkpoint; with `ema`, its EMA entry instead."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict or a dict with one")
    for entry in _EMA_ENTRIES if ema else _MODEL_ENTRIES:
        if isinstance(obj.get(entry), Mapping):
            return obj[entry]
    if ema:
        raise CheckpointError(f"checkpoint has no EMA weights (none of {', '.join(_EMA_ENTRIES)}; its entries: "
                              f"{_few(list(obj))}); load it without ema")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointError(f"checkpoint has no model weights (no {' or '.join(_MODEL_ENTRIES)} entry and not a "
                          f"plain state dict; its entries: {_few(list(obj))})")


def official_to_timm(sd: StateDict, conv_mlp: bool = False) -> dict[str, torch.Tensor]:
    """Official layout -> timm's. `conv_mlp`: the timm model uses 1x1 convs for its MLP (timm 1.0.31
    builds atto/femto/pico/nano that way), whose weights are (out, in, 1, 1)."""
    out = {_to_timm(k): v for k, v in sd.items()}
    if conv_mlp:
        out = {k: v[:, :, None, None] if k.endswith(_TIMM_MLP_WEIGHTS) and v.ndim == 2 else v for k, v in out.items()}
    return out


def timm_to_official(sd: StateDict) -> dict[str, torch.Tensor]:
    """timm layout -> official; 1x1 conv MLP weights become Linear weights again."""
    if any(k.startswith("stages.0.downsample.") for k in sd):
        # timm adds this layer when the stem stride is 2 (e.g. patch_size=2); the official net has none.
        raise CheckpointError("timm checkpoint has a stage-0 downsample layer (timm builds one for patch_size=2), "
                              "which the official ConvNeXt layout has no place for")
    return {_to_official(k): v.flatten(1) if k.endswith(_TIMM_MLP_WEIGHTS) and v.ndim == 4 else v
            for k, v in sd.items()}


def detect_layout(sd: StateDict) -> Literal["official", "timm"]:
    if any(k.startswith("downsample_layers.") for k in sd):
        return "official"
    if any(k.startswith("stem.") or ".blocks." in k for k in sd):
        return "timm"
    raise CheckpointError(f"not ConvNeXt weights (neither official nor timm key names): {_few(list(sd))}")


def to_official(sd: StateDict) -> dict[str, torch.Tensor]:
    """Either layout, wrapper prefixes included -> the official layout our models use."""
    sd = strip_prefixes(sd)
    return sd if detect_layout(sd) == "official" else timm_to_official(sd)


def load_weights(model: nn.Module, obj: object, ema: bool = False, strict: bool = True):
    """Load a checkpoint (what torch.load returned, any supported layout) into `model`.

    Shapes must always agree; `strict=False` only tolerates missing and unexpected keys.
    Returns load_state_dict's (missing_keys, unexpected_keys).
    """
    # Under torch.compile / DDP wrappers, whose state_dict keys would carry their prefixes.
    while isinstance(inner := getattr(model, "_orig_mod", getattr(model, "module", None)), nn.Module):
        model = inner
    sd = to_official(unwrap_checkpoint(obj, ema=ema))
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    reshaped = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if reshaped or (strict and (missing or unexpected)):
        raise CheckpointMismatchError(_mismatch_message(sd, own, missing, unexpected, reshaped))
    return model.load_state_dict(sd, strict=strict)


def _few(items: list[str], n: int = 3) -> str:
    """Count and the first few, to keep messages one short line."""
    return f"{len(items)} ({', '.join(items[:n])}{', ...' if len(items) > n else ''})"


def architecture(sd: StateDict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(depths, dims) of official-layout weights."""
    depths, dims = [0] * 4, [0] * 4
    for key, value in sd.items():
        if m := re.match(r"stages\.([0-3])\.(\d+)\.dwconv\.weight$", key):
            i, j = int(m[1]), int(m[2])
            depths[i], dims[i] = max(depths[i], j + 1), value.shape[0]
    return tuple(depths), tuple(dims)


def io_shape(sd: StateDict) -> tuple[int, int, int]:
    """(input channels, stem patch size, classes; 0 without a head) of official-layout weights."""
    stem = sd.get("downsample_layers.0.0.weight")
    if stem is None:
        raise CheckpointError(f"not ConvNeXt weights: no stem (downsample_layers.0.0.weight) among {_few(list(sd))}")
    head = sd.get("head.weight")
    return stem.shape[1], stem.shape[-1], head.shape[0] if head is not None else 0


def variant_of(sd: StateDict) -> str | None:
    """The variant (atto ... xlarge) whose depths and dims official-layout weights have, if any."""
    arch = architecture(sd)
    return next((v for v, known in VARIANTS.items() if known == arch), None)


def describe(sd: StateDict) -> str:
    """Depths and dims of official-layout weights, and the variant they match if any."""
    depths, dims = architecture(sd)
    variant = variant_of(sd)
    return f"{f'convnext_{variant} ' if variant else ''}(depths {depths}, dims {dims})"


def _mismatch_message(sd: StateDict, own: StateDict, missing: list[str], unexpected: list[str],
                      reshaped: list[str]) -> str:
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if reshaped:
        shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in reshaped]
        problems.append(f"shape mismatches {_few(shapes)}")

    if not missing and not unexpected and all(k.startswith("head.") for k in reshaped):
        n_ckpt, n_own = sd["head.weight"].shape[0], own["head.weight"].shape[0]
        hint = (f"only the classifier head differs ({n_ckpt} vs {n_own} classes): build the model with "
                f"num_classes={n_ckpt}, load, then call reset_classifier({n_own})")
    elif (ckpt_arch := describe(sd)) != (own_arch := describe(own)):
        hint = f"the checkpoint is probably of another architecture or size: checkpoint {ckpt_arch} vs model {own_arch}"
    else:
        hint = ("same depths and dims; compare in_chans, patch_size, layer_scale_init (0: no gamma) "
                "and num_classes (0: no head)")
    return f"checkpoint does not fit the model: {'; '.join(problems)}. Hint: {hint}"
