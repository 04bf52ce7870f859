import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d
from torch import nn

from core.errors import UserError
from models import VARIANTS, ConvNeXt, UnknownModelError, create_model, list_models
from models.keys import (CheckpointError, CheckpointMismatchError, detect_layout, load_weights, official_to_timm,
                         strip_prefixes, timm_to_official, to_official, unwrap_checkpoint)
from helpers import SMALL, randomize


def build(factory) -> nn.Module:
    """Model with uninitialized weights: skips the init (trunc_normal_ is slow on CPU) where
    every weight gets overwritten anyway."""
    with torch.device("meta"):
        model = factory()
    return model.to_empty(device="cpu").eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def timm_small() -> nn.Module:
    """timm's twin of SMALL. timm gives stage 0 a stride-2 downsample whenever the stem stride is 2;
    the official design has none, so it is removed to compare the rest."""
    model = timm.models.convnext.ConvNeXt(**SMALL)
    model.stages[0].downsample = nn.Identity()
    return model


@pytest.mark.parametrize("name", ["convnext_atto", "convnext_tiny"])
def test_imagenet_shape(name):
    model = build(lambda: create_model(name))
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert model.forward_features(torch.randn(2, 3, 64, 64)).shape == (2, VARIANTS[name.removeprefix("convnext_")][1][-1])


@pytest.mark.parametrize("size", [28, 32])
def test_small_input_shape(size):
    model = build(lambda: create_model("convnext_pico", num_classes=10, patch_size=2, in_chans=1))
    assert model(torch.randn(2, 1, size, size)).shape == (2, 10)


def test_custom_depths_dims_and_reset_classifier():
    model = create_model("convnext_tiny", **{k: v for k, v in SMALL.items() if k != "num_classes"})
    assert model.head.out_features == 1000 and model.norm.normalized_shape == (64,)
    model.reset_classifier(7)
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 7)
    model.reset_classifier(0)
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 64)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_param_count_matches_timm(variant):
    with torch.device("meta"):
        assert n_params(create_model(f"convnext_{variant}")) == n_params(timm.create_model(f"convnext_{variant}"))


# "A ConvNet for the 2020s", ImageNet-1K results table (#params at 1000 classes).
PAPER_PARAMS_M = {"tiny": 28.6, "small": 50.2, "base": 88.6, "large": 197.8, "xlarge": 350.2}


@pytest.mark.parametrize("variant", list(PAPER_PARAMS_M))
def test_param_count_matches_paper(variant):
    with torch.device("meta"):
        count = n_params(create_model(f"convnext_{variant}"))
    assert abs(count / 1e6 - PAPER_PARAMS_M[variant]) <= 0.1


def test_state_dict_keys_follow_official_release():
    keys = set(build(lambda: create_model("convnext_atto")).state_dict())
    expected = {"downsample_layers.0.0.weight", "downsample_layers.0.1.bias", "downsample_layers.3.0.weight",
                "downsample_layers.3.1.weight", "stages.2.5.gamma", "stages.2.5.dwconv.weight",
                "stages.2.5.norm.bias", "stages.2.5.pwconv1.weight", "stages.2.5.pwconv2.bias",
                "norm.weight", "head.bias"}
    assert expected <= keys
    assert not any(k.startswith("downsample_layers.0.2") or "drop_path" in k for k in keys)
    assert len(keys) == 4 * 2 * 2 + sum(VARIANTS["atto"][0]) * 9 + 2 * 2  # downsamplers, blocks, norm + head


@pytest.mark.parametrize("ours, theirs, conv_mlp, shape", [
    (lambda: create_model("convnext_atto"), lambda: timm.create_model("convnext_atto"), True, (2, 3, 64, 64)),
    (lambda: create_model("convnext_tiny"), lambda: timm.create_model("convnext_tiny"), False, (1, 3, 32, 32)),
    (lambda: ConvNeXt(**SMALL), timm_small, False, (2, 1, 28, 28)),
], ids=["atto", "tiny", "small-p2"])
def test_timm_parity_both_ways(ours, theirs, conv_mlp, shape):
    x = torch.randn(shape)
    a, b = randomize(build(ours), seed=1), build(theirs)
    b.load_state_dict(official_to_timm(a.state_dict(), conv_mlp=conv_mlp))
    with torch.no_grad():
        out = a(x)
        assert out.abs().max() > 0.1  # a meaningful output, not a vanishing one
        assert (out - b(x)).abs().max() <= 1e-5

    a, b = build(ours), randomize(build(theirs), seed=2)
    a.load_state_dict(timm_to_official(b.state_dict()))
    with torch.no_grad():
        assert (a(x) - b(x)).abs().max() <= 1e-5


