"""Reading the user's image files, with one-line errors for everything that can go wrong."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

# A decompression-bomb guard well above any camera (a 48 MP phone photo is 8000x6000):
# libmtmd resizes to the model's input size anyway, so nothing larger is ever useful.
MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class Image:
    """An RGB image ready for libmtmd: width x height x 3 bytes, row-major."""
    path: str
    width: int
    height: int
    rgb: bytes


def load_image(path: str | os.PathLike) -> Image:
    from PIL import Image as PILImage, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise InputError(f"image not found: {p}")
    if p.is_dir():
        raise InputError(f"image path is a directory: {p}")
    if not os.access(p, os.R_OK):
        raise InputError(f"image is not readable: {p}")
    try:
        with PILImage.open(p) as im:
            w, h = im.size  # read from the header, before any pixel is decoded
            if w * h > MAX_PIXELS:
                raise InputError(f"image too large: {p} is {w}x{h} "
                                 f"(more than {MAX_PIXELS // 1_000_000} MP)")
            if w < 1 or h < 1:
                raise InputError(f"image is empty: {p}")
            rgb = im.convert("RGB").tobytes()
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"not an image (unknown format): {p}") from None
    except PILImage.DecompressionBombError:
        raise InputError(f"image too large: {p}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot read image {p}: {e}") from None
    return Image(str(p), w, h, rgb)


def image_from_pil(im, name: str = "<image>") -> Image:
    """An in-memory PIL image (the Python API and the benchmark use this)."""
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise InputError(f"image too large: {w}x{h}")
    return Image(name, w, h, im.convert("RGB").tobytes())


def resized(im: Image, size: tuple[int, int]) -> Image:
    """`im` scaled to (width, height); the image unchanged when it already has that size."""
    if (im.width, im.height) == tuple(size):
        return im
    from PIL import Image as PILImage
    pil = PILImage.frombytes("RGB", (im.width, im.height), im.rgb)
    pil = pil.resize(tuple(size), PILImage.Resampling.BICUBIC)
    return Image(im.path, pil.width, pil.height, pil.tobytes())
