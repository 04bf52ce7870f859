"""Where the time goes: images/s of the bare model step, of the trainer's step path and of the real data pipeline.

    python scripts/benchmark.py --config configs/fashion_mnist.yaml [--json OUT] [key=value ...]
    torchrun --nproc_per_node=2 scripts/benchmark.py --config configs/debug.yaml
    python scripts/benchmark.py --config configs/convnext_t.yaml data.name=synthetic train.amp=bf16 --vs-timm
    python scripts/benchmark.py --config configs/convnext_t.yaml --modes eval data.name=synthetic \
        data.synthetic_val_size=6400    # evaluation img/s at steady state: 25 batches of 256 a pass
    python -m data.testbed /tmp/bed    # 1,000 + 100 ImageNet-like JPEGs
    python scripts/benchmark.py --config configs/convnext_t.yaml --modes bare,loader,timm_loader --stages 200 \
        --steps 2 --loader-steps 20 data.root=/tmp/bed data.num_workers=2 data.batch_size=32
    python -m data.testbed /tmp/bed --parquet /tmp/bed_hf    # the same also as a Hugging Face data set
    python scripts/benchmark.py --config configs/convnext_t.yaml --modes loader,other_loader \
        --other-data "data.name=hf data.hf_name=/tmp/bed_hf" data.root=/tmp/bed data.num_workers=2

Three loops with the same model, batch, precision, memory format and optimizer, run in turn repeat after repeat so
that a machine getting faster or slower shifts all three alike:
  bare      forward, backward and optimizer step on one batch held on the device: the ceiling;
  trainer   engine.loop.train_one_epoch on that same batch, with all it does per step: mixup, schedule, EMA, loss
            reduction and logging, the stop-signal check, the DDP wrapper when there are several processes;
  pipeline  the same with the config's real data loader (and its copy to the device);
  eval      engine.loop.evaluate (eval.py's loop) over the real evaluation loader at steady state: its workers
            started and cuDNN tuned in --warmup untimed batches, then the rest of the split's full batches timed.
Three loader modes fetch batches and drop them, with the config's workers: `loader` ours, `other_loader` ours on
another copy of the images (--other-data, e.g. the same test bed as a Hugging Face data set), `timm_loader` timm's
own create_loader with the same recipe on the same image folder (imagenet recipe; its GPU prefetcher where there is
CUDA). Each: images/s per worker and per core, and the cores per GPU at --gpu-img-per-s; other_loader/loader and
ours/timm as ratios. --stages N also times each stage of both pipelines on N files in this process
(scripts/loader_stages.py), and the batch work ours leaves to the device per image next to the bare step's time per
image.
Each repeat times --steps optimizer steps after --warmup untimed ones; figures are medians over the repeats, ratios
the median of each repeat's own ratio. --vs-timm also times forward+backward of timm's convnext_<variant>, built
with the same options, against ours. Model FLOP utilisation (MFU) is against a known GPU's data-sheet peak (bf16/fp16)
or --peak-tflops, times the GPUs in use; on a CPU against the best matmul in the training dtype (2048^3, smaller
where the dtype is emulated), timed after every repeat. --forbid-syncs (CUDA only) runs the timed steps of bare and
trainer under torch.cuda.set_sync_debug_mode("error"), the trainer's log steps excepted (they read the loss back on
purpose): a host-device sync that creeps into a training step fails the run, naming the line that made it. The last
stdout line is the JSON record (also written to --json).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import tempfile
import time
import traceback
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import distributed_utils as du
import loader_stages  # scripts/, beside this file
from core.cli import run_main
from core.config import Config
from core.errors import UserError
from core.files import atomic_write
import data.jpeg_region as jpeg_region
from data import build_datasets, build_train_loader, loader_workers, start_epoch
from data.rand_augment import allow_zero_bit_posterize
from data.transforms import mean_std
from engine.build import RunData, build_model, build_parts, load_run_config, seed_everything, set_up, wrap_model
from engine.checkpointing import RunState
from engine.logging import RunLogger
from engine.loop import TrainParts, evaluate, to_device, train_one_epoch
from engine.optim import create_optimizer
from engine.precision import AMP_DTYPES, autocast, cpu_matmul_tflops
from engine.preemption import StopRequest
from models import stage_shapes

LOADER_MODES = ("loader", "other_loader", "timm_loader")  # fetch batches and drop them
MODES = ("bare", "trainer", "pipeline", *LOADER_MODES, "eval")
NOT_TRAINING = (*LOADER_MODES, "eval")  # modes without a training step: no training FLOPs
SYNC_ERROR = "called a synchronizing CUDA operation"  # torch's message under set_sync_debug_mode("error")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATMUL_SIZE = 2048  # the largest square matmul whose best rate is a CPU's yardstick for FLOP utilisation
# Dense bf16/fp16 tensor-core peaks (vendor data sheets), for model FLOP utilisation; --peak-tflops overrides.
PEAK_TFLOPS = {"H100 SXM": 989.4, "H100 NVL": 835.5, "H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4,
               "A100": 312.0, "L40S": 362.1, "A10": 125.0, "RTX 3090": 71.0, "RTX 4090": 165.2}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per repeat")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them, every repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default="bare,trainer,pipeline,loader",
                        help=f"comma-separated, timed in this order: {', '.join(MODES)}")
    parser.add_argument("--other-data", default="", metavar="OVERRIDES",
                        help="other_loader: our loader of the config with these data overrides instead, e.g. "
                             "'data.name=hf data.hf_name=/tmp/bed_hf' (other_loader_over_loader: the two data sets)")
    parser.add_argument("--vs-timm", action="store_true", help="also time forward+backward of ours against timm's")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak, for FLOP utilisation")
    parser.add_argument("--loader-steps", type=int, default=0, metavar="N",
                        help="batches the loader modes time per repeat (default: the rest of an epoch after "
                             "--warmup, so that no worker is still prefetching when the next mode starts)")
    parser.add_argument("--stages", type=int, default=0, metavar="N",
                        help="with the loader modes: time each stage of both pipelines on N training files")
    parser.add_argument("--gpu-img-per-s", type=float, default=2400.0,
                        help="a GPU's training rate, for the loader cores it needs (default: ConvNeXt-T, bf16, "
                             "about 3x timm's published RTX 3090 figure)")
    parser.add_argument("--forbid-syncs", action="store_true",
                        help="on CUDA, a host-device sync in a timed step of bare or trainer (log steps excepted) "
                             "fails the run, naming the line (torch.cuda.set_sync_debug_mode); nothing on a CPU")
    parser.add_argument("--json", default="", help="also write the JSON record here")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1 or args.loader_steps < 0:
        parser.error("--warmup, --steps and --repeats must be at least 1")
    args.modes = [m for m in args.modes.split(",") if m]
    args.eval_steps = 0  # the eval mode's timed batches, set where the evaluation split's length is known
    if not args.modes or not set(args.modes) <= set(MODES):
        parser.error(f"--modes takes a comma-separated list of {', '.join(MODES)}; got {','.join(args.modes)!r}")
    if ("other_loader" in args.modes) != bool(args.other_data):
        parser.error("--modes other_loader and --other-data go together")
    return args


class StepClock:
    """Times steps warmup+1 .. warmup+steps of a pass; on a GPU it waits for the queued work at both ends.

    guarded(k) says whether step k of the pass runs under the sync guard (torch.cuda.set_sync_debug_mode("error");
    given on CUDA only): only timed steps can, and the clock's own waits stay outside it.
    """

    def __init__(self, device: torch.device, warmup: int, steps: int,
                 guarded: Optional[Callable[[int], bool]] = None):
        self.device, self.ends, self.guarded = device, (warmup, warmup + steps), guarded
        self.marks: list[float] = []
        self.done = 0  # optimizer steps of the pass so far
        self.guarding = False

    def __call__(self) -> None:  # after each optimizer step of the pass
        self.done += 1
        self.guard(False)
        if self.done in self.ends:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.marks.append(time.perf_counter())
        first, last = self.ends
        self.guard(self.guarded is not None and first <= self.done < last and self.guarded(self.done + 1))

    def guard(self, on: bool) -> None:
        """The sync guard on or off for what runs next (the step after this one)."""
        if on != self.guarding:
            set_sync_guard(on)
            self.guarding = on

    def seconds(self) -> float:
        return self.marks[1] - self.marks[0]


def set_sync_guard(on: bool) -> None:
    torch.cuda.set_sync_debug_mode("error" if on else "default")


class Mode(NamedTuple):
    """One timed loop: run(clock) does --warmup + `steps` units of `images` images (all ranks); guarded(k): step k
    may run under the sync guard (None: no step may)."""
    run: Callable[[StepClock], None]
    images: int
    steps: int
    guarded: Optional[Callable[[int], bool]] = None


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


def timm_twin(cfg: Config, num_classes: int, in_chans: int, device: torch.device, our_params: int):
    """timm's convnext_<variant> with our model options, its own defaults otherwise (conv_mlp for atto..nano);
    refused unless it has as many parameters as ours. (Not FLOPs: on the CPU ours runs the patchify and small-map
    depthwise convs as matrix products (engine/cpu_convs.py), whose FLOPs torch counts differently.)"""
    import timm

    m = cfg.model
    if cfg.train.grad_checkpointing not in (0, 4):
        raise UserError("--vs-timm compares train.grad_checkpointing 0 or 4 only (timm checkpoints all stages or none)")
    depths, dims = stage_shapes(m.name, m.depths, m.dims)
    model = timm.create_model(m.name, depths=depths, dims=dims, num_classes=num_classes, in_chans=in_chans,
                              drop_path_rate=m.drop_path, ls_init_value=m.layer_scale_init or None,
                              patch_size=m.patch_size, head_init_scale=m.head_init_scale)
    model.set_grad_checkpointing(cfg.train.grad_checkpointing == 4)
    theirs = sum(p.numel() for p in model.parameters())
    if theirs != our_params:  # e.g. patch_size < 4, where timm adds a stride-2 downsampler to stage 0
        raise UserError(f"--vs-timm: timm's {m.name} has {theirs:,} parameters with these options, ours "
                        f"{our_params:,}: not the same network, so not comparable (try model.patch_size=4)")
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    return model.to(device, memory_format=fmt)


def forward_flops(model, images: torch.Tensor) -> float:
    """FLOPs (2 per multiply-add) of one image's forward pass, counted by torch."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images[:1])
    return float(counter.get_total_flops())


