"""LightKV merge variants that keep what the prompt asks for (the reference, issue 11).

The published stage (`merge.lightkv_merge`) alternates sources and destinations by index
inside each window and merges the r most similar sources; at ratio 0.5 every source of a
window merges, so a lone object token at a source slot is always averaged into a
neighbour, however strongly the prompt points at it. The variants below stay prompt-guided
windowed merges (every input token ends in a kept row unless a threshold says otherwise)
and keep exactly `budget_of(keep, n) = max(1, ceil(keep * n))` rows, like the baselines.

`protected_reduce` (methods `lightkv-protect*`), all stages of embed mode's progressive
schedule (`embed_mode.merge_image`: ratio min((m - target) / m + 1e-9, 0.5), the original
grid's true 2D windows, a last one-window stage when a remainder is below one token per
window, a merged row carrying the summed guidance of what it absorbed):
  1. Protection. P = the p = round(protect * target) tokens with the highest guidance
     (ties: lower index), chosen once on the input; p is at most target - 1 when
     protected rows stay untouched (mode "keep"), at most target when they may receive.
  2. Roles, per window, tokens by ascending original index: the unprotected ones
     alternate source (even) / destination (odd); protected tokens are never sources;
     mode "keep": they are set aside (neither role), mode "receive": destinations too.
  3. Budget r = min(floor(ratio * n_w), n_w // 2, sources) per window (n_w counts every
     token of the window, as the published merge does); no destination: r = 0.
  4. Which sources merge: order "similarity" (published): the r with the highest best
     cosine, ties lower source index; order "guidance": the r with the LOWEST guidance,
     ties lower source index. Each merges into its most similar destination (ties: lower
     destination index), cosine as `merge.cosine`, float64.
  5. Aggregation as `merge.aggregate`: a group becomes sum(g x) / sum(g).
  With p = 0 and order "similarity", steps 2-5 are exactly `merge.match_windows` +
  `merge.aggregate` (one stage equals `lightkv_merge` bit for bit: tested).

`absorb_reduce` (method `lightkv-absorb`): merge what pruning would drop into what it
keeps. K = the `target` tokens with the highest guidance (FastV's set, ties lower index)
are the destinations; every other token merges into its most similar token of K inside
its own spatial window (`windows` per side of the original grid), or of all of K when its
window holds none; a group becomes sum(g x) / sum(g) (all-zero group: equal weights; a
destination that receives nothing is copied bit for bit). With a threshold, a token whose
best cosine is below it is dropped (assign -1, weight 0) instead of merged.

Both return `merge.MergeResult` over the ORIGINAL tokens: x [M, D] (input dtype), kept [M]
(original index of each row's destination, ascending), assign [N] (row of every token, -1
if dropped), weight [N] (so x[j] = sum over assign == j of weight * x_in).
"""

from __future__ import annotations

import math

import torch

from ._util import back, check_grid, check_int, check_matrix, check_scores, check_threshold
from .merge import MergeResult, aggregate, budget, cosine, grid_layout, window_ids

PROTECT_MODES = ("keep", "receive")
ORDERS = ("similarity", "guidance")


def budget_of(keep: float, n: int) -> int:
    """Rows every method keeps for n tokens at kept fraction keep: max(1, ceil(keep * n))."""
    if not (isinstance(keep, (int, float)) and 0.0 < float(keep) <= 1.0):
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    return max(1, math.ceil(float(keep) * n))


def default_windows(rows: int, cols: int) -> int:
    """embed mode's default (about 6 tokens a window side); repeated here so the
    reference does not import the engine side."""
    return max(1, min(8, round(min(rows, cols) / 6)))


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values; ties -> lower index."""
    return torch.sort(values, descending=True, stable=True).indices[:k]


def _best_match(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(best cosine, column of the best; ties -> lowest column) per row of sim."""
    best = sim.max(dim=1).values
    col = torch.arange(sim.shape[1]).expand_as(sim)
    return best, torch.where(sim == best[:, None], col, sim.shape[1]).min(dim=1).values


