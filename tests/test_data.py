"""Data sets, recipes, samplers and loaders (no network, no GPU; real Fashion-MNIST only when installed)."""
import gc
import gzip
import os
import re
import time
import urllib.error

import numpy as np
import pytest
import timm.data.auto_augment
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

import data.sources.memory as memory
import data.sources.file_list as file_list
from data import (DataError, ExactShardSampler, build_datasets, build_eval_loader, build_train_loader,
                  skipped_images, start_epoch)
from data.sources import FASHION_MNIST_APT_DIR, SOURCES, TensorImages, load_splits
from data.sources.memory import read_idx
from data.sources.file_list import list_images
from data.augment.batch import BatchAugment
from data.augment.timm_reference import _posterize, allow_zero_bit_posterize
from data.loaders.recipes import apply_recipe, batch_transforms
from core.config import CHOICES, Config
from core.errors import UserError
from helpers import data_config, write_image_folder


# --- samplers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 5, 7, 10, 64, 101, 1000])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 8, 16])
def test_exact_shard_sampler_covers_every_index_once(size, world):
    shards = [list(ExactShardSampler(size, world, rank)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))
    assert [len(ExactShardSampler(size, world, rank)) for rank in range(world)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_exact_shard_sampler_rejects_rank_outside_world():
    with pytest.raises(ValueError):
        ExactShardSampler(10, 2, 2)


# --- idx files and Fashion-MNIST -------------------------------------------------------------------

def write_idx(path, array: np.ndarray, magic: int | None = None) -> None:
    magic = (0x08 << 8 | array.ndim) if magic is None else magic
    raw = magic.to_bytes(4, "big") + np.array(array.shape, dtype=">u4").tobytes() + array.astype(np.uint8).tobytes()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(raw)


def write_fake_fashion(folder, n_train=6, n_val=4, gz=True) -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte{ext}"), rng.integers(0, 256, (n, 28, 28)))
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{ext}"), np.arange(n) % 10)


@pytest.mark.parametrize("name", ["x.gz", "x"])
def test_read_idx_round_trip(tmp_path, name):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / name, array)
    np.testing.assert_array_equal(read_idx(str(tmp_path / name), ndim=3), array)


def test_read_idx_rejects_wrong_magic_and_truncation(tmp_path):
    write_idx(tmp_path / "labels.gz", np.arange(5), magic=0x0803)  # says 3-d, holds 1-d
    with pytest.raises(DataError, match="not an idx file"):
        read_idx(str(tmp_path / "labels.gz"), ndim=1)
    write_idx(tmp_path / "images.gz", np.zeros((2, 2, 2)))
    raw = gzip.decompress((tmp_path / "images.gz").read_bytes())
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(DataError, match="header says"):
        read_idx(str(tmp_path / "short"), ndim=3)
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(str(tmp_path / "bad.gz"), ndim=3)


@pytest.mark.parametrize("layout", ["debian", "torchvision"])
def test_fashion_mnist_from_either_layout(tmp_path, layout):
    folder = tmp_path if layout == "debian" else tmp_path / "FashionMNIST" / "raw"
    write_fake_fashion(folder, gz=layout == "debian")
    splits = load_splits(data_config(name="fashion_mnist", root=str(tmp_path)).data)
    assert splits.train.images.shape == (6, 1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert len(splits.val) == 4 and splits.num_classes == 10 and splits.in_chans == 1


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_APT_DIR), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    splits = load_splits(data_config(name="fashion_mnist", root=FASHION_MNIST_APT_DIR).data)
    assert splits.train.images.shape == (60000, 1, 28, 28) and len(splits.val) == 10000
    for part in (splits.train, splits.val):
        assert part.labels.min() == 0 and part.labels.max() == 9
        assert np.bincount(part.labels).min() == len(part) // 10  # balanced classes


