"""scripts/gpu_check.sh: one line and exit 0 without CUDA; its dry run (every step, tiny, on the CPU) reports every
step ok or skipped with a reason, with its figures; a command that hangs fails its step instead of the check; the
budget skips the steps it cannot hold and stops a command at its end; a signal ends the check with its JSON; a torch
older than the project's floor is refused in one line."""
import dataclasses
import json
import os
import signal
import subprocess
import threading
import time

import pytest
import torch

from engine.precision import native_bf16
from helpers import ROOT, script_module

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the real check would run")


def gpu_check_module(name="gpu_check"):
    """scripts/gpu_check.py, or a sibling it is made of; the siblings first, in the order they import each other."""
    for sibling in ("gpu_check_plan", "gpu_check_preflight", "gpu_check_runner", "gpu_check_steps"):
        script_module(sibling)
    return script_module(name)


def runner_and_plan():
    return gpu_check_module("gpu_check_runner"), gpu_check_module("gpu_check_plan")


@no_cuda
def test_without_cuda_it_says_so_in_one_line_and_exits_0():
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to check"]


def test_a_hanging_command_fails_its_step_after_the_timeout(tmp_path):
    gc, plan = runner_and_plan()
    check = gc.Runner(dataclasses.replace(plan.DRY, timeout=1), str(tmp_path), dry=True)
    result = check.step("hang", check.run, "hang", ["-c", "import time; time.sleep(60)"])
    assert result["status"] == "failed" and "still running after 1 s" in result["error"]
    assert result["seconds"] < 55  # the 1 s limit, not the command's 60 s


def test_a_step_the_budget_cannot_hold_is_skipped_and_a_shorter_one_after_it_runs(tmp_path):
    gc, plan = runner_and_plan()
    check = gc.Runner(plan.DRY, str(tmp_path), dry=True, budget_s=gc.RESERVE_S + 10)  # about 10 s for commands

    def never() -> dict:
        raise AssertionError("a step the budget cannot hold ran")

    need = plan.STEPS["resume_bitwise"][1]  # the dry run's column
    assert need > 10
    skipped = check.step("resume_bitwise", never)
    assert skipped["status"] == "skipped" and skipped["expected_s"] == need
    assert skipped["reason"].startswith("budget: ")
    assert skipped["reason"].endswith(f" s left, step needs about {need} s")
    assert check.step("short", lambda: {"figure": 1})["status"] == "ok"  # not in the table: expected 0 s
    summary = json.loads((tmp_path / "summary.json").read_text())  # rewritten after every step
    assert summary["gpu_check"] == "running" and summary["skipped_for_budget"] == ["resume_bitwise"]
    assert summary["ran"] == ["short"] and summary["budget_s"] == gc.RESERVE_S + 10
    assert check.finish()["gpu_check"] == "ok"


def test_a_command_still_running_at_the_budgets_end_is_stopped(tmp_path):
    gc, plan = runner_and_plan()
    check = gc.Runner(plan.DRY, str(tmp_path), dry=True, budget_s=gc.RESERVE_S + 2)  # its own timeout: 600 s
    result = check.step("hang", check.run, "hang", ["-c", "import time; time.sleep(60)"])
    assert result["status"] == "stopped" and "still running at the end of the budget (--budget-s" in result["reason"]
    assert result["seconds"] < 2 + gc.STOP_GRACE_S + 5
    summary = check.finish()
    assert summary["gpu_check"] == "cut short by the budget" and summary["stopped"] == ["hang"]


def test_a_signal_stops_the_running_commands_and_skips_the_rest(tmp_path):
    """What the handlers gpu_check.py installs do: a flag that every command's wait reads."""
    gc, plan = runner_and_plan()
    check = gc.Runner(plan.DRY, str(tmp_path), dry=True)
    running = threading.Thread(target=check.step, args=("hang", check.run, "hang",
                                                         ["-c", "import time; time.sleep(60)"]))
    running.start()
    time.sleep(1)
    check.stop.on_signal(signal.SIGTERM, None)
    running.join(timeout=2 + gc.STOP_GRACE_S + 5)
    assert not running.is_alive() and check.results["hang"]["status"] == "stopped"
    assert "cut short by SIGTERM" in check.results["hang"]["reason"]
    later = check.step("speed", lambda: {})
    assert later == {"status": "skipped", "reason": "not started: the check was cut short by SIGTERM",
                     "seconds": 0.0, "expected_s": plan.STEPS["speed"][1]}
    summary = check.finish()
    assert summary["gpu_check"] == "cut short by SIGTERM" and summary["cut_short_by"] == "SIGTERM"
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


