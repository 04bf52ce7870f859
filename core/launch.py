"""The launch environment, read: which rank this process is, of how many, and where rank 0 listens.

    env = detect_env()     # os.environ by default; any mapping in tests
    env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher

torchrun's variables, or those of a multi-task srun step (SLURM_*: ranks, tasks per node, the nodelist for the master,
the job id for the port); anything else is one process. Pure functions of the environment, no torch: the runtime that
joins the process group is distributed_utils, and core.cli's rank tag reads the same answer.
"""
from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from typing import Callable, Mapping

from core.errors import UserError

DEFAULT_ADDR = "127.0.0.1"
DEFAULT_PORT = 29500


class DistError(UserError):
    """The launch environment or the dist.* settings cannot be used; the message says which value."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------------------------------------------------------
# Reading the launcher's environment


def detect_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    # torchrun wins over SLURM: torchrun started by srun (one agent per node) sees both, and its
    # RANK/WORLD_SIZE describe the workers while the SLURM_* ones describe the agents.
    if "RANK" in environ or "WORLD_SIZE" in environ:
        env = _torchrun_env(environ)
    elif _is_slurm_launch(environ):
        env = _slurm_env(environ)
    else:
        env = DistEnv(0, 1, 0, 1, DEFAULT_ADDR, DEFAULT_PORT, "single")
    _check(env)
    return env


def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    """environ[name] as an int; `default` when unset, or a DistError when there is no default."""
    raw = environ.get(name)
    if raw is None:
        if default is None:
            raise DistError(f"{name} is not set, but the launch looks distributed; set it or launch with torchrun/srun")
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise DistError(f"{name}={raw!r} is not an integer") from None


def _master(environ: Mapping[str, str], addr: Callable[[], str], port: Callable[[], int]) -> tuple[str, int]:
    # An explicit MASTER_ADDR/PORT always wins; the fallbacks are callables so that, when they are
    # not needed, a missing nodelist or job id is not an error.
    master_addr = environ.get("MASTER_ADDR") or addr()
    master_port = _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else port()
    return master_addr, master_port


def _torchrun_env(environ: Mapping[str, str]) -> DistEnv:
    rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
    # A hand-set RANK/WORLD_SIZE on one machine usually lacks the LOCAL_* pair; there local == global.
    local_rank = _int(environ, "LOCAL_RANK", rank)
    local_world = _int(environ, "LOCAL_WORLD_SIZE", world)
    addr, port = _master(environ, lambda: DEFAULT_ADDR, lambda: DEFAULT_PORT)
    return DistEnv(rank, world, local_rank, local_world, addr, port, "torchrun")


def _is_slurm_launch(environ: Mapping[str, str]) -> bool:
    # Only the tasks of an srun step with several tasks form a distributed run. An salloc shell, or an
    # sbatch script that runs `python train.py` itself, also carries SLURM_NTASKS (the allocation's size,
    # possibly > 1), but it is one process: taking it for rank 0 of N would wait for N-1 peers that never
    # come. srun marks its tasks with SLURM_PROCID plus a step id, so a multi-task launch needs both.
    in_step = "SLURM_PROCID" in environ and ("SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ)
    return in_step and _int(environ, "SLURM_NTASKS", 1) > 1


def _slurm_env(environ: Mapping[str, str]) -> DistEnv:
    rank, world = _int(environ, "SLURM_PROCID"), _int(environ, "SLURM_NTASKS")
    local_rank = _int(environ, "SLURM_LOCALID")
    addr, port = _master(environ, lambda: _slurm_first_host(environ), lambda: _slurm_port(environ))
    return DistEnv(rank, world, local_rank, _slurm_local_world_size(environ), addr, port, "slurm")


def _slurm_local_world_size(environ: Mapping[str, str]) -> int:
    name = "SLURM_NTASKS_PER_NODE" if "SLURM_NTASKS_PER_NODE" in environ else "SLURM_TASKS_PER_NODE"
    if name not in environ:
        raise DistError("neither SLURM_NTASKS_PER_NODE nor SLURM_TASKS_PER_NODE is set; launch with srun")
    counts = _expand_counts(environ[name], name)
    # A single count applies to every node; a list like "4(x2),3" has one entry per node of the job.
    node = _int(environ, "SLURM_NODEID", 0) if len(counts) > 1 else 0
    if not 0 <= node < len(counts):
        raise DistError(f"SLURM_NODEID={node} but {name}={environ[name]!r} lists only {len(counts)} nodes")
    return counts[node]


_COUNT = re.compile(r"([0-9]+)(?:\(x([0-9]+)\))?")


def _expand_counts(raw: str, name: str) -> list[int]:
    """SLURM's tasks-per-node notation: "4(x2),3" -> [4, 4, 3]."""
    counts: list[int] = []
    for part in raw.split(","):
        m = _COUNT.fullmatch(part.strip())
        if not m:
            raise DistError(f"{name}={raw!r} is not a tasks-per-node list like '4' or '4(x2),3'")
        counts += [int(m[1])] * int(m[2] or 1)
    return counts


