"""Prediction: weights with the config and class names they come with, the top-k classes of every input, and the
rows predict.py writes: one per input, in input order, the same bytes on any number of processes.

    cfg, ctx, local = start_prediction(request)
    classifier = prediction_model(cfg, ctx.device, request, local)
    predictions = gather_predictions(predict(classifier.model, loader, cfg, ctx.device, k, normalise))
    write_output(out, records(predictions, loader.dataset.name, classifier.class_names, ...), k, fmt, labelled)
"""
from __future__ import annotations

import csv
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, TextIO

import torch
from timm.data import ImageNetInfo
from torch import nn
from tqdm import tqdm

import distributed_utils as du
from core.config import Config, ConfigError, parse_override
from core.files import atomic_write
from engine.build import build_model, start_run
from engine.loop import eval_logits
from models.keys import architecture, io_shape, load_weights, to_official, unwrap_checkpoint, variant_of
from models.pretrained import folder_config, hub_repo, read_weights, resolve_weights, timm_folder

IMAGENET_SUBSETS = {1000: "imagenet-1k", 21841: "imagenet-22k"}  # class count -> timm's ImageNetInfo subset


@dataclass
class Request:
    """What the command line asks for: the weights (a file, a model folder or a hub name), the config to read them
    with ("": the one saved with them, or for released weights the defaults), overrides, the EMA's weights."""
    weights: str
    config: str = ""
    overrides: Sequence[str] = ()
    ema: bool = False


def start_prediction(request: Request) -> tuple[Config, du.DistContext, Optional[object]]:
    """The config (--config, else the one saved in our checkpoints, else for released weights the defaults that
    their shape and published view then complete), this process in its group, and what a local weights file holds
    (None for hub names and model folders, read once the group is up: rank 0 fetches them)."""
    weights = request.weights
    local = None if timm_folder(weights) or hub_repo(weights) else read_weights(weights)
    saved = local.get("config") if isinstance(local, Mapping) and not request.config else None
    if local is not None and not request.config and not isinstance(saved, Mapping):
        raise ConfigError(f"'{weights}' holds weights without the config they were trained with; give --config "
                          f"FILE (the YAML they were trained with)")
    # Released weights come without their data set: the defaults' data.name (an image folder) would ask for a
    # data.root that predicting files does not read; synthetic's normalisation is ImageNet's, as the defaults'.
    released = [] if local is not None or request.config else ["data.name=synthetic"]
    cfg, ctx = start_run(request.config or None, [*released, *request.overrides], training=False, saved=saved)
    return cfg, ctx, local


@dataclass
class Classifier:
    model: nn.Module  # in eval mode
    in_chans: int
    num_classes: int
    class_names: Optional[list[str]]  # None where the weights name none


def prediction_model(cfg: Config, device: torch.device, request: Request, local: Optional[object]) -> Classifier:
    """The model the weights fill, and the names of its classes.

    A config that describes another model than the weights (model.name, data.num_classes, ...) is one error line;
    released weights read without a config (hub names, model folders) shape the model but for the keys given on the
    command line.
    """
    weights = request.weights
    obj = local if local is not None else read_weights(resolve_weights(weights))
    sd = to_official(unwrap_checkpoint(obj, ema=request.ema))
    if local is None and not request.config:
        fit_model(cfg, sd, {parse_override(text)[0] for text in request.overrides})
    in_chans, _, num_classes = io_shape(sd)
    if not num_classes:
        raise ConfigError(f"'{weights}' has no classifier head (features only); predict needs a head")
    if cfg.data.num_classes and cfg.data.num_classes != num_classes:
        raise ConfigError(f"data.num_classes={cfg.data.num_classes} but the weights '{weights}' have "
                          f"{num_classes} classes; leave data.num_classes out, or give the weights of that model")
    model = build_model(cfg, num_classes, in_chans, device, pretrained=False)
    load_weights(model, sd)
    return Classifier(model.eval(), in_chans, num_classes, class_names(obj, weights, num_classes))


def fit_model(cfg: Config, sd: Mapping, given: set[str]) -> None:
    """Shape cfg.model as the official-layout weights `sd` are (variant, or depths and dims; patch size), but for the
    keys in `given` (set on the command line)."""
    variant = variant_of(sd)
    depths, dims = architecture(sd)
    values = {"model.name": f"convnext_{variant}" if variant else cfg.model.name,
              "model.depths": [] if variant else list(depths), "model.dims": [] if variant else list(dims),
              "model.patch_size": io_shape(sd)[1],
              "model.layer_scale_init": cfg.model.layer_scale_init if any(k.endswith("gamma") for k in sd) else 0.0}
    for key, value in values.items():
        if key not in given:
            setattr(cfg.model, key.split(".")[1], value)


