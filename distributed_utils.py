"""Where this process sits in a (possibly) distributed run, and the few collectives the trainer needs.

    ctx = distributed_utils.setup(cfg.dist.backend, cfg.dist.timeout_s)
    model.to(ctx.device)
    distributed_utils.print0("only rank 0 says this")

torchrun and srun launches are recognised from the environment; anything else is one process.
Every helper here also works in a single process, so callers never branch on "am I distributed".
"""
from __future__ import annotations

import itertools
import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch.torch_version import TorchVersion

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


@dataclass(frozen=True)
class DistContext:
    env: DistEnv
    device: torch.device
    backend: str


_ctx: DistContext | None = None
_cpu_group: Any = None  # a gloo group for host-side flags, so agreeing on one never waits for the GPU


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


# ---------------------------------------------------------------------------------------------------------------------
# Init / teardown and "who am I" anywhere


def nccl_fault_env(trace_dir: str, torch_version: str = torch.__version__) -> dict[str, str]:
    """NCCL's watchdog settings for a job that must end, not hang, when a rank fails, and say why:
    async error handling (a failed or timed-out collective tears the process down, so the launcher ends the job),
    and the flight recorder (the last collectives of every rank), dumped to <trace_dir>/nccl_trace_rank_<rank> on a
    timeout. The recorder's settings go by the names `torch_version` reads: TORCH_FR_* from torch 2.8, which still
    reads the older TORCH_NCCL_* names, but with a deprecation warning from every rank; those older names before."""
    prefix = os.path.join(trace_dir, "nccl_trace_rank_")
    new = TorchVersion(torch_version) >= "2.8"
    return {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_FR_BUFFER_SIZE" if new else "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
            "TORCH_FR_DUMP_TEMP_FILE" if new else "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix}


def setup(backend: str = "auto", timeout_s: int = 1800, trace_dir: str = "") -> DistContext:
    """Read the launch, pick this rank's device and join the process group when there are several ranks.

    Args:
        trace_dir: where NCCL's flight recorder dumps on a timeout (nccl_fault_env); "": the working directory.
    """
    global _ctx
    if timeout_s <= 0:
        raise DistError(f"dist.timeout_s={timeout_s} must be positive")
    env = detect_env()
    backend = _resolve_backend(backend)
    device = _claim_device(env)
    if env.distributed and not dist.is_initialized():
        _export(env)
        if backend == "nccl":  # the user's own settings win
            for name, value in nccl_fault_env(os.path.abspath(trace_dir or ".")).items():
                os.environ.setdefault(name, value)
        extra = {"device_id": device} if backend == "nccl" else {}  # lets NCCL connect eagerly, on the right GPU
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                timeout=timeout, **extra)
        global _cpu_group
        # The side group for objects and host-side waits (main_first) honours dist.timeout_s too; None: the default.
        _cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    _ctx = DistContext(env, device, backend)
    if restarts_share_a_store():
        print0("warning: torchrun --max-restarts with its shared rendezvous store can hand restarted workers the "
               "previous round's addresses, so a restart may fail to connect (pytorch/pytorch#135712); export "
               "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun")
    return _ctx


def restarts_share_a_store() -> bool:
    """torchrun may restart the workers and keeps one store for every round (its default since torch 2.5)."""
    return (os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0"
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def _resolve_backend(name: str) -> str:
    cuda = torch.cuda.is_available()
    if name == "auto":
        return "nccl" if cuda else "gloo"
    if name == "nccl" and not cuda:
        raise DistError("dist.backend=nccl needs CUDA but no GPU is visible; use dist.backend=gloo or auto")
    return name


def _claim_device(env: DistEnv) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    # srun --gpus-per-task (or any per-task CUDA_VISIBLE_DEVICES) leaves each task seeing only its own GPU.
    # If instead several ranks really share one GPU, NCCL refuses loudly, so this cannot hide a mistake.
    index = 0 if count == 1 else env.local_rank
    if index >= count:
        raise DistError(f"local rank {env.local_rank} has no GPU: {count} visible on this node; "
                        f"launch at most {count} processes per node")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


def _export(env: DistEnv) -> None:
    # env:// reads these; srun sets none of them, and a hand launch may have set only RANK/WORLD_SIZE.
    os.environ.update({
        "MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port),
        "RANK": str(env.rank), "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank), "LOCAL_WORLD_SIZE": str(env.local_world_size),
    })


def cleanup() -> None:
    global _ctx, _cpu_group
    if _active():
        dist.destroy_process_group()
    _ctx, _cpu_group = None, None


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _current_env() -> DistEnv:
    # Before setup() the launcher's variables already say which rank this is, so print0 gates correctly
    # even for messages printed while setting up.
    return _ctx.env if _ctx is not None else detect_env()


def cores_per_process() -> int:
    """The CPU cores this process can count on: those it may run on, shared with the other processes of its node,
    unless the launcher gave each its own (SLURM's --cpus-per-task, with task binding)."""
    cores = len(os.sched_getaffinity(0))
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit():
        return max(1, min(cores, int(per_task)))
    return max(1, cores // _current_env().local_world_size)


def get_rank() -> int:
    return _current_env().rank


def get_world_size() -> int:
    return _current_env().world_size


def is_main_process() -> bool:
    return _current_env().is_main


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only: the one place where rank-0 gating of output is decided."""
    if is_main_process():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Collectives; each is the identity when there is no process group


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all ranks, in place; returns `t` for chaining."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any. A host-side collective: on GPUs it neither syncs the device
    nor waits behind queued kernels, unlike all-reducing a CUDA tensor and reading it back."""
    if not _active():
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_cpu_group)
    return t.item() > 0


def main_first(work: Callable[[bool], Any], wait_s: float = 0) -> Any:
    """work(True) on rank 0 (download, scan, write a cache), then work(False) on the other ranks once it is done.

    A UserError on rank 0 is agreed over the CPU group, so the other ranks stop with it instead of waiting.
    wait_s: how long the other ranks wait for rank 0, where its work may outlast dist.timeout_s (a data set's
    first download); 0: dist.timeout_s.
    """
    result, failure = None, None
    if is_main_process():
        try:
            result = _outwaited(lambda: work(True), wait_s) if wait_s and _active() else work(True)
        except UserError as e:
            failure = e
    elif wait_s and _active():
        _outwaited(lambda: None, wait_s)
    if any_rank(failure is not None):
        raise failure or UserError("rank 0 stopped; its message says why")
    return result if is_main_process() else work(False)


POLL_S = 1.0  # how often the ranks waiting in main_first ask whether rank 0 is done


def _outwaited(work: Callable[[], Any], wait_s: float) -> Any:
    """work() in a thread of its own while every rank asks every POLL_S whether rank 0's is done: collectives of a
    moment each, none near dist.timeout_s, for at most wait_s."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as e:  # handed to the caller's thread below
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + wait_s
    while not any_rank(is_main_process() and not thread.is_alive()):
        if time.monotonic() > deadline:
            raise UserError(f"rank 0 has not finished preparing the data after {wait_s / 3600:.1f} h; prepare it "
                            f"before the run (see the README for the data set's command)")
        thread.join(POLL_S)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")


def barrier() -> None:
    if _active():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, indexed by rank."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
