"""The command line's exit policy, shared by every entry point: errors become exit codes, a UserError one line.

    if __name__ == "__main__":
        run_main(main)
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, NoReturn, Optional

import torch.distributed as dist

from core.errors import UserError
from core.launch import DistError, detect_env


def run_main(main: Callable[[], Optional[int]]) -> None:
    """Run `main` and turn its failure into an exit code: 2 for a UserError, 130 for Ctrl-C, 1 otherwise.

    A clean return exits with main's return value (None: 0) once the process group is down.
    """
    try:
        code = main()
    except UserError as e:
        message = " ".join(str(e).splitlines()) or type(e).__name__
        print(f"{_rank_tag()}error: {message}", file=sys.stderr)
        _exit(2)
    except KeyboardInterrupt:
        print(f"{_rank_tag()}interrupted", file=sys.stderr)
        _exit(130)
    except Exception:
        tag = _rank_tag()
        print("\n".join(tag + line for line in traceback.format_exc().splitlines()), file=sys.stderr)
        # After an unexpected error nothing about the process is trusted: a normal shutdown could wait on
        # collectives, process-group teardown or worker threads that the other ranks will never finish.
        # The launcher (torchrun, or srun --kill-on-bad-exit=1) sees the exit and stops the others.
        _exit(1, hard=True)
    if _group_up():
        dist.destroy_process_group()
    if code:
        sys.exit(code)


def _group_up() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_tag() -> str:
    """"[rank r] " where there are several ranks: their stderr is interleaved by the launcher. Read from the
    process group, else from the launch environment (core.launch, as distributed_utils reads it); none where that
    environment is itself what failed."""
    if _group_up():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        try:
            env = detect_env()
        except DistError:
            return ""
        rank, world = env.rank, env.world_size
    return f"[rank {rank}] " if world > 1 else ""


def _exit(code: int, hard: bool = False) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    # With a process group up, a normal exit runs its teardown, which can block on peers stuck in a
    # collective; os._exit skips it so this rank's failure reaches the launcher at once.
    if hard or _group_up():
        os._exit(code)
    sys.exit(code)
