"""Checkpointing, one package: what a checkpoint holds and the run's position (state), when one is written and where a
run resumes from (checkpointer), the files, their retention and reading them back (files), and the background writer
process (writer).

    from engine.checkpointing import Checkpointer, RunState
"""
from engine.checkpointing.checkpointer import Checkpointer, will_resume
from engine.checkpointing.files import checkpoint_dir, last_checkpoint, load_latest, step_file
from engine.checkpointing.state import RunState

__all__ = ["Checkpointer", "RunState", "checkpoint_dir", "last_checkpoint", "load_latest", "step_file", "will_resume"]
