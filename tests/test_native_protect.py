"""The native LightKV-protect merge (liblightkv's protected plan, lightkv_protect_top, and
embed mode's schedule with protection) against the PyTorch reference
(lightkv_edge/reference/variants.py): the same kept rows and merge groups exactly, the rows
to float32 accuracy; protection 0 is the published merge bit for bit; bad protection input
is a one-line ValueError, never an abort."""
from __future__ import annotations

import ctypes as C
import math

import numpy as np
import pytest
import torch

from lightkv_edge import embed_mode, native
from lightkv_edge.reference import variants as V
from lightkv_edge.reference.merge import aggregate, window_ids

pytestmark = pytest.mark.usefixtures("liblightkv")  # fails (never skips) without the library

GRIDS = ((8, 8), (6, 10), (16, 16), (5, 7))
KEEPS = (0.75, 0.55, 0.35, 0.25, 0.1)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: torch's thread pool only spins against the other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def draw(seed: int, n: int, d: int = 24, dup: bool = False):
    """Random rows and guidance; dup=True repeats scores so the protected set's tie rule
    decides. Rows stay distinct: duplicate rows make float32 near ties of the cosine that
    the float64 reference breaks differently (tests/test_native_merge.py bounds those for
    the published stage; the protection adds no arithmetic to it)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    g = rng.random(n).astype(np.float32) * 4
    if dup:
        g[2::4] = g[0::4][: len(g[2::4])]
        g[1::5][: len(g[3::5])] = g[3::5][: len(g[1::5])]
    return x, g


def close_rows(a, b):
    # the native rows are float32 mul_mat sums of <= N unit-scale terms with weights that sum
    # to 1, the reference's float64 sums rounded to float32: they differ by a few float32
    # ulps (~1e-7); 1e-5 is far above that and far below any wrong member or weight (>= 1e-2
    # on these draws)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the protected set
def test_protect_top_is_the_reference_rule_with_ties():
    checked = 0
    for seed in range(20):
        for n in (1, 7, 64, 256):
            _, g = draw(seed, n, dup=True)
            if seed % 3 == 0:
                g = np.round(g)              # many exact ties: the lower index wins
            for count in sorted({0, 1, n // 3, n // 2, n}):
                mask = native.protect_top(g, count)
                want = np.zeros(n, bool)
                want[V._top(torch.from_numpy(g).double(), count).numpy()] = True
                assert mask.dtype == bool and np.array_equal(mask, want), (seed, n, count)
                checked += 1
    assert checked >= 250, checked


# ---------------------------------------------------------------- one stage
def test_protected_stage_equals_the_reference_over_many_seeded_cases():
    """Every grid, window count, ratio, protected count and mode: kept and assign exact,
    weights and rows to float32 accuracy."""
    checked = 0
    for seed in range(1):
        for grid in GRIDS:
            n = grid[0] * grid[1]
            for dup in (False, True):
                x, g = draw(seed * 10 + n, n, dup=dup)
                for windows in sorted({1, 2, min(grid)}):
                    for ratio in (0.5, 0.29, 0.1):
                        for p in sorted({0, 1, n // 4, n // 2, n}):
                            for mode in native.PROTECT_MODES:
                                ref = V.protected_stage(x, g, windows=windows, ratio=ratio,
                                                        grid=grid, protect_count=p, mode=mode)
                                nat = native.lightkv_merge(
                                    x, g, windows=windows, ratio=ratio, grid=grid,
                                    protected=native.protect_top(g, p), protect_mode=mode)
                                case = (seed, grid, dup, windows, ratio, p, mode)
                                assert np.array_equal(nat.kept, ref.kept), case
                                assert np.array_equal(nat.assign, ref.assign), case
                                close_rows(nat.weight, ref.weight)
                                close_rows(nat.x, ref.x)
                                checked += 1
    assert checked >= 600, checked


def test_protected_stage_never_merges_a_protected_token():
    x, g = draw(3, 64)
    for mode in native.PROTECT_MODES:
        mask = native.protect_top(g, 16)
        r = native.lightkv_merge(x, g, windows=2, ratio=0.5, grid=(8, 8), protected=mask,
                                 protect_mode=mode)
        assert set(np.nonzero(mask)[0]) <= set(r.kept.tolist())
        if mode == "keep":   # no role: their rows are exact copies
            np.testing.assert_array_equal(r.x[r.assign[mask]], x[mask])


def test_protection_off_is_the_published_stage_bit_for_bit():
    """An all-False mask (and protect_count 0 in the reference) is the published merge:
    x, kept, assign and weight identical to the unprotected native call."""
    checked = 0
    for seed in range(3):
        for grid in GRIDS:
            n = grid[0] * grid[1]
            x, g = draw(seed, n, dup=seed == 2)
            for windows in sorted({1, 2, min(grid)}):
                for ratio in (0.5, 0.29):
                    for scores in (g, None):
                        for mode in native.PROTECT_MODES:
                            kw = dict(windows=windows, ratio=ratio, grid=grid)
                            a = native.lightkv_merge(x, scores, protected=np.zeros(n, bool),
                                                     protect_mode=mode, **kw)
                            b = native.lightkv_merge(x, scores, **kw)
                            for k in ("x", "kept", "assign", "weight"):
                                assert np.array_equal(getattr(a, k), getattr(b, k)), (k, seed, grid)
                            checked += 1
    assert checked == 3 * len(GRIDS) * 3 * 2 * 2 * 2, checked


def test_protected_stage_at_positions_equals_the_reference():
    """A later stage (survivors on the original grid, true 2D windows) with protection."""
    rng = np.random.default_rng(5)
    checked = 0
    for trial in range(20):
        keep_idx = np.sort(rng.choice(256, size=int(rng.integers(20, 200)), replace=False))
        x, g = draw(trial, len(keep_idx), dup=trial % 2 == 1)
        pos = np.stack([keep_idx // 16, keep_idx % 16], axis=1)
        for p in (0, 5, len(keep_idx) // 2):
            mask = native.protect_top(g, p)
            nat = native.lightkv_merge(x, g, windows=3, ratio=0.4, grid=(16, 16),
                                       positions=pos, protected=mask)
            # the reference stage on the same survivors: windows of the original grid
            win = window_ids(torch.from_numpy(pos), 16, 16, 3)
            dst_of = V.match_protected(torch.from_numpy(x).double(), win, 0.4,
                                       torch.from_numpy(mask), torch.from_numpy(g).double(),
                                       mode="receive")
            out, kept, assign, weight = aggregate(torch.from_numpy(x),
                                                  torch.from_numpy(g).double(), dst_of)
            assert np.array_equal(nat.kept, kept.numpy()) and np.array_equal(nat.assign, assign.numpy())
            close_rows(nat.x, out.numpy())
            checked += 1
    assert checked == 60


# ---------------------------------------------------------------- embed mode's schedule
class _Scores:
    """A stand-in for native.GuidanceModel: the given guidance, whatever the prompt."""

    def __init__(self, g):
        self.g = g

    def scores(self, vision, text_tokens):
        return self.g


@pytest.mark.parametrize("grid", ((8, 8), (16, 16), (6, 10)))
def test_embed_mode_protected_schedule_equals_the_reference(grid):
    """embed_mode.merge_image(protect=f) (native, every stage) against
    reference.variants.protected_reduce: the same kept rows, rows to float32 accuracy."""
    n = grid[0] * grid[1]
    checked = 0
    for keep in KEEPS:
        for seed in range(2):
            x, g = draw(seed + 100, n, dup=seed == 1)
            for protect in (0.0, 0.5, 1.0):
                for mode in native.PROTECT_MODES:
                    nat = embed_mode.merge_image(x, grid, np.arange(3), keep=keep, windows=None,
                                                 layer=_Scores(g), protect=protect,
                                                 protect_mode=mode)
                    ref = V.protected_reduce(x, g, keep=keep, grid=grid, protect=protect,
                                             mode=mode)
                    case = (keep, seed, protect, mode)
                    assert len(nat.kept) == max(1, math.ceil(keep * n)), case
                    assert np.array_equal(nat.kept, ref.kept), case
                    assert np.array_equal(nat.assign, ref.assign), case
                    # per stage float32 rounding, up to 4 stages: still far below 1e-5
                    close_rows(nat.embd, ref.x)
                    checked += 1
    assert checked == len(KEEPS) * 2 * 3 * 2


def test_merge_reduce_equals_the_reference_with_composed_weights():
    """native.merge_reduce (the whole schedule in one liblightkv call) against
    protected_reduce on grids, the square padding (N not a square) and explicit windows:
    kept and assign exact, the composed weights and rows to float32 accuracy, and the
    stages it reports end at the target with one window whenever it fell back to one."""
    checked = 0
    for n, grid in ((64, (8, 8)), (60, (6, 10)), (50, None), (256, (16, 16))):
        for keep in KEEPS:
            for windows in (1, 2, 3):
                x, g = draw(n + windows, n)
                for protect, mode in ((0.0, "receive"), (1.0, "receive"), (0.5, "keep")):
                    target = max(1, math.ceil(keep * n))
                    p = embed_mode.protected_count(protect, target, mode)
                    nat = native.merge_reduce(x, g, target=target, windows=windows, grid=grid,
                                              protect_count=p, protect_mode=mode)
                    ref = V.protected_reduce(x, g, keep=keep, grid=grid, windows=windows,
                                             protect=protect, mode=mode)
                    case = (n, keep, windows, protect, mode)
                    assert np.array_equal(nat.kept, ref.kept), case
                    assert np.array_equal(nat.assign, ref.assign), case
                    close_rows(nat.x, ref.x)
                    # a weight is a product of <= 5 stage weights, each float32-rounded
                    np.testing.assert_allclose(nat.weight, ref.weight, rtol=1e-5, atol=1e-6)
                    rows = [r for _, r in nat.stages]
                    assert rows == sorted(rows, reverse=True) and rows[-1] == len(nat.kept), case
                    assert all(w in (min(windows, *(grid or (8, 8))), 1) for w, _ in nat.stages)
                    checked += 1
    assert checked == 4 * len(KEEPS) * 3 * 3


def test_merge_reduce_of_nothing_to_merge_is_the_input():
    x, g = draw(3, 64)
    r = native.merge_reduce(x, g, target=64, windows=2, grid=(8, 8), protect_count=10)
    assert r.stages == () and np.array_equal(r.x, x) and np.array_equal(r.kept, np.arange(64))
    assert np.array_equal(r.weight, np.ones(64, np.float32))


def test_lightkv_protect_keeps_the_top_guidance_set():
    """protect=1, receive (the default method): the kept rows are the budget's top guidance."""
    x, g = draw(8, 256)
    for keep in KEEPS:
        target = math.ceil(keep * 256)
        m = embed_mode.merge_image(x, (16, 16), np.arange(3), keep=keep, windows=None,
                                   layer=_Scores(g), protect=1.0)
        assert np.array_equal(m.kept, np.sort(np.argsort(-g, kind="stable")[:target]))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, message", [
    (dict(protected=np.zeros(63, bool)), "shape"),
    (dict(protected=np.zeros(64, np.uint8)), "boolean"),
    (dict(protected=np.zeros((8, 8), bool)), "shape"),
    (dict(protected=np.zeros(64, bool), protect_mode="drop"), "protect_mode"),
])
def test_bad_protection_is_a_one_line_value_error(kw, message):
    x, g = draw(0, 64)
    with pytest.raises(ValueError, match=message) as e:
        native.lightkv_merge(x, g, windows=2, ratio=0.5, grid=(8, 8), **kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("scores, count, message", [
    (np.ones(8, np.float32), 9, "count"),
    (np.ones(8, np.float32), -1, "count"),
    (-np.ones(8, np.float32), 2, ">= 0"),
    (np.array([1, np.nan, 0, 0], np.float32), 1, "NaN"),
])
def test_bad_protect_top_is_a_one_line_value_error(scores, count, message):
    with pytest.raises(ValueError, match=message) as e:
        native.protect_top(scores, count)
    assert "\n" not in str(e.value)


def test_the_c_api_rejects_bad_masks_and_modes_without_aborting():
    """Below the binding's checks: liblightkv validates before any ggml call."""
    lib = native._load()
    ctx = native._context(None)
    p = native._params(16, 1, 0.5, None, None)
    for mask, mode in ((np.full(16, 2, np.uint8), 0), (np.zeros(16, np.uint8), 7)):
        h = C.c_void_p()
        st = lib.lightkv_merge_plan_create_protected(ctx.h, 16, 4, C.byref(p), None,
                                                     native._u8p(mask), mode, C.byref(h))
        assert st == native._INVALID and not h.value
        assert b"protect" in lib.lightkv_last_error(ctx.h)
    out = np.zeros(4, np.uint8)
    assert lib.lightkv_protect_top(None, 4, 2, native._u8p(out)) == native._INVALID
    assert b"scores" in lib.lightkv_last_error(None)


@pytest.mark.parametrize("kw, message", [
    (dict(target=0), "target"),
    (dict(target=65), "target"),
    (dict(protect_count=40), "protect_count"),
    (dict(protect_count=-1), "protect_count"),
    (dict(windows=0), "windows"),
    (dict(grid=(8, 9)), "grid"),
    (dict(protect_mode="drop"), "protect_mode"),
    (dict(scores=None, protect_count=3), "scores"),
    (dict(scores=-np.ones(64, np.float32)), ">= 0"),
])
def test_bad_merge_reduce_input_is_a_one_line_value_error(kw, message):
    """Checked by liblightkv (or the binding) before any graph: one line, no abort."""
    x, g = draw(0, 64)
    args = dict(scores=g, target=32, windows=2, grid=(8, 8), protect_count=4)
    args.update(kw)
    scores = args.pop("scores")
    with pytest.raises(ValueError, match=message) as e:
        native.merge_reduce(x, scores, **args)
    assert "\n" not in str(e.value)


def test_embed_mode_rejects_protection_without_guidance():
    x, _ = draw(0, 64)
    with pytest.raises(ValueError, match="guidance"):
        embed_mode.merge_image(x, (8, 8), np.arange(3), keep=0.5, windows=None, layer=None,
                               protect=0.5)
    with pytest.raises(ValueError, match="protect"):
        embed_mode.merge_image(x, (8, 8), np.arange(3), keep=0.5, windows=None,
                               layer=_Scores(np.ones(64, np.float32)), protect=1.5)