def test_missing_fashion_mnist_names_path_and_ways_out(tmp_path):
    root = str(tmp_path / "nowhere")
    with pytest.raises(DataError) as e:
        build_datasets(data_config(name="fashion_mnist", root=root).data, Config().aug)
    message = str(e.value)
    assert root in message and "apt-get install dataset-fashion-mnist" in message
    assert "data.download=true" in message and "\n" not in message
    assert isinstance(e.value, UserError)


def test_failed_fashion_mnist_download_is_a_data_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(memory, "FashionMNIST", offline)
    with pytest.raises(DataError, match="download failed.*apt-get install dataset-fashion-mnist"):
        load_splits(data_config(name="fashion_mnist", root=str(tmp_path), download=True).data)


def test_missing_cifar_names_root_and_download(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}.*data.download=true"):
        load_splits(data_config(name="cifar10", root=str(tmp_path)).data)


# --- imagefolder -----------------------------------------------------------------------------------

def test_a_csv_list_reads_as_the_folder_it_lists(tmp_path):
    """data.name=csv: train.csv and val.csv of (path, label) rows, by class name (relative paths) or by index
    (absolute paths), give the folder's samples, class names and evaluation batches; bad lists are one line."""
    write_image_folder(tmp_path, classes=("ant", "bee", "cat"))
    folder = load_splits(data_config(name="imagefolder", root=str(tmp_path)).data)
    for split in ("train", "val"):
        source = getattr(folder, split)
        rows = [f"{os.path.relpath(source.read(i), tmp_path)},{('ant', 'bee', 'cat')[label]}"
                for i, label in enumerate(source.labels)]
        (tmp_path / f"{split}.csv").write_text("path,label\n" + "\n".join(rows[::-1]) + "\n")  # any order
    by_name = load_splits(data_config(name="csv", root=str(tmp_path)).data)
    assert by_name.class_names == ["ant", "bee", "cat"] and by_name.num_classes == 3
    assert sorted(zip(map(by_name.val.read, range(9)), by_name.val.labels)) == \
        sorted(zip(map(folder.val.read, range(9)), folder.val.labels))
    (tmp_path / "val.csv").write_text("path,label\n" + "".join(f"{folder.val.read(i)},{label}\n"
                                                                for i, label in enumerate(folder.val.labels)))
    cfg = data_config(name="csv", root=str(tmp_path), img_size=32)
    _, val_set, info = build_datasets(cfg.data, cfg.aug, train=False)
    f_cfg = data_config(name="imagefolder", root=str(tmp_path), img_size=32)
    _, f_val, _ = build_datasets(f_cfg.data, f_cfg.aug, train=False)
    assert info.class_names == ["0", "1", "2"] and info.num_classes == 3
    batch, f_batch = (next(iter(build_eval_loader(ds, cfg.data, 0, 1))) for ds in (val_set, f_val))
    assert torch.equal(batch[0], f_batch[0]) and torch.equal(batch[1], f_batch[1])
    (tmp_path / "val.csv").write_text("file,class\nx.png,0\n")
    with pytest.raises(DataError, match=r"val.csv' has columns \['file', 'class'\], not 'path' and 'label'"):
        load_splits(data_config(name="csv", root=str(tmp_path)).data)


@pytest.mark.parametrize("recipe", ["imagenet", "small"])
def test_imagefolder_with_either_recipe(tmp_path, recipe):
    write_image_folder(tmp_path)
    cfg = data_config(name="imagefolder", root=str(tmp_path), img_size=32, recipe=recipe, batch_size=2)
    train_set, val_set, info = build_datasets(cfg.data, cfg.aug)
    assert (info.num_classes, info.in_chans, info.train_size, info.val_size) == (2, 3, 6, 6)
    image, label = train_set[0]
    # both recipes leave flipping, normalisation (and the rest) to the device: uint8 out of the loader
    dtype = torch.uint8
    assert image.shape == (3, 32, 32) and image.dtype == dtype and int(label) == 0
    images, labels = next(iter(build_train_loader(train_set, cfg.data, 0, 1, seed=0)))
    assert images.shape == (2, 3, 32, 32) and labels.dtype == torch.int64
    images, labels = next(iter(build_eval_loader(val_set, cfg.data, 0, 1)))
    assert images.shape == (4, 3, 32, 32) and images.dtype == dtype and labels.dtype == torch.int64
    on_train, on_eval = batch_transforms(cfg.data, cfg.aug, info.mean, info.std)
    mean, std = torch.tensor(info.mean).view(3, 1, 1), torch.tensor(info.std).view(3, 1, 1)
    torch.testing.assert_close(on_eval(images), (images.float() / 255 - mean) / std)
    assert on_train(images).dtype == torch.float32
    assert (on_train.rand_augment is not None) == (recipe == "imagenet")  # the small recipe pad-crops instead
    assert on_train.crop_padding == (cfg.aug.crop_padding if recipe == "small" else 0)


