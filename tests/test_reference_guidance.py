"""Guidance scores: softmax over the query axis, vision-query x text-key block."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightkv_edge.reference import guidance_scores, guidance_scores_from_qk


def test_uniform_logits():
    # all logits 0: for each key the softmax over S = 3 queries is 1/3 per query.
    # vision = {0, 1}, text = {2}: one text key -> 1/3 each, times 2 heads -> 2/3.
    out = guidance_scores(np.zeros((2, 3, 3)), [0, 1], [2])
    np.testing.assert_allclose(out, [2 / 3, 2 / 3], atol=1e-15)  # float64: one rounding


def test_hand_worked_query_axis():
    # One head. Key column 2 holds queries' logits [ln 3, 0, 0] -> softmax over the
    # queries = [3/5, 1/5, 1/5]. Key column 1 holds [0, ln 4, 0] -> [1/6, 4/6, 1/6].
    # Rows (the key axis) hold large junk that must not matter for these columns.
    lg = np.full((1, 3, 3), 0.0)
    lg[0, :, 2] = [math.log(3), 0, 0]
    lg[0, :, 1] = [0, math.log(4), 0]
    lg[0, :, 0] = [50, -50, 7]
    # vision = {0}, text = {1, 2}: 1/6 + 3/5
    np.testing.assert_allclose(guidance_scores(lg, [0], [1, 2]), [1 / 6 + 3 / 5], atol=1e-15)
    # vision = {0, 1}, text = {2}: [3/5, 1/5]; a boolean mask selects the same
    np.testing.assert_allclose(guidance_scores(lg, np.array([True, True, False]),
                                               np.array([False, False, True])),
                               [3 / 5, 1 / 5], atol=1e-15)


def test_dtypes_and_kinds():
    lg = torch.randn(2, 5, 5)
    assert guidance_scores(lg, [0, 1], [3, 4]).dtype == torch.float32
    assert guidance_scores(lg.double(), [0, 1], [3, 4]).dtype == torch.float64
    assert guidance_scores(lg.half(), [0, 1], [3, 4]).dtype == torch.float32  # f32 at least
    assert isinstance(guidance_scores(lg.numpy(), [0], [4]), np.ndarray)
    assert guidance_scores(lg, [0, 1], []).tolist() == [0.0, 0.0]  # no text: zero guidance


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(2, 12), st.integers(1, 8), st.sampled_from([1, 2]),
       st.integers(0, 2**31))
def test_from_qk_equals_full_logits(h, s, d, groups, seed):
    if h % groups:
        h = groups
    rng = np.random.default_rng(seed)
    q = torch.from_numpy(rng.normal(size=(h, s, d)))
    k = torch.from_numpy(rng.normal(size=(h // groups, s, d)))
    vision = torch.from_numpy(rng.random(s) < 0.5)
    text = ~vision
    kk = k.repeat_interleave(groups, dim=0)
    logits = q @ kk.transpose(1, 2) / math.sqrt(d)
    a = guidance_scores(logits, vision, text)
    b = guidance_scores_from_qk(q, k, vision, text)
    # float64, a handful of exp/sum roundings: 1e-12
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # explicit formula: g_i = sum_h sum_j exp(l[h,i,j]) / sum_i' exp(l[h,i',j])
    e = torch.exp(logits - logits.amax(dim=1, keepdim=True))
    ref = (e / e.sum(dim=1, keepdim=True))[:, vision][:, :, text].sum(dim=(0, 2))
    torch.testing.assert_close(a, ref, rtol=1e-12, atol=1e-12)
    c = guidance_scores_from_qk(q, k, vision, text, scale=0.3)
    torch.testing.assert_close(c, guidance_scores(q @ kk.transpose(1, 2) * 0.3, vision, text),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("args, match", [
    ((np.zeros((3, 3)), [0], [1]), "H, S, S"),
    ((np.zeros((1, 3, 4)), [0], [1]), "H, S, S"),
    ((np.full((1, 3, 3), np.nan), [0], [1]), "NaN"),
    ((np.full((1, 3, 3), -np.inf), [0], [1]), "Inf"),
    ((np.zeros((1, 3, 3)), [3], [1]), "vision"),
    ((np.zeros((1, 3, 3)), [0], [-1]), "text"),
    ((np.zeros((1, 3, 3)), [0, 0], [1]), "duplicates"),
    ((np.zeros((1, 3, 3)), np.array([True, False]), [1]), "mask"),
    ((np.zeros((1, 3, 3)), [0.5], [1]), "integer"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        guidance_scores(*args)


def test_bad_qk():
    with pytest.raises(ValueError):
        guidance_scores_from_qk(torch.zeros(3, 4, 2), torch.zeros(2, 4, 2), [0], [1])  # 3 % 2
    with pytest.raises(ValueError):
        guidance_scores_from_qk(torch.zeros(2, 4, 2), torch.zeros(2, 5, 2), [0], [1])
    with pytest.raises(ValueError):
        guidance_scores_from_qk(torch.full((1, 4, 2), float("nan")), torch.zeros(1, 4, 2), [0], [1])
