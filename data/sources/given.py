"""Images named on a command line, unlabelled: files, folders (their images, recursively), glob patterns and lists
(`@FILE`: a text file of such inputs, one a line), in the order given; the source predict.py reads."""
from __future__ import annotations

import glob
import os
from functools import partial
from typing import Sequence

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from data.sources.base import DataError, first_line
from data.sources.file_list import images_under, is_image_file
from data.sources.folder import FileImages

NO_LABEL = -1  # what given images are labelled: nothing


def open_image(path: str, mode: str) -> Image.Image:
    """The image file decoded by Pillow to `mode` ('L' for 1-channel models; torchvision's loader gives RGB)."""
    with open(path, "rb") as f:
        return Image.open(f).convert(mode)


def given_images(inputs: Sequence[str], channels: int = 3) -> FileImages:
    """The image files `inputs` name, one sample per image in input order (a file given twice is two samples); the
    paths as given (a folder's images joined onto it), decoded by Pillow to `channels` (1 or 3) unless a recipe
    decodes. DataError: a path that does not exist, a file that is not an image, a pattern or list that names no
    image, or no image at all."""
    paths = [path for text in inputs for path in _expand(text)]
    if not paths:
        raise DataError(f"no images found under {', '.join(repr(t) for t in inputs)} (extensions "
                        f"{', '.join(IMG_EXTENSIONS)}); give image files, folders holding them, globs or @list.txt")
    source = FileImages("", paths, [NO_LABEL] * len(paths))
    return source if channels == 3 else source.with_decoder(partial(open_image, mode="L"))


def _expand(text: str, listed_in: str = "") -> list[str]:
    """The image files one input names; `listed_in`: the list file it came from, for messages."""
    where = f" (listed in '{listed_in}')" if listed_in else ""
    if text.startswith("@") and not listed_in:
        return _listed(text[1:])
    if os.path.isdir(text):
        return [os.path.normpath(os.path.join(text, rel)) for rel in images_under(text, text)]
    if os.path.isfile(text):
        if not is_image_file(text):
            raise DataError(f"'{text}'{where} is not an image file (extensions {', '.join(IMG_EXTENSIONS)}); give "
                            f"image files, folders, globs, or a list of them as @{text}")
        return [text]
    if glob.has_magic(text):
        matches = sorted(glob.glob(text, recursive=True))
        found = [path for match in matches for path in
                 (_expand(match, listed_in) if os.path.isdir(match) else [match] if is_image_file(match) else [])]
        if not found:
            raise DataError(f"the pattern '{text}'{where} matches no image file; check it (quote it, so that the "
                            f"shell leaves it to this program)")
        return found
    raise DataError(f"'{text}'{where} does not exist; give image files, folders holding them, globs or @list.txt")


def _listed(path: str) -> list[str]:
    """The images a list file names: one input a line (paths relative to the current folder), blank lines and lines
    starting with # left out."""
    try:
        with open(path) as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the list '{path}' ({first_line(e)}); give a text file of image paths, one a "
                        f"line") from None
    return [image for line in lines if line and not line.startswith("#") for image in _expand(line, path)]
