"""Writing checkpoint files off the training path: a process of rank 0's own serialises, writes, fsyncs, renames and
prunes (engine.checkpointing.files.save_training_checkpoint) while the ranks train on.

A process, not a thread: torch.save holds the GIL while it serialises, so a writer thread stalls the training loop's
Python for most of the write. The state reaches the writer through shared memory, an anonymous memfd (not /dev/shm,
which containers often cap at 64 MB): rank 0 copies every tensor into it, the only part of a save that holds the
ranks, and sends the rest (the config, the python RNG states), a few kilobytes, through a pipe. On CUDA the memory
is pinned where CUDA allows, so the copies from the device run at full speed. The writer dies with its parent (a
killed rank leaves no writer behind to rename a file into a folder that a restarted run already uses) and ignores
the stop signals, which are the rank's to act on.

    python -m engine.checkpointing FD    # started by BackgroundWriter, never by hand (main here, by __main__.py)
"""
from __future__ import annotations

import ctypes
import fcntl
import math
import mmap
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

import distributed_utils as du
from core.errors import CheckpointError, UserError
from engine.checkpointing.files import save_training_checkpoint, step_file

ALIGN = 64  # byte alignment of each tensor in the shared memory
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class WriteJob:
    """save_training_checkpoint's arguments besides the state."""
    output_dir: str
    step: int
    keep_last: int
    best: bool = False
    score: float | None = None
    keep_best: int = 0

    @property
    def path(self) -> str:
        return step_file(self.output_dir, self.step)


@dataclass(frozen=True)
class Slot:
    """Where a tensor lies in the shared memory."""
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _map_leaves(tree: Any, leaf: type, fn) -> Any:
    """`tree` (dicts, lists, tuples) with each instance of `leaf` in it replaced by fn(it), in order."""
    if isinstance(tree, leaf):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map_leaves(v, leaf, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_leaves(v, leaf, fn) for v in tree)
    return tree


