import glob
import os
import re

import pytest
import yaml

from core.config import ConfigError, all_keys, config_from_dict, load_config, save_config, to_dict
from core.errors import UserError
from engine.build import load_run_config
from engine.optim import accum_steps_for
from models import create_model
from helpers import ROOT

SYNTH = ["data.name=synthetic"]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_load(path):
    load_run_config(path)


def test_required_keys_exist():
    required = """model.name model.drop_path model.layer_scale_init model.patch_size data.name data.root data.img_size
    data.batch_size data.num_workers optim.lr optim.lr_base_batch optim.lr_scaling optim.weight_decay schedule.epochs
    schedule.warmup_epochs schedule.min_lr aug.mixup aug.cutmix aug.smoothing ema.enabled ema.decay train.amp
    train.accum_steps train.clip_grad train.channels_last train.compile output_dir seed""".split()
    assert set(required) <= set(all_keys())


def test_convnext_t_is_the_official_recipe():
    cfg = load_config(os.path.join(ROOT, "configs", "convnext_t.yaml"))
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.schedule.min_lr) == (300, 20, 1e-6)
    assert (cfg.optim.lr, cfg.optim.lr_base_batch, cfg.optim.weight_decay) == (4e-3, 4096, 0.05)
    assert cfg.train.global_batch == 4096 and accum_steps_for(cfg.train, cfg.data.batch_size, 8) == 4
    assert (cfg.model.drop_path, cfg.aug.mixup, cfg.aug.cutmix, cfg.aug.smoothing) == (0.1, 0.8, 1.0, 0.1)
    assert (cfg.aug.rand_augment, cfg.aug.reprob, cfg.ema.decay, cfg.data.img_size) == \
        ("rand-m9-mstd0.5-inc1", 0.25, 0.9999, 224)


@pytest.mark.parametrize("name,drop_path,ema", [("b", 0.2, False), ("l", 0.3, False), ("xl", 0.4, True)])
def test_official_fine_tuning_recipes(name, drop_path, ema):
    # facebookresearch/ConvNeXt TRAINING.md, "Fine-tune from ImageNet-22K pre-training" (224 px).
    cfg = load_config(os.path.join(ROOT, "configs", f"finetune_convnext_{name}.yaml"))
    assert (cfg.model.drop_path, cfg.ema.enabled, cfg.model.head_init_scale) == (drop_path, ema, 0.001)
    assert (cfg.optim.lr, cfg.optim.lr_base_batch, cfg.train.global_batch) == (5e-5, 512, 512)
    assert (cfg.optim.weight_decay, cfg.optim.layer_decay, cfg.schedule.epochs) == (1e-8, 0.8, 30)
    assert (cfg.schedule.warmup_epochs, cfg.aug.mixup, cfg.aug.cutmix) == (0, 0, 0)


@pytest.mark.parametrize("name,drop_path", [("s", 0.4), ("b", 0.5), ("l", 0.5), ("xl", 0.5)])
def test_larger_official_recipes(name, drop_path):
    cfg = load_config(os.path.join(ROOT, "configs", f"convnext_{name}.yaml"))
    assert cfg.model.drop_path == drop_path
    assert cfg.train.global_batch == 4096
    assert cfg.data.batch_size * 8 * accum_steps_for(cfg.train, cfg.data.batch_size, 8) == 4096