def test_conversion_round_trips_are_exact():
    official = randomize(build(lambda: create_model("convnext_atto"))).state_dict()
    timm_sd = randomize(build(lambda: timm.create_model("convnext_atto"))).state_dict()
    for conv_mlp in (False, True):
        back = timm_to_official(official_to_timm(official, conv_mlp=conv_mlp))
        assert list(back) == list(official) and all(torch.equal(back[k], official[k]) for k in official)
    again = official_to_timm(timm_to_official(timm_sd), conv_mlp=True)
    assert list(again) == list(timm_sd) and all(torch.equal(again[k], timm_sd[k]) for k in timm_sd)
    assert detect_layout(official) == "official" and detect_layout(timm_sd) == "timm"


def test_timm_stage0_downsample_is_refused():
    sd = timm.models.convnext.ConvNeXt(**SMALL).state_dict()
    with pytest.raises(CheckpointError, match="stage-0 downsample"):
        timm_to_official(sd)


def test_prefixes_stripped_in_any_order():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    sd = {"module._orig_mod.norm.weight": a, "_orig_mod.module.head.bias": b, "module.module.stages.0.0.gamma": c}
    assert strip_prefixes(sd) == {"norm.weight": a, "head.bias": b, "stages.0.0.gamma": c}
    assert list(sd) == ["module._orig_mod.norm.weight", "_orig_mod.module.head.bias", "module.module.stages.0.0.gamma"]
    wrapped = {f"_orig_mod.module.{k}": v for k, v in (("norm.weight", a), ("head.bias", b), ("stages.0.0.gamma", c))}
    assert list(strip_prefixes(wrapped)) == ["norm.weight", "head.bias", "stages.0.0.gamma"]  # a wrapped model's order


def test_unwrap_checkpoint():
    sd, ema = {"a": torch.zeros(1)}, {"a": torch.ones(1)}
    assert unwrap_checkpoint(sd) is sd
    assert unwrap_checkpoint({"model": sd, "epoch": 3}) is sd
    assert unwrap_checkpoint({"state_dict": sd}) is sd
    assert unwrap_checkpoint({"model": sd, "model_ema": ema}) is sd
    assert unwrap_checkpoint({"model": sd, "model_ema": ema}, ema=True) is ema
    assert unwrap_checkpoint({"model": sd, "ema": ema}, ema=True) is ema
    with pytest.raises(CheckpointError, match="no EMA"):
        unwrap_checkpoint({"model": sd}, ema=True)
    with pytest.raises(UserError, match="no model weights"):
        unwrap_checkpoint({"epoch": 3, "optimizer": {}})


def test_load_weights_from_release_file_and_timm(tmp_path):
    src = randomize(build(lambda: create_model("convnext_atto")))
    wrapped = {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}
    torch.save({"model": wrapped, "epoch": 1}, tmp_path / "ckpt.pth")
    x = torch.randn(1, 3, 32, 32)
    for obj in (torch.load(tmp_path / "ckpt.pth"), official_to_timm(src.state_dict(), conv_mlp=True)):
        dst = build(lambda: create_model("convnext_atto"))
        load_weights(dst, obj)
        with torch.no_grad():
            assert torch.equal(dst(x), src(x))
    assert to_official(official_to_timm(src.state_dict())).keys() == src.state_dict().keys()


def test_load_weights_mismatch_messages():
    with torch.device("meta"):  # only shapes matter: the mismatch is found before any copy
        tiny, tiny10, atto = (create_model(n, num_classes=c) for n, c in
                              [("convnext_tiny", 1000), ("convnext_tiny", 10), ("convnext_atto", 1000)])
    with pytest.raises(CheckpointMismatchError) as err:
        load_weights(tiny10, tiny.state_dict())
    msg = str(err.value)
    assert "head.weight: checkpoint (1000, 768) vs model (10, 768)" in msg and "reset_classifier(10)" in msg
    assert "\n" not in msg

    with pytest.raises(CheckpointMismatchError) as err:
        load_weights(atto, tiny.state_dict())
    msg = str(err.value)
    assert "unexpected keys 54 (stages.0.2.gamma" in msg and "downsample_layers.0.0.weight: checkpoint (96, 3, 4, 4) vs model (40, 3, 4, 4)" in msg
    assert "convnext_tiny" in msg and "convnext_atto" in msg and "\n" not in msg


