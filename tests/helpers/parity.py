"""Parity of the native (ggml, float32) merge with the PyTorch reference (float64).

Used by tests/test_native_*.py and scripts/parity_native.py (test code: the runtime package
never imports torch).

What must match, and how closely (`check_merge`):
- Every merge decision whose float64 margin is larger than the float32 cosine error bound
  `cos_tol(D)` must be taken exactly as in the reference. A decision closer than that is a
  *near tie* that float32 may legitimately decide the other way: either side is accepted,
  but the side taken must still be within the tolerance of the best one (a source may only
  go to a destination whose float64 cosine is within cos_tol of its best). Nothing is
  skipped: every case is checked, and the caller can assert how many decisions were
  checked strictly (`Report.checked`) and how many were near ties (`Report.tolerated`).
- Given the decisions the native code took, `x` and `weight` are compared with the float64
  reference aggregation of *those* decisions: `weight` to 1 float32 ulp (both are float64
  weights rounded to float32; sums may be added in another order); rows that are not merged
  are exact copies, bit for bit; a merged row is a sum of g products w_i x_i computed in
  float32, whose error is bounded by (g + 2) u sum_i |w_i x_i| (u = 2^-24: one rounding per
  weight, per product, per add; the reference rounds its float64 result to float32 once
  more); we allow twice that.

The decisions of one window (tokens by ascending index: even positions sources, odd ones
destinations; r = budget(n_w, ratio)):
  (a) for each source, whether it merges: it is among the r best-scoring sources and (with
      a threshold) its score is >= the threshold. Margin: the distance of its score to the
      top-r boundary (the r-th and (r+1)-th best scores) and to the threshold.
  (b) for each merging source, its destination: the best cosine. Margin: best minus
      second-best cosine.

Near ties. A float32 cosine a.b / (|a||b| + 1e-8) over D features is off from the float64
value by at most about D u in relative terms for each of the dot product and the two norms
(sequential summation, the worst case over backends: the CPU's blocked SIMD sums and GPU
tree sums do better). `cos_tol(D) = 4 (D + 8) u` covers all three plus the division.
Exact ties are not near ties when they are *structural*: the tied vectors are bitwise
identical (duplicate tokens) or zero, so float32 ties exactly too and the tie rule (lower
index) must decide, natively as in the reference; those decisions are checked strictly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

U = 2.0 ** -24


def cos_tol(d: int) -> float:
    return 4.0 * (d + 8) * U


@dataclass
class Report:
    """What check_merge found. errors: empty when the native result is within the rules.
    checked: decisions compared exactly; tolerated: near ties where either side passes."""
    errors: list[str] = field(default_factory=list)
    checked: int = 0
    tolerated: int = 0
    stats: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


def _same(x: np.ndarray, i: int, j: int) -> bool:
    return bool(np.array_equal(x[i], x[j]))


def _zero(x: np.ndarray, i: int) -> bool:
    return not bool(np.any(x[i]))


def _structural(x: np.ndarray, a: int, b: int) -> bool:
    """a and b tie exactly in float32 as in float64: identical vectors, or both zero."""
    return _same(x, a, b) or (_zero(x, a) and _zero(x, b))


def window_of(n, windows, grid=None, positions=None) -> np.ndarray:
    """[n] window id of every token (positions: [n, 2] on the original grid `grid`)."""
    from lightkv_edge.reference.merge import grid_layout, window_ids

    if positions is None:
        rows, cols, pos = grid_layout(n, grid)
    else:
        (rows, cols), pos = grid, torch.as_tensor(np.asarray(positions, dtype=np.int64))
    return window_ids(pos, rows, cols, windows).numpy()


def native_dst_of(nat, n: int, errors: list[str]) -> np.ndarray | None:
    """The token each input token merged into, read from the native kept/assign."""
    kept, assign = np.asarray(nat.kept), np.asarray(nat.assign)
    if assign.shape != (n,) or kept.ndim != 1 or kept.size == 0:
        errors.append(f"kept/assign shapes {kept.shape} {assign.shape} for {n} tokens")
        return None
    if np.any(np.diff(kept) <= 0) or kept[0] < 0 or kept[-1] >= n:
        errors.append("kept is not an ascending list of token indices")
        return None
    if np.any(assign < 0) or np.any(assign >= kept.size):
        errors.append("assign points outside the output rows")
        return None
    dst_of = kept[assign]
    if not np.array_equal(dst_of[kept], kept):
        errors.append("a kept token is assigned to another row")
        return None
    return dst_of


def check_merge(nat, x, scores, *, windows, ratio, grid=None, threshold=None, positions=None,
                tol=None) -> Report:
    """Compare a native MergeResult with the float64 reference under the rules above."""
    from lightkv_edge.reference.merge import aggregate, budget, cosine

    x = np.asarray(x, dtype=np.float32)
    n, d = x.shape
    tol = cos_tol(d) if tol is None else tol
    rep = Report()
    dst_of = native_dst_of(nat, n, rep.errors)
    if dst_of is None:
        return rep
    x64 = torch.from_numpy(x.astype(np.float64))
    win = window_of(n, windows, grid, positions)
    for w in np.unique(win).tolist():
        idx = np.nonzero(win == w)[0]                       # ascending
        src, dst = idx[0::2], idx[1::2]
        r = budget(idx.size, ratio)
        moved = dst_of[idx] != idx
        if r == 0:
            if moved.any():
                rep.errors.append(f"window {w}: merges although its budget is 0")
            rep.checked += len(src)
            continue
        if np.any(dst_of[dst] != dst):
            rep.errors.append(f"window {w}: a destination was merged away")
            continue
        sim = cosine(x64[src], x64[dst]).numpy()            # [n_src, n_dst] float64
        best = sim.max(axis=1)
        order = np.argsort(-best, kind="stable")            # ties: lower source first
        top = np.zeros(len(src), bool)
        top[order[:r]] = True
        ref_merges = top if threshold is None else top & (best >= threshold)
        nat_merges = dst_of[src] != src
        hi = best[order[r]] if r < len(src) else -np.inf    # best score left out
        lo = best[order[r - 1]]                             # worst score taken
        for s in range(len(src)):
            # (a) does source s merge?
            near = []
            if r < len(src):  # sources on the other side of the top-r boundary within tol
                other = order[r:] if top[s] else order[:r]
                near = other[np.abs(best[s] - best[other]) < tol]
                near = [o for o in near if not _structural(x, src[s], src[o])]
            at_threshold = threshold is not None and abs(best[s] - threshold) < tol and \
                (top[s] or lo - best[s] < tol)
            if near or at_threshold:
                rep.tolerated += 1
            else:
                rep.checked += 1
                if nat_merges[s] != ref_merges[s]:
                    rep.errors.append(
                        f"window {w}: source {src[s]} {'merges' if nat_merges[s] else 'stays'} "
                        f"natively but {'merges' if ref_merges[s] else 'stays'} in the reference "
                        f"(score {best[s]:.9g}, top-{r} boundary {lo:.9g}/{hi:.9g}, "
                        f"threshold {threshold})")
                    continue
            if not nat_merges[s]:
                continue
            # (b) where does it go?
            j = np.searchsorted(dst, dst_of[src[s]])
            if j >= len(dst) or dst[j] != dst_of[src[s]]:
                rep.errors.append(f"window {w}: source {src[s]} merged into token "
                                  f"{dst_of[src[s]]}, not a destination of its window")
                continue
            ref_j = int(np.nonzero(sim[s] == best[s])[0][0])  # lowest index among exact ties
            cands = np.nonzero(best[s] - sim[s] < tol)[0]
            if _zero(x, src[s]) or all(_same(x, dst[ref_j], dst[c]) for c in cands):
                rep.checked += 1  # a clear best, or only structural ties: the tie rule decides
                if j != ref_j:
                    rep.errors.append(f"window {w}: source {src[s]} merged into {dst[j]}, "
                                      f"the reference into {dst[ref_j]}")
            else:
                rep.tolerated += 1
                if best[s] - sim[s, j] >= tol:
                    rep.errors.append(f"window {w}: source {src[s]} merged into {dst[j]} "
                                      f"(cosine {sim[s, j]:.9g}), best {best[s]:.9g} is "
                                      f"further than {tol:.2g}")
        if threshold is None and nat_merges.sum() != r:
            rep.errors.append(f"window {w}: {nat_merges.sum()} sources merge, budget {r}")
        elif nat_merges.sum() > r:
            rep.errors.append(f"window {w}: {nat_merges.sum()} sources merge, budget {r}")
    if rep.errors:
        return rep
    # values: the float64 aggregation of the decisions the native code took
    g = None if scores is None else torch.from_numpy(np.asarray(scores, dtype=np.float64))
    out, kept, assign, weight = aggregate(torch.from_numpy(x), g, torch.from_numpy(dst_of))
    ref = _Result(x=out.to(torch.float32).numpy(), kept=kept.numpy(), assign=assign.numpy(),
                  weight=weight.numpy())
    rep.errors += compare(nat, ref, x, rep.stats)
    return rep


@dataclass
class _Result:
    x: np.ndarray
    kept: np.ndarray
    assign: np.ndarray
    weight: np.ndarray


def compare(nat, ref, x, stats: dict | None = None) -> list[str]:
    """Differences between a native and a reference result taking the same decisions,
    beyond the stated tolerance. stats (optional) receives 'bound_ratio': the largest
    |native - reference| / bound over the merged rows (<= 1 passes), and 'max_abs_err'."""
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
    if stats is not None:
        stats.setdefault("bound_ratio", 0.0)
        stats.setdefault("max_abs_err", 0.0)
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


def check_case(case: dict, backend=None, force_cpu_ops=None) -> Report:
    """Run one random case natively and check it against the reference."""
    from lightkv_edge import native

    kw = {k: case[k] for k in ("windows", "ratio", "grid", "threshold")}
    nat = native.lightkv_merge(case["x"], case["scores"], backend=backend,
                               _force_cpu_ops=force_cpu_ops, **kw)
    return check_merge(nat, case["x"], case["scores"], **kw)