@pytest.mark.slow
def test_sigterm_ends_the_check_with_its_json(tmp_path):
    """The handlers are installed before torch's import; bash execs the Python, so the signal reaches it."""
    proc = subprocess.Popen(["bash", SCRIPT, "--dry-run", "--budget-s", "120", "--out", str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("gpu_check: dry run on the CPU, within 120 s")
    time.sleep(2)  # the first steps' commands have started
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert proc.returncode == 128 + signal.SIGTERM and summary["gpu_check"] == "cut short by SIGTERM", stderr
    order, steps = gpu_check_module("gpu_check_plan").ORDER, summary["steps"]
    assert list(steps) == order and summary["stopped"] and summary["seconds"] < 30
    assert all(steps[n]["status"] == "skipped" for n in order[order.index("speed"):])  # none had started
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_a_torch_older_than_the_floor_is_refused_in_one_line(monkeypatch, capsys):
    gc = gpu_check_module("gpu_check_preflight")
    floor = gc.declared()[1]["torch"]  # pyproject.toml's, the one statement of it
    assert gc.version_tuple(floor) >= (2, 6) and gc.version_tuple("2.5.0a0+nv24.10") == (2, 5, 0)
    real = gc.installed
    monkeypatch.setattr(gc, "installed", lambda name: "2.5.0a0+nv24.10" if name == "torch" else real(name))
    assert gpu_check_module().main(["--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert f": torch 2.5.0a0+nv24.10 < {floor}; the project needs torch>={floor} (pyproject.toml)" in err


def test_missing_light_dependencies_are_named_with_the_pip_command_that_installs_them(monkeypatch):
    gc = gpu_check_module("gpu_check_preflight")
    real = gc.installed
    monkeypatch.setattr(gc, "installed", lambda name: None if name in ("timm", "tqdm") else real(name))
    with pytest.raises(gc.Refused, match=r": timm missing, tqdm missing; install them: .* -m pip install (--user )?"
                                         r"timm==1\.0\.31 tqdm==4\.70\.1$"):  # requirements.txt's versions
        gc.preflight(no_install=True)


def test_the_dry_run_has_the_gpu_runs_counts():
    """Batches per epoch, batch sizes, warm-up, timed steps, evaluation sizes: the GPU's, so that a count that cannot
    work there (an epoch too short to time, say) fails in the dry run first; only the model, images, precision,
    concurrency, time limits and how the training runs save differ, and the input step's counts (its JPEG decoding
    costs the CPU as much as it would on the GPU node)."""
    gc = gpu_check_module("gpu_check_plan")
    machine = ("tiny", "tiny_t", "amp", "jobs", "timeout", "no_compile", "saves", "bed_images", "input_bench",
               "input_batch")
    assert dataclasses.replace(gc.DRY, **{f: getattr(gc.GPU, f) for f in machine}) == gc.GPU
    assert gc.DRY.amp == "auto" and gc.GPU.amp == "bf16" and not gc.GPU.tiny


@pytest.mark.slow
def test_dry_run_passes_every_step_on_the_cpu(tmp_path):
    proc = subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800)  # a guard against a hang: the dry run takes 1-3 minutes
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and summary["gpu_check"] == "ok" and summary["failed"] == [], proc.stdout
    assert summary["dry_run"] and summary["device"] == "cpu" and summary["torch"] == torch.__version__
    assert summary["date"] and summary["out"] == str(tmp_path) and summary["installed"] == []
    assert summary["budget_s"] == 420 and summary["skipped_for_budget"] == [] and summary["seconds"] < 420
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    steps = summary["steps"]
    assert list(steps) == gpu_check_module("gpu_check_plan").ORDER
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
    assert speed["amp"] == ("bf16" if native else "none") and speed["sync_guard"] is False  # CUDA only
    evals = steps["eval_speed"]  # a pass of 25 batches of 256 a repeat, the first 5 untimed
    assert evals["img_per_s"] > 0 and (evals["batch"], evals["timed_batches"], evals["warmup_batches"]) == (256, 20, 5)
    checkpoint = steps["checkpoint"]
    assert checkpoint["model"] == "convnext_atto" and checkpoint["background_blocked_s"] > 0
    assert checkpoint["background_write_s"] > 0 and checkpoint["inline_blocked_s"] > 0
    feed = steps["input"]  # the real loader on generated JPEGs against a batch held on the device
    assert feed["model"] == "convnext_atto" and feed["pipeline_over_trainer"] > 0 and feed["loader_img_per_s"] > 0
    assert feed["decoder"] in ("region (libjpeg-turbo)", "pillow")
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
