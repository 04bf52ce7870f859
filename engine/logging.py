"""Run outputs a person reads: metrics.jsonl, TensorBoard and the tqdm bar. Only rank 0 writes any of them."""
from __future__ import annotations

import json
import math
import os
from typing import Any, TextIO

from tqdm import tqdm


class RunLogger:
    def __init__(self, output_dir: str, enabled: bool, bar_file: TextIO | None = None):
        self.enabled, self.bar_file = enabled, bar_file  # bar_file: where the bar goes (None: stderr)
        self._jsonl = None
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only the process that writes pays

            os.makedirs(output_dir, exist_ok=True)
            self._jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", buffering=1)
            self._tb = SummaryWriter(os.path.join(output_dir, "tb"))

    def log(self, kind: str, record: dict[str, Any], step: int) -> None:
        """One JSON line {"kind": kind, ...record}, and each number as TensorBoard scalar '<kind>/<name>'."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"kind": kind, **record}) + "\n")
        for name, value in record.items():
            if isinstance(value, (int, float)) and name not in ("epoch", "step") and math.isfinite(value):
                self._tb.add_scalar(f"{kind}/{name}", value, step)

    def progress(self, total: int, desc: str) -> tqdm:
        # Redrawn at most once a second: at tqdm's default of 10 a second the redraws cost ~1% of a small step.
        return tqdm(total=total, desc=desc, disable=not self.enabled, dynamic_ncols=True, leave=False,
                    file=self.bar_file, mininterval=1.0)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
