"""Parity of the native (ggml, float32) merge with the PyTorch reference (float64).

Used by tests/test_native_merge.py and scripts/parity_native.py.

What must match, and how closely:
- `kept` and `assign` identically, except in cases with a *near tie* that float32 may
  legitimately decide the other way (see `ambiguity`); such cases are skipped, never
  the assertion loosened.
- `weight` to 1 float32 ulp (both are float64 weights rounded to float32; the sums may be
  added in another order).
- `x`: rows that are not merged are exact copies, bit for bit. A merged row is a sum of g
  products w_i x_i computed in float32 (weights rounded to float32): its error is bounded
  by (g + 2) u sum_i |w_i x_i| (u = 2^-24: one rounding per weight, per product, per add;
  the reference rounds its float64 result to float32 once more); we allow twice that.

Near ties. A float32 cosine a.b / (|a||b| + 1e-8) over D features is off from the float64
value by at most about D u in relative terms for each of the dot product and the two norms
(sequential summation, the worst case over backends: the CPU's blocked SIMD sums and GPU
tree sums do better). `cos_tol(D) = 4 (D + 8) u` covers all three plus the division. A case
is ambiguous when, in the float64 reference, any decision is closer than that:
  (a) a merging source's best and second-best destination,
  (b) the r-th and (r+1)-th source score of a window (who is in the top r),
  (c) a top-r source's score and the threshold.
Exact ties are not ambiguous when they are *structural*: the tied vectors are bitwise
identical (duplicate tokens) or zero, so float32 ties exactly too and the tie rule (lower
index) must decide, natively as in the reference.
"""
from __future__ import annotations

import math

import numpy as np
import torch

U = 2.0 ** -24


def cos_tol(d: int) -> float:
    return 4.0 * (d + 8) * U


def _same(x: np.ndarray, i: int, j: int) -> bool:
    return bool(np.array_equal(x[i], x[j]))


def _zero(x: np.ndarray, i: int) -> bool:
    return not bool(np.any(x[i]))


def ambiguity(x, windows, ratio, grid=None, threshold=None, tol=None, positions=None) -> str | None:
    """None if float32 must reproduce the reference's kept/assign exactly, else the reason.
    positions: None, or [N, 2] (row, col) of every token on the original grid `grid` (a
    later stage of a progressive schedule: true 2D windows of the original grid)."""
    from lightkv_edge.reference.merge import budget, cosine, grid_layout, window_ids

    x = np.asarray(x, dtype=np.float32)
    n, d = x.shape
    tol = cos_tol(d) if tol is None else tol
    x64 = torch.from_numpy(x.astype(np.float64))
    if positions is None:
        rows, cols, pos = grid_layout(n, grid)
    else:
        (rows, cols), pos = grid, torch.as_tensor(np.asarray(positions, dtype=np.int64))
    win = window_ids(pos, rows, cols, windows)
    for w in torch.unique(win).tolist():
        idx = torch.nonzero(win == w).flatten()
        r = budget(idx.numel(), ratio)
        if r == 0:
            continue
        src, dst = idx[0::2].numpy(), idx[1::2].numpy()
        sim = cosine(x64[src], x64[dst]).numpy()
        best = sim.max(axis=1)
        order = np.argsort(-best, kind="stable")
        chosen = order[:r]
        # (c) threshold
        if threshold is not None:
            for s in chosen:
                if abs(best[s] - threshold) < tol:
                    return f"window {w}: source {src[s]} scores {best[s]:.9g}, threshold {threshold}"
            merging = [s for s in chosen if best[s] >= threshold]
        else:
            merging = list(chosen)
        # (a) best vs second-best destination of the merging sources
        for s in merging:
            if _zero(x, src[s]):
                continue  # all cosines exactly 0: a structural tie
            near = np.nonzero(best[s] - sim[s] < tol)[0]
            if near.size > 1:
                j0 = near[0]
                if not all(_same(x, dst[j0], dst[j]) for j in near[1:]) and \
                        not (best[s] == 0 and all(_zero(x, dst[j]) or sim[s, j] == 0 for j in near)):
                    return f"window {w}: source {src[s]} has destinations within {tol:.2g}"
        # (b) the top-r boundary
        if r < len(src):
            lo, hi = best[order[r - 1]], best[order[r]]
            if lo - hi < tol:
                inside = [s for s in order[:r] if best[s] - hi < tol]
                outside = [s for s in order[r:] if lo - best[s] < tol]
                for a in inside:
                    for b in outside:
                        if not (_same(x, src[a], src[b]) or (_zero(x, src[a]) and _zero(x, src[b]))):
                            return (f"window {w}: sources {src[a]} and {src[b]} score within "
                                    f"{tol:.2g} at the top-{r} boundary")
    return None