def test_overrides_parse_yaml_values():
    cfg = load_config(None, SYNTH + ["optim.lr=1e-3", "optim.betas=[0.9, 0.95]", "ema.enabled=false",
                                     "schedule.warmup_epochs=2", "output_dir=/tmp/x"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == [0.9, 0.95]
    assert cfg.ema.enabled is False and cfg.schedule.warmup_epochs == 2.0 and cfg.output_dir == "/tmp/x"


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {name: synthetic, batch_size: 8}\noptim: {lr: 0.5}\n")
    cfg = load_config(str(path), ["optim.lr=0.25"])
    assert cfg.data.batch_size == 8 and cfg.optim.lr == 0.25


@pytest.mark.parametrize("override,expected", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'; did you mean optim.lr"),
    ("modle.name=x", "unknown config key 'modle.name'; did you mean model.name"),
    ("data.batch_size=abc", "'data.batch_size' must be int, got str"),
    ("data.batch_size=1.5", "'data.batch_size' must be int"),
    ("ema.enabled=3", "'ema.enabled' must be bool"),
    ("train.amp=fp8", "'train.amp' is 'fp8'; allowed: none, bf16, fp16, auto"),
    ("optim.lr_scaling=cubic", "allowed: linear, sqrt, none"),
    ("aug.smoothing=1.5", "'aug.smoothing' must be within [0, 1]"),
    ("data.batch_size=0", "'data.batch_size' must be > 0"),
    ("optim.lr", "is not of the form key.sub=value"),
    ("model=3", "'model' is a section"),
    ("schedule.warmup_epochs=500", "exceeds schedule.epochs"),
    ("model.name=convnext_tiyn schedule.epochs=30", "unknown model 'convnext_tiyn'; did you mean convnext_tiny?"),
    ("data.batch_size=15", "must be even for mixup/cutmix"),
    ("model.depths=[2,2,6]", "'model.depths' must be 4 positive integers"),
    ("model.dims=[8,16,0,32]", "'model.dims' must be 4 positive integers"),
    ("model.stem_init=pca", "'model.stem_init' is 'pca'; allowed: default, whiten"),
    ("dist.backend=mpi", "'dist.backend' is 'mpi'; allowed: auto, nccl, gloo"),
    ("data.num_workers=-2", "data.num_workers is a number of loader processes, 0 to load in the training process"),
    ("aug.rand_augment=original", "aug.rand_augment='original' is not a timm RandAugment string"),
    ("data.name=imagenet", "'data.name' is 'imagenet'; allowed: imagefolder, csv, shards, hf, cifar10"),
    ("model.pretrained=w.pth model.stem_init=whiten", "would overwrite the stem that model.pretrained loads"),
    ("train.eval_every=0 checkpoint.keep_best=2 schedule.warmup_epochs=1",
     "checkpoint.keep_best keeps the best evaluated checkpoints, and train.eval_every=0 evaluates none"),
    ("data.crop_mode=letterbox", "'data.crop_mode' is 'letterbox'; allowed: center, squash, border"),
    ("data.crop_pct=1.2 schedule.warmup_epochs=1", "data.crop_pct is the eval output's side over the resized side"),
    ("data.mean=[0.5,0.5,0.5] schedule.warmup_epochs=1", "data.mean and data.std must be given together"),
])
def test_errors_name_the_key_and_the_way_out(override, expected):
    with pytest.raises(UserError) as e:  # as the entry points load it: the model name is checked too
        load_run_config(None, SYNTH + ["schedule.epochs=10", *override.split()])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_depths_and_dims_replace_the_variants():
    cfg = load_config(None, SYNTH + ["model.name=convnext_atto", "model.depths=[1,1,2,1]", "model.dims=[8,16,24,32]"])
    model = create_model(**cfg.model.create_args(), num_classes=3)
    assert [len(s) for s in model.stages] == [1, 1, 2, 1] and model.head.in_features == 32
    default = create_model(**load_config(None, SYNTH + ["model.name=convnext_atto"]).model.create_args(), num_classes=3)
    assert [len(s) for s in default.stages] == [2, 2, 6, 2] and default.head.in_features == 320


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(bad))


