"""scripts/gpu_check.sh: one line and exit 0 without CUDA; its dry run (every step, tiny, on the CPU) reports every
step ok or skipped with a reason, with its figures; a command that hangs fails its step instead of the check."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from test_train_e2e import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the real check would run")


def gpu_check_module():
    """scripts/gpu_check.py, loaded from its path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@no_cuda
def test_without_cuda_it_says_so_in_one_line_and_exits_0():
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to check"]


def test_a_hanging_command_fails_its_step_after_the_timeout(tmp_path):
    gc = gpu_check_module()
    check = gc.Check(dataclasses.replace(gc.DRY, timeout=1), str(tmp_path), dry=True)
    result = check.step("hang", check.run, "hang", ["-c", "import time; time.sleep(60)"])
    assert result["status"] == "failed" and "still running after 1 s" in result["error"]
    assert result["seconds"] < 30


@pytest.mark.slow
def test_dry_run_passes_every_step_on_the_cpu(tmp_path):
    proc = subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and summary["gpu_check"] == "ok" and summary["failed"] == [], proc.stdout
    assert summary["dry_run"] and summary["device"] == "cpu" and summary["torch"] == torch.__version__
    assert summary["date"] and summary["out"] == str(tmp_path)
    steps = summary["steps"]
    assert list(steps) == gpu_check_module().ORDER
    for name, result in steps.items():
        assert result["status"] in ("ok", "skipped"), (name, result)
        assert result["status"] == "ok" or result["reason"], name
    skipped = {name for name, result in steps.items() if result["status"] == "skipped"}
    # On the CPU: no NCCL, and no compiled runs (too slow for 2 cores); fp16 trains on the CPU too.
    assert skipped == {"ddp_nccl", "train_fp32_compile", "train_bf16_compile", "train_fp16_compile", "speed_compile"}
    for name in ("train_fp32", "train_bf16", "train_fp16", "ddp_gloo"):
        assert steps[name]["loss"] > 0 and steps[name]["img_per_s"] > 0 and steps[name]["checkpoints"] >= 2, name
    assert steps["train_fp16"]["grad_scale"] > 0  # fp16 trained with the gradient scaler
    assert steps["resume_bitwise"]["tensors_equal"] > 0 and steps["resume_bitwise"]["resumed_from_step"] == 2
    assert steps["eval_exact"]["samples"] == 101 and steps["eval_exact"]["top1"] >= 0
    speed = steps["speed"]
    for figure in ("bare_img_per_s", "trainer_img_per_s", "bare_mfu", "trainer_mfu", "bare_peak_mem_mb"):
        assert speed[figure] > 0, figure
    assert speed["amp"] == "bf16" and steps["eval_speed"]["img_per_s"] > 0 and steps["eval_speed"]["samples"] == 101
    # Every run wrote under --out: logs, run folders.
    assert os.path.isfile(tmp_path / "ddp_gloo" / "checkpoints" / "last.pth") and (tmp_path / "speed.json").is_file()
