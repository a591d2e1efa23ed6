"""LightKV variants (lightkv_edge/reference/variants.py): exact budgets, the published merge
when protection is off, the prompt's top tokens kept when it is on, determinism.
Accuracy is the benchmark's business (docs/merge-variants.md), not asserted here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightkv_edge import embed_mode
from lightkv_edge.bench import wilson
from lightkv_edge.reference import MergeState, lightkv_merge
from lightkv_edge.reference import variants as V

KEEPS = (0.95, 0.75, 0.55, 0.5, 0.35, 0.25, 0.1, 0.02)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: torch's thread pool only spins against the other jobs (10x slower
    on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
GRIDS = ((8, 8), (6, 10), (16, 16), (5, 7))


def draw(seed: int, n: int, d: int = 24, dup: bool = False):
    """Random rows and guidance; dup=True repeats rows and scores so ties decide."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    g = rng.random(n).astype(np.float32) * 4
    if dup:
        x[1::3] = x[0::3][: len(x[1::3])]
        g[2::4] = g[0::4][: len(g[2::4])]
    return x, g


def same(a, b) -> bool:
    return all(np.array_equal(np.asarray(getattr(a, k)), np.asarray(getattr(b, k)))
               for k in ("x", "kept", "assign", "weight"))


def check_result(r, x, n_rows):
    """The MergeResult contract: n_rows rows, ascending kept, x = sum of weight * x_in."""
    kept, assign, weight = (np.asarray(r.kept), np.asarray(r.assign), np.asarray(r.weight))
    assert len(kept) == n_rows and r.x.shape == (n_rows, x.shape[1])
    assert np.all(np.diff(kept) > 0)
    assert np.array_equal(assign[kept], np.arange(n_rows))   # a row holds its own token
    live = assign >= 0
    rebuilt = np.zeros((n_rows, x.shape[1]))
    np.add.at(rebuilt, assign[live], weight[live, None].astype(np.float64) * x[live])
    # float32 output of float64 sums of <= N float32 terms: 1e-5 relative is far above
    # the rounding and far below any wrong coefficient
    np.testing.assert_allclose(r.x, rebuilt, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- exact budgets
@pytest.mark.parametrize("grid", GRIDS)
def test_every_variant_keeps_exactly_the_budget(grid):
    n = grid[0] * grid[1]
    checked = 0
    for keep in KEEPS:
        x, g = draw(checked, n)
        target = max(1, math.ceil(keep * n))
        runs = [V.protected_reduce(x, g, keep=keep, grid=grid, protect=p, mode=m, order=o)
                for p in (0.0, 0.25, 0.5, 1.0) for m in V.PROTECT_MODES for o in V.ORDERS]
        runs += [V.protected_reduce(x, None, keep=keep, grid=grid)]
        runs += [V.absorb_reduce(x, g, keep=keep, grid=grid, windows=w)
                 for w in (1, 2, min(grid))]
        for r in runs:
            check_result(r, x, target)
            checked += 1
    assert checked == len(KEEPS) * (16 + 1 + 3)


def test_threshold_absorb_drops_but_keeps_the_budget():
    x, g = draw(3, 64)
    r = V.absorb_reduce(x, g, keep=0.25, grid=(8, 8), threshold=0.2)
    check_result(r, x, 16)
    assert (np.asarray(r.assign) == -1).any()         # random rows: some below 0.2
    assert np.all(np.asarray(r.weight)[np.asarray(r.assign) == -1] == 0)


@pytest.fixture(scope="module")
def layer():
    from lightkv_edge import native
    from lightkv_edge.embedded import embedded_model
    return native.GuidanceModel(embedded_model()[0])


def _prompt_ids(n: int) -> np.ndarray:
    """n token ids of the embedded model's vocabulary (guidance takes the prompt's ids)."""
    return np.arange(10, 10 + n, dtype=np.int32)


@pytest.mark.parametrize("keep", (0.75, 0.55, 0.35, 0.25, 0.1))
def test_every_method_of_embed_mode_keeps_the_budget(layer, keep):
    """Through embed_mode.reduce_image with the embedded model's own first layer: every
    method (pool only at its fixed quarter) gives ceil(keep * N) rows."""
    d = layer.n_embd_inp
    rng = np.random.default_rng(7)
    embd = rng.standard_normal((64, d)).astype(np.float32)
    text = _prompt_ids(6)
    checked = []
    for method in embed_mode.METHODS:
        if method == "pool" and keep != 0.25:
            continue
        m = embed_mode.reduce_image(embd, (8, 8), text, keep=keep, windows=None,
                                    method=method, layer=layer, seed=0)
        assert len(m.kept) == math.ceil(keep * 64), method
        assert m.embd.shape == (len(m.kept), d) and np.all(np.diff(m.kept) > 0)
        checked.append(method)
    assert {"lightkv-protect", "lightkv-paper", "unguided", "random", "fastv", "dart",
            "lightkv-absorb"} <= set(checked)
    assert keep != 0.25 or "pool" in checked
    assert set(embed_mode.VARIANTS) <= set(embed_mode.GUIDED_METHODS)


# ---------------------------------------------------------------- protection off
def test_protection_off_stage_is_the_published_merge_bit_for_bit():
    checked = 0
    for seed in range(3):
        for grid in GRIDS + (None,):
            n = 50 if grid is None else grid[0] * grid[1]
            for dup in (False, True):
                x, g = draw(seed, n, dup=dup)
                for windows in (1, 2, 3):
                    if grid is not None and windows > min(grid):
                        continue
                    for ratio in (0.29, 0.5):   # 0.29: floor(0.29 * 100) == 28
                        for scores in (g, None):
                            kw = dict(windows=windows, ratio=ratio, grid=grid)
                            a = V.protected_stage(x, scores, protect_count=0, **kw)
                            b = lightkv_merge(x, scores, **kw)
                            assert same(a, b), (seed, grid, dup, windows, ratio)
                            checked += 1
    assert checked >= 300, checked


def published_schedule(x, g, keep, grid):
    """The published stage applied as embed_mode.merge_image schedules it, composed by the
    reference's own MergeState (independent bookkeeping from variants.py)."""
    n = len(x)
    target = max(1, math.ceil(keep * n))
    st = MergeState(n, grid)
    w = None
    cur, gc = torch.from_numpy(x), None if g is None else torch.from_numpy(g).double()
    while st.m > target:
        w = min(w or embed_mode.default_windows(*grid), *grid)
        ratio = min((st.m - target) / st.m + 1e-9, 0.5)
        before = st.m
        res = st.step(cur, gc, windows=w, ratio=ratio)
        if st.m == before:
            if w == 1:
                break
            w = 1
            continue
        cur = res.x
        if gc is not None:
            gc = torch.zeros(st.m, dtype=torch.float64).index_add_(0, res.assign, gc)
    return cur.numpy(), st.orig_index.numpy(), st.assign.numpy(), st.weight.numpy()


@pytest.mark.parametrize("grid", ((8, 8), (16, 16), (6, 10)))
def test_protection_off_schedule_is_the_published_schedule(grid):
    n = grid[0] * grid[1]
    checked = 0
    for keep in KEEPS:
        for seed in range(2):
            x, g = draw(seed, n, dup=seed == 1)
            for scores in (g, None):
                r = V.protected_reduce(x, scores, keep=keep, grid=grid, protect=0.0)
                px, kept, assign, weight = published_schedule(x, scores, keep, grid)
                assert np.array_equal(r.x, px) and np.array_equal(r.kept, kept)
                assert np.array_equal(r.assign, assign)
                assert np.array_equal(r.weight, weight.astype(np.float32))
                checked += 1
    assert checked == len(KEEPS) * 4


@pytest.mark.parametrize("keep", (0.75, 0.55, 0.35, 0.25, 0.1))
def test_protection_off_matches_the_native_merge_of_embed_mode(layer, keep):
    """protect=0 is what embed mode ships today (native ggml merge, float32): the same
    kept rows, and rows equal to float32 accuracy."""
    d = layer.n_embd_inp
    rng = np.random.default_rng(11)
    embd = rng.standard_normal((64, d)).astype(np.float32)
    text = _prompt_ids(5)
    g = embed_mode.prompt_guidance(embd, text, layer)
    native = embed_mode.merge_image(embd, (8, 8), text, keep=keep, windows=None, layer=layer)
    ref = V.protected_reduce(embd, g, keep=keep, grid=(8, 8), protect=0.0)
    assert np.array_equal(native.kept, ref.kept)
    # float32 (native) against float64 (reference) averages of unit-scale rows
    np.testing.assert_allclose(native.embd, ref.x, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- protection on
def test_protected_tokens_are_kept_untouched_or_receiving():
    checked = 0
    for grid in GRIDS:
        n = grid[0] * grid[1]
        for keep in KEEPS:
            x, g = draw(checked, n, dup=True)
            target = max(1, math.ceil(keep * n))
            for mode in V.PROTECT_MODES:
                for frac in (0.25, 0.5, 1.0):
                    p = min(round(frac * target), target - (mode == "keep"))
                    top = np.argsort(-g, kind="stable")[:p]
                    r = V.protected_reduce(x, g, keep=keep, grid=grid, protect=frac,
                                           mode=mode)
                    assert set(top.tolist()) <= set(np.asarray(r.kept).tolist())
                    if mode == "keep":   # set aside: their rows are exact copies
                        rows = np.asarray(r.assign)[top]
                        np.testing.assert_array_equal(r.x[rows], x[top])
                    checked += 1
    assert checked == len(GRIDS) * len(KEEPS) * 6


def test_absorb_keeps_fastv_set_and_merges_into_it():
    from lightkv_edge.reference import fastv_topk
    for keep in KEEPS:
        x, g = draw(5, 64, dup=True)
        r = V.absorb_reduce(x, g, keep=keep, grid=(8, 8), windows=2)
        f = fastv_topk(x, g, n_keep=max(1, math.ceil(keep * 64)))
        assert np.array_equal(r.kept, f.kept)
        assert np.all(np.asarray(r.assign) >= 0)       # no threshold: nothing is dropped


def test_absorb_prefers_the_own_window():
    """A token merges into a kept token of its own 2x2-window quarter when there is one,
    even when a kept token elsewhere is more similar."""
    x = np.zeros((16, 2), np.float32)
    x[:, 0] = 1.0
    x[0] = (1.0, 1.0)          # kept, window 0 (rows 0-1, cols 0-1)
    x[1] = (1.0, 0.9)          # window 0: most similar to token 15, but 0 is in its window
    x[15] = (1.0, 0.9)         # kept, window 3
    g = np.full(16, 0.1, np.float32)
    g[[0, 15]] = 1.0
    r = V.absorb_reduce(x, g, keep=2 / 16, grid=(4, 4), windows=2)
    assert list(r.kept) == [0, 15] and r.assign[1] == 0
    r1 = V.absorb_reduce(x, g, keep=2 / 16, grid=(4, 4), windows=1)
    assert r1.assign[1] == 1                           # one window: the global best


# ---------------------------------------------------------------- determinism and input
def test_deterministic_and_numpy_torch_agree():
    x, g = draw(9, 64, dup=True)
    for fn, kw in ((V.protected_reduce, {"protect": 0.5, "mode": "receive"}),
                   (V.protected_reduce, {"protect": 1.0, "order": "guidance"}),
                   (V.absorb_reduce, {"windows": 2})):
        a = fn(x, g, keep=0.25, grid=(8, 8), **kw)
        b = fn(x.copy(), g.copy(), keep=0.25, grid=(8, 8), **kw)
        c = fn(torch.from_numpy(x), torch.from_numpy(g), keep=0.25, grid=(8, 8), **kw)
        assert same(a, b)
        assert all(np.array_equal(getattr(a, k), getattr(c, k).numpy())
                   for k in ("x", "kept", "assign", "weight"))


@pytest.mark.parametrize("call, message", [
    (lambda x, g: V.protected_reduce(x, g, keep=0.0), "keep"),
    (lambda x, g: V.protected_reduce(x, g, keep=1.5), "keep"),
    (lambda x, g: V.protected_reduce(x, g, keep=0.5, protect=1.2), "protect"),
    (lambda x, g: V.protected_reduce(x, g, keep=0.5, mode="x"), "mode"),
    (lambda x, g: V.protected_reduce(x, g, keep=0.5, order="x"), "order"),
    (lambda x, g: V.protected_reduce(x, None, keep=0.5, protect=0.5), "guidance"),
    (lambda x, g: V.absorb_reduce(x, None, keep=0.5), "guidance"),
    (lambda x, g: V.absorb_reduce(x, g, keep=0.5, grid=(4, 4)), "grid"),
    (lambda x, g: V.absorb_reduce(x, -g, keep=0.5), "scores"),
])
def test_bad_arguments_are_one_line_value_errors(call, message):
    x, g = draw(0, 64)
    with pytest.raises(ValueError, match=message) as e:
        call(x, g)
    assert "\n" not in str(e.value)


def test_wilson_interval():
    lo, hi = wilson(50, 100)      # textbook value: 0.4038 - 0.5962
    assert abs(lo - 0.4038) < 1e-4 and abs(hi - 0.5962) < 1e-4
    lo, hi = wilson(300, 300)     # all right: the upper end is 1, the lower one is not
    assert hi > 1 - 1e-12 and 0.98 < lo < 0.99


# ---------------------------------------------------------------- benchmark wiring
def _bench(*args, tmp_path=None):
    import subprocess
    import sys
    from pathlib import Path
    return subprocess.run([sys.executable, "-m", "lightkv_edge", "bench", *args],
                          capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])


def test_bench_runs_the_variants_on_the_validation_split(tmp_path):
    import json
    out = tmp_path / "b.json"
    r = _bench("--split", "val", "--n", "4", "-t", "1", "--methods",
               "lightkv-protect,lightkv-absorb", "--keep", "0.25", "--json", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["split"] == "val"
    assert {x["method"] for x in data["results"]} == {"lightkv-protect", "lightkv-absorb"}
    for x in data["results"]:
        assert x["vision_tokens_kept"] == 16 and x["n"] == 4
        lo, hi = x["ci95"]
        assert lo <= x["accuracy"] <= hi


def test_bench_bad_split_is_one_line_exit_2():
    r = _bench("--split", "train", "--n", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