def test_missing_data_root_is_an_error():
    with pytest.raises(ConfigError, match="data.root is empty"):
        load_config(None, ["data.name=imagefolder"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, SYNTH + ["optim.lr=0.123", "model.name=convnext_atto"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    again = load_config(str(tmp_path / "config.yaml"))
    assert to_dict(again) == to_dict(cfg)
    assert config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == cfg


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_base_child_overrides_one_key_and_keeps_the_rest(tmp_path):
    _write(tmp_path / "base.yaml", "data: {name: synthetic, batch_size: 8}\noptim: {lr: 0.5, weight_decay: 0.1}\n")
    child = _write(tmp_path / "child.yaml", "base: base.yaml\noptim: {lr: 0.25}\n")
    cfg = load_config(child)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.data.batch_size) == (0.25, 0.1, 8)
    assert load_config(child, ["optim.lr=0.125"]).optim.lr == 0.125  # overrides still apply last


def test_base_chain_and_relative_paths_from_another_cwd(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    _write(tmp_path / "a" / "root.yaml", "data: {name: synthetic, batch_size: 8}\nseed: 1\noutput_dir: runs/root\n")
    _write(tmp_path / "a" / "b" / "mid.yaml", "base: ../root.yaml\nseed: 2\ndata: {batch_size: 4}\n")
    leaf = _write(tmp_path / "leaf.yaml", "base: a/b/mid.yaml\nseed: 3\n")
    monkeypatch.chdir(tmp_path / "a")  # the bases resolve from each file's folder, not from the cwd
    cfg = load_config(os.path.relpath(leaf))
    assert (cfg.seed, cfg.data.batch_size, cfg.data.name, cfg.output_dir) == (3, 4, "synthetic", "runs/root")
    absolute = _write(tmp_path / "abs.yaml", f"base: {tmp_path / 'a' / 'root.yaml'}\n")
    assert load_config(absolute).seed == 1


def test_saved_config_is_whole_without_base(tmp_path):
    _write(tmp_path / "base.yaml", "data: {name: synthetic}\noptim: {lr: 0.5}\n")
    cfg = load_config(_write(tmp_path / "child.yaml", "base: base.yaml\nseed: 7\n"))
    save_config(cfg, str(tmp_path / "config.yaml"))
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "base" not in saved and saved["optim"]["lr"] == 0.5 and saved["seed"] == 7
    assert "base" not in all_keys()


@pytest.mark.parametrize("files,expected", [
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "a.yaml -> *b.yaml -> *a.yaml; remove the base"),
    ({"a.yaml": "base: a.yaml\n"}, "extend each other in a cycle: *a.yaml -> *a.yaml"),
    ({"a.yaml": "base: nowhere.yaml\n"}, "a.yaml': its base '*nowhere.yaml' does not exist; base is a path relative"),
    ({"a.yaml": "base: 3\n"}, "a.yaml': base must be the path of the YAML file it extends (relative to its folder"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "data: {nmae: synthetic}\n"}, "*b.yaml': unknown config key 'data.nmae'"),
])
def test_base_errors_name_the_file_and_the_way_out(tmp_path, files, expected):
    for name, text in files.items():
        _write(tmp_path / name, text)
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path / "a.yaml"))
    message = str(e.value).replace(str(tmp_path) + os.sep, "*")
    assert expected in message and "\n" not in message


def test_base_is_not_an_override_key():
    with pytest.raises(ConfigError, match="unknown config key 'base'"):
        load_config(None, SYNTH + ["base=configs/convnext_t.yaml"])


@pytest.mark.parametrize("name,model,drop_path,batch", [
    ("convnext_s", "convnext_small", 0.4, 128), ("convnext_b", "convnext_base", 0.5, 128),
    ("convnext_l", "convnext_large", 0.5, 64), ("convnext_xl", "convnext_xlarge", 0.5, 64)])
def test_variant_configs_resolve_to_the_full_recipe(name, model, drop_path, batch):
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
    assert (cfg.model.name, cfg.model.drop_path, cfg.data.batch_size, cfg.output_dir) == \
        (model, drop_path, batch, f"runs/{name}")
    assert (cfg.model.dims, cfg.model.layer_scale_init, cfg.data.root, cfg.data.num_workers) == \
        ([], 1e-6, "/datasets/imagenet", -1)
    assert (cfg.optim.lr, cfg.schedule.epochs, cfg.aug.mixup, cfg.ema.enabled, cfg.train.amp) == \
        (4e-3, 300, 0.8, True, "bf16")


@pytest.mark.parametrize("name,model", [("t", "convnext_tiny"), ("b", "convnext_base"), ("l", "convnext_large"),
                                        ("xl", "convnext_xlarge")])
def test_fine_tuning_configs_resolve_to_the_full_recipe(name, model):
    cfg = load_config(os.path.join(ROOT, "configs", f"finetune_convnext_{name}.yaml"))
    assert (cfg.model.name, cfg.model.pretrained, cfg.output_dir) == (model, "", f"runs/finetune_{model}")
    assert (cfg.optim.layer_decay, cfg.schedule.epochs, cfg.data.batch_size, cfg.optim.lr) == (0.8, 30, 32, 5e-5)
    assert (cfg.aug.rand_augment, cfg.aug.smoothing, cfg.data.crop_pct, cfg.train.amp, cfg.train.clip_grad) == \
        ("rand-m9-mstd0.5-inc1", 0.1, 0.875, "bf16", 0.0)


