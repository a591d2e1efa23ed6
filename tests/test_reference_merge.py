"""The one-stage LightKV merge: hand-worked values, properties, validation."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightkv_edge.reference import (MergeResult, lightkv_budget, lightkv_merge,
                                    lightkv_merge_images, window_cut)

SETTINGS = settings(max_examples=40, deadline=None)


# ------------------------------------------------------------ an independent slow model
def _cut(length, w):
    base, extra = divmod(length, w)
    sizes = [base + 1] * extra + [base] * (w - extra)
    return [p for p, s in enumerate(sizes) for _ in range(s)]


def _windows(n, w, grid):
    """Window of each token, written from the spec with plain Python."""
    if grid is None:
        side = math.ceil(math.sqrt(n))
        while side * side < n:
            side += 1
        while (side - 1) ** 2 >= n:
            side -= 1
        rows = cols = side
    else:
        rows, cols = grid
    cr, cc = _cut(rows, w), _cut(cols, w)
    return [(cr[i // cols], cc[i % cols]) for i in range(n)]


def _slow_merge(x, g, w, ratio, grid=None, threshold=None):
    """Loop-by-loop statement of the spec; returns (kept, assign, weight-per-token)."""
    n = len(x)
    win = _windows(n, w, grid)
    dst_of = list(range(n))
    for key in sorted(set(win)):
        idx = [i for i in range(n) if win[i] == key]
        r = min(math.floor(ratio * len(idx)), len(idx) // 2)
        src, dst = idx[0::2], idx[1::2]
        best = []
        for s in src:
            sims = [float(np.dot(x[s], x[d])) /
                    (math.sqrt(float(np.dot(x[s], x[s]))) * math.sqrt(float(np.dot(x[d], x[d]))) + 1e-8)
                    for d in dst]
            if not sims:
                continue
            m = max(sims)
            best.append((-m, s, dst[sims.index(m)], m))  # sort: score desc, then src asc
        for _, s, d, m in sorted(best)[:r]:
            if threshold is None or m >= threshold:
                dst_of[s] = d
    kept = [i for i in range(n) if dst_of[i] == i]
    assign = [kept.index(dst_of[i]) for i in range(n)]
    g = [1.0] * n if g is None else list(g)
    weight = [0.0] * n
    for j in range(len(kept)):
        grp = [i for i in range(n) if assign[i] == j]
        tot = sum(g[i] for i in grp)
        for i in grp:
            weight[i] = 1.0 if len(grp) == 1 else (1 / len(grp) if tot == 0 else g[i] / max(tot, 1e-8))
    return kept, assign, weight


@st.composite
def cases(draw, max_n=40):
    """Random (x, grid, windows, ratio); small-integer features make exact ties common."""
    n = draw(st.integers(1, max_n))
    if draw(st.booleans()):
        grid = None
        side = math.isqrt(n) + (math.isqrt(n) ** 2 < n)
        lim = side
    else:
        divs = [d for d in range(1, n + 1) if n % d == 0]
        rows = draw(st.sampled_from(divs))
        grid = (rows, n // rows)
        lim = min(grid)
    w = draw(st.integers(1, min(lim, 4)))
    ratio = draw(st.sampled_from([0.0, 0.1, 0.25, 0.29, 0.3, 0.5, 0.7, 0.9, 0.999]))
    d = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31))
    x = np.random.default_rng(seed).integers(-2, 3, size=(n, d)).astype(np.float64)
    return x, grid, w, ratio


# ------------------------------------------------------------ hand-worked example
# One window (grid 2x3, windows=1): sources are tokens 0, 2, 4 and destinations 1, 3, 5.
#   x0=(1,0) x1=(2,0) x2=(0,1) x3=(0,2) x4=(1,1) x5=(1,-1)
# best matches (cos = dot / (|a||b| + 1e-8)):
#   x0 -> x1: 2 / (1*2 + 1e-8)            (x3: 0, x5: 1/sqrt2)
#   x2 -> x3: 2 / (1*2 + 1e-8)            -> exactly the same score as x0 (a source tie)
#   x4 -> x1 or x3: 2 / (sqrt2*2 + 1e-8) for both (|x1| = |x3|): an exact destination
#         tie, resolved to x1 (lower index); x5 gives 0.
X6 = np.array([[1, 0], [2, 0], [0, 1], [0, 2], [1, 1], [1, -1]], dtype=np.float64)
G6 = np.array([1, 3, 2, 2, 5, 7], dtype=np.float64)


def test_hand_worked_ratio_02_source_tie_goes_to_lower_source():
    # r = min(floor(0.2 * 6), 3) = 1; x0 and x2 tie on score -> x0 (lower index) merges.
    # row of x1 = (g1 x1 + g0 x0) / (g1 + g0) = (3*(2,0) + 1*(1,0)) / 4 = (1.75, 0)
    r = lightkv_merge(X6, G6, windows=1, ratio=0.2, grid=(2, 3))
    np.testing.assert_array_equal(r.kept, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(r.assign, [0, 0, 1, 2, 3, 4])
    # tolerance: float64 arithmetic on small exact values; 1e-15 covers one rounding.
    np.testing.assert_allclose(r.x, [[1.75, 0], [0, 1], [0, 2], [1, 1], [1, -1]], atol=1e-15)


def test_hand_worked_ratio_04():
    # r = min(floor(0.4 * 6), 3) = 2: x0 and x2 merge, x4 (score ~0.707) stays.
    # row of x1 = (1.75, 0) as above; row of x3 = (2*(0,2) + 2*(0,1)) / 4 = (0, 1.5)
    r = lightkv_merge(X6, G6, windows=1, ratio=0.4, grid=(2, 3))
    assert isinstance(r, MergeResult)
    np.testing.assert_array_equal(r.kept, [1, 3, 4, 5])
    np.testing.assert_array_equal(r.assign, [0, 0, 1, 1, 2, 3])
    np.testing.assert_allclose(r.x, [[1.75, 0], [0, 1.5], [1, 1], [1, -1]], atol=1e-15)
    np.testing.assert_allclose(r.weight, [0.25, 0.75, 0.5, 0.5, 1, 1], atol=1e-15)


def test_hand_worked_ratio_05_tie_goes_to_lower_destination():
    # r = 3: x4 merges too, into x1 (exact tie with x3, lower index wins).
    # row of x1 = (1*(1,0) + 3*(2,0) + 5*(1,1)) / 9 = (12/9, 5/9); row of x3 = (0, 1.5)
    r = lightkv_merge(X6, G6, windows=1, ratio=0.5, grid=(2, 3))
    np.testing.assert_array_equal(r.kept, [1, 3, 5])
    np.testing.assert_array_equal(r.assign, [0, 0, 1, 1, 0, 2])
    np.testing.assert_allclose(r.x, [[12 / 9, 5 / 9], [0, 1.5], [1, -1]], atol=1e-15)


def test_hand_worked_threshold():
    # ratio 0.5 picks x0, x2, x4, but x4's score 1/sqrt2 ~ 0.707 < 0.8: it stays, so the
    # result equals the ratio-0.4 case.
    a = lightkv_merge(X6, G6, windows=1, ratio=0.5, grid=(2, 3), threshold=0.8)
    b = lightkv_merge(X6, G6, windows=1, ratio=0.4, grid=(2, 3))
    np.testing.assert_array_equal(a.kept, b.kept)
    np.testing.assert_array_equal(a.x, b.x)
    # a threshold above every cosine merges nothing; one below -1 changes nothing
    c = lightkv_merge(X6, G6, windows=1, ratio=0.5, grid=(2, 3), threshold=1.0)
    np.testing.assert_array_equal(c.x, X6)
    d = lightkv_merge(X6, G6, windows=1, ratio=0.5, grid=(2, 3), threshold=-2)
    np.testing.assert_array_equal(d.x, lightkv_merge(X6, G6, windows=1, ratio=0.5, grid=(2, 3)).x)


def test_square_padding_n10():
    # N = 10 -> S = 4; token i at (i // 4, i % 4). With W = 2 the 4x4 square is cut into
    # 2x2 blocks: {0,1,4,5}, {2,3,6,7}, {8,9}, {} (the last block is all padding).
    # ratio 0.5: r = 2, 2, 1 -> kept 2 + 2 + 1 = 5: destinations 1, 5 | 3, 7 | 9.
    x = np.random.default_rng(0).normal(size=(10, 3))
    r = lightkv_merge(x, None, windows=2, ratio=0.5)
    np.testing.assert_array_equal(r.kept, [1, 3, 5, 7, 9])
    groups = [sorted(np.nonzero(r.assign == j)[0].tolist()) for j in range(5)]
    flat = sorted(i for grp in groups for i in grp)
    assert flat == list(range(10))
    blocks = [{0, 1, 4, 5}, {2, 3, 6, 7}, {8, 9}]
    for grp in groups:
        assert any(set(grp) <= b for b in blocks)
    assert lightkv_budget(10, windows=2, ratio=0.5) == 5
    # the true grid (2, 5) cuts cols as 3 + 2: {0,1,2} {3,4} {5,6,7} {8,9} -> r = 1 each
    assert lightkv_budget(10, windows=2, ratio=0.5, grid=(2, 5)) == 6
    assert lightkv_budget(10, windows=4, ratio=0.5) == 10     # 1x1 windows: r = 0
    with pytest.raises(ValueError):
        lightkv_budget(10, windows=5, ratio=0.5)               # W > S = 4


def test_window_cut_first_parts_larger():
    assert window_cut(10, 4).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert window_cut(7, 7).tolist() == list(range(7))


def test_floor_is_the_plain_double_product():
    # 0.29 * 100 == 28.999999999999996 in double precision -> floor 28, not 29.
    # The native code must compute floor(ratio * n) in double exactly like this.
    assert math.floor(0.29 * 100) == 28
    assert lightkv_budget(100, windows=1, ratio=0.29, grid=(10, 10)) == 100 - 28
    assert lightkv_budget(10, windows=1, ratio=0.3, grid=(2, 5)) == 10 - 3


def test_ties_are_deterministic():
    # all tokens identical: every source ties for every destination and every score ties.
    # r = floor(0.25 * 8) = 2 -> sources 0 and 2 merge, both into destination 1.
    x = np.ones((8, 3), dtype=np.float32)
    r = lightkv_merge(x, None, windows=1, ratio=0.25, grid=(1, 8))
    np.testing.assert_array_equal(r.kept, [1, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(r.assign, [0, 0, 0, 1, 2, 3, 4, 5])
    for _ in range(3):
        again = lightkv_merge(x, None, windows=1, ratio=0.25, grid=(1, 8))
        np.testing.assert_array_equal(again.assign, r.assign)


def test_all_zero_scores_fall_back_to_equal_weights():
    x = np.random.default_rng(1).normal(size=(16, 4))
    z = lightkv_merge(x, np.zeros(16), windows=2, ratio=0.5)
    u = lightkv_merge(x, None, windows=2, ratio=0.5)
    assert np.abs(z.x).sum(1).min() > 0
    np.testing.assert_allclose(z.x, u.x, rtol=1e-12, atol=1e-12)  # float64, few roundings


def test_numpy_and_torch_kinds_and_dtypes():
    x = np.random.default_rng(2).normal(size=(12, 5)).astype(np.float32)
    a = lightkv_merge(x, None, windows=2, ratio=0.5, grid=(3, 4))
    assert isinstance(a.x, np.ndarray) and a.x.dtype == np.float32
    assert a.kept.dtype == np.int64 and a.assign.dtype == np.int64
    b = lightkv_merge(torch.from_numpy(x).double(), torch.ones(12), windows=2, ratio=0.5,
                      grid=(3, 4))
    assert isinstance(b.x, torch.Tensor) and b.x.dtype == torch.float64
    assert b.kept.dtype == torch.int64
    np.testing.assert_array_equal(a.kept, b.kept.numpy())
    # float32 output is the float64 result rounded once: 1e-6 relative covers it
    np.testing.assert_allclose(a.x, b.x.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_matches_cpu():  # pragma: no cover - only where a GPU exists
    x = torch.randn(64, 8, dtype=torch.float32)
    g = torch.rand(64)
    a = lightkv_merge(x, g, windows=2, ratio=0.5)
    b = lightkv_merge(x.cuda(), g.cuda(), windows=2, ratio=0.5)
    assert b.x.device.type == "cuda"
    torch.testing.assert_close(b.x.cpu(), a.x)
    assert torch.equal(b.kept.cpu(), a.kept)


# ------------------------------------------------------------ properties
@SETTINGS
@given(cases(), st.booleans(), st.sampled_from([None, 0.0, 0.5, 0.9]))
def test_matches_slow_spec(case, guided, threshold):
    x, grid, w, ratio = case
    g = np.random.default_rng(len(x)).integers(0, 4, size=len(x)).astype(np.float64) if guided else None
    r = lightkv_merge(x, g, windows=w, ratio=ratio, grid=grid, threshold=threshold)
    kept, assign, weight = _slow_merge(x, g, w, ratio, grid, threshold)
    assert r.kept.tolist() == kept
    assert r.assign.tolist() == assign
    # weights are a single float64 division: 1e-15 relative
    np.testing.assert_allclose(r.weight, weight, rtol=1e-15)
    expect = np.zeros((len(kept), x.shape[1]))
    np.add.at(expect, assign, np.asarray(weight)[:, None] * x)
    # the output is sum(w x) over at most n/2+1 terms of magnitude <= 2: 1e-13 absolute
    np.testing.assert_allclose(r.x, expect, atol=1e-13)


@SETTINGS
@given(cases())
def test_count_and_ratio_zero_identity(case):
    x, grid, w, ratio = case
    r = lightkv_merge(x, None, windows=w, ratio=ratio, grid=grid)
    win = _windows(len(x), w, grid)
    sizes = [win.count(k) for k in set(win)]
    expect = sum(s - min(math.floor(ratio * s), s // 2) for s in sizes)
    assert len(r.kept) == expect == lightkv_budget(len(x), windows=w, ratio=ratio, grid=grid)
    assert np.all(np.diff(r.kept) > 0)
    ident = lightkv_merge(x, None, windows=w, ratio=0.0, grid=grid)
    np.testing.assert_array_equal(ident.x, x)       # exact copies
    np.testing.assert_array_equal(ident.kept, np.arange(len(x)))


@SETTINGS
@given(cases())
def test_windows_never_mix_and_rows_sit_at_a_member(case):
    x, grid, w, ratio = case
    r = lightkv_merge(x, None, windows=w, ratio=ratio, grid=grid)
    win = _windows(len(x), w, grid)
    for j, k in enumerate(r.kept):
        members = np.nonzero(r.assign == j)[0]
        assert k in members  # a merged row sits at its destination, a group member
        assert len({win[i] for i in members}) == 1


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 30), st.integers(1, 3), st.sampled_from([0.3, 0.5, 0.9]),
       st.integers(0, 2**31), st.booleans())
def test_rows_are_convex_combinations(n, w, ratio, seed, zero_some):
    # D > N Gaussian rows are linearly independent, so each output row has unique
    # coefficients over the tokens `assign` names; solve for them and check convexity.
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n + 3))
    g = rng.uniform(0.1, 2.0, size=n)
    if zero_some:
        g[rng.random(n) < 0.5] = 0.0
    w = min(w, math.isqrt(n) + (math.isqrt(n) ** 2 < n))
    r = lightkv_merge(x, g, windows=w, ratio=ratio)
    for j in range(len(r.kept)):
        members = np.nonzero(r.assign == j)[0]
        coef, *_ = np.linalg.lstsq(x[members].T, r.x[j], rcond=None)
        # well-conditioned Gaussian system in float64: 1e-9 is loose but meaningful
        assert np.all(coef > -1e-9)
        assert abs(coef.sum() - 1) < 1e-9
        np.testing.assert_allclose(x[members].T @ coef, r.x[j], atol=1e-9)
        np.testing.assert_allclose(coef, r.weight[members], atol=1e-9)
        if len(members) > 1 and g[members].sum() > 0:
            np.testing.assert_allclose(coef, g[members] / g[members].sum(), atol=1e-9)


@SETTINGS
@given(cases(), st.floats(0.01, 100))
def test_unguided_equals_equal_scores(case, c):
    x, grid, w, ratio = case
    a = lightkv_merge(x, None, windows=w, ratio=ratio, grid=grid)
    b = lightkv_merge(x, np.full(len(x), c), windows=w, ratio=ratio, grid=grid)
    np.testing.assert_array_equal(a.kept, b.kept)
    np.testing.assert_array_equal(a.assign, b.assign)
    # c / (k c) vs 1 / k differ by at most an ulp or two: 1e-14 relative
    np.testing.assert_allclose(a.x, b.x, rtol=1e-14, atol=1e-14)


def test_several_images_in_one_sequence():
    rng = np.random.default_rng(3)
    # text(3) | image 3x4 (12) | text(2) | image 5x5 (25) | image of 10, padded | text(4)
    slices = [(3, 12, (3, 4)), (17, 25, (5, 5)), (42, 10, None)]
    n = 56
    x = rng.normal(size=(n, 6)).astype(np.float32)
    g = rng.uniform(0, 1, size=n)
    r = lightkv_merge_images(x, g, slices, windows=2, ratio=0.5)
    rows, kept = [], []
    cursor = 0
    for start, cnt, grid in slices:
        rows.append(x[cursor:start])
        kept.extend(range(cursor, start))
        one = lightkv_merge(x[start:start + cnt], g[start:start + cnt], windows=2, ratio=0.5,
                            grid=grid)
        rows.append(one.x)
        kept.extend((one.kept + start).tolist())
        cursor = start + cnt
    rows.append(x[cursor:])
    kept.extend(range(cursor, n))
    np.testing.assert_array_equal(r.kept, kept)
    np.testing.assert_array_equal(r.x, np.concatenate(rows))  # same arithmetic -> identical
    assert len(r.kept) == n - 47 + sum(lightkv_budget(c, windows=2, ratio=0.5, grid=gr)
                                       for _, c, gr in slices)
    for j in range(len(r.kept)):  # no row mixes two images (or text)
        members = np.nonzero(r.assign == j)[0]
        owner = {next((k for k, (s, c, _) in enumerate(slices) if s <= i < s + c), -1)
                 for i in members}
        assert len(owner) == 1
    with pytest.raises(ValueError, match="overlap"):
        lightkv_merge_images(x, g, [(0, 10, None), (5, 10, None)], windows=1, ratio=0.5)
    with pytest.raises(ValueError, match="past"):
        lightkv_merge_images(x, g, [(50, 10, None)], windows=1, ratio=0.5)


# ------------------------------------------------------------ validation
GOOD = np.random.default_rng(4).normal(size=(16, 3))


@pytest.mark.parametrize("kwargs, scores, x, match", [
    (dict(windows=2, ratio=1.0), None, GOOD, "ratio"),
    (dict(windows=2, ratio=-0.1), None, GOOD, "ratio"),
    (dict(windows=2, ratio=float("nan")), None, GOOD, "ratio"),
    (dict(windows=0, ratio=0.5), None, GOOD, "windows"),
    (dict(windows=1.5, ratio=0.5), None, GOOD, "windows"),
    (dict(windows=5, ratio=0.5), None, GOOD, "larger"),
    (dict(windows=3, ratio=0.5, grid=(2, 8)), None, GOOD, "larger"),
    (dict(windows=2, ratio=0.5, grid=(3, 5)), None, GOOD, "does not match"),
    (dict(windows=2, ratio=0.5, grid=(16,)), None, GOOD, "grid"),
    (dict(windows=1, ratio=0.5), None, np.zeros((0, 3)), "N == 0"),
    (dict(windows=1, ratio=0.5), None, np.zeros(16), "2-D"),
    (dict(windows=1, ratio=0.5), None, np.zeros((4, 4), dtype=np.int64), "float"),
    (dict(windows=1, ratio=0.5), np.ones(15), GOOD, "shape"),
    (dict(windows=1, ratio=0.5), -np.ones(16), GOOD, ">= 0"),
    (dict(windows=1, ratio=0.5), np.full(16, np.nan), GOOD, "NaN"),
    (dict(windows=1, ratio=0.5), np.full(16, np.inf), GOOD, "NaN or Inf"),
    (dict(windows=1, ratio=0.5), None, np.where(np.eye(16, 3) > 0, np.nan, GOOD), "NaN"),
    (dict(windows=1, ratio=0.5), None, np.where(np.eye(16, 3) > 0, np.inf, GOOD), "Inf"),
    (dict(windows=1, ratio=0.5, threshold=float("nan")), None, GOOD, "threshold"),
])
def test_bad_arguments_raise(kwargs, scores, x, match):
    with pytest.raises(ValueError, match=match) as e:
        lightkv_merge(x, scores, **kwargs)
    assert "\n" not in str(e.value)


def test_budget_validation():
    for kw in (dict(windows=0, ratio=0.5), dict(windows=1, ratio=1.0),
               dict(windows=1, ratio=0.5, grid=(3, 3))):
        with pytest.raises(ValueError):
            lightkv_budget(10, **kw)
    with pytest.raises(ValueError):
        lightkv_budget(0, windows=1, ratio=0.5)
