"""train_one_epoch and evaluate in one process: accumulation, EMA, precision, clipping, exact metrics."""
import copy
import os
import re
from types import SimpleNamespace

import pytest
import torch
from timm.utils import ModelEmaV3
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN as MEAN, IMAGENET_DEFAULT_STD as STD
from torch.utils.data import DataLoader, TensorDataset

from core.config import load_config
from data import batch_transforms
from engine.build import build_parts
from simulated_device import DEVICE, SimulatedDevice
from helpers import ROOT, launch_script, loader, parts_for, poisoned, run_epoch, tiny_model

from engine.logging import RunLogger
from core.errors import NonFiniteLoss
from engine.checkpointing import RunState
from engine.loop import evaluate, train_one_epoch, tta_views
from engine import precision
from engine.precision import resolve_amp
from engine.ema import Ema
from models import create_model


def test_accumulation_equals_a_bigger_batch():
    big, small = tiny_model(), tiny_model()
    assert run_epoch(parts_for(big), loader(16)).step == 2
    run = run_epoch(parts_for(small, accum_steps=2), loader(8))  # 4 micro-batches -> 2 optimizer steps
    assert (run.step, run.epoch_samples) == (2, 32)
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_ema_follows_the_raw_weights():
    model = tiny_model()
    ema = Ema(model, decay=0.9, warmup=False)
    parts, data = parts_for(model, ema=ema), loader(32)  # one batch: one optimizer step per epoch
    log = RunLogger("", enabled=False)
    # timm's convention (as in its train.py): the update at step 1 copies the weights, later ones average.
    run = RunState()
    train_one_epoch(parts, data, run, logger=log, log_every=1, global_batch=32)
    assert run.step == 1
    first = copy.deepcopy(model.state_dict())
    for name, value in ema.module.state_dict().items():
        torch.testing.assert_close(value, first[name], msg=name)
    run.end_epoch()
    train_one_epoch(parts, data, run, logger=log, log_every=1, global_batch=32)
    assert (run.epoch, run.step) == (1, 2)
    second = model.state_dict()
    assert any(not torch.equal(first[k], second[k]) for k in second)
    for name, value in ema.module.state_dict().items():
        torch.testing.assert_close(value, 0.9 * first[name] + 0.1 * second[name], msg=name)


