"""What several test files share: the repository's paths, running the entry points (in a process of their own, under
torchrun, or inside the test's), small configs, models, data and files to test on. Test files import from here and
never from each other (test_layers checks), so each reads on its own."""
from __future__ import annotations

import contextlib
import gc
import glob
import importlib
import importlib.util
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator
from unittest import mock

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from core.config import Config, OptimCfg
from core.errors import UserError
from engine.build import ProcessSettings
from engine.checkpointing import RunState
from engine.logging import RunLogger
from engine.loop import EpochEnd, TrainParts, train_one_epoch
from engine.optim import create_optimizer
from models import create_model
from models.keys import timm_to_official

ROOT = Path(__file__).resolve().parents[1]
DEBUG = os.path.join(ROOT, "configs", "debug.yaml")
# What torchrun hands rank 1 of 2 on one node.
TORCHRUN_2 = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
              "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400"}
# For the runs whose subject is not the background checkpoint write: saving inline spares a run its writer process,
# whose `import torch` costs ~3 s of CPU and holds up the first save. The e2e torchrun run, the resume, SLURM and GPU
# check runs keep the default (background).
INLINE_SAVES = "checkpoint.background=false"
# A small custom ConvNeXt (MNIST/CIFAR-like) whose every forward pass is cheap: maps of 16, 8, 4 and 2 px at 32 px.
SMALL = dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), patch_size=2, in_chans=1, num_classes=10)


# --- running the entry points --------------------------------------------------------------------------------------

def run(args: list[str], nproc: int = 1, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """`python ARGS` in the repository on one thread, or under torchrun with `nproc` processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return _checked(proc, check)


def run_here(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """A one-process `python train.py|eval.py|scripts/X.py ...` or `python -m models.export ...` inside this process:
    what `run` returns, without a new interpreter's ~5 s of imports. As `run` does, one thread (OMP_NUM_THREADS=1)
    and a UserError as one `error: ` line and exit code 2; afterwards the process is as it was (ProcessSettings) and
    the run's loader workers are gone. Runs whose loader workers print (they are forked processes, out of this capture's
    reach) or that need several ranks still go through `run`."""
    module = importlib.import_module(args[1] if args[0] == "-m" else  # scripts/ is on the tests' sys.path
                                     args[0].removeprefix("scripts/").removesuffix(".py"))
    argv = args[1:] if args[0] == "-m" else args
    main = (lambda: module.main(argv[1:])) if args[0] == "-m" else module.main
    children = set(multiprocessing.active_children())
    out, err = io.StringIO(), io.StringIO()
    try:
        with ProcessSettings.kept(), mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            torch.set_num_threads(1)
            code = _exit_code(main)
    finally:
        _end_new_children(children)
    return _checked(subprocess.CompletedProcess(["(here)", *args], code, out.getvalue(), err.getvalue()), check)


def _exit_code(main: Callable[[], int | None]) -> int:
    """main's exit code as core.cli.run_main makes it (2 and one `error: ` line for a UserError), or argparse's."""
    try:
        return main() or 0
    except UserError as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    except SystemExit as e:
        return e.code or 0


def _end_new_children(before: set) -> None:
    """End the processes started since `before`: loader workers that outlive a run (a worker's error leaves its
    loader referenced from the traceback) would keep this process from exiting at the end of the session."""
    gc.collect()
    for worker in set(multiprocessing.active_children()) - before:
        worker.terminate()
        worker.join(30)


def _checked(proc: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def eval_json(proc: subprocess.CompletedProcess) -> dict:
    """eval.py's result: the JSON object on its last line of output."""
    return json.loads(proc.stdout.strip().splitlines()[-1])


def script_module(name: str) -> ModuleType:
    """scripts/<name>.py loaded from its path (scripts/ is not a package), registered as `name` in sys.modules as a
    script's own imports of its siblings (`import loader_stages`) expect."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before it runs: dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                       "MASTER_ADDR", "MASTER_PORT")}
    # The project is installed in the venv; tests/ and scripts/ go on the path for job scripts that use these helpers
    # (and the tools the tests import by name, as pytest's pythonpath gives them).
    path = os.pathsep.join([str(ROOT / "tests"), str(ROOT / "scripts"), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=path, CUDA_VISIBLE_DEVICES="")
    return env


def launch_script(tmp_path: Path, body: str, nproc: int | None, timeout: float = 450,
                  args: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, float]:
    """Run `body` as a script, via torchrun with `nproc` workers (or plainly when None), outside any launch
    environment this process has; kill it all on timeout. Returns the finished process and its seconds."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(body))
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    start = time.monotonic()
    # A session of its own, so a hung run can be killed with its workers rather than leaving them behind.
    proc = subprocess.Popen([sys.executable, *launcher, str(script), *args], cwd=tmp_path, env=_child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"job still running after {timeout}s: a failure did not end it")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - start


def assert_same_weights(a: dict, b: dict) -> None:
    """Two checkpoints hold bitwise the same raw and EMA weights."""
    for part in ("model", "model_ema"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)


# --- configs ---------------------------------------------------------------------------------------------------------

def data_config(**data) -> Config:
    """The default Config whose data section reads in this process (no loader workers), `data` set on it."""
    cfg = Config()
    for key, value in {"num_workers": 0, **data}.items():
        setattr(cfg.data, key, value)
    return cfg


