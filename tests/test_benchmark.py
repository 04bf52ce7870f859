"""scripts/benchmark.py as a user runs it: every mode timed, the ratios computed from what was timed, and the
DDP path under torchrun. (Its figures are measured in the README, not asserted here.)"""
import json
import re
import statistics

import pytest
import torch

from core.config import load_config
from core.errors import UserError
from shards import write_shards
from testbed import make_jpeg_testbed
from models import create_model
from helpers import DEBUG, run, run_here, script_module

pytestmark = pytest.mark.slow
QUICK = ["--steps", "2", "--warmup", "1", "--repeats", "3", "data.batch_size=8", "model.patch_size=4"]


def test_benchmark_times_every_mode_and_compares_with_timm(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_here(["scripts/benchmark.py", "--config", DEBUG, "--vs-timm", "--json", str(out), *QUICK,
                "train.grad_checkpointing=4", "--modes", "bare,trainer,pipeline,loader,eval", "--forbid-syncs"])
    record = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == record
    repeats = record["img_per_s_repeats"]
    assert set(repeats) == {"bare", "trainer", "pipeline", "loader", "eval", "ours_fwd_bwd", "timm_fwd_bwd"}
    # eval: one pass over the 101 validation images' full batches of 16 a repeat, after the one warm-up batch.
    assert (record["eval_batch"], record["eval_steps"]) == (16, 101 // 16 - 1) and "eval" not in record["mfu"]
    assert record["sync_guard"] is False  # --forbid-syncs guards CUDA only
    for mode, values in repeats.items():
        assert len(values) == 3 and all(v > 0 for v in values), mode
        assert record[f"{mode}_img_per_s"] == statistics.median(values)
    for key, top, bottom in (("trainer_over_bare", "trainer", "bare"), ("pipeline_over_trainer", "pipeline", "trainer"),
                             ("ours_over_timm", "ours_fwd_bwd", "timm_fwd_bwd")):
        assert record[key] == pytest.approx(statistics.median(a / b for a, b in zip(repeats[top], repeats[bottom])))
    assert record["device"] == "cpu" and record["global_batch"] == 8 and record["grad_checkpointing"] == 4
    assert record["forward_gflops_per_img"] > 0 and "trainer/bare" in proc.stdout
    # On a CPU, MFU is against the best matmul rate timed after each repeat: 2048^3, or 1024^3 where that one already
    # takes 50 ms (engine.precision.cpu_matmul_tflops), as on 2 AVX2 cores busy with other work.
    peaks = record["matmul_tflops_repeats"]
    assert len(peaks) == 3 and record["peak_tflops"] == max(peaks) > 0
    assert re.fullmatch(r"the best (1024|2048)\^3 matmul of 3 here, all ranks together", record["peak_source"])
    for mode, mfu in record["mfu"].items():
        assert mfu == pytest.approx(record["train_tflops_per_s"][mode] / max(peaks)), mode


def test_benchmark_under_torchrun_counts_both_processes(tmp_path):
    proc = run(["scripts/benchmark.py", "--config", DEBUG, "--modes", "trainer,pipeline", *QUICK,
                "dist.static_graph=true"], nproc=2)
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["world_size"] == 2 and record["global_batch"] == 16
    assert set(record["img_per_s_repeats"]) == {"trainer", "pipeline"} and record["pipeline_over_trainer"] > 0
    assert len(record["matmul_tflops_repeats"]) == 3 and record["peak_tflops"] > 0  # both ranks' matmuls, summed


def benchmark_module(name="benchmark"):
    """scripts/benchmark.py, or a sibling it is made of, in this process; the siblings first, in the order they
    import each other."""
    for sibling in ("loader_stages", "benchmark_timing", "benchmark_flops", "benchmark_timm", "benchmark_modes",
                    "benchmark_report"):
        script_module(sibling)
    return script_module(name)


def test_benchmark_refuses_an_unknown_mode(capsys):
    with pytest.raises(SystemExit) as exit_:
        benchmark_module().parse_args(["--config", DEBUG, "--modes", "bare,fast"])
    assert exit_.value.code == 2 and "--modes takes" in capsys.readouterr().err


def test_benchmark_refuses_to_compare_with_a_different_timm_network():
    """timm's convnext with patch_size 2 downsamples in stage 0 as well: more parameters, not our network."""
    cfg = load_config(DEBUG, ["model.patch_size=2"])
    ours = sum(p.numel() for p in create_model(**cfg.model.create_args(), num_classes=10).parameters())
    with pytest.raises(UserError, match="--vs-timm: timm's convnext_atto has .* parameters with these options, ours "
                                        ".*: not the same network, so not comparable"):
        benchmark_module("benchmark_timm").timm_twin(cfg, 10, 3, torch.device("cpu"), ours)


def test_benchmark_compares_our_jpeg_loader_with_timms_stage_by_stage(tmp_path):
    root = str(tmp_path / "jpegs")
    make_jpeg_testbed(root, num_images=24, num_classes=2)
    make_jpeg_testbed(root, num_images=2, num_classes=2, split="val")
    write_shards(root, str(tmp_path / "shards"), shard_size=10)
    proc = run_here(["scripts/benchmark.py", "--config", DEBUG, "--modes", "bare,loader,other_loader,timm_loader",
                "--other-data", f"data.name=shards data.root={tmp_path}/shards", "--stages", "6",
                *QUICK, "data.name=imagefolder", f"data.root={root}", "data.recipe=imagenet", "data.num_workers=1",
                "--gpu-img-per-s", "1000"])
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    repeats = record["img_per_s_repeats"]
    assert record["loader_over_timm"] == pytest.approx(
        statistics.median(a / b for a, b in zip(repeats["loader"], repeats["timm_loader"])))
    assert record["other_loader_over_loader"] == pytest.approx(
        statistics.median(a / b for a, b in zip(repeats["other_loader"], repeats["loader"])))
    for mode in ("loader", "other_loader", "timm_loader"):
        per_core = record[f"{mode}_img_per_s_per_core"]
        assert per_core == pytest.approx(record[f"{mode}_img_per_s"] / record["loader_cores"])
        assert record[f"{mode}_cores_per_gpu"] == pytest.approx(1000 / per_core)
    stages = record["stages_ms_per_img"]
    assert {"decode", "crop+resize", "flip", "RandAugment", "conversion", "normalisation", "erasing",
            "collation", "total"} == set(stages["timm"])
    assert {"decode", "crop+resize", "collation", "total"} == set(stages["ours"])  # the rest is on the device
    for name in stages:
        assert all(v > 0 for v in stages[name].values())
        assert stages[name]["total"] == pytest.approx(sum(v for k, v in stages[name].items() if k != "total"))
    assert record["stages_files"] == 6 and record["device_batch_ms_per_img"] > 0 and record["step_ms_per_img"] > 0
    assert "cores per GPU at 1000 img/s" in proc.stdout


def test_startup_times_the_first_batch_of_both_ranks(tmp_path):
    root = str(tmp_path / "jpegs")
    make_jpeg_testbed(root, num_images=16, num_classes=2, seed=0)
    make_jpeg_testbed(root, num_images=4, num_classes=2, seed=1, split="val")
    write_shards(root, str(tmp_path / "shards"), shard_size=5)
    common = ["--config", DEBUG, "data.recipe=imagenet", "data.batch_size=4", "data.num_workers=0"]
    proc = run(["scripts/startup.py", *common, "data.name=shards", f"data.root={tmp_path}/shards"], nproc=2)
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (record["world_size"], record["train_images"], record["val_images"]) == (2, 16, 4)
    assert 0 < record["data_sets_s"] <= record["first_batch_s"] and "first batch after" in proc.stdout


def test_checkpoint_benchmark_times_both_kinds_of_save_on_two_ranks(tmp_path):
    proc = run(["scripts/checkpoint_benchmark.py", "--config", DEBUG, "--repeats", "2", "--steps", "1",
                "--dir", str(tmp_path)], nproc=2)
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["world_size"] == 2 and record["model"] == "convnext_atto" and record["state_gb"] > 0
    rows = record["repeats"]
    for key in ("step_s", "inline_blocked_s", "background_blocked_s", "background_write_s"):
        assert len(rows[key]) == 2 and all(v > 0 for v in rows[key]) and record[key] == statistics.median(rows[key])
    assert record["blocked_background_over_inline"] == pytest.approx(statistics.median(
        b / a for a, b in zip(rows["inline_blocked_s"], rows["background_blocked_s"])))
    assert "ranks blocked" in proc.stdout and list(tmp_path.iterdir()) == []  # its checkpoints are cleaned up


def test_the_sync_guard_covers_the_timed_steps_it_is_asked_to(monkeypatch):
    """Steps warmup+1 .. warmup+steps where guarded(k) holds, and not the clock's own waits between them."""
    bench = benchmark_module("benchmark_timing")
    switched = []
    monkeypatch.setattr(bench, "set_sync_guard", switched.append)
    clock = bench.StepClock(torch.device("cpu"), warmup=2, steps=4, guarded=lambda k: k != 5)  # 5: a log step
    guarded = set()
    for k in range(1, 2 + 4 + 1):
        if clock.guarding:
            guarded.add(k)
        clock()
    assert guarded == {3, 4, 6} and not clock.guarding and switched == [True, False] * 3  # off at every tick


def test_a_sync_in_a_guarded_step_names_the_mode_the_step_and_the_line(monkeypatch):
    bench = benchmark_module("benchmark_timing")
    monkeypatch.setattr(bench, "set_sync_guard", lambda on: None)

    def run(clock):
        for _ in range(3):
            clock()
        raise RuntimeError(bench.SYNC_ERROR)  # as torch raises it under set_sync_debug_mode("error")

    clock = bench.StepClock(torch.device("cpu"), warmup=1, steps=5, guarded=lambda k: True)
    with pytest.raises(UserError, match=r"--forbid-syncs: a host-device sync in trainer's timed step 4: called a "
                                        r"synchronizing CUDA operation at tests/test_benchmark.py:\d+ `raise "
                                        r"RuntimeError\(bench.SYNC_ERROR\)"):
        bench.timed("trainer", run, clock)
    assert not clock.guarding  # off again for the rest of the process
