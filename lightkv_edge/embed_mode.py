"""LightKV embed mode: merge an image's embeddings before the LLM sees them.

libmtmd turns an image into N embedding rows (the LLM's input space). We merge them in
spatial windows with the native LightKV merge, guided by the prompt, and hand the LLM the
kept rows only, each at its destination's original position. Every layer then holds fewer
vision entries: the KV cache and the prefill shrink by the dropped fraction.

How the prompt guides here: the published guidance is the attention logits of one layer,
softmax over the QUERY axis, vision-query x text-key block, summed over heads and text keys
(docs/method.md, "Guidance"). Before the LLM has run we take the first layer's own attention input:
native.GuidanceModel reads its RMS norm and Q/K projections from the text model's GGUF (in
their stored, quantized type) and runs, in one ggml graph on the merge's backend, the
prompt's token embeddings and the image rows through them and the guidance after them.
Position-free (no RoPE): at the input the rotation would only add a relative-position
bias, while the merge asks which image rows match the question. On the embedded model this
ranks the asked object's tokens far above the rest (AUC 0.85 on 192 held-out questions that
name one object), where a plain similarity of input embeddings was anti-correlated (AUC
0.26): a model's image and word embeddings need not share directions, its first layer's
Q/K is trained to compare them.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np


def default_windows(rows: int, cols: int) -> int:
    """Windows per side: about 6 tokens a window side (the paper's 24x24 grid uses 4)."""
    return max(1, min(8, round(min(rows, cols) / 6)))


def prompt_guidance(vision: np.ndarray, text_tokens, layer) -> np.ndarray:
    """Guidance of each vision row from the prompt's token ids through the first layer
    (`layer`: a native.GuidanceModel): queries = all rows (vision + text), keys = text rows,
    the published normalisation (softmax over the query axis), summed over heads and text
    keys. No prompt tokens: all ones (unguided)."""
    if len(text_tokens) == 0:
        return np.ones(len(vision), dtype=np.float32)
    return layer.scores(vision, text_tokens)


@dataclass
class MergedImage:
    embd: np.ndarray        # [M, D] float32, the rows the LLM will see
    kept: np.ndarray        # [M] original index of each row (ascending)
    n_in: int
    t_merge_ms: float
    # what --show-merge draws: the row of every original token (-1: dropped), the prompt's
    # guidance of every original token (None: unguided), the grid (rows, cols) the windows
    # were cut on and the first stage's windows per side (None: not a windowed merge)
    assign: np.ndarray | None = None
    scores: np.ndarray | None = None
    grid: tuple[int, int] | None = None
    windows: int | None = None
    # the (row, col) of every original token on the grid where they are no raster (None:
    # raster order; families.row_cells)
    cells: np.ndarray | None = None


def protected_count(protect: float, target: int, mode: str = "receive") -> int:
    """Tokens LightKV-protect shields for a budget of `target` rows: round(protect * target),
    at most target (mode "receive") or target - 1 (mode "keep"), as the reference's rule."""
    if not (isinstance(protect, (int, float)) and 0.0 <= float(protect) <= 1.0):
        raise ValueError(f"protect must be in [0, 1], got {protect!r}")
    return min(round(float(protect) * target), target - (mode == "keep"))


def merge_image(embd: np.ndarray, grid: tuple[int, int] | None, text_tokens, *,
                keep: float, windows: int | None, layer=None, protect: float = 0.0,
                protect_mode: str = "receive", cells: np.ndarray | None = None) -> MergedImage:
    """Merge one image's rows down to about `keep` of them, guided by the prompt's token ids
    `text_tokens` through `layer` (a native.GuidanceModel; None: unguided, all weights 1).

    One LightKV stage drops at most half of each window (r <= n_w // 2), so keeps below
    0.5 run further stages on what is left, as the paper's progressive schedule does.
    Unlike the published code (which re-squares the shortened sequence), every stage cuts
    true 2D windows of the original grid.

    protect (LightKV-protect, docs/merge-variants.md): the protected_count(protect, budget)
    rows with the highest guidance, chosen once here, are never merge sources in any stage
    (protect_mode "receive": they still absorb similar tokens; "keep": untouched). 0 is the
    published merge exactly; it needs guidance (a layer).

    cells: None (row i sits at cell i of the grid, raster order), or int [n, 2], the (row,
    col) of every row on the grid (families.row_cells: LLaVA's rows are not a raster)."""
    from . import native

    t0 = time.perf_counter()
    n = len(embd)
    target = max(1, math.ceil(keep * n))
    x = np.ascontiguousarray(embd, dtype=np.float32)
    scores = None if layer is None else prompt_guidance(x, text_tokens, layer)
    if protect_mode not in native.PROTECT_MODES:
        raise ValueError(f"protect_mode must be one of {', '.join(native.PROTECT_MODES)}")
    p = protected_count(protect, target, protect_mode)
    if p and scores is None:
        raise ValueError("protection needs guidance (a layer)")
    # every stage cuts windows of the ORIGINAL grid (true 2D windows, not a re-squared
    # sequence): the survivors keep their original (row, col)
    if grid and grid[0] * grid[1] == n:
        rows, cols = grid
    else:
        rows = cols = math.isqrt(n - 1) + 1     # the published square padding
    # rows that are no raster of the grid (cells: LLaVA's) go to the merge in the raster
    # order of their cells, a permutation of the grid's, and come back in their own order
    order = None
    if cells is not None:
        cells = np.asarray(cells, np.int64)
        at = cells[:, 0] * cols + cells[:, 1] if cells.shape == (n, 2) else None
        if at is None or rows * cols != n or not np.array_equal(np.sort(at), np.arange(n)):
            raise ValueError(f"cells must give each of the {rows}x{cols} grid's cells once")
        order = np.argsort(at)                  # raster cell -> row
    # the whole schedule in one native call: the stages' rows never come back to Python
    res = native.merge_reduce(x if order is None else x[order],
                              scores if order is None or scores is None else scores[order],
                              target=target, windows=windows or default_windows(rows, cols),
                              grid=(rows, cols) if rows * cols == n else None,
                              protect_count=p, protect_mode=protect_mode)
    first_windows = res.stages[0][0] if res.stages else None
    out, kept, assign = res.x, res.kept, res.assign
    if order is not None:
        kept_rows = order[np.asarray(res.kept)]  # the row of each result row
        back = np.argsort(kept_rows)            # result rows by ascending row
        out, kept = np.asarray(res.x)[back], kept_rows[back]
        renum = np.empty(len(back), np.int64)
        renum[back] = np.arange(len(back))
        a = np.asarray(res.assign)
        assign = np.empty(n, np.int64)
        assign[order] = np.where(a >= 0, renum[np.maximum(a, 0)], -1)
    return MergedImage(out, kept, n, (time.perf_counter() - t0) * 1e3, assign=assign,
                       scores=scores, grid=(rows, cols), windows=first_windows, cells=cells)


# -- the native LightKV merges: method -> protected fraction of the budget ----------------
# lightkv-protect (the default): the published merge, but the budget's top-guidance rows
# are never sources (they keep what the prompt asks for and absorb what pruning would
# drop; chosen on the validation split, docs/merge-variants.md); lightkv-paper: the
# published merge (protection 0); unguided: the published merge with equal weights.
DEFAULT_METHOD = "lightkv-protect"
NATIVE_METHODS = {"lightkv-protect": 1.0, "lightkv-paper": 0.0, "unguided": 0.0}

# -- baselines at the same budget (for the benchmark; they need the PyTorch reference) ---
# LightKV variants tried and not chosen (docs/merge-variants.md), from the PyTorch
# reference: name -> (reference function, its settings)
VARIANTS = {
    "lightkv-absorb": ("absorb_reduce", {}),
}
METHODS = (*NATIVE_METHODS, "random", "fastv", "dart", "pool", *VARIANTS)
# the ones that need the prompt's guidance
GUIDED_METHODS = ("lightkv-protect", "lightkv-paper", "fastv", *VARIANTS)


def reduce_image(embd: np.ndarray, grid: tuple[int, int] | None, text_tokens, *,
                 keep: float, windows: int | None, method: str = DEFAULT_METHOD,
                 layer=None, seed: int = 0, cells: np.ndarray | None = None) -> MergedImage:
    """Cut one image's rows to about `keep` of them with `method`:
    lightkv-protect (guided merge whose top-guidance rows are never sources, the default),
    lightkv-paper (the published guided merge), unguided (the published merge, all weights
    1, ToMe style), random (seeded drop), fastv (top-k by the prompt guidance score), dart
    (duplication pruning), pool (2x2 average pooling: its budget is fixed at about a
    quarter), and the reference variants of VARIANTS (docs/merge-variants.md). The first
    three are native (no torch); the others need the PyTorch reference. cells: the (row,
    col) of every row where they are no raster of the grid (merge_image; the reference
    methods assume a raster)."""
    if method in NATIVE_METHODS:
        return merge_image(embd, grid, text_tokens, keep=keep, windows=windows,
                           layer=layer if method != "unguided" else None,
                           protect=NATIVE_METHODS[method], cells=cells)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    from . import reference as ref

    t0 = time.perf_counter()
    n = len(embd)
    x = np.ascontiguousarray(embd, dtype=np.float32)
    n_keep = max(1, math.ceil(keep * n))
    grid = grid if grid and grid[0] * grid[1] == n else None
    scores = None
    if method in VARIANTS:
        name, settings = VARIANTS[method]
        scores = prompt_guidance(x, text_tokens, layer)
        res = getattr(ref.variants, name)(x, scores, keep=keep, grid=grid, windows=windows,
                                          **settings)
    elif method == "random":
        res = ref.random_drop(x, n_keep=n_keep, seed=seed)
    elif method == "fastv":
        scores = prompt_guidance(x, text_tokens, layer)
        res = ref.fastv_topk(x, scores, n_keep=n_keep)
    elif method == "dart":
        res = ref.dart_prune(x, n_keep=n_keep)
    else:
        res = ref.pool2x2(x, grid=grid)
    return MergedImage(np.asarray(res.x, dtype=np.float32), np.asarray(res.kept), n,
                       (time.perf_counter() - t0) * 1e3, assign=np.asarray(res.assign),
                       scores=scores, grid=grid)