def compare(nat, ref, x, stats: dict | None = None) -> list[str]:
    """Differences between a native and a reference result beyond the stated tolerance.
    stats (optional) receives 'bound_ratio': the largest |native - reference| / bound over
    the merged rows (<= 1 passes), and 'max_abs_err'."""
    x = np.asarray(x, dtype=np.float32)
    errs = []
    rk, ra = np.asarray(ref.kept), np.asarray(ref.assign)
    if nat.kept.shape != rk.shape or not np.array_equal(nat.kept, rk):
        errs.append(f"kept differ: {nat.kept.shape[0]} vs {rk.shape[0]} rows")
        return errs
    if not np.array_equal(nat.assign, ra):
        bad = np.nonzero(nat.assign != ra)[0]
        errs.append(f"assign differs at {bad.size} tokens, first {bad[:5].tolist()}")
        return errs
    rw = np.asarray(ref.weight, dtype=np.float32)
    if not np.allclose(nat.weight, rw, rtol=2 * U, atol=0):
        errs.append(f"weights differ by up to {np.max(np.abs(nat.weight - rw)):.3g}")
    rx = np.asarray(ref.x)
    if nat.x.shape != rx.shape or nat.x.dtype != np.float32:
        errs.append(f"x shape/dtype {nat.x.shape} {nat.x.dtype} vs {rx.shape}")
        return errs
    m = rk.shape[0]
    size = np.bincount(ra, minlength=m)
    single = size == 1
    if not np.array_equal(nat.x[single], rx[single]):
        errs.append("unmerged rows are not exact copies")
    if (~single).any():
        w64 = np.asarray(ref.weight, dtype=np.float64)
        mag = np.zeros((m, x.shape[1]), np.float64)
        np.add.at(mag, ra, np.abs(w64[:, None] * x.astype(np.float64)))
        bound = 2.0 * (size[:, None] + 2) * U * mag + 1e-37
        diff = np.abs(nat.x.astype(np.float64) - rx.astype(np.float64))
        if stats is not None:
            stats["bound_ratio"] = float(np.max((diff / bound)[~single]))
            stats["max_abs_err"] = float(np.max(diff))
        over = (diff > bound) & (~single)[:, None]
        if over.any():
            i, j = np.argwhere(over)[0]
            errs.append(f"merged row {i} col {j}: |{nat.x[i, j]} - {rx[i, j]}| > {bound[i, j]:.3g}")
    return errs


def random_case(rng: np.random.Generator, max_n=4096, max_d=4096, max_work=3e7) -> dict:
    """A random merge case (shapes, parameters, data) whose similarity work
    (sum over windows of n_src * n_dst * D) stays under max_work."""
    while True:
        if rng.random() < 0.5:
            n = int(rng.integers(1, max_n + 1))
            grid = None
            side = math.isqrt(n) + (math.isqrt(n) ** 2 < n)
            rows = cols = side
        else:
            rows = int(rng.integers(1, 65))
            cols = int(rng.integers(1, max(2, max_n // rows) + 1))
            cols = min(cols, max_n // rows)
            n = rows * cols
            grid = (rows, cols)
        windows = int(rng.integers(1, min(8, rows, cols) + 1))
        d = int(min(max_d, 2 ** rng.uniform(0, math.log2(max_d))))
        per_window = n / windows ** 2
        if (per_window / 2) ** 2 * d * windows ** 2 <= max_work and n * d <= 4e6:
            break
    ratio = float(rng.choice([0.0, 0.1, 0.25, 0.29, 0.3, 0.5, 0.55, 0.7, 0.9, rng.uniform(0, 0.9)]))
    x = rng.standard_normal((n, d)).astype(np.float32) * np.float32(10.0 ** rng.integers(-3, 4))
    if n > 2 and rng.random() < 0.3:  # duplicate tokens: exact ties that must follow the tie rule
        k = int(rng.integers(1, n // 2 + 1))
        x[rng.integers(0, n, k)] = x[rng.integers(0, n, k)]
    if n > 1 and rng.random() < 0.1:
        x[rng.integers(0, n, max(1, n // 10))] = 0.0
    scores = None
    if rng.random() < 0.6:
        scores = rng.random(n).astype(np.float32)
        if rng.random() < 0.3:
            scores[rng.random(n) < 0.5] = 0.0
    threshold = None if rng.random() < 0.7 else float(rng.uniform(-0.2, 0.6))
    return dict(x=x, scores=scores, windows=windows, ratio=ratio, grid=grid, threshold=threshold)


def check_case(case: dict, backend=None, force_cpu_ops=None, stats: dict | None = None) -> tuple[str, str]:
    """('pass' | 'skip' | 'fail', detail) for one case."""
    from lightkv_edge import native
    from lightkv_edge.reference import lightkv_merge as ref_merge

    kw = {k: case[k] for k in ("windows", "ratio", "grid", "threshold")}
    why = ambiguity(case["x"], **kw)
    if why is not None:
        return "skip", why
    ref = ref_merge(case["x"], case["scores"], **kw)
    nat = native.lightkv_merge(case["x"], case["scores"], backend=backend,
                               _force_cpu_ops=force_cpu_ops, **kw)
    errs = compare(nat, ref, case["x"], stats)
    return ("fail", "; ".join(errs)) if errs else ("pass", "")
