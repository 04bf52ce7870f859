"""Run outputs a person reads: metrics.jsonl, TensorBoard, Weights & Biases (when asked for) and the tqdm bar.
Only rank 0 writes any of them."""
from __future__ import annotations

import json
import math
import os
import secrets
from typing import Any, TextIO

from tqdm import tqdm

from core.config import Config, LogCfg, to_dict


def read_metrics(output_dir: str, kind: str) -> list[dict[str, Any]]:
    """The records of one kind ("train", "eval", ...) that a run wrote to its metrics.jsonl, in order."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def new_wandb_id() -> str:
    """An id for a new W&B run; the checkpoint keeps it, so a resumed or requeued run continues that run."""
    return secrets.token_hex(6)


def wandb_options(log: LogCfg, run_id: str, cfg: Config) -> dict | None:
    """wandb.init's arguments for this run (the resolved config included), or None when log.wandb is off."""
    if not log.wandb:
        return None
    return dict(project=log.wandb_project, name=log.wandb_name or None, entity=log.wandb_entity or None,
                tags=list(log.wandb_tags), id=run_id, resume="allow", config=to_dict(cfg))


class RunLogger:
    """Args:
        output_dir: where metrics.jsonl, tb/ and wandb/ go.
        enabled: whether this process writes (rank 0).
        bar_file: where the bar goes (None: stderr).
        wandb: wandb.init's arguments (wandb_options), or None for no W&B; wandb is imported only then.
    """

    def __init__(self, output_dir: str, enabled: bool, bar_file: TextIO | None = None, wandb: dict | None = None):
        self.enabled, self.bar_file = enabled, bar_file
        self._jsonl = self._tb = self._wandb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only the process that writes pays

            os.makedirs(output_dir, exist_ok=True)
            self._jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", buffering=1)
            self._tb = SummaryWriter(os.path.join(output_dir, "tb"))
            if wandb is not None:
                import wandb as wandb_module  # optional: checked to be installed when the config is loaded

                self._wandb = wandb_module.init(dir=output_dir, **wandb)

    def log(self, kind: str, record: dict[str, Any], step: int) -> None:
        """One JSON line {"kind": kind, ...record}, and each number as scalar '<kind>/<name>' at `step`."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"kind": kind, **record}) + "\n")
        scalars = {f"{kind}/{name}": value for name, value in record.items()
                   if isinstance(value, (int, float)) and name not in ("epoch", "step") and math.isfinite(value)}
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def progress(self, total: int, desc: str) -> tqdm:
        # Redrawn at most once a second: at tqdm's default of 10 a second the redraws cost ~1% of a small step.
        return tqdm(total=total, desc=desc, disable=not self.enabled, dynamic_ncols=True, leave=False,
                    file=self.bar_file, mininterval=1.0)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()
