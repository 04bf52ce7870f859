"""The checkpointer in one process: what a checkpoint holds and restores, what resuming lets go of, fp16 over a
non-fp16 run, and writes in the background: their failures, the stale files of a killed write, at most one in
flight."""
import gc
import os
import shutil
import weakref

import pytest
import torch

import engine.checkpointing.checkpointer as checkpointer_module
from core.config import CheckpointCfg, Config, to_dict
from core.errors import CheckpointError, NonFiniteLoss
from core.files import load_checkpoint
from engine.checkpointing import Checkpointer, RunState
from helpers import loader, parts_for, run_epoch, tiny_model, tmpfs


def checkpointer_for(parts, output_dir="unused", run=None, **cfg) -> Checkpointer:
    return Checkpointer(str(output_dir), CheckpointCfg(**cfg), run or RunState(), model=parts.raw_model,
                        ema=parts.ema, optimizer=parts.optimizer, scaler=parts.scaler, config=to_dict(Config()),
                        class_names=["cat", "dog"])


def written_checkpoint(amp: str) -> dict:
    """A checkpoint's content, of a tiny model trained one epoch with `amp`."""
    parts = parts_for(tiny_model(), amp=amp)
    run = run_epoch(parts, loader(8))
    run.end_epoch()
    with checkpointer_for(parts, run=run, background=False) as checkpoints:
        return checkpoints.state_dict()


def test_resume_with_fp16_from_a_checkpoint_without_fp16_starts_a_fresh_scaler(capsys):
    state = written_checkpoint("none")
    assert state["scaler"] == {}  # a disabled GradScaler's state, which an enabled one refuses to load
    parts, run = parts_for(tiny_model(seed=1), amp="fp16"), RunState()
    checkpointer_for(parts, run=run, background=False).load_state_dict(state)
    assert (run.epoch, run.step, run.epoch_samples) == (1, 4, 0)
    assert parts.scaler.is_enabled() and parts.scaler.get_scale() == 2.0**16
    assert "no gradient scaler state; the fp16 scaler starts afresh" in capsys.readouterr().out
    run_epoch(parts, loader(8))  # and it trains on


def test_resume_restores_the_scale_of_an_fp16_checkpoint():
    state = written_checkpoint("fp16")
    parts = parts_for(tiny_model(seed=1), amp="fp16")
    checkpointer_for(parts, background=False).load_state_dict(state)
    assert parts.scaler.get_scale() == state["scaler"]["scale"]


def test_the_loaded_checkpoint_is_released_once_restored(monkeypatch):
    """16 bytes a parameter of host memory on every rank (5.6 GB for XL): not to be kept for the whole run."""
    state = written_checkpoint("none")
    weights = [weakref.ref(t) for t in state["model"].values()]
    monkeypatch.setattr(checkpointer_module, "load_checkpoint", lambda path, state=[state]: state.pop())
    del state
    parts, run = parts_for(tiny_model(seed=1)), RunState()
    assert checkpointer_for(parts, run=run, background=False).resume("given.pth")
    gc.collect()
    assert run.step == 4 and all(ref() is None for ref in weights)


@pytest.mark.parametrize("background", [False, True])
def test_a_saved_run_resumes_to_the_same_state(tmp_path, background):
    parts, run = parts_for(tiny_model()), RunState()
    run_epoch(parts, loader(8))
    run.step, run.epoch_samples, run.wandb_id = 4, 32, "abc"
    with checkpointer_for(parts, tmp_path, run, background=background) as checkpoints:
        checkpoints.save()
        expected = {k: v.clone() for k, v in parts.raw_model.state_dict().items()}
        run_epoch(parts, loader(8))  # trains on while the write is in flight: the checkpoint keeps the saved state
    saved = load_checkpoint(str(tmp_path / "checkpoints" / "last.pth"))
    assert all(torch.equal(saved["model"][k], v) for k, v in expected.items())
    assert (saved["step"], saved["epoch_samples"], saved["wandb_id"]) == (4, 32, "abc")
    assert saved["class_names"] == ["cat", "dog"]  # what predict.py and the exports name the outputs by
    other, again = parts_for(tiny_model(seed=1)), RunState()
    assert checkpointer_for(other, tmp_path, again, background=False).resume()
    assert again == run and all(torch.equal(other.raw_model.state_dict()[k], v) for k, v in expected.items())
    assert torch.equal(other.optimizer.state_dict()["state"][0]["exp_avg"], saved["optimizer"]["state"][0]["exp_avg"])


@pytest.fixture
def small_disk(tmp_path):
    with tmpfs(tmp_path / "disk", "16m") as mount:
        yield mount


def test_a_full_disk_during_a_background_write_stops_the_run_in_one_line_and_keeps_the_last(small_disk):
    parts = parts_for(tiny_model())
    run = run_epoch(parts, loader(8))
    folder = small_disk / "checkpoints"
    checkpoints = checkpointer_for(parts, small_disk, run, background=True, keep_last=1)
    checkpoints.save()
    checkpoints.wait()
    room = shutil.disk_usage(small_disk).free - os.path.getsize(folder / "last.pth") // 2
    (small_disk / "filler").write_bytes(bytes(room))  # room for half a checkpoint
    run.step = 5
    checkpoints.save()  # returns at once; the write fails in the background
    run.step = 6
    no_space = r"cannot write '.*step_000000005\.pth' \(No space left on device\); the previous file there is untouched"
    with pytest.raises(CheckpointError, match=no_space):
        checkpoints.save()  # the next save reports it
    assert sorted(os.listdir(folder)) == ["last.pth", "step_000000004.pth"]
    with pytest.raises(CheckpointError, match=no_space.replace("5", "6")):
        with checkpoints:
            checkpoints.save()  # and leaving the run waits for the write and reports it too
    assert load_checkpoint(str(folder / "last.pth"))["step"] == 4


def test_non_finite_weights_are_never_written(tmp_path):
    """save() refuses before any writer sees the state, so the inline writer proves it for both; a background writer
    refusing in a whole run: test_train_e2e's diverging run."""
    parts = parts_for(tiny_model())
    run = run_epoch(parts, loader(8))
    with torch.no_grad():
        parts.raw_model.head.bias.fill_(float("nan"))
    with checkpointer_for(parts, tmp_path, run, background=False) as checkpoints:
        with pytest.raises(NonFiniteLoss, match="non-finite before the checkpoint at epoch 0, step 4; nothing was"):
            checkpoints.save()
    assert not os.path.exists(tmp_path / "checkpoints" / "last.pth")


def test_a_killed_writes_leftovers_are_removed_before_the_next_write(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in (".step_000000006.pth.abc123.tmp", "last.pth.4242.link", "step_000000004.pth"):
        (folder / name).write_bytes(b"x")
    checkpointer_for(parts_for(tiny_model()), tmp_path, background=False)
    assert os.listdir(folder) == ["step_000000004.pth"]
    assert "removed 2 unfinished checkpoint file(s)" in capsys.readouterr().out