def small_data_config(**data) -> Config:
    """data_config reading 32-px images in batches of 4, unless `data` says otherwise."""
    return data_config(**{"img_size": 32, "batch_size": 4, **data})


# --- models and one-process training ---------------------------------------------------------------------------------

def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values for every parameter (gamma and norms too), so that an equality cannot hold by accident; the
    model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm_weight = p.ndim == 1 and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + norm_weight)
    return model.eval()


def tiny_model(seed: int = 0) -> nn.Module:
    """A ConvNeXt of one block a stage, for 1-channel 16-px images of 4 classes; the same for the same seed."""
    torch.manual_seed(seed)
    return create_model("convnext_atto", num_classes=4, in_chans=1, patch_size=2, depths=(1, 1, 1, 1),
                        dims=(8, 16, 16, 16), layer_scale_init=0)


def loader(batch_size: int, n: int = 32, seed: int = 1) -> DataLoader:
    """`n` random images for tiny_model, in order."""
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


def poisoned(batch_size: int, bad_batches: list[int], n: int = 32) -> DataLoader:
    """loader(), with a NaN pixel in each batch listed."""
    data = loader(batch_size, n)
    images, labels = data.dataset.tensors
    for b in bad_batches:
        images[b * batch_size, 0, 0, 0] = float("nan")
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


def parts_for(model: nn.Module, **kw) -> TrainParts:
    """AdamW at a constant lr of 1e-2 and plain cross-entropy around `model` on the CPU; `kw` overrides any part."""
    opt = create_optimizer(kw.get("raw_model", model), OptimCfg(weight_decay=0.05), lr=1e-2)
    defaults = dict(model=model, raw_model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(),
                    scaler=torch.amp.GradScaler("cpu", enabled=kw.get("amp") == "fp16"),
                    lr_fn=lambda step: 1e-2, device=torch.device("cpu"))
    return TrainParts(**{**defaults, **kw})


def run_epoch(parts: TrainParts, data: DataLoader, log_every: int = 1) -> RunState:
    """One epoch from a fresh run; the run's state after it."""
    run = RunState()
    ended = train_one_epoch(parts, data, run, logger=RunLogger("", enabled=False), log_every=log_every,
                            global_batch=16)
    assert ended is EpochEnd.DONE
    return run


def timm_weights(tmp_path: Path, name: str = "convnext_atto", suffix: str = ".safetensors") -> tuple[str, dict]:
    """A seeded timm model's weights saved in timm's layout under tmp_path (.safetensors, else torch.save); returns
    the file and the same weights in the official layout."""
    torch.manual_seed(0)
    sd = timm.create_model(name, pretrained=False).state_dict()
    path = str(tmp_path / f"{name}{suffix}")
    save_file(sd, path) if suffix == ".safetensors" else torch.save(sd, path)
    return path, timm_to_official(sd)


# --- files and file systems ------------------------------------------------------------------------------------------

def write_image_folder(root: Path, classes=("cat", "dog"), val_classes=None, per_class: int = 3) -> None:
    """root/{train,val}/<class>/<i>.png: random RGB images of different sizes, the same every time."""
    rng = np.random.default_rng(0)
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for name in names:
            os.makedirs(root / split / name)
            for i in range(per_class):
                size = (20 + 7 * i, 30)  # files of different sizes, as on disk
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")


@contextlib.contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at the folder `mount`: a real file system that fills up (needs root; skipped without)."""
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# --- Hugging Face caches ---------------------------------------------------------------------------------------------

def offline_caches(patch: pytest.MonkeyPatch, folder: str) -> dict[str, str]:
    """Point `datasets` and the hub at fresh caches under `folder`, offline, in this process (patch: a
    MonkeyPatch) and in the runs it starts; returns the environment set."""
    import datasets
    import huggingface_hub.constants as constants
    env = {"HF_DATASETS_CACHE": os.path.join(folder, "datasets"), "HF_HUB_CACHE": os.path.join(folder, "hub"),
           "HF_HUB_OFFLINE": "1"}
    for key, value in env.items():
        patch.setenv(key, value)
    patch.setattr(datasets.config, "HF_DATASETS_CACHE", env["HF_DATASETS_CACHE"])
    patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    patch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    patch.setattr(constants, "HF_HUB_OFFLINE", True)
    return env


def datasets_cache_entry(parquet_folder: str, name: str, cache: str) -> None:
    """Data set `name` as `datasets` leaves it in its cache after a first load from the hub
    (<namespace>___<name>/<config>/<version>/<hash>/<name>-<split>.arrow), made by the library's own parquet
    builder; offline, load_dataset(name) then reads it."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet
    files = {split: sorted(glob.glob(os.path.join(parquet_folder, "data", f"{split}-*.parquet")))
             for split in ("train", "validation")}
    namespace, short = name.split("/")
    builder = Parquet(cache_dir=cache, data_files=DataFilesDict.from_patterns(files), dataset_name=short,
                      config_name="default", config_id="default", hash="0123456789abcdef")
    builder.download_and_prepare()
    os.rename(os.path.join(cache, short), os.path.join(cache, f"{namespace}___{short}"))
