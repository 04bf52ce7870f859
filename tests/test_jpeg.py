"""data/decoding/jpeg.py: the worker-side decode + random-resized crop, held against timm's transforms."""
import io
import math
import random
import time

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms.functional import pil_to_tensor

from core.config import Config, DataCfg
from data.sources import DataError
from data.sources.folder import FileImages
from data.decoding import jpeg_region
from data.decoding.jpeg import JpegEvalDecode, JpegTrainDecode, decode, read_source, sample_crop
from data.loaders.recipes import imagenet_decode
from hostile_jpegs import claiming, hostile_jpegs, in_child, peak_kb
from testbed import jpeg_bytes, make_jpeg_testbed

@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> list[str]:
    return make_jpeg_testbed(str(tmp_path_factory.mktemp("bed")), num_images=10, num_classes=2, seed=3)


@pytest.fixture(scope="module")
def timm_crop():
    """timm's random-resized crop of the imagenet recipe."""
    return create_transform(224, is_training=True, interpolation="bicubic").transforms[0]


def _seed(value: int) -> None:
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.int() - b.int()).abs().float().mean().item()


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (1000, 90), (224, 224)])
def test_crop_box_is_timms_for_the_same_seed(size):
    image = Image.new("L", size)
    for seed in range(200):
        random.seed(seed)
        expected = RandomResizedCropAndInterpolation.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
        random.seed(seed)
        assert sample_crop(*size) == expected


def test_crop_scale_and_ratio_distribution_matches_timms():
    """Two-sample Kolmogorov-Smirnov statistics of area fraction and log aspect ratio, independent draws."""
    image = Image.new("L", (500, 375))
    random.seed(0)
    ours = np.array([sample_crop(500, 375) for _ in range(3000)])
    random.seed(1)
    theirs = np.array([RandomResizedCropAndInterpolation.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
                       for _ in range(3000)])

    def ks(a: np.ndarray, b: np.ndarray) -> float:
        grid = np.sort(np.concatenate([a, b]))
        cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)
        return float(np.abs(cdf(a) - cdf(b)).max())

    for stat in (lambda c: c[:, 2] * c[:, 3] / (500 * 375), lambda c: np.log(c[:, 3] / c[:, 2])):
        assert ks(stat(ours), stat(theirs)) < 1.63 / math.sqrt(1500)  # the 1% critical value


def test_train_output_is_uint8_224_from_path_or_bytes(paths):
    train = JpegTrainDecode()
    for path in paths[:4]:
        for source in (path, open(path, "rb").read()):
            image = train(source)
            assert image.dtype == torch.uint8 and image.shape == (3, 224, 224)


def test_train_matches_timm_for_the_same_seeds(paths, timm_crop):
    ours = JpegTrainDecode()
    for k, path in enumerate(paths):
        _seed(k)
        expected = pil_to_tensor(timm_crop(Image.open(path).convert("RGB")))
        _seed(k)
        got = ours(path)
        diff = (got.int() - expected.int()).abs()
        assert diff.float().mean() < 0.5 and (diff > 1).float().mean() < 0.02  # torch's and PIL's resize rounding


@pytest.mark.parametrize("crop_mode, crop_pct, size", [("center", 0.875, 224), ("squash", 1.0, 384),
                                                      ("squash", 0.95, 160), ("border", 1.0, 224),
                                                      ("border", 0.9, 200)])
def test_eval_matches_timms_eval_transform(paths, crop_mode, crop_pct, size):
    """Each crop mode as timm's eval transform up to its ToTensor, on landscape, portrait and square test images."""
    timm_view = create_transform(size, is_training=False, interpolation="bicubic", crop_pct=crop_pct,
                                 crop_mode=crop_mode).transforms[:2]
    ours = JpegEvalDecode(size, crop_pct, "bicubic", crop_mode)
    squares = [pil_to_tensor(Image.open(paths[0]).convert("RGB").resize((300, 300)))]
    for source in [*paths, *squares]:
        image = Image.open(source).convert("RGB") if isinstance(source, str) else Image.fromarray(
            source.permute(1, 2, 0).numpy())
        expected = pil_to_tensor(timm_view[1](timm_view[0](image)))
        got = ours(source)
        assert got.shape == (3, size, size) and got.dtype == torch.uint8
        assert _mean_abs(got, expected) < 0.05 and (got.int() - expected.int()).abs().max() <= 3