def test_ema_update_matches_timms_after_weights_are_loaded_in_place():
    """Ema (every=1) is timm's ModelEmaV3: it averages what the model holds after a checkpoint is loaded into it,
    copies integer buffers (a BatchNorm's count) and follows when given another model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ours, timms = Ema(model, decay=0.8, warmup=False), ModelEmaV3(model, decay=0.8)
    for step in (1, 2, 3, 4):
        if step == 4:
            model = copy.deepcopy(model)
        model.train()(torch.randn(2, 3, 8, 8))  # moves the BatchNorm's running stats and count
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        if step == 2:
            model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})
        ours.update(model, step=step)
        timms.update(model, step=step)
        for (name, value), want in zip(ours.module.state_dict().items(), timms.module.state_dict().values()):
            torch.testing.assert_close(value, want, msg=name, rtol=0, atol=0)
    assert ours.module[1].num_batches_tracked == model[1].num_batches_tracked == 5  # 4 batches, +1 when loaded


def test_ema_every_n_steps_updates_on_the_nth_with_decay_to_the_n():
    model = tiny_model()
    ema = Ema(model, decay=0.9, warmup=False, every=3)
    start = copy.deepcopy(ema.module.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for step in (4, 5):  # not multiples of 3: nothing moves
        ema.step(model, step)
    for name, value in ema.module.state_dict().items():
        torch.testing.assert_close(value, start[name], msg=name)
    ema.step(model, 6)
    target = model.state_dict()
    for name, value in ema.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 ** 3 * start[name] + (1 - 0.9 ** 3) * target[name], msg=name)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_and_clipping_train(amp):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    run_epoch(parts_for(model, amp=amp, clip_grad=0.5, channels_last=True), loader(8))
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after)


@pytest.mark.parametrize("avx512_bf16, amx, speedup, expected", [
    (False, False, 4.0, "none"), (True, False, 2.0, "bf16"), (False, True, 8.0, "bf16"),
    (True, False, 0.02, "none")])  # the flags, but kernels kept off them (e.g. ONEDNN_MAX_CPU_ISA=AVX2): emulated
def test_amp_auto_picks_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch, avx512_bf16, amx, speedup,
                                                                       expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
    cpu, warnings = torch.device("cpu"), []
    assert resolve_amp("auto", cpu, warn=warnings.append) == expected
    assert [resolve_amp(a, cpu, warn=warnings.append) for a in ("none", "bf16", "fp16")] == ["none", "bf16", "fp16"]
    # An explicit bf16 is kept; where it is emulated, one line says so (the speed ratio measured).
    assert warnings == ([] if expected == "bf16" else
                        [f"warning: train.amp=bf16 on a cpu without native bf16, where bf16 is emulated (a 256^3 matmul "
                         f"runs {1 / speedup:.0f}x slower in bf16 than in fp32 here); train.amp=none or auto trains in "
                         f"fp32"])


def test_the_bf16_probe_and_yardstick_take_well_under_seconds_on_any_cpu():
    """The probe is measured (cached per process); the matmul yardstick stops growing its size after a product
    of min_seconds, so an emulated dtype does not time a 2048^3 matmul (about a minute on an AVX2-only CPU)."""
    precision.cpu_bf16_speedup.cache_clear()
    assert precision.cpu_bf16_speedup() > 0
    tflops, n = precision.cpu_matmul_tflops(torch.bfloat16, min_seconds=0.01)
    assert tflops > 0 and n in (256, 512, 1024, 2048)
    assert precision.cpu_matmul_tflops(torch.float32, max_size=256) [1] == 256


def test_non_finite_loss_stops_with_the_step():
    model = tiny_model()
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="epoch 0, step 1; the checkpoints on disk are from before it"):
        run_epoch(parts_for(model), loader(8))


def test_max_bad_steps_skips_the_step_entirely_then_stops():
    skipping, reference = tiny_model(), tiny_model()
    parts = parts_for(skipping, max_bad_steps=1)
    run = run_epoch(parts, poisoned(8, bad_batches=[1]))
    assert run.step == 4 and run.bad_steps == 1
    # A skipped step leaves no trace: the same as never seeing batch 1 (AdamW's step count included).
    images, labels = loader(8).dataset.tensors
    keep = torch.cat([torch.arange(0, 8), torch.arange(16, 32)])
    run_epoch(parts_for(reference), DataLoader(TensorDataset(images[keep], labels[keep]), batch_size=8))
    for (name, a), b in zip(skipping.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(NonFiniteLoss, match=r"more than train.max_bad_steps=1 such steps\) at epoch 0, step 3"):
        run_epoch(parts_for(tiny_model(), max_bad_steps=1), poisoned(8, bad_batches=[0, 2]))


def test_evaluate_is_exact_on_a_short_last_batch():
    model = tiny_model()
    data = loader(batch_size=7, n=30)  # 4 full batches and one of 2
    metrics = evaluate(model, data, torch.device("cpu"))
    images, labels = data.dataset.tensors
    with torch.no_grad():
        logits = model.eval()(images)
    assert metrics["samples"] == 30
    assert metrics["top1"] == pytest.approx(100.0 * (logits.argmax(1) == labels).float().mean().item())
    top4 = logits.topk(4, dim=1).indices.eq(labels[:, None]).any(1).float().mean().item()
    assert metrics["top5"] == pytest.approx(100.0 * top4) == pytest.approx(100.0)  # 4 classes: top-5 is top-4
    assert metrics["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


def test_evaluate_makes_no_tensor_per_batch(monkeypatch):
    """Counting the images with a tensor made per batch would be a blocking host-to-device copy on a GPU."""
    made = []
    for name in ("tensor", "as_tensor", "scalar_tensor"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, real=real, **kw: made.append(1) or real(*a, **kw))
    model = tiny_model()
    counts = []
    for n in (8, 40):  # 1 and 5 batches
        made.clear()
        assert evaluate(model, loader(batch_size=8, n=n), torch.device("cpu"))["samples"] == n
        counts.append(len(made))
    assert counts[0] == counts[1], counts


def test_evaluate_counts_the_confusion_matrix_without_bincount(monkeypatch):
    """eval.py --per-class: counts[true][predicted] over the split. Not by bincount, which reads its output size back
    from the GPU: a sync every batch."""
    monkeypatch.setattr(torch, "bincount", lambda *a, **kw: pytest.fail("bincount syncs with the GPU"))
    model, data = tiny_model(), loader(batch_size=7, n=30)
    images, labels = data.dataset.tensors
    with torch.no_grad():
        predicted = model.eval()(images).argmax(1)
    expected = [[int(((labels == t) & (predicted == p)).sum()) for p in range(4)] for t in range(4)]
    metrics = evaluate(model, data, torch.device("cpu"), num_classes=4)
    assert metrics["confusion"] == expected and sum(map(sum, expected)) == 30
    assert metrics["top1"] == pytest.approx(100.0 * sum(expected[c][c] for c in range(4)) / 30)


def test_evaluate_with_tta_averages_the_logits_of_the_flipped_and_shifted_views():
    model, data = tiny_model(), loader(batch_size=8, n=24)
    images, labels = data.dataset.tensors
    with torch.no_grad():
        logits = (model.eval()(images) + model(images.flip(3))) / 2
    grad_modes = []  # an evaluation that records autograd graphs holds every view's activations: gigabytes
    model.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    metrics = evaluate(model, data, torch.device("cpu"), tta="flip")
    assert grad_modes == [False] * 6  # 3 batches x 2 views
    assert metrics["top1"] == pytest.approx(100.0 * (logits.argmax(1) == labels).float().mean().item())
    assert metrics["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert metrics["loss"] != pytest.approx(evaluate(model, data, torch.device("cpu"))["loss"], rel=1e-3)

    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    assert len(tta_views(x)) == 1 and len(tta_views(x, "flip")) == 2
    plain, mirror, up, down, left, right = tta_views(x, "flip_shift")
    assert torch.equal(plain, x) and torch.equal(mirror, x.flip(3))
    # Each shifted view moves the content one pixel and repeats the edge row or column it uncovers.
    assert torch.equal(up[:, :, :-1], x[:, :, 1:]) and torch.equal(up[:, :, -1], x[:, :, -1])
    assert torch.equal(down[:, :, 1:], x[:, :, :-1]) and torch.equal(down[:, :, 0], x[:, :, 0])
    assert torch.equal(left[..., :-1], x[..., 1:]) and torch.equal(left[..., -1], x[..., -1])
    assert torch.equal(right[..., 1:], x[..., :-1]) and torch.equal(right[..., 0], x[..., 0])
    both = tta_views(x, "flip_x_shift")  # the same 6, then the mirror's 4 shifts
    assert len(both) == 10 and all(torch.equal(a, b) for a, b in zip(both, tta_views(x, "flip_shift")))
    assert all(torch.equal(m, v.flip(3)) for m, v in zip(both[6:], (up, down, right, left)))


NAN_ON_RANK_1 = """
    import sys
    from torch import nn
    import distributed_utils as du
    from core.cli import run_main
    from core.errors import NonFiniteLoss
    from helpers import parts_for, poisoned, run_epoch, tiny_model

    def main():
        rank = du.setup("gloo", timeout_s=600).env.rank
        for max_bad_steps in map(int, sys.argv[1:]):  # one process group, each setting in turn
            model = tiny_model()
            parts = parts_for(nn.parallel.DistributedDataParallel(model), raw_model=model, max_bad_steps=max_bad_steps)
            try:
                run = run_epoch(parts, poisoned(8, bad_batches=[2] if rank == 1 else []), log_every=4)
                norm = sum(p.double().abs().sum() for p in model.parameters()).item()
                print(f"RESULT {max_bad_steps} rank={rank} steps={run.step} bad={run.bad_steps} norm={norm!r}",
                      flush=True)
            except NonFiniteLoss as e:
                print(f"RESULT {max_bad_steps} rank={rank} stopped: {e}", flush=True)

    run_main(main)
