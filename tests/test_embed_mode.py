"""Embed mode's pieces: the kept budget, the first layer's Q/K guidance, its value."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lightkv_edge import embed_mode
from lightkv_edge.embedded import embedded_model


@pytest.mark.parametrize("keep", [0.95, 0.75, 0.55, 0.5, 0.35, 0.25, 0.1, 0.02])
@pytest.mark.parametrize("grid", [(8, 8), (6, 10), (24, 24)])
def test_kept_count_is_ceil_keep_n(keep, grid):
    """One stage drops at most half a window; lower keeps run more stages and a last
    one-window stage, so the count is exactly ceil(keep * N)."""
    n = grid[0] * grid[1]
    x = np.random.default_rng(0).standard_normal((n, 32)).astype(np.float32)
    m = embed_mode.merge_image(x, grid, np.zeros(0, np.int32), keep=keep,
                               windows=None, layer=None)
    assert len(m.kept) == max(1, math.ceil(keep * n))
    assert np.all(np.diff(m.kept) > 0)        # ascending original indices
    assert m.embd.shape == (len(m.kept), 32)


def test_default_windows():
    assert embed_mode.default_windows(24, 24) == 4   # the paper's first stage on 576 tokens
    assert embed_mode.default_windows(8, 8) == 1
    assert embed_mode.default_windows(3, 40) == 1


@pytest.fixture(scope="module")
def layer():
    from lightkv_edge import native
    return native.GuidanceModel(embedded_model()[0])


def test_prompt_guidance(layer):
    """The first layer's guidance through the native model; no prompt tokens: unguided."""
    x = np.random.default_rng(1).standard_normal((5, layer.n_embd_inp)).astype(np.float32)
    g = embed_mode.prompt_guidance(x, np.array([10, 11, 12], np.int32), layer)
    assert g.shape == (5,) and g.dtype == np.float32 and np.all(g > 0)
    # 5 of the 8 queries are image rows: their share of 3 keys x 4 heads (each key's
    # softmax over the 8 queries sums to 1) is below the total 12
    assert 0 < g.sum() < 12
    np.testing.assert_array_equal(embed_mode.prompt_guidance(x, np.zeros(0, np.int32), layer),
                                  np.ones(5, np.float32))


def test_guidance_finds_the_asked_object(layer):
    """On held-out questions that name one object, the first-layer guidance must rank that
    object's image tokens above the others (measured AUC 0.85 on 192 questions; 0.7 is the
    floor here, while an uninformative score sits at 0.5 and the plain embedding
    similarity we tried first scored 0.26)."""
    from lightkv_edge.engine import Stats, VisionChat
    from lightkv_edge import mtmd
    from lightkv_edge.images import image_from_pil
    from lightkv_edge.tasks import shapes

    chat = VisionChat(mode="off", n_threads=2)
    aucs = []
    try:
        for s in [s for s in shapes.dataset("test", 60, seed=11) if s.target is not None]:
            chat.reset()
            text = chat.m.apply_template([("user", chat.marker + s.question)], True)
            chunks = chat._tokenize(text, [image_from_pil(s.image)])
            img = next(c for c in chat._chunks(chunks)
                       if mtmd.chunk_get_type(c) == mtmd.CHUNK_IMAGE)
            e = chat._encode(img, Stats("off", 1.0))
            mtmd.chunks_free(chunks)
            g = math.isqrt(len(e))
            om = shapes.object_map(s.objects)
            cell = om.shape[0] // g
            on_target = np.array([(om[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
                                   == s.target).any() for r in range(g) for c in range(g)])
            ids = np.asarray(chat.m.tokenize(s.question), np.int32)
            sc = embed_mode.prompt_guidance(e, ids, layer)
            pos, neg = sc[on_target], sc[~on_target]
            aucs.append((pos[:, None] > neg[None, :]).mean())
    finally:
        chat.close()
    assert len(aucs) >= 20
    assert np.mean(aucs) > 0.7, np.mean(aucs)
