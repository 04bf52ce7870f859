"""train_one_epoch and evaluate: the two loops, shared by train.py, eval.py and the benchmark.

How one batch travels: loader -> device (channels_last) -> batch_transform (uint8 -> flipped, RandAugmented or
pad-cropped, normalised, erased float; every recipe) -> mixup/cutmix -> model under autocast -> loss ->
backward (no_sync on accumulation micro-steps) -> unscale + clip -> optimizer step -> EMA update ->
loss kept on the device and reduced across ranks only at the log interval.
"""
from __future__ import annotations

import contextlib
import enum
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import distributed_utils as du
from core.errors import NonFiniteLoss
from engine.checkpointing import Checkpointer, RunState
from engine.ema import Ema
from engine.logging import RunLogger
from engine.optim import set_lr
from engine.precision import autocast
from engine.preemption import StopRequest
from engine.profiling import phase


@dataclass
class TrainParts:
    """Everything one optimizer step touches, built once by train.py."""
    model: nn.Module  # what forward runs through: DDP and/or torch.compile wrapper
    raw_model: nn.Module  # the bare ConvNeXt, for EMA and state_dict (no module./_orig_mod. prefixes)
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    scaler: torch.amp.GradScaler
    lr_fn: Callable[[int], float]
    device: torch.device
    amp: str = "none"
    accum_steps: int = 1
    clip_grad: float = 0.0
    channels_last: bool = False
    ema: Optional[Ema] = None
    mixup: Optional[Callable] = None  # timm Mixup
    batch_transform: Optional[Callable] = None  # batch work after the copy to the device (data.batch_transforms)
    max_bad_steps: int = 0  # non-finite steps that may be skipped in all before the run stops


class EpochEnd(enum.Enum):
    """Why train_one_epoch returned."""
    DONE = "the epoch's batches are done"
    STOP_REQUESTED = "a stop signal reached a rank (preemption): checkpoint and exit"


def non_finite_loss(what: str, epoch: int, step: int) -> NonFiniteLoss:
    return NonFiniteLoss(f"non-finite training loss ({what}) at epoch {epoch}, step {step}; the checkpoints on "
                         f"disk are from before it and untouched. Lower optim.lr, set train.clip_grad or "
                         f"train.amp=bf16, or let train.max_bad_steps skip a few such steps")


def to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True, memory_format=memory_format)
    return images, labels.to(device, non_blocking=True)


def _micro_batches(loader: Iterable, accum_steps: int):
    """Yield lists of accum_steps batches; a trailing incomplete group is dropped."""
    group, batches = [], iter(loader)
    while True:
        with phase("data"):  # the wait for the loader, in a profiler's trace
            batch = next(batches, None)
        if batch is None:
            return
        group.append(batch)
        if len(group) == accum_steps:
            yield group
            group = []


def _optimizer_step(parts: TrainParts, want_norm: bool) -> Optional[torch.Tensor]:
    parts.scaler.unscale_(parts.optimizer)  # clip real gradients, not fp16-scaled ones (a no-op without fp16)
    norm = None
    # The optimizer's flat list, not model.parameters(): walking the modules costs ~0.3 ms for atto.
    params = [param for group in parts.optimizer.param_groups for param in group["params"]]
    if parts.clip_grad > 0:
        norm = nn.utils.clip_grad_norm_(params, parts.clip_grad)
    elif want_norm:  # the norm alone: clip_grad_norm_ with max inf would still multiply every gradient by 1
        norm = nn.utils.get_total_norm([param.grad for param in params if param.grad is not None])
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    return norm


def _ranks_non_finite(loss: torch.Tensor) -> int:
    """One all-reduce: a NaN on one rank must stop (or skip) the step on all of them."""
    return int(du.all_reduce_sum((~torch.isfinite(loss)).float()).item())


def _skip_step(parts: TrainParts, run: RunState, bad_ranks: int) -> None:
    """Drop this step's gradients instead of stepping; stop once more than max_bad_steps were dropped."""
    parts.optimizer.zero_grad(set_to_none=True)
    run.bad_steps += 1
    what = f"on {bad_ranks} of {du.get_world_size()} processes"
    if run.bad_steps > parts.max_bad_steps:
        raise non_finite_loss(what + f", more than train.max_bad_steps={parts.max_bad_steps} such steps", run.epoch,
                              run.step)
    du.print0(f"warning: non-finite loss {what} at epoch {run.epoch}, step {run.step}: step skipped "
              f"({run.bad_steps} of train.max_bad_steps={parts.max_bad_steps})")


