import functools
import math
import random
from typing import NamedTuple

import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN as MEAN, IMAGENET_DEFAULT_STD as STD
from timm.data.random_erasing import RandomErasing

from data.augment.batch import BatchAugment, BatchNormalize
from simulated_device import SimulatedDevice

CL = torch.channels_last


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one thread spares OpenMP hand-offs, which cost most when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n, h=12, w=16, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _reference(images):
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(1, -1, 1, 1)
    return (images.double() / 255 - mean) / std


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_normalisation_matches_the_formula(fmt):
    x = _images(16).contiguous(memory_format=fmt)
    before = x.clone()
    for out in (BatchNormalize(MEAN, STD)(x), BatchAugment(MEAN, STD, hflip=0, reprob=0)(x, _gen(0))):
        assert out.dtype == torch.float32 and out.device == x.device and out.is_contiguous(memory_format=fmt)
        assert (out.double() - _reference(x)).abs().max() < 1e-6
    assert torch.equal(x, before)  # the input is left as it was


def test_rejects_what_is_not_a_uint8_batch():
    with pytest.raises(TypeError):
        BatchAugment(MEAN, STD)(_images(2).float())
    with pytest.raises(TypeError):
        BatchNormalize(MEAN, STD)(_images(1)[0])
    with pytest.raises(ValueError):
        BatchNormalize(MEAN, STD)(_images(2)[:, :1])
    with pytest.raises(ValueError):
        BatchAugment(MEAN, STD, mode="noise")


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_hflip_one_mirrors_every_image(fmt):
    x = _images(8).contiguous(memory_format=fmt)
    out = BatchAugment(MEAN, STD, hflip=1.0, reprob=0)(x, _gen(0))
    assert out.is_contiguous(memory_format=fmt)
    assert torch.equal(out, BatchNormalize(MEAN, STD)(x.flip(-1)))


def test_hflip_half_mirrors_about_half_the_images_whole():
    n = 4000
    x = _images(n, 4, 6)
    x[..., 0], x[..., -1] = 0, 255  # no image is its own mirror
    out = BatchAugment(MEAN, STD, hflip=0.5, reprob=0)(x, _gen(1))
    norm = BatchNormalize(MEAN, STD)
    same = (out == norm(x)).flatten(1).all(1)
    mirrored = (out == norm(x.flip(-1))).flatten(1).all(1)
    assert torch.all(same ^ mirrored)  # each image is exactly itself or exactly its mirror
    # Binomial(4000, 0.5): standard deviation 0.0079 in the fraction; 5 of them
    assert abs(mirrored.float().mean().item() - 0.5) < 5 * math.sqrt(0.25 / n)


# --- random erasing against timm's RandomErasing, in distribution -------------------------------------------------

class Setting(NamedTuple):
    n: int  # images
    h: int
    w: int
    reprob: float
    chunk: int  # images per call


# Non-square images, so a swapped H/W shows. BIG: ~2,000 erased images a side at the recipe's reprob. TINY: boxes
# that often do not fit and sizes where rounding and the placement range matter, all images erased.
BIG = Setting(8000, 32, 48, 0.25, 2000)
TINY = Setting(20000, 6, 10, 1.0, 20000)


def _measure_boxes(out, clean):
    """Per image: erased?, top, left, h, w of the pixels that differ from `clean`, which must form one rectangle."""
    differ = (out != clean).any(1)
    rows, cols = differ.any(2), differ.any(1)
    assert torch.equal(differ, rows.unsqueeze(2) & cols.unsqueeze(1)), "an erased region is not one rectangle"
    kept = ((out == clean) & differ.unsqueeze(1)).sum().item()  # a noise value equal to the pixel's: ~1e-8 each
    assert kept <= 1e-4 * differ.sum().item(), "channels of erased pixels kept their values"
    return dict(erased=rows.any(1), top=rows.float().argmax(1), left=cols.float().argmax(1),
                h=rows.sum(1), w=cols.sum(1))


@functools.lru_cache(maxsize=None)
def _chunk_images(s, i):
    images = _images(s.chunk, s.h, s.w, seed=1000 + i)
    return images, BatchNormalize(MEAN, STD)(images)


def _erase_run(s, erase_chunk, seed=0):
    """Box measurements and erased values over s.n images; erase_chunk(uint8 images, their normalised copy (to be
    left as it is), seed) erases one chunk of them."""
    parts, values = [], []
    for i in range(0, s.n, s.chunk):
        images, clean = _chunk_images(s, i)
        out = erase_chunk(images, clean, seed + i)
        parts.append(_measure_boxes(out, clean))
        values.append(out.permute(1, 0, 2, 3)[:, (out != clean).any(1)])  # (C, erased pixels)
    stats = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    stats["values"] = torch.cat(values, 1)
    return stats


def _timm(s):
    def chunk(images, clean, seed):
        random.seed(seed)
        torch.manual_seed(seed)
        return RandomErasing(s.reprob, mode="pixel", max_count=1, device="cpu")(clean.clone())  # in place
    return chunk