def known_peak_tflops(device: torch.device, amp: str, override: float) -> tuple[float, str]:
    """One device's yardstick for FLOP utilisation and where it came from: --peak-tflops, or a known GPU's
    data-sheet peak (bf16/fp16); (0, "") otherwise: on a CPU the peak is measured (matmul_tflops) between the
    repeats."""
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda" or amp == "none":
        return 0.0, ""
    name = torch.cuda.get_device_name(device)
    sheet = next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
    return sheet, "data sheet" if sheet else ""


def matmul_tflops(dtype: torch.dtype) -> tuple[float, int]:
    """What this CPU reaches on a large matrix product in the training dtype, run on every rank at once (they share
    the cores as training does) and summed over the ranks; and the matrix size (smaller where the dtype is
    emulated, so that the yardstick takes seconds, not minutes)."""
    du.barrier()
    tflops, n = cpu_matmul_tflops(dtype, max_size=MATMUL_SIZE)
    return du.all_reduce_sum(torch.tensor(tflops, dtype=torch.float64)).item(), n


def gpus_used(device: torch.device) -> int:
    """The GPUs the ranks run on (distinct UUIDs): one each, or fewer where ranks share one."""
    if device.type != "cuda":
        return 1
    return len(set(du.all_gather_object(str(torch.cuda.get_device_properties(device).uuid))))


