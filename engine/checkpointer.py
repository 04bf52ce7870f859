"""Moved to engine.checkpointing. This name is kept only for scripts/benchmark.py's import of RunState, which its
owner changes with their next edit of that file; then this file goes."""
from engine.checkpointing import RunState

__all__ = ["RunState"]