def test_imagefolder_missing_or_empty_folders(tmp_path):
    cfg = data_config(name="imagefolder", root=str(tmp_path))
    with pytest.raises(DataError, match=str(tmp_path / "train")):  # training may go without val/, never without train/
        load_splits(cfg.data)
    with pytest.raises(DataError, match=str(tmp_path / "val")):  # evaluating needs val/
        load_splits(cfg.data, train=False)
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match=f"^no class folders in '{tmp_path / 'val'}'; give it one sub-folder"):
        load_splits(cfg.data)
    (tmp_path / "val" / "cat").mkdir()  # a class folder without images
    with pytest.raises(DataError, match=f"^no usable images in '{tmp_path / 'val' / 'cat'}' .*add images or remove"):
        load_splits(cfg.data)
    assert sorted(os.listdir(tmp_path)) == ["val"]  # no cache of a list that failed


def test_the_file_list_is_torchvisions_cached_beside_the_folder_and_rescanned_when_it_changes(tmp_path, monkeypatch):
    write_image_folder(tmp_path, per_class=3)
    os.makedirs(tmp_path / "train" / "dog" / "more")
    (tmp_path / "train" / "dog" / "more" / "a.JPG").write_bytes(b"x")
    (tmp_path / "train" / "dog" / "notes.txt").write_bytes(b"x")
    (tmp_path / "train" / "dog" / os.fsdecode(b"caf\xe9.png")).write_bytes(b"x")  # a name that is not UTF-8
    folder = str(tmp_path / "train")
    listing = list_images(folder)
    reference = ImageFolder(folder)
    assert listing.samples == reference.samples and listing.classes == reference.classes
    assert os.path.isfile(folder + ".files.json")
    list_images(str(tmp_path / "val"))

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned although the cache holds")

    monkeypatch.setattr(file_list, "scan", no_scan)
    assert list_images(folder).samples == reference.samples  # from the cache
    cfg = data_config(name="imagefolder", root=str(tmp_path), img_size=32)
    assert build_datasets(cfg.data, cfg.aug)[2].train_size == 8
    monkeypatch.undo()
    cache = folder + ".files.json"
    with open(cache, "rb") as f:
        header, body = f.readline(), f.read()
    with open(cache, "wb") as f:  # damaged: a name short of the header's counts
        f.write(header + body.rsplit(b"\0", 1)[0])
    assert file_list.read_cache(folder) is None and list_images(folder).samples == reference.samples
    def add(path):
        os.makedirs(path.parent, exist_ok=True)
        path.write_bytes(b"x")

    train = tmp_path / "train"
    for change in (lambda: add(train / "dog" / "more" / "b.png"),  # in a sub-folder
                   lambda: os.remove(train / "cat" / "0.png"),
                   lambda: add(train / "cow" / "c.png")):  # a new class
        time.sleep(0.01)  # folder times have a coarse tick on some file systems
        change()
        assert list_images(folder).samples == ImageFolder(folder).samples


