"""core.launch: the launch environment read from fake environs (torchrun, srun, SLURM hostlists), without torch, and
the rank tag that core.cli's exit policy takes from it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from core import cli, launch
from core.errors import UserError
from helpers import TORCHRUN_2

# What srun hands task 5 of `srun -N2 --ntasks-per-node=4` in job 123456.
SLURM_8 = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_ID": "0", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "node[07-08]"}


# ---------------------------------------------------------------------------------------------------------------------
# detect_env


def test_single_process_when_nothing_is_set():
    env = launch.detect_env({"PATH": "/bin"})
    assert env == launch.DistEnv(0, 1, 0, 1, launch.DEFAULT_ADDR, launch.DEFAULT_PORT, "single")
    assert env.is_main and not env.distributed


def test_torchrun():
    env = launch.detect_env(TORCHRUN_2)
    assert env == launch.DistEnv(1, 2, 1, 2, "10.0.0.5", 29400, "torchrun")
    assert env.distributed and not env.is_main


def test_hand_set_rank_defaults_local_and_master():
    env = launch.detect_env({"RANK": "0", "WORLD_SIZE": "2"})
    assert env == launch.DistEnv(0, 2, 0, 2, launch.DEFAULT_ADDR, launch.DEFAULT_PORT, "torchrun")


def test_slurm():
    env = launch.detect_env(SLURM_8)
    assert env == launch.DistEnv(5, 8, 1, 4, "node07", 10000 + 123456 % 20000, "slurm")


def test_torchrun_inside_slurm_wins():
    env = launch.detect_env({**SLURM_8, **TORCHRUN_2})
    assert env.launcher == "torchrun" and (env.rank, env.world_size) == (1, 2)


@pytest.mark.parametrize("nodelist, first", [
    ("node01", "node01"),
    ("node[01-04,07]", "node01"),
    ("gpu-a[1-2],gpu-b3", "gpu-a1"),
    ("rack1-node[001-003]", "rack1-node001"),
    ("a[3-5,1]b", "a3b"),
])
def test_slurm_master_is_first_host(nodelist, first):
    assert launch.detect_env({**SLURM_8, "SLURM_JOB_NODELIST": nodelist}).master_addr == first


def test_slurm_nodelist_fallbacks():
    base = {k: v for k, v in SLURM_8.items() if k != "SLURM_JOB_NODELIST"}
    assert launch.detect_env({**base, "SLURM_NODELIST": "x[2-3]"}).master_addr == "x2"
    # The step's own node list beats the job's: a step on part of the allocation starts at its first node.
    assert launch.detect_env({**SLURM_8, "SLURM_STEP_NODELIST": "node08"}).master_addr == "node08"
    with pytest.raises(launch.DistError, match="MASTER_ADDR"):
        launch.detect_env(base)


def test_slurm_master_env_wins():
    base = {k: v for k, v in SLURM_8.items() if k not in ("SLURM_JOB_NODELIST", "SLURM_JOB_ID")}
    env = launch.detect_env({**base, "MASTER_ADDR": "head", "MASTER_PORT": "31000"})
    assert (env.master_addr, env.master_port) == ("head", 31000)


def test_slurm_port_from_job_id_differs_between_jobs():
    ports = {launch.detect_env({**SLURM_8, "SLURM_JOB_ID": str(j)}).master_port for j in (7, 8, 20006)}
    assert ports == {10007, 10008, 10006}
    no_job = {k: v for k, v in SLURM_8.items() if k != "SLURM_JOB_ID"}
    assert launch.detect_env(no_job).master_port == launch.DEFAULT_PORT


@pytest.mark.parametrize("extra, node, local_world", [
    ({"SLURM_NTASKS_PER_NODE": "4"}, "1", 4),
    ({"SLURM_TASKS_PER_NODE": "4(x2)"}, "0", 4),
    ({"SLURM_TASKS_PER_NODE": "5,3"}, "1", 3),
    ({"SLURM_TASKS_PER_NODE": "2(x3),2"}, "3", 2),
    ({"SLURM_TASKS_PER_NODE": "6,2"}, "0", 6),
])
def test_slurm_tasks_per_node_forms(extra, node, local_world):
    base = {k: v for k, v in SLURM_8.items() if k != "SLURM_TASKS_PER_NODE"}
    env = launch.detect_env({**base, **extra, "SLURM_NODEID": node})
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
    assert launch.detect_env(environ).launcher == "single"


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
    with pytest.raises(launch.DistError, match=match) as info:
        launch.detect_env(environ)
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
    assert launch.expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["node[1-", "node]1", "node[]", "node[a-b]", "node[3-1]", "a,,b", "n[1,,2]"])
def test_expand_hostlist_rejects_garbage(text):
    with pytest.raises(launch.DistError, match="hostlist"):
        launch.expand_hostlist(text)


# ---------------------------------------------------------------------------------------------------------------------
# no torch; core.cli's rank tag


def test_reading_the_launch_needs_no_torch():
    code = "import sys, core.launch; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("environ, tag", [
    ({}, ""),
    (TORCHRUN_2, "[rank 1] "),
    (SLURM_8, "[rank 5] "),  # an srun task, before distributed_utils.setup exports torchrun's names
    ({**TORCHRUN_2, "WORLD_SIZE": "two"}, ""),  # the environment is what failed: its error needs no tag
])
def test_the_exit_policys_rank_tag_reads_the_launch(environ, tag, monkeypatch):
    for name in [n for n in os.environ if n in ("RANK", "WORLD_SIZE") or n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert cli._rank_tag() == tag
