"""Start a model from earlier weights: ours, an official release file or timm's, in .pth/.bin/.safetensors, or
released weights by name from the Hugging Face hub ('hf-hub:timm/convnext_tiny.fb_in22k_ft_in1k', or timm's
'convnext_tiny.fb_in1k'), through huggingface_hub's cache.

A head of another size is left freshly initialised (fine-tuning to new classes); a stem made for another number of
input channels is adapted; anything else that does not fit is an error listing the keys.
"""
from __future__ import annotations

import json
import os

import torch
from timm.models import adapt_input_conv, get_pretrained_cfg, list_models, list_pretrained
from torch import nn

import distributed_utils as du
from core.errors import CheckpointError
from core.files import load_checkpoint

from .keys import StateDict, load_weights, to_official, unwrap_checkpoint
from .view import VIEW_FIELDS

STEM = "downsample_layers.0.0.weight"
HEAD = ("head.weight", "head.bias")


HUB_PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what a timm repo on the hub holds, preferred first
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def hub_repo(name: str) -> str | None:
    """The hub repository a weights name stands for ('hf-hub:<repo>', or timm's '<model>.<tag>'); None for a path."""
    if name.startswith(HUB_PREFIX):
        return name[len(HUB_PREFIX):]
    if os.sep in name or name.endswith(WEIGHT_SUFFIXES) or os.path.exists(name) or "." not in name:
        return None
    model, tag = name.split(".", 1)
    if model not in list_models():
        return None
    try:
        return get_pretrained_cfg(name).hf_hub_id
    except RuntimeError:  # timm knows the model but not the tag
        tags = [n.split(".", 1)[1] for n in list_pretrained(f"{model}.*")]
        raise CheckpointError(f"timm has no weights '{name}'; its tags for {model}: {', '.join(tags)}") from None


def resolve_weights(name: str) -> str:
    """A local file for `name`: a path as it is; a hub name through huggingface_hub's cache, fetched by rank 0
    while the other ranks wait, then found in the cache by them (so 8 ranks do not download 8 times)."""
    repo = hub_repo(name)
    if repo is None:
        return name
    return du.main_first(lambda main: _from_hub(name, repo, cached_only=not main))


def _from_hub(name: str, repo: str, cached_only: bool) -> str:
    from huggingface_hub import constants, hf_hub_download  # a dependency of timm
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    reasons = []
    for filename in WEIGHT_FILES:
        try:
            return hf_hub_download(repo, filename, local_files_only=cached_only)
        except LocalEntryNotFoundError:  # not cached, and the hub is off (HF_HUB_OFFLINE) or out of reach
            reasons.append(f"{filename}: not cached")
            cached_only = True  # no second round of network retries for the next file
        except (EntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:  # no such file or repository
            reasons.append(f"{filename}: {type(e).__name__}")
    raise CheckpointError(f"model weights '{name}' are neither in the hub cache '{constants.HF_HUB_CACHE}' nor "
                          f"reachable ({'; '.join(reasons)}); fill the cache where there is network, e.g. "
                          f"'hf download {repo} {WEIGHT_FILES[0]}' with HF_HUB_CACHE pointing at a folder this "
                          f"machine reads, or give model.pretrained a file path")


def published_view(name: str) -> dict | None:
    """The evaluation view that released weights were published with: the VIEW_FIELDS of timm's pretrained
    configuration (input_size as (C, H, W)). From timm's own table where it knows the weights (timm's names and
    hf-hub:timm/... repositories: no network), else from the repository's config.json (timm's hub layout) as rank 0
    fetches it or the hub cache holds it; a timm folder's from its config.json; None for a file path, or where
    neither has one."""
    if folder := timm_folder(name):
        return _view_of(folder_config(folder)) or None
    repo = hub_repo(name)
    if repo is None:
        return None
    known = repo.split("/", 1)[1] if repo.startswith("timm/") else ""
    if known and known.split(".", 1)[0] in list_models():
        try:
            return _view_of({"pretrained_cfg": get_pretrained_cfg(known).to_dict()})
        except (RuntimeError, AttributeError):  # not in timm's table: look in the repository
            pass
    return du.main_first(lambda main: _view_from_config_json(repo, cached_only=not main))


def _view_from_config_json(repo: str, cached_only: bool) -> dict | None:
    from huggingface_hub import hf_hub_download  # a dependency of timm
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        with open(hf_hub_download(repo, "config.json", local_files_only=cached_only)) as f:
            return _view_of(json.load(f)) or None
    except (LocalEntryNotFoundError, EntryNotFoundError, HfHubHTTPError, OSError, ValueError, AttributeError):
        return None  # no such file, not cached and offline, not a JSON object: the weights come without a view


def _view_of(config: dict) -> dict:
    """The VIEW_FIELDS of a timm config's pretrained_cfg (JSON lists as tuples), those it sets."""
    found = config.get("pretrained_cfg") or {}
    return {key: tuple(found[key]) if isinstance(found[key], list) else found[key] for key in VIEW_FIELDS
            if found.get(key) is not None}


def read_weights(path: str) -> object:
    """What the file holds: a safetensors file as its state dict, a timm folder's weights (`timm_folder`) as theirs,
    anything else through weights-only torch.load."""
    folder = timm_folder(path)
    if folder:
        path = os.path.join(folder, TIMM_WEIGHTS)
    elif not path.endswith(".safetensors"):
        return load_checkpoint(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file '{path}' does not exist; check model.pretrained")
    from safetensors import SafetensorError
    from safetensors.torch import load_file  # a dependency of timm
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"'{path}' is not a readable safetensors file ({e}); download it again") from None


LOCAL_PREFIX = "local-dir:"  # timm's name for a folder in its hub layout
TIMM_CONFIG, TIMM_WEIGHTS = "config.json", "model.safetensors"


def timm_folder(name: str) -> str | None:
    """The folder `name` stands for when it is one in timm's hub layout (config.json + model.safetensors, as
    models.export --format timm-folder writes), 'local-dir:PATH' or the bare path; else None."""
    path = name.removeprefix(LOCAL_PREFIX)
    if not os.path.isdir(path):
        if name.startswith(LOCAL_PREFIX):
            raise CheckpointError(f"'{name}': no such folder; give the folder that holds {TIMM_CONFIG} and "
                                  f"{TIMM_WEIGHTS}")
        return None
    missing = [f for f in (TIMM_CONFIG, TIMM_WEIGHTS) if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise CheckpointError(f"folder '{path}' lacks {' and '.join(missing)}: it is not a model in timm's hub "
                              f"layout (models.export --format timm-folder writes one)")
    return path


def read_timm_folder(name: str) -> tuple[dict[str, torch.Tensor], list[str] | None, dict]:
    """(official-layout weights, class names or None, eval view: VIEW_FIELDS) of a timm folder (`timm_folder`)."""
    folder = timm_folder(name)
    if folder is None:
        raise CheckpointError(f"'{name}' is not a folder; give one with {TIMM_CONFIG} and {TIMM_WEIGHTS}")
    config = folder_config(folder)
    names = config.get("label_names") or (config.get("pretrained_cfg") or {}).get("label_names")
    return to_official(read_weights(folder)), list(names) if names else None, _view_of(config)


def folder_config(folder: str) -> dict:
    """A timm folder's config.json as a dict."""
    path = os.path.join(folder, TIMM_CONFIG)
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"'{path}' is not readable JSON ({e}); export the folder again") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"'{path}' holds a {type(config).__name__}, not timm's config object")
    return config


def adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Stem weights (out, c, k, k) for `in_chans` input channels, as timm adapts input convs.

    One channel: the sum over the source channels, so a grey image gives the response it gave before. More
    channels: the source channels taken in turn and scaled by c / in_chans, which keeps the grey response exactly
    when in_chans is a multiple of c.
    """
    return adapt_input_conv(in_chans, weight, base_chans=weight.shape[1])


def _fit_stem(sd: dict, own: StateDict) -> list[str]:
    w, mine = sd.get(STEM), own[STEM]
    if w is None or w.shape[1] == mine.shape[1] or (w.shape[0], *w.shape[2:]) != (mine.shape[0], *mine.shape[2:]):
        return []  # nothing to adapt, or a mismatch that load_weights reports
    sd[STEM] = adapt_stem(w, mine.shape[1])
    how = "summed over" if mine.shape[1] == 1 else "repeated across"
    return [f"stem: the weights were made for {w.shape[1]} input channels, this model has {mine.shape[1]}: "
            f"{how} the channels"]


def _fit_head(sd: dict, own: StateDict, head_init_scale: float, keep: bool) -> list[str]:
    ckpt_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    own_classes = own["head.weight"].shape[0] if "head.weight" in own else 0
    if ckpt_classes == own_classes and (keep or not own_classes):
        return []
    for key in HEAD:  # the model's own fresh head takes the place of the checkpoint's
        sd.pop(key, None)
        if key in own:
            sd[key] = own[key]
    if own_classes == 0:
        return [f"head: the checkpoint's {ckpt_classes}-class head is not used (this model has none)"]
    why = (f"{ckpt_classes} classes in the checkpoint, {own_classes} here" if ckpt_classes != own_classes
           else "model.pretrained_head=false")
    return [f"head: skipped {', '.join(HEAD)} ({why}); the head starts fresh (trunc-normal init x "
            f"model.head_init_scale={head_init_scale:g})"]


def load_pretrained(model: nn.Module, path: str, ema: bool = False, head: bool = True) -> list[str]:
    """Load `path` into `model` (a ConvNeXt); returns one line per adaptation made.

    head=False keeps the model's fresh head even when the checkpoint's fits: other classes of the same count.
    """
    sd = dict(to_official(unwrap_checkpoint(read_weights(resolve_weights(path)), ema=ema)))
    own = model.state_dict()
    notes = _fit_stem(sd, own) + _fit_head(sd, own, getattr(model, "head_init_scale", 1.0), keep=head)
    load_weights(model, sd, strict=True)
    return notes
