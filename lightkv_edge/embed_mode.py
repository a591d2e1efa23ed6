"""LightKV embed mode: merge an image's embeddings before the LLM sees them.

libmtmd turns an image into N embedding rows (the LLM's input space). We merge them in
spatial windows with the native LightKV merge, guided by the prompt, and hand the LLM the
kept rows only, each at its destination's original position. Every layer then holds fewer
vision entries: the KV cache and the prefill shrink by the dropped fraction.

How the prompt guides here (no layer of the LLM has run yet): the published guidance is
the attention the prompt's keys pay to each vision token, normalised over all queries
(lightkv-method.md, "Guidance"). At the input we use the one representation that both the
image rows and the prompt's tokens already share, the LLM input embedding space: queries
are the RMS-normalised image rows and prompt token embeddings, keys the prompt tokens, one
head, scale 1/sqrt(D). A vision row scores high when it matches the question's words
better than the other rows do. Cheap (N x T x D) and model-agnostic.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np


def default_windows(rows: int, cols: int) -> int:
    """Windows per side: about 6 tokens a window side (the paper's 24x24 grid uses 4)."""
    return max(1, min(8, round(min(rows, cols) / 6)))


def _rms_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def prompt_guidance(vision: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Guidance score of each vision row from the prompt's token embeddings.

    g_i = sum_j softmax_over_queries(q . k_j / sqrt(D))[i], queries = vision + text rows,
    keys = text rows; the published normalisation with one head, accumulated in float64
    (a few thousand rows, so the cost is nothing next to the merge)."""
    if len(text) == 0:
        return np.ones(len(vision), dtype=np.float32)
    q = _rms_normalise(np.concatenate([vision, text]).astype(np.float64))
    k = _rms_normalise(text.astype(np.float64))
    logits = q @ k.T / math.sqrt(q.shape[1])          # [N + T, T]
    logits -= logits.max(axis=0, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=0, keepdims=True)                  # softmax over the query axis
    return p[: len(vision)].sum(axis=1).astype(np.float32)


@dataclass
class MergedImage:
    embd: np.ndarray        # [M, D] float32, the rows the LLM will see
    kept: np.ndarray        # [M] original index of each row (ascending)
    n_in: int
    t_merge_ms: float


def merge_image(embd: np.ndarray, grid: tuple[int, int] | None, text_embd: np.ndarray, *,
                keep: float, windows: int | None, guided: bool = True) -> MergedImage:
    """Merge one image's rows down to about `keep` of them.

    One LightKV stage drops at most half of each window (r <= n_w // 2), so keeps below
    0.5 run further stages on what is left, as the paper's progressive schedule does;
    the later stages re-square the survivors (grid=None), the published behaviour."""
    from . import native

    t0 = time.perf_counter()
    n = len(embd)
    target = max(1, math.ceil(keep * n))
    x = np.ascontiguousarray(embd, dtype=np.float32)
    kept = np.arange(n)
    scores = prompt_guidance(x, text_embd) if guided else None
    stage_grid = grid if grid and grid[0] * grid[1] == n else None
    w = windows
    while len(x) > target:
        rows, cols = stage_grid or (math.isqrt(len(x) - 1) + 1,) * 2
        w = min(w or default_windows(rows, cols), rows, cols)
        # r = floor(ratio * n_w) per window; the epsilon keeps an exact product exact
        ratio = min((len(x) - target) / len(x) + 1e-9, 0.5)
        res = native.lightkv_merge(x, scores, windows=w, ratio=ratio, grid=stage_grid)
        if len(res.kept) == len(x):
            if w == 1:
                break  # nothing left to merge
            w = 1      # the remainder is below one token per window: one window
            continue
        if scores is not None:
            # a merged row carries the guidance of everything it absorbed
            scores = np.bincount(res.assign, weights=scores, minlength=len(res.kept))
            scores = scores.astype(np.float32)
        x, kept = res.x, kept[res.kept]
        stage_grid = None
    return MergedImage(x, kept, n, (time.perf_counter() - t0) * 1e3)


# -- baselines at the same budget (for the benchmark; they need the PyTorch reference) ---
METHODS = ("lightkv", "unguided", "random", "fastv", "dart", "pool")


def reduce_image(embd: np.ndarray, grid: tuple[int, int] | None, text_embd: np.ndarray, *,
                 keep: float, windows: int | None, method: str = "lightkv",
                 seed: int = 0) -> MergedImage:
    """Cut one image's rows to about `keep` of them with `method`:
    lightkv (guided merge), unguided (the same merge, all weights 1, ToMe style), random
    (seeded drop), fastv (top-k by the prompt guidance score), dart (duplication
    pruning), pool (2x2 average pooling: its budget is fixed at about a quarter)."""
    if method in ("lightkv", "unguided"):
        return merge_image(embd, grid, text_embd, keep=keep, windows=windows,
                           guided=method == "lightkv")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    from . import reference as ref

    t0 = time.perf_counter()
    n = len(embd)
    x = np.ascontiguousarray(embd, dtype=np.float32)
    n_keep = max(1, math.ceil(keep * n))
    grid = grid if grid and grid[0] * grid[1] == n else None
    if method == "random":
        res = ref.random_drop(x, n_keep=n_keep, seed=seed)
    elif method == "fastv":
        res = ref.fastv_topk(x, prompt_guidance(x, text_embd), n_keep=n_keep)
    elif method == "dart":
        res = ref.dart_prune(x, n_keep=n_keep)
    else:
        res = ref.pool2x2(x, grid=grid)
    return MergedImage(np.asarray(res.x, dtype=np.float32), np.asarray(res.kept), n,
                       (time.perf_counter() - t0) * 1e3)
