"""log.wandb: the train and eval records and the config, in W&B's offline mode, continued by a resumed run.

wandb is not in the test venv (`import timm` would import it in every process): `make test` installs it into a
folder of its own, WANDB_SITE, which the W&B runs and the reading of their files get on PYTHONPATH.
"""
import glob
import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest

from core.config import ConfigError
from engine.build import load_run_config
from engine.checkpointing import last_checkpoint
from engine.logging import read_metrics
from helpers import DEBUG, INLINE_SAVES, ROOT, run, run_here

WANDB_SITE = os.environ.get("WANDB_SITE", "")


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


def test_a_run_without_log_wandb_never_imports_it(tmp_path, monkeypatch):
    """With wandb made unimportable, a whole training run goes through. (timm itself tries `import wandb` when it is
    installed, in timm.utils.summary, so the module may be loaded all the same; this code never needs it.)"""
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    run_here(["train.py", "--config", DEBUG, f"output_dir={tmp_path}", "schedule.epochs=1",
              "data.synthetic_train_size=32", INLINE_SAVES])
    assert read_metrics(str(tmp_path), "eval")


def test_asking_for_wandb_without_it_installed_says_how_to_install(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"^log.wandb=true needs the wandb package, which is not installed: "
                                          r"pip install wandb"):
        load_run_config(DEBUG, ["log.wandb=true"])


def read_back(*paths):
    """summary(path) of each path, in one process that sees WANDB_SITE, and this checkout's code for the module's
    own imports (helpers)."""
    out = subprocess.run([sys.executable, __file__, *paths], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([WANDB_SITE, str(ROOT)])})
    return [(run_id, set(config), {int(step): items for step, items in history.items()})
            for run_id, config, history in json.loads(out.stdout)]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(WANDB_SITE), reason="no WANDB_SITE with wandb installed (make test makes one)")
def test_wandb_offline_records_what_tensorboard_gets_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("PYTHONPATH", WANDB_SITE)  # for the training runs
    out = str(tmp_path / "run")
    # 8 steps an epoch on 1 and on 2 processes; the second start, on 2, logs from rank 0 only.
    wandb = ["log.wandb=true", "log.wandb_project=test", "log.wandb_name=debug", "log.wandb_tags=[a,b]",
             "train.global_batch=32", INLINE_SAVES]
    run(["train.py", "--config", DEBUG, f"output_dir={out}", "schedule.epochs=1", *wandb])
    run(["train.py", "--config", DEBUG, f"output_dir={out}", "schedule.epochs=2", *wandb], nproc=2)
    files = sorted(glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb")))
    assert len(files) == 2  # one per start, rank 0 only
    (first_id, config, first), (second_id, _, second) = read_back(*files)
    kept = last_checkpoint(out)["wandb_id"]
    assert first_id == second_id == kept and len(kept) == 12  # the resumed run continues the W&B run
    assert {"model", "data", "optim", "log", "seed"} <= config
    logged = {**first, **second}
    for record in read_metrics(out, "train") + read_metrics(out, "eval"):
        kind = "eval" if "top1" in record else "train"
        step = record["step"] if kind == "train" else 8 * (record["epoch"] + 1)  # 8 steps an epoch
        for name in ("loss", "lr") if kind == "train" else ("top1", "top5", "ema_top1"):
            assert logged[step][f"{kind}/{name}"] == pytest.approx(record[name]), (kind, name, step)


if __name__ == "__main__":  # read_back: the offline runs' summaries as JSON
    runs = [summary(path) for path in sys.argv[1:]]
    print(json.dumps([[run_id, sorted(config), history] for run_id, config, history in runs]))
