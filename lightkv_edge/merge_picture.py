"""The picture of one image's merge (`chat --show-merge OUT.png`, VisionChat.show_merge):
the image at its own size with, drawn over it,
- the merge groups: every token's cell tinted the colour of the kept row it ended in (the
  colours of neighbouring groups differ; a dropped token's cell is greyed out),
- the kept rows: the cell of each row's own token outlined in white,
- the windows of the first merge stage: thick black lines,
- the guidance: a dot in every cell, larger and hotter (dark red -> yellow) the more the
  prompt points at that token.
A token's cell is its patch of the grid the merge saw (rows x cols over the whole image).
"""
from __future__ import annotations

import colorsys
import os
from pathlib import Path

import numpy as np

from .errors import InputError

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}


def check_output_path(path, param: str = "show_merge") -> Path:
    """The picture's path, checked before any model runs: a known image suffix, in an
    existing, writable directory, not a directory itself. InputError (one line) if not."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise InputError(f"{param} must be a file path, got {path!r}", param=param)
    p = Path(path)
    if p.suffix.lower() not in FORMATS:
        raise InputError(f"{param} must end in one of {', '.join(FORMATS)}: {p}", param=param)
    if p.is_dir():
        raise InputError(f"{param} is a directory: {p}", param=param)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{param}: no such directory {parent}", param=param)
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise InputError(f"{param}: cannot write to {p}", param=param)
    return p


def _window_edges(length: int, w: int) -> list[int]:
    """Cell indices where the windows of an axis of `length` cells cut into `w` parts begin
    (the first length % w parts one longer: as the merge cuts them)."""
    base, extra = divmod(length, w)
    edges, c = [], 0
    for part in range(w):
        edges.append(c)
        c += base + (part < extra)
    return edges[1:]


def _group_colours(m: int) -> np.ndarray:
    """m distinct RGB colours (golden-ratio hues, so consecutive rows differ strongly)."""
    out = np.zeros((m, 3))
    for j in range(m):
        h = (j * 0.618033988749895) % 1.0
        out[j] = colorsys.hsv_to_rgb(h, 0.85, 1.0 if j % 2 else 0.8)
    return out * 255


def _heat(v: float) -> tuple[int, int, int]:
    """0 -> dark red, 1 -> yellow."""
    v = min(max(v, 0.0), 1.0)
    return (int(128 + 127 * min(1.0, 2 * v)), int(255 * max(0.0, 2 * v - 1)), 0)


def draw_merge(rgb: np.ndarray, merged) -> "PIL.Image.Image":  # noqa: F821
    """The picture (a PIL RGB image of rgb's size) of `merged` (an embed_mode.MergedImage
    with assign) over the image rgb [H, W, 3] uint8."""
    from PIL import Image as PILImage, ImageDraw

    h, w = rgb.shape[:2]
    n = merged.n_in
    assign = np.asarray(merged.assign if merged.assign is not None else np.arange(n))
    if merged.grid is not None and merged.grid[0] * merged.grid[1] >= n:
        rows, cols = merged.grid
    else:   # the published square padding
        rows = cols = int(np.ceil(np.sqrt(n)))
    # each token's cell: raster order, or the merge's own (families.row_cells: LLaVA)
    cells = getattr(merged, "cells", None)
    cell_of = (lambda i: divmod(int(i), cols)) if cells is None else \
        (lambda i: (int(cells[i][0]), int(cells[i][1])))
    ys = np.linspace(0, h, rows + 1).round().astype(int)
    xs = np.linspace(0, w, cols + 1).round().astype(int)
    colours = _group_colours(max(1, len(merged.kept)))

    tint = np.zeros((h, w, 3))
    alpha = np.zeros((h, w, 1))
    for i in range(n):
        r, c = cell_of(i)
        sl = (slice(ys[r], ys[r + 1]), slice(xs[c], xs[c + 1]))
        if assign[i] >= 0:
            tint[sl] = colours[assign[i]]
            alpha[sl] = 0.45
        else:           # dropped: greyed out
            tint[sl] = 40
            alpha[sl] = 0.7
    out = (rgb.astype(np.float64) * (1 - alpha) + tint * alpha).round().astype(np.uint8)
    pic = PILImage.fromarray(out, "RGB")
    d = ImageDraw.Draw(pic)
    cell = min(h / rows, w / cols)
    for i in np.asarray(merged.kept):
        r, c = cell_of(i)
        d.rectangle([xs[c], ys[r], xs[c + 1] - 1, ys[r + 1] - 1], outline=(255, 255, 255),
                    width=max(1, int(cell / 10)))
    if merged.windows:
        lw = max(2, int(cell / 5))
        for e in _window_edges(rows, merged.windows):
            d.line([(0, ys[e]), (w, ys[e])], fill=(0, 0, 0), width=lw)
        for e in _window_edges(cols, merged.windows):
            d.line([(xs[e], 0), (xs[e], h)], fill=(0, 0, 0), width=lw)
    if merged.scores is not None and len(merged.scores) == n:
        g = np.asarray(merged.scores, np.float64)
        g = (g - g.min()) / max(g.max() - g.min(), 1e-12)
        for i in range(n):
            r, c = cell_of(i)
            cy, cx = (ys[r] + ys[r + 1]) / 2, (xs[c] + xs[c + 1]) / 2
            rad = max(1.0, cell * (0.08 + 0.22 * g[i]))
            d.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=_heat(g[i]),
                      outline=(0, 0, 0))
    return pic


def write_merge_picture(path, rgb: np.ndarray, merged) -> Path:
    """Draw `merged` over rgb and write it to path (checked by check_output_path)."""
    p = check_output_path(path)
    pic = draw_merge(rgb, merged)
    try:
        pic.save(p, FORMATS[p.suffix.lower()])
    except OSError as e:
        raise InputError(f"show_merge: cannot write {p}: {e}", param="show_merge") from None
    return p