def match_protected(x64: torch.Tensor, win: torch.Tensor, ratio: float,
                    protected: torch.Tensor, g: torch.Tensor | None, *,
                    mode: str = "keep", order: str = "similarity") -> torch.Tensor:
    """Steps 2-4 of `protected_reduce` for rows x64 [n, D] (ascending original order) in
    windows win [n]: dst_of [n], the row each row merges into (itself if it stays)."""
    n = x64.shape[0]
    dst_of = torch.arange(n)
    for w in torch.unique(win).tolist():
        idx = torch.nonzero(win == w).flatten()                    # ascending
        free = idx[~protected[idx]]
        src, dst = free[0::2], free[1::2]
        if mode == "receive":
            dst = torch.sort(torch.cat([dst, idx[protected[idx]]])).values
        r = min(budget(idx.numel(), ratio), src.numel()) if dst.numel() else 0
        if r == 0:
            continue
        best, best_dst = _best_match(cosine(x64[src], x64[dst]))
        if order == "similarity":
            rank = torch.sort(best, descending=True, stable=True).indices
        else:  # lowest guidance first; unguided: all equal, so by index
            key = g[src] if g is not None else torch.zeros(src.numel(), dtype=torch.float64)
            rank = torch.sort(key, stable=True).indices
        chosen = rank[:r]
        dst_of[src[chosen]] = dst[best_dst[chosen]]
    return dst_of


