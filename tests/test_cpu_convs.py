"""engine.cpu_convs: the CPU's matrix-form convolutions give nn.Conv2d's results and gradients, and the step that
switches a model to them changes nothing but the speed; engine.build's gradient-stride hook for DDP."""
import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.config import Config
from engine.build import build_model, grads_with_param_strides
from engine.cpu_convs import DENSE_MAX_PIXELS, DepthwiseConv2d, PatchConv2d, use_cpu_matrix_convs
from models import VARIANTS, ConvNeXt, create_model
from helpers import SMALL, randomize

FORMATS = {False: torch.contiguous_format, True: torch.channels_last}


def matrix_form(conv: nn.Conv2d) -> nn.Conv2d:
    assert use_cpu_matrix_convs(conv) == 1
    return conv


def _forward_and_grads(fn, x: torch.Tensor, conv: nn.Conv2d) -> list[torch.Tensor]:
    out = fn(x)
    return [out, *torch.autograd.grad(out.square().sum(), (x, conv.weight, conv.bias))]


def _assert_matches_conv2d(conv: nn.Conv2d, x: torch.Tensor, monkeypatch) -> None:
    """conv(x) and every gradient equal F.conv2d's with the same weights, and conv never ran nn.Conv2d's kernel."""
    want = _forward_and_grads(lambda t: F.conv2d(t, conv.weight, conv.bias, conv.stride, conv.padding, 1, conv.groups),
                              x, conv)
    with monkeypatch.context() as m:
        m.setattr(nn.Conv2d, "_conv_forward", lambda *a: pytest.fail("took nn.Conv2d's path"))
        got = _forward_and_grads(conv, x, conv)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("h, w", [(1, 1), (2, 2), (3, 3), (1, 5), (2, 4), (4, 4), (8, 3), (7, 7), (8, 8)])
def test_depthwise_conv_on_small_maps_is_a_matrix_product_with_the_same_results(h, w, channels_last, monkeypatch):
    torch.manual_seed(0)
    conv = matrix_form(nn.Conv2d(8, 8, kernel_size=7, padding=3, groups=8))
    assert type(conv) is DepthwiseConv2d
    x = torch.randn(3, 8, h, w).contiguous(memory_format=FORMATS[channels_last]).requires_grad_()
    _assert_matches_conv2d(conv, x, monkeypatch)


def test_depthwise_conv_on_larger_maps_runs_the_conv(monkeypatch):
    calls, original = [], nn.Conv2d._conv_forward
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", lambda *a: calls.append(1) or original(*a))
    matrix_form(nn.Conv2d(4, 4, kernel_size=7, padding=3, groups=4))(torch.randn(2, 4, 9, 8))  # 72 pixels
    assert DENSE_MAX_PIXELS < 72 and calls == [1]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("in_chans, patch, size", [(1, 4, 32), (3, 4, 30), (8, 2, 8), (8, 2, 7), (16, 2, 3)])
def test_patch_conv_is_a_matrix_product_with_the_same_results(in_chans, patch, size, channels_last, monkeypatch):
    """Stride == kernel: the stem and the downsamplers, odd sizes included (the last row and column are dropped)."""
    torch.manual_seed(0)
    conv = matrix_form(nn.Conv2d(in_chans, 12, kernel_size=patch, stride=patch))
    assert type(conv) is PatchConv2d
    x = torch.randn(3, in_chans, size, size + 1).contiguous(memory_format=FORMATS[channels_last]).requires_grad_()
    _assert_matches_conv2d(conv, x, monkeypatch)


def test_other_devices_run_the_conv(monkeypatch):
    """Off the CPU (here the meta device) both forms are nn.Conv2d."""
    calls, original = [], nn.Conv2d._conv_forward
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", lambda *a: calls.append(1) or original(*a))
    with torch.device("meta"):
        patch = matrix_form(nn.Conv2d(3, 8, kernel_size=4, stride=4))
        depthwise = matrix_form(nn.Conv2d(8, 8, kernel_size=7, padding=3, groups=8))
        assert depthwise(patch(torch.empty(2, 3, 16, 16))).shape == (2, 8, 4, 4)
    assert calls == [1, 1]


@pytest.mark.parametrize("conv", [
    nn.Conv2d(8, 8, 3, padding=1),  # dense, overlapping
    nn.Conv2d(8, 8, 2, stride=2, padding=1),
    nn.Conv2d(8, 8, (2, 3), stride=(2, 3)),
    nn.Conv2d(8, 8, 7, padding=3, groups=8, bias=False),
    nn.Conv2d(8, 8, 7, padding="same", groups=8),
    nn.Conv2d(8, 8, 7, padding=3, groups=8, padding_mode="reflect"),
    nn.Conv2d(8, 8, 7, padding=6, dilation=2, groups=8),
    nn.Conv2d(8, 16, 7, padding=3, groups=8),  # grouped, not depthwise
], ids=["3x3", "padded-patch", "rectangular", "no-bias", "same-str", "reflect", "dilated", "multiplier"])
def test_convs_without_a_matrix_form_stay_as_they_are(conv):
    assert use_cpu_matrix_convs(conv) == 0 and type(conv) is nn.Conv2d