def _ours(s, **kwargs):
    aug = BatchAugment(MEAN, STD, hflip=0, reprob=s.reprob, mode="pixel", **kwargs)
    return lambda images, clean, seed: aug(images, _gen(seed))


def _ks(a, b):
    """Two-sample Kolmogorov-Smirnov statistic (ties allowed)."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b, grid, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def _ks_critical(n, m, alpha=1e-4):
    """Asymptotic two-sample KS bound at level alpha; conservative for discrete data like box sizes."""
    return math.sqrt(-math.log(alpha / 2) / 2 * (n + m) / (n * m))


def _shape(stats, s):
    e = stats["erased"]
    h, w = stats["h"][e].double(), stats["w"][e].double()
    return dict(area=h * w / (s.h * s.w), log_aspect=(h / w).log(), top=stats["top"][e].double(),
                left=stats["left"][e].double(), h=h, w=w)


def _differences(ours, timm, s):
    """The comparisons in which `ours` and `timm` disagree beyond chance (each at about 1e-4 or less)."""
    bad = []
    fa, fb = ours["erased"].double().mean().item(), timm["erased"].double().mean().item()
    p = (fa + fb) / 2
    if abs(fa - fb) > 5 * math.sqrt(p * (1 - p) * 2 / s.n):  # two binomial proportions, 5 standard deviations
        bad.append(f"erased fraction {fa:.4f} vs {fb:.4f}")
    a, b = _shape(ours, s), _shape(timm, s)
    crit = _ks_critical(len(a["area"]), len(b["area"]))
    for key in a:
        d = _ks(a[key], b[key])
        if d > crit:
            bad.append(f"{key}: KS {d:.3f} > {crit:.3f}")
    for name, x in (("ours", a), ("timm", b)):  # top and left: independent uniforms over where the box fits
        rows = (x["top"] + 0.5) / (s.h - x["h"] + 1)
        cols = (x["left"] + 0.5) / (s.w - x["w"] + 1)
        r = torch.corrcoef(torch.stack([rows, cols]))[0, 1].item()
        if abs(r) > 5 / math.sqrt(len(rows)):
            bad.append(f"{name}: top and left correlated ({r:.3f})")
    return bad


@pytest.fixture(scope="module")
def timm_big():
    return _erase_run(BIG, _timm(BIG))


@pytest.fixture(scope="module")
def ours_big():
    return _erase_run(BIG, _ours(BIG))


def test_erasing_matches_timm_in_distribution(ours_big, timm_big):
    assert _differences(ours_big, timm_big, BIG) == []
    frac = ours_big["erased"].double().mean().item()
    assert abs(frac - 0.25) < 5 * math.sqrt(0.25 * 0.75 / BIG.n)  # every box fits within 10 tries here
    a = _shape(ours_big, BIG)
    assert torch.all((a["h"] < BIG.h) & (a["w"] < BIG.w))  # timm's fit rule: strictly inside the image
    area = a["area"]  # uniform in [0.02, 1/3] before h and w are rounded, which moves it a little
    assert 0.015 < area.min() < 0.03 and 0.30 < area.max() < 0.36


def test_erasing_matches_timm_on_tiny_images():
    """Where a box often fails to fit (10 tries), and rounding and the placement range change the outcome."""
    assert _differences(_erase_run(TINY, _ours(TINY)), _erase_run(TINY, _timm(TINY)), TINY) == []


def test_erased_pixels_are_standard_normal_noise(ours_big):
    v = ours_big["values"].double()  # (C, pixels): independent N(0, 1) in the normalised space
    n = v.numel()
    assert abs(v.mean().item()) < 5 / math.sqrt(n) and abs(v.std().item() - 1) < 5 * math.sqrt(0.5 / n)
    sample = v.flatten()[torch.randperm(n, generator=_gen(0))[:100_000]].sort().values
    cdf = torch.special.ndtr(sample)
    ranks = torch.arange(1, len(sample) + 1, dtype=torch.float64) / len(sample)
    assert (cdf - ranks).abs().max() < 2.3 / math.sqrt(len(sample))  # one-sample KS, alpha ~ 1e-4
    # per pixel and per channel: no correlation across channels, nor between neighbouring erased pixels
    bound = 5 / math.sqrt(v.shape[1])
    assert abs(torch.corrcoef(v[:2])[0, 1].item()) < bound
    assert abs(torch.corrcoef(torch.stack([v[0, :-1], v[0, 1:]]))[0, 1].item()) < bound


@pytest.mark.parametrize("wrong", [dict(min_area=0.05), dict(max_area=0.25), dict(min_aspect=0.5)])
def test_the_comparison_with_timm_catches_a_wrong_box(timm_big, wrong):
    assert _differences(_erase_run(BIG, _ours(BIG, **wrong)), timm_big, BIG) != []


# --- the two erasing paths, modes, memory formats, reproducibility ------------------------------------------------

@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_index_and_mask_paths_erase_the_same_boxes(mode):
    x = _images(64, 20, 24)
    kwargs = dict(hflip=0.5, reprob=0.7, mode=mode, max_count=3)
    by_index = BatchAugment(MEAN, STD, host_indexing=True, **kwargs)(x, _gen(5))
    by_mask = BatchAugment(MEAN, STD, host_indexing=False, **kwargs)(x, _gen(5))
    clean = BatchAugment(MEAN, STD, hflip=0.5, reprob=0, max_count=3)(x, _gen(5))  # the same draws, no erasing
    erased = by_index != clean
    assert erased.any() and torch.equal(erased, by_mask != clean)
    if mode == "pixel":  # noise drawn for the erased pixels only vs the whole batch: other values
        assert torch.equal(by_index[~erased], by_mask[~erased])
    else:
        assert torch.equal(by_index, by_mask)
    if mode == "const":
        assert torch.all(by_index[erased] == 0)


def test_rand_mode_fills_a_box_with_one_colour():
    x = _images(32, 20, 24)
    out = BatchAugment(MEAN, STD, hflip=0, reprob=1.0, mode="rand")(x, _gen(2))
    m = _measure_boxes(out, BatchNormalize(MEAN, STD)(x))
    i = int(m["erased"].float().argmax())
    t, l, h, w = (int(m[k][i]) for k in ("top", "left", "h", "w"))
    box = out[i, :, t:t + h, l:l + w].flatten(1)
    assert torch.equal(box, box[:, :1].expand_as(box)) and box[:, 0].unique().numel() == 3


@pytest.mark.parametrize("host_indexing", [True, False])
def test_channels_last_gives_the_same_values_in_channels_last(host_indexing):
    x = _images(32, 20, 24)
    aug = BatchAugment(MEAN, STD, hflip=0.5, reprob=0.5, host_indexing=host_indexing)
    plain = aug(x, _gen(3))
    cl = aug(x.contiguous(memory_format=CL), _gen(3))
    assert cl.is_contiguous(memory_format=CL) and cl.dtype == torch.float32
    assert torch.equal(plain, cl)


def test_reproducible_with_a_generator_and_leaves_the_global_rng_alone():
    x = _images(32, 20, 24)
    aug = BatchAugment(MEAN, STD, reprob=0.5)
    state = torch.get_rng_state()
    first = aug(x, _gen(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, aug(x, _gen(7)))
    assert not torch.equal(first, aug(x, _gen(8)))
    g = _gen(7)
    saved = g.get_state()
    a = aug(x, g)
    g.set_state(saved)  # resuming from a saved generator state repeats the draws
    assert torch.equal(a, aug(x, g))
    torch.manual_seed(4)
    b = aug(x)
    torch.manual_seed(4)
    assert torch.equal(b, aug(x))  # without a generator: the device's global RNG


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_stays_on_the_device_without_host_syncs():
    x = _images(64, 32, 32).cuda().contiguous(memory_format=CL)
    aug = BatchAugment(MEAN, STD, reprob=0.5)

    def cuda_gen(seed):
        return torch.Generator(device="cuda").manual_seed(seed)
    aug(x, cuda_gen(1))  # the first call per device copies mean/std there
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = aug(x, cuda_gen(0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device == x.device and out.dtype == torch.float32 and out.is_contiguous(memory_format=CL)
    assert torch.equal(out, aug(x, cuda_gen(0)))
    clean = BatchAugment(MEAN, STD, reprob=0)(x, cuda_gen(0))  # the same flips
    erased = (out != clean).flatten(1).any(1).float().mean().item()
    assert 0.2 < erased < 0.8
    assert torch.equal(BatchNormalize(MEAN, STD)(x).cpu(), BatchNormalize(MEAN, STD)(x.cpu()))


def test_on_a_device_the_batch_work_copies_its_parameters_once_and_never_waits():
    """On an accelerator (simulated: tests/simulated_device.py) flip, RandAugment, normalise and erase make one
    host-to-device copy for the batch's parameters and read nothing back, with the CPU path's pixels; a CPU
    generator for a device batch governs all of its draws."""
    aug = BatchAugment(MEAN, STD, rand_augment="rand-m9-mstd0.5-inc1", reprob=0.5, host_indexing=False)
    x = _images(16, 24, 24).contiguous(memory_format=CL)
    torch.manual_seed(0)
    expected = aug(x)
    with SimulatedDevice() as sim:
        batch = sim.put(x)
        aug(batch)  # the first call per device copies mean/std there
        sim.clear()
        torch.manual_seed(0)
        out = aug(batch)
        assert len(sim.copies) == 1 and sim.syncs == [], (sim.copies, sim.syncs)
        seeded = [aug(batch, _gen(seed)).inner for seed in (5, 5, 6)]
        assert len(sim.copies) == 4 and sim.syncs == [], (sim.copies, sim.syncs)
    assert torch.equal(out.inner, expected) and out.is_contiguous(memory_format=CL)
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], seeded[2])
