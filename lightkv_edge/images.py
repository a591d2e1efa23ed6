"""Reading the user's image files, with one-line errors for everything that can go wrong."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

# A decompression-bomb guard well above any camera (a 48 MP phone photo is 8000x6000):
# libmtmd resizes to the model's input size anyway, so nothing larger is ever useful.
MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class Image:
    """An RGB image ready for libmtmd: width x height x 3 bytes, row-major.
    Checked on creation: libmtmd reads exactly width * height * 3 bytes from `rgb`."""
    path: str
    width: int
    height: int
    rgb: bytes

    def __post_init__(self):
        for side in ("width", "height"):
            v = getattr(self, side)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"Image {side} must be a positive integer, got {v!r}")
        if self.width * self.height > MAX_PIXELS:
            raise InputError(f"image too large: {self.width}x{self.height} "
                             f"(more than {MAX_PIXELS // 1_000_000} MP)")
        if not isinstance(self.rgb, (bytes, bytearray)):
            raise InputError(f"Image rgb must be bytes, got {type(self.rgb).__name__}")
        need = self.width * self.height * 3
        if len(self.rgb) != need:
            raise InputError(f"Image rgb holds {len(self.rgb)} bytes, but {self.width}x"
                             f"{self.height} RGB needs {need}")
        if isinstance(self.rgb, bytearray):   # frozen: keep a copy nobody else can change
            object.__setattr__(self, "rgb", bytes(self.rgb))

    @property
    def digest(self) -> str:
        """What the pixels are, as a short hex string (the image cache's key)."""
        import hashlib
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.width}x{self.height}:".encode())
        h.update(self.rgb)
        return h.hexdigest()


def as_image(item) -> Image:
    """What the Python API accepts as an image: a file path (str, bytes, os.PathLike), an
    Image, or a PIL image."""
    if isinstance(item, Image):
        return item
    if isinstance(item, (str, bytes, os.PathLike)):
        return load_image(os.fsdecode(item))
    if hasattr(item, "convert") and hasattr(item, "size") and hasattr(item, "mode"):
        return image_from_pil(item)
    raise InputError(f"expected an image file path, a lightkv_edge.images.Image or a PIL "
                     f"image, got {type(item).__name__}")


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
        # PIL warns about huge images before we can look at their size: the check
        # below is ours, with one line instead of PIL's warning
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            im = PILImage.open(p)
        with im:
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
    try:
        rgb = im.convert("RGB").tobytes()
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read image {name}: {e}") from None
    return Image(name, w, h, rgb)


def resized(im: Image, size: tuple[int, int]) -> Image:
    """`im` scaled to (width, height); the image unchanged when it already has that size."""
    if (im.width, im.height) == tuple(size):
        return im
    from PIL import Image as PILImage
    pil = PILImage.frombytes("RGB", (im.width, im.height), im.rgb)
    pil = pil.resize(tuple(size), PILImage.Resampling.BICUBIC)
    return Image(im.path, pil.width, pil.height, pil.tobytes())