def peak_memory_mb(device: torch.device) -> float:
    """The CUDA allocator's peak since the last reset; on a CPU the process's peak resident set so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loader_pass(loader, clock: StepClock) -> None:
    """Decoding and augmentation alone: the batches are fetched and dropped."""
    for _ in loader:
        clock()


def timm_loader(cfg: Config, env: du.DistEnv, device: torch.device):
    """timm's own train loader (create_loader) of the config's imagenet recipe over data.root/train, with the same
    workers and batch: what timm's train.py runs."""
    from timm.data import ImageDataset, create_loader

    if cfg.data.name != "imagefolder" or cfg.data.recipe != "imagenet":
        raise UserError("--modes timm_loader compares loaders on an image folder: set data.name=imagefolder, "
                        "data.recipe=imagenet and data.root")
    mean, std = mean_std(cfg.data.name)
    loader = create_loader(
        ImageDataset(os.path.join(cfg.data.root, "train")), cfg.data.img_size, cfg.data.batch_size,
        is_training=True, re_prob=cfg.aug.reprob, re_mode="pixel", hflip=cfg.aug.hflip, color_jitter=None,
        auto_augment=cfg.aug.rand_augment or None, interpolation=cfg.aug.interpolation, mean=mean, std=std,
        num_workers=loader_workers(cfg.data), distributed=env.distributed, pin_memory=device.type == "cuda",
        device=device, use_prefetcher=device.type == "cuda", persistent_workers=loader_workers(cfg.data) > 0)
    allow_zero_bit_posterize(loader.dataset.transform)  # before the workers start; Pillow >= 13 refuses 0 bits
    return loader


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


