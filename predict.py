"""Predict the classes of images: the top-k classes of each, with their probabilities, as CSV or JSON lines.

    python predict.py --checkpoint runs/x/checkpoints/best.pth photos/ extra.jpg 'more/*.png' @list.txt
    python predict.py --checkpoint runs/x/checkpoints/best.pth --split val --out val.csv [--ema]
    python predict.py --checkpoint convnext_tiny.fb_in1k --format jsonl cat.jpg        # a hub name, or a model folder
    torchrun --nproc_per_node=4 predict.py --checkpoint best.pth photos/ --out predictions.csv

Inputs: image files, folders (their images, recursively, sorted), glob patterns (quoted) and @FILE (a text file of
such inputs, one a line); or --split train|val, that split of the data the config names (data.* as trained, or as
overridden). Arguments of the form key.sub=value are config overrides, as eval.py takes them.

Weights: our checkpoints carry the run's config and class names, so --config is needed only for plain state dicts
(exported or official release files). Hub names and model folders (timm's layout: config.json with architecture,
num_classes, label_names, pretrained_cfg beside model.safetensors; or local-dir:PATH) are read with their published
view and, for ImageNet's 1000 or 21841 classes, ImageNet's class names. The images are seen as eval.py sees them:
size, crop, interpolation, mean/std, precision (train.amp, --amp), channels_last, test-time augmentation (aug.tta).

Output, one row per input in input order (the same bytes on any number of processes; rank 0 writes, to --out
atomically or to stdout):
    CSV    path, class_1, prob_1, index_1, ..., class_k, prob_k, index_k, [label,] error
    JSONL  {"path", "classes", "probs", "indices", ["label",] "error"}
class_i is the i-th likeliest class's name (its index where the weights name none), prob_i its softmax probability
(6 decimals). label, for --split only, is the image's true class. error is empty, or why the image could not be read
(its classes then empty). The last line on stderr counts the images, the unreadable ones and the speed.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time

import distributed_utils as du
from core.cli import run_main
from data import batch_transforms, build_eval_loader, collate_predicting, data_mean_std, predict_inputs
from engine.build import adopt_published_view
from engine.predict import (FORMATS, Request, gather_predictions, predict, prediction_model, records,
                            start_prediction, write_output)

OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")  # key.sub=value; a path has a / or . before any =


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="our checkpoint (best.pth, last.pth, a step file), a "
                        "state dict, a model folder (or local-dir:PATH) or a hub name")
    parser.add_argument("--config", default="", help="the YAML the weights were trained with (default: the one "
                        "saved in our checkpoints; the defaults and the published view for hub names and folders)")
    parser.add_argument("--ema", action="store_true", help="the EMA weights of one of our checkpoints")
    parser.add_argument("--split", default="", choices=("", "train", "val"), help="predict this split of the "
                        "configured data (data.*) instead of image paths; adds the true label to each row")
    parser.add_argument("--topk", type=int, default=5, help="classes per row (at most the model's; default 5)")
    parser.add_argument("--format", default="csv", choices=FORMATS, help="csv (default) or jsonl")
    parser.add_argument("--out", default="", help="the file to write (default: stdout)")
    parser.add_argument("--amp", default="", choices=("", "none", "bf16", "fp16", "auto"),
                        help="precision (default: train.amp of the config)")
    parser.add_argument("--batch-size", type=int, default=0, help="images per batch and process "
                        "(default: data.eval_batch_size, else 2 x data.batch_size)")
    parser.add_argument("inputs", nargs="*", metavar="INPUT or key.sub=value",
                        help="images, folders, 'globs', @list.txt; and config overrides")
    args = parser.parse_intermixed_args(argv)  # inputs and overrides before, between and after options
    args.overrides = [text for text in args.inputs if OVERRIDE.match(text)]
    args.overrides += [f"train.amp={args.amp}"] * bool(args.amp)
    args.overrides += [f"data.eval_batch_size={args.batch_size}"] * bool(args.batch_size)
    args.inputs = [text for text in args.inputs if not OVERRIDE.match(text)]
    if bool(args.inputs) == bool(args.split):
        parser.error("give image paths (files, folders, globs, @list.txt) or --split, one of the two")
    if args.topk < 1:
        parser.error("--topk must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    rows_out = sys.stdout  # where the rows go without --out; every message goes to stderr, start-up lines included
    with contextlib.redirect_stdout(sys.stderr):
        request = Request(args.checkpoint, args.config, args.overrides, args.ema)
        cfg, ctx, local = start_prediction(request)
        du.print0(adopt_published_view(cfg, args.checkpoint, args.overrides))
        classifier = prediction_model(cfg, ctx.device, request, local)
        if classifier.class_names is None:
            du.print0(f"note: '{args.checkpoint}' names no classes (weights from before checkpoints held them, or a "
                      f"plain state dict): classes are given by index")
        inputs, label_names = predict_inputs(cfg.data, cfg.aug, args.inputs, args.split, classifier.in_chans)
        loader = build_eval_loader(inputs, cfg.data, ctx.env.rank, ctx.env.world_size, collate_fn=collate_predicting)
        normalise = batch_transforms(cfg.data, cfg.aug, *data_mean_std(cfg.data))[1]

        du.barrier()
        start = time.perf_counter()
        k = min(args.topk, classifier.num_classes)
        predictions = gather_predictions(predict(classifier.model, loader, cfg, ctx.device, k, normalise))
        seconds = time.perf_counter() - start
        rows = records(predictions, inputs.name, classifier.class_names, label_names, labelled=bool(args.split))
        write_output(args.out or rows_out, rows, k, args.format, labelled=bool(args.split))
        unreadable = sum(bool(p.error) for p in predictions)
        du.print0(f"predicted {len(predictions) - unreadable} images in {seconds:.1f} s "
                  f"({len(predictions) / seconds:.1f} img/s) on {ctx.env.world_size} process(es); {unreadable} "
                  f"unreadable{' (their rows say why)' if unreadable else ''}")


def cli() -> None:
    """The console script's entry point."""
    run_main(main)


if __name__ == "__main__":
    cli()
