"""The project's own sbatch script under a real one-node SLURM (scripts/ci/local_slurm.sh), 2 tasks on CPU/gloo.

Skipped when SLURM cannot be started here (not installed, not root); .ci/run installs and starts it.
"""
import os
import subprocess
import sys
import time

import pytest

from engine.checkpointing import last_checkpoint
from engine.logging import read_metrics
from helpers import DEBUG, ROOT, assert_same_weights

pytestmark = pytest.mark.slow

LOCAL_SLURM = os.path.join(ROOT, "scripts", "ci", "local_slurm.sh")
# 2048 images / (16 x 2 tasks) = 64 steps an epoch, 192 in all, of a model smaller than debug.yaml's (requeueing
# does not depend on its size); step checkpoints every 20 steps.
RUN = ["data.synthetic_train_size=2048", "schedule.epochs=3", "train.deterministic=true",
       "checkpoint.every_steps=20", "checkpoint.keep_last=2", "train.log_every=16",
       "model.depths=[1,1,1,1]", "model.dims=[16,32,48,64]"]
CPU_TASKS = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]


@pytest.fixture(scope="module")
def slurm():
    """SLURM_CONF of a running local cluster: the one already up, or one started (and stopped) here."""
    state = os.environ.get("LOCAL_SLURM_DIR", "/tmp/local-slurm")
    was_up = subprocess.run(["bash", LOCAL_SLURM, "status", state], capture_output=True).returncode == 0
    # Tests never install packages: LOCAL_SLURM_NO_INSTALL. `make slurm` (and .ci/run) does that.
    started = subprocess.run(["bash", LOCAL_SLURM, "start", state], capture_output=True, text=True,
                             env={**os.environ, "LOCAL_SLURM_NO_INSTALL": "1"})
    if started.returncode != 0:
        reason = (started.stderr.strip().splitlines() or ["start failed"])[-1]
        pytest.skip(f"no local SLURM ({reason}); `make slurm` installs and starts one")
    yield os.path.join(state, "slurm.conf")
    if not was_up:
        subprocess.run(["bash", LOCAL_SLURM, "stop", state], capture_output=True)


def submit(slurm, out, sbatch_options, overrides=()):
    env = {**os.environ, "SLURM_CONF": slurm, "PYTHON": sys.executable}
    cmd = ["sbatch", "--parsable", *CPU_TASKS, *sbatch_options, f"--output={out}.log",
           os.path.join("scripts", "slurm", "train.sbatch"), DEBUG, f"output_dir={out}", *RUN, *overrides]
    job = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()
    return job.split(";")[0]


def job_fields(slurm, job):
    """scontrol's view of the job as {field: value}; {} once it has left slurmctld's memory (MinJobAge)."""
    shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True,
                           env={**os.environ, "SLURM_CONF": slurm})
    return dict(f.split("=", 1) for f in shown.stdout.split() if "=" in f) if shown.returncode == 0 else {}


def wait_job(slurm, job, on_poll=None, timeout=900):
    """Poll until the job has ended; returns the last fields seen (JobState, Restarts, ...)."""
    last, deadline = {}, time.time() + timeout
    while time.time() < deadline:
        fields = job_fields(slurm, job)
        if not fields or fields["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return fields or last
        last = fields
        if on_poll:
            on_poll(fields)
        time.sleep(0.5)
    subprocess.run(["scancel", job], env={**os.environ, "SLURM_CONF": slurm})
    pytest.fail(f"job {job} still {last.get('JobState')} after {timeout}s")


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("slurm") / "plain")
    job = submit(slurm, out, ["--time=10"])
    return out, wait_job(slurm, job)


def test_sbatch_job_trains_with_two_tasks(uninterrupted):
    out, fields = uninterrupted
    log = open(out + ".log", errors="replace").read()  # a killed run can cut a character
    assert fields["JobState"] == "COMPLETED", log[-3000:]
    assert "slurm: world 2 on cpu (gloo backend)" in log, log[-3000:]
    assert [r["epoch"] for r in read_metrics(out, "eval")] == [0, 1, 2]
    assert read_metrics(out, "train")[-1]["step"] == 192
    names = set(os.listdir(os.path.join(out, "checkpoints")))
    assert {"last.pth", "best.pth", "step_000000192.pth"} <= names, names


def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm, uninterrupted, tmp_path):
    """USR1 to the batch shell, as train.sbatch's `--signal=B:USR1@120` has SLURM send it before a time limit.
    scancel sends it here once training is under way: a time limit's signal comes only at slurmctld's next check,
    up to 30 s late, and the run would have to outlast that."""
    out = str(tmp_path / "preempted")
    job = submit(slurm, out, ["--time=10", "--requeue"])
    signalled = []

    def signal_once_training(fields):
        first_checkpoint = os.path.join(out, "checkpoints", "step_000000020.pth")
        if not signalled and fields["Restarts"] == "0" and os.path.exists(first_checkpoint):
            subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True,
                           env={**os.environ, "SLURM_CONF": slurm})
            signalled.append(fields)

    fields = wait_job(slurm, job, on_poll=signal_once_training)
    log = open(out + ".log", errors="replace").read()  # a killed run can cut a character
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", (fields, log[-3000:])
    for line in ("USR1 received", "stopped by a signal at epoch", f"requeueing job {job}", f"job {job} run 2",
                 "resumed from"):
        assert line in log, (line, log[-3000:])
    reference, resumed = last_checkpoint(uninterrupted[0]), last_checkpoint(out)
    assert reference["step"] == resumed["step"] == 192
    assert_same_weights(reference, resumed)
