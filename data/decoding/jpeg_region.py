"""Decode only a box of a JPEG (data/decoding/jpeg_region.c, built by `make setup`), through ctypes.

    if jpeg_region.available():
        width, height = jpeg_region.size(data)                  # data: the file's bytes, a uint8 numpy array
        crop = jpeg_region.decode(data, (top, left, h, w))     # uint8 (3, h, w), equal to a full decode's crop

Without the library (no C compiler or no libjpeg headers when `make setup` ran) `available()` is False and the
loader decodes whole images with Pillow instead. Both functions raise `RegionError` with libjpeg's message for a file
libjpeg cannot read, including one whose rows up to the end of the box are truncated or corrupt: the decode stops at
the first corrupt-data warning, not after filling the rest of the claimed image (jpeg_region.c, rd_harmless).
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional

import numpy as np
import torch

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_jpeg_region.so")
_ERROR_BYTES = 200
_lib: Optional[ctypes.CDLL] = None
_loaded = False


class RegionError(ValueError):
    """libjpeg could not decode the file; the message is its own."""


def _library() -> Optional[ctypes.CDLL]:
    global _lib, _loaded
    if not _loaded:
        _loaded = True
        try:
            lib = ctypes.CDLL(LIBRARY)  # ctypes releases the GIL around each call
        except OSError:
            return None
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.rd_header.argtypes = [p, ctypes.c_ulong, p, ctypes.c_char_p, i]
        lib.rd_decode.argtypes = [p, ctypes.c_ulong, i, i, i, i, i, p, ctypes.c_long, p, ctypes.c_char_p, i]
        lib.rd_header.restype = lib.rd_decode.restype = i
        _lib = lib
    return _lib


def available() -> bool:
    return _library() is not None


def is_jpeg(data: np.ndarray) -> bool:
    """The file starts with a JPEG's start-of-image marker."""
    return len(data) > 3 and data[0] == 0xFF and data[1] == 0xD8 and data[2] == 0xFF


def size(data: np.ndarray) -> tuple[int, int]:
    """(width, height) from the JPEG's header."""
    info = np.zeros(5, np.int32)
    error = ctypes.create_string_buffer(_ERROR_BYTES)
    if _library().rd_header(data.ctypes.data, data.size, info.ctypes.data, error, _ERROR_BYTES):
        raise RegionError(_message(error))
    return int(info[0]), int(info[1])


def decode(data: np.ndarray, box: tuple[int, int, int, int], min_side: int = 0) -> torch.Tensor:
    """The box (top, left, height, width) of a JPEG as uint8 (3, h, w) RGB, a CHW view of HWC memory.

    Greyscale and CMYK files come out as RGB as PIL converts them. min_side > 0 lets the decoder work at 1/2, 1/4 or
    1/8 scale where the box stays at least min_side pixels on both sides; the box is then the scaled one, rounded.
    """
    top, left, height, width = box
    out = np.empty((height + 1) * (width + 1) * 3, np.uint8)  # the box, at any scale, fits
    info = np.zeros(10, np.int32)
    error = ctypes.create_string_buffer(_ERROR_BYTES)
    code = _library().rd_decode(data.ctypes.data, data.size, top, left, height, width, min_side, out.ctypes.data,
                                out.size, info.ctypes.data, error, _ERROR_BYTES)
    if code != 0:  # an error, or corrupt or truncated data before the box's end (the decode stopped there)
        raise RegionError(_message(error) or f"libjpeg failed ({code})")
    h, w = int(info[0]), int(info[1])
    return torch.from_numpy(out[:h * w * 3]).view(h, w, 3).permute(2, 0, 1)


def _message(error: ctypes.Array) -> str:
    return error.value.decode(errors="replace")