def measure(runs: dict[str, Mode], args: argparse.Namespace, device: torch.device,
            yardstick: Optional[Callable[[], tuple[float, int]]] = None) -> tuple[dict, dict, list]:
    """Every mode once per repeat, in turn, then the yardstick if given; returns ({mode: [img/s per repeat]},
    {mode: peak memory MB}, [(yardstick TFLOP/s, matmul size) per repeat])."""
    rates: dict[str, list[float]] = {}
    memory: dict[str, float] = {}
    peaks: list[tuple[float, int]] = []
    for repeat in range(args.repeats):
        for name, mode in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            clock = StepClock(device, args.warmup, mode.steps, mode.guarded)
            timed(name, mode.run, clock)
            rates.setdefault(name, []).append(mode.steps * mode.images / clock.seconds())
            memory[name] = max(memory.get(name, 0.0), peak_memory_mb(device))
        if yardstick:
            peaks.append(yardstick())
        du.print0(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items())
                  + " img/s" + (f", {peaks[-1][1]}^3 matmul {peaks[-1][0]:.3f} TFLOP/s" if peaks else ""))
    return rates, memory, peaks


def timed(name: str, run: Callable[[StepClock], None], clock: StepClock) -> None:
    """run(clock); a sync the guard caught becomes one line naming the mode, the step and the line that synced."""
    try:
        run(clock)
    except RuntimeError as e:
        if not (clock.guarding and SYNC_ERROR in str(e)):
            raise
        raise UserError(f"--forbid-syncs: a host-device sync in {name}'s timed step {clock.done + 1}: "
                        f"{str(e).splitlines()[0]} at {sync_site(e)}") from e
    finally:
        clock.guard(False)  # the rest of the process is not a timed step