def test_the_step_switches_only_the_class():
    """Every patchify and depthwise conv, in place: the same modules, Parameter objects and state dict keys, so an
    optimizer made before and checkpoints are unaffected; a second call finds nothing left to switch."""
    model = create_model("convnext_atto")
    modules, params = list(model.modules()), list(model.parameters())
    before = model.state_dict(keep_vars=True)
    assert use_cpu_matrix_convs(model) == 4 + sum(VARIANTS["atto"][0])  # stem, 3 downsamplers, a dwconv a block
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    assert list(model.modules()) == modules and all(a is b for a, b in zip(model.parameters(), params))
    assert type(model.downsample_layers[0][0]) is PatchConv2d and type(model.stages[2][5].dwconv) is DepthwiseConv2d
    assert use_cpu_matrix_convs(model) == 0
    assert type(copy.deepcopy(model).stages[0][0].dwconv) is DepthwiseConv2d  # the EMA's copy runs them too


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_step_keeps_the_outputs_and_gradients(channels_last):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 32, 32).contiguous(memory_format=FORMATS[channels_last])
    plain = randomize(ConvNeXt(**SMALL)).train().to(memory_format=FORMATS[channels_last])
    matrix = copy.deepcopy(plain)
    assert use_cpu_matrix_convs(matrix) == 4 + 5
    results = []
    for model in (plain, matrix):
        out = model(x)
        out.square().sum().backward()
        results.append([out, *(p.grad for p in model.parameters())])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_compiled_backward_matches_eager():
    """The matrix-form convs, their custom backward included, traced by torch.compile's autograd: same gradients."""
    model = randomize(ConvNeXt(**SMALL)).train()  # maps of 16, 8, 4 and 2 px: the last three take the dense form
    use_cpu_matrix_convs(model)
    x = torch.randn(2, 1, 32, 32)
    grads = []
    for run in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        model.zero_grad()
        run(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def small_cfg(cpu_matrix_convs: bool) -> Config:
    cfg = Config()
    cfg.model.name, cfg.model.patch_size, cfg.train.cpu_matrix_convs = "convnext_atto", 2, cpu_matrix_convs
    return cfg


@pytest.mark.parametrize("enabled, device, switched", [(True, "cpu", True), (False, "cpu", False),
                                                        (True, "meta", False)])
def test_build_model_applies_the_step_on_the_cpu_when_enabled(enabled, device, switched):
    model = build_model(small_cfg(enabled), num_classes=10, in_chans=1, device=torch.device(device))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 + sum(VARIANTS["atto"][0])
    assert all(type(m) is not nn.Conv2d for m in convs) if switched else all(type(m) is nn.Conv2d for m in convs)


def test_gradients_take_the_parameters_strides():
    """oneDNN gives a depthwise weight's gradient, from a channels_last input, a stride of 1 on its size-1 dim; the
    hook makes it a view with the parameter's strides. Other gradients are left as they are."""
    conv = nn.Conv2d(8, 8, kernel_size=7, padding=3, groups=8)
    x = torch.randn(2, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    conv(x).square().sum().backward()
    want = conv.weight.grad
    assert want.stride() != conv.weight.stride()  # what DDP warned about; if oneDNN changes, the hook is moot
    conv.zero_grad(set_to_none=True)
    assert grads_with_param_strides(conv) == 1  # the weight (8, 1, 7, 7), not the bias
    conv(x).square().sum().backward()
    assert conv.weight.grad.stride() == conv.weight.stride() and torch.equal(conv.weight.grad, want)


DDP_SCRIPT = """
import sys, warnings, torch
import torch.distributed as dist
import engine.build
from core.config import Config
from engine.cpu_convs import use_cpu_matrix_convs
from models import ConvNeXt

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
unhooked = engine.build.grads_with_param_strides
for form in sys.argv[2:]:
    model = ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), patch_size=2, in_chans=1, num_classes=4)
    if form == "matrix":
        use_cpu_matrix_convs(model)
    engine.build.grads_with_param_strides = (lambda model: 0) if form == "unhooked" else unhooked
    ddp = engine.build.wrap_model(model, Config(), distributed=True, device=torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            ddp(torch.randn(2, 1, 32, 32)).square().sum().backward()
    print(form, [str(w.message) for w in caught if "Grad strides" in str(w.message)])
"""


@pytest.mark.parametrize("forms, warns", [(("plain", "matrix"), False), (("unhooked",), True)])
def test_ddp_does_not_warn_about_grad_strides(tmp_path, forms, warns):
    """One-process gloo DDP runs, in a process of their own as torch warns once a process (so the control, without
    the hook, which warns, has one to itself; the forms that must not warn share one)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(DDP_SCRIPT), str(tmp_path / "store"), *forms],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()[-len(forms):]
    assert [line.split(" ", 1)[0] for line in lines] == list(forms), proc.stdout
    assert all((line.split(" ", 1)[1] != "[]") == warns for line in lines), proc.stdout
