"""scripts/gpu_check.sh: one line and exit 0 without CUDA; its dry run (every step, tiny, on the CPU) reports every
step ok or skipped with a reason, with its figures; a command that hangs fails its step instead of the check."""
import dataclasses
import json
import os
import subprocess

import pytest
import torch

from engine.precision import native_bf16
from test_train_e2e import ROOT, script_module

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the real check would run")


def gpu_check_module():
    return script_module("gpu_check")


@no_cuda
def test_without_cuda_it_says_so_in_one_line_and_exits_0():
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to check"]


def test_a_hanging_command_fails_its_step_after_the_timeout(tmp_path):
    gc = gpu_check_module()
    check = gc.Check(dataclasses.replace(gc.DRY, timeout=1), str(tmp_path), dry=True)
    result = check.step("hang", check.run, "hang", ["-c", "import time; time.sleep(60)"])
    assert result["status"] == "failed" and "still running after 1 s" in result["error"]
    assert result["seconds"] < 55  # the 1 s limit, not the command's 60 s


def test_the_dry_run_has_the_gpu_runs_counts():
    """Batches per epoch, batch sizes, warm-up, timed steps, evaluation sizes: the GPU's, so that a count that cannot
    work there (an epoch too short to time, say) fails in the dry run first; only the model, images, precision,
    concurrency and time limits differ, and the input step's counts (its JPEG decoding costs the CPU as much as it
    would on the GPU node)."""
    gc = gpu_check_module()
    machine = ("tiny", "tiny_t", "amp", "jobs", "timeout", "no_compile", "bed_images", "input_bench", "input_batch")
    assert dataclasses.replace(gc.DRY, **{f: getattr(gc.GPU, f) for f in machine}) == gc.GPU
    assert gc.DRY.amp == "auto" and gc.GPU.amp == "bf16" and not gc.GPU.tiny


@pytest.mark.slow
def test_dry_run_passes_every_step_on_the_cpu(tmp_path):
    proc = subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800)  # a guard against a hang: the dry run takes 1-3 minutes
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
    # On the CPU: no NCCL, and no compiled runs (too slow for 2 cores); fp16 trains on the CPU too, bf16 where the
    # CPU has it natively (elsewhere it is emulated, many times slower).
    native = native_bf16(torch.device("cpu"))
    assert skipped == {"ddp_nccl", "train_fp32_compile", "train_bf16_compile", "train_fp16_compile",
                       "speed_compile"} | (set() if native else {"train_bf16"})
    for name in ("train_fp32", "train_fp16", "ddp_gloo") + (("train_bf16",) if native else ()):
        assert steps[name]["loss"] > 0 and steps[name]["img_per_s"] > 0 and steps[name]["checkpoints"] >= 2, name
    assert steps["train_fp16"]["grad_scale"] > 0  # fp16 trained with the gradient scaler
    assert steps["resume_bitwise"]["tensors_equal"] > 0 and steps["resume_bitwise"]["resumed_from_step"] == 2
    assert steps["eval_exact"]["samples"] == 101 and steps["eval_exact"]["top1_spread_images"] <= 1
    speed = steps["speed"]
    for figure in ("bare_img_per_s", "trainer_img_per_s", "bare_mfu", "trainer_mfu", "bare_peak_mem_mb"):
        assert speed[figure] > 0, figure
    # The GPU's counts, in the precision this CPU has.
    assert (speed["batch"], speed["steps"], speed["warmup"], speed["repeats"]) == (128, 20, 5, 3)
    assert speed["amp"] == ("bf16" if native else "none")
    assert steps["eval_speed"]["img_per_s"] > 0 and steps["eval_speed"]["samples"] == 5000
    checkpoint = steps["checkpoint"]
    assert checkpoint["model"] == "convnext_atto" and checkpoint["background_blocked_s"] > 0
    assert checkpoint["background_write_s"] > 0 and checkpoint["inline_blocked_s"] > 0
    feed = steps["input"]  # the real loader on generated JPEGs against a batch held on the device
    assert feed["model"] == "convnext_atto" and feed["pipeline_over_trainer"] > 0 and feed["loader_img_per_s"] > 0
    # The profile step: a trace in Chrome's trace format (what Perfetto, chrome://tracing and TensorBoard's profiler
    # plugin read), holding the 5 traced steps and the loop's phases, and the step's time split in the summary.
    profile = steps["profile"]
    assert profile["steps"] == 5 and profile["step_ms"] > 0 and set(profile["phases"]) == {
        "data", "forward", "backward", "optimizer"}
    assert profile["phases"]["forward"]["host_ms"] > 0 and profile["phases"]["backward"]["host_ms"] > 0
    with open(profile["trace"]) as f:
        events = json.load(f)["traceEvents"]
    spans = [e for e in events if e.get("ph") == "X"]
    assert all({"name", "ts", "dur", "pid", "tid"} <= set(e) for e in spans)
    names = {e["name"] for e in spans}
    assert {"train/data", "train/forward", "train/backward", "train/optimizer"} <= names
    assert len([n for n in names if n.startswith("ProfilerStep#")]) == 5
    # Every run wrote under --out: logs, run folders.
    assert os.path.isfile(tmp_path / "ddp_gloo" / "checkpoints" / "last.pth") and (tmp_path / "speed.json").is_file()
