"""model.pretrained: weights of any layout and file format in, head and stem adapted, other mismatches refused;
models.export: both layouts out."""
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from models import create_model
from core.errors import CheckpointError
from models.keys import CheckpointMismatchError, timm_to_official
from models.pretrained import adapt_stem, resolve_weights
from helpers import DEBUG, INLINE_SAVES, eval_json, run, run_here, timm_weights


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_timm_weights_with_another_head(tmp_path, suffix):
    path, official = timm_weights(tmp_path, suffix=suffix)
    notes = []
    model = create_model("convnext_atto", num_classes=10, pretrained=path, log=notes.append)
    assert len(notes) == 1 and "head: skipped head.weight, head.bias (1000 classes in the checkpoint, 10 here)" \
        in notes[0], notes
    own = model.state_dict()
    for key, value in official.items():
        if not key.startswith("head."):
            assert torch.equal(own[key], value), key
    assert own["head.weight"].shape == (10, 320) and own["head.weight"].std() < 0.05  # fresh trunc-normal(0.02)


def test_a_fitting_head_is_loaded_unless_pretrained_head_is_false(tmp_path):
    torch.manual_seed(0)
    source = create_model("convnext_atto", num_classes=5)
    path = str(tmp_path / "five.pth")
    torch.save(source.state_dict(), path)
    kept = create_model("convnext_atto", num_classes=5, pretrained=path)
    assert torch.equal(kept.head.weight, source.head.weight)
    notes = []
    fresh = create_model("convnext_atto", num_classes=5, pretrained=path, pretrained_head=False, log=notes.append)
    assert not torch.equal(fresh.head.weight, source.head.weight)
    assert torch.equal(fresh.stages[3][0].dwconv.weight, source.stages[3][0].dwconv.weight)
    assert "head: skipped head.weight, head.bias (model.pretrained_head=false)" in notes[0]


def test_official_release_file_into_one_channel_model_keeps_the_grey_response(tmp_path):
    torch.manual_seed(0)
    source = create_model("convnext_atto", num_classes=1000, patch_size=2)
    path = str(tmp_path / "release.pth")
    torch.save({"model": source.state_dict()}, path)  # the official release format
    notes = []
    grey = create_model("convnext_atto", num_classes=1000, patch_size=2, in_chans=1, pretrained=path,
                        log=notes.append)
    assert notes == [f"{path}: stem: the weights were made for 3 input channels, this model has 1: summed over the "
                     f"channels"]
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(grey.eval()(x), source.eval()(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)


def hand_written_adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """The project's own stem adaptation before timm's adapt_input_conv took its place: the reference."""
    c = weight.shape[1]
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    return weight.repeat(1, -(-in_chans // c), 1, 1)[:, :in_chans] * (c / in_chans)


@pytest.mark.parametrize("source, in_chans", [(3, 1), (3, 2), (3, 4), (3, 6), (1, 3), (4, 3)])
def test_stem_adaptation_equals_the_hand_written_one(source, in_chans):
    w = torch.randn(8, source, 4, 4)
    original = w.clone()
    assert torch.equal(adapt_stem(w, in_chans), hand_written_adapt_stem(w, in_chans))
    assert torch.equal(w, original)  # the checkpoint's tensor is left alone


def test_more_channels_repeat_and_rescale():
    w = torch.randn(8, 3, 4, 4)
    torch.testing.assert_close(adapt_stem(w, 6).sum(1), w.sum(1))  # a grey image gets the same response
    wide = adapt_stem(w, 5)
    assert wide.shape == (8, 5, 4, 4)
    torch.testing.assert_close(wide[:, 3], w[:, 0] * 3 / 5)  # channels taken in turn


def test_ema_weights_of_a_training_checkpoint_and_prefixes(tmp_path):
    torch.manual_seed(0)
    raw, ema = create_model("convnext_atto", num_classes=10), create_model("convnext_atto", num_classes=10)
    path = str(tmp_path / "ckpt.pth")
    torch.save({"model": {f"module.{k}": v for k, v in raw.state_dict().items()},
                "model_ema": {f"_orig_mod.{k}": v for k, v in ema.state_dict().items()}}, path)
    for use_ema, source in ((False, raw), (True, ema)):
        model = create_model("convnext_atto", num_classes=10, pretrained=path, pretrained_ema=use_ema)
        for key, value in source.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), (use_ema, key)


def test_other_mismatches_are_refused_with_the_keys(tmp_path):
    path, _ = timm_weights(tmp_path, name="convnext_femto")
    with pytest.raises(CheckpointMismatchError, match="shape mismatches .*checkpoint is probably of another "
                                                      "architecture"):
        create_model("convnext_atto", num_classes=1000, pretrained=path)
    with pytest.raises(Exception, match="does not exist"):
        create_model("convnext_atto", pretrained=str(tmp_path / "missing.safetensors"))


def run_export(*args):
    return run_here(["-m", "models.export", *args], check=False)


def test_export_loads_strictly_into_timm_and_the_official_layout(tmp_path):
    torch.manual_seed(0)
    raw, ema = create_model("convnext_atto", num_classes=10), create_model("convnext_atto", num_classes=10)
    ckpt = str(tmp_path / "last.pth")
    torch.save({"model": raw.state_dict(), "model_ema": ema.state_dict(), "step": 3}, ckpt)
    x = torch.randn(2, 3, 64, 64)

    out = str(tmp_path / "atto_timm.safetensors")
    proc = run_export("--checkpoint", ckpt, "--layout", "timm", "--out", out, "--ema")
    assert proc.returncode == 0 and "convnext_atto, EMA" in proc.stderr, proc.stderr
    theirs = timm.create_model("convnext_atto", num_classes=10)
    theirs.load_state_dict(load_file(out), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), ema.eval()(x), rtol=1e-5, atol=1e-5)

    out = str(tmp_path / "atto_official.pth")
    assert run_export("--checkpoint", ckpt, "--layout", "official", "--out", out).returncode == 0
    plain = torch.load(out, weights_only=True)
    assert list(plain) == list(raw.state_dict())  # the official release's key names and order
    fresh = create_model("convnext_atto", num_classes=10)
    fresh.load_state_dict(plain, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), raw.eval()(x), rtol=0, atol=0)


