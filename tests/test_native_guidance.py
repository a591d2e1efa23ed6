"""Parity of the native guidance score (ggml) with the PyTorch reference.

Both accumulate in float32; the softmax over S queries and the sum over H * T terms of
values in [0, 1] differ only by float32 rounding (a few ulps per term, different summation
order): rtol 1e-5 plus atol 1e-6 * H * T covers it with a wide margin.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightkv_edge import native

pytestmark = pytest.mark.usefixtures("liblightkv")  # fails (never skips) without the library

from lightkv_edge.reference import guidance_scores, guidance_scores_from_qk

torch.set_num_threads(1)
native.set_num_threads(1)


def _case(seed, h, hk, s, d, n_vision, n_text, scale=1.0):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((h, s, d)) * scale).astype(np.float32)
    k = (rng.standard_normal((hk, s, d)) * scale).astype(np.float32)
    perm = rng.permutation(s)
    return q, k, perm[:n_vision], perm[n_vision:n_vision + n_text]


def _check(q, k, v, t, scale=None):
    nat = native.guidance_scores_from_qk(q, k, v, t, scale)
    ref = guidance_scores_from_qk(q, k, v, t, scale)
    n_vision = int(np.asarray(v).sum()) if np.asarray(v).dtype == bool else len(v)
    assert nat.dtype == np.float32 and nat.shape == (n_vision,)
    h = q.shape[0]
    n_text = int(np.asarray(t).sum()) if np.asarray(t).dtype == bool else len(t)
    np.testing.assert_allclose(nat, np.asarray(ref), rtol=1e-5, atol=1e-6 * h * max(1, n_text))
    return nat


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2 ** 31), h_kv=st.integers(1, 4), rep=st.sampled_from([1, 2, 4]),
       s=st.integers(1, 300), d=st.sampled_from([1, 4, 16, 64, 128]),
       vis_frac=st.floats(0.0, 1.0), scale=st.sampled_from([0.1, 1.0, 4.0]))
def test_guidance_parity_random(seed, h_kv, rep, s, d, vis_frac, scale):
    n_vision = int(round(vis_frac * s))
    n_text = s - n_vision
    q, k, v, t = _case(seed, h_kv * rep, h_kv, s, d, n_vision, n_text, scale)
    _check(q, k, v, t)


def test_guidance_llava_like_shape():
    # 32 heads x 128, 35 prompt tokens + 576 image tokens + 20 question tokens
    s = 35 + 576 + 20
    q, k, _, _ = _case(1, 32, 32, s, 128, 0, 0)
    v = np.arange(35, 35 + 576)
    t = np.r_[0:35, 611:s]
    g = _check(q, k, v, t)
    assert np.all(g >= 0)


def test_guidance_masks_and_explicit_scale():
    q, k, _, _ = _case(2, 4, 2, 40, 16, 0, 0)
    vis = np.zeros(40, bool)
    vis[5:30] = True
    _check(q, k, vis, ~vis, scale=0.3)


def test_guidance_matches_logits_form():
    q, k, v, t = _case(3, 2, 2, 30, 8, 20, 10)
    logits = np.einsum("hsd,htd->hst", q, k) / np.sqrt(8)
    np.testing.assert_allclose(native.guidance_scores_from_qk(q, k, v, t),
                               np.asarray(guidance_scores(logits, v, t)), rtol=1e-5, atol=1e-6)


def test_guidance_empty_selections():
    q, k, _, _ = _case(4, 2, 1, 10, 4, 0, 0)
    assert native.guidance_scores_from_qk(q, k, [], [1, 2]).shape == (0,)
    np.testing.assert_array_equal(native.guidance_scores_from_qk(q, k, [0, 1], []), [0.0, 0.0])


BAD = {
    "q 2-D": (np.ones((4, 4), np.float32), np.ones((1, 4, 4), np.float32), [0], [1]),
    "k wrong seq": (np.ones((2, 5, 4), np.float32), np.ones((2, 6, 4), np.float32), [0], [1]),
    "head_dim mismatch": (np.ones((2, 5, 4), np.float32), np.ones((2, 5, 3), np.float32), [0], [1]),
    "heads not divisible": (np.ones((3, 5, 4), np.float32), np.ones((2, 5, 4), np.float32), [0], [1]),
    "q NaN": (np.full((1, 5, 4), np.nan, np.float32), np.ones((1, 5, 4), np.float32), [0], [1]),
    "k Inf": (np.ones((1, 5, 4), np.float32), np.full((1, 5, 4), np.inf, np.float32), [0], [1]),
    "vision out of range": (np.ones((1, 5, 4), np.float32), np.ones((1, 5, 4), np.float32), [5], [1]),
    "text negative": (np.ones((1, 5, 4), np.float32), np.ones((1, 5, 4), np.float32), [0], [-1]),
    "duplicate text": (np.ones((1, 5, 4), np.float32), np.ones((1, 5, 4), np.float32), [0], [1, 1]),
    "float indices": (np.ones((1, 5, 4), np.float32), np.ones((1, 5, 4), np.float32), [0.5], [1]),
    "mask wrong length": (np.ones((1, 5, 4), np.float32), np.ones((1, 5, 4), np.float32),
                          np.ones(4, bool), [1]),
    "empty seq": (np.ones((1, 0, 4), np.float32), np.ones((1, 0, 4), np.float32), [], []),
}


@pytest.mark.parametrize("name", list(BAD))
def test_guidance_bad_input(name):
    q, k, v, t = BAD[name]
    with pytest.raises(ValueError):
        native.guidance_scores_from_qk(q, k, v, t)


def test_guidance_bad_scale():
    q, k, v, t = _case(5, 1, 1, 6, 4, 3, 3)
    with pytest.raises(ValueError):
        native.guidance_scores_from_qk(q, k, v, t, scale=float("nan"))
