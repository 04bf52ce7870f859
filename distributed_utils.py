"""The distributed runtime: joining the process group, rank queries, rank-0 print and the few collectives the trainer
needs.

    ctx = distributed_utils.setup(cfg.dist.backend, cfg.dist.timeout_s)
    model.to(ctx.device)
    distributed_utils.print0("only rank 0 says this")

Which rank this is, of how many, comes from the launch environment (torchrun, srun; anything else is one process),
read by core.launch. Every helper here also works in a single process, so callers never branch on "am I distributed".
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.torch_version import TorchVersion

from core.errors import UserError
from core.launch import DistEnv, DistError, detect_env


@dataclass(frozen=True)
class DistContext:
    env: DistEnv
    device: torch.device
    backend: str


_ctx: DistContext | None = None
_cpu_group: Any = None  # a gloo group for host-side flags, so agreeing on one never waits for the GPU


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