def protected_reduce(x, scores, *, keep, grid=None, windows=None, protect=0.0,
                     mode="keep", order="similarity") -> MergeResult:
    """Reduce one image's tokens x [N, D] to budget_of(keep, N) rows (module doc).

    scores [N] guidance >= 0 or None (unguided: no protection possible, weights 1);
    grid (rows, cols) or None (square padding); windows per side or None (default);
    protect: fraction of the budget protected, in [0, 1]; mode "keep" | "receive";
    order "similarity" | "guidance"."""
    xt, is_np = check_matrix(x)
    n = xt.shape[0]
    g = check_scores(scores, n, torch.device("cpu"))
    target = budget_of(keep, n)
    if mode not in PROTECT_MODES:
        raise ValueError(f"mode must be one of {PROTECT_MODES}, got {mode!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if not (isinstance(protect, (int, float)) and 0.0 <= float(protect) <= 1.0):
        raise ValueError(f"protect must be in [0, 1], got {protect!r}")
    p = min(round(float(protect) * target), target - (mode == "keep"))
    if p > 0 and g is None:
        raise ValueError("protection needs guidance scores")
    rows, cols, pos = grid_layout(n, check_grid(grid, n))
    w = None if windows is None else check_int(windows, "windows", 1)

    protected = torch.zeros(n, dtype=torch.bool)
    if p:
        protected[_top(g, p)] = True
    out, kept, assign, weight = reduce_rows(
        xt.detach().cpu(), g, target=target, rows=rows, cols=cols, pos=pos,
        windows=w or default_windows(rows, cols), protected=protected, mode=mode,
        order=order)
    dev = xt.device
    return MergeResult(x=back(out.to(dev), is_np), kept=back(kept.to(dev), is_np),
                       assign=back(assign.to(dev), is_np),
                       weight=back(weight.to(device=dev, dtype=xt.dtype), is_np))


def reduce_rows(x: torch.Tensor, g: torch.Tensor | None, *, target: int, rows: int,
                cols: int, pos: torch.Tensor, windows: int, protected: torch.Tensor,
                mode: str = "receive", order: str = "similarity",
                ratio: float | None = None):
    """The stage loop of `protected_reduce` on rows x [m, D] (CPU, ascending original
    order) at `pos` [m, 2] on the original rows x cols grid, down to `target` rows:
    stages in windows x windows true 2D windows of the original grid, the first at `ratio`
    when given (a layer-mode stage, `MergeState.step(protect=...)`), every other at
    min((m - target) / m + 1e-9, 0.5); a stage that merges nothing falls back to one
    window, and stops the loop there. A merged row carries the summed guidance of its
    group and its destination's protected flag.
    Returns (out [M, D] x's dtype, kept [M] index into x's rows, assign [m], weight [m]
    float64), composed over the stages."""
    n = x.shape[0]
    cur = x
    assign = torch.arange(n)                                  # input -> current row
    weight = torch.ones(n, dtype=torch.float64)
    kept = torch.arange(n)
    w, first = windows, True
    while cur.shape[0] > target:
        w = min(w, rows, cols)
        m = cur.shape[0]
        # as liblightkv's lightkv_merge_reduce (embed mode) and lightkv_layer_prefill_run (layer mode)
        step_ratio = ratio if ratio is not None and first else \
            min((m - target) / m + 1e-9, 0.5)
        first = False
        win = window_ids(pos[kept], rows, cols, w)
        dst_of = match_protected(cur.to(torch.float64), win, step_ratio, protected, g,
                                 mode=mode, order=order)
        if bool((dst_of == torch.arange(m)).all()):
            if w == 1:
                break                                         # nothing left to merge
            w = 1
            continue
        out, k_loc, a_loc, w_loc = aggregate(cur, g, dst_of)
        weight = weight * w_loc[assign]
        assign = a_loc[assign]
        if g is not None:  # a merged row carries the guidance of everything it absorbed
            g = torch.zeros(k_loc.numel(), dtype=torch.float64).index_add_(0, a_loc, g)
        cur, kept, protected = out.to(x.dtype), kept[k_loc], protected[k_loc]
    return cur, kept, assign, weight


def protected_stage(x, scores, *, windows, ratio, grid=None, protect_count=0,
                    mode="keep", order="similarity") -> MergeResult:
    """ONE stage of the protected merge (steps 1-5 with p = protect_count tokens protected),
    the unit the native port implements; with protect_count=0 and order "similarity" it
    equals merge.lightkv_merge(x, scores, windows=, ratio=, grid=) exactly."""
    xt, is_np = check_matrix(x)
    n = xt.shape[0]
    g = check_scores(scores, n, torch.device("cpu"))
    p = check_int(protect_count, "protect_count", 0)
    if p > n or (p and g is None):
        raise ValueError(f"protect_count={p} needs scores and at most {n} tokens")
    if mode not in PROTECT_MODES or order not in ORDERS:
        raise ValueError(f"mode/order must be in {PROTECT_MODES}/{ORDERS}")
    rows, cols, pos = grid_layout(n, check_grid(grid, n))
    protected = torch.zeros(n, dtype=torch.bool)
    if p:
        protected[_top(g, p)] = True
    win = window_ids(pos, rows, cols, check_int(windows, "windows", 1))
    xc = xt.detach().cpu()
    dst_of = match_protected(xc.to(torch.float64), win, float(ratio), protected, g,
                             mode=mode, order=order)
    out, kept, assign, weight = aggregate(xc, g, dst_of)
    dev = xt.device
    return MergeResult(x=back(out.to(device=dev, dtype=xt.dtype), is_np),
                       kept=back(kept.to(dev), is_np), assign=back(assign.to(dev), is_np),
                       weight=back(weight.to(device=dev, dtype=xt.dtype), is_np))


def absorb_reduce(x, scores, *, keep, grid=None, windows=None,
                  threshold=None) -> MergeResult:
    """Keep FastV's top-guidance tokens as destinations and merge every other token into
    its most similar kept token, inside its window when it has one (module doc)."""
    xt, is_np = check_matrix(x)
    n = xt.shape[0]
    g = check_scores(scores, n, torch.device("cpu"))
    if g is None:
        raise ValueError("absorb needs guidance scores")
    threshold = check_threshold(threshold)
    target = budget_of(keep, n)
    rows, cols, pos = grid_layout(n, check_grid(grid, n))
    w = min(check_int(windows, "windows", 1) if windows is not None
            else default_windows(rows, cols), rows, cols)
    win = window_ids(pos, rows, cols, w)
    kept = torch.sort(_top(g, target)).values
    x64 = xt.detach().cpu().to(torch.float64)
    dst_of = torch.arange(n)
    is_kept = torch.zeros(n, dtype=torch.bool)
    is_kept[kept] = True
    rest = torch.nonzero(~is_kept).flatten()
    if rest.numel():
        sim = cosine(x64[rest], x64[kept])                    # [n - target, target]
        same = win[rest][:, None] == win[kept][None, :]
        # tokens whose window holds a kept token look only there; the others everywhere
        sim = torch.where(same | ~same.any(dim=1, keepdim=True), sim, -math.inf)
        best, col = _best_match(sim)
        dst_of[rest] = kept[col]
        if threshold is not None:
            dst_of[rest[best < threshold]] = -1
    row_of = torch.full((n,), -1, dtype=torch.int64)
    row_of[kept] = torch.arange(target)
    assign = torch.where(dst_of >= 0, row_of[dst_of.clamp_min(0)], -1)
    live = assign >= 0
    gl = torch.where(live, g, 0.0)
    size = torch.zeros(target, dtype=torch.float64).index_add_(0, assign[live],
                                                               torch.ones(int(live.sum()),
                                                                          dtype=torch.float64))
    total = torch.zeros(target, dtype=torch.float64).index_add_(0, assign[live], gl[live])
    a = assign.clamp_min(0)
    weight = torch.where(total[a] > 0, gl / total[a].clamp_min(1e-8), 1.0 / size[a])
    weight = torch.where(size[a] == 1, 1.0, weight)         # untouched rows: exact copies
    weight = torch.where(live, weight, 0.0)
    out = torch.zeros(target, xt.shape[1], dtype=torch.float64)
    out.index_add_(0, a[live], weight[live][:, None] * x64[live])
    dev = xt.device
    return MergeResult(x=back(out.to(device=dev, dtype=xt.dtype), is_np),
                       kept=back(kept.to(dev), is_np), assign=back(assign.to(dev), is_np),
                       weight=back(weight.to(device=dev, dtype=xt.dtype), is_np))
