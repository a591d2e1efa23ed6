"""lightkv_merge_reduce (embed mode's whole schedule in one native call) against the same
schedule run stage by stage through native.lightkv_merge: bit for bit equal (the one call
only keeps the rows, scores and flags in the library between stages and reuses its
buffers; it adds no arithmetic), and the work one call does: two graphs per stage that
merges, and no buffer allocated once the ones the context reuses are large enough."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lightkv_edge import embed_mode, native
from lightkv_edge.embedded import embedded_model

pytestmark = pytest.mark.usefixtures("liblightkv")  # fails (never skips) without the library


def stage_by_stage(x, g, *, target, windows, grid, protect_count, protect_mode):
    """The rule of lightkv_merge_reduce (include/lightkv.h), one native.lightkv_merge per
    stage: stage ratio min((m - target) / m + 1e-9, 0.5), true 2D windows of the original
    grid, one window after a stage that merged nothing, the protected set chosen once, a
    merged row carrying the float64 sum of its members' scores. Returns (x, kept, assign,
    windows per side of each stage)."""
    n = len(x)
    if grid is None:
        rows = cols = math.isqrt(n - 1) + 1
    else:
        rows, cols = grid
    cur, sc = x, g
    prot = native.protect_top(g, protect_count) if protect_count else None
    kept, assign = np.arange(n), np.arange(n)
    w, stages = min(windows, rows, cols), []
    while len(kept) > target:
        m = len(kept)
        st = native.lightkv_merge(cur, sc, windows=w, ratio=min((m - target) / m + 1e-9, 0.5),
                                  grid=(rows, cols), positions=np.stack([kept // cols, kept % cols], 1),
                                  protected=prot, protect_mode=protect_mode)
        if len(st.kept) == m:
            if w == 1:
                break
            w = 1
            continue
        assign = st.assign[assign]
        sc = np.bincount(st.assign, weights=sc.astype(np.float64), minlength=len(st.kept)).astype(np.float32)
        if prot is not None:
            prot = prot[st.kept]
        kept, cur = kept[st.kept], st.x
        stages.append(w)
    return cur, kept, assign, stages


def test_merge_reduce_equals_the_stage_loop_bit_for_bit():
    rng = np.random.default_rng(15)
    checked = 0
    for case in range(60):
        grid = ((8, 8), (6, 10), (16, 16), (5, 7), None)[case % 5]
        n = 50 if grid is None else grid[0] * grid[1]
        d = (128, 24, 7)[case % 3]
        x = rng.standard_normal((n, d)).astype(np.float32)
        if case % 4 == 0:
            x[rng.integers(0, n, n // 4)] = x[1]          # equal rows: the tie rules decide
        g = (rng.random(n) * 4).astype(np.float32)
        if case % 6 == 0:
            g[rng.integers(0, n, n // 3)] = 0.0           # all-zero groups: equal weights
        keep = (0.55, 0.25, 0.75, 0.1)[case % 4]
        target = max(1, math.ceil(keep * n))
        windows = 1 + case % 3
        for protect, mode in ((1.0, "receive"), (0.0, "receive"), (0.5, "keep")):
            p = embed_mode.protected_count(protect, target, mode)
            one = native.merge_reduce(x, g, target=target, windows=windows, grid=grid,
                                      protect_count=p, protect_mode=mode)
            x_s, kept_s, assign_s, stages_s = stage_by_stage(
                x, g, target=target, windows=windows, grid=grid, protect_count=p, protect_mode=mode)
            what = (case, protect, mode)
            assert [w for w, _ in one.stages] == stages_s, what
            assert np.array_equal(one.kept, kept_s) and np.array_equal(one.assign, assign_s), what
            # bit for bit: the same float32 operations in the same order
            assert one.x.tobytes() == np.ascontiguousarray(x_s).tobytes(), what
            checked += 1
    assert checked == 60 * 3


def test_merge_reduce_work_per_call():
    """The default method on the embedded model's 8x8 image at keep 0.55: several stages, two
    graphs each (similarity, then aggregation), each allocated once; inputs (and, on a CPU
    context, the graphs) go to buffers the context reuses (before: three new input buffers
    per stage)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 128)).astype(np.float32)
    g = (rng.random(64) * 4).astype(np.float32)
    target = math.ceil(0.55 * 64)
    runs = [native.merge_reduce(x, g, target=target, windows=1, grid=(8, 8), protect_count=target)
            for _ in range(2)]
    for r in runs:
        assert len(r.stages) >= 2, r.stages          # protection makes it progressive
        assert r.work["graphs"] == 2 * len(r.stages), r
        assert r.work["graph_allocs"] == r.work["graphs"], r
        assert r.work["buffers"] <= 5                 # the five reused buffers, at most
    assert runs[1].work["buffers"] == 0               # the same sizes again: none
    # the published merge (no protection): one stage, two graphs
    r = native.merge_reduce(x, g, target=target, windows=1, grid=(8, 8), protect_count=0)
    assert len(r.stages) == 1 and r.work["graphs"] == 2 and r.work["graph_allocs"] == 2


def test_guidance_then_merge_reuse_the_context_buffers():
    """Embed mode's image: the guidance model's inputs and the merge's share the buffers the
    context reuses, so a second image of the same shape allocates no buffer."""
    layer = native.GuidanceModel(embedded_model()[0])
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, layer.n_embd_inp)).astype(np.float32)
    tokens = np.arange(5, 25, dtype=np.int32)
    target = math.ceil(0.55 * 64)
    for i in range(2):
        g = layer.scores(x, tokens)
        r = native.merge_reduce(x, g, target=target, windows=1, grid=(8, 8), protect_count=target)
    assert r.work["buffers"] == 0 and r.work["graphs"] == 2 * len(r.stages)
