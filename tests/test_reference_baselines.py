"""Baselines: same result contract, same kept budget, deterministic selections."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightkv_edge.reference import (dart_prune, fastv_topk, lightkv_budget, lightkv_merge,
                                    pool2x2, pool_budget, random_drop, unguided_merge)


def _check_drop_contract(r, x, n_keep):
    assert len(r.kept) == n_keep
    assert np.all(np.diff(r.kept) > 0)
    np.testing.assert_array_equal(r.x, x[r.kept])
    np.testing.assert_array_equal(r.assign[r.kept], np.arange(n_keep))
    assert (r.assign == -1).sum() == len(x) - n_keep
    np.testing.assert_array_equal(r.weight, (r.assign >= 0).astype(x.dtype))


@settings(max_examples=20, deadline=None)
@given(st.integers(4, 60), st.integers(1, 3), st.sampled_from([0.25, 0.5, 0.75]),
       st.integers(0, 1000))
def test_budget_matched_baselines(n, w, ratio, seed):
    x = np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
    side = int(np.ceil(np.sqrt(n)))
    w = min(w, side)
    n_keep = lightkv_budget(n, windows=w, ratio=ratio)
    assert len(lightkv_merge(x, None, windows=w, ratio=ratio).kept) == n_keep
    g = np.random.default_rng(seed + 1).random(n)
    for r in (random_drop(x, n_keep=n_keep, seed=seed), fastv_topk(x, g, n_keep=n_keep),
              dart_prune(x, n_keep=n_keep)):
        _check_drop_contract(r, x, n_keep)


def test_random_drop_is_seeded():
    x = np.arange(40, dtype=np.float64).reshape(20, 2)
    a = random_drop(x, n_keep=7, seed=3)
    np.testing.assert_array_equal(a.kept, random_drop(x, n_keep=7, seed=3).kept)
    assert any(not np.array_equal(a.kept, random_drop(x, n_keep=7, seed=s).kept)
               for s in range(4, 10))
    t = random_drop(torch.from_numpy(x), n_keep=7, seed=3)   # same choice for torch input
    np.testing.assert_array_equal(t.kept.numpy(), a.kept)
    assert random_drop(x, n_keep=20, seed=0).kept.tolist() == list(range(20))


def test_unguided_merge_is_lightkv_without_scores():
    x = np.random.default_rng(0).normal(size=(30, 5))
    a = unguided_merge(x, windows=2, ratio=0.5, grid=(5, 6))
    b = lightkv_merge(x, None, windows=2, ratio=0.5, grid=(5, 6))
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.assign, b.assign)


def test_fastv_hand_worked():
    # scores [0.1, 0.5, 0.5, 0.9, 0.2]: top-3 = 3 (0.9), then the 0.5 tie 1 and 2.
    # With n_keep 2 the tie at 0.5 goes to the lower index (1).
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    g = np.array([0.1, 0.5, 0.5, 0.9, 0.2])
    assert fastv_topk(x, g, n_keep=3).kept.tolist() == [1, 2, 3]
    r = fastv_topk(x, g, n_keep=2)
    assert r.kept.tolist() == [1, 3]
    assert r.assign.tolist() == [-1, 0, -1, 1, -1]


def test_dart_hand_worked():
    # norms: x0 = 5 (largest) -> with n_pivots=1 it is the pivot. Max cosine to x0=(3,4):
    # x1=(4,-3): 0, x2=(0.6,0.8): 1, x3=(-3,-4): -1, x4=(1,0): 0.6.
    # n_keep 3: pivot + the two least duplicated (x3: -1, x1: 0) -> kept [0, 1, 3].
    x = np.array([[3, 4], [4, -3], [0.6, 0.8], [-3, -4], [1, 0]], dtype=np.float64)
    assert dart_prune(x, n_keep=3, n_pivots=1).kept.tolist() == [0, 1, 3]
    # pivots by norm with ties -> lower index: x0, x1, x3 all have norm 5 -> pivots 0, 1
    assert dart_prune(x, n_keep=2, n_pivots=2).kept.tolist() == [0, 1]
    # n_pivots > n_keep: only n_keep pivots
    assert dart_prune(x, n_keep=1, n_pivots=8).kept.tolist() == [0]


def test_pool_hand_worked():
    # 3x3 grid, cells {0,1,3,4} {2,5} {6,7} {8}: kept = top-left of each cell.
    x = np.arange(9, dtype=np.float64)[:, None] * np.array([[1.0, -2.0]])
    r = pool2x2(x, grid=(3, 3))
    assert r.kept.tolist() == [0, 2, 6, 8]
    assert r.assign.tolist() == [0, 0, 1, 0, 0, 1, 2, 2, 3]
    # means: (0+1+3+4)/4 = 2, (2+5)/2 = 3.5, (6+7)/2 = 6.5, 8 (exact in float64)
    np.testing.assert_array_equal(r.x[:, 0], [2, 3.5, 6.5, 8])
    np.testing.assert_array_equal(r.x[:, 1], [-4, -7, -13, -16])
    np.testing.assert_array_equal(r.weight, [.25, .25, .5, .25, .25, .5, .5, .5, 1])
    assert pool_budget(9, grid=(3, 3)) == 4


def test_pool_square_padding_and_torch():
    # N = 10 -> padded 4x4, tokens on rows 0..2: cells {0,1,4,5} {2,3,6,7} {8,9}
    x = torch.randn(10, 3)
    r = pool2x2(x, grid=None)
    assert r.kept.tolist() == [0, 2, 8]
    assert r.assign.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2]
    assert isinstance(r.x, torch.Tensor) and r.x.dtype == torch.float32
    # float32 mean of <= 4 values vs float64-then-rounded: within 1e-6
    torch.testing.assert_close(r.x[2], (x[8] + x[9]) / 2, rtol=1e-6, atol=1e-6)
    assert pool_budget(10) == 3


@pytest.mark.parametrize("call", [
    lambda x: random_drop(x, n_keep=0, seed=0),
    lambda x: random_drop(x, n_keep=11, seed=0),
    lambda x: random_drop(x, n_keep=3, seed=-1),
    lambda x: fastv_topk(x, None, n_keep=3),
    lambda x: fastv_topk(x, np.ones(9), n_keep=3),
    lambda x: fastv_topk(x, -np.ones(10), n_keep=3),
    lambda x: dart_prune(x, n_keep=3, n_pivots=0),
    lambda x: pool2x2(x, grid=(3, 3)),
    lambda x: unguided_merge(x, windows=2, ratio=1.0),
    lambda x: random_drop(np.full((10, 2), np.nan), n_keep=3, seed=0),
])
def test_bad_arguments(call):
    with pytest.raises(ValueError):
        call(np.ones((10, 2)))
