"""Progressive merging: a schedule of stages and the bookkeeping that composes them.

A `Schedule` says at which decoder layers to merge, with how many windows per side and
which drop ratio, e.g. Schedule.parse("12-18-24", "4-2-1", "0.5-0.5-0.5").

A `MergeState` follows one image through the stages. Each surviving row keeps
  - orig_index: the original token index it sits at (its destination's, when merged),
  - pos: that token's (row, col) on the ORIGINAL grid (the padded square for grid=None),
and the state composes every stage's (assign, weight) map, so it can say which current row
each original token ended in and with what coefficient (a sparse [M, N] matrix with one
entry per column). KV compaction of earlier layers reuses exactly these coefficients.

Later stages cut TRUE 2D windows: a survivor belongs to the window of its original
(row, col) under the new W cut of the original grid, and inside a window survivors
alternate source/destination by ascending original index. (The published code re-squares
the shortened 1-D sequence instead, so its later windows are only roughly spatial.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._util import back, check_int, check_matrix, check_ratio, check_scores, check_threshold
from .merge import MergeResult, aggregate, budget, grid_layout, match_windows, window_ids


@dataclass(frozen=True)
class Schedule:
    """Merge after decoder layers `layers` (0-based, strictly increasing) with
    `windows[k]` windows per side and drop ratio `ratios[k]`; optional similarity
    threshold applied at every stage."""

    layers: tuple[int, ...]
    windows: tuple[int, ...]
    ratios: tuple[float, ...]
    threshold: float | None = None

    def __post_init__(self):
        layers = tuple(check_int(v, "schedule layer", 0) for v in self.layers)
        windows = tuple(check_int(v, "schedule windows", 1) for v in self.windows)
        ratios = tuple(check_ratio(v) for v in self.ratios)
        if not len(layers) == len(windows) == len(ratios):
            raise ValueError(f"schedule needs as many windows ({len(windows)}) and ratios "
                             f"({len(ratios)}) as layers ({len(layers)})")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"schedule layers must be strictly increasing, got {layers}")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "windows", windows)
        object.__setattr__(self, "ratios", ratios)
        object.__setattr__(self, "threshold", check_threshold(self.threshold))

    @classmethod
    def parse(cls, layers: str, windows: str, ratios: str, threshold=None) -> "Schedule":
        """Paper style "12-18-24", "4-2-1", "0.5-0.5-0.5"; a single windows or ratio
        value applies to every stage; empty strings give the empty schedule."""
        def split(s, conv, what):
            s = str(s).strip()
            if not s:
                return []
            try:
                return [conv(p) for p in s.split("-")]
            except ValueError:
                raise ValueError(f"cannot parse schedule {what} {s!r}") from None
        ls = split(layers, int, "layers")
        ws = split(windows, int, "windows")
        rs = split(ratios, float, "ratios")
        ws = ws * len(ls) if len(ws) == 1 else ws
        rs = rs * len(ls) if len(rs) == 1 else rs
        return cls(tuple(ls), tuple(ws), tuple(rs), threshold)

    def __len__(self) -> int:
        return len(self.layers)

    def stage_at(self, layer: int) -> int | None:
        """Index of the stage that merges after `layer`, or None."""
        return self.layers.index(layer) if layer in self.layers else None


class MergeState:
    """One image's token set across merge stages (torch CPU bookkeeping tensors)."""

    def __init__(self, n: int, grid=None):
        n = check_int(n, "n", 1)
        self.n = n
        self.rows, self.cols, self.pos = grid_layout(n, grid)  # the grid windows are cut on
        self.orig_index = torch.arange(n, dtype=torch.int64)     # [M]
        self.assign = torch.arange(n, dtype=torch.int64)         # [N] original -> row
        self.weight = torch.ones(n, dtype=torch.float64)         # [N] composed coefficient
        self.stages: list[tuple[torch.Tensor, torch.Tensor]] = []  # stage-local maps
        self.stage_orig: list[torch.Tensor] = []  # orig_index of the rows entering stage k

    @property
    def m(self) -> int:
        return self.orig_index.numel()

    def step(self, x, scores, *, windows, ratio, threshold=None, protect=0.0,
             protect_mode="receive") -> MergeResult:
        """Merge the current rows x [M, D] (in orig_index order). Returns the stage-local
        result (kept/assign index the current rows) and updates the composition.

        protect > 0 (LightKV-protect in a layer-mode stage): the stage's budget is the
        rows the published stage keeps on these rows, target = M - sum over this stage's
        windows of budget(n_w, ratio) = min(floor(ratio * n_w), n_w // 2); the
        round(protect * target) rows with the highest `scores` (ties: lower index; at
        most target - 1 in mode "keep") are never sources; the stage merges at `ratio` in its windows with that rule and then
        as variants.reduce_rows does, until exactly target rows are left (protection can
        leave a window short of sources). protect = 0 is the published stage."""
        xt, is_np = check_matrix(x)
        if xt.shape[0] != self.m:
            raise ValueError(f"x has {xt.shape[0]} rows but the state holds {self.m}")
        windows = check_int(windows, "windows", 1)
        g = check_scores(scores, self.m, xt.device)
        win = window_ids(self.pos, self.rows, self.cols, windows)
        ratio = check_ratio(ratio)
        threshold = check_threshold(threshold)
        if not (isinstance(protect, (int, float)) and 0.0 <= float(protect) <= 1.0):
            raise ValueError(f"protect must be in [0, 1], got {protect!r}")
        if protect > 0:
            from .variants import PROTECT_MODES, _top, reduce_rows
            if g is None or threshold is not None:
                raise ValueError("protection needs guidance scores and no threshold")
            if protect_mode not in PROTECT_MODES:
                raise ValueError(f"protect_mode must be one of {PROTECT_MODES}")
            counts = torch.bincount(win.cpu(), minlength=windows * windows).tolist()
            target = self.m - sum(budget(c, ratio) for c in counts)
            p = min(round(float(protect) * target), target - (protect_mode == "keep"))
            protected = torch.zeros(self.m, dtype=torch.bool)
            if p > 0:
                protected[_top(g.cpu().to(torch.float64), p)] = True
            out, kept, assign, weight = reduce_rows(
                xt.detach().cpu(), g.cpu().to(torch.float64), target=target,
                rows=self.rows, cols=self.cols, pos=self.pos, windows=windows,
                protected=protected, mode=protect_mode, ratio=ratio)
            out = out.to(xt.device)
        else:
            dst_of = match_windows(xt.to(torch.float64), win, ratio, threshold)
            out, kept, assign, weight = aggregate(xt, g, dst_of)
        kept_c, assign_c, weight_c = kept.cpu(), assign.cpu(), weight.cpu()
        self.stages.append((assign_c, weight_c))
        self.stage_orig.append(self.orig_index)
        self.weight = self.weight * weight_c[self.assign]
        self.assign = assign_c[self.assign]
        self.orig_index = self.orig_index[kept_c]
        self.pos = self.pos[kept_c]
        return MergeResult(x=back(out.to(xt.dtype), is_np), kept=back(kept, is_np),
                           assign=back(assign, is_np), weight=back(weight.to(xt.dtype), is_np))

    def mapping(self, from_stage: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(assign, weight) from the rows that entered stage `from_stage` to the current
        rows; from_stage == len(stages) is the identity on the current rows."""
        if not 0 <= from_stage <= len(self.stages):
            raise ValueError(f"from_stage must be in [0, {len(self.stages)}]")
        if from_stage == 0:
            return self.assign.clone(), self.weight.clone()
        n_in = self.stages[from_stage][0].numel() if from_stage < len(self.stages) else self.m
        assign = torch.arange(n_in, dtype=torch.int64)
        weight = torch.ones(n_in, dtype=torch.float64)
        for a, w in self.stages[from_stage:]:
            weight = weight * w[assign]
            assign = a[assign]
        return assign, weight

    def matrix(self, from_stage: int = 0) -> torch.Tensor:
        """Dense composed aggregation matrix [M, n_in] (float64): current = A @ input."""
        assign, weight = self.mapping(from_stage)
        a = torch.zeros(self.m, assign.numel(), dtype=torch.float64)
        a[assign, torch.arange(assign.numel())] = weight
        return a
