"""distributed_utils: the runtime in one process (setup, rank queries, print0, the exit policy), plus real 2-process
torchrun runs on CPU/gloo. Reading the launch environment: test_launch.py."""
from __future__ import annotations

import os
import random
import re
import signal

import numpy as np
import pytest
import torch

import distributed_utils as du
from core.cli import run_main
from core.config import Config
from engine.build import ProcessSettings, init_process, seed_everything
from engine.preemption import SIGNALS, StopRequest
from helpers import TORCHRUN_2, launch_script


@pytest.fixture(autouse=True)
def _no_leftover_context():
    yield
    du.cleanup()


# ---------------------------------------------------------------------------------------------------------------------
# setup and friends in one process


@pytest.fixture
def single(monkeypatch):
    for name in list(os.environ):
        if name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE") or name.startswith("SLURM_"):
            monkeypatch.delenv(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_setup_single_process_on_cpu(single, capsys):
    ctx = du.setup()
    assert (ctx.backend, ctx.device, ctx.env.launcher) == ("gloo", torch.device("cpu"), "single")
    assert (ctx.env.rank, du.get_world_size(), du.is_main_process()) == (0, 1, True)
    t = torch.ones(3)
    assert du.all_reduce_sum(t) is t and t.tolist() == [1.0, 1.0, 1.0]
    assert du.all_gather_object("x") == ["x"]
    du.barrier()
    du.print0("hello", 1)
    assert capsys.readouterr().out == "hello 1\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_setup_nccl_without_cuda(single):
    with pytest.raises(du.DistError, match="nccl needs CUDA"):
        du.setup("nccl")


def test_setup_rejects_a_timeout_of_zero(single):
    with pytest.raises(du.DistError, match="timeout"):
        du.setup(timeout_s=0)


def test_nccl_setup_gives_the_gloo_side_group_the_timeout_and_nccl_its_watchdog(single, monkeypatch, tmp_path):
    """With NCCL, setup makes a gloo side group (objects, host-side waits): it must fail after dist.timeout_s like
    the NCCL group, not after torch's default 30 minutes; and NCCL gets async error handling and the flight
    recorder, without overriding what the user set."""
    from datetime import timedelta
    import torch.distributed as dist

    calls = {}
    monkeypatch.setattr(du, "_resolve_backend", lambda name: "nccl")
    monkeypatch.setattr(du, "_claim_device", lambda env: torch.device("cpu"))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.update(init=kw["timeout"]))
    monkeypatch.setattr(dist, "new_group", lambda **kw: calls.update(side=kw))
    for name, value in {**TORCHRUN_2, "MASTER_ADDR": "127.0.0.1", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}.items():
        monkeypatch.setenv(name, value)
    every_name = {**du.nccl_fault_env("x"), **du.nccl_fault_env("x", "2.7.1")}  # either torch's names
    for name in every_name:
        if name != "TORCH_NCCL_DUMP_ON_TIMEOUT":  # unset here, and unset again after the test
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)
    du.setup("nccl", timeout_s=42, trace_dir=str(tmp_path))
    monkeypatch.setattr(du, "_ctx", None)  # nothing to tear down: no process group was made
    assert calls["init"] == timedelta(seconds=42)
    assert calls["side"] == {"backend": "gloo", "timeout": timedelta(seconds=42)}
    wanted = du.nccl_fault_env(str(tmp_path))
    assert {name: os.environ[name] for name in wanted} == {**wanted, "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}  # user's kept
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    # only the names this torch reads: it would warn on every rank about the other release's names it still reads
    assert [name for name in every_name if name in os.environ and name not in wanted] == []


def test_the_flight_recorder_settings_go_by_the_names_of_the_torch_release():
    """torch 2.8 renamed the flight recorder's settings; earlier releases read only the old names."""
    assert du.nccl_fault_env("/runs/a", "2.14.1+cu130") == {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_FR_BUFFER_SIZE": "2000",
        "TORCH_FR_DUMP_TEMP_FILE": "/runs/a/nccl_trace_rank_"}
    old = du.nccl_fault_env("/runs/a", "2.7.1+cu126")
    assert old["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "2000" and not any(name.startswith("TORCH_FR_") for name in old)
    assert old["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == "/runs/a/nccl_trace_rank_"


def test_cores_per_process_share_the_node_unless_slurm_gave_each_its_own(single, monkeypatch):
    cores = len(os.sched_getaffinity(0))
    assert du.cores_per_process() == cores
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "4")):
        monkeypatch.setenv(name, value)
    assert du.cores_per_process() == max(1, cores // 4)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert du.cores_per_process() == 1


def test_print0_is_silent_off_rank_0(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    du.print0("nope")
    assert capsys.readouterr().out == ""


def test_run_keyboard_interrupt_exits_130(single):
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        run_main(main)
    assert info.value.code == 130


def test_run_success_returns(single):
    calls = []
    run_main(lambda: calls.append(du.setup()))
    assert len(calls) == 1 and not torch.distributed.is_initialized()


def draws() -> tuple[float, float, float]:
    """One number from each random generator an entry point seeds: Python's, numpy's, torch's."""
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_process_settings_put_back_what_an_entry_point_sets(single, monkeypatch, tmp_path):
    """What an entry point's start sets for the whole process (the stop signals' handlers; init_process: the process
    context, threads, deterministic mode and its cuBLAS workspace; the seeds) is undone when a block that kept the
    process's settings ends, and the random generators go on from where they were."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cfg = Config()
    cfg.output_dir, cfg.train.threads, cfg.train.deterministic = str(tmp_path), torch.get_num_threads() + 1, True
    threads, environ = torch.get_num_threads(), dict(os.environ)
    handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}
    with ProcessSettings.kept():
        following = draws()
    with ProcessSettings.kept():
        StopRequest()
        init_process(cfg)
        seed_everything(0)
        assert draws() != following and du._ctx is not None and "CUBLAS_WORKSPACE_CONFIG" in os.environ
        assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == cfg.train.threads
        assert {sig: signal.getsignal(sig) for sig in SIGNALS} != handlers
    assert draws() == following and du._ctx is None and dict(os.environ) == environ
    assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == threads
    assert {sig: signal.getsignal(sig) for sig in SIGNALS} == handlers


# ---------------------------------------------------------------------------------------------------------------------
# Real processes


@pytest.mark.slow
def test_torchrun_two_ranks_reduce_broadcast_print0(tmp_path):
    result, _ = launch_script(tmp_path, """
        import torch
        import distributed_utils as du
        from core.cli import run_main

        def main():
            ctx = du.setup("auto", timeout_s=600)
            rank = ctx.env.rank
            total = du.all_reduce_sum(torch.tensor([rank + 1.0]))
            token = du.all_gather_object(f"from-{rank}")[0]
            ranks = du.all_gather_object(rank)
            du.barrier()
            print(f"RESULT rank={rank} world={du.get_world_size()} backend={ctx.backend} sum={total.item()} "
                  f"token={token} ranks={ranks}", flush=True)
            du.print0(f"PRINT0 rank={rank}")

        run_main(main)
    """, nproc=2)
    assert result.returncode == 0, result.stderr
    # Two processes share the pipe, and a print may reach it as two writes, so lines can interleave:
    # count occurrences instead of splitting lines.
    for rank in (0, 1):
        assert result.stdout.count(f"RESULT rank={rank} world=2 backend=gloo sum=3.0 token=from-0 ranks=[0, 1]") == 1
    assert re.findall(r"PRINT0 rank=\d", result.stdout) == ["PRINT0 rank=0"]


@pytest.mark.slow
@pytest.mark.parametrize("error, expected, absent", [
    ('RuntimeError("boom on rank 1")', ["[rank 1] Traceback", "[rank 1] RuntimeError: boom on rank 1"], None),
    ('UserError("bad data on rank 1")', ["[rank 1] error: bad data on rank 1\n"], "[rank 1] Traceback"),
])
def test_failing_rank_ends_the_job(tmp_path, error, expected, absent):
    # Rank 0 sits in a collective with a long timeout; only rank 1's exit can end this quickly.
    result, seconds = launch_script(tmp_path, f"""
        import torch
        import distributed_utils as du
        from core.cli import run_main
        from core.errors import UserError

        def main():
            if du.setup("gloo", timeout_s=3600).env.rank == 1:
                raise {error}
            du.all_reduce_sum(torch.ones(1))
            du.barrier()

        run_main(main)
    """, nproc=2)
    assert result.returncode != 0
    for line in expected:
        assert line in result.stderr
    assert absent is None or absent not in result.stderr
    assert seconds < 300  # far below rank 0's collective timeout (3600 s), far above a slow start-up


@pytest.mark.slow
def test_user_error_single_process_is_one_line_exit_2(tmp_path):
    result, _ = launch_script(tmp_path, """
        import distributed_utils as du
        from core.cli import run_main
        from core.errors import UserError

        def main():
            du.setup()
            raise UserError("data.root '/nope' does not exist; set data.root=...")

        run_main(main)
    """, nproc=None)
    assert result.returncode == 2
    assert result.stderr == "error: data.root '/nope' does not exist; set data.root=...\n"
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow
def test_main_first_waits_past_the_collective_timeout_when_told_to(tmp_path):
    """Rank 0's work (a data set's first download) outlasts dist.timeout_s (3 s here): with wait_s the other rank
    waits for it, asking every second, and then runs its own part; rank 0's result is rank 0's."""
    result, _ = launch_script(tmp_path, """
        import time
        import distributed_utils as du
        from core.cli import run_main

        def work(main):
            if main:
                time.sleep(8)
            return "prepared" if main else "read"

        def main():
            rank = du.setup("gloo", timeout_s=3).env.rank
            print(f"RESULT rank={rank} {du.main_first(work, wait_s=120)}", flush=True)

        run_main(main)
    """, nproc=2)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("RESULT rank=0 prepared") == 1 and result.stdout.count("RESULT rank=1 read") == 1