def sync_site(error: BaseException) -> str:
    """Where the guard caught a sync: the innermost line of this project's code, and the innermost line of all
    (inside torch, say) where that is another."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if f.filename.startswith(ROOT + os.sep) and "site-packages" not in f.filename]
    sites = ours[-1:] + [f for f in frames[-1:] if not ours or f is not ours[-1]]
    return ", in ".join(f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} `{f.line}`" for f in sites)


def main() -> int:
    args = parse_args()
    cfg, ctx, data = set_up(args.config, args.overrides, training=True)
    env, device = ctx.env, ctx.device
    with tempfile.TemporaryDirectory() as log_dir, open(os.devnull, "w") as devnull:
        logger = RunLogger(log_dir, enabled=env.is_main, bar_file=devnull)  # the bar's work is done, not shown
        runs, flops, global_batch, raw_images = build_runs(cfg, args, env, device, data, logger)
        peak, peak_source = known_peak_tflops(device, cfg.train.amp, args.peak_tflops)
        # On a CPU the yardstick is measured at every repeat, as the machine's speed drifts; its best is the peak.
        # Only for a training mode: the others have no FLOP utilisation.
        yardstick = (lambda: matmul_tflops(AMP_DTYPES[cfg.train.amp] or torch.float32)) \
            if device.type == "cpu" and not peak and set(runs) - set(NOT_TRAINING) else None
        rates, memory, peaks = measure(runs, args, device, yardstick)
        logger.close()
    if peaks:
        peak, n = max(peaks)
        peak_source = f"the best {n}^3 matmul of {len(peaks)} here, all ranks together"
    elif peak:  # a data-sheet peak is one GPU's; the images per second are every rank's
        gpus = gpus_used(device)
        peak, peak_source = peak * gpus, f"{peak_source} x {gpus} GPU{'s' * (gpus > 1)}"
    record = summarize(rates, memory, flops, peak)
    record.update(peak_tflops=peak, peak_source=peak_source, matmul_tflops_repeats=[p for p, _ in peaks])
    record.update(device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                  threads=torch.get_num_threads(), world_size=env.world_size,
                  global_batch=global_batch, config=args.config,
                  overrides=args.overrides, amp=cfg.train.amp, channels_last=cfg.train.channels_last,
                  compile=cfg.train.compile, grad_checkpointing=cfg.train.grad_checkpointing,
                  num_workers=loader_workers(cfg.data), steps=args.steps, loader_steps=args.loader_steps,
                  eval_steps=args.eval_steps, eval_batch=data.val_loader.batch_size if data.val_loader else 0,
                  warmup=args.warmup,
                  repeats=args.repeats, sync_guard=args.forbid_syncs and device.type == "cuda",
                  jpeg_decoder=jpeg_decoder(), torch=torch.__version__)
    record.update(loader_summary(record, cfg, args, env))
    if args.stages:
        record.update(stages_summary(record, cfg, args, data.train_transform, raw_images))
    if env.is_main:
        print_table(record)
        if args.json:
            atomic_write(args.json, lambda f: f.write(json.dumps(record, indent=1) + "\n"), binary=False)
        print(json.dumps(record))
    return 0


def jpeg_decoder() -> str:
    """What the loader decodes JPEGs with here (data.jpeg.region_decodable; its workers load the same library)."""
    return "region (libjpeg-turbo)" if jpeg_region.available() else "pillow"


def loader_summary(record: dict, cfg: Config, args: argparse.Namespace, env: du.DistEnv) -> dict:
    """Per worker and per core rates of the loader modes, ours/timm (the median of the repeats' own ratios), and
    the cores per GPU at --gpu-img-per-s. A core is a worker while there are no more workers than cores."""
    workers = max(1, loader_workers(cfg.data)) * env.world_size
    cores = min(workers, len(os.sched_getaffinity(0)))
    out: dict = {"loader_workers": workers, "loader_cores": cores, "gpu_img_per_s": args.gpu_img_per_s}
    for mode in LOADER_MODES:
        if mode in record["img_per_s_repeats"]:
            rate = record[f"{mode}_img_per_s"]
            out[f"{mode}_img_per_s_per_worker"] = rate / workers
            out[f"{mode}_img_per_s_per_core"] = rate / cores
            out[f"{mode}_cores_per_gpu"] = args.gpu_img_per_s / (rate / cores)
    repeats = record["img_per_s_repeats"]
    for top, bottom, name in (("loader", "timm_loader", "loader_over_timm"),
                              ("other_loader", "loader", "other_loader_over_loader")):
        if top in repeats and bottom in repeats:
            out[name] = statistics.median(a / b for a, b in zip(repeats[top], repeats[bottom]))
    return out


def stages_summary(record: dict, cfg: Config, args: argparse.Namespace, transform, raw_images) -> dict:
    """Each stage of both pipelines in ms per image on one thread (--stages files), and the device's batch work
    per image next to the bare step's."""
    if cfg.data.name != "imagefolder" or cfg.data.recipe != "imagenet":
        raise UserError("--stages times the imagenet recipe on an image folder: set data.name=imagefolder, "
                        "data.recipe=imagenet and data.root")
    from torchvision.datasets import ImageFolder

    samples = ImageFolder(os.path.join(cfg.data.root, "train")).samples
    files = [path for path, _ in samples[::max(1, len(samples) // args.stages)][:args.stages]]
    stages = loader_stages.stage_times(cfg, files, args.repeats)
    out: dict = {"stages_ms_per_img": stages, "stages_files": len(files),
                 "stages_ours_over_timm": stages["timm"]["total"] / stages["ours"]["total"]}
    if transform is not None:
        out["device_batch_ms_per_img"] = loader_stages.device_ms_per_image(transform, raw_images, args.repeats)
    if "bare" in record["img_per_s_repeats"]:
        out["step_ms_per_img"] = 1e3 / record["bare_img_per_s"]
    return out


def summarize(rates: dict[str, list[float]], memory: dict[str, float], flops: float, peak: float) -> dict:
    record: dict = {f"{k}_img_per_s": statistics.median(v) for k, v in rates.items()}
    for top, bottom in (("trainer", "bare"), ("pipeline", "trainer"), ("ours_fwd_bwd", "timm_fwd_bwd")):
        if top in rates and bottom in rates:
            short = top.removesuffix("_fwd_bwd") + "_over_" + bottom.removesuffix("_fwd_bwd")
            record[short] = statistics.median(a / b for a, b in zip(rates[top], rates[bottom]))
    record["img_per_s_repeats"] = rates
    record["peak_mem_mb"] = memory
    record["forward_gflops_per_img"] = flops / 1e9
    # Training costs about 3 forwards (the backward computes gradients for inputs and for weights).
    record["train_tflops_per_s"] = {k: 3 * flops * statistics.median(v) / 1e12 for k, v in rates.items()
                                    if k not in NOT_TRAINING}
    if peak:
        record["mfu"] = {k: v / peak for k, v in record["train_tflops_per_s"].items()}
    return record


def print_table(record: dict) -> None:
    cpu = record["device"] == "cpu"
    print(f"\n{record['config']} {' '.join(record['overrides'])} on {record['device']} "
          f"({record['threads']} threads x {record['world_size']} processes): global batch {record['global_batch']},"
          f" amp {record['amp']}, channels_last {record['channels_last']}, compile {record['compile']}, "
          f"grad checkpointing {record['grad_checkpointing']}; median of {record['repeats']} x {record['steps']} steps"
          + (f"; peak resident memory {max(record['peak_mem_mb'].values()):.0f} MB" if cpu else ""))
    for name, values in record["img_per_s_repeats"].items():
        line = f"  {name:14s} {record[name + '_img_per_s']:9.1f} img/s"
        if not cpu:
            line += f"  peak mem {record['peak_mem_mb'][name]:7.0f} MB"
        if name in record["train_tflops_per_s"]:
            line += f"  {record['train_tflops_per_s'][name]:.3f} TFLOP/s"
        if name in record.get("mfu", {}):
            line += f"  MFU {record['mfu'][name]:.1%}"
        print(line + "   repeats: " + " ".join(f"{v:.0f}" for v in values))
    if record["peak_tflops"]:
        print(f"  MFU: of {record['peak_tflops']:.3f} TFLOP/s ({record['peak_source']})")
    ratios = [k for k in ("trainer_over_bare", "pipeline_over_trainer", "ours_over_timm", "loader_over_timm",
                          "other_loader_over_loader") if k in record]
    print("  " + "   ".join(f"{k.replace('_over_', '/')} {record[k]:.3f}" for k in ratios))
    for mode in LOADER_MODES:
        if f"{mode}_img_per_s_per_core" in record:
            print(f"  {mode:14s} {record[f'{mode}_img_per_s_per_core']:7.1f} img/s per core ({record['loader_workers']}"
                  f" workers on {record['loader_cores']} cores): {record[f'{mode}_cores_per_gpu']:.1f} cores per GPU "
                  f"at {record['gpu_img_per_s']:.0f} img/s")
    if "stages_ms_per_img" in record:
        print_stages(record)


def print_stages(record: dict) -> None:
    stages = record["stages_ms_per_img"]
    print(f"  ms per image on one thread ({record['stages_files']} files): " + " | ".join(
        f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in stages[name].items()) for name in stages))
    print(f"  timm/ours per image {record['stages_ours_over_timm']:.3f}"
          + (f"; the device's batch work {record['device_batch_ms_per_img']:.3f} ms per image"
             if "device_batch_ms_per_img" in record else "")
          + (f" next to the step's {record['step_ms_per_img']:.3f}" if "step_ms_per_img" in record else ""))


if __name__ == "__main__":
    run_main(main)
