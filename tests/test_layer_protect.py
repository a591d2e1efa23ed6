"""LightKV-protect as one layer-mode stage (liblightkv's lightkv_merge_run_budget, the stage
layer mode's driver runs; native.merge_to_budget) against its
spec, reference.MergeState.step(protect=...): the stage keeps exactly its budget (the
rows the published stage keeps on the same rows), the protected rows (the top round(protect * budget) by
that layer's guidance) are never merged away, and the native rows, assignment and weights
are the reference's. No LLM here: the whole-prefill parity of both methods is
tests/test_layer_mode.py's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lightkv_edge import layer_mode, native
from lightkv_edge.layer_mode import Stage
from lightkv_edge.reference import MergeState

CASES = [((8, 8), 2, 0.5), ((8, 8), 1, 0.5), ((16, 16), 4, 0.5), ((16, 16), 2, 0.3125),
         ((6, 10), 2, 0.375), ((16, 16), 4, 0.1)]


def _rows(n, d, seed):
    # no repeated rows: an exact cosine tie is decided by float32 vs float64 rounding
    # (the tie rules themselves are tests/test_native_protect.py's)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    g = rng.random(n).astype(np.float32) + 0.01
    return x, g


def _native_stage(x, g, stage, grid, gpos, first, protect):
    if not protect:                  # the driver runs the published stage itself
        return native.lightkv_merge(x, g, windows=stage.windows, ratio=stage.ratio, grid=grid,
                                    positions=None if first else gpos)
    return native.merge_to_budget(x, g, windows=stage.windows, ratio=stage.ratio, grid=grid,
                                  positions=None if first else gpos, protect=protect)


@pytest.mark.parametrize("protect", [1.0, 0.5])
@pytest.mark.parametrize("grid, windows, ratio", CASES)
def test_stage_matches_reference_and_keeps_its_budget(grid, windows, ratio, protect):
    n = grid[0] * grid[1]
    x, g = _rows(n, 16, seed=n + windows)
    st = MergeState(n, grid)
    gpos = np.stack([np.arange(n) // grid[1], np.arange(n) % grid[1]], 1)
    # two stages: the first on the whole grid, the second on its survivors (true 2D
    # windows of the original grid at their original positions)
    for k, (w, r) in enumerate([(windows, ratio), (max(1, windows // 2), ratio)]):
        m = len(x)
        ref = st.step(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(g.astype(
            np.float64)), windows=w, ratio=r, protect=protect)
        got = _native_stage(x, g, Stage(k, w, r), grid, gpos, k == 0, protect)
        # the budget: what the published stage keeps on the same rows
        pub = native.lightkv_merge(x, g, windows=w, ratio=r, grid=grid,
                                   positions=None if k == 0 else gpos)
        target = len(pub.kept)
        assert len(got.kept) == len(ref.kept) == target
        assert got.kept.tolist() == ref.kept.tolist()
        assert got.assign.tolist() == ref.assign.tolist()
        # float32 native arithmetic against the float64 reference, weights in [0, 1]
        # composed over at most a few sub-stages: 1e-5 absolute (a wrong group or weight
        # is off by > 1e-2)
        assert np.max(np.abs(got.weight - ref.weight.numpy())) < 1e-5
        assert np.max(np.abs(got.x - ref.x.numpy())) < 1e-4
        # the rows are the weighted sums of their groups (the compaction relies on it)
        want = np.zeros_like(got.x, dtype=np.float64)
        np.add.at(want, got.assign, got.weight[:, None].astype(np.float64) * x)
        assert np.max(np.abs(want - got.x)) < 1e-4
        # the protected rows (this stage's top guidance) are never merged away
        p = round(protect * target)
        top = np.argsort(-g, kind="stable")[:p]
        assert set(top.tolist()) <= set(got.kept.tolist())
        if protect == 1.0:     # the kept rows ARE the top-budget guidance rows
            assert sorted(top.tolist()) == got.kept.tolist()
        x, gpos = got.x, gpos[got.kept]
        g = (np.random.default_rng(k).random(len(x)) + 0.01).astype(np.float32)


def test_protection_off_is_the_published_stage_bit_for_bit():
    """protect 0 on a whole grid: the budget is the published stage's count, which its
    first step reaches at once, with the published stage's rows, groups and weights."""
    x, g = _rows(256, 16, seed=3)
    got = native.merge_to_budget(x, g, windows=4, ratio=0.5, grid=(16, 16), protect=0.0)
    pub = native.lightkv_merge(x, g, windows=4, ratio=0.5, grid=(16, 16))
    for a, b in zip((got.x, got.kept, got.assign, got.weight),
                    (pub.x, pub.kept, pub.assign, pub.weight)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("bad", [-0.1, 1.5, True, "1", None, float("nan")])
def test_bad_protect_is_refused(bad):
    with pytest.raises(ValueError, match="protect"):
        layer_mode.check_protect(bad)
    x, g = _rows(64, 8, seed=1)
    with pytest.raises(ValueError, match="protect"):    # liblightkv's own check
        native.merge_to_budget(x, g, windows=2, ratio=0.5, grid=(8, 8), protect=bad)


def test_protected_stage_needs_scores_and_no_threshold():
    x, _ = _rows(64, 8, seed=1)
    with pytest.raises(ValueError, match="needs scores"):
        native.merge_to_budget(x, None, windows=2, ratio=0.5, grid=(8, 8), protect=0.5)


def test_engine_layer_mode_takes_the_two_layer_methods_only():
    from lightkv_edge.engine import VisionChat
    from lightkv_edge.errors import InputError
    for method in ("fastv", "unguided", "lightkv-absorb"):
        with pytest.raises(InputError, match="lightkv-protect or lightkv-paper") as e:
            VisionChat(mode="layer", method=method)
        assert e.value.param == "method"