class _LossWindow:
    """The steps since the last train record; their loss stays on the device until the record is due."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.steps, self.start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1

    def flush(self) -> tuple[float, int, float]:
        """(mean loss over all ranks, steps, seconds) of the window, which then starts afresh; one all-reduce."""
        mean = du.all_reduce_sum(self.loss_sum.clone()).item() / (self.steps * du.get_world_size())
        closed = (mean, self.steps, time.perf_counter() - self.start)
        self.loss_sum.zero_()
        self.steps, self.start = 0, time.perf_counter()
        return closed


def train_one_epoch(parts: TrainParts, loader, run: RunState, *, logger: RunLogger, log_every: int,
                    global_batch: int, stop: Optional[StopRequest] = None, checkpointer: Optional[Checkpointer] = None,
                    on_step: Optional[Callable[[], None]] = None) -> EpochEnd:
    """One pass over the loader (the rest of epoch run.epoch), advancing `run` step by step.

    Args:
        run: the run's position; its step, epoch_samples and bad_steps move on with each optimizer step.
        global_batch: samples per optimizer step over all ranks.
        stop: the stop request, agreed on by all ranks every few steps: the pass returns STOP_REQUESTED at once.
        checkpointer: saves mid-epoch when checkpoint.every_steps asks (the epoch's last step is the caller's to
            save, after evaluating).
        on_step: called after each optimizer step (the profiler, the benchmark's clock).

    A non-finite loss is found at the log interval (the loss reduction is already there), or at every step when
    train.max_bad_steps allows skipping such steps.
    """
    parts.model.train()
    steps = len(loader) // parts.accum_steps
    ddp = hasattr(parts.model, "no_sync")  # DDP, also when wrapped by torch.compile (which forwards attributes)
    window = _LossWindow(parts.device)
    # A context, so an error closes (and clears) the bar and its message starts on a line of its own.
    with logger.progress(steps, f"epoch {run.epoch}") as bar:
        for i_step, group in enumerate(_micro_batches(loader, parts.accum_steps), start=1):
            lr = parts.lr_fn(run.step)
            set_lr(parts.optimizer, lr)
            step_loss = _forward_backward(parts, group, ddp)
            run.step += 1
            run.epoch_samples += global_batch
            log_now = run.step % log_every == 0 or i_step == steps  # and at the end of the epoch
            norm = None
            bad_ranks = _ranks_non_finite(step_loss) if parts.max_bad_steps else 0
            if bad_ranks:
                _skip_step(parts, run, bad_ranks)  # its loss stays out of the logged mean
            else:
                window.add(step_loss)
                with phase("optimizer"):
                    norm = _optimizer_step(parts, want_norm=log_now)
                    if parts.ema is not None:
                        parts.ema.step(parts.raw_model, run.step)
            bar.update()
            if log_now and window.steps:
                _log(logger, bar, window, run, lr, norm, global_batch)
            if on_step is not None:
                on_step()
            if stop is not None and stop.agreed(run.step):
                return EpochEnd.STOP_REQUESTED
            if checkpointer is not None and i_step < steps and checkpointer.due():
                checkpointer.save()
    return EpochEnd.DONE


def _forward_backward(parts: TrainParts, group: list, ddp: bool) -> torch.Tensor:
    """Gradients of one optimizer step's micro-batches; returns the step's loss (on the device)."""
    step_loss = torch.zeros((), device=parts.device)
    for i, (images, labels) in enumerate(group):
        images, labels = to_device(images, labels, parts.device, parts.channels_last)
        if parts.batch_transform is not None:
            images = parts.batch_transform(images)
        if parts.mixup is not None:
            if len(images) % 2:  # a batch that lost an unreadable image (data.skip_corrupt); Mixup pairs images
                images, labels = images[:-1], labels[:-1]
            images, labels = parts.mixup(images, labels)
        # Only the last micro-step all-reduces gradients; the others accumulate locally.
        sync = i == len(group) - 1
        with contextlib.nullcontext() if sync or not ddp else parts.model.no_sync():
            with phase("forward"), autocast(parts.device, parts.amp):
                loss = parts.criterion(parts.model(images), labels) / parts.accum_steps
            with phase("backward"):
                parts.scaler.scale(loss).backward()
        step_loss += loss.detach().float()
    return step_loss


def _log(logger: RunLogger, bar, window: _LossWindow, run: RunState, lr: float, norm: Optional[torch.Tensor],
         global_batch: int) -> None:
    """The train record of the steps since the last one (one all-reduce); a non-finite mean loss stops the run."""
    mean_loss, window_steps, elapsed = window.flush()
    if not math.isfinite(mean_loss):
        raise non_finite_loss(f"mean {mean_loss} since the last record", run.epoch, run.step)
    record = {"epoch": run.epoch, "step": run.step, "loss": mean_loss, "lr": lr,
              "img_per_s": window_steps * global_batch / elapsed}
    if norm is not None:
        record["grad_norm"] = norm.item()
    logger.log("train", record, run.step)
    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{record['img_per_s']:.0f}",
                    refresh=False)  # shown at the bar's next redraw


def tta_views(images: torch.Tensor, tta: str = "none") -> list[torch.Tensor]:
    """The views whose logits evaluate() averages: the batch itself; with "flip" also its mirror image; with
    "flip_shift" also the batch moved by one pixel up, down, left and right (edges replicated); with
    "flip_x_shift" the mirror image moved those four ways as well (10 views)."""
    views = [images]
    if tta != "none":
        views.append(images.flip(3))
    shifted = views[:2] if tta == "flip_x_shift" else views[:1] if tta == "flip_shift" else []
    h, w = images.shape[2:]
    for view in shifted:
        padded = F.pad(view, (1, 1, 1, 1), mode="replicate")
        views += [padded[:, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                  for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1))]
    return views


def eval_logits(model: nn.Module, images: torch.Tensor, device: torch.device, amp: str,
                memory_format: torch.memory_format, tta: str) -> torch.Tensor:
    """The float32 logits evaluation takes for a batch on the device (normalised): the model's under autocast,
    averaged over the test-time views (tta_views); evaluate's and predict's."""
    with autocast(device, amp):
        return torch.stack([model(view.contiguous(memory_format=memory_format)).float()
                            for view in tta_views(images, tta)]).mean(0)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "none", channels_last: bool = False,
             num_classes: int = 0, tta: str = "none", batch_transform: Optional[Callable] = None) -> dict:
    """Exact top-1/top-5/loss over the whole split: each rank sums over its own shard, then one all-reduce.

    The eval sampler gives every sample to exactly one rank, so nothing is padded or counted twice. With
    num_classes, the record also holds "confusion": counts[true class][predicted class], over all ranks.
    tta (aug.tta) averages the logits of the tta_views of each batch: test-time augmentation. batch_transform runs on
    each batch once it is on the device (the imagenet recipe's normalisation).
    """
    model.eval()
    sums = torch.zeros(4 + num_classes * num_classes, dtype=torch.float64, device=device)  # loss, top1, top5, n
    # Counted in int64 by index_add_, whose output size is fixed: bincount reads its size back from the device,
    # a sync every batch. Integer atomics add exactly in any order.
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format  # shifted views are strided
    count = 0  # on the host: a tensor made from it per batch would be a blocking copy to the GPU every batch
    for images, labels in loader:
        count += labels.numel()
        images, labels = to_device(images, labels, device, channels_last)
        if batch_transform is not None:
            images = batch_transform(images)
        logits = eval_logits(model, images, device, amp, memory_format, tta)
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(labels[:, None])
        sums[:3] += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                                 hits[:, 0].sum().double(), hits.any(dim=1).sum().double()])
        if num_classes:
            pairs = labels * num_classes + logits.argmax(dim=1)
            confusion.index_add_(0, pairs, torch.ones_like(pairs))
    sums[3] = count
    sums[4:] = confusion  # one all-reduce for all; float64 holds counts exactly up to 2^53
    sums = du.all_reduce_sum(sums)
    loss, top1, top5, n = sums[:4].tolist()
    n = int(n)
    record = ({"top1": 0.0, "top5": 0.0, "loss": math.nan, "samples": 0} if n == 0 else
              {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n, "samples": n})
    if num_classes:
        record["confusion"] = sums[4:].view(num_classes, num_classes).long().tolist()
    return record
