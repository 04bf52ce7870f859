"""log.wandb: the train and eval records and the config, in W&B's offline mode, continued by a resumed run.

wandb is not in the test venv (`import timm` would import it in every process): `make test` installs it into a
folder of its own, WANDB_SITE, which the W&B runs and the reading of their files get on PYTHONPATH.
"""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from core.config import ConfigError
from engine.build import load_run_config
from engine.checkpointing import last_checkpoint
from engine.logging import read_metrics
from helpers import DEBUG, INLINE_SAVES, run, run_here

WANDB_SITE = os.environ.get("WANDB_SITE", "")


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
    """(run id, config keys, {step: {name: value}}) of each offline run, read by tests/wandb_records.py in a process
    that sees WANDB_SITE."""
    reader = os.path.join(os.path.dirname(__file__), "wandb_records.py")
    out = subprocess.run([sys.executable, reader, *paths], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": WANDB_SITE})
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
