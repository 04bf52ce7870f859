"""data/augment/: the device's RandAugment, op by op against timm's PIL ops and draw by draw against timm's."""
import math
import random
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as aa

from data.augment.batch import BatchAugment
from data.decoding.jpeg import JpegTrainDecode
from data.augment.pixel_ops import histograms
from data.augment.rand_augment import BatchRandAugment, Draws, level_args
from data.augment.timm_reference import _posterize
from testbed import make_jpeg_testbed

FILL = (124, 116, 104)
CONFIG = "rand-m9-mstd0.5-inc1"


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> torch.Tensor:
    """Six 224 x 224 random-resized crops of test-bed JPEGs, one of them greyscale-looking."""
    paths = make_jpeg_testbed(str(tmp_path_factory.mktemp("bed")), num_images=6, num_classes=2, seed=5)
    random.seed(0)
    images = torch.stack([JpegTrainDecode()(path) for path in paths])
    images[5] = images[5].float().mean(0, keepdim=True).to(torch.uint8)  # equal channels
    return images


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())


def _timm_op(name: str, image: torch.Tensor, magnitude: float, negate: bool) -> torch.Tensor:
    """timm's AugmentOp at a fixed magnitude, applied for sure, with the sign of signed ops forced."""
    op = aa.AugmentOp(name, prob=1.0, magnitude=magnitude,
                      hparams=dict(translate_const=100, img_mean=FILL, interpolation=Image.Resampling.BICUBIC))
    if op.aug_fn is aa.posterize:
        op.aug_fn = _posterize  # Pillow >= 13 refuses 0 bits; timm's older Pillow gave black
    draw = random.random
    random.random = (lambda: 0.9) if negate else (lambda: 0.1)  # _randomly_negate: negative when > 0.5
    try:
        return torch.from_numpy(np.array(op(_pil(image)))).permute(2, 0, 1)
    finally:
        random.random = draw


@pytest.mark.parametrize("name", BatchRandAugment(CONFIG).names)
def test_each_op_equals_timms_pil_op_to_rounding(crops, name):
    ra = BatchRandAugment(CONFIG, fill=FILL)
    k = ra.names.index(name)
    n = len(crops)
    for magnitude, negate in ((4.0, False), (9.0, True), (10.0, False)):
        arg = level_args(name, torch.full((n,), magnitude, dtype=torch.float64), torch.full((n,), negate))
        draws = Draws(torch.tensor([[k] * n, [0] * n]), torch.tensor([[True] * n, [False] * n]),
                      torch.stack([arg, arg]))
        ours = ra(crops, draws=draws)
        theirs = torch.stack([_timm_op(name, image, magnitude, negate) for image in crops])
        diff = (ours.int() - theirs.int()).abs()
        # float32 here against float64 (and a different summation order) in PIL: off by one now and then
        assert diff.max() <= 1 and (diff > 0).float().mean() < 3e-3, (name, magnitude, negate)
        if name not in ("AutoContrast", "Equalize"):  # these may leave an already-stretched crop alone
            assert not torch.equal(ours, crops)


def _timm_draws(n: int) -> dict[str, list[float]]:
    """The ops timm's RandAugment applies to n images, and each application's argument, recorded at the op."""
    seen: dict[str, list[float]] = defaultdict(list)
    transform = aa.rand_augment_transform(CONFIG, {"img_mean": FILL})
    for op in transform.ops:
        op.aug_fn = lambda img, *args, _name=op.name, **kw: seen[_name].append(args[0] if args else 0.0) or img
    image = Image.new("RGB", (4, 4))
    for _ in range(n):
        transform(image)
    return seen


def _ks(a, b) -> float:
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, side="right") / len(a)
                        - np.searchsorted(b, grid, side="right") / len(b)).max())


def test_draws_follow_timms_distribution():
    """Which op, how often applied, and each op's argument (magnitude noise, sign, level function), against timm's
    own RandAugment run on 12,000 images: counts within 5 sigma, arguments by two-sample KS at the 1e-4 level."""
    random.seed(0)
    np.random.seed(0)
    n = 12_000
    theirs = _timm_draws(n)
    ra = BatchRandAugment(CONFIG, fill=FILL)
    draws = ra.draw(n, torch.Generator().manual_seed(0))
    ours: dict[str, list[float]] = defaultdict(list)
    for op, applied, arg in zip(draws.op.flatten().tolist(), draws.applied.flatten().tolist(),
                                draws.arg.flatten().tolist()):
        if applied:
            ours[ra.names[op]].append(arg)
    expected = 2 * n * 0.5 / 15
    for name in ra.names:
        assert abs(len(ours[name]) - expected) < 5 * math.sqrt(expected), name
        assert abs(len(theirs[name]) - expected) < 5 * math.sqrt(expected), name
        m = min(len(ours[name]), len(theirs[name]))
        assert _ks(ours[name], theirs[name]) < 2.0 * math.sqrt(2 / m), name  # KS critical value at ~1e-3


def test_same_generator_state_same_batch_and_memory_format_kept(crops):
    ra = BatchRandAugment(CONFIG, fill=FILL)
    batch = crops.repeat(4, 1, 1, 1).contiguous(memory_format=torch.channels_last)
    first = ra(batch, torch.Generator().manual_seed(3))
    again = ra(batch, torch.Generator().manual_seed(3))
    other = ra(batch, torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.is_contiguous(memory_format=torch.channels_last) and first.dtype == torch.uint8


def test_batch_augment_flips_before_rand_augment_as_timm():
    """A ShearY after a flip is another image than the flip after the shear: the order must be timm's."""
    image = torch.randint(0, 256, (1, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    augment = BatchAugment((0.5,) * 3, (0.5,) * 3, hflip=1.0, rand_augment="rand-n1-m10-mstd0-p1.0", reprob=0)
    ra = augment.rand_augment
    ra.names = ["ShearY"]  # every image draws ShearY at full strength, of either sign
    shear = [Draws(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool),
                   torch.tensor([[sign * 0.3]], dtype=torch.float64)) for sign in (1, -1)]
    before = [(ra(image.flip(-1), draws=d).float() / 255 - 0.5) / 0.5 for d in shear]
    after = [(ra(image, draws=d).flip(-1).float() / 255 - 0.5) / 0.5 for d in shear]
    out = augment(image, torch.Generator().manual_seed(0))
    assert any(torch.allclose(out, e, atol=1e-5) for e in before)
    assert not any(torch.allclose(out, e, atol=1e-5) for e in after)


def test_ops_timm_has_but_the_device_lacks_are_one_line_errors():
    with pytest.raises(ValueError, match="GaussianBlur"):
        BatchRandAugment("rand-m9-t3a")


def test_histograms_by_sorting_equal_bincounts(crops):
    """The accelerator's way (no wait on the device, deterministic) counts what the CPU's bincount counts."""
    assert torch.equal(histograms(crops, by_sorting=True), histograms(crops, by_sorting=False))
    assert int(histograms(crops).sum()) == crops.numel()
