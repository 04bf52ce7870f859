"""Tar shards: the writer (identical output), the reader (the image folder's samples, by index) and its bad input."""
import fcntl
import filecmp
import glob
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch

from data import build_datasets, build_eval_loader
from data.sources import DataError
from data.decoding.jpeg import load
from shard_plan import MANIFEST
from shards import main, write_shards
from data.sources.shards import INDEX, ShardImages, build_index, shard_files
from testbed import make_jpeg_testbed
from core.cli import run_main
from helpers import ROOT, offline_caches, script_module, small_data_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("jpegs"))
    make_jpeg_testbed(root, num_images=12, num_classes=3, seed=0)
    make_jpeg_testbed(root, num_images=7, num_classes=3, seed=1, split="val")
    return root


@pytest.fixture
def shards(folder, tmp_path):
    out = str(tmp_path / "shards")
    assert write_shards(folder, out, shard_size=5) == {"train": 12, "val": 7}
    return out


def shards_cfg(root, **data):
    return small_data_config(**{"name": "shards", "root": root, **data})


def write_tar(path, members):
    """A shard from [(member name, bytes)]."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_the_writer_writes_identical_shards_twice_and_the_reader_serves_the_folders_files(folder, shards, tmp_path):
    again = str(tmp_path / "again")
    main(["write", folder, again, "--shard-size", "5", "--workers", "2"])
    for split, count in (("train", 3), ("val", 2)):
        names = sorted(n for n in os.listdir(os.path.join(shards, split)) if n.endswith(".tar"))
        assert names == [f"{split}-{n:06d}.tar" for n in range(count)]
        match, mismatch, errors = filecmp.cmpfiles(os.path.join(shards, split), os.path.join(again, split), names,
                                                   shallow=False)
        assert (len(match), mismatch, errors) == (count, [], [])
    with open(os.path.join(shards, "classes.txt")) as f:
        assert f.read().split() == ["c0000", "c0001", "c0002"]
    # Every image's bytes, under its label: val in the folder's order, train shuffled across shards.
    source = {split: sorted((os.path.join(d, f), d.rsplit("/", 1)[1]) for d, _, fs in os.walk(os.path.join(folder, split))
                            for f in fs) for split in ("train", "val")}
    for split in ("train", "val"):
        ds = ShardImages(os.path.join(shards, split)).with_decoder(lambda data: data)
        got = [(ds[i][0], ds[i][1]) for i in range(len(ds))]
        want = [(open(path, "rb").read(), int(name[1:])) for path, name in source[split]]
        assert (got == want) if split == "val" else (sorted(got) == sorted(want) and got != want)


def test_the_writer_can_re_encode_to_a_shorter_side(folder, tmp_path):
    write_shards(folder, str(tmp_path / "small"), max_side=120)
    ds = ShardImages(str(tmp_path / "small" / "val"))
    sources = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(folder, "val")) for f in fs)
    for i, path in enumerate(sources):
        image, source = ds[i][0], load(path)
        short, source_short = min(image.shape[1:]), min(source.shape[1:])
        assert short == min(120, source_short) and image.shape[0] == 3
        ratio = (image.shape[1] / image.shape[2]) / (source.shape[1] / source.shape[2])
        assert abs(ratio - 1) < 0.02  # the aspect is kept


def test_shards_build_like_the_image_folder_and_evaluate_every_image_once(folder, shards):
    cfg = shards_cfg(shards, recipe="imagenet")
    train_set, val_set, info = build_datasets(cfg.data, cfg.aug)
    assert (info.num_classes, info.train_size, info.val_size, info.class_names) == (3, 12, 7, ["c0000", "c0001", "c0002"])
    cfg_folder = shards_cfg(folder, name="imagefolder", recipe="imagenet")
    _, folder_val, _ = build_datasets(cfg_folder.data, cfg_folder.aug)
    for i in range(len(val_set)):  # the same decoded and centre-cropped images
        assert torch.equal(val_set[i][0], folder_val[i][0]) and val_set[i][1] == folder_val[i][1]
    counts = [sum(len(y) for _, y in build_eval_loader(val_set, cfg.data, rank, 3)) for rank in range(3)]
    assert counts == [3, 2, 2]
    narrowed = shards_cfg(shards, classes=[2, 0], train_limit=5)
    train_set, val_set, info = build_datasets(narrowed.data, narrowed.aug)
    assert info.num_classes == 2 and info.train_size == 5 and len(val_set) == 5
    assert sorted({int(val_set[i][1]) for i in range(len(val_set))}) == [0, 1]


def test_a_reader_keeps_few_shards_open(shards):
    ds = ShardImages(os.path.join(shards, "train"), max_open=2).with_decoder(len)
    before = len(os.listdir("/proc/self/fd"))
    assert [ds[i][0] for i in list(range(len(ds))) * 2] and len(ds._files) == 2
    assert len(os.listdir("/proc/self/fd")) == before + 2


def test_a_corrupt_member_is_named_or_skipped_and_counted(shards):
    folder = os.path.join(shards, "val")
    write_tar(os.path.join(folder, "val-000001.tar"), [("a/broken.jpg", b"\xff\xd8 not a jpeg"), ("a/broken.cls", b"1\n")])
    build_index(folder, progress=False)
    ds = ShardImages(folder)
    assert len(ds) == 6 and ds[0][0].dtype == torch.uint8  # the shard before it still reads
    with pytest.raises(DataError, match=r"'.*val-000001.tar:a/broken.jpg' .*data.skip_corrupt=true"):
        ds[5]
    skipping = ShardImages(folder, skip_corrupt=True)
    assert skipping[5] is None and skipping.skipped() == 1


def bad(shards, name, members):
    folder = os.path.join(shards, "train")
    write_tar(os.path.join(folder, name), members)
    return folder


def test_bad_shards_get_one_line_naming_the_file(shards):
    train = os.path.join(shards, "train")
    index = open(os.path.join(train, INDEX), "rb").read()
    cases = {
        "no label": ("train-000009.tar", [("x/k.jpg", b"jpeg")], r"train-000009.tar': image 'x/k' .*no '.cls'"),
        "bad label": ("train-000009.tar", [("k.jpg", b"j"), ("k.cls", b"cat")], r"'k.cls' holds 'cat', not an "),
    }
    for name, members, message in cases.values():
        folder = bad(shards, name, members)
        with pytest.raises(DataError, match=message):
            build_index(folder, progress=False)
        os.remove(os.path.join(folder, name))
    # A shard cut short: named when indexing, and after indexing at start-up (its size changed).
    shard = os.path.join(train, "train-000002.tar")
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"the index '.*index.npz' is stale: 'train-000002.tar' changed since it was built \(now \d+ bytes"):
        ShardImages(train)
    with pytest.raises(DataError, match=r"'.*train-000002.tar' is not a readable tar shard .*truncated"):
        build_index(train, progress=False)
    assert open(os.path.join(train, INDEX), "rb").read() == index  # a failed build leaves the index as it was
    open(shard, "wb").write(data)
    os.utime(shard, ns=(0, 0))
    with pytest.raises(DataError, match=r"stale: 'train-000002.tar' changed since it was built \(modified\); rebuild it with 'python scripts/shards.py index"):
        ShardImages(train)
    build_index(train, progress=False)
    write_tar(os.path.join(train, "train-000003.tar"), [])
    with pytest.raises(DataError, match=r"stale: shards added \['train-000003.tar'\], gone \[\]"):
        ShardImages(train)
    os.remove(os.path.join(train, INDEX))
    with pytest.raises(DataError, match=r"^no index '.*index.npz' in '.*train'; .*python scripts/shards.py index"):
        ShardImages(train)
    with pytest.raises(DataError, match=r"^no .tar shards in '.*nothing'"):
        ShardImages(os.path.join(shards, "nothing"))


def test_labels_outside_the_classes_are_named(shards):
    open(os.path.join(shards, "classes.txt"), "w").write("c0000\nc0001\n")
    cfg = shards_cfg(shards)
    with pytest.raises(DataError, match=r"'.*-00000\d.tar:c0002/\d+_JPEG.jpg' has label 2, outside 0..1 .*classes.txt"):
        build_datasets(cfg.data, cfg.aug)
    os.remove(os.path.join(shards, "classes.txt"))
    cfg.data.num_classes = 2
    with pytest.raises(DataError, match=r"outside 0..1 .*raise data.num_classes"):
        build_datasets(cfg.data, cfg.aug)
    cfg.data.num_classes = 0  # the labels' range then says how many classes there are
    assert build_datasets(cfg.data, cfg.aug)[2].num_classes == 3


def test_the_writer_refuses_a_folder_holding_other_shards(folder, shards):
    extra = os.path.join(shards, "train", "train-000099.tar")
    write_tar(extra, [])
    before = {n: os.stat(os.path.join(shards, "train", n)).st_mtime_ns for n in os.listdir(os.path.join(shards, "train"))}
    with pytest.raises(DataError, match=r"already holds other shards \(train-000099.tar, ...\).*empty folder"):
        write_shards(folder, shards, shard_size=5)
    after = {n: os.stat(os.path.join(shards, "train", n)).st_mtime_ns for n in os.listdir(os.path.join(shards, "train"))}
    assert after == before
    extra_class = os.path.join(folder, "val", "c0003")  # a class only val has: refused before anything is written
    os.makedirs(extra_class)
    shutil.copy(glob.glob(os.path.join(folder, "val", "c0000", "*"))[0], extra_class)
    try:
        with pytest.raises(DataError, match=r"class folders differ between '.*train' \(3\) and '.*val' \(4\)"):
            write_shards(folder, shards, shard_size=5)
    finally:
        shutil.rmtree(extra_class)
    assert {n: os.stat(os.path.join(shards, "train", n)).st_mtime_ns
            for n in os.listdir(os.path.join(shards, "train"))} == before
    with pytest.raises(DataError, match=r"'.*' has neither train/ nor val/"):
        main(["write", os.path.join(folder, "train"), os.path.join(shards, "elsewhere")])


def test_the_data_tools_end_a_user_error_with_one_line_and_exit_code_2(folder, tmp_path, monkeypatch, capsys):
    """The shard writer and indexer, the hub prefetch and the test bed, on a folder that is not an image folder's root,
    a folder without shards, a data set that is not there and more classes than images: one line each, exit code 2
    (their command lines' run_main, in this process), nothing written."""
    commands = {"write": ("shards", ["write", os.path.join(folder, "train"), str(tmp_path / "out")]),
                "index": ("shards", ["index", str(tmp_path)]),
                "prefetch": ("hub_prefetch", [str(tmp_path / "no-such-set")]),
                "testbed": ("testbed", [str(tmp_path / "bed"), "--train", "1", "--classes", "2"])}
    offline_caches(monkeypatch, str(tmp_path / "hf"))
    errors = {}
    for name, (script, args) in commands.items():
        with pytest.raises(SystemExit) as exit:
            run_main(lambda: script_module(script).main(args))
        errors[name] = capsys.readouterr().err
        assert exit.value.code == 2 and errors[name].count("\n") == 1 and errors[name].startswith("error: "), \
            (name, errors[name])
    assert "has neither train/ nor val/" in errors["write"] and "no .tar shards" in errors["index"]
    assert "no-such-set" in errors["prefetch"] and "2 classes for 1 images" in errors["testbed"]
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "bed")