# Every official recipe: "A ConvNet for the 2020s" Tables 5 and 6, facebookresearch/ConvNeXt TRAINING.md.
PRE_22K = dict(epochs=90, warmup=5, lr=(4e-3, 4096), global_batch=4096, layer_decay=1.0, ema=False, classes=21841,
               size=224, crop=(0.875, "center"), mixup=(0.8, 1.0), eval_every=0)
FT_384 = dict(epochs=30, warmup=0, lr=(5e-5, 512), global_batch=512, layer_decay=0.8, ema=False, classes=0, size=384,
              crop=(1.0, "squash"), mixup=(0.0, 0.0), eval_every=1)


@pytest.mark.parametrize("name, drop_path, family", [
    *[(f"in22k_convnext_{v}", d, PRE_22K) for v, d in zip(("t", "s", "b", "l", "xl"), (0.0, 0.0, 0.1, 0.1, 0.2))],
    *[(f"finetune_384_convnext_{v}", d, dict(FT_384, ema=v == "xl"))
      for v, d in zip(("t", "s", "b", "l", "xl"), (0.0, 0.1, 0.2, 0.3, 0.4))],
    *[(f"finetune_in1k_384_convnext_{v}", d, dict(FT_384, layer_decay=0.7)) for v, d in (("b", 0.8), ("l", 0.95))]])
def test_every_official_recipe_says_what_the_paper_and_training_md_say(name, drop_path, family):
    path = os.path.join(ROOT, "configs", f"{name}.yaml")
    cfg = load_config(path)
    got = dict(epochs=cfg.schedule.epochs, warmup=cfg.schedule.warmup_epochs,
               lr=(cfg.optim.lr, cfg.optim.lr_base_batch),
               global_batch=cfg.train.global_batch, layer_decay=cfg.optim.layer_decay, ema=cfg.ema.enabled,
               classes=cfg.data.num_classes, size=cfg.data.img_size, crop=(cfg.data.crop_pct, cfg.data.crop_mode),
               mixup=(cfg.aug.mixup, cfg.aug.cutmix), eval_every=cfg.train.eval_every)
    assert (got, cfg.model.drop_path) == (family, drop_path)
    assert (cfg.aug.smoothing, cfg.aug.rand_augment, cfg.aug.reprob) == (0.1, "rand-m9-mstd0.5-inc1", 0.25)
    # The header's launch lines make the global batch: one node of 8 GPUs, and sbatch's nodes x 8 GPUs.
    with open(path) as f:
        lines = [line for line in f if line.startswith("#   ")]
    assert "torchrun --nproc_per_node=8" in lines[0] and "sbatch" in lines[1]
    nodes = int(re.search(r"(?:-N |--nodes=)(\d+)", lines[1])[1])
    batch = int(re.search(r"data.batch_size=(\d+)", lines[1])[1]) if "data.batch_size" in lines[1] else None
    for gpus, per_gpu in ((8, cfg.data.batch_size), (8 * nodes, batch or cfg.data.batch_size)):
        assert accum_steps_for(cfg.train, per_gpu, gpus) * per_gpu * gpus == cfg.train.global_batch


def test_21841_classes_train_with_mixup_cutmix_and_label_smoothing():
    """The 22K recipe's loss on a tiny model with a 21,841-way head: soft targets spread the smoothing over every
    class, and one step's gradients reach the head and the stem, finite."""
    import torch
    from engine.build import build_loss
    cfg = load_config(os.path.join(ROOT, "configs", "in22k_convnext_t.yaml"))
    mixup, criterion = build_loss(cfg, 21841)
    model = create_model("convnext_atto", num_classes=21841, depths=[1, 1, 1, 1], dims=[8, 16, 32, 64])
    torch.manual_seed(0)
    images, labels = mixup(torch.randn(4, 3, 32, 32), torch.tensor([0, 21840, 7, 12345]))
    assert labels.shape == (4, 21841) and torch.allclose(labels.sum(1), torch.ones(4))
    assert labels.min() >= 0.1 / 21841 - 1e-9 and labels.max() <= 1 - 0.1 + 0.1 / 21841 + 1e-6
    loss = criterion(model(images), labels)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 9  # about ln(21841) = 10.0 at the start
    assert model.head.weight.grad.abs().sum() > 0 and torch.isfinite(model.downsample_layers[0][0].weight.grad).all()
