"""A merge plan keeps what does not change between runs (window indices, padding mask, tie
ramp, x's buffer, the similarity graph's allocation) and lightkv_merge caches plans by their
parameters: repeated runs give exactly a fresh plan's result, and the counters show that a
second run allocated nothing and uploaded none of the plan's constants again."""
from __future__ import annotations

import numpy as np
import pytest

from lightkv_edge import native

CASES = [  # (n, d, windows, ratio, grid, threshold)
    (576, 64, 4, 0.5, (24, 24), None),
    (64, 16, 1, 0.45, (8, 8), None),
    (60, 8, 2, 0.3, (6, 10), 0.2),
    (50, 8, 2, 0.5, None, None),
]


def _assert_same(a, b):
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.kept, b.kept)
    np.testing.assert_array_equal(a.assign, b.assign)
    np.testing.assert_array_equal(a.weight, b.weight)


@pytest.mark.parametrize("n, d, windows, ratio, grid, threshold", CASES)
def test_repeated_runs_equal_a_fresh_plan(n, d, windows, ratio, grid, threshold):
    rng = np.random.default_rng(n + d)
    plan = native.MergePlan(n, d, windows=windows, ratio=ratio, grid=grid, threshold=threshold,
                            backend="cpu")
    assert plan.stats() == {"runs": 0, "const_uploads": 0, "allocs": 0}
    for run in range(4):
        x = rng.standard_normal((n, d)).astype(np.float32)
        g = rng.random(n).astype(np.float32)
        got = plan(x, g)
        fresh = native.MergePlan(n, d, windows=windows, ratio=ratio, grid=grid,
                                 threshold=threshold, backend="cpu")(x, g)
        _assert_same(got, fresh)
        stats = plan.stats()
        assert stats["runs"] == run + 1
        # the first run uploads the 4 constant inputs and makes 3 allocations (x's buffer,
        # the constants' buffer, graph 1's allocation); later runs add nothing
        assert stats["const_uploads"] == 4 and stats["allocs"] == 3, stats
    # a run whose x needs the overflow rescaling rebuilds graph 1 only (one allocation more)
    big = (rng.standard_normal((n, d)) * 1e30).astype(np.float32)
    _assert_same(plan(big, None), native.MergePlan(n, d, windows=windows, ratio=ratio, grid=grid,
                                                  threshold=threshold, backend="cpu")(big, None))
    assert plan.stats()["const_uploads"] == 4 and plan.stats()["allocs"] == 4


def test_lightkv_merge_caches_plans_by_parameters():
    rng = np.random.default_rng(0)
    n, d = 144, 32
    backend = "CPU"   # a context of its own name, so other tests' plans do not count here
    x = rng.standard_normal((n, d)).astype(np.float32)
    g = rng.random(n).astype(np.float32)
    first = native.lightkv_merge(x, g, windows=2, ratio=0.5, grid=(12, 12), backend=backend)
    n_plans = len(native.plan_cache_stats(backend))
    again = native.lightkv_merge(x, g, windows=2, ratio=0.5, grid=(12, 12), backend=backend)
    _assert_same(first, again)
    stats = native.plan_cache_stats(backend)
    assert len(stats) == n_plans                        # the same plan served the second call
    mine = [s for s in stats if s["runs"] >= 2]
    assert mine and all(s["const_uploads"] == 4 and s["allocs"] == 3 for s in mine)
    # other parameters, other plans; the cache stays bounded
    for w in range(1, 13):
        native.lightkv_merge(x, g, windows=w, ratio=0.25, grid=(12, 12), backend=backend)
    assert len(native.plan_cache_stats(backend)) == native._PLAN_CACHE
    # positions are part of the key: the same survivors give the same plan
    keep = np.sort(rng.choice(n, 100, replace=False))
    pos = np.stack([keep // 12, keep % 12], 1)
    a = native.lightkv_merge(x[keep], g[keep], windows=2, ratio=0.4, grid=(12, 12), positions=pos,
                             backend=backend)
    b = native.lightkv_merge(x[keep], g[keep], windows=2, ratio=0.4, grid=(12, 12), positions=pos,
                             backend=backend)
    _assert_same(a, b)
    fresh = native.MergePlan(100, d, windows=2, ratio=0.4, grid=(12, 12), positions=pos, backend="cpu")
    _assert_same(a, fresh(x[keep], g[keep]))
