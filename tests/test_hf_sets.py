"""Hugging Face data sets (data.name=hf): every way of naming one reads the image folder's samples, by index, offline;
bad input is one line; the shard writer takes them too. Multi-process runs on them: test_train_e2e, test_resume."""
import glob
import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch

from core.config import Config
from data import build_datasets, build_eval_loader, skipped_images
from data.sources import DataError
from data.sources import HubImages
from data.decoding.jpeg import load
from shards import write_shards
from data.sources import ShardImages
from testbed import folder_as_parquet, make_jpeg_testbed
from helpers import DEBUG, datasets_cache_entry, offline_caches, run_here, small_data_config

HUB_ID = "tester/bed"


def hub_layout(parquet_folder, name, out):
    """The parquet files of `parquet_folder` under `out` as the hub stores data set `name`: a snapshot of its files
    in the hub cache (hf download --repo-type dataset), with refs/main naming it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(out, "datasets--" + name.replace("/", "--"))
    shutil.copytree(parquet_folder, os.path.join(repo, "snapshots", commit))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    """12 + 7 JPEGs as an image folder, the same as hub parquet (train in 3 files), a datasets-cache entry and a
    hub-cache snapshot of it (offline, by hub id), and a save_to_disk folder; HF_* point at this module's caches."""
    datasets = pytest.importorskip("datasets", reason="the optional hf extra (make test installs it)")
    root = tmp_path_factory.mktemp("hf")
    folder = str(root / "jpegs")
    make_jpeg_testbed(folder, num_images=12, num_classes=3, seed=0)
    make_jpeg_testbed(folder, num_images=7, num_classes=3, seed=1, split="val")
    parquet = str(root / "parquet")
    assert folder_as_parquet(folder, parquet, rows_per_file=5) == {"train": 12, "val": 7}
    with pytest.MonkeyPatch.context() as patch:
        env = offline_caches(patch, str(root))
        datasets_cache_entry(parquet, HUB_ID, env["HF_DATASETS_CACHE"])
        hub_layout(parquet, "tester/snapshot", env["HF_HUB_CACHE"])
        saved, library = str(root / "saved"), str(root / "library")
        loaded = datasets.load_dataset(parquet)
        loaded.save_to_disk(saved)
        for split, rows in loaded.items():  # parquet as the library itself writes it (the hub's parquet export)
            rows.to_parquet(os.path.join(library, "data", f"{split}-00000-of-00001.parquet"))
        yield {"folder": folder, "parquet": parquet, "saved": saved, "library": library, "root": root}


def hf_cfg(name, **data):
    return small_data_config(name="hf", hf_name=name, **data)


def eval_batches(cfg):
    _, val, info = build_datasets(cfg.data, cfg.aug, train=False)
    images, labels = zip(*build_eval_loader(val, cfg.data, 0, 1))
    return torch.cat(images), torch.cat(labels), info


@pytest.mark.parametrize("source", ["parquet", "library", "cache", "snapshot", "saved"])
def test_every_source_serves_the_folders_images_by_index(bed, source):
    """Parquet folders (written with pyarrow; with datasets), the datasets cache by hub id, a hub-cache snapshot by
    hub id (both offline) and a save_to_disk folder: the same bytes per row as the folder's files, the same
    evaluation batches, class names."""
    name = {"cache": HUB_ID, "snapshot": "tester/snapshot"}.get(source) or bed[source]
    cfg = hf_cfg(name)
    train, val, info = build_datasets(cfg.data, cfg.aug, train=True)
    folder = small_data_config(name="imagefolder", root=bed["folder"])
    f_train, f_val, f_info = build_datasets(folder.data, folder.aug, train=True)
    assert (info.num_classes, info.class_names, info.train_size, info.val_size) == \
        (3, f_info.class_names, 12, 7)
    raw = train.source
    assert isinstance(raw, HubImages) and np.array_equal(raw.labels, f_train.source.labels)
    for row in range(len(f_train)):
        with open(f_train.source.read(row), "rb") as f:
            assert bytes(raw.read(row)) == f.read()
    images, labels, _ = eval_batches(cfg)
    f_images, f_labels, _ = eval_batches(folder)
    assert torch.equal(images, f_images) and torch.equal(labels, f_labels)


def test_a_split_pickles_as_file_names_and_reads_in_the_new_process(bed):
    """What a spawned loader worker gets: no table, a few KB; it maps the files itself and reads the same rows."""
    _, val, _ = build_datasets(hf_cfg(bed["parquet"]).data, Config().aug, train=False)
    data = pickle.dumps(val.source)
    assert len(data) < 8000, len(data)
    copy = pickle.loads(data)
    assert copy.images._chunks == [] and bytes(copy.images[6]) == bytes(val.source.images[6])


