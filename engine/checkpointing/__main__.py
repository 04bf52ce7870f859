"""The background writer's process (engine.checkpointing.writer.main), started by BackgroundWriter as
`python -m engine.checkpointing FD`: run from here, the writer module keeps its own name, so the Slot it unpickles is
the class the rank pickles (run as `-m ...writer` it would be __main__'s, a different class)."""
import sys

from engine.checkpointing import writer

sys.exit(writer.main(sys.argv[1:]))