def _slurm_first_host(environ: Mapping[str, str]) -> str:
    # srun puts rank 0 on the first node of its step, which is the job's first node unless the step
    # runs on a subset of the allocation; hence the step's list first.
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        hosts = expand_hostlist(environ.get(name, ""))
        if hosts:
            return hosts[0]
    raise DistError("cannot tell the master node: SLURM_JOB_NODELIST is not set; set MASTER_ADDR")


def _slurm_port(environ: Mapping[str, str]) -> int:
    # Every task derives the same port without talking to the others, and two jobs sharing a node get
    # different ports (unless their ids happen to be 20000 apart; MASTER_PORT overrides then).
    if "SLURM_JOB_ID" not in environ:
        return DEFAULT_PORT
    return 10000 + _int(environ, "SLURM_JOB_ID") % 20000


def _check(env: DistEnv) -> None:
    rules = [
        (env.world_size >= 1, f"world size {env.world_size} must be at least 1"),
        (0 <= env.rank < env.world_size, f"rank {env.rank} is outside 0..{env.world_size - 1}"),
        (1 <= env.local_world_size <= env.world_size,
         f"local world size {env.local_world_size} is outside 1..{env.world_size}"),
        (0 <= env.local_rank < env.local_world_size,
         f"local rank {env.local_rank} is outside 0..{env.local_world_size - 1}"),
        (0 < env.master_port < 65536, f"master port {env.master_port} is outside 1..65535"),
    ]
    for ok, problem in rules:
        if not ok:
            raise DistError(f"inconsistent {env.launcher} environment: {problem}")


# ---------------------------------------------------------------------------------------------------------------------
# SLURM hostlists

# A comma outside brackets: the lookahead rejects commas followed by "...]" with no "[" in between.
_TOP_COMMA = re.compile(r",(?![^\[]*\])")
_HOST_ITEM = re.compile(r"(?:[^\[\],]+|\[[^\[\]]+\])+")
_HOST_PIECE = re.compile(r"\[([^\[\]]+)\]|([^\[\]]+)")
_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?")


def expand_hostlist(text: str) -> list[str]:
    """SLURM's compressed hostlist: "gpu-a[1-2],n[01-02,07]x" -> gpu-a1 gpu-a2 n01x n02x n07x."""
    text = text.strip()
    if not text:
        return []
    hosts: list[str] = []
    for item in _TOP_COMMA.split(text):
        if not _HOST_ITEM.fullmatch(item.strip()):
            raise DistError(f"cannot read hostlist {text!r} near {item!r}")
        # Several bracket groups in one name ("r[1-2]n[1-3]") multiply out, in SLURM's order.
        choices = [_bracket(m[1], text) if m[1] else [m[2]] for m in _HOST_PIECE.finditer(item.strip())]
        hosts += ["".join(parts) for parts in itertools.product(*choices)]
    return hosts


def _bracket(body: str, text: str) -> list[str]:
    names: list[str] = []
    for part in body.split(","):
        m = _RANGE.fullmatch(part.strip())
        if not m or int(m[2] or m[1]) < int(m[1]):
            raise DistError(f"cannot read hostlist {text!r}: bad range {part!r}")
        # The width of the lower bound is the padding: [08-10] -> 08 09 10.
        names += [str(n).zfill(len(m[1])) for n in range(int(m[1]), int(m[2] or m[1]) + 1)]
    return names
