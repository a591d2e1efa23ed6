#!/usr/bin/env python3
"""Parity sweep of the native LightKV merge and guidance against the PyTorch reference, on a
chosen ggml backend (so it can run on a CUDA/Metal/Vulkan machine as well as on the CPU).

    python scripts/parity_native.py                      # best backend, 200 cases
    python scripts/parity_native.py --backend CUDA0 --cases 500
    python scripts/parity_native.py --backend CUDA0 --force-cpu-ops ARGMAX,STEP,CONCAT
                                                         # exercise the scheduler's CPU fallback

Rules (tests/helpers/parity.py): every merge decision whose float64 margin exceeds the
float32 cosine bound is the reference's; near ties may go either way, to a side within the
bound (counted as "tolerated"); unmerged rows bit-exact; merged rows within the float32
bound of the float64 aggregation of the decisions taken. Every case is checked. Exit
status 1 if any case fails. Needs the repository checkout (the helpers live in tests/)
and torch.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default=None, help="ggml device name (default: best available)")
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-n", type=int, default=4096)
    ap.add_argument("--max-d", type=int, default=4096)
    ap.add_argument("--max-work", type=float, default=3e7,
                    help="per-case similarity work bound (sum of n_src * n_dst * D)")
    ap.add_argument("--force-cpu-ops", default=None,
                    help="comma-separated ggml op names pinned to the CPU backend")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all)")
    args = ap.parse_args()

    import torch

    from lightkv_edge import native
    from lightkv_edge.reference import guidance_scores_from_qk as ref_guidance
    from tests.helpers import parity

    torch.set_num_threads(1)
    native.set_num_threads(args.threads)
    print(f"available backends: {', '.join(native.backends())}")
    probe = native._context(args.backend, args.force_cpu_ops)
    print(f"backend: {probe.name}" + (f" (ops forced to the CPU: {args.force_cpu_ops})"
                                       if args.force_cpu_ops else ""))

    rng = np.random.default_rng(args.seed)
    counts = {"pass": 0, "fail": 0}
    checked = tolerated = 0
    worst_ratio, worst_abs, t_native = 0.0, 0.0, 0.0
    splits = set()
    t0 = time.time()
    for i in range(args.cases):
        case = parity.random_case(rng, args.max_n, args.max_d, args.max_work)
        t1 = time.perf_counter()
        rep = parity.check_case(case, args.backend, args.force_cpu_ops)
        t_native += time.perf_counter() - t1
        counts["pass" if rep.ok else "fail"] += 1
        checked, tolerated = checked + rep.checked, tolerated + rep.tolerated
        worst_ratio = max(worst_ratio, rep.stats.get("bound_ratio", 0.0))
        worst_abs = max(worst_abs, rep.stats.get("max_abs_err", 0.0))
        if rep.ok:
            splits.add(native.last_n_splits(args.backend, args.force_cpu_ops))
        else:
            x = case["x"]
            print(f"FAIL case {i}: N={x.shape[0]} D={x.shape[1]} windows={case['windows']} "
                  f"ratio={case['ratio']} grid={case['grid']} threshold={case['threshold']} "
                  f"guided={case['scores'] is not None}: {'; '.join(rep.errors[:3])}")

    # guidance
    g_worst = 0.0
    for i in range(20):
        h_kv = int(rng.integers(1, 5))
        h = h_kv * int(rng.choice([1, 2, 4]))
        s = int(rng.integers(2, 700))
        dh = int(rng.choice([16, 64, 128]))
        q = rng.standard_normal((h, s, dh)).astype(np.float32)
        k = rng.standard_normal((h_kv, s, dh)).astype(np.float32)
        perm = rng.permutation(s)
        nv = int(rng.integers(1, s))
        v, t = perm[:nv], perm[nv:]
        a = native.guidance_scores_from_qk(q, k, v, t, backend=args.backend)
        b = np.asarray(ref_guidance(q, k, v, t))
        g_worst = max(g_worst, float(np.max(np.abs(a - b) / (np.abs(b) + 1e-6 * h * len(t)))))

    total = args.cases
    print(f"merge parity: {counts['pass']} passed, {counts['fail']} failed of {total} random "
          f"cases (N <= {args.max_n}, D <= {args.max_d}, windows 1..8, ratios 0..0.9, square "
          f"and non-square grids, guided/unguided, thresholds, duplicate tokens); decisions "
          f"checked exactly: {checked}, float32 near ties allowed either way: {tolerated}")
    print(f"merged rows: worst |native - reference| / bound = {worst_ratio:.3f} "
          f"(must be <= 1); worst absolute error {worst_abs:.3g}")
    print(f"backend splits per call seen: {sorted(splits)}")
    print(f"guidance parity: worst relative error {g_worst:.2e} over 20 random cases "
          f"(tolerance 1e-5)")
    print(f"time: {time.time() - t0:.1f} s ({t_native:.1f} s in native + reference checks)")
    ok = counts["fail"] == 0 and g_worst <= 1e-5
    print("RESULT: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
