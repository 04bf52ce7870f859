"""models.export's serving formats: an ONNX file and a torch.export program that compute our logits, a timm hub folder
that timm builds with our head and view, each carrying the class names; bad requests one line, nothing written."""
import json
import sys

import onnx
import onnxruntime as ort
import timm
import torch
from PIL import Image
from safetensors import safe_open
from timm.data import resolve_data_config

from core.config import Config, to_dict
from models import create_model
from models.pretrained import read_timm_folder
from models.serving.check import TOLERANCE
from models.serving.source import network
from models.view import eval_transform
from helpers import run_here, write_image_folder

NAMES = ["T-shirt", "trouser", "pullover", "dress"]


def checkpoint(tmp_path, model, names=NAMES, **data) -> str:
    """A training checkpoint of `model` with a run config (data keys set) and the class names."""
    cfg = Config()
    for key, value in data.items():
        setattr(cfg.data, key, value)
    path = str(tmp_path / "best.pth")
    entries = {"model": model.state_dict(), "config": to_dict(cfg)}
    if names is not None:
        entries["class_names"] = names
    torch.save(entries, path)
    return path


def images(tmp_path, view) -> torch.Tensor:
    write_image_folder(tmp_path / "imgs", classes=("a",), per_class=3)
    files = sorted((tmp_path / "imgs" / "train" / "a").glob("*.png"))
    return torch.stack([eval_transform(view)(Image.open(f)) for f in files])


def export(*args):
    return run_here(["-m", "models.export", *args], check=False)


def close(theirs, ours) -> None:
    torch.testing.assert_close(theirs, ours, rtol=0, atol=TOLERANCE * max(1.0, ours.abs().max().item()))
    assert torch.equal(theirs.argmax(1), ours.argmax(1))


def test_onnx_and_pt2_compute_our_logits_at_any_batch_and_carry_the_names(tmp_path):
    torch.manual_seed(0)
    model = create_model("convnext_atto", num_classes=4, in_chans=1, patch_size=2, depths=(1, 1, 1, 1),
                         dims=(8, 16, 16, 16)).eval()
    # the small recipe's view: the whole image resized to 28 px, Fashion-MNIST's one-channel mean/std
    ckpt = checkpoint(tmp_path, model, name="fashion_mnist", recipe="small", img_size=28)
    view = {"input_size": [1, 28, 28], "crop_pct": 1.0, "crop_mode": "squash", "interpolation": "bicubic",
            "mean": [0.286], "std": [0.353]}
    x = images(tmp_path, view)
    with torch.no_grad():
        ours = model(x)

    onnx_file = str(tmp_path / "model.onnx")
    proc = export("--checkpoint", ckpt, "--format", "onnx", "--out", onnx_file, "--check-images",
                  str(tmp_path / "imgs"))
    assert proc.returncode == 0 and "top-1 agreement 9/9" in proc.stderr, proc.stderr  # 3 random, 6 images
    props = {p.key: p.value for p in onnx.load(onnx_file).metadata_props}
    assert json.loads(props["class_names"]) == NAMES and json.loads(props["eval_view"]) == view
    session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    for batch in (x[:1], x):
        close(torch.from_numpy(session.run(["logits"], {"images": batch.numpy()})[0]), ours[:len(batch)])

    pt2_file = str(tmp_path / "model.pt2")
    assert export("--checkpoint", ckpt, "--format", "pt2", "--out", pt2_file).returncode == 0
    extra = {"class_names.json": "", "eval_view.json": ""}
    program = torch.export.load(pt2_file, extra_files=extra).module()
    assert json.loads(extra["class_names.json"]) == NAMES and json.loads(extra["eval_view.json"]) == view
    close(program(x[:1]), ours[:1])
    close(program(x), ours)


def test_timm_folder_loads_in_timm_with_our_head_view_and_names(tmp_path):
    torch.manual_seed(0)
    # other depths and dims, one channel, no layer scale: each a model_arg that timm must get back
    model = create_model("convnext_atto", num_classes=4, in_chans=1, depths=(1, 1, 2, 1), dims=(8, 16, 24, 32),
                         layer_scale_init=0).eval()
    ckpt = checkpoint(tmp_path, model, name="fashion_mnist", img_size=48, crop_pct=0.9)
    folder = str(tmp_path / "convnext_ft")
    proc = export("--checkpoint", ckpt, "--format", "timm-folder", "--out", folder, "aug.interpolation=bilinear")
    assert proc.returncode == 0 and "check, timm vs PyTorch" in proc.stderr, proc.stderr

    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    view = {"input_size": (1, 48, 48), "crop_pct": 0.9, "crop_mode": "center", "interpolation": "bilinear",
            "mean": (0.286,), "std": (0.353,)}
    resolved = resolve_data_config({}, model=theirs)  # JSON's lists where timm's table has tuples
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in resolved.items() if k in view} == view
    assert theirs.num_classes == 4 and theirs.pretrained_cfg["label_names"] == NAMES
    x = images(tmp_path, view)
    with torch.no_grad():
        close(theirs(x), model(x))

    sd, names, read_view = read_timm_folder(f"local-dir:{folder}")  # what predict.py reads
    assert names == NAMES and read_view == view
    with torch.no_grad():
        close(network(sd)(x), model(x))
    with safe_open(f"{folder}/model.safetensors", "pt") as f:
        assert json.loads(f.metadata()["class_names"]) == NAMES
    # again over the earlier export; the state dict's .safetensors carries the names too
    assert export("--checkpoint", ckpt, "--format", "timm-folder", "--out", folder).returncode == 0
    out = str(tmp_path / "sd.safetensors")
    assert export("--checkpoint", ckpt, "--layout", "timm", "--out", out).returncode == 0
    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["class_names"]) == NAMES


def test_bad_requests_are_one_line_and_leave_nothing(tmp_path, monkeypatch):
    torch.manual_seed(0)
    small = create_model("convnext_atto", num_classes=4, in_chans=1, patch_size=2, depths=(1, 1, 1, 1),
                         dims=(8, 16, 16, 16))
    ckpt = checkpoint(tmp_path, small, names=None, name="fashion_mnist", img_size=16)
    out = tmp_path / "out"
    cases = [(["--format", "onnx", "--opset", "9"], "--opset 9: the installed exporter writes opsets 18-"),
             (["--format", "timm-folder"], "timm cannot hold it"),
             (["--format", "pt2", "--check-images", str(tmp_path)], "holds no images"),
             (["--format", "pt2", "model.name=convnext_tiny"], "an export takes only the view's keys"),
             (["--format", "onnx"], "needs the 'onnxruntime' package, not installed: pip install -e '.[serve]'")]
    for args, message in cases:
        if "needs the" in message:
            monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as where the extra is not installed
        proc = export("--checkpoint", ckpt, "--out", str(out), *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and message in lines[-1] and lines[-1].startswith("error: "), (args, proc.stderr)
        assert "no class names with the weights" in proc.stderr or "--format onnx" not in " ".join(args)
        assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["best.pth"], args