def test_export_refuses_what_timm_cannot_hold(tmp_path):
    ckpt = str(tmp_path / "p2.pth")
    torch.save(create_model("convnext_atto", num_classes=10, patch_size=2).state_dict(), ckpt)
    proc = run_export("--checkpoint", ckpt, "--layout", "timm", "--out", str(tmp_path / "x.pth"))
    assert proc.returncode == 2 and "export with --layout official" in proc.stderr, proc.stderr
    assert not (tmp_path / "x.pth").exists()


# --- released weights by name, from huggingface_hub's cache (offline: nothing is downloaded) ----------------------

def cache_entry(cache, repo, sd, filename="model.safetensors"):
    """What `hf download <repo> <filename>` leaves in the hub cache: refs/main naming a snapshot holding the file."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    path = folder / "snapshots" / commit / filename
    save_file(sd, str(path)) if filename.endswith(".safetensors") else torch.save(sd, path)
    return path


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline hub cache holding timm's convnext_atto.d2_in1k (as .bin) and a 10-class atto of our own."""
    import huggingface_hub.constants as constants
    cache = tmp_path / "hub"
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)  # for the runs started from the tests
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    torch.manual_seed(0)
    timm_sd = timm.create_model("convnext_atto").state_dict()
    cache_entry(cache, "timm/convnext_atto.d2_in1k", timm_sd, "pytorch_model.bin")
    ours = create_model("convnext_atto", num_classes=10, patch_size=2).state_dict()
    cache_entry(cache, "someone/convnext_atto-debug", ours)
    return cache, timm_to_official(timm_sd), ours


@pytest.mark.parametrize("name", ["convnext_atto.d2_in1k", "hf-hub:timm/convnext_atto.d2_in1k"])
def test_released_weights_by_name_come_from_the_hub_cache(hub_cache, name):
    _, official, _ = hub_cache
    notes = []
    model = create_model("convnext_atto", num_classes=10, pretrained=name, log=notes.append)
    assert len(notes) == 1 and f"{name}: head: skipped head.weight, head.bias (1000 classes" in notes[0]
    own = model.state_dict()
    assert all(torch.equal(own[key], value) for key, value in official.items() if not key.startswith("head."))


