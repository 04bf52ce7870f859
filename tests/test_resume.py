"""Exact resume: 2-process runs interrupted mid-epoch (the whole run SIGKILLed during a checkpoint write, SIGTERM,
one worker SIGKILLed under elastic torchrun) and restarted end bitwise equal to an uninterrupted one."""
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from shards import write_shards
from testbed import folder_as_parquet, make_jpeg_testbed
from engine.checkpointing import last_checkpoint
from helpers import DEBUG, ROOT, assert_same_weights, offline_caches, run

pytestmark = pytest.mark.slow

# 128 images / (16 x 2 processes) = 4 steps an epoch, 16 in all; checkpoints at every 2nd step, so step 6 is
# one in the middle of epoch 1. Augmentation, mixup/cutmix, drop path and EMA all stay on; 2 loader workers a
# rank, whose augmentation is seeded by (seed, epoch, sample), not by the worker's history. (Loading in the
# training process, the GPU check's dry run and the SLURM test resume exactly.)
EXACT = ["data.synthetic_train_size=128", "schedule.epochs=4", "train.deterministic=true",
         "checkpoint.every_steps=2", "checkpoint.keep_last=3", "data.num_workers=2",
         "model.depths=[1,1,1,1]", "model.dims=[16,32,48,64]"]  # a smaller model: resuming does not depend on its size


def assert_same_as_reference(out, reference):
    """The run in `out` ended, after its 4 epochs, with the reference's weights bit for bit."""
    resumed = last_checkpoint(out)
    assert reference["epoch"] == resumed["epoch"] == 4
    assert_same_weights(reference, resumed)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_run(out, launcher=(), standalone=True, env=None, extra=()):
    """The EXACT run under torchrun, in the background (2 workers unless `launcher` says otherwise)."""
    default = ["--standalone", "--nproc_per_node=2"] if standalone else []
    cmd = [sys.executable, "-m", "torch.distributed.run", *default, *launcher, "train.py",
           "--config", DEBUG, f"output_dir={out}"] + EXACT + list(extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc, out, timeout=900):
    """The run's output once it ends; a run still going after `timeout` is killed (workers too) and fails the test."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        subprocess.run(["pkill", "-KILL", "-f", f"output_dir={out}"], check=False)
        pytest.fail(f"still running after {timeout}s:\n{proc.communicate()[0][-3000:]}")


def wait_for(path, proc):
    deadline = time.time() + 240
    while not os.path.exists(path) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def jpeg_workers(tmp_path_factory):
    """The imagenet recipe on 64 ImageNet-like JPEGs (4 steps an epoch again), decoded and augmented in 2 loader
    workers, normalised and erased on the device; train/ only, as ImageNet-22K: no evaluation, no best.pth."""
    root = str(tmp_path_factory.mktemp("jpegs"))
    make_jpeg_testbed(root, num_images=64, num_classes=4, seed=0)
    return ["data.name=imagefolder", f"data.root={root}", "data.recipe=imagenet", "data.batch_size=8",
            "data.num_workers=2", "train.eval_every=0"]


@pytest.fixture(scope="module")
def shard_workers(tmp_path_factory, jpeg_workers):
    """The same JPEGs in tar shards, in the folder's order: sample i of the shards is sample i of the folder, so the
    run must end equal to the folder's."""
    folder = jpeg_workers[1].split("=", 1)[1]
    shards = str(tmp_path_factory.mktemp("shards"))
    write_shards(folder, shards, shard_size=10, shuffle=False)
    return ["data.name=shards", f"data.root={shards}", *jpeg_workers[2:]]


