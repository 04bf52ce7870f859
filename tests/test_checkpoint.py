import os
import pickle

import pytest
import torch

from core.errors import CheckpointError
from core.files import load_checkpoint, save_checkpoint
from engine.checkpointing.files import best_files, load_latest, resume_candidates, save_training_checkpoint
from helpers import tmpfs


def test_save_and_load(tmp_path):
    path = tmp_path / "checkpoints" / "last.pth"
    save_checkpoint({"model": {"w": torch.arange(3.0)}, "epoch": 2}, str(path))
    state = load_checkpoint(str(path))
    assert state["epoch"] == 2 and torch.equal(state["model"]["w"], torch.arange(3.0))
    assert os.listdir(path.parent) == ["last.pth"]  # no temporary file left behind


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pth")
    save_checkpoint({"epoch": 1}, path)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous file there is untouched"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pth"]


@pytest.fixture
def tiny_disk(tmp_path):
    with tmpfs(tmp_path / "disk", "256k") as mount:
        yield mount


def test_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(tiny_disk):
    path = str(tiny_disk / "checkpoints" / "last.pth")
    save_checkpoint({"w": torch.ones(16_000)}, path)  # 64 KB: fits
    with pytest.raises(CheckpointError, match="No space left on device.*the previous file there is untouched"):
        save_checkpoint({"w": torch.zeros(64_000)}, path)  # 256 KB: does not
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(16_000))
    assert os.listdir(os.path.dirname(path)) == ["last.pth"]  # no temporary file left behind


def test_truncated_checkpoint_is_reported(tmp_path):
    path = tmp_path / "last.pth"
    save_checkpoint({"model": {"w": torch.zeros(1000)}}, str(path))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_checkpoint(str(path))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pth"))
    assert resume_candidates(str(tmp_path)) == [] and load_latest(str(tmp_path), print) is None


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


def test_keep_last_and_links(tmp_path):
    out = str(tmp_path)
    for step in (10, 20, 30):
        save_training_checkpoint({"step": step}, out, step, keep_last=2, best=step == 20)
    folder = tmp_path / "checkpoints"
    assert sorted(os.listdir(folder)) == ["best.pth", "last.pth", "step_000000020.pth", "step_000000030.pth"]
    assert load_checkpoint(str(folder / "last.pth"))["step"] == 30
    assert load_checkpoint(str(folder / "best.pth"))["step"] == 20
    assert resume_candidates(out) == [str(folder / "step_000000030.pth"), str(folder / "step_000000020.pth")]


def test_keep_best_keeps_the_k_best_evaluated_checkpoints(tmp_path, monkeypatch):
    out, folder = str(tmp_path), tmp_path / "checkpoints"
    scores = {10: 50.0, 20: 70.5, 30: None, 40: 60.25, 50: 70.5, 60: 80.0}  # step 30 was not evaluated
    for step, score in scores.items():
        save_training_checkpoint({"step": step}, out, step, keep_last=1, score=score, keep_best=2)
    assert sorted(n for n in os.listdir(folder) if n.startswith("best_")) == [
        "best_top1_70.5000_step_000000020.pth", "best_top1_80.0000_step_000000060.pth"]  # a tie: the earlier stays
    assert [load_checkpoint(path)["step"] for _, path in best_files(str(folder))] == [60, 20]
    assert resume_candidates(out) == [str(folder / "step_000000060.pth")]  # resume looks at step files only
    # The new checkpoint is on disk before any best link is removed: a failed save removes nothing.
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(CheckpointError):
        save_training_checkpoint({"step": 70}, out, 70, keep_last=1, score=99.0, keep_best=2)
    assert len(best_files(str(folder))) == 2 and load_checkpoint(str(folder / "last.pth"))["step"] == 60


