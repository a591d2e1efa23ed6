"""scripts/merge_on_photos.py: its window cut is the merge's, and on real content the
adaptive (threshold) budget follows the image: a flat image keeps far fewer rows than a
busy photograph (scikit-image's bundled samples; a test dependency)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from lightkv_edge.reference.merge import window_ids

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos():
    spec = importlib.util.spec_from_file_location("merge_on_photos",
                                                  REPO / "scripts" / "merge_on_photos.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("rows, cols, w", [(8, 8, 1), (16, 16, 3), (6, 10, 4), (5, 7, 5)])
def test_window_cut_is_the_merges(photos, rows, cols, w):
    i = torch.arange(rows * cols)
    want = window_ids(torch.stack([i // cols, i % cols], 1), rows, cols, w).numpy()
    assert np.array_equal(photos.window_of(rows, cols, w), want)


def test_flat_image_keeps_fewer_rows_than_a_photo(photos):
    import skimage  # noqa: F401 - fails (not skips) when the test dependency is missing
    from PIL import Image
    from lightkv_edge import embed_mode, engine
    from lightkv_edge.engine import VisionChat

    seen = []
    real = engine.reduce_image

    def spy(embd, grid, text_ids, **kw):
        seen.append((np.array(embd, np.float32), grid))
        return real(embd, grid, text_ids, **kw)

    engine.reduce_image = spy
    try:
        with VisionChat(keep=0.5, max_tokens=1, n_threads=2) as chat:
            for name in ("flat", "astronaut"):
                chat.reset()
                chat.ask(photos.PROMPT, [Image.fromarray(photos.photo(name))])
    finally:
        engine.reduce_image = real
    (flat, grid), (busy, _) = seen
    w = embed_mode.default_windows(*grid)
    k_flat = photos.adaptive_keep(flat, grid, w, 0.95)
    k_busy = photos.adaptive_keep(busy, grid, w, 0.95)
    assert 1 <= k_flat < k_busy <= len(busy)
    assert k_flat <= 0.1 * len(flat) and k_busy >= 0.3 * len(busy)
    # nothing merges above a cosine of 1: the adaptive budget keeps every row
    assert photos.adaptive_keep(busy, grid, w, 1.01) == len(busy)
