"""Progressive schedule: parsing, composed bookkeeping, true 2D windows at later stages."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightkv_edge.reference import MergeState, Schedule, grid_layout, lightkv_merge, window_cut


def test_parse():
    s = Schedule.parse("12-18-24", "4-2-1", "0.5-0.5-0.5")
    assert s.layers == (12, 18, 24) and s.windows == (4, 2, 1) and s.ratios == (0.5,) * 3
    assert len(s) == 3 and s.stage_at(18) == 1 and s.stage_at(13) is None
    assert Schedule.parse("3-5", "2", "0.25") == Schedule((3, 5), (2, 2), (0.25, 0.25))
    assert len(Schedule.parse("", "", "")) == 0
    assert Schedule.parse("1", "1", "0.5", threshold=0.9).threshold == 0.9


@pytest.mark.parametrize("args", [
    ("12-x", "4-2", "0.5"), ("12-18", "4-2-1", "0.5"), ("18-12", "2", "0.5"),
    ("12-12", "2", "0.5"), ("12", "0", "0.5"), ("12", "2", "1.0"), ("-1", "2", "0.5"),
    ("12", "2", "nan"),
])
def test_parse_rejects(args):
    with pytest.raises(ValueError):
        Schedule.parse(*args)


def test_first_stage_equals_lightkv_merge():
    x = torch.randn(20, 6, dtype=torch.float64)
    g = torch.rand(20)
    st_ = MergeState(20, (4, 5))
    a = st_.step(x, g, windows=2, ratio=0.5)
    b = lightkv_merge(x, g, windows=2, ratio=0.5, grid=(4, 5))
    assert torch.equal(a.x, b.x) and torch.equal(a.kept, b.kept)
    assert torch.equal(st_.orig_index, b.kept)
    # padded-square state: pos is the (i // S, i % S) layout
    sq = MergeState(10)
    assert (sq.rows, sq.cols) == (4, 4) and sq.pos[9].tolist() == [2, 1]


def test_second_stage_uses_original_2d_positions():
    # 4x4 grid. Stage 1: W=2, ratio 0.5 on identical tokens (every cosine is the same
    # value, so every tie rule decides). Each 2x2 block {a, a+1, a+4, a+5} has sources
    # a, a+4 (even positions) and destinations a+1, a+5; r = 2, both sources go to a+1
    # (lower destination). Survivors: 1, 5 | 3, 7 | 9, 13 | 11, 15.
    # (Scaled copies would NOT tie: dot / (|a||b| + 1e-8) grows with the norms.)
    x = torch.ones(16, 3, dtype=torch.float64)
    s = MergeState(16, (4, 4))
    r1 = s.step(x, None, windows=2, ratio=0.5)
    assert s.orig_index.tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    assert s.pos.tolist() == [[0, 1], [0, 3], [1, 1], [1, 3], [2, 1], [2, 3], [3, 1], [3, 3]]
    # Stage 2: W=2 again on the ORIGINAL 4x4 grid: windows {1,5} {3,7} {9,13} {11,15}
    # (a re-squared 1-D sequence of 8 would instead be cut as a 3x3 square). In each
    # window of 2: source = lower original index, destination = higher; r = 1.
    r2 = s.step(r1.x, None, windows=2, ratio=0.5)
    assert s.orig_index.tolist() == [5, 7, 13, 15]
    assert r2.assign.tolist() == [0, 1, 0, 1, 2, 3, 2, 3]
    # composition: original token -> final row, with product coefficients
    # block (0,0): stage 1 row of 1 = mean of tokens {0, 1, 4}; stage 2 merges it with 5.
    assert s.assign.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    # token 0 (source into 1): 1/3 at stage 1, times 1/2 at stage 2
    assert math.isclose(float(s.weight[0]), 1 / 6, rel_tol=1e-15)
    assert math.isclose(float(s.weight[5]), 1 / 2, rel_tol=1e-15)  # 5 only merged at stage 2


@st.composite
def runs(draw):
    rows, cols = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    grid = draw(st.sampled_from([(rows, cols), None]))
    n = rows * cols
    r, c, _ = grid_layout(n, grid)
    stages = [(draw(st.integers(1, min(r, c, 4))), draw(st.sampled_from([0.0, 0.3, 0.5, 0.7])))
              for _ in range(draw(st.integers(1, 3)))]
    return n, grid, stages, draw(st.integers(0, 2**31)), draw(st.booleans())


@settings(max_examples=30, deadline=None)
@given(runs())
def test_composition_properties(run):
    n, grid, stages, seed, guided = run
    rng = np.random.default_rng(seed)
    x0 = torch.from_numpy(rng.integers(-2, 3, size=(n, 3)).astype(np.float64))
    s = MergeState(n, grid)
    layout_pos = grid_layout(n, grid)[2]
    x = x0
    for k, (w, ratio) in enumerate(stages):
        pos_in = s.pos.clone()
        g = torch.from_numpy(rng.random(s.m)) if guided else None
        r = s.step(x, g, windows=w, ratio=ratio)
        # stage-local groups never mix windows of THIS stage's cut of the original grid
        win = (window_cut(s.rows, w)[pos_in[:, 0]] * w + window_cut(s.cols, w)[pos_in[:, 1]])
        for j in range(len(r.kept)):
            assert len(set(win[r.assign == j].tolist())) == 1
        x = r.x
    # survivors: ascending original index, positions of those tokens on the original grid
    assert torch.all(s.orig_index[1:] > s.orig_index[:-1])
    assert torch.equal(s.pos, layout_pos[s.orig_index])
    # each survivor sits at a token of its own group; the composed weights reproduce the
    # final rows from the originals (the merge is linear when x is not transformed)
    assert torch.equal(s.assign[s.orig_index], torch.arange(s.m))
    # float64 sums of a few products of small values: 1e-12
    torch.testing.assert_close(s.matrix() @ x0, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.matrix().sum(1), torch.ones(s.m, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    assert s.matrix(len(stages)).equal(torch.eye(s.m, dtype=torch.float64))
    if len(stages) > 1:  # the map from stage 1's input composes with stage 0's
        a1 = s.matrix(1)
        a0 = torch.zeros(s.stages[0][0].max() + 1, n, dtype=torch.float64)
        a0[s.stages[0][0], torch.arange(n)] = s.stages[0][1]
        torch.testing.assert_close(a1 @ a0, s.matrix(), rtol=1e-12, atol=1e-12)


def test_state_validation():
    s = MergeState(9, (3, 3))
    with pytest.raises(ValueError, match="rows"):
        s.step(torch.zeros(8, 2), None, windows=1, ratio=0.5)
    with pytest.raises(ValueError):
        s.step(torch.zeros(9, 2), None, windows=4, ratio=0.5)
    with pytest.raises(ValueError):
        MergeState(9, (2, 4))
    with pytest.raises(ValueError):
        s.mapping(2)
