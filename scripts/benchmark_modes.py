"""The loops scripts/benchmark.py times, each a Mode: bare (the model step alone), trainer (engine.loop's step on
one batch held on the device), pipeline (the same on the real loader), the loader modes (batches fetched and
dropped), eval (engine.loop.evaluate), and --vs-timm's forward+backward of both models."""
from __future__ import annotations

import argparse
import itertools
from typing import Callable

import torch
import torch.nn.functional as F

from benchmark_flops import forward_flops  # scripts/, beside this file, as the two below
from benchmark_timing import Mode, StepClock
from benchmark_timm import timm_loader, timm_twin
import distributed_utils as du
from core.config import Config
from core.errors import UserError
from data import build_datasets, build_train_loader, start_epoch
from engine.build import RunData, build_model, build_parts, load_run_config, seed_everything, wrap_model
from engine.checkpointing import RunState
from engine.logging import RunLogger
from engine.loop import TrainParts, evaluate, to_device, train_one_epoch
from engine.optim import create_optimizer
from engine.precision import autocast
from engine.preemption import StopRequest

LOADER_MODES = ("loader", "other_loader", "timm_loader")  # fetch batches and drop them
MODES = ("bare", "trainer", "pipeline", *LOADER_MODES, "eval")
NOT_TRAINING = (*LOADER_MODES, "eval")  # modes without a training step: no training FLOPs