def tensors_in(tree: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map_leaves(tree, torch.Tensor, found.append)
    return found


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def shared_bytes(tree: Any) -> int:
    """The shared memory the tensors of `tree` take."""
    return sum(_aligned(t.nbytes) for t in tensors_in(tree))


def pack(tree: Any, flat: torch.Tensor) -> Any:
    """`tree` with each tensor copied into `flat` (uint8) and replaced by its Slot (pickling even small tensors
    costs more than copying them): what stays valid while training changes the originals. Copies from CUDA are
    queued (non_blocking); the caller synchronises before the writer reads them."""
    offset = 0

    def copy(tensor: torch.Tensor) -> Slot | torch.Tensor:
        nonlocal offset
        if tensor.nbytes == 0:
            return torch.empty(tensor.shape, dtype=tensor.dtype)
        view = flat[offset:offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor.detach(), non_blocking=True)
        slot, offset = Slot(offset, tensor.dtype, tuple(tensor.shape)), offset + _aligned(tensor.nbytes)
        return slot

    return _map_leaves(tree, torch.Tensor, copy)


def unpack(tree: Any, buffer: Any) -> Any:
    """The tensors of a packed tree, each its own storage over its region of `buffer` (so torch.save writes each
    tensor's bytes once, and nothing between them)."""

    def view(slot: Slot) -> torch.Tensor:
        count = math.prod(slot.shape)
        return torch.frombuffer(buffer, dtype=slot.dtype, count=count, offset=slot.offset).view(slot.shape)

    return _map_leaves(tree, Slot, view)


def to_host(tree: Any) -> Any:
    """`tree` with its tensors in host memory: a file of device tensors cannot be read without that device (the
    background writer's files hold host tensors too). One blocking copy a tensor, into pageable memory: the inline
    writer waits for the whole write anyway, and pinned memory would stay locked after it."""
    return _map_leaves(tree, torch.Tensor, lambda tensor: tensor.detach().cpu())


def _cuda_get_last_error() -> Callable[[], int]:
    """cudaGetLastError of the CUDA runtime torch calls, which torch.cuda.cudart() does not bind: looked up through
    libtorch_cuda.so, so that it is the libcudart torch links (torchvision bundles a copy with its own error state)."""
    return ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cuda.so")).cudaGetLastError


def clear_cuda_error(failure: str) -> None:
    """Reset this thread's last CUDA runtime error, which a failed runtime call (the `failure`) leaves set: torch
    checks it after the next kernel launch, and would raise it there, at an unrelated op."""
    try:
        _cuda_get_last_error()()
    except (OSError, AttributeError) as e:
        raise CheckpointError(f"{failure}, and the CUDA error it left cannot be cleared ({e}); "
                              f"set checkpoint.background=false") from None


class SharedMemory:
    """Anonymous shared memory as a uint8 tensor that grows as needed, pinned (with `pin`) for CUDA's asynchronous
    copies; its file descriptor is inherited by the writer, which maps it again when it grows."""

    def __init__(self, pin: bool) -> None:
        self.fd = os.memfd_create("convnext-checkpoint", 0)  # no MFD_CLOEXEC: the writer inherits it
        self.nbytes, self.map, self.flat, self.pin, self.pinned = 0, None, None, pin, False

    def reserve(self, nbytes: int) -> torch.Tensor:
        """At least `nbytes` of it (the contents are not kept when it grows)."""
        nbytes = max(nbytes, ALIGN)  # a mapping is never empty
        if nbytes > self.nbytes:
            self._unmap()
            self.nbytes = _aligned(nbytes)
            os.ftruncate(self.fd, self.nbytes)
            self.map = mmap.mmap(self.fd, self.nbytes)
            self.flat = torch.frombuffer(self.map, dtype=torch.uint8)
            self.pinned = self.pin and self._register()
        return self.flat

    def _register(self) -> bool:
        """Pin the mapping. Where CUDA refuses (a cap on locked memory, say), the copies run from unpinned memory,
        slower, and the run says so once: a refusal is not asked again when the memory grows."""
        cudart = torch.cuda.cudart()
        status = cudart.cudaHostRegister(self.flat.data_ptr(), self.nbytes, 0)
        if status == 0:
            return True
        cause = cudart.cudaGetErrorString(status)
        clear_cuda_error(f"CUDA refused to pin the checkpoint writer's shared memory ({cause})")
        self.pin = False
        du.print0(f"warning: CUDA refused to pin the checkpoint writer's shared memory ({cause}); checkpoints are "
                  f"copied from the GPU unpinned, slower. checkpoint.background=false writes them from the training "
                  f"process instead")
        return False

    def _unmap(self) -> None:
        if self.pinned and torch.cuda.cudart().cudaHostUnregister(self.flat.data_ptr()) != 0:
            clear_cuda_error("CUDA refused to unpin the checkpoint writer's shared memory")
        if self.map is not None:
            self.flat = None
            self.map.close()

    def close(self) -> None:
        self._unmap()
        os.close(self.fd)


class InlineWriter:
    """Writes in the training process: the ranks wait for the whole write (checkpoint.background=false)."""

    last_write_s = 0.0

    def submit(self, state: dict, job: WriteJob) -> None:
        start = time.perf_counter()
        save_training_checkpoint(to_host(state), **asdict(job))
        self.last_write_s = time.perf_counter() - start

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        pass

    def close(self) -> None:
        pass


class BackgroundWriter:
    """Hands checkpoints to a writer process, started at once so that it is ready by the first save; at most one
    write is in flight, a new one first waits for it.

    A failed write (full disk, lost mount) is raised as a CheckpointError by the next submit, wait or close; the
    files it would have replaced are untouched (core.files.atomic_write).

    Args:
        cuda: the state is on a CUDA device: pin the shared memory, wait for the copies before handing it over.
        expected_bytes: the state's size as far as it is known: that much shared memory is mapped (its pages
            touched, in a thread) before the first save, which would otherwise pay for it while the ranks wait.
    """

    def __init__(self, cuda: bool = False, expected_bytes: int = 0) -> None:
        self.cuda = cuda
        self.memory = SharedMemory(pin=cuda)
        flat = self.memory.reserve(expected_bytes)
        self.touching = threading.Thread(target=flat.fill_, args=(0,), daemon=True)  # fill_ lets go of the GIL
        self.touching.start()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")])),
               "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.checkpointing", str(self.memory.fd)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(self.memory.fd,),
                                     env=env, start_new_session=True)
        try:  # room for a whole request (the ranks' python RNG states are most of it), so that the first save
            fcntl.fcntl(self.proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)  # need not wait for the writer to start
        except OSError:
            pass
        self.in_flight: WriteJob | None = None
        self.last_write_s = 0.0  # how long the writer took for the last finished write

    def submit(self, state: dict, job: WriteJob) -> None:
        self.wait()
        self.touching.join()
        packed = pack(state, self.memory.reserve(shared_bytes(state)))
        if self.cuda:
            torch.cuda.synchronize()  # the device-to-host copies are in the shared memory before the writer reads
        try:
            pickle.dump((packed, self.memory.nbytes, job), self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise CheckpointError(f"cannot write '{job.path}': {self._ended()}") from None
        self.in_flight = job

    def done(self) -> bool:
        """Whether the write in flight (if any) has finished; its outcome is reported by the next wait."""
        return self.in_flight is None or bool(select.select([self.proc.stdout], [], [], 0)[0])

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise its failure."""
        job, self.in_flight = self.in_flight, None
        if job is None:
            return
        try:
            outcome, message = pickle.load(self.proc.stdout)
        except (EOFError, pickle.UnpicklingError):
            outcome, message = "error", self._ended()
        if outcome == "ok":
            self.last_write_s = message
        elif outcome == "user":  # a full disk, a lost mount: the message names the file and the way out
            raise CheckpointError(message)
        else:
            raise CheckpointError(f"the background write of '{job.path}' failed ({message}); the checkpoints "
                                  f"written before it are untouched")

    def _ended(self) -> str:
        return (f"the checkpoint writer process ended (exit code {self.proc.wait()}); the checkpoints written before "
                f"are untouched. Start the run again to resume, or set checkpoint.background=false")

    def close(self) -> None:
        """Wait for the write in flight, then end the writer."""
        try:
            self.wait()
        finally:
            try:  # by message, not by closing the pipe: loader workers forked since hold its write end too
                pickle.dump(None, self.proc.stdin)
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            self.proc.wait()
            self.proc.stdout.close()
            self.memory.close()


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the process that started it ends, however it ends."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main(argv: list[str]) -> int:
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent ended before the request took effect
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):  # the rank decides when to stop, then waits for us
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(1)
    fd, mapped = int(argv[0]), None
    requests, replies = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    sys.stdout = sys.stderr  # stray prints must not corrupt the replies
    while True:
        try:
            request = pickle.load(requests)
        except EOFError:  # the rank is gone
            return 0
        if request is None:  # the rank closed the writer
            return 0
        packed, nbytes, job = request
        start = time.perf_counter()
        if mapped is None or len(mapped) != nbytes:  # the rank grew the memory
            mapped = mmap.mmap(fd, nbytes)
        try:
            save_training_checkpoint(unpack(packed, mapped), **asdict(job))
            reply = ("ok", time.perf_counter() - start)
        except UserError as e:
            reply = ("user", str(e))
        except Exception as e:  # reported by the rank in one line; the rank decides to stop
            reply = ("error", f"{type(e).__name__}: {e}")
        pickle.dump(reply, replies)
        replies.flush()