@pytest.mark.parametrize("mode, fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("RGB", "BMP")])
def test_other_modes_and_formats_decode_to_rgb_as_pil_does(paths, mode, fmt):
    image = Image.open(paths[1]).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    data = buffer.getvalue()
    expected = pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))
    got = decode(*read_source(data))
    assert got.shape == expected.shape and torch.equal(got, expected)


def test_unreadable_files_raise_an_error_naming_the_file(tmp_path, paths):
    garbage = tmp_path / "garbage.JPEG"
    garbage.write_bytes(b"this is no image" * 100)
    truncated = tmp_path / "truncated.JPEG"
    truncated.write_bytes(open(paths[0], "rb").read()[:20000])
    cases = [(garbage, "format"), (truncated, "Premature end"), (tmp_path / "missing.JPEG", "No such file")]
    for path, reason in cases:
        for transform in (JpegTrainDecode(), JpegEvalDecode()):
            with pytest.raises(DataError, match=reason) as caught:
                transform(str(path))
            assert str(path) in str(caught.value)


def test_bytes_in_memory_are_named_as_such():
    with pytest.raises(DataError, match="<bytes>"):
        JpegTrainDecode()(jpeg_bytes(Image.new("RGB", (64, 64)))[:300])


# --- decoding only the crop ----------------------------------------------------------------------------------

def _variants(path: str) -> dict[str, bytes]:
    """The same picture as baseline 4:2:0, progressive, 4:4:4, greyscale and CMYK JPEGs."""
    image = Image.open(path).convert("RGB")
    out = {}
    for name, mode, options in [("baseline", "RGB", {}), ("progressive", "RGB", {"progressive": True}),
                                ("444", "RGB", {"subsampling": 0}), ("grey", "L", {}), ("cmyk", "CMYK", {})]:
        buffer = io.BytesIO()
        image.convert(mode).save(buffer, format="JPEG", quality=90, **options)
        out[name] = buffer.getvalue()
    return out


needs_region = pytest.mark.skipif(not jpeg_region.available(),
                                  reason="data/decoding/_jpeg_region.so not built (make setup)")


@needs_region
def test_region_decode_equals_the_whole_decodes_crop(paths):
    """Random-resized crop boxes, edges and corners included, in every JPEG flavour: the same pixels exactly."""
    random.seed(0)
    for name, data in _variants(paths[2]).items():
        data = np.frombuffer(data, np.uint8)
        whole = decode(data, name)
        height, width = whole.shape[1:]
        boxes = [sample_crop(width, height) for _ in range(30)]
        boxes += [(0, 0, height, width), (0, 0, 17, 9), (height - 9, width - 17, 9, 17), (5, 8, 16, 16)]
        for top, left, h, w in boxes:
            got = jpeg_region.decode(data, (top, left, h, w))
            assert torch.equal(got, whole[:, top:top + h, left:left + w]), (name, (top, left, h, w))
        assert whole.shape[0] == 3


@needs_region
def test_libjpeg_and_pillows_decodes_agree(paths, monkeypatch):
    """Where the library is not built the loader decodes with Pillow: the same pixels to within its IDCT's rounding."""
    for name, data in _variants(paths[3]).items():
        ours = decode(np.frombuffer(data, np.uint8), name)
        theirs = pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))
        assert ours.shape == theirs.shape and (ours.int() - theirs.int()).abs().max() <= 1, name
    monkeypatch.setattr(jpeg_region, "_lib", None)
    assert not jpeg_region.available()
    random.seed(1)
    with_pillow = JpegTrainDecode()(paths[3])
    monkeypatch.undo()
    random.seed(1)
    assert (JpegTrainDecode()(paths[3]).int() - with_pillow.int()).abs().max() <= 1