def test_drop_path_rates_rise_linearly():
    with torch.device("meta"):
        model = create_model("convnext_atto", drop_path=0.3)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    n = sum(VARIANTS["atto"][0])
    assert rates == pytest.approx([0.3 * i / (n - 1) for i in range(n)])


def test_layer_scale_off_removes_gamma():
    assert not any("gamma" in k for k in ConvNeXt(**SMALL, layer_scale_init=0).state_dict())
    assert all(torch.all(b.gamma == 1e-6) for b in ConvNeXt(**SMALL).stages[0])


def test_head_init_scale():
    torch.manual_seed(0)
    plain = ConvNeXt(**SMALL).head.weight.std().item()
    torch.manual_seed(0)
    scaled = ConvNeXt(**SMALL, head_init_scale=0.001).head.weight.std().item()
    assert scaled == pytest.approx(plain * 0.001)


def test_unknown_names_suggest_close_matches():
    with pytest.raises(UnknownModelError, match="did you mean convnext_tiny") as err:
        create_model("convnext_tiy")
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    with pytest.raises(UnknownModelError, match="did you mean drop_path.*valid: in_chans"):
        create_model("convnext_atto", drop_path_rate=0.1)
    assert list_models()[0] == "convnext_atto" and len(list_models()) == len(VARIANTS)


def test_the_convolutions_are_plain_conv2d_as_in_the_paper():
    model = ConvNeXt(**SMALL)
    stem, down, dw = model.downsample_layers[0][0], model.downsample_layers[2][1], model.stages[1][0].dwconv
    assert all(type(conv) is nn.Conv2d for conv in (stem, down, dw))
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride) == (1, 16, (2, 2), (2, 2))
    assert (down.in_channels, down.out_channels, down.kernel_size, down.stride) == (32, 48, (2, 2), (2, 2))
    assert (dw.groups, dw.kernel_size, dw.padding, dw.stride) == (32, (7, 7), (3, 3), (1, 1))


@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_norm_2d_is_layer_norm_over_the_channels(channels_last):
    """timm's LayerNorm2d, with the paper's eps: F.layer_norm on the NHWC view exactly (the hand-written module it
    replaced), and the official code's channels_first mean/var formula up to rounding."""
    torch.manual_seed(0)
    norm = randomize(LayerNorm2d(8, eps=1e-6))
    assert [name for name, _ in norm.named_parameters()] == ["weight", "bias"] and norm.eps == 1e-6
    x = torch.randn(2, 8, 5, 3) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = norm(x)
        nhwc = F.layer_norm(x.permute(0, 2, 3, 1), (8,), norm.weight, norm.bias, 1e-6).permute(0, 3, 1, 2)
        mean, var = x.mean(1, keepdim=True), (x - x.mean(1, keepdim=True)).pow(2).mean(1, keepdim=True)
        official = norm.weight[:, None, None] * (x - mean) / torch.sqrt(var + 1e-6) + norm.bias[:, None, None]
    assert torch.equal(got, nhwc)
    torch.testing.assert_close(got, official, rtol=1e-5, atol=1e-5)


def test_channels_last_matches_contiguous():
    model = randomize(ConvNeXt(**SMALL))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        assert (model_cl(x.to(memory_format=torch.channels_last)) - ref).abs().max() <= 1e-5


def test_bf16_autocast_and_compile_trace():
    model = randomize(ConvNeXt(**SMALL))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # fullgraph: any graph break (Python-side shape logic) fails; the eager backend keeps it fast.
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x))


@pytest.mark.parametrize("stages", [1, 4])
def test_grad_checkpointing_gives_the_same_gradients(stages):
    """Recomputed blocks replay their drop-path draws, so gradients match those of a normal backward."""
    x = torch.randn(4, 3, 32, 32)
    grads = []
    for checkpointed in (0, stages):
        torch.manual_seed(0)
        model = create_model("convnext_atto", num_classes=5, patch_size=2, drop_path=0.3, layer_scale_init=1.0)
        model.set_grad_checkpointing(checkpointed)
        torch.manual_seed(1)
        model(x).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="0 to 4 stages"):
        model.set_grad_checkpointing(5)
