"""The summaries of W&B offline runs, as JSON on stdout: python tests/wandb_records.py RUN.wandb ...

tests/test_wandb.py runs this with wandb on PYTHONPATH: a process of its own that imports wandb's protobuf
definitions and nothing of the project (no torch, no timm), so reading the runs back costs a fraction of a second."""
import json
import struct
import sys


def wandb_records(path):
    """The protobuf records of an offline run's .wandb file: LevelDB's log framing (32 KiB blocks of chunks, each
    a 7-byte header: crc32c, length, type 1 whole / 2 first / 3 middle / 4 last) after W&B's 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    block, header = 32768, 7
    pos, pending = header, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0:
            break
        chunk, pos = data[pos + header:pos + header + length], pos + header + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def summary(path):
    """(run id, config keys, {step: {name: value}} of the logged history) of one offline run."""
    run_id, config, history = None, set(), {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config |= {item.key for item in record.run.config.update}
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): float(item.value_json) for item in record.history.item}
            history.setdefault(int(items["_step"]), {}).update(items)
    return run_id, config, history


if __name__ == "__main__":
    runs = [summary(path) for path in sys.argv[1:]]
    print(json.dumps([[run_id, sorted(config), history] for run_id, config, history in runs]))
