"""Small test images: shapes on a plain background, in two different sizes."""
from __future__ import annotations

from pathlib import Path

from PIL import Image


def two_images(d: Path, second_size: tuple[int, int]) -> tuple[Path, Path]:
    """a.png: 64x64, a red and a blue square; b.png: `second_size`, one green square."""
    a = Image.new("RGB", (64, 64), (255, 255, 255))
    a.paste((220, 30, 30), (8, 8, 30, 30))
    a.paste((30, 30, 220), (36, 36, 60, 60))
    b = Image.new("RGB", second_size, (250, 250, 250))
    b.paste((30, 200, 30), (60, 10, 90, 40))
    a.save(d / "a.png")
    b.save(d / "b.png")
    return d / "a.png", d / "b.png"