def test_classes_and_train_limit_narrow_a_hub_split(bed):
    cfg = hf_cfg(bed["parquet"], classes=[2, 0], train_limit=3)
    train, val, info = build_datasets(cfg.data, cfg.aug, train=True)
    assert info.class_names == ["c0002", "c0000"] and len(train) == 3
    assert set(val.source.labels) == {0, 1} and len(val) == 5  # val rows 0, 2, 3, 5, 6 are classes 0 and 2
    cfg = hf_cfg(bed["parquet"], num_classes=4)
    with pytest.raises(DataError, match=f"data.num_classes=4 but '{bed['parquet']}' has 3 classes; set "
                                        f"data.num_classes=3 or 0"):
        build_datasets(cfg.data, cfg.aug, train=False)
    assert [int(load(val.source.images[int(r)]).shape[0]) for r in val.source.rows] == [3] * 5


def write_set(folder, columns, features, split_rows=None):
    """A one-file-per-split parquet data set from column lists (the same columns for train and validation)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    table = pa.table(columns).replace_schema_metadata(
        {b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    for split in ("train", "validation"):
        pq.write_table(table, os.path.join(folder, "data", f"{split}-00000-of-00001.parquet"))
    return folder


def image_struct(data):
    return [{"bytes": d, "path": f"{i}.jpg"} for i, d in enumerate(data)]


@pytest.fixture(scope="module")
def jpegs(bed):
    paths = sorted(glob.glob(os.path.join(bed["folder"], "val", "*", "*.JPEG")))[:4]
    return [open(p, "rb").read() for p in paths]


IMAGE = {"_type": "Image"}
LABEL = {"_type": "ClassLabel", "names": ["a", "b"]}


@pytest.mark.parametrize("case", ["no_image", "two_images", "no_label", "named_missing", "named_text", "range",
                                  "unlabelled", "no_split", "unknown_config", "unknown_set", "unknown_folder",
                                  "one_saved_split"])
def test_bad_hub_sets_get_one_line_naming_the_problem(bed, jpegs, tmp_path, case):
    import datasets
    folder = str(tmp_path / "set")
    images = image_struct(jpegs)
    labels = [0, 1, 0, 1]
    options, name = {}, folder
    if case == "no_image":
        write_set(folder, {"picture": [f"{i}.jpg" for i in range(4)], "label": labels},
                  {"picture": {"dtype": "string", "_type": "Value"}, "label": LABEL})
        message = "has no image column (columns: picture (Value), label (ClassLabel)); name one with " \
                  "data.hf_image_column"
    elif case == "two_images":
        write_set(folder, {"image": images, "mask": images, "label": labels},
                  {"image": IMAGE, "mask": IMAGE, "label": LABEL})
        message = "has 2 image columns (columns: image (Image), mask (Image), label (ClassLabel)); name one with"
    elif case == "no_label":
        write_set(folder, {"image": images, "fine": labels}, {"image": IMAGE, "fine": {"dtype": "int64",
                                                                                       "_type": "Value"}})
        message = "has no label column (columns: image (Image), fine (Value)); name one with data.hf_label_column"
    elif case == "named_missing":
        write_set(folder, {"image": images, "label": labels}, {"image": IMAGE, "label": LABEL})
        options, message = {"hf_label_column": "fine"}, "has no label column 'fine' (columns: image (Image), label"
    elif case == "named_text":
        write_set(folder, {"image": images, "label": labels, "caption": ["x"] * 4},
                  {"image": IMAGE, "label": LABEL, "caption": {"dtype": "string", "_type": "Value"}})
        options, message = {"hf_label_column": "caption"}, "column 'caption' holds string, not class indices"
    elif case == "range":
        write_set(folder, {"image": images, "label": [0, 1, 2, 1]}, {"image": IMAGE, "label": LABEL})
        message = f"'{folder} validation row 2' has label 2, outside 0..1 (1 such rows); fix the labels"
    elif case == "unlabelled":
        write_set(folder, {"image": images, "label": [0, None, 1, None]}, {"image": IMAGE, "label": LABEL})
        message = f"'{folder} validation' has 2 rows without a label in column 'label'; pick a labelled split"
    elif case == "unknown_config":
        name, options = HUB_ID, {"hf_config": "nope"}
        message = f"cannot load data set '{HUB_ID}' config 'nope' ("
    elif case == "no_split":
        write_set(folder, {"image": images, "label": labels}, {"image": IMAGE, "label": LABEL})
        options, message = {"hf_val_split": "val"}, "has no split 'val' (it has: train, validation); set " \
                                                    "data.hf_val_split"
    elif case == "unknown_set":
        name, message = "tester/nothing", "data set 'tester/nothing' is not in the datasets cache"
    elif case == "unknown_folder":
        name, message = str(tmp_path / "nowhere"), f"no data set at '{tmp_path}/nowhere'"
    else:
        datasets.load_dataset(bed["parquet"], split="validation").save_to_disk(folder)
        message = "holds one saved split (a Dataset), not a DatasetDict"
    cfg = hf_cfg(name, **options)
    with pytest.raises(DataError) as error:
        build_datasets(cfg.data, cfg.aug, train=True)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    if case == "unknown_set":
        assert bed["root"].name in str(error.value)
        assert "'python scripts/hub_prefetch.py tester/nothing'" in str(error.value)


def test_named_integer_labels_and_binary_images_need_no_features(bed, jpegs, tmp_path):
    """Plain binary images and an int label column, named: classes from data.num_classes, or the largest label."""
    folder = write_set(str(tmp_path / "plain"), {"jpeg": jpegs, "cls": [0, 3, 1, 2]}, {
        "jpeg": {"dtype": "binary", "_type": "Value"}, "cls": {"dtype": "int64", "_type": "Value"}})
    cfg = hf_cfg(folder, hf_image_column="jpeg", hf_label_column="cls")
    _, val, info = build_datasets(cfg.data, cfg.aug, train=False)
    assert info.num_classes == 4 and info.class_names == ["0", "1", "2", "3"]
    assert bytes(val.source.images[2]) == jpegs[2]
    cfg.data.num_classes = 3
    with pytest.raises(DataError, match="validation row 1' has label 3, outside 0..2 .*raise data.num_classes"):
        build_datasets(cfg.data, cfg.aug, train=False)


def test_an_undecodable_row_is_named_or_skipped(bed, jpegs, tmp_path):
    folder = write_set(str(tmp_path / "broken"), {"image": image_struct([jpegs[0], jpegs[1][:300], jpegs[2]]),
                                                  "label": [0, 1, 0]}, {"image": IMAGE, "label": LABEL})
    cfg = hf_cfg(folder)
    cfg.data.batch_size = 2
    with pytest.raises(DataError, match=rf"cannot .*image '{re.escape(folder)} validation row 1' .*skip_corrupt=true"):
        eval_batches(cfg)
    cfg.data.skip_corrupt = True
    _, val, _ = build_datasets(cfg.data, cfg.aug, train=False)
    labels = torch.cat([y for _, y in build_eval_loader(val, cfg.data, 0, 1)])
    assert labels.tolist() == [0, 0] and skipped_images(val) == 1


def test_the_optional_dependency_missing_is_one_line(bed, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    cfg = hf_cfg(bed["parquet"])
    with pytest.raises(DataError, match=r"needs the optional package 'datasets', which is not installed; "
                                        r"pip install -e '.\[hf\]'"):
        build_datasets(cfg.data, cfg.aug, train=False)


def test_shards_written_from_a_hub_set_hold_its_rows(bed, tmp_path):
    """`python scripts/shards.py write --hf`: the rows' bytes and labels, in row order (with --keep-order), classes.txt
    from the label feature; the shards then read like the folder."""
    from shards import hf_sources, main
    out = str(tmp_path / "shards")
    main(["write", "--hf", HUB_ID, out, "--shard-size", "5", "--workers", "2", "--keep-order"])
    with open(os.path.join(out, "classes.txt")) as f:
        assert f.read().split() == ["c0000", "c0001", "c0002"]
    sources, _ = hf_sources(bed["parquet"])
    for split, count in (("train", 12), ("val", 7)):
        shards = ShardImages(os.path.join(out, split))
        assert len(shards) == count and shards.labels.tolist() == [label for _, _, label in sources[split].samples]
        for i in (0, count - 1):
            assert torch.equal(shards[i][0], load(bytes(sources[split].read(i)[0])))
    assert write_shards(hf_sources(bed["parquet"]), str(tmp_path / "again"), shard_size=5) == {"train": 12, "val": 7}
    assert np.array_equal(np.load(os.path.join(tmp_path, "again", "val", "index.npz"))["size"],
                          np.load(os.path.join(out, "val", "index.npz"))["size"])


def test_train_py_stops_in_one_line_on_a_bad_hub_set_and_writes_nothing(bed, tmp_path):
    out = tmp_path / "run"
    proc = run_here(["train.py", "--config", DEBUG, f"output_dir={out}", "data.name=hf",
                     f"data.hf_name={bed['parquet']}", "data.hf_val_split=test"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: data set '{bed['parquet']}' has no split 'test' (it has: train, validation); set "
                     f"data.hf_val_split"], proc.stderr
    assert not out.exists() or not any(out.rglob("*.pth"))
