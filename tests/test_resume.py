"""Exact resume: a 2-process run SIGKILLed mid-epoch and restarted ends bitwise equal to an uninterrupted one."""
import glob
import os
import subprocess
import sys
import time

import pytest
import torch

from test_train_e2e import DEBUG, ROOT, run

pytestmark = pytest.mark.slow

# 128 images / (16 x 2 processes) = 4 steps an epoch, 16 in all; checkpoints at every 2nd step, so step 6 is
# one in the middle of epoch 1. Augmentation, mixup/cutmix, drop path and EMA all stay on.
EXACT = ["data.synthetic_train_size=128", "schedule.epochs=4", "train.deterministic=true",
         "checkpoint.every_steps=2", "checkpoint.keep_last=3"]


def final_weights(out):
    state = torch.load(os.path.join(out, "checkpoints", "last.pth"), weights_only=True)
    return state["epoch"], state["model"], state["model_ema"]


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    run(["train.py", "--config", DEBUG, f"output_dir={ref}"] + EXACT, nproc=2)

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--config", DEBUG, f"output_dir={out}"] + EXACT
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while not glob.glob(os.path.join(out, "checkpoints", "step_000000006.pth")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    # torchrun starts its workers in sessions of their own, so kill by command line: torchrun and both workers.
    subprocess.run(["pkill", "-KILL", "-f", f"output_dir={out}"], check=False)
    proc.wait()
    while subprocess.run(["pgrep", "-f", f"output_dir={out}"], capture_output=True).returncode == 0:
        time.sleep(0.05)
    newest = sorted(glob.glob(os.path.join(out, "checkpoints", "step_*.pth")))[-1]
    assert torch.load(newest, weights_only=True)["epoch"] < 4, "the kill came too late to test anything"

    proc = run(["train.py", "--config", DEBUG, f"output_dir={out}"] + EXACT, nproc=2)
    assert "resumed from" in proc.stdout, proc.stdout
    (epoch_a, model_a, ema_a), (epoch_b, model_b, ema_b) = final_weights(ref), final_weights(out)
    assert epoch_a == epoch_b == 4
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), name
        assert torch.equal(ema_a[name], ema_b[name]), name