def test_weights_names_that_cannot_be_had_are_one_line(hub_cache):
    cache = hub_cache[0]
    with pytest.raises(CheckpointError, match=r"^timm has no weights 'convnext_atto.in9k'; its tags for "
                                              r"convnext_atto: d2_in1k"):
        create_model("convnext_atto", pretrained="convnext_atto.in9k")
    with pytest.raises(CheckpointError, match=rf"^model weights 'convnext_tiny.fb_in1k' are neither in the hub cache "
                                              rf"'{cache}' nor reachable \(model.safetensors: not cached; "
                                              rf"pytorch_model.bin: not cached\); .*'hf download timm/convnext_tiny"):
        create_model("convnext_atto", pretrained="convnext_tiny.fb_in1k")
    assert resolve_weights("runs/x/checkpoints/best.pth") == "runs/x/checkpoints/best.pth"  # paths stay paths


def test_hub_weights_are_evaluated_on_their_published_view_but_for_the_command_lines_keys(hub_cache):
    """timm's table gives the view of timm's names (no network); another repository's config.json in the hub cache
    gives its own; a file path leaves the config's; keys set on the command line stay as set."""
    import json
    from core.config import load_config
    from engine.build import adopt_published_view
    cache = hub_cache[0]
    snapshot = cache_entry(cache, "someone/convnext_border", {"w": torch.zeros(1)}).parent
    (snapshot / "config.json").write_text(json.dumps({"pretrained_cfg": {
        "input_size": [3, 256, 256], "crop_pct": 0.9, "crop_mode": "border", "interpolation": "bilinear",
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    base = ["data.name=synthetic", "data.recipe=imagenet"]
    for name, overrides, expected in [
        ("convnext_base.fb_in22k_ft_in1k_384", ["data.crop_pct=0.95"],
         "eval view: 384 px, crop_mode squash, crop_pct 0.95, bicubic, mean [0.485, 0.456, 0.406] std [0.229, 0.224, "
         "0.225] (from convnext_base.fb_in22k_ft_in1k_384's published view; data.crop_pct from the command line)"),
        ("hf-hub:someone/convnext_border", [], "eval view: 256 px, crop_mode border, crop_pct 0.9, bilinear, mean "
         "[0.5, 0.5, 0.5] std [0.25, 0.25, 0.25] (from hf-hub:someone/convnext_border's published view)"),
        ("runs/x/checkpoints/best.pth", ["data.img_size=64"],
         "eval view: 64 px, crop_mode center, crop_pct 0.875, bicubic, synthetic's mean/std (from the config)")]:
        cfg = load_config(None, base + overrides)
        assert adopt_published_view(cfg, name, overrides) == expected


@pytest.mark.slow
def test_fine_tune_and_evaluate_from_hub_names_on_two_ranks(hub_cache, tmp_path):
    out = str(tmp_path / "run")
    proc = run(["train.py", "--config", DEBUG, f"output_dir={out}", "model.pretrained=convnext_atto.d2_in1k",
                "model.patch_size=4", "model.stem_init=default", "schedule.epochs=1", "data.synthetic_train_size=64",
                INLINE_SAVES], nproc=2)
    assert "convnext_atto.d2_in1k: head: skipped head.weight, head.bias (1000 classes" in proc.stdout
    proc = run_here(["eval.py", "--config", DEBUG, "model.pretrained=hf-hub:someone/convnext_atto-debug",
                     "model.stem_init=default"])
    assert eval_json(proc)["samples"] == 101
    assert "eval view: 32 px, the whole image resized (data.recipe=small)" in proc.stdout
    proc = run_here(["eval.py", "--config", DEBUG, "--checkpoint", "hf-hub:someone/missing"], check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "error: model weights 'hf-hub:someone/missing' are neither in the hub cache" in proc.stderr
