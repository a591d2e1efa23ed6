"""Merge rows down to an exact budget with the native LightKV stage: a protected
layer-mode stage.

One published stage drops at most half of each window (r <= n_w // 2), and with
LightKV-protect (docs/merge-variants.md) a window merges at most its unprotected sources,
so a single stage can leave more rows than asked. A protected layer-mode stage must keep
the budget of the published stage it replaces, so it merges in its windows, again and
again on what is left, and in one window once the windows stall, until `target` rows
remain: embed mode's schedule (liblightkv's lightkv_merge_reduce runs that one in one
call), but on rows that already sit at scattered positions of the original grid (the
survivors of earlier stages) and with the stage's own ratio first, which
lightkv_merge_reduce does not take. The spec is the reference's `variants.reduce_rows`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BudgetMerge:
    x: np.ndarray             # [M, D] float32, the rows left (M = target unless stalled)
    kept: np.ndarray          # [M] index into the INPUT rows of each row's destination
    assign: np.ndarray        # [N] row of every input row
    weight: np.ndarray        # [N] float32 coefficient of every input row in its row
    scores: np.ndarray | None  # [M] guidance carried by each row (summed over its group)
    first_windows: int | None  # windows per side of the first stage that merged


def merge_to_budget(x: np.ndarray, scores: np.ndarray | None, *, target: int,
                    grid: tuple[int, int], positions: np.ndarray, windows: int,
                    ratio: float | None = None, protected: np.ndarray | None = None,
                    protect_mode: str = "receive", backend=None) -> BudgetMerge:
    """Merge x [N, D] (rows at `positions` [N, 2] on the original `grid`, ascending
    original order) to `target` rows.

    Every stage cuts windows x windows true 2D windows of the original grid; the first
    stage runs at `ratio` when given (a layer-mode stage's own ratio), every other at
    min((m - target) / m + 1e-9, 0.5) (the epsilon keeps an exact product exact); a stage
    that merges nothing falls back to one window, and stops the loop there. A merged row
    carries the summed guidance of its group (the next stage's weights) and the protected
    flag of its destination. Weights compose stage by stage (the maps are linear), so
    x = sum over assign == j of weight * x_in holds for the whole loop."""
    from . import native

    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    rows, cols = grid
    kept = np.arange(n)
    assign = np.arange(n)
    weight = np.ones(n, np.float32)
    pos = np.asarray(positions, np.int64)
    w, first_windows, first = windows, None, True
    while len(x) > target:
        w = min(w, rows, cols)
        step_ratio = ratio if ratio is not None and first else \
            min((len(x) - target) / len(x) + 1e-9, 0.5)
        first = False
        res = native.lightkv_merge(x, scores, windows=w, ratio=step_ratio, grid=(rows, cols),
                                   positions=pos[kept], protected=protected,
                                   protect_mode=protect_mode, backend=backend)
        if len(res.kept) == len(x):
            if w == 1:
                break  # nothing left to merge
            w = 1      # the remainder is below one token per window: one window
            continue
        first_windows = first_windows or w
        weight = weight * res.weight[assign]
        assign = res.assign[assign]
        if scores is not None:
            # a merged row carries the guidance of everything it absorbed
            scores = np.bincount(res.assign, weights=scores,
                                 minlength=len(res.kept)).astype(np.float32)
        x, kept = res.x, kept[res.kept]
        if protected is not None:
            protected = protected[res.kept]
    return BudgetMerge(x, kept, assign, weight, scores, first_windows)
