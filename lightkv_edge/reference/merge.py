"""One LightKV merge stage: windowed, guided bipartite token merging (the ground truth).

Semantics (docs/method.md, "One merge stage"), in the order the code applies them:

1. Layout. Token i sits at (i // C, i % C). With grid=(R, C) that is the true grid; with
   grid=None it is the published square padding: S = ceil(sqrt(N)), R = C = S, and the
   padding cells are simply absent from their windows.
2. Windows. Each axis of length L is cut into W parts, the first (L mod W) one token
   larger; a token's window is (row part, col part). W > L on either axis is an error.
3. Inside a window (tokens by ascending index) even positions are sources, odd ones
   destinations. cos(a, b) = a.b / (|a||b| + 1e-8); each source's best destination is the
   argmax (ties: lower destination index), its score the max.
4. Budget r = min(math.floor(ratio * n_w), n_w // 2): the IEEE double product, floored,
   with no epsilon, so 0.29 * 100 = 28.999999999999996 gives 28 (native code must do
   the same in double). The r highest-scoring sources merge; ties: lower source index
   first. With a threshold, a chosen source whose score is below it stays unmerged (so
   fewer than r may merge).
5. A destination receiving sources becomes sum(g x) / max(sum g, 1e-8) over its group;
   an all-zero group falls back to equal weights (never a zero vector). Rows that receive
   nothing (unmerged sources, lone destinations) are copied bit for bit.
6. Output rows: every token that was not merged away, ascending by original index.

All similarity and aggregation arithmetic is float64 (the input is cast back at the end),
so this reference is the "exact" value that float32 implementations approximate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ._util import (back, check_grid, check_int, check_matrix, check_ratio, check_scores,
                    check_threshold)

EPS = 1e-8


@dataclass(frozen=True)
class MergeResult:
    """Output of a merge or of a baseline (same kind as the input: numpy or torch).

    x      [M, D]  output rows, same dtype/device as the input.
    kept   [M]     int64, original index of each output row, ascending.
    assign [N]     int64, output row of each input token; -1 for tokens that were dropped.
    weight [N]     coefficient of each input token in its output row (0 for dropped ones),
                   so x[j] = sum over i with assign[i] == j of weight[i] * x_in[i].
    """

    x: Any
    kept: Any
    assign: Any
    weight: Any


# ---------------------------------------------------------------- layout and windows
def grid_layout(n: int, grid=None) -> tuple[int, int, torch.Tensor]:
    """(rows, cols, pos [n, 2] int64) of the grid the windows are cut on."""
    grid = check_grid(grid, n)
    if grid is None:  # the published behaviour: pad to the next perfect square
        side = math.isqrt(n)
        side += side * side < n
        rows = cols = side
    else:
        rows, cols = grid
    i = torch.arange(n, dtype=torch.int64)
    return rows, cols, torch.stack([i // cols, i % cols], dim=1)


def window_cut(length: int, windows: int) -> torch.Tensor:
    """[length] part index of each coordinate: the first (length % windows) parts are
    one longer. E.g. window_cut(10, 4) = [0 0 0 1 1 1 2 2 3 3]."""
    if windows > length:
        raise ValueError(f"windows={windows} is larger than a grid side of {length}")
    base, extra = divmod(length, windows)
    sizes = [base + 1] * extra + [base] * (windows - extra)
    return torch.repeat_interleave(torch.arange(windows), torch.tensor(sizes))


def window_ids(pos: torch.Tensor, rows: int, cols: int, windows: int) -> torch.Tensor:
    """[n] window id (row-major over the W x W windows) of tokens at `pos` [n, 2]."""
    wr = window_cut(rows, windows)[pos[:, 0]]
    wc = window_cut(cols, windows)[pos[:, 1]]
    return wr * windows + wc


def budget(n_window: int, ratio: float) -> int:
    """Sources merged in a window of n_window tokens (see module doc, point 4)."""
    return min(math.floor(ratio * n_window), n_window // 2)


def lightkv_budget(n: int, *, windows: int, ratio: float, grid=None) -> int:
    """Number of rows lightkv_merge keeps for N = n tokens (for matching baselines)."""
    n = check_int(n, "n", 1)
    windows = check_int(windows, "windows", 1)
    ratio = check_ratio(ratio)
    rows, cols, pos = grid_layout(n, grid)
    counts = torch.bincount(window_ids(pos, rows, cols, windows), minlength=windows**2)
    return sum(c - budget(c, ratio) for c in counts.tolist())


# ---------------------------------------------------------------- the merge itself
def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[na, nb] cosine similarity a.b / (|a||b| + 1e-8).

    Element-wise product and sum instead of a @ b.T: a BLAS matmul may round two identical
    columns differently (edge tiles), and duplicate tokens must give *exact* ties so the
    tie rules below are what decides. Chunked to bound memory.
    """
    chunk = max(1, (1 << 22) // max(1, b.shape[0] * b.shape[1]))
    dot = torch.cat([(a[i:i + chunk, None, :] * b[None]).sum(-1)
                     for i in range(0, a.shape[0], chunk)] or [a.new_zeros(0, b.shape[0])])
    na = torch.linalg.vector_norm(a, dim=1)
    nb = torch.linalg.vector_norm(b, dim=1)
    return dot / (na[:, None] * nb[None, :] + EPS)


def match_windows(x: torch.Tensor, win: torch.Tensor, ratio: float,
                  threshold: float | None) -> torch.Tensor:
    """For rows x [n, D] (ascending original order) in windows `win` [n], return
    dst_of [n]: the row each row merges into (itself when it is not merged away)."""
    n = x.shape[0]
    dst_of = torch.arange(n, device=x.device)
    win = win.to(x.device)
    for w in torch.unique(win).tolist():
        idx = torch.nonzero(win == w).flatten()        # ascending
        r = budget(idx.numel(), ratio)
        if r == 0:
            continue
        src, dst = idx[0::2], idx[1::2]
        sim = cosine(x[src], x[dst])
        best = sim.max(dim=1).values
        # argmax with ties -> lowest destination, spelled out rather than relying on
        # the backend's argmax tie rule.
        col = torch.arange(dst.numel(), device=x.device).expand_as(sim)
        best_dst = torch.where(sim == best[:, None], col, dst.numel()).min(dim=1).values
        order = torch.sort(best, descending=True, stable=True).indices  # ties: lower src
        chosen = order[:r]
        if threshold is not None:
            chosen = chosen[best[chosen] >= threshold]
        dst_of[src[chosen]] = dst[best_dst[chosen]]
    return dst_of


def aggregate(x: torch.Tensor, g: torch.Tensor | None, dst_of: torch.Tensor):
    """Collapse each group {dst} + its sources into one row. Returns (out [M, D] float64,
    kept [M], assign [n], weight [n] float64)."""
    n = x.shape[0]
    x64 = x.to(torch.float64)
    own = dst_of == torch.arange(n, device=x.device)           # tokens that own a row
    kept = torch.nonzero(own).flatten()
    row_of = torch.cumsum(own.to(torch.int64), 0) - 1
    assign = row_of[dst_of]
    m = kept.numel()
    g = torch.ones(n, dtype=torch.float64, device=x.device) if g is None else g
    size = torch.bincount(assign, minlength=m).to(torch.float64)
    total = torch.zeros(m, dtype=torch.float64, device=x.device).index_add_(0, assign, g)
    weight = g / total.clamp_min(EPS)[assign]
    weight = torch.where(total[assign] == 0, 1.0 / size[assign], weight)  # all-zero group
    weight = torch.where(size[assign] == 1, 1.0, weight)  # untouched rows: exact copies
    out = torch.zeros(m, x.shape[1], dtype=torch.float64, device=x.device)
    out.index_add_(0, assign, weight[:, None] * x64)
    return out, kept, assign, weight


def lightkv_merge(x, scores, *, windows, ratio, grid=None, threshold=None) -> MergeResult:
    """Merge the N vision tokens x [N, D] of one image (see the module docstring).

    scores: [N] guidance weights >= 0, or None for unguided (all weights 1).
    windows: windows per side; ratio: fraction dropped in [0, 1); grid: (rows, cols) or
    None (published square padding); threshold: optional minimum best-match cosine.
    """
    xt, is_np = check_matrix(x)
    n = xt.shape[0]
    windows = check_int(windows, "windows", 1)
    ratio = check_ratio(ratio)
    threshold = check_threshold(threshold)
    g = check_scores(scores, n, xt.device)
    rows, cols, pos = grid_layout(n, grid)
    win = window_ids(pos, rows, cols, windows)
    dst_of = match_windows(xt.to(torch.float64), win, ratio, threshold)
    out, kept, assign, weight = aggregate(xt, g, dst_of)
    return MergeResult(x=back(out.to(xt.dtype), is_np), kept=back(kept, is_np),
                       assign=back(assign, is_np), weight=back(weight.to(xt.dtype), is_np))


def lightkv_merge_images(x, scores, slices, *, windows, ratio, threshold=None) -> MergeResult:
    """Merge every image of a sequence separately; rows outside the images pass through.

    x [N, D] the whole sequence, scores [N] or None (only image rows are read), slices a
    list of (start, n, grid) with grid (rows, cols) or None, non-overlapping. `kept` and
    `assign` index the whole sequence.
    """
    xt, is_np = check_matrix(x)
    n = xt.shape[0]
    g = check_scores(scores, n, xt.device)
    windows = check_int(windows, "windows", 1)
    ratio = check_ratio(ratio)
    threshold = check_threshold(threshold)
    dst_of = torch.arange(n, device=xt.device)
    for start, cnt, grid in check_slices(slices, n):
        rows, cols, pos = grid_layout(cnt, grid)
        win = window_ids(pos, rows, cols, windows)
        local = match_windows(xt[start:start + cnt].to(torch.float64), win, ratio, threshold)
        dst_of[start:start + cnt] = local + start
    out, kept, assign, weight = aggregate(xt, g, dst_of)
    return MergeResult(x=back(out.to(xt.dtype), is_np), kept=back(kept, is_np),
                       assign=back(assign, is_np), weight=back(weight.to(xt.dtype), is_np))


def check_slices(slices, n: int) -> list[tuple[int, int, tuple[int, int] | None]]:
    """Validate [(start, n, grid), ...]: inside [0, n), non-overlapping, grid matches."""
    out = []
    for s in slices:
        try:
            start, cnt, grid = s
        except (TypeError, ValueError):
            raise ValueError(f"each slice must be (start, n, grid), got {s!r}") from None
        start = check_int(start, "slice start", 0)
        cnt = check_int(cnt, "slice length", 1)
        if start + cnt > n:
            raise ValueError(f"slice ({start}, {cnt}) runs past the sequence length {n}")
        out.append((start, cnt, check_grid(grid, cnt)))
    out.sort()
    for (s0, c0, _), (s1, _, _) in zip(out, out[1:]):
        if s0 + c0 > s1:
            raise ValueError(f"image slices overlap at position {s1}")
    return out