"""


@pytest.mark.slow
def test_nan_on_one_rank_is_seen_by_every_rank(tmp_path):
    """A NaN in rank 1's third batch only: with train.max_bad_steps 0 both ranks stop at the same step, with 1 both
    skip it."""
    result, _ = launch_script(tmp_path, NAN_ON_RANK_1, nproc=2, args=("0", "1"))
    assert result.returncode == 0, result.stderr
    # The two ranks share the pipe and their lines can interleave: count occurrences rather than split lines.
    out = result.stdout
    # 0: found at the log interval, step 4, by the one loss all-reduce
    message = ("stopped: non-finite training loss (mean nan since the last record) at epoch 0, step 4; the "
               "checkpoints on disk are from before it and untouched.")
    assert all(out.count(f"RESULT 0 rank={r} {message}") == 1 for r in (0, 1)), out
    # 1: found at step 3 on both ranks and skipped; the replicas stay identical and finite
    assert "non-finite loss on 1 of 2 processes at epoch 0, step 3: step skipped" in out
    norms = [re.search(f"RESULT 1 rank={r} steps=4 bad=1 norm=([0-9.e+-]+)", out).group(1) for r in (0, 1)]
    assert norms[0] == norms[1], out


def test_on_a_device_a_training_step_of_the_imagenet_recipe_never_waits_for_it():
    """On an accelerator (simulated: tests/simulated_device.py) each training step of the imagenet recipe (flip,
    RandAugment, normalise, erase, mixup/cutmix, drop path, channels_last, EMA, the loop's bookkeeping) copies the
    batch and one buffer of augmentation parameters to the device, none of it waiting there, and reads nothing back
    but at the log step; evaluation (with the confusion matrix) copies each batch and reads back only at the end.
    Only the first use of a normalisation copies its mean/std to the device."""
    cfg = load_config(os.path.join(ROOT, "configs", "convnext_t.yaml"), [
        "train.amp=none", "data.img_size=32", "data.batch_size=8", "train.global_batch=0", "ema.every=1"])
    train_transform, eval_transform = batch_transforms(cfg.data, cfg.aug, MEAN, STD)
    data = SimpleNamespace(steps_per_epoch=5, info=SimpleNamespace(num_classes=10), train_transform=train_transform)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(40) % 10
    batches = DataLoader(TensorDataset(images, labels), batch_size=8)
    device, steps = torch.device(DEVICE), []
    with SimulatedDevice() as sim:
        model = create_model("convnext_atto", num_classes=10, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16),
                             drop_path=0.1).to(device)
        parts = build_parts(cfg, model, data, device, world_size=1)[0]
        # fused AdamW has no kernel for the simulated device; foreach AdamW steps through the same loop
        parts.optimizer = torch.optim.AdamW([{k: v for k, v in group.items() if k != "fused"}
                                             for group in parts.optimizer.param_groups], foreach=True)
        sim.clear()
        train_one_epoch(parts, batches, RunState(), logger=RunLogger("", enabled=False), log_every=100,
                        global_batch=8, on_step=lambda: steps.append((sim.copies[:], sim.syncs[:])) or sim.clear())
        evaluate(model, batches, device, channels_last=True, num_classes=10, batch_transform=eval_transform)
        evaluation = (sim.copies[:], sim.syncs[:])
    assert len(steps) == 5
    for i, (copies, syncs) in enumerate(steps):
        batch = [c for c in copies if c[2].startswith("loop.py")]
        assert len(batch) == 2 and all(non_blocking for _, non_blocking, _ in batch), copies  # images, labels
        assert len(copies) - 2 == (3 if i == 0 else 1), copies  # the first step copies mean/std there too
        assert syncs == [] or i == 4 and all(where.startswith("loop.py") for _, where in syncs), (i, syncs)
    copies, syncs = evaluation
    batch = [c for c in copies if c[2].startswith("loop.py")]
    assert len(batch) == 10 and all(non_blocking for _, non_blocking, _ in batch) and len(copies) == 12, copies
    assert len(syncs) == 2 and all(where.startswith("loop.py") for _, where in syncs), syncs  # totals, confusion
