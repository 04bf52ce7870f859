"""scripts/testbed.py: the generated ImageNet-like JPEG ImageFolder."""
import os

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from core.errors import UserError
from testbed import _image_size, make_jpeg_testbed


def _read_all(paths: list[str]) -> list[bytes]:
    result = []
    for path in paths:
        with open(path, "rb") as f:
            result.append(f.read())
    return result


@pytest.fixture(scope="module")
def bed(tmp_path_factory) -> tuple[str, list[str]]:
    root = str(tmp_path_factory.mktemp("bed"))
    return root, make_jpeg_testbed(root, num_images=24, num_classes=3, seed=0)


def test_same_seed_gives_the_same_bytes_in_any_number_of_processes(bed, tmp_path):
    _, paths = bed
    again = make_jpeg_testbed(str(tmp_path / "again"), num_images=24, num_classes=3, seed=0, workers=2)
    assert [os.path.relpath(p, str(tmp_path / "again")) for p in again] == \
        [os.path.relpath(p, bed[0]) for p in paths]
    assert _read_all(again) == _read_all(paths)


def test_another_seed_gives_other_images(bed, tmp_path):
    other = make_jpeg_testbed(str(tmp_path / "other"), num_images=3, num_classes=3, seed=1)
    assert _read_all(other) != _read_all(bed[1][:3])


def test_imagefolder_reads_it_with_one_folder_per_class(bed):
    root, paths = bed
    folder = ImageFolder(os.path.join(root, "train"))
    assert folder.classes == ["c0000", "c0001", "c0002"]
    assert len(folder) == len(paths) == 24
    assert sorted(label for _, label in folder.samples) == sorted(i % 3 for i in range(24))
    image, _ = folder[0]
    assert image.mode == "RGB"


def test_files_are_baseline_jpegs_of_imagenet_like_sizes(bed):
    _, paths = bed
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(2) == b"\xff\xd8"
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode in ("RGB", "L")
            assert 100 <= min(image.size) and max(image.size) <= 1000
    kilobytes = np.mean([os.path.getsize(p) for p in paths]) / 1000
    assert 60 < kilobytes < 180  # ImageNet's train JPEGs average about 110 KB


def test_size_distribution_resembles_imagenets():
    rng = np.random.default_rng(0)
    sizes = np.array([_image_size(rng) for _ in range(4000)])
    long_side = sizes.max(1)
    assert 0.6 < np.mean(long_side == 500) < 0.75
    assert 0.7 < np.mean(sizes[:, 0] >= sizes[:, 1]) < 0.85  # mostly landscape
    assert np.mean(long_side > 500) > 0.08 and np.mean(long_side < 500) > 0.15
    assert 430 < sizes[:, 0].mean() < 520 and 360 < sizes[:, 1].mean() < 450


def test_rejects_more_classes_than_images(tmp_path):
    with pytest.raises(UserError, match="classes"):
        make_jpeg_testbed(str(tmp_path), num_images=2, num_classes=3)
