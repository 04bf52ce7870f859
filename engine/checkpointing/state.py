"""What a checkpoint holds: the run's stateful parts, each named once in one table (checkpoint_parts) that saving,
gathering and loading iterate; RunState, the run's position; the random generators' states.

A part has state_dict(), its entries of the checkpoint, and load_state_dict(checkpoint), which takes them back from
the whole checkpoint: the file is one flat dict, the layout that eval.py, models.export and model.pretrained read,
and a part may need a neighbour's entry (an EMA that the checkpoint lacks starts from the model's weights; the
random states come back only where the world size is the same). The entries, in the file's order:

    model                   the bare model's weights, official key layout
    model_ema               its moving average's (None for a run without one)
    optimizer, scaler       AdamW's state; the gradient scaler's (empty unless train.amp=fp16)
    epoch ... wandb_id      RunState's fields
    world_size, rng         every rank's random generators, by rank
    config                  the run's config (read, not restored)
    class_names             the label of each output, in order (read, not restored): what predict.py and the
                            exports name the classes by
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional, Protocol

import numpy as np
import torch
from torch import nn

import distributed_utils as du
from engine.ema import Ema
from models.keys import load_weights


class Part(Protocol):
    def state_dict(self) -> dict:
        """This part's entries of the checkpoint."""

    def load_state_dict(self, checkpoint: dict) -> None:
        """Take them back from the whole checkpoint."""


def checkpoint_parts(run: "RunState", *, model: nn.Module, ema: Optional[Ema], optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler, config: dict, class_names: Optional[list[str]] = None
                     ) -> dict[str, Part]:
    """Every stateful part of a run, in the file's order (see the module's docstring for their entries)."""
    return {"model": Weights(model), "model_ema": Weights(ema.module if ema is not None else None, ema=True),
            "optimizer": Entry("optimizer", optimizer), "scaler": Scaler(scaler), "run": run,
            "rng": RandomStates(), "config": Record("config", config),
            "class_names": Record("class_names", list(class_names) if class_names is not None else None)}


class Weights:
    """A module's weights under "model", or with `ema` its moving average's under "model_ema", which a checkpoint
    without one (an EMA that a resumed run adds) fills from the model's. `module` None: a run without it."""

    def __init__(self, module: Optional[nn.Module], ema: bool = False):
        self.module, self.ema, self.entry = module, ema, "model_ema" if ema else "model"

    def state_dict(self) -> dict:
        return {self.entry: self.module.state_dict() if self.module is not None else None}

    def load_state_dict(self, checkpoint: dict) -> None:
        if self.module is not None:
            load_weights(self.module, checkpoint, ema=self.ema and checkpoint.get(self.entry) is not None)


class Entry:
    """An object with state_dict/load_state_dict of its own (the optimizer), under `entry`."""

    def __init__(self, entry: str, obj):
        self.entry, self.obj = entry, obj

    def state_dict(self) -> dict:
        return {self.entry: self.obj.state_dict()}

    def load_state_dict(self, checkpoint: dict) -> None:
        self.obj.load_state_dict(checkpoint[self.entry])


class Scaler(Entry):
    """The gradient scaler, under "scaler"; an fp16 run resumed from a checkpoint without fp16 starts a fresh one."""

    def __init__(self, scaler: torch.amp.GradScaler):
        super().__init__("scaler", scaler)

    def load_state_dict(self, checkpoint: dict) -> None:
        if self.obj.is_enabled() and not checkpoint["scaler"]:  # an enabled GradScaler refuses a disabled one's state
            du.print0("warning: the checkpoint was written without train.amp=fp16 and has no gradient scaler state; "
                      "the fp16 scaler starts afresh")
        else:
            super().load_state_dict(checkpoint)


class Record:
    """An entry written for the record and for the tools that read checkpoints (the config, the class names); a
    resume does not restore it."""

    def __init__(self, entry: str, value: object):
        self.entry, self.value = entry, value

    def state_dict(self) -> dict:
        return {self.entry: self.value}

    def load_state_dict(self, checkpoint: dict) -> None:
        pass


@dataclass
class RunState:
    """Where a run stands: what a checkpoint must record, besides the weights, to continue exactly. Its entries are
    its fields."""
    epoch: int = 0  # the epoch to run (or continue) next
    epoch_samples: int = 0  # samples of that epoch's global order already trained on
    step: int = 0  # optimizer steps done in all
    best_top1: float = -1.0
    bad_steps: int = 0  # non-finite steps skipped so far (train.max_bad_steps)
    wandb_id: str = ""  # the W&B run this run logs to (log.wandb), continued on resume

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, checkpoint: dict) -> None:
        """From a checkpoint; keys that older checkpoints lack keep their defaults."""
        for field in fields(self):
            setattr(self, field.name, checkpoint.get(field.name, field.default))

    def end_epoch(self) -> None:
        self.epoch, self.epoch_samples = self.epoch + 1, 0


class RandomStates:
    """Every rank's random generators (rng_state), by rank, under "rng", and the world size that wrote them. Saving is
    a collective (each rank contributes its own; the list is complete on rank 0); loading restores this rank's, where
    the world size is the same."""

    def state_dict(self) -> dict:
        return {"world_size": du.get_world_size(), "rng": du.all_gather_object(rng_state())}

    def load_state_dict(self, checkpoint: dict) -> None:
        world_size = du.get_world_size()
        if checkpoint.get("world_size") == world_size and checkpoint.get("rng"):
            set_rng_state(checkpoint["rng"][du.get_rank()], warn=du.print0)
        else:
            du.print0(f"warning: the checkpoint was written by {checkpoint.get('world_size')} processes, this run has "
                      f"{world_size}: the lr follows the new global batch, the epoch continues from the same sample, "
                      f"random streams start afresh")


def rng_state() -> dict:
    """This process's random generators, as tensors and builtins so the checkpoint stays weights_only. Of the CUDA
    generators only the one of this rank's own device (the current one): indices of visible devices differ between
    launches (8 visible under torchrun, one per task under srun), the rank's device is the same GPU role."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda_device": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict, warn: Callable[[str], None] = print) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    if state.get("cuda_device") is not None:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif state.get("cuda"):  # older checkpoints: every visible device's, by index; this rank's is the current one
        mine = torch.cuda.current_device()
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state(state["cuda"][mine])
        else:
            warn(f"warning: the checkpoint holds the CUDA random state of {len(state['cuda'])} visible GPUs, this "
                 f"process sees {torch.cuda.device_count()}: its CUDA random stream starts afresh")
