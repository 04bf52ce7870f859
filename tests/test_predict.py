"""predict.py in this process (run_here): the rows it writes (by class name, in input order, an unreadable image as a
row with its error), the kinds of weights it reads, and bad input as one line that writes nothing. Its agreement
with eval.py after training, on 1, 2 and 3 processes, is in test_train_e2e."""
import csv
import io
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from core.config import load_config, to_dict
from helpers import offline_caches, run_here
from models import create_model
from models.keys import official_to_timm
from testbed import make_jpeg_testbed

NAMES = ["apple", "bee", "cat, tabby", "dog"]  # a comma: CSV quotes it
MODEL = ["model.name=convnext_atto", "model.depths=[1,1,1,1]", "model.dims=[8,16,16,16]", "data.img_size=32",
         "data.num_workers=0", "data.batch_size=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint as train.py writes it (weights, EMA, the run's config, class names) of a tiny random model over
    4 classes of 32-px JPEGs, and 6 such JPEGs in data/val/<class>/."""
    tmp = tmp_path_factory.mktemp("predict")
    data = str(tmp / "data")
    make_jpeg_testbed(data, num_images=6, num_classes=4, seed=1, split="val")
    cfg = load_config(None, MODEL + ["data.name=imagefolder", f"data.root={data}"])
    torch.manual_seed(0)
    model = create_model(**cfg.model.create_args(), num_classes=4)
    state = {"model": model.state_dict(), "model_ema": model.state_dict(), "config": to_dict(cfg), "class_names": NAMES}
    torch.save(state, tmp / "best.pth")
    return tmp, state


def predict(*args: str, check: bool = True):
    return run_here(["predict.py", *map(str, args)], check=check)


def rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_rows_by_class_name_in_input_order_and_an_unreadable_image_is_a_row(setup):
    tmp, _ = setup
    val = tmp / "data" / "val"
    images = sorted(str(p) for p in val.rglob("*.JPEG"))
    bad = tmp / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a JPEG")
    listed = tmp / "list.txt"
    listed.write_text(f"# two images\n{images[1]}\n\n{images[0]}\n")
    proc = predict("--checkpoint", tmp / "best.pth", images[3], bad, f"@{listed}", f"{val}/c0001/*.JPEG",
                   "--topk", "2")
    got = rows(proc.stdout)
    assert [r["path"] for r in got] == [images[3], str(bad), images[1], images[0], images[2], images[3]]
    assert list(got[0]) == ["path", "class_1", "prob_1", "index_1", "class_2", "prob_2", "index_2", "error"]
    good = [r for r in got if r["path"] != str(bad)]
    assert all(r["class_1"] == NAMES[int(r["index_1"])] and not r["error"] for r in good)
    assert all(float(r["prob_1"]) >= float(r["prob_2"]) > 0 for r in good)
    error = got[1]
    assert error["class_1"] == "" and "cannot decode image" in error["error"] and "bad.jpg" in error["error"]
    assert proc.stderr.splitlines()[-1].endswith("1 unreadable (their rows say why)"), proc.stderr
    # As JSON lines, from the EMA's weights (equal to the raw ones here), in bf16: a warning, if any, on stderr.
    proc = predict("--checkpoint", tmp / "best.pth", "--ema", images[3], "--format", "jsonl", "--amp", "bf16")
    lines = proc.stdout.splitlines()
    record = json.loads(lines[0])
    assert record["classes"][:2] == [good[0]["class_1"], good[0]["class_2"]] and record["error"] == ""
    assert len(record["probs"]) == 4 and abs(sum(record["probs"]) - 1) < 1e-5


def test_an_older_checkpoint_predicts_indices_with_a_note(setup):
    tmp, state = setup
    older = tmp / "older.pth"
    torch.save({k: v for k, v in state.items() if k != "class_names"}, older)
    proc = predict("--checkpoint", older, tmp / "data" / "val")
    assert "note: " in proc.stderr and "classes are given by index" in proc.stderr
    assert all(r["class_1"] == r["index_1"] for r in rows(proc.stdout))


def test_a_model_folder_in_timm_layout_predicts_as_the_checkpoint(setup):
    """config.json (architecture, num_classes, label_names, pretrained_cfg) beside model.safetensors in timm's key
    layout, read without --config as a folder and as local-dir:PATH: the same rows as our checkpoint."""
    tmp, state = setup
    folder = tmp / "exported"
    folder.mkdir()
    view = {"input_size": [3, 32, 32], "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bicubic",
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    (folder / "config.json").write_text(json.dumps({"architecture": "convnext_atto", "num_classes": 4,
                                                    "label_names": NAMES, "pretrained_cfg": view}))
    save_file(official_to_timm(state["model"], conv_mlp=True), str(folder / "model.safetensors"))
    val = tmp / "data" / "val"
    ours = predict("--checkpoint", tmp / "best.pth", val, "--format", "jsonl")
    for weights in (folder, f"local-dir:{folder}"):
        proc = predict("--checkpoint", weights, val, "--format", "jsonl")
        assert proc.stdout == ours.stdout and "from " in proc.stderr


def test_bad_input_is_one_line_and_writes_nothing(setup, monkeypatch):
    tmp, state = setup
    ckpt, val = str(tmp / "best.pth"), str(tmp / "data" / "val")
    (tmp / "empty").mkdir(exist_ok=True)
    (tmp / "notes.txt").write_text("not an image")
    torch.save(state["model"], tmp / "plain.pth")
    offline_caches(monkeypatch, str(tmp / "caches"))
    out = tmp / "out.csv"
    for args, message in [
        ([ckpt, tmp / "empty"], "no images found under"),
        ([ckpt, tmp / "notes.txt"], "is not an image file"),
        ([ckpt, tmp / "nowhere.jpg"], "does not exist"),
        ([ckpt, f"{tmp}/*.png"], "matches no image file"),
        ([ckpt, val, "model.dims=[8,16,16,32]"], "checkpoint does not fit the model"),
        ([ckpt, val, "data.num_classes=5"], "data.num_classes=5 but the weights"),
        ([tmp / "plain.pth", val], "without the config they were trained with; give --config"),
        (["convnext_atto.d2_in1k", val], "are neither in the hub cache"),
        ([tmp / "empty", val], "is not a model in timm's hub layout"),
    ]:
        proc = predict("--checkpoint", *args, "--out", out, check=False)
        lines = [line for line in proc.stderr.splitlines() if not line.startswith("eval view: ")]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert message in lines[0], lines[0]
        assert not out.exists() and not [p for p in os.listdir(tmp) if p.startswith(".out.csv")]