@needs_region
def test_a_truncated_jpeg_fails_even_where_the_crop_ends_before_the_cut(paths):
    """The crop's rows decode without reaching the cut, so a file without its end marker is decoded whole."""
    data = open(paths[0], "rb").read()
    cut = np.frombuffer(data[:len(data) // 2], np.uint8)
    assert torch.equal(jpeg_region.decode(cut, (0, 0, 16, 16)), decode(np.frombuffer(data, np.uint8), "x")[:, :16, :16])
    with pytest.raises(DataError, match="Premature end"):
        decode(cut, "cut.JPEG", (0, 0, 16, 16))


@needs_region
def test_reduced_scale_decode_keeps_the_crop_at_least_min_side(paths):
    """At 1/2, 1/4 or 1/8 scale the decoder's output is Pillow's draft mode's (the same libjpeg scaled IDCT)."""
    encoded = _variants(paths[2])["baseline"]
    data = np.frombuffer(encoded, np.uint8)
    width, height = jpeg_region.size(data)
    for side in (32, 64, 100, 1000):
        got = jpeg_region.decode(data, (0, 0, height, width), min_side=side)
        h, w = got.shape[1:]
        assert (min(h, w) >= side and min(h, w) < 2 * side + 8) or (h, w) == (height, width), (side, h, w)
        k = next(k for k in (8, 4, 2, 1) if -(-width // k) == w)  # the scale libjpeg used
        with Image.open(io.BytesIO(encoded)) as image:
            image.draft("RGB", (width // k, height // k))
            expected = pil_to_tensor(image.convert("RGB"))
        assert expected.shape == got.shape and (got.int() - expected.int()).abs().max() <= 1


@pytest.mark.parametrize("decoder", ["region", "pillow"])
def test_a_header_claiming_too_many_pixels_is_refused_before_decoding(decoder, monkeypatch):
    """Without the limit, libjpeg allocates and writes the 65500 x 65500 rows the header claims before finding the
    data gone: the train and eval decodes both refuse it from the header, on either decoder, with one DataError that
    names the key and that data.skip_corrupt can skip. max_pixels moves the limit (0: none); by default it is
    Pillow's, and Pillow's setting moves it for both decoders."""
    if decoder == "pillow":
        monkeypatch.setattr(jpeg_region, "_lib", None)
    elif not jpeg_region.available():
        pytest.skip("data/decoding/_jpeg_region.so not built (make setup)")
    tiny = jpeg_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    for decode_one in (JpegEvalDecode(), JpegTrainDecode()):
        with pytest.raises(DataError, match=r"claims 65500 x 65500 pixels, over the 178,956,970 .*max_image_pixels"):
            decode_one(claiming(tiny, 65500, 65500))
    for decode_one in (JpegEvalDecode(max_pixels=4095), JpegTrainDecode(max_pixels=4095)):
        with pytest.raises(DataError, match=r"claims 64 x 64 pixels, over the 4,095 .*skip_corrupt=true"):
            decode_one(tiny)
    assert JpegEvalDecode(max_pixels=4096)(tiny).shape == (3, 224, 224)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match=r"claims 64 x 64 pixels, over the 2,000"):
        JpegEvalDecode()(tiny)
    assert JpegEvalDecode(max_pixels=0)(tiny).shape == (3, 224, 224)  # above Pillow's own limit too


@pytest.mark.parametrize("decoder", ["region", "pillow"])
def test_hostile_jpegs_decode_or_raise_within_a_second_and_a_gigabyte(decoder):
    """Headers claiming up to 65500 x 65500 pixels, truncations, bit flips and scrambled markers, through the train
    and the eval decode, in a forked child (one thread, as a loader worker): each decodes or raises DataError within
    1 s, and the child's peak resident memory (C allocations included) grows by under 64 MB (asked: 1 GB; a decode
    running on to a claimed 13377 x 13377 would take 512 MB or more). Pillow does not report
    libjpeg's corrupt-data warnings, so a claim its file has the bytes for but whose scan ends early runs to the claimed
    size there; such files are left out of its run (scripts/hostile_jpegs.py measures them)."""
    if decoder == "region" and not jpeg_region.available():
        pytest.skip("data/decoding/_jpeg_region.so not built (make setup)")
    files = {kind: data for kind, data in hostile_jpegs().items()
             if decoder == "region" or kind not in ("photo_claim_6000", "noise_claim_under_limit")}

    def decode_all() -> dict:
        if decoder == "pillow":
            jpeg_region._lib, jpeg_region._loaded = None, True
        decodes = [JpegTrainDecode(), JpegEvalDecode()]
        for decode_one in decodes:
            decode_one(files["intact"])
        before, seconds = peak_kb(), {}
        for kind, data in files.items():
            for decode_one in decodes:
                start = time.perf_counter()
                try:
                    decode_one(data)
                except DataError:
                    pass
                seconds[kind] = max(seconds.get(kind, 0), time.perf_counter() - start)
        return {"seconds": seconds, "peak_mb": (peak_kb() - before) / 1024}

    result = in_child(decode_all)
    assert "outcome" not in result, result["outcome"]  # anything but DataError, or the child killed
    assert max(result["seconds"].values()) < 1, result["seconds"]
    assert result["peak_mb"] < 64, result


@needs_region
def test_a_corrupt_data_warning_stops_the_decode_and_a_harmless_one_does_not(paths):
    """A scan ending early at a marker is an error at once (libjpeg would fill the claimed rows); bytes skipped
    before the end marker (padding some writers leave) decode to the same pixels, as Pillow decodes them."""
    data = open(paths[4], "rb").read()
    with pytest.raises(DataError, match="premature end of data segment"):
        decode(np.frombuffer(claiming(data, 6000, 6000), np.uint8), "claim.JPEG")
    padded = np.frombuffer(data[:-2] + b"\x00" * 16 + data[-2:], np.uint8)
    expected = pil_to_tensor(Image.open(io.BytesIO(padded.tobytes())).convert("RGB"))
    assert torch.equal(decode(padded, "padded.JPEG"), decode(np.frombuffer(data, np.uint8), "x"))
    assert (decode(padded, "padded.JPEG").int() - expected.int()).abs().max() <= 1


def test_the_config_limit_reaches_the_decoders_and_hostile_files_are_skipped_and_counted(tmp_path):
    """data.max_image_pixels sets both recipe decoders' limit, its error names the file and the key; with
    data.skip_corrupt a source skips hostile files as it skips other unreadable ones, and counts them."""
    folder = tmp_path / "images"
    folder.mkdir()
    kinds = hostile_jpegs()
    names = ["intact", "claim_65500", "claim_under_limit", "truncated_half", "markers_shuffled_0"]
    for name in names:
        (folder / f"{name}.JPEG").write_bytes(kinds[name])
    cfg = Config()
    for train in (True, False):
        cfg.data.max_image_pixels = 1000
        strict = FileImages(str(folder), [f"{name}.JPEG" for name in names], [0] * len(names))
        strict = strict.with_decoder(imagenet_decode(cfg.data, cfg.aug, train))
        with pytest.raises(DataError, match=r"intact.JPEG' claims 500 x 375 pixels, over the 1,000 .*"
                                             r"data.max_image_pixels"):
            strict[0]
        cfg.data.max_image_pixels = DataCfg().max_image_pixels
        skipping = FileImages(str(folder), [f"{name}.JPEG" for name in names], [0] * len(names), skip_corrupt=True)
        skipping = skipping.with_decoder(imagenet_decode(cfg.data, cfg.aug, train))
        assert [skipping[i] is None for i in range(len(names))] == [False, True, True, True, True]
        assert skipping.skipped() == 4


def test_the_config_default_limit_is_pillows():
    assert DataCfg().max_image_pixels == 2 * Image.MAX_IMAGE_PIXELS
