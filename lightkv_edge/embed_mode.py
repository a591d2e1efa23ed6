"""LightKV embed mode: merge an image's embeddings before the LLM sees them.

libmtmd turns an image into N embedding rows (the LLM's input space). We merge them in
spatial windows with the native LightKV merge, guided by the prompt, and hand the LLM the
kept rows only, each at its destination's original position. Every layer then holds fewer
vision entries: the KV cache and the prefill shrink by the dropped fraction.

How the prompt guides here: the published guidance is the attention logits of one layer,
softmax over the QUERY axis, vision-query x text-key block, summed over heads and text keys
(docs/method.md, "Guidance"). Before the LLM has run we take the first layer's own
attention: its input RMS norm, Q and K projections (read from the text model's GGUF) are
applied to the image rows and to the prompt's token embeddings, and the native guidance
graph scores them. Position-free (no RoPE): at the input the rotation would only add a
relative-position bias, while the merge asks which image rows match the question. On the
embedded model this ranks the asked object's tokens far above the rest (AUC 0.85 on 192
held-out questions that name one object), where a plain similarity of input embeddings
was anti-correlated (AUC 0.26): a model's image and word embeddings need not share directions, its first
layer's Q/K is trained to compare them.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np


def default_windows(rows: int, cols: int) -> int:
    """Windows per side: about 6 tokens a window side (the paper's 24x24 grid uses 4)."""
    return max(1, min(8, round(min(rows, cols) / 6)))


class FirstLayerQK:
    """Layer 0's attention input of a llama.cpp text model (norm, Q and K projections),
    read once from its GGUF and dequantized, for guidance before the LLM runs."""

    def __init__(self, gguf_path):
        from .gguf_file import field, has_tensor, tensor_rows
        arch = field(gguf_path, "general.architecture")
        self.n_head = int(field(gguf_path, f"{arch}.attention.head_count"))
        self.n_head_kv = int(field(gguf_path, f"{arch}.attention.head_count_kv")
                             or self.n_head)
        self.eps = float(field(gguf_path, f"{arch}.attention.layer_norm_rms_epsilon") or 1e-6)
        need = ("blk.0.attn_norm.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight")
        if not all(has_tensor(gguf_path, n) for n in need):
            raise ValueError(f"{gguf_path} has no separate layer-0 attn_norm/attn_q/attn_k")
        self.norm = tensor_rows(gguf_path, need[0])
        self.wq, self.wk = tensor_rows(gguf_path, need[1]), tensor_rows(gguf_path, need[2])
        bias = {n: tensor_rows(gguf_path, f"blk.0.attn_{n}.bias")
                if has_tensor(gguf_path, f"blk.0.attn_{n}.bias") else 0 for n in "qk"}
        self.bq, self.bk = bias["q"], bias["k"]
        self.head_dim = self.wq.shape[0] // self.n_head

    def qk(self, x: np.ndarray):
        """q [H, S, d], k [H_kv, S, d] of rows x [S, D]."""
        from threadpoolctl import threadpool_limits
        h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.norm
        # numpy's BLAS threads would fight llama.cpp's and the merge's spinning ggml
        # threads for the same cores (measured: merges stalled 2-3x): one BLAS thread
        with threadpool_limits(limits=1, user_api="blas"):
            q = (h @ self.wq.T + self.bq).reshape(len(x), self.n_head, self.head_dim)
            k = (h @ self.wk.T + self.bk).reshape(len(x), self.n_head_kv, self.head_dim)
        return (np.ascontiguousarray(q.transpose(1, 0, 2), dtype=np.float32),
                np.ascontiguousarray(k.transpose(1, 0, 2), dtype=np.float32))


def prompt_guidance(vision: np.ndarray, text: np.ndarray, layer: FirstLayerQK) -> np.ndarray:
    """Guidance of each vision row from the prompt's token embeddings through the first
    layer's Q/K: queries = all rows (vision + text), keys = text rows, the published
    normalisation (softmax over the query axis), summed over heads and text keys."""
    from . import native
    if len(text) == 0:
        return np.ones(len(vision), dtype=np.float32)
    q, k = layer.qk(np.concatenate([vision, text]).astype(np.float32))
    n = len(vision)
    return native.guidance_scores_from_qk(q, k, np.arange(n), np.arange(n, n + len(text)))


@dataclass
class MergedImage:
    embd: np.ndarray        # [M, D] float32, the rows the LLM will see
    kept: np.ndarray        # [M] original index of each row (ascending)
    n_in: int
    t_merge_ms: float


def merge_image(embd: np.ndarray, grid: tuple[int, int] | None, text_embd: np.ndarray, *,
                keep: float, windows: int | None,
                layer: FirstLayerQK | None = None) -> MergedImage:
    """Merge one image's rows down to about `keep` of them, guided by the prompt through
    `layer` (None: unguided, all weights 1).

    One LightKV stage drops at most half of each window (r <= n_w // 2), so keeps below
    0.5 run further stages on what is left, as the paper's progressive schedule does.
    Unlike the published code (which re-squares the shortened sequence), every stage cuts
    true 2D windows of the original grid."""
    from . import native

    t0 = time.perf_counter()
    n = len(embd)
    target = max(1, math.ceil(keep * n))
    x = np.ascontiguousarray(embd, dtype=np.float32)
    kept = np.arange(n)
    scores = None if layer is None else prompt_guidance(x, text_embd, layer)
    # every stage cuts windows of the ORIGINAL grid (true 2D windows, not a re-squared
    # sequence): the survivors keep their original (row, col)
    if grid and grid[0] * grid[1] == n:
        rows, cols = grid
    else:
        rows = cols = math.isqrt(n - 1) + 1     # the published square padding
    w = windows
    while len(x) > target:
        w = min(w or default_windows(rows, cols), rows, cols)
        # r = floor(ratio * n_w) per window; the epsilon keeps an exact product exact
        ratio = min((len(x) - target) / len(x) + 1e-9, 0.5)
        positions = np.stack([kept // cols, kept % cols], axis=1)
        res = native.lightkv_merge(x, scores, windows=w, ratio=ratio, grid=(rows, cols),
                                   positions=positions)
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
    return MergedImage(x, kept, n, (time.perf_counter() - t0) * 1e3)


# -- baselines at the same budget (for the benchmark; they need the PyTorch reference) ---
# LightKV variants that keep what the prompt asks for (docs/merge-variants.md), from the
# PyTorch reference until the native port: name -> (reference function, its settings)
VARIANTS = {
    "lightkv-protect": ("protected_reduce", {"protect": 1.0, "mode": "receive"}),
    "lightkv-absorb": ("absorb_reduce", {}),
}
METHODS = ("lightkv", "unguided", "random", "fastv", "dart", "pool", *VARIANTS)
GUIDED_METHODS = ("lightkv", "fastv", *VARIANTS)   # the ones that need the prompt's guidance


def reduce_image(embd: np.ndarray, grid: tuple[int, int] | None, text_embd: np.ndarray, *,
                 keep: float, windows: int | None, method: str = "lightkv",
                 layer: FirstLayerQK | None = None, seed: int = 0) -> MergedImage:
    """Cut one image's rows to about `keep` of them with `method`:
    lightkv (guided merge), unguided (the same merge, all weights 1, ToMe style), random
    (seeded drop), fastv (top-k by the prompt guidance score), dart (duplication
    pruning), pool (2x2 average pooling: its budget is fixed at about a quarter), and the
    LightKV variants of VARIANTS (lightkv-protect, lightkv-absorb: the prompt's top tokens
    are kept and the rest is merged into them; docs/merge-variants.md)."""
    if method in ("lightkv", "unguided"):
        return merge_image(embd, grid, text_embd, keep=keep, windows=windows,
                           layer=layer if method == "lightkv" else None)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    from . import reference as ref

    t0 = time.perf_counter()
    n = len(embd)
    x = np.ascontiguousarray(embd, dtype=np.float32)
    n_keep = max(1, math.ceil(keep * n))
    grid = grid if grid and grid[0] * grid[1] == n else None
    if method in VARIANTS:
        name, settings = VARIANTS[method]
        res = getattr(ref.variants, name)(x, prompt_guidance(x, text_embd, layer), keep=keep,
                                          grid=grid, windows=windows, **settings)
    elif method == "random":
        res = ref.random_drop(x, n_keep=n_keep, seed=seed)
    elif method == "fastv":
        res = ref.fastv_topk(x, prompt_guidance(x, text_embd, layer), n_keep=n_keep)
    elif method == "dart":
        res = ref.dart_prune(x, n_keep=n_keep)
    else:
        res = ref.pool2x2(x, grid=grid)
    return MergedImage(np.asarray(res.x, dtype=np.float32), np.asarray(res.kept), n,
                       (time.perf_counter() - t0) * 1e3)