def class_names(obj: object, weights: str, num_classes: int) -> Optional[list[str]]:
    """The names of the outputs: our checkpoints' class_names entry; a model folder's label_names; for hub weights
    and model folders without names, ImageNet's (timm's ImageNetInfo) where the head has its 1000 or 21841 classes;
    else None (the outputs are named by index)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("class_names"), list):
        return [str(name) for name in obj["class_names"]]
    folder = timm_folder(weights)
    names = folder_config(folder).get("label_names") if folder else None
    if isinstance(names, list) and len(names) == num_classes:
        return [str(name) for name in names]
    if (folder or hub_repo(weights)) and num_classes in IMAGENET_SUBSETS:
        info = ImageNetInfo(IMAGENET_SUBSETS[num_classes])
        return [info.index_to_description(i) for i in range(num_classes)]
    return None


@dataclass
class Prediction:
    """One input's outcome: its top-k classes (indices) and their probabilities, or why it could not be read."""
    index: int
    label: int  # the true class where the input is a labelled split, else -1
    classes: list[int]
    probs: list[float]
    error: str = ""


@torch.no_grad()
def predict(model: nn.Module, loader, cfg: Config, device: torch.device, k: int,
            batch_transform: Callable) -> list[Prediction]:
    """This rank's predictions over its share of the inputs (the loader's exact sampler), in the loader's order:
    the same view, precision and test-time augmentation as evaluation (engine.loop.eval_logits)."""
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    out = []
    bar = tqdm(total=len(loader.sampler), unit="img", desc="predicting", disable=not du.is_main_process(),
               delay=2, leave=False, mininterval=1.0, file=sys.stderr)
    for images, indices, labels, errors in loader:
        out += [Prediction(i, -1, [], [], error) for i, error in errors]
        if images is not None:
            images = batch_transform(images.to(device, non_blocking=True, memory_format=memory_format))
            probs = eval_logits(model, images, device, cfg.train.amp, memory_format, cfg.aug.tta).softmax(1)
            top = probs.topk(k, dim=1)
            out += [Prediction(i, label, classes, values) for i, label, classes, values in
                    zip(indices.tolist(), labels.tolist(), top.indices.tolist(), top.values.tolist())]
        bar.update(len(indices) + len(errors))
    bar.close()
    return out


def gather_predictions(mine: list[Prediction]) -> list[Prediction]:
    """Every rank's predictions, on every rank, in input order."""
    return sorted((p for rank in du.all_gather_object(mine) for p in rank), key=lambda p: p.index)


FORMATS = ("csv", "jsonl")
DIGITS = 6  # of each probability written: a fixed text, the same whichever rank computed it


def columns(k: int, labelled: bool) -> list[str]:
    """The CSV header: path, then class_i, prob_i, index_i for i = 1..k (best first), then label (the true class,
    for a labelled split) and error (why the image could not be read; empty when it was)."""
    ranked = [f"{field}_{i}" for i in range(1, k + 1) for field in ("class", "prob", "index")]
    return ["path", *ranked, *(["label"] if labelled else []), "error"]


def records(predictions: Sequence[Prediction], path: Callable[[int], str], class_names: Optional[list[str]],
            label_names: Optional[list[str]], labelled: bool) -> list[dict]:
    """One dict per prediction: path, classes (names; the index as text where there are none), probs, indices,
    label (with `labelled`: the true class by label_names, else class_names, else index), error."""
    def name(index: int, names: Optional[list[str]]) -> str:
        return names[index] if names else str(index)

    out = []
    for p in predictions:
        record = {"path": path(p.index), "classes": [name(c, class_names) for c in p.classes],
                  "probs": [round(v, DIGITS) for v in p.probs], "indices": p.classes}
        if labelled:
            record["label"] = name(p.label, label_names or class_names) if p.label >= 0 else ""
        out.append({**record, "error": p.error})
    return out


def write_records(f, rows: list[dict], k: int, fmt: str, labelled: bool) -> None:
    """`rows` (records) to the text file `f`: CSV under the header `columns`, or one JSON object a line."""
    if fmt == "jsonl":
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        return
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(columns(k, labelled))
    for row in rows:
        ranked = [value for i in range(len(row["classes"])) for value in
                  (row["classes"][i], f"{row['probs'][i]:.{DIGITS}f}", row["indices"][i])]
        ranked += [""] * (3 * k - len(ranked))  # an unreadable image ranks nothing
        writer.writerow([row["path"], *ranked, *([row["label"]] if labelled else []), row["error"]])


def write_output(out: str | TextIO, rows: list[dict], k: int, fmt: str, labelled: bool) -> None:
    """Rank 0 writes the rows to the file `out` atomically (nothing half-written on a failure), or to the stream."""
    if not du.is_main_process():
        return
    if isinstance(out, str):
        atomic_write(out, lambda f: write_records(f, rows, k, fmt, labelled), binary=False)
    else:
        write_records(out, rows, k, fmt, labelled)
        out.flush()