def test_a_read_only_data_folder_caches_the_list_in_the_users_cache(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    beside, user = file_list.cache_paths(str(tmp_path / "data" / "val"))
    monkeypatch.setattr(file_list, "cache_paths", lambda folder: ["/proc/version/not-writable.json", user])
    list_images(str(tmp_path / "data" / "val"))
    assert os.path.isfile(user) and user.startswith(str(tmp_path / "cache" / "convnext-trainer" / "val-"))
    assert not os.path.exists(beside)
    cfg = data_config(name="imagefolder", root=str(tmp_path / "data"), cache_file_list=False)
    assert build_datasets(cfg.data, cfg.aug, train=False)[2].val_size == 6


def test_imagefolder_val_classes_must_match_train(tmp_path):
    write_image_folder(tmp_path, classes=("cat", "dog"), val_classes=("cat", "cow"))
    cfg = data_config(name="imagefolder", root=str(tmp_path))
    for train in (True, False):  # eval-only runs check the train folder names too
        with pytest.raises(DataError, match="only in train \\['dog'\\], only in val \\['cow'\\]"):
            load_splits(cfg.data, train=train)


def spoil_two_images(root):
    """A truncated PNG and a text file named like an image, in the train split; returns their paths."""
    truncated, garbage = root / "train" / "cat" / "1.png", root / "train" / "dog" / "notes.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage.write_text("not an image")
    return str(truncated), str(garbage)


@pytest.mark.parametrize("recipe,workers", [("imagenet", 0), ("imagenet", 2), ("small", 2)])
def test_unreadable_image_is_named_or_skipped_and_counted(tmp_path, recipe, workers):
    write_image_folder(tmp_path, per_class=4)
    truncated, garbage = spoil_two_images(tmp_path)
    cfg = data_config(name="imagefolder", root=str(tmp_path), img_size=32, recipe=recipe, batch_size=3,
                   num_workers=workers)
    train_set = build_datasets(cfg.data, cfg.aug)[0]
    loader = build_train_loader(train_set, cfg.data, 0, 1, seed=0)
    with pytest.raises(DataError) as failure:
        list(loader)
    message = str(failure.value)
    # The traceback holds the failed loader's iterator, whose workers end at once when it goes now; collected only
    # after other loaders have forked, it waits seconds on each of them.
    del failure
    gc.collect()
    assert re.match("cannot (read|decode) image '", message) and "data.skip_corrupt=true" in message
    assert truncated in message or garbage in message
    assert "Traceback" not in message and "\n" not in message  # one line, also from a loader worker

    cfg.data.skip_corrupt = True
    train_set = build_datasets(cfg.data, cfg.aug)[0]
    loader = build_train_loader(train_set, cfg.data, 0, 1, seed=0)
    for epoch in (1, 2):
        seen = sum(len(labels) for _, labels in loader)
        assert seen == 9 - 2 and skipped_images(train_set) == 2 * epoch  # 3 full batches of 3, 2 images dropped


def test_num_classes_mismatch_names_both_numbers(tmp_path):
    write_image_folder(tmp_path)
    with pytest.raises(DataError, match="data.num_classes=3 .* 2 classes"):
        load_splits(data_config(name="imagefolder", root=str(tmp_path), num_classes=3).data)


# --- synthetic -------------------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_shows_its_class():
    cfg = data_config(name="synthetic", img_size=16, num_classes=4, synthetic_train_size=200, synthetic_val_size=40)
    a, b = load_splits(cfg.data), load_splits(cfg.data)
    assert a.num_classes == 4 and a.in_chans == 3 and (len(a.train), len(a.val)) == (200, 40)
    train = [a.train[i] for i in range(200)]
    for i in (0, 7, 199):
        assert torch.equal(train[i][0], b.train[i][0]) and train[i][1] == b.train[i][1]
    assert not torch.equal(a.train[0][0], a.val[0][0])
    labels = torch.tensor([label for _, label in train])
    assert labels.min() >= 0 and labels.max() < 4 and len(labels.unique()) == 4
    # A nearest-class-mean classifier beats chance by far, so a smoke run can show learning.
    images = torch.stack([image for image, _ in train]).float().flatten(1)
    means = torch.stack([images[labels == c].mean(0) for c in range(4)])
    val = torch.stack([a.val[i][0] for i in range(40)]).float().flatten(1)
    predicted = torch.cdist(val, means).argmin(1)
    assert (predicted == torch.tensor([a.val[i][1] for i in range(40)])).float().mean() > 0.9


def test_synthetic_defaults_to_ten_classes_and_eval_only_skips_train():
    cfg = data_config(name="synthetic", img_size=32)
    train_set, val_set, info = build_datasets(cfg.data, cfg.aug, train=False)
    assert train_set is None and info.train_size == 0 and info.val_size == 101 and info.num_classes == 10


# --- recipes ---------------------------------------------------------------------------------------

def small(**kwargs) -> BatchAugment:
    return BatchAugment((0.5,), (0.25,), **{**dict(crop_padding=4, hflip=0.5, reprob=0.25), **kwargs})


def test_small_recipe_shapes_randomness_and_seeding():
    images = torch.randint(0, 256, (64, 1, 32, 32), dtype=torch.uint8)
    transform = small()
    torch.manual_seed(1)
    first = transform(images)
    second = transform(images)
    torch.manual_seed(1)
    again = transform(images)
    assert first.shape == (64, 1, 32, 32) and first.dtype == torch.float32
    assert not torch.equal(first, second) and torch.equal(first, again)


def test_small_recipe_draws_per_image():
    same = torch.randint(0, 256, (1, 1, 32, 32), dtype=torch.uint8).expand(32, -1, -1, -1)
    out = small(reprob=0.0)(same)
    assert len({tuple(x.flatten().tolist()) for x in out}) > 8  # not one crop/flip for the whole batch


def test_pad_crop_is_torchvision_random_crop_with_padding():
    """Each output is a 32 x 32 window of the zero-padded image at offsets in [0, 8], all 81 of them drawn."""
    image = torch.randint(1, 256, (1, 1, 32, 32), dtype=torch.uint8)
    out = BatchAugment((0.0,), (1 / 255,), hflip=0, crop_padding=4, reprob=0)(image.expand(4000, -1, -1, -1))
    padded = torch.nn.functional.pad(image[0, 0].float(), (4, 4, 4, 4))
    windows = {(padded[dy:dy + 32, dx:dx + 32] + 0.0).numpy().tobytes(): (dy, dx) for dy in range(9) for dx in range(9)}
    found = [windows[(x[0] + 0.0).numpy().tobytes()] for x in out]  # + 0.0: -0.0 as 0.0, one bytes key per window
    counts = [found.count(k) for k in windows.values()]  # each ~ Binomial(4000, 1/81): 49 +- 7
    assert min(counts) > 20 and max(counts) < 85


def test_small_recipe_loader_resizes_to_img_size():
    source = TensorImages(torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8), torch.arange(6))
    cfg = data_config(name="fashion_mnist", recipe="small", img_size=32)
    images, labels = apply_recipe(source, cfg.data, cfg.aug, True).__getitems__([0, 1, 2])
    assert images.shape == (3, 1, 32, 32) and images.dtype == torch.uint8 and labels.tolist() == [0, 1, 2]


