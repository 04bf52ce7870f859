"""distributed_utils: environment detection on fake environs, plus real 2-process torchrun runs on CPU/gloo."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import distributed_utils as du
from core.cli import run_main
from core.errors import UserError

REPO = Path(__file__).resolve().parents[1]

TORCHRUN_2 = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
              "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400"}
# What srun hands task 5 of `srun -N2 --ntasks-per-node=4` in job 123456.
SLURM_8 = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_ID": "0", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "node[07-08]"}


@pytest.fixture(autouse=True)
def _no_leftover_context():
    yield
    du.cleanup()


# ---------------------------------------------------------------------------------------------------------------------
# detect_env


def test_single_process_when_nothing_is_set():
    env = du.detect_env({"PATH": "/bin"})
    assert env == du.DistEnv(0, 1, 0, 1, du.DEFAULT_ADDR, du.DEFAULT_PORT, "single")
    assert env.is_main and not env.distributed


def test_torchrun():
    env = du.detect_env(TORCHRUN_2)
    assert env == du.DistEnv(1, 2, 1, 2, "10.0.0.5", 29400, "torchrun")
    assert env.distributed and not env.is_main


def test_hand_set_rank_defaults_local_and_master():
    env = du.detect_env({"RANK": "0", "WORLD_SIZE": "2"})
    assert env == du.DistEnv(0, 2, 0, 2, du.DEFAULT_ADDR, du.DEFAULT_PORT, "torchrun")


def test_slurm():
    env = du.detect_env(SLURM_8)
    assert env == du.DistEnv(5, 8, 1, 4, "node07", 10000 + 123456 % 20000, "slurm")


def test_torchrun_inside_slurm_wins():
    env = du.detect_env({**SLURM_8, **TORCHRUN_2})
    assert env.launcher == "torchrun" and (env.rank, env.world_size) == (1, 2)


@pytest.mark.parametrize("nodelist, first", [
    ("node01", "node01"),
    ("node[01-04,07]", "node01"),
    ("gpu-a[1-2],gpu-b3", "gpu-a1"),
    ("rack1-node[001-003]", "rack1-node001"),
    ("a[3-5,1]b", "a3b"),
])
def test_slurm_master_is_first_host(nodelist, first):
    assert du.detect_env({**SLURM_8, "SLURM_JOB_NODELIST": nodelist}).master_addr == first


def test_slurm_nodelist_fallbacks():
    base = {k: v for k, v in SLURM_8.items() if k != "SLURM_JOB_NODELIST"}
    assert du.detect_env({**base, "SLURM_NODELIST": "x[2-3]"}).master_addr == "x2"
    # The step's own node list beats the job's: a step on part of the allocation starts at its first node.
    assert du.detect_env({**SLURM_8, "SLURM_STEP_NODELIST": "node08"}).master_addr == "node08"
    with pytest.raises(du.DistError, match="MASTER_ADDR"):
        du.detect_env(base)


def test_slurm_master_env_wins():
    base = {k: v for k, v in SLURM_8.items() if k not in ("SLURM_JOB_NODELIST", "SLURM_JOB_ID")}
    env = du.detect_env({**base, "MASTER_ADDR": "head", "MASTER_PORT": "31000"})
    assert (env.master_addr, env.master_port) == ("head", 31000)


def test_slurm_port_from_job_id_differs_between_jobs():
    ports = {du.detect_env({**SLURM_8, "SLURM_JOB_ID": str(j)}).master_port for j in (7, 8, 20006)}
    assert ports == {10007, 10008, 10006}
    no_job = {k: v for k, v in SLURM_8.items() if k != "SLURM_JOB_ID"}
    assert du.detect_env(no_job).master_port == du.DEFAULT_PORT


@pytest.mark.parametrize("extra, node, local_world", [
    ({"SLURM_NTASKS_PER_NODE": "4"}, "1", 4),
    ({"SLURM_TASKS_PER_NODE": "4(x2)"}, "0", 4),
    ({"SLURM_TASKS_PER_NODE": "5,3"}, "1", 3),
    ({"SLURM_TASKS_PER_NODE": "2(x3),2"}, "3", 2),
    ({"SLURM_TASKS_PER_NODE": "6,2"}, "0", 6),
])
def test_slurm_tasks_per_node_forms(extra, node, local_world):
    base = {k: v for k, v in SLURM_8.items() if k != "SLURM_TASKS_PER_NODE"}
    env = du.detect_env({**base, **extra, "SLURM_NODEID": node})
    assert env.local_world_size == local_world


@pytest.mark.parametrize("environ", [
    # An salloc shell: the allocation has 8 tasks, but this is one process that srun did not start.
    {"SLURM_NTASKS": "8", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n[1-2]"},
    # srun -n1 inside a bigger allocation.
    {**SLURM_8, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"},
    # No step id: the batch script itself, not a task of an srun step.
    {k: v for k, v in SLURM_8.items() if k != "SLURM_STEP_ID"},
])
def test_slurm_without_a_multi_task_step_is_single(environ):
    assert du.detect_env(environ).launcher == "single"


@pytest.mark.parametrize("environ, match", [
    ({**TORCHRUN_2, "RANK": "2"}, "rank 2 is outside 0..1"),
    ({**TORCHRUN_2, "RANK": "-1"}, "rank -1"),
    ({**TORCHRUN_2, "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({**TORCHRUN_2, "WORLD_SIZE": "0", "RANK": "0"}, "world size 0"),
    ({"RANK": "0"}, "WORLD_SIZE is not set"),
    ({**TORCHRUN_2, "LOCAL_RANK": "2"}, "local rank 2"),
    ({**TORCHRUN_2, "LOCAL_WORLD_SIZE": "3"}, "local world size 3"),
    ({**TORCHRUN_2, "MASTER_PORT": "70000"}, "master port"),
    ({**TORCHRUN_2, "MASTER_PORT": "x"}, "MASTER_PORT='x'"),
    ({**SLURM_8, "SLURM_PROCID": "8"}, "slurm environment: rank 8"),
    ({**SLURM_8, "SLURM_JOB_ID": "12a"}, "SLURM_JOB_ID"),
    ({**SLURM_8, "SLURM_TASKS_PER_NODE": "4(2)"}, "tasks-per-node"),
    ({**SLURM_8, "SLURM_TASKS_PER_NODE": "4,4", "SLURM_NODEID": "2"}, "SLURM_NODEID=2"),
    ({k: v for k, v in SLURM_8.items() if k != "SLURM_LOCALID"}, "SLURM_LOCALID is not set"),
    ({**SLURM_8, "SLURM_JOB_NODELIST": "node[01-"}, "hostlist"),
])
def test_bad_values_raise_dist_error(environ, match):
    with pytest.raises(du.DistError, match=match) as info:
        du.detect_env(environ)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------------
# expand_hostlist


@pytest.mark.parametrize("text, hosts", [
    ("", []),
    ("node01", ["node01"]),
    ("a,b", ["a", "b"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu-a[1-2],gpu-b3", ["gpu-a1", "gpu-a2", "gpu-b3"]),
    ("rack1-node[001-003]", ["rack1-node001", "rack1-node002", "rack1-node003"]),
    ("a[1,3-5]b", ["a1b", "a3b", "a4b", "a5b"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("x[1],y[2-3],z", ["x1", "y2", "y3", "z"]),
    (" c1.example.org , c2 ", ["c1.example.org", "c2"]),
])
def test_expand_hostlist(text, hosts):
    assert du.expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["node[1-", "node]1", "node[]", "node[a-b]", "node[3-1]", "a,,b", "n[1,,2]"])
def test_expand_hostlist_rejects_garbage(text):
    with pytest.raises(du.DistError, match="hostlist"):
        du.expand_hostlist(text)


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


# ---------------------------------------------------------------------------------------------------------------------
# Real processes


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                       "MASTER_ADDR", "MASTER_PORT")}
    # The project is installed in the venv; the tests folder is on the path for job scripts that reuse test helpers.
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")]),
               CUDA_VISIBLE_DEVICES="")
    return env


def _launch(tmp_path: Path, body: str, nproc: int | None, timeout: float = 450,
            args: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, float]:
    """Run `body` as a script, via torchrun with `nproc` workers (or plainly when None); kill it all on timeout."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(body))
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    start = time.monotonic()
    # A session of its own, so a hung run can be killed with its workers rather than leaving them behind.
    proc = subprocess.Popen([sys.executable, *launcher, str(script), *args], cwd=tmp_path, env=_child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"job still running after {timeout}s: a failure did not end it")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - start


@pytest.mark.slow
def test_torchrun_two_ranks_reduce_broadcast_print0(tmp_path):
    result, _ = _launch(tmp_path, """
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
    result, seconds = _launch(tmp_path, f"""
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
    result, _ = _launch(tmp_path, """
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
    result, _ = _launch(tmp_path, """
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