STALLING_WRITER = '''
import os, sys, time
from shards import file_bytes, folder_sources, write_shards

reads = 0

def stall_at_read(path):
    """The source's reader, stopping for good at read number STALL_AT (a mark file says it got there)."""
    global reads
    reads += 1
    if reads == int(os.environ["STALL_AT"]):
        open(os.environ["STALL_MARK"], "w").close()
        time.sleep(600)
    return file_bytes(path)

if __name__ == "__main__":
    sources, classes = folder_sources(sys.argv[1])
    for source in sources.values():
        source.read = stall_at_read
    write_shards((sources, classes), sys.argv[2], shard_size=2, workers=1)
'''


def tree(root):
    """{relative path: bytes} of every file under root; an index by its columns, less the shards' mtimes."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if name == INDEX:
                with np.load(path) as index:
                    files[os.path.relpath(path, root)] = {k: index[k].tolist() for k in index if k != "shard_mtime"}
            else:
                files[os.path.relpath(path, root)] = open(path, "rb").read()
    return files


def wait_for_lock(folder, seconds=30):
    """Until no process holds the writer's lock on `folder`."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        deadline = time.monotonic() + seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, "the killed writer's processes still hold the lock"
                time.sleep(0.05)
    finally:
        os.close(fd)


def test_a_writer_killed_mid_way_resumes_to_the_bytes_of_a_write_never_stopped(folder, tmp_path, capsys):
    """SIGKILL to the writer and its process while shard 3 of train is half written (the reader stalls on its second
    image), then the same arguments again: the finished shards are kept, the half one never reads as a shard, and
    every file ends as an uninterrupted write's (on 3 processes: the bytes do not depend on how many)."""
    whole, out = str(tmp_path / "whole"), str(tmp_path / "out")
    write_shards(folder, whole, shard_size=2, workers=3)
    script, mark = tmp_path / "stalling.py", tmp_path / "stalled"
    script.write_text(STALLING_WRITER)
    env = {**os.environ, "STALL_AT": "8", "STALL_MARK": str(mark),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")])}
    writer = subprocess.Popen([sys.executable, str(script), folder, out], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not mark.exists() and writer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mark.exists(), "the writer did not get to the stall"
    finally:
        os.killpg(writer.pid, signal.SIGKILL)
        writer.wait()
    wait_for_lock(out)  # the writer's own process may end a moment after the main one
    train = os.path.join(out, "train")
    finished = {name: os.stat(os.path.join(train, name)).st_ino for name in shard_files(train)}
    assert sorted(finished) == [f"train-{n:06d}.tar" for n in range(3)]
    assert [n for n in os.listdir(train) if n.startswith(".train-000003.tar.")]  # the half shard, hidden
    assert not os.path.exists(os.path.join(out, "val"))
    main(["write", folder, out, "--shard-size", "2", "--workers", "2"])
    assert "train: 12 images in 6 shards; wrote 3 shards (6 images)" in capsys.readouterr().out
    assert {name: os.stat(os.path.join(train, name)).st_ino for name in finished} == finished  # not written again
    assert tree(out) == tree(whole)
    main(["write", folder, out, "--shard-size", "2", "--workers", "2"])  # done: nothing to do
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote 12 train, 7 val images to '{out}', all there already"


def test_a_write_with_other_arguments_is_refused_until_overwrite_starts_it_over(folder, shards, tmp_path):
    before = tree(shards)
    for args, difference in (([], "shard_size 5 then, 1000 now"), (["--keep-order"], "shuffle True then, False now"),
                             (["--max-side", "64"], "max_side 0 then, 64 now")):
        args = args + ["--shard-size", "5"] * bool(args)
        with pytest.raises(DataError, match=rf"^'{shards}' holds a write with other arguments or from another "
                                            rf"source \({difference}\); rerun it with its own arguments to finish it, "
                                            rf"or add --overwrite to start over$"):
            main(["write", folder, shards, *args])
    assert tree(shards) == before
    main(["write", folder, shards, "--shard-size", "4", "--overwrite"])
    write_shards(folder, str(tmp_path / "fresh"), shard_size=4)
    assert tree(shards) == tree(str(tmp_path / "fresh"))
    os.remove(os.path.join(shards, MANIFEST))  # shards without a manifest: another tool's, or an older writer's
    with pytest.raises(DataError, match=r"holds shards without a manifest.json .*train-000000.tar, ...\); write to an "
                                        r"empty folder, or add --overwrite to replace them$"):
        write_shards(folder, shards, shard_size=4)
    with open(os.path.join(folder, "val", "c0000", "extra.jpg"), "wb") as f:  # the source changed
        f.write(open(glob.glob(os.path.join(folder, "val", "c0000", "*"))[0], "rb").read())
    try:
        with pytest.raises(DataError, match=r"\(7 val images then, 8 now\); rerun it with its own arguments"):
            write_shards(folder, str(tmp_path / "fresh"), shard_size=4)
    finally:
        os.remove(os.path.join(folder, "val", "c0000", "extra.jpg"))
