"""Checkpointing, one package: what a checkpoint holds and the run's position (state), when one is written and where a
run resumes from (checkpointer), the files, their retention and reading them back (files), and the background writer
process (writer).

    from engine.checkpointing import Checkpointer, RunState

The names below are imported on first use: the writer's own process (`python -m engine.checkpointing`) imports this
package too, and needs neither the checkpointer nor timm (through the EMA), whose imports would cost every run's
writer a few seconds of CPU beside the training ranks.
"""
import importlib

_HOMES = {"Checkpointer": "checkpointer", "will_resume": "checkpointer", "RunState": "state",
          "checkpoint_dir": "files", "last_checkpoint": "files", "load_latest": "files", "step_file": "files"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