def test_timm_reference_survives_zero_bit_posterize():
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert _posterize(image, 0).getextrema() == ((0, 0),) * 3
    transform = allow_zero_bit_posterize(timm.data.auto_augment.rand_augment_transform("rand-m9-mstd0.5-inc1", {}))
    assert any(op.aug_fn is _posterize for op in transform.ops)


# --- loaders ---------------------------------------------------------------------------------------

def indexed_set(n: int, train: bool):
    """Labels equal the sample index, so a loader's output says which samples it served."""
    source = TensorImages(torch.zeros(n, 1, 28, 28, dtype=torch.uint8), torch.arange(n))
    cfg = data_config(name="fashion_mnist", recipe="small", img_size=32)
    return apply_recipe(source, cfg.data, cfg.aug, train)


def test_eval_loaders_of_two_ranks_see_every_sample_once():
    cfg = data_config(batch_size=4)
    dataset = indexed_set(101, train=False)
    seen = []
    for rank in range(2):
        for images, labels in build_eval_loader(dataset, cfg.data, rank, 2):
            assert images.shape[1:] == (1, 32, 32) and len(images) <= 8  # eval batch = 2 x batch_size
            seen += labels.tolist()
    assert sorted(seen) == list(range(101))


def test_train_loaders_of_two_ranks_are_disjoint_full_batches():
    cfg = data_config(batch_size=8)
    dataset = indexed_set(101, train=True)
    per_rank = []
    for rank in range(2):
        loader = build_train_loader(dataset, cfg.data, rank, 2, seed=0)
        start_epoch(loader, 3)
        batches = [labels for _, labels in loader]
        assert len(batches) == 50 // 8 and all(len(b) == 8 for b in batches)
        per_rank.append(set(torch.cat(batches).tolist()))
    assert not per_rank[0] & per_rank[1]


