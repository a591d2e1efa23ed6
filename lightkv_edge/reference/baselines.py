"""Baselines at the same kept budget, with LightKV's result contract (MergeResult).

Use lightkv_budget(n, windows=..., ratio=..., grid=...) as `n_keep` to compare at equal
token counts. Dropped tokens get assign -1 and weight 0; kept rows are ascending by
original index. All selections are deterministic: ties go to the lower index.
"""

from __future__ import annotations

import numpy as np
import torch

from ._util import back, check_int, check_matrix, check_scores
from .merge import MergeResult, cosine, grid_layout, lightkv_merge


def _keep_rows(xt: torch.Tensor, is_np: bool, keep: torch.Tensor) -> MergeResult:
    """Result that keeps rows `keep` (any order) unchanged and drops the rest."""
    n = xt.shape[0]
    kept = torch.sort(keep.to(xt.device)).values
    assign = torch.full((n,), -1, dtype=torch.int64, device=xt.device)
    assign[kept] = torch.arange(kept.numel(), device=xt.device)
    weight = (assign >= 0).to(xt.dtype)
    return MergeResult(x=back(xt[kept].clone(), is_np), kept=back(kept, is_np),
                       assign=back(assign, is_np), weight=back(weight, is_np))


def _check_keep(n_keep, n: int) -> int:
    n_keep = check_int(n_keep, "n_keep", 1)
    if n_keep > n:
        raise ValueError(f"n_keep={n_keep} exceeds the {n} tokens")
    return n_keep


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values; ties -> lower index (stable sort)."""
    return torch.sort(values, descending=True, stable=True).indices[:k]


def random_drop(x, *, n_keep, seed) -> MergeResult:
    """Keep n_keep tokens chosen uniformly without replacement by numpy's PCG64
    Generator(seed).choice (device-independent, reproducible)."""
    xt, is_np = check_matrix(x)
    n_keep = _check_keep(n_keep, xt.shape[0])
    seed = check_int(seed, "seed", 0)
    pick = np.random.Generator(np.random.PCG64(seed)).choice(xt.shape[0], n_keep, replace=False)
    return _keep_rows(xt, is_np, torch.from_numpy(pick.astype(np.int64)))


def unguided_merge(x, *, windows, ratio, grid=None, threshold=None) -> MergeResult:
    """ToMe-style merge: LightKV's windowed bipartite merge with all weights 1."""
    return lightkv_merge(x, None, windows=windows, ratio=ratio, grid=grid, threshold=threshold)


def fastv_topk(x, scores, *, n_keep) -> MergeResult:
    """FastV style: keep the n_keep tokens with the highest prompt-attention score
    (e.g. guidance_scores at layer K); ties -> lower index."""
    xt, is_np = check_matrix(x)
    n_keep = _check_keep(n_keep, xt.shape[0])
    g = check_scores(scores, xt.shape[0], xt.device)
    if g is None:
        raise ValueError("fastv_topk needs scores")
    return _keep_rows(xt, is_np, _top(g, n_keep))


def dart_prune(x, *, n_keep, n_pivots=8) -> MergeResult:
    """DART style duplication pruning.

    Pivots: the min(n_pivots, n_keep) tokens with the largest L2 norm (ties -> lower
    index). The remaining n_keep - pivots slots go to the non-pivot tokens that duplicate
    the pivots least: the LOWEST max cosine similarity to any pivot (ties -> lower index).
    Cosine as in the merge, in float64.
    """
    xt, is_np = check_matrix(x)
    n = xt.shape[0]
    n_keep = _check_keep(n_keep, n)
    n_piv = min(check_int(n_pivots, "n_pivots", 1), n_keep)
    x64 = xt.to(torch.float64)
    pivots = _top(torch.linalg.vector_norm(x64, dim=1), n_piv)
    rest = torch.ones(n, dtype=torch.bool, device=xt.device)
    rest[pivots] = False
    rest = torch.nonzero(rest).flatten()
    dup = cosine(x64[rest], x64[pivots]).max(dim=1).values
    others = rest[_top(-dup, n_keep - n_piv)]
    return _keep_rows(xt, is_np, torch.cat([pivots, others]))


def pool2x2(x, *, grid) -> MergeResult:
    """2x2 average pooling on the token grid ((rows, cols), or None for the published
    square padding). Cells are in row-major order; an odd last row/column pools only the
    tokens that exist (so does padding). `.kept` is the index of each cell's top-left
    token, `assign` maps every token to its cell, weight = 1 / tokens in the cell."""
    xt, is_np = check_matrix(x)
    n = xt.shape[0]
    rows, cols, pos = grid_layout(n, grid)
    cell = (pos[:, 0] // 2) * ((cols + 1) // 2) + pos[:, 1] // 2
    used, assign = torch.unique(cell, return_inverse=True)  # drop empty (padding) cells
    m = used.numel()
    size = torch.bincount(assign, minlength=m).to(torch.float64)
    weight = 1.0 / size[assign]
    out = torch.zeros(m, xt.shape[1], dtype=torch.float64)
    out.index_add_(0, assign, weight[:, None] * xt.cpu().to(torch.float64))
    # cells are visited in row-major order, so the first token of each is its top-left
    first = torch.full((m,), n, dtype=torch.int64).scatter_reduce(
        0, assign, torch.arange(n), reduce="amin")
    dev = xt.device
    return MergeResult(x=back(out.to(device=dev, dtype=xt.dtype), is_np),
                       kept=back(first.to(dev), is_np), assign=back(assign.to(dev), is_np),
                       weight=back(weight.to(device=dev, dtype=xt.dtype), is_np))


def pool_budget(n: int, *, grid=None) -> int:
    """Rows pool2x2 keeps for n tokens."""
    rows, cols, pos = grid_layout(check_int(n, "n", 1), grid)
    return torch.unique((pos[:, 0] // 2) * ((cols + 1) // 2) + pos[:, 1] // 2).numel()
