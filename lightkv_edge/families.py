"""The vision-language model families lightkv-edge covers, known by their mmproj's
`clip.projector_type`, and the chat modes each runs in.

`off` is stock libmtmd and runs whatever libmtmd runs. `embed` and `layer` reduce the
image rows libmtmd produces: they are offered only where we have checked what those rows
are (one chunk per image or sub-image, their positions and, for M-RoPE, their grid) on
a tiny checkpoint of the family (scripts/make_tiny_models.py, tests/test_families.py).
Layer mode also needs a text graph and KV memory that patches 0003-0006 cover (llama,
qwen2, qwen2vl, gemma3; one KV cache or Gemma 3's sliding-window pair), which
lightkv_edge.layer_mode checks on the text model itself.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import InputError

# projector type -> (family, modes)
FAMILIES = {
    "mlp": ("LLaVA-1.5 / LLaVA-1.6", ("off", "embed", "layer")),
    "idefics3": ("SmolVLM / Idefics3", ("off", "embed", "layer")),
    "qwen2vl_merger": ("Qwen2-VL", ("off", "embed", "layer")),
    "qwen2.5vl_merger": ("Qwen2.5-VL", ("off", "embed", "layer")),
    "gemma3": ("Gemma 3", ("off", "embed", "layer")),
}


def check_mode(projector: str | None, mode: str, mmproj) -> None:
    """InputError (param 'mode') when `mode` is not covered for this projector."""
    if mode == "off":
        return
    if not projector:
        raise InputError(f"mode {mode} needs to know the model family, but {mmproj} has no "
                         "clip.projector_type (use mode off)", param="mode")
    if projector not in FAMILIES:
        covered = ", ".join(f"{p} ({f})" for p, (f, _) in FAMILIES.items())
        raise InputError(f"mode {mode} does not cover the projector type {projector!r} of "
                         f"{mmproj} (covered: {covered}); use mode off", param="mode")
    family, modes = FAMILIES[projector]
    if mode not in modes:
        raise InputError(f"mode {mode} does not cover {family} (its modes: "
                         f"{', '.join(modes)})", param="mode")


def row_cells(projector: str | None, n: int, class_token: bool) -> np.ndarray | None:
    """[n, 2] (row, col) of each row of an image chunk on its square patch grid, for the
    towers whose rows libmtmd does not give in raster order; None for the others (raster
    order of their grid, or of the published padded square). class_token: the mmproj has
    one (v.class_embd).

    LLaVA (`mlp` with a class token, a CLIP tower): this llama.cpp's llava graph
    (tools/mtmd/models/llava.cpp) appends the class token AFTER the patches and keeps rows
    1..n of the tower's output (rows 0..n-1 without a class token, e.g. a SigLIP tower
    behind an `mlp` projector: a raster), so the chunk's n rows are patches 1..n-1, then
    the class token; patch 0 is dropped.
    Read as a raster, every patch would sit one cell early and the windows would be cut
    one patch off. The patches get their true cells; the class token, which has none,
    takes patch 0's, the one cell no row holds (a merge window needs a cell for every row
    of the image, and both modes merge them all)."""
    side = math.isqrt(n)
    if projector != "mlp" or not class_token or n < 2 or side * side != n:
        return None
    patch = np.arange(1, n)
    cells = np.zeros((n, 2), np.int64)          # the class token (last row): cell (0, 0)
    cells[:-1, 0], cells[:-1, 1] = patch // side, patch % side
    return cells
