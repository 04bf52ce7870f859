"""The background writer's process (engine.checkpointing.writer.main), started by BackgroundWriter as
`python -m engine.checkpointing FD`: run from here, the writer module keeps its own name, so the Slot it unpickles is
the class the rank pickles (run as `-m ...writer` it would be __main__'s, a different class)."""
import os
import sys

from engine.checkpointing import writer

code = writer.main(sys.argv[1:])
sys.stdout.flush()
sys.stderr.flush()
# Every write is on disk and answered by now: skip the interpreter's teardown (torch's takes most of a second),
# which the rank, closing the writer at the end of its run, waits for.
os._exit(code)