def test_corrupt_last_falls_back_to_the_newest_good_one(tmp_path):
    out = str(tmp_path)
    for step in (10, 20):
        save_training_checkpoint({"step": step}, out, step, keep_last=3)
    newest = tmp_path / "checkpoints" / "step_000000020.pth"
    newest.write_bytes(newest.read_bytes()[:100])  # last.pth is the same file: both are now truncated
    warnings = []
    path, state = load_latest(out, warnings.append)
    assert state["step"] == 10 and path.endswith("step_000000010.pth")
    assert len(warnings) == 1 and "step_000000020.pth" in warnings[0] and "falling back" in warnings[0]
    (tmp_path / "checkpoints" / "step_000000010.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="none of the checkpoints"):
        load_latest(out, warnings.append)


class FakeCuda:
    """torch.cuda's generator functions on a machine with `count` visible GPUs, this process's being `current`."""

    def __init__(self, monkeypatch, count: int, current: int):
        self.count, self.current, self.set_calls = count, current, []
        for name, fn in (("is_available", lambda: True), ("device_count", lambda: self.count),
                         ("current_device", lambda: self.current),
                         ("get_rng_state", lambda device="cuda": torch.tensor([self.current], dtype=torch.uint8)),
                         ("get_rng_state_all", lambda: [torch.tensor([i], dtype=torch.uint8) for i in range(count)]),
                         ("set_rng_state", lambda state, device="cuda": self.set_calls.append(int(state[0]))),
                         ("set_rng_state_all", lambda states: pytest.fail("restores by visible index"))):
            monkeypatch.setattr(torch.cuda, name, fn)


def test_rng_state_keeps_only_the_ranks_own_gpu_and_restores_it_there(monkeypatch):
    from engine.checkpointing.state import rng_state, set_rng_state

    cuda = FakeCuda(monkeypatch, count=8, current=5)  # torchrun: rank 5 of a node sees 8 GPUs, uses cuda:5
    state = rng_state()
    assert int(state["cuda_device"][0]) == 5 and "cuda" not in state
    cuda.count, cuda.current = 1, 0  # resumed under srun with one GPU per task: the same rank sees only its own
    set_rng_state(state)
    assert cuda.set_calls == [5]  # the rank's generator, into the rank's (only) device


def test_older_checkpoints_restore_the_ranks_entry_or_warn(monkeypatch):
    from engine.checkpointing.state import rng_state, set_rng_state

    cuda = FakeCuda(monkeypatch, count=8, current=3)
    old = {**rng_state(), "cuda": torch.cuda.get_rng_state_all()}
    del old["cuda_device"]
    set_rng_state(old)
    assert cuda.set_calls == [3]
    cuda.count, cuda.current = 1, 0
    warnings = []
    set_rng_state(old, warn=warnings.append)
    assert cuda.set_calls == [3] and "8 visible GPUs, this process sees 1" in warnings[0]


class RefusingCudart:
    """torch.cuda.cudart() where pinning is refused (a cap on locked memory, say)."""

    def __init__(self):
        self.register_calls = 0

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.register_calls += 1
        return 2  # cudaErrorMemoryAllocation

    def cudaHostUnregister(self, ptr):
        pytest.fail("unpins memory that was never pinned")

    def cudaGetErrorString(self, status):
        return "out of memory"


def test_a_refused_pin_clears_the_cuda_error_warns_once_and_writes_from_unpinned_memory(tmp_path, monkeypatch,
                                                                                         capsys):
    """CUDA keeps a failed call's error until someone reads it, and torch reads it after the next kernel launch:
    left set, it would fail an unrelated op of the training step."""
    from engine.checkpointing import writer as checkpoint_writer
    from engine.checkpointing.files import step_file

    cudart, cleared = RefusingCudart(), []
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(checkpoint_writer, "_cuda_get_last_error", lambda: lambda: cleared.append(1) or 2)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)  # the state is on the CPU here
    writer = checkpoint_writer.BackgroundWriter(cuda=True, expected_bytes=1000)
    try:
        state = {"w": torch.arange(5000.0), "step": 3}  # more than expected: the memory grows, unpinned
        writer.submit(state, checkpoint_writer.WriteJob(str(tmp_path), 3, keep_last=2))
        writer.wait()
        assert not writer.memory.pinned and writer.memory.nbytes >= state["w"].nbytes
    finally:
        writer.close()
    assert cudart.register_calls == 1 and cleared == [1]
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "refused to pin" in warnings[0] and "(out of memory)" in warnings[0]
    assert "checkpoint.background=false" in warnings[0]
    loaded = load_checkpoint(step_file(str(tmp_path), 3))
    assert torch.equal(loaded["w"], torch.arange(5000.0)) and loaded["step"] == 3


def test_a_cuda_error_that_cannot_be_cleared_stops_in_one_line(monkeypatch):
    from engine.checkpointing import writer as checkpoint_writer

    def missing():
        raise OSError("libtorch_cuda.so: cannot open shared object file")

    monkeypatch.setattr(torch.cuda, "cudart", RefusingCudart)
    monkeypatch.setattr(checkpoint_writer, "_cuda_get_last_error", missing)
    memory = checkpoint_writer.SharedMemory(pin=True)
    try:
        with pytest.raises(CheckpointError, match=r"refused to pin .*\(out of memory\), and the CUDA error it left "
                                                  r"cannot be cleared \(libtorch_cuda.so: .*background=false$"):
            memory.reserve(1000)
    finally:
        memory.close()


@pytest.mark.skipif(torch.version.cuda is None, reason="a torch built without CUDA has no CUDA runtime")
def test_the_cleared_error_is_that_of_the_cuda_runtime_torch_links():
    """Each copy of libcudart keeps its own error; torchvision's wheel bundles one of its own."""
    import ctypes
    from engine.checkpointing.writer import _cuda_get_last_error

    address = ctypes.cast(_cuda_get_last_error(), ctypes.c_void_p).value  # found, not called
    with open("/proc/self/maps") as f:
        files = [line.split()[-1] for line in f
                 if int(line.split("-")[0], 16) <= address < int(line.split()[0].split("-")[1], 16)]
    assert len(files) == 1 and os.path.basename(files[0]).startswith("libcudart.so"), files


def test_the_inline_writer_saves_host_tensors(tmp_path, monkeypatch):
    """An inline checkpoint of a CUDA run must load on a machine without one, like a background-written one: the
    state goes through to_host before torch.save."""
    from engine.checkpointing import writer as checkpoint_writer
    from engine.checkpointing.files import step_file

    passed = []
    real = checkpoint_writer.to_host
    monkeypatch.setattr(checkpoint_writer, "to_host", lambda tree: passed.append(tree) or real(tree))
    state = {"model": {"w": torch.ones(3, requires_grad=True)}, "optimizer": {"state": {0: [torch.zeros(2)]}}}
    checkpoint_writer.InlineWriter().submit(state, checkpoint_writer.WriteJob(str(tmp_path), 1, keep_last=1))
    assert len(passed) == 1 and passed[0] is state
    loaded = torch.load(step_file(str(tmp_path), 1), weights_only=True)
    tensors = checkpoint_writer.tensors_in(loaded)
    assert len(tensors) == 2 and all(t.device.type == "cpu" for t in tensors)
    copied = real(state)
    assert not copied["model"]["w"].requires_grad and torch.equal(copied["optimizer"]["state"][0][0], torch.zeros(2))
