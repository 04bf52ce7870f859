"""train_one_epoch and evaluate in one process: accumulation, EMA, precision, clipping, exact metrics."""
import copy

import pytest
import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from engine.logging import RunLogger
from engine.loop import TrainParts, evaluate, train_one_epoch
from engine.optim import create_optimizer
from engine.config import OptimCfg
from models import create_model


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return create_model("convnext_atto", num_classes=4, in_chans=1, patch_size=2, depths=(1, 1, 1, 1),
                        dims=(8, 16, 16, 16), layer_scale_init=0)


def loader(batch_size, n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


def parts_for(model, **kw):
    opt = create_optimizer(model, OptimCfg(weight_decay=0.05), lr=1e-2)
    defaults = dict(model=model, raw_model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(),
                    scaler=torch.amp.GradScaler("cpu", enabled=kw.get("amp") == "fp16"),
                    lr_fn=lambda step: 1e-2, device=torch.device("cpu"))
    return TrainParts(**{**defaults, **kw})


def run_epoch(parts, data, log_every=1):
    return train_one_epoch(parts, data, epoch=0, step=0, logger=RunLogger("", enabled=False),
                           log_every=log_every, global_batch=16)


def test_accumulation_equals_a_bigger_batch():
    big, small = tiny_model(), tiny_model()
    assert run_epoch(parts_for(big), loader(16)) == 2
    assert run_epoch(parts_for(small, accum_steps=2), loader(8)) == 2  # 4 micro-batches -> 2 optimizer steps
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_ema_follows_the_raw_weights():
    model = tiny_model()
    ema = ModelEmaV3(model, decay=0.9)
    parts, data = parts_for(model, ema=ema), loader(32)  # one batch: one optimizer step per epoch
    log = RunLogger("", enabled=False)
    # timm's convention (as in its train.py): the update at step 1 copies the weights, later ones average.
    assert train_one_epoch(parts, data, epoch=0, step=0, logger=log, log_every=1, global_batch=32) == 1
    first = copy.deepcopy(model.state_dict())
    for name, value in ema.module.state_dict().items():
        torch.testing.assert_close(value, first[name], msg=name)
    assert train_one_epoch(parts, data, epoch=1, step=1, logger=log, log_every=1, global_batch=32) == 2
    second = model.state_dict()
    assert any(not torch.equal(first[k], second[k]) for k in second)
    for name, value in ema.module.state_dict().items():
        torch.testing.assert_close(value, 0.9 * first[name] + 0.1 * second[name], msg=name)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_and_clipping_train(amp):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    run_epoch(parts_for(model, amp=amp, clip_grad=0.5, channels_last=True), loader(8))
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after)


def test_non_finite_loss_stops_with_the_step():
    model = tiny_model()
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="epoch 0, step 1"):
        run_epoch(parts_for(model), loader(8))


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
