import os
import pickle

import pytest
import torch

from engine.checkpoint import CheckpointError, find_resume, load_checkpoint, save_checkpoint


def test_save_and_load(tmp_path):
    path = tmp_path / "checkpoints" / "last.pth"
    save_checkpoint({"model": {"w": torch.arange(3.0)}, "epoch": 2}, str(path))
    state = load_checkpoint(str(path))
    assert state["epoch"] == 2 and torch.equal(state["model"]["w"], torch.arange(3.0))
    assert find_resume(str(tmp_path)) == str(path)
    assert os.listdir(path.parent) == ["last.pth"]  # no temporary file left behind


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pth")
    save_checkpoint({"epoch": 1}, path)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pth"]


def test_truncated_checkpoint_is_reported(tmp_path):
    path = tmp_path / "last.pth"
    save_checkpoint({"model": {"w": torch.zeros(1000)}}, str(path))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_checkpoint(str(path))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pth"))
    assert find_resume(str(tmp_path)) is None


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": _RunsCode(str(marker))}, str(path), pickle_module=pickle)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_checkpoint(str(path))
    assert not marker.exists()
