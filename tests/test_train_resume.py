"""train.py's resume path in one process: what it restores, what it lets go of, and fp16 over a non-fp16 run."""
import gc
import weakref

import torch

import train
from core.config import Config
from test_loop import loader, parts_for, run_epoch, tiny_model


def written_checkpoint(amp: str) -> dict:
    """A checkpoint as train.py writes it, of a tiny model trained one epoch with `amp`."""
    parts = parts_for(tiny_model(), amp=amp)
    run_epoch(parts, loader(8))
    return train.checkpoint_state(parts, Config(), train.Progress(epoch=1, step=4))


def test_resume_with_fp16_from_a_checkpoint_without_fp16_starts_a_fresh_scaler(capsys):
    state = written_checkpoint("none")
    assert state["scaler"] == {}  # a disabled GradScaler's state, which an enabled one refuses to load
    parts = parts_for(tiny_model(seed=1), amp="fp16")
    progress = train.restore(parts, state, rank=0, world_size=1)
    assert (progress.epoch, progress.step) == (1, 4)
    assert parts.scaler.is_enabled() and parts.scaler.get_scale() == 2.0**16
    assert "no gradient scaler state; the fp16 scaler starts afresh" in capsys.readouterr().out
    run_epoch(parts, loader(8))  # and it trains on


def test_resume_restores_the_scale_of_an_fp16_checkpoint():
    state = written_checkpoint("fp16")
    parts = parts_for(tiny_model(seed=1), amp="fp16")
    train.restore(parts, state, rank=0, world_size=1)
    assert parts.scaler.get_scale() == state["scaler"]["scale"]


def test_the_loaded_checkpoint_is_released_once_restored(monkeypatch):
    """16 bytes a parameter of host memory on every rank (5.6 GB for XL): not to be kept for the whole run."""
    state = written_checkpoint("none")
    weights = [weakref.ref(t) for t in state["model"].values()]
    monkeypatch.setattr(train, "load_checkpoint", lambda path, state=[state]: state.pop())
    del state
    parts = parts_for(tiny_model(seed=1))
    progress = train.resume(parts, "given.pth", "unused", rank=0, world_size=1)
    gc.collect()
    assert progress.step == 4 and all(ref() is None for ref in weights)
