import math

import pytest
import torch

from core.config import ConfigError, OptimCfg, ScheduleCfg, TrainCfg
from engine.optim import (accum_steps_for, create_optimizer, global_batch, layer_id, lr_at, param_groups,
                          scaled_lr, schedule_steps, set_lr)
from models import create_model


def test_global_batch_and_linear_scaling():
    # The official ConvNeXt-T recipe: 128 per GPU x 8 GPUs x accum 4 = 4096, lr 4e-3 at 4096.
    assert global_batch(128, 8, 4) == 4096
    assert scaled_lr(4e-3, 4096, 4096, "linear") == pytest.approx(4e-3)
    # With the per-process batch fixed, the lr follows the world size.
    assert scaled_lr(4e-3, global_batch(128, 2, 4), 4096, "linear") == pytest.approx(1e-3)
    assert scaled_lr(4e-3, global_batch(128, 16, 4), 4096, "linear") == pytest.approx(8e-3)
    assert scaled_lr(1e-3, 1024, 256, "sqrt") == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 1024, 256, "none") == 1e-3


def test_global_batch_fixes_accumulation_for_any_fitting_world_size():
    train = TrainCfg(global_batch=4096)
    assert [accum_steps_for(train, 128, world) for world in (1, 8, 16, 32)] == [32, 4, 2, 1]
    with pytest.raises(ConfigError, match=r"train.global_batch=4096 is not a multiple of data.batch_size=128 x 6 "
                                          r"processes = 768; change data.batch_size or the number of processes"):
        accum_steps_for(train, 128, 6)
    with pytest.raises(ConfigError, match="train.accum_steps=3 disagrees with train.global_batch=4096"):
        accum_steps_for(TrainCfg(global_batch=4096, accum_steps=3), 128, 8)
    assert accum_steps_for(TrainCfg(global_batch=4096, accum_steps=4), 128, 8) == 4
    assert accum_steps_for(TrainCfg(accum_steps=3), 128, 6) == 3  # global_batch 0: accum_steps as set


def test_layer_ids_follow_the_official_numbering_for_base():
    # facebookresearch/ConvNeXt get_num_layer_for_convnext, depths (3, 3, 27, 3): 12 layers, the head 13.
    depths = (3, 3, 27, 3)
    expected = {"downsample_layers.0.0.weight": 0, "stages.0.2.dwconv.weight": 1, "downsample_layers.1.1.weight": 2,
                "stages.1.0.gamma": 2, "downsample_layers.2.0.bias": 3, "stages.2.0.pwconv1.weight": 3,
                "stages.2.5.norm.weight": 4, "stages.2.26.pwconv2.bias": 11, "downsample_layers.3.1.weight": 12,
                "stages.3.2.gamma": 12, "norm.weight": 13, "head.weight": 13}
    assert {name: layer_id(name, depths) for name in expected} == expected


@pytest.mark.parametrize("name", ["convnext_atto", "convnext_tiny"])
def test_layer_decay_groups_every_variant(name):
    model = create_model(name, num_classes=10)
    groups = param_groups(model, 0.05, layer_decay=0.5)
    top = max(g["layer"] for g in groups)
    assert top == 3 + -(-len(model.stages[2]) // 3) + 1  # atto: 6 blocks -> 2 groups; tiny: 9 -> 3
    assert {g["layer"] for g in groups} == set(range(top + 1))  # no layer left empty
    for g in groups:
        assert g["lr_scale"] == 0.5 ** (top - g["layer"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = torch.optim.AdamW(groups, lr=1.0)
    set_lr(opt, 4e-3)
    head = next(g for g in opt.param_groups if g["layer"] == top)
    stem = next(g for g in opt.param_groups if g["layer"] == 0)
    assert head["lr"] == 4e-3 and stem["lr"] == pytest.approx(4e-3 * 0.5 ** top)


def test_freeze_stages_and_head_only():
    model = create_model("convnext_atto", num_classes=10)
    opt = create_optimizer(model, OptimCfg(freeze_stages=2), lr=1e-3)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("downsample_layers.0", "downsample_layers.1", "stages.0", "stages.1"))
                   for n in trained)
    assert "stages.2.0.dwconv.weight" in trained and "downsample_layers.2.1.weight" in trained
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trained)
    probe = create_model("convnext_atto", num_classes=10)
    create_optimizer(probe, OptimCfg(head_only=True), lr=1e-3)
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


def test_no_weight_decay_on_1d_parameters():
    model = create_model("convnext_atto", num_classes=10)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "stages.0.0.gamma" in no_decay_names and "head.bias" in no_decay_names
    assert "norm.weight" in no_decay_names and "downsample_layers.0.1.weight" in no_decay_names
    assert "head.weight" in decay_names and "stages.0.0.pwconv1.weight" in decay_names
    assert "stages.0.0.dwconv.weight" in decay_names
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))
    opt = create_optimizer(model, OptimCfg(weight_decay=0.05), lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW) and [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_schedule_warmup_then_cosine():
    kw = dict(base_lr=1.0, min_lr=0.01, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(4, **kw) == pytest.approx(0.5)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.01 + 0.5 * 0.99)
    assert lr_at(110, **kw) == pytest.approx(0.01)
    assert lr_at(500, **kw) == pytest.approx(0.01)
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(0, base_lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=100) == 1.0
    assert lr_at(25, base_lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=100) == pytest.approx(
        0.5 * (1 + math.cos(math.pi / 4)))


def test_schedule_steps_from_epochs():
    assert schedule_steps(ScheduleCfg(epochs=300, warmup_epochs=20), 312) == (20 * 312, 300 * 312)
    assert schedule_steps(ScheduleCfg(epochs=10, warmup_epochs=0.5), 100) == (50, 1000)