class Repeated:
    """One batch n times: the trainer's loop on data already in memory."""

    def __init__(self, batch, n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return itertools.repeat(self.batch, self.n)


class Batches:
    """The first n batches of a loader, over as many epochs as that takes; `len` is what train_one_epoch sees.
    on_epoch(loader, epoch) starts each epoch (ours: start_epoch; timm's loader needs nothing)."""

    def __init__(self, loader, n: int, on_epoch: Callable = start_epoch):
        self.loader, self.n, self.epoch, self.on_epoch = loader, n, 0, on_epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return itertools.islice(self._epochs(), self.n)

    def _epochs(self):
        while True:
            self.on_epoch(self.loader, self.epoch)
            self.epoch += 1
            yield from self.loader


def bare_pass(model, optimizer, batch, amp: str, accum: int, n: int, clock: StepClock) -> None:
    """The ceiling: nothing but forward, backward and the optimizer (None: forward and backward alone)."""
    images, labels = batch
    model.train()
    for i in range(1, n + 1):
        for _ in range(accum):
            with autocast(images.device, amp):
                loss = F.cross_entropy(model(images), labels) / accum
            loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        clock()


class Ticking:
    """The batches of `batches`, calling clock() after each one's work: when the consumer asks for the next."""

    def __init__(self, batches, clock: StepClock):
        self.batches, self.clock = batches, clock

    def __iter__(self):
        for batch in self.batches:
            yield batch
            self.clock()


def eval_pass(model, batches, cfg: Config, device: torch.device, transform, clock: StepClock) -> None:
    """eval.py's loop, engine.loop.evaluate, over the evaluation loader's batches, one clock tick a batch."""
    evaluate(model, Ticking(batches, clock), device, cfg.train.amp, cfg.train.channels_last, tta=cfg.aug.tta,
             batch_transform=transform)


def full_batches(loader) -> int:
    """The evaluation loader's batches of its full size (its last may be short: another shape, tuned anew)."""
    return len(loader.sampler) // loader.batch_size


def trainer_pass(parts: TrainParts, loader, cfg: Config, batch_size: int, logger: RunLogger,
                 stop: StopRequest, clock: StepClock) -> None:
    train_one_epoch(parts, loader, RunState(), logger=logger, log_every=cfg.train.log_every, global_batch=batch_size,
                    stop=stop, on_step=clock)


def loader_pass(loader, clock: StepClock) -> None:
    """Decoding and augmentation alone: the batches are fetched and dropped."""
    for _ in loader:
        clock()


def other_loader(args: argparse.Namespace, env: du.DistEnv):
    """Our train loader of the config with --other-data's overrides on top (another copy of the same images)."""
    cfg = load_run_config(args.config, [*args.overrides, *args.other_data.split()])
    train_set, _, _ = build_datasets(cfg.data, cfg.aug, seed=cfg.seed)
    return build_train_loader(train_set, cfg.data, env.rank, env.world_size, cfg.seed)


def build_runs(cfg: Config, args: argparse.Namespace, env: du.DistEnv, device: torch.device, data: RunData,
               logger: RunLogger) -> tuple[dict[str, Mode], float, int, torch.Tensor]:
    """{mode: Mode} for the asked modes, the model's forward FLOPs per image, the global batch, and a raw batch on
    the device (for --stages)."""
    accum, n = cfg.train.accum_steps, args.warmup + args.steps
    loader, transform, info = data.train_loader, data.train_transform, data.info
    # Set here, where an epoch's length is known; the other modes run as many epochs as their steps take.
    if not args.loader_steps and set(LOADER_MODES) & set(args.modes):
        args.loader_steps = timed_rest(len(loader), args.warmup, "an epoch")
    n_loader = args.warmup + args.loader_steps
    start_epoch(loader, 0)
    raw = to_device(*next(iter(loader)), device, cfg.train.channels_last)  # the in-memory batch, as loaded
    batch = (transform(raw[0]), raw[1]) if transform is not None else raw  # as the model sees it

    # Two models built alike: the bare one with the trainer's optimizer and nothing else, the trainer's with it all.
    seed_everything(cfg.seed)
    bare_model = build_model(cfg, info.num_classes, info.in_chans, device)
    bare_opt = create_optimizer(bare_model, cfg.optim, cfg.optim.lr)
    bare = torch.compile(bare_model) if cfg.train.compile else bare_model
    flops = forward_flops(bare_model, batch[0])
    seed_everything(cfg.seed)
    model = build_model(cfg, info.num_classes, info.in_chans, device)
    parts, per_step, _ = build_parts(cfg, model, data, device, env.world_size)
    parts.model = wrap_model(model, cfg, env.distributed, device)
    stop = StopRequest(signals=())  # the check's collective, without taking SIGTERM over

    def trainer(batches):
        return lambda c: trainer_pass(parts, batches, cfg, per_step, logger, stop, c)

    # The sync guard's steps: every one of the bare loop; the trainer's but those that read the loss back to log it
    # (every log_every-th and the pass's last, which ends its epoch) or to check it (train.max_bad_steps).
    guard = args.forbid_syncs and device.type == "cuda"
    every_step = (lambda k: True) if guard else None
    unlogged = (lambda k: k % cfg.train.log_every != 0 and k != n and not cfg.train.max_bad_steps) if guard else None
    per_load = cfg.data.batch_size * env.world_size
    runs = {"bare": Mode(lambda c: bare_pass(bare, bare_opt, batch, cfg.train.amp, accum, n, c), per_step,
                         args.steps, every_step),
            "trainer": Mode(trainer(Repeated(raw, n * accum)), per_step, args.steps, unlogged),  # batch work included
            "pipeline": Mode(trainer(Batches(loader, n * accum)), per_step, args.steps),
            "loader": Mode(lambda c: loader_pass(Batches(loader, n_loader), c), per_load, args.loader_steps)}
    if "other_loader" in args.modes:
        other = Batches(other_loader(args, env), n_loader)
        runs["other_loader"] = Mode(lambda c: loader_pass(other, c), per_load, args.loader_steps)
    if "timm_loader" in args.modes:
        theirs = Batches(timm_loader(cfg, env, device), n_loader, on_epoch=lambda loader, epoch: None)
        runs["timm_loader"] = Mode(lambda c: loader_pass(theirs, c), per_load, args.loader_steps)
    if "eval" in args.modes:
        runs["eval"] = eval_mode(bare_model, cfg, args, env, device, data)
    runs = {k: runs[k] for k in args.modes}
    if args.vs_timm:
        our_params = sum(p.numel() for p in bare_model.parameters())
        timm_model = timm_twin(cfg, info.num_classes, info.in_chans, device, our_params)
        for name, m in (("ours", bare), ("timm", torch.compile(timm_model) if cfg.train.compile else timm_model)):
            runs[f"{name}_fwd_bwd"] = Mode(lambda c, m=m: bare_pass(m, None, batch, cfg.train.amp, accum, n, c),
                                           per_step, args.steps, every_step)
    return runs, flops, per_step, raw[0]


def timed_rest(batches: int, warmup: int, what: str) -> int:
    """The batches left to time after the warm-up; refused where none are."""
    if batches <= warmup:
        raise UserError(f"{what} of {batches} batches leaves none to time after --warmup {warmup}")
    return batches - warmup


def eval_mode(model, cfg: Config, args: argparse.Namespace, env: du.DistEnv, device: torch.device,
              data: RunData) -> Mode:
    """The evaluation loop on the model as eval.py runs it (uncompiled): each repeat one pass over the split's full
    batches, so every repeat starts its epoch in the warm-up and leaves no worker prefetching past its end."""
    loader = data.val_loader
    if loader is None:
        raise UserError("the eval mode needs a validation split, and this data has none; leave eval out of --modes")
    args.eval_steps = timed_rest(full_batches(loader), args.warmup, "a pass over the evaluation split's full batches")
    batches = Batches(loader, args.warmup + args.eval_steps, on_epoch=lambda loader, epoch: None)  # no shuffle
    return Mode(lambda c: eval_pass(model, batches, cfg, device, data.eval_transform, c),
                loader.batch_size * env.world_size, args.eval_steps)
