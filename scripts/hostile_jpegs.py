"""Hostile and odd JPEGs against the loader's decodes: what each costs to decode or to refuse.

    python scripts/hostile_jpegs.py                        # every kind x train/eval decode x libjpeg/Pillow
    python scripts/hostile_jpegs.py --skip claim_65500     # leave kinds out (a decoder without a pixel limit
                                                           # allocates 13 GB for that one)
    PYTHONPATH=<other checkout> python scripts/hostile_jpegs.py    # another checkout's decoders, the same files

The files are generated: headers claiming up to 65500 x 65500 pixels (over and just under Pillow's limit, whole or
cut), truncations, bit flips and scrambled markers, beside an intact photo. Each decode runs in a child forked for
it, on one thread as a loader worker runs, after one decode of the intact photo; the child reports the outcome, the
seconds and its peak resident memory over that start (getrusage's ru_maxrss, which counts what C allocates).
Only the decoders' defaults are used, so that any version of data.decoding.jpeg can be measured. Linux only.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import resource
import time
from typing import Callable

import numpy as np
from PIL import Image

from testbed import jpeg_bytes, testbed_image

PILLOWS_LIMIT = 178_956_970  # twice Image.MAX_IMAGE_PIXELS: where Pillow refuses an image
UNDER_LIMIT_SIDE = math.isqrt(PILLOWS_LIMIT)  # 13377: the largest square a header may claim under the limit
SOF_MARKERS = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive frame headers
SOS_MARKER = 0xDA


def segments(data: bytes) -> list[tuple[int, int]]:
    """(offset, marker) of each marker segment after the start-of-image marker, up to and with the first
    start-of-scan; the scan's entropy-coded data follows the last one's segment."""
    found, at = [], 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        found.append((at, marker))
        if marker == SOS_MARKER:
            break
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
    return found


def scan_start(data: bytes) -> int:
    """Offset of the first scan's entropy-coded data."""
    at, _ = segments(data)[-1]
    return at + 2 + int.from_bytes(data[at + 2:at + 4], "big")


def claiming(data: bytes, width: int, height: int) -> bytes:
    """`data` with its frame header claiming width x height pixels: a corrupt header, or a decompression bomb."""
    at = next(offset for offset, marker in segments(data) if marker in SOF_MARKERS) + 5  # length, precision
    out = bytearray(data)
    out[at:at + 4] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(out)


def flip_bits(data: bytes, count: int, start: int, seed: int) -> bytes:
    """`data` with `count` random bits flipped at or after `start`."""
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    for at, bit in zip(rng.integers(start, len(data) - 2, count), rng.integers(0, 8, count)):
        out[at] ^= 1 << int(bit)
    return bytes(out)


def renamed_markers(data: bytes, seed: int) -> bytes:
    """`data` with two of its header segments' markers replaced by random marker codes."""
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    for at, _ in rng.choice(segments(data), 2, replace=False):
        out[at + 1] = int(rng.integers(0xC0, 0xFF))
    return bytes(out)


def shuffled_markers(data: bytes, seed: int) -> bytes:
    """`data` with its header segments, start-of-scan among them, in a random order before the scan's data."""
    bounds = [at for at, _ in segments(data)] + [scan_start(data)]
    parts = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    order = np.random.default_rng(seed).permutation(len(parts))
    return data[:2] + b"".join(parts[i] for i in order) + data[bounds[-1]:]


def encoded(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def hostile_jpegs() -> dict[str, bytes]:
    """Kind -> file bytes: an intact photo, then the hostile and odd files made from it or from noise, whose claims
    are refused from the header where the file is too small to hold them, or else run into the scan's early end."""
    photo = jpeg_bytes(testbed_image(0, 0))
    tiny = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    small, progressive = encoded(tiny), encoded(tiny, progressive=True)
    noise = encoded(Image.fromarray(np.random.default_rng(1).integers(0, 255, (660, 660, 3), dtype=np.uint8)))
    side = UNDER_LIMIT_SIDE
    return {
        "intact": photo,
        "claim_65500": claiming(small, 65500, 65500),
        "claim_under_limit": claiming(small, side, side),
        "claim_under_limit_cut": claiming(small, side, side)[:-200],
        "claim_10000_cut": claiming(small, 10000, 10000)[:-200],
        "claim_wide_under_limit": claiming(small, 65500, PILLOWS_LIMIT // 65500),
        "progressive_claim_under_limit": claiming(progressive, side, side),
        "photo_claim_6000": claiming(photo, 6000, 6000),  # bytes enough for the claim: the scan ends early
        "noise_claim_under_limit": claiming(noise, side, side),  # the same, at the limit
        "truncated_half": photo[:len(photo) // 2],
        "truncated_in_header": photo[:scan_start(photo) - 10],
        **{f"bit_flips_scan_{k}": flip_bits(photo, 20, scan_start(photo), k) for k in range(3)},
        **{f"bit_flips_anywhere_{k}": flip_bits(photo, 20, 2, k) for k in range(3)},
        **{f"markers_renamed_{k}": renamed_markers(photo, k) for k in range(3)},
        **{f"markers_shuffled_{k}": shuffled_markers(photo, k) for k in range(3)},
    }


def peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def in_child(work: Callable[[], dict]) -> dict:
    """`work()`'s result, run in a forked child on one thread; {"outcome": "killed ..."} where the child dies."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            import torch
            torch.set_num_threads(1)  # as a loader worker
            result = work()
        except BaseException as e:  # noqa: B036 - reported, not raised, in the child
            result = {"outcome": f"crashed: {type(e).__name__}: {e}"}
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    return json.loads(text) if text else {"outcome": f"killed (wait status {status})"}


def measure(decode: Callable[[bytes], object], files: dict[str, bytes], pillow: bool) -> dict[str, dict]:
    """Kind -> {outcome, seconds, peak_mb}, each file decoded in its own child after one intact decode."""
    from core.errors import DataError
    import data.decoding.jpeg_region as jpeg_region

    def one(data: bytes) -> dict:
        if pillow:  # as where the C library is not built
            jpeg_region._lib, jpeg_region._loaded = None, True
        random.seed(0)
        decode(files["intact"])
        before, start = peak_kb(), time.perf_counter()
        try:
            outcome = f"decoded {tuple(decode(data).shape)}"
        except DataError as e:
            outcome = f"refused: {str(e)[:90]}"
        return {"outcome": outcome, "seconds": round(time.perf_counter() - start, 4),
                "peak_mb": round((peak_kb() - before) / 1024, 1)}

    return {kind: in_child(lambda data=data: one(data)) for kind, data in files.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip", nargs="*", default=[], help="kinds to leave out")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    from data.decoding.jpeg import JpegEvalDecode, JpegTrainDecode
    files = {kind: data for kind, data in hostile_jpegs().items() if kind not in args.skip}
    figures = {}
    for decoder, decode in (("train", JpegTrainDecode()), ("eval", JpegEvalDecode())):
        for library in ("libjpeg", "pillow"):
            figures[f"{decoder}/{library}"] = results = measure(decode, files, library == "pillow")
            for kind, result in results.items():
                print(f"{decoder:5} {library:7} {kind:30} {result.get('seconds', float('nan')):8.3f} s "
                      f"{result.get('peak_mb', float('nan')):8.1f} MB  {result['outcome'][:70]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