@pytest.fixture(scope="module")
def hf_workers(tmp_path_factory, jpeg_workers):
    """The same JPEGs as a Hugging Face data set of parquet files, rows in the folder's order, first loaded (and
    converted to Arrow by rank 0) by the run itself; the run must end equal to the folder's."""
    pytest.importorskip("datasets", reason="the optional hf extra (make test installs it)")
    root = tmp_path_factory.mktemp("hf")
    folder_as_parquet(jpeg_workers[1].split("=", 1)[1], str(root / "parquet"), rows_per_file=20)
    with pytest.MonkeyPatch.context() as patch:
        offline_caches(patch, str(root))
        yield ["data.name=hf", f"data.hf_name={root / 'parquet'}", *jpeg_workers[2:]]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """The uninterrupted run the tests compare against, as two torchrun "nodes" of one process each meeting through
    c10d rendezvous: every run of 2 processes on one node resumed below must end equal to it. Returns the outputs of
    both nodes and the last checkpoint."""
    out = str(tmp_path_factory.mktemp("ref"))
    port = free_port()
    nodes = [start_run(out, launcher=["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                                      f"--rdzv_endpoint=127.0.0.1:{port}", f"--node_rank={rank}", "--rdzv_id=test"],
                       standalone=False) for rank in (0, 1)]
    outputs = [finish(node, out) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [o[-2000:] for o in outputs]
    return outputs, last_checkpoint(out)


@pytest.fixture(scope="module")
def reference(two_nodes):
    return two_nodes[1]


@pytest.fixture(scope="module")
def reference_with_jpeg_workers(tmp_path_factory, jpeg_workers):
    ref = str(tmp_path_factory.mktemp("ref_jpeg_workers"))
    run(["train.py", "--config", DEBUG, f"output_dir={ref}"] + EXACT + jpeg_workers, nproc=2)
    return last_checkpoint(ref)


def kill_run(out, held=None):
    """SIGKILL the run: torchrun starts its workers in sessions of their own, so kill by command line (torchrun and
    both workers); rank 0's checkpoint writer dies with rank 0. A tracer holding the writer (`held`: the tracer, the
    writer's pid and rank 0's) lets go only once rank 0 has ended, so the writer's SIGKILL is already pending:
    earlier, the held write would run on to its end."""
    writers = writers_of(out)
    subprocess.run(["pkill", "-KILL", "-f", f"output_dir={out}"], check=False)
    if held is not None:
        tracer, writer, rank0 = held
        while parent_of(writer) == rank0:  # the kernel sends the parent-death signal as it reparents the writer
            time.sleep(0.02)
        tracer.kill()
        tracer.wait()
    while any(os.path.exists(f"/proc/{pid}") for pid in writers):
        time.sleep(0.05)


def writers_of(out):
    """The checkpoint writer processes of the run writing to `out` (children of its rank 0)."""
    writers = subprocess.run(["pgrep", "-f", "engine[.]checkpointing [0-9]"], capture_output=True,
                             text=True).stdout.split()
    return [pid for pid in writers if f"output_dir={out}" in command_line(parent_of(pid))]


def hold_the_second_write(out, proc):
    """Hold rank 0's checkpoint writer in its third fsync from its start on, the one of the second checkpoint's
    temporary file (each write fsyncs its file, then the folder: core.files.atomic_write); strace delays the call by
    10 minutes, so that write stays a half-done temporary file for as long as the test needs. The writer starts with
    the run, seconds before its first save: counting from there, the held call cannot be another one, however fast
    the steps come."""
    if shutil.which("strace") is None:
        pytest.skip("needs strace (Debian: strace; make test installs it)")
    deadline = time.time() + 240
    while not (ours := writers_of(out)) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before its checkpoint writer started"
        time.sleep(0.02)
    assert len(ours) == 1, ours
    tracer = subprocess.Popen(["strace", "-qq", "-f", "-e", "trace=fsync", "-e",
                               "inject=fsync:delay_enter=600000000:when=3+", "-o", "/dev/null", "-p", ours[0]],
                              stderr=subprocess.PIPE, text=True)
    while tracer.poll() is None and tracer_of(ours[0]) in ("0", ""):
        time.sleep(0.002)
    folder = os.path.join(out, "checkpoints")  # what had begun when the count started (later writes are counted)
    begun = [name for name in os.listdir(folder) if "step_" in name] if os.path.isdir(folder) else []
    try:
        error = tracer.communicate(timeout=2)[1]  # strace stays until the writer ends: leaving at once is a failure
    except subprocess.TimeoutExpired:
        assert not begun, f"attached only after the first write began: {begun}"
        return tracer, ours[0], parent_of(ours[0])
    kill_run(out)
    pytest.skip(f"strace cannot hold the writer here (ptrace not allowed?): {error.strip()}")


def proc_text(pid: str, name: str) -> str:
    """/proc/<pid>/<name> ("" once the process has gone)."""
    try:
        with open(f"/proc/{pid}/{name}") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def parent_of(pid: str) -> str:
    """`pid`'s parent ("" once it has gone)."""
    stat = proc_text(pid, "stat")
    return stat.rsplit(")", 1)[1].split()[1] if stat else ""  # the field after the state, past the command's ( )


def tracer_of(pid: str) -> str:
    """The pid tracing `pid` ("0": none; "" once it has gone)."""
    lines = proc_text(pid, "status").splitlines()
    return next((line.split()[1] for line in lines if line.startswith("TracerPid:")), "")


def command_line(pid: str) -> str:
    """`pid`'s command line ("" once it has gone)."""
    return proc_text(pid, "cmdline").replace("\0", " ")


def test_sigkill_during_a_checkpoint_write_then_resume_is_bitwise_identical(tmp_path, reference):
    """Synthetic images in loader workers, the whole run killed while a checkpoint's background write is in flight:
    the restart removes the half-written file and resumes from the checkpoint before it."""
    out = str(tmp_path / "killed")
    folder = os.path.join(out, "checkpoints")
    proc = start_run(out)
    held = hold_the_second_write(out, proc)
    unfinished = os.path.join(folder, ".step_000000004.pth.*.tmp")
    deadline = time.time() + 240
    while not glob.glob(unfinished) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before a write could be held"
        time.sleep(0.02)
    assert glob.glob(unfinished), "no write was held"
    kill_run(out, held)
    proc.wait()
    held = os.path.basename(glob.glob(unfinished)[0])
    newest = sorted(glob.glob(os.path.join(folder, "step_*.pth")))[-1]
    assert torch.load(newest, weights_only=True)["epoch"] < 4, "the kill came too late to test anything"

    proc = run(["train.py", "--config", DEBUG, f"output_dir={out}"] + EXACT, nproc=2)
    assert f"resumed from {newest}" in proc.stdout, proc.stdout
    assert held[1:].split(".pth")[0] > os.path.basename(newest), (held, newest)  # the held one was newer
    assert f"removed 1 unfinished checkpoint file(s) of an interrupted write: {held}" in proc.stdout
    assert_same_as_reference(out, reference)
    assert "best.pth" in os.listdir(folder)


# The imagenet recipe (its erasing draws on the device come from the checkpointed generator) on the JPEGs as tar
# shards and as a Hugging Face data set, each interrupted in its own way and resumed, must end equal to the
# uninterrupted run on their image folder; training sets without a validation split, as ImageNet-22K's.

def test_sigterm_stops_every_rank_at_one_step_then_resumes_exactly(tmp_path, reference_with_jpeg_workers,
                                                                   shard_workers):
    """Preemption, on tar shards: torchrun forwards SIGTERM to both workers; they agree on a step, checkpoint it and
    exit; started again, the run resumes there."""
    out = str(tmp_path / "preempted")
    proc = start_run(out, extra=shard_workers)
    wait_for(os.path.join(out, "checkpoints", "step_000000004.pth"), proc)
    proc.send_signal(signal.SIGTERM)
    output = finish(proc, out)
    assert "stopped by a signal at epoch" in output, output
    steps = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "checkpoints", "step_*.pth")))
    stop_state = torch.load(os.path.join(out, "checkpoints", steps[-1]), weights_only=True)
    assert stop_state["epoch"] < 4 and stop_state["step"] % 5 == 0, (steps, stop_state["step"])
    proc = run(["train.py", "--config", DEBUG, f"output_dir={out}"] + EXACT + shard_workers, nproc=2)
    assert "resumed from" in proc.stdout, proc.stdout
    assert_same_as_reference(out, reference_with_jpeg_workers)
    assert "best.pth" not in os.listdir(os.path.join(out, "checkpoints"))


def test_elastic_restart_after_a_worker_is_killed(tmp_path, reference_with_jpeg_workers, hf_workers):
    """torchrun --max-restarts, on the hub set: one worker SIGKILLed mid-epoch; torchrun restarts the group, which
    resumes by itself.

    Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 about one restart in four failed to connect here: the restarted
    workers read the previous round's gloo addresses from torchrun's shared store (pytorch/pytorch#135712).
    """
    out = str(tmp_path / "elastic")
    proc = start_run(out, launcher=["--max-restarts=1"], env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
                     extra=hf_workers)
    wait_for(os.path.join(out, "checkpoints", "step_000000006.pth"), proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    output = finish(proc, out)
    assert proc.returncode == 0, output[-3000:]
    assert "resumed from" in output, output[-3000:]
    assert_same_as_reference(out, reference_with_jpeg_workers)
    assert "best.pth" not in os.listdir(os.path.join(out, "checkpoints"))


def test_two_nodes_train_as_one_node_of_two(two_nodes):
    """The reference run itself: two nodes of one process each make one world of 2 (and the runs above, one node of
    2 processes, end with its weights)."""
    outputs, last = two_nodes
    assert "torchrun: world 2" in outputs[0] + outputs[1]
    assert last["epoch"] == 4