def test_train_loader_rejects_a_set_smaller_than_one_batch():
    with pytest.raises(DataError, match="data.batch_size=64"):
        build_train_loader(indexed_set(100, train=True), data_config(batch_size=64).data, 0, 2, seed=0)


def test_resumable_sampler_matches_distributed_sampler_and_resumes():
    from torch.utils.data import DistributedSampler
    from data.loaders.samplers import ResumableDistributedSampler
    data = list(range(103))
    for world in (1, 2, 3):
        for rank in range(world):
            ours = ResumableDistributedSampler(data, world, rank, seed=5)
            ref = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=5, drop_last=True)
            ours.set_epoch(4)
            ref.set_epoch(4)
            full = list(ours)
            assert full == list(ref) and len(ours) == len(ref)
            ours.set_epoch(4, start=6 * world)  # six samples per rank already consumed
            assert list(ours) == full[6:] and len(ours) == len(full) - 6
    # A new world size takes up exactly the samples the old one had not reached.
    consumed = set()
    for rank in range(2):
        s = ResumableDistributedSampler(data, 2, rank, seed=5)
        s.set_epoch(1)
        consumed |= set(list(s)[:10])
    rest = []
    for rank in range(3):
        s = ResumableDistributedSampler(data, 3, rank, seed=5)
        s.set_epoch(1, start=20)
        rest += list(s)
    assert not consumed & set(rest) and len(set(rest)) == len(rest) == (103 - 20) // 3 * 3


def test_classes_and_train_limit_narrow_a_split(tmp_path):
    write_image_folder(tmp_path, classes=("ant", "bee", "cat"), per_class=4)
    cfg = data_config(name="imagefolder", root=str(tmp_path), classes=[2, 0], train_limit=5)
    splits = load_splits(cfg.data)
    assert splits.num_classes == 2 and splits.class_names == ["cat", "ant"]
    val, train = splits.val, splits.train
    assert sorted(val.labels) == [0] * 4 + [1] * 4
    assert all(("/cat/" in val.name(i)) == (label == 0) for i, label in enumerate(val.labels))
    assert len(train) == 5 and set(train.labels) <= {0, 1}
    again = load_splits(cfg.data).train  # the same subset every time, and the source it came from unchanged
    assert [again.name(i) for i in range(5)] == [train.name(i) for i in range(5)]
    whole = load_splits(data_config(name="imagefolder", root=str(tmp_path)).data)
    assert len(whole.val) == 12 and whole.val.subset(np.arange(3)).name(2) == whole.val.name(2)
    with pytest.raises(DataError, match=r"data.classes=\[0, 3\] must list distinct class indices in 0..2"):
        load_splits(data_config(name="imagefolder", root=str(tmp_path), classes=[0, 3]).data)


def test_the_config_allows_exactly_the_sources_there_are():
    """data.name's choices (checked before anything is built) and the table of sources name the same sources."""
    assert sorted(CHOICES["data.name"]) == sorted(SOURCES)
