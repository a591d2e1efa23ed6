"""KV eviction: after a turn's prefill (AirCache's observation window) and while decoding
(LightVLM's decoding stage), the least attended vision KV cells are freed for real.

Importance of a vision cell = the attention it receives from an observation window of
queries (after the prefill: the turn's text rows after its last image; while decoding: the
last N generated tokens), softmax over every cell the query sees, summed over heads,
window queries and the layers read. Each image keeps keep_count(n, keep) of its n cells,
the most important, ties to the earlier cell; the others are freed in every layer with
patch 0004's llama_kv_cells_rm (by index: M-RoPE image cells share their temporal position).
Positions never change. Ground truth: lightkv_edge/reference/evict.py.

How the pieces are read:
- the cell of every row: the context keeps the layer range [0, n_layer) set (patch 0003),
  which is the stock graph but records the KV cell of each token of the last decode;
  the engine decodes the rows itself (no libmtmd helper) and logs them here (CellLog);
- the window's queries: Qcur-<layer> (after RoPE), copied by liblightkv's graph hook
  (native.Capture, set with patch 0007's llama_set_graph_hook: kept as graph outputs and
  copied after the graph, which runs in one piece) into tensors on the lightkv backend,
  switched on only for the window's decodes; they stay there;
- the keys: the live cells' rows of each read layer's K cache, read where llama.cpp keeps
  them (the capture notes the cache tensor Kcur is stored into);
- the scores: one small ggml graph in liblightkv per layer read, on the captured queries
  and those rows (native.Capture.attention_received); only the [cells] scores come back.
The patches cover the llama, qwen2 and qwen2vl graphs; other architectures are refused
when the Evictor is made (before any compute).

Layer-adaptive (adaptive=True, AirCache's layer-wise budget): each layer keeps its own
top-b_l cells of an image, b_l following how flat that layer's importance is
(layer_budgets); the kept sets are nested along depth, so a cell is seen by layers
[0, end): hidden from the deeper ones with patch 0005's llama_kv_cells_set_layers, freed
for real (llama_kv_cells_rm) when no layer keeps it. Later scoring sees, in each layer,
only the cells that layer sees.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from .layer_mode import QueryWindow, _ip, _l, attach_capture, kv_cells_set_layers, llama_cpp


def keep_count(n: int, keep: float) -> int:
    """Cells an image of n keeps: round(keep * n), halves up, at least 1."""
    return max(1, int(math.floor(keep * n + 0.5))) if n > 0 else 0


def check_keep(keep) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float, np.integer, np.floating)) \
            or not math.isfinite(keep) or not 0.0 < keep <= 1.0:
        raise ValueError(f"evict (the kept fraction) must be a number in (0, 1], got {keep!r}")
    return float(keep)


def effective_count(scores: np.ndarray) -> float:
    """exp(entropy) of the scores made a distribution: n when flat, 1 when one cell takes
    everything (a layer that gives nothing counts as flat)."""
    s = np.asarray(scores, np.float64)
    total = s.sum()
    if total <= 0:
        return float(s.size)
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def nonincreasing_fit(w) -> np.ndarray:
    """The least-squares non-increasing sequence nearest w (pool adjacent violators)."""
    means, sizes = [], []
    for x in w:
        means.append(float(x))
        sizes.append(1)
        while len(means) > 1 and means[-2] < means[-1]:
            m2, n2, m1, n1 = means.pop(), sizes.pop(), means.pop(), sizes.pop()
            means.append((m1 * n1 + m2 * n2) / (n1 + n2))
            sizes.append(n1 + n2)
    return np.repeat(means, sizes)


def layer_budgets(per_layer: np.ndarray, keep: float) -> np.ndarray:
    """Cells each layer keeps of an image, from per_layer [L, n] importance: proportional
    to the non-increasing fit of the layers' effective counts (a concentrated layer keeps
    few, a flat one many; b_0 >= b_1 >= ... so the kept sets can nest), L * keep_count(n,
    keep) in all (the layer average keeps what the uniform eviction keeps), each in [1, n];
    integers by largest remainder, ties to the shallower layer."""
    n_layer, n = per_layer.shape
    total = n_layer * keep_count(n, keep)
    w = nonincreasing_fit([effective_count(row) for row in per_layer])
    lo, hi = 0.0, float(n)                 # every w >= 1, so hi * w >= n
    for _ in range(200):                   # bisection: the clipped sum grows with the scale
        mid = (lo + hi) / 2
        if np.clip(mid * w, 1, n).sum() < total:
            lo = mid
        else:
            hi = mid
    t = np.clip(hi * w, 1, n)
    b = np.floor(t).astype(np.int64)
    order = sorted(range(n_layer), key=lambda li: (-(t[li] - b[li]), li))
    b[order[:total - int(b.sum())]] += 1
    if b.sum() != total or b.min() < 1 or b.max() > n or np.any(np.diff(b) > 0):
        raise RuntimeError(f"layer budgets {b.tolist()} do not hold {total} cells")
    return b


def check_every(every) -> int | None:
    if every is None:
        return None
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError("decode_evict (the re-scoring interval) must be an integer >= 1, "
                         f"got {every!r}")
    return int(every)


@dataclass
class CellLog:
    """The KV cells of a conversation, in row order: cell index, temporal position (what
    llama.cpp's causal mask compares) and image id (-1: text); alive: not evicted."""
    cells: list = field(default_factory=list)
    pos: list = field(default_factory=list)
    image: list = field(default_factory=list)
    alive: list = field(default_factory=list)
    end: list = field(default_factory=list)     # seen by layers [0, end); ALL_LAYERS: every

    ALL_LAYERS = 1 << 30

    def add(self, cells, pos, image: int) -> None:
        self.cells += [int(c) for c in cells]
        self.pos += [int(p) for p in pos]
        self.image += [image] * len(cells)
        self.alive += [True] * len(cells)
        self.end += [self.ALL_LAYERS] * len(cells)

    def drop_from(self, n_past: int) -> None:
        """Forget the rows at positions >= n_past (what llama_memory_seq_rm removed)."""
        keep = [i for i, p in enumerate(self.pos) if p < n_past]
        for name in ("cells", "pos", "image", "alive", "end"):
            col = getattr(self, name)
            setattr(self, name, [col[i] for i in keep])

    def live(self):
        idx = np.flatnonzero(np.asarray(self.alive, bool))
        return (idx, np.asarray(self.cells, np.int32)[idx], np.asarray(self.pos, np.int32)[idx],
                np.asarray(self.image, np.int64)[idx])


class Evictor:
    """Eviction on one llama.cpp context (single sequence 0).

    keep: fraction of each image's cells kept, in (0, 1] (1: score, free nothing);
    layers: decoder layers whose attention is summed (default: all);
    window: the last `window` text rows of a turn observe (default: all its rows after its
    last image); decode_every: re-score and evict every N generated tokens (None: never);
    adaptive: the layer-adaptive budget after the prefill (reads every layer; not with
    decode_every)."""

    def __init__(self, model, ctx, *, keep: float, layers=None, window: int | None = None,
                 decode_every: int | None = None, backend=None, adaptive: bool = False):
        self.keep = check_keep(keep)
        self.decode_every = check_every(decode_every)
        self.adaptive = bool(adaptive)
        if self.adaptive and (layers is not None or self.decode_every):
            raise ValueError("the layer-adaptive eviction reads every layer after the prefill: "
                             "it takes neither evict_layers nor decode_evict")
        self.model, self.ctx, self.backend = model, ctx, backend
        self.n_layer = llama_cpp.llama_model_n_layer(model)
        n_embd = llama_cpp.llama_model_n_embd(model)
        self.n_head = llama_cpp.llama_model_n_head(model)
        self.n_head_kv = llama_cpp.llama_model_n_head_kv(model)
        self.head_dim = n_embd // self.n_head
        if layers is None:
            layers = range(self.n_layer)
        layers = sorted(set(int(x) for x in layers))
        if not layers or layers[0] < 0 or layers[-1] >= self.n_layer:
            raise ValueError(f"evict_layers must be in [0, {self.n_layer}), got {layers}")
        self.layers = layers
        if window is not None and (isinstance(window, bool) or
                                   not isinstance(window, (int, np.integer)) or window < 1):
            raise ValueError(f"evict_window must be an integer >= 1, got {window!r}")
        self.window = window
        # eviction frees and restricts the cells of one KV cache: not the sliding-window
        # pair (iSWA) of a model with sliding-window layers, which layer mode handles cache
        # by cache (patch 0003's llama_kv_cells_select) but the cell log here does not
        iswa = _l.llama_model_n_swa(model) > 0 and _l.llama_kv_cells_select(ctx, 1) > 0
        _l.llama_kv_cells_select(ctx, 0)
        if iswa or not _l.llama_set_layer_range(ctx, 0, self.n_layer):
            raise ValueError("KV eviction does not cover this model's architecture or "
                             "memory (the llama, qwen2, qwen2vl and gemma3 graphs with one KV "
                             "cache are patched; not the sliding-window pair)")
        from . import native
        self._q = native.Capture(backend=backend)   # the window's queries, on the backend
        self.log = CellLog()
        self.n_images = 0
        self._gen_pos: list[int] = []       # positions of the tokens generated since scoring
        self.t_score_ms = 0.0
        self.last_budgets: dict[int, list[int]] = {}   # adaptive: image -> b_l, last eviction

    # -- the cells ------------------------------------------------------------------------
    def arm(self) -> None:
        """(Re)set the layer range [0, n_layer) that records cells (layer mode resets it)."""
        _l.llama_set_layer_range(self.ctx, 0, self.n_layer)

    def clear(self) -> None:
        self.log = CellLog()
        self.n_images = 0
        self._gen_pos = []

    def record(self, n: int, pos_t, image: int = -1) -> np.ndarray:
        """After a llama_decode of n rows: log the cells they went to."""
        cells = np.empty(n, np.int32)
        got = _l.llama_get_layer_range_cells(self.ctx, _ip(cells), n)
        if got != n:
            raise RuntimeError("llama.cpp did not report the KV cells of the batch")
        self.log.add(cells, np.asarray(pos_t).reshape(-1)[:n], image)
        return cells

    def new_image(self) -> int:
        self.n_images += 1
        return self.n_images - 1

    def add_cells(self, cells, pos_t, image: int) -> None:
        """Log cells whose indices are known already (layer mode reports them)."""
        self.log.add(cells, pos_t, image)

    # -- the window's queries ---------------------------------------------------------------
    def observe(self, on: bool) -> None:
        """Capture Qcur of the read layers in the following decodes, from none (or stop;
        what was captured stays readable)."""
        if on:
            self._q.reset()
            self._q.want({li: "qc" for li in self.layers})   # queries, and the K cache
            attach_capture(self.ctx, self._q)
        else:
            attach_capture(self.ctx, None)
            self._q.want({})

    def take_queries(self) -> QueryWindow:
        """The queries captured since observe(True), every read layer the same rows."""
        rows = {li: self._q.rows(li) for li in self.layers}
        if not all(rows.values()):
            raise RuntimeError(f"llama.cpp's graph gave no Qcur-{min(rows, key=rows.get)}")
        if len(set(rows.values())) != 1:
            raise RuntimeError(f"the read layers captured different numbers of queries: {rows}")
        return QueryWindow(self._q, rows[self.layers[0]])

    # -- scoring and freeing ------------------------------------------------------------------
    def scores(self, queries: QueryWindow, q_pos) -> tuple[np.ndarray, np.ndarray]:
        """Attention received by every live cell from the window (the last len(q_pos) of
        the captured queries), summed over the read layers -> (indices into the log, scores)."""
        idx, per_layer = self.layer_scores(queries, q_pos)
        return idx, per_layer.sum(axis=0)

    def layer_scores(self, queries: QueryWindow, q_pos):
        """Attention received by every live cell from the window (the last len(q_pos) of
        the captured queries) in each read layer (0 where the layer does not see the cell)
        -> (indices into the log, [layers, cells])."""
        t0 = time.perf_counter()
        idx, cells, pos, _ = self.log.live()
        end = np.asarray(self.log.end, np.int64)[idx]
        q_pos = np.asarray(q_pos, np.int32)
        if not 0 < len(q_pos) <= queries.rows:
            raise ValueError(f"{len(q_pos)} window positions for {queries.rows} captured queries")
        out = np.zeros((len(self.layers), len(cells)), np.float64)
        # the K cache is read by liblightkv's backend, not through llama.cpp: the last
        # decode may still be writing it (asynchronous backends) until the context syncs
        llama_cpp.llama_synchronize(self.ctx)
        for j, li in enumerate(self.layers):
            vis = np.flatnonzero(end > li)          # the cells this layer's softmax spans
            out[j, vis] = queries.capture.attention_received(li, cells[vis], q_pos, pos[vis])
        self.t_score_ms += (time.perf_counter() - t0) * 1e3
        return idx, out

    def evict(self, queries: QueryWindow, q_pos, images=None) -> int:
        """Keep keep_count(n, keep) of the n live cells of each image in `images` (default:
        every image with live cells); returns the number of cells freed."""
        if self.adaptive:
            return self.evict_adaptive(queries, q_pos, images)
        idx, total = self.scores(queries, q_pos)
        img = np.asarray(self.log.image, np.int64)[idx]
        ids = sorted(set(img.tolist()) - {-1}) if images is None else list(images)
        drop = []
        for i in ids:
            rows = np.flatnonzero(img == i)
            k = keep_count(len(rows), self.keep)
            order = np.argsort(-total[rows], kind="stable")    # ties: the earlier cell
            drop += idx[rows[order[k:]]].tolist()
        if not drop:
            return 0
        cells = np.ascontiguousarray([self.log.cells[i] for i in drop], np.int32)
        if not _l.llama_kv_cells_rm(self.ctx, len(cells), _ip(cells)):
            raise RuntimeError("llama.cpp could not free the evicted KV cells")
        for i in drop:
            self.log.alive[i] = False
        return len(drop)

    def evict_adaptive(self, queries: QueryWindow, q_pos, images=None) -> int:
        """Each layer keeps its own top-b_l cells of each image (layer_budgets), nested
        along depth: layer l chooses among the cells layer l-1 kept (ties to the earlier
        cell). A cell kept by layers [0, e) is hidden from the others (patch 0005); kept by
        none, it is freed. Returns the number of cells freed."""
        idx, per_layer = self.layer_scores(queries, q_pos)
        img = np.asarray(self.log.image, np.int64)[idx]
        ids = sorted(set(img.tolist()) - {-1}) if images is None else list(images)
        ends = {}                                      # log index -> layers that keep it
        self.last_budgets = {}
        for i in ids:
            rows = np.flatnonzero(img == i)
            if len(rows) == 0:
                continue
            b = layer_budgets(per_layer[:, rows], self.keep)
            self.last_budgets[i] = b.tolist()
            alive = rows
            e = dict.fromkeys(idx[rows].tolist(), 0)
            for li in range(self.n_layer):
                order = np.argsort(-per_layer[li, alive], kind="stable")   # ties: earlier
                alive = np.sort(alive[order[:b[li]]])
                for r in idx[alive].tolist():
                    e[r] = li + 1
            ends.update(e)
        drop = [r for r, e in ends.items() if e == 0]
        for e in sorted({e for e in ends.values() if 0 < e < self.n_layer}):
            kv_cells_set_layers(self.ctx, [self.log.cells[r] for r, x in ends.items()
                                           if x == e], 0, e)
        for r, e in ends.items():
            if 0 < e < self.n_layer:
                self.log.end[r] = e
        if drop:
            cells = np.ascontiguousarray([self.log.cells[r] for r in drop], np.int32)
            if not _l.llama_kv_cells_rm(self.ctx, len(cells), _ip(cells)):
                raise RuntimeError("llama.cpp could not free the evicted KV cells")
            for r in drop:
                self.log.alive[r] = False
        return len(drop)

    def hidden_cells(self, images=None) -> int:
        """Live vision cells hidden from some layers (kept by the shallower ones only)."""
        idx, _, _, img = self.log.live()
        end = np.asarray(self.log.end, np.int64)[idx]
        sel = img >= 0 if images is None else np.isin(img, images)
        return int(np.sum(sel & (end < self.n_layer)))

    def visible_fraction(self, n_cells: int, images) -> float:
        """Layer average of the visible fraction of `images`' n_cells (before eviction)."""
        idx, _, _, img = self.log.live()
        end = np.minimum(np.asarray(self.log.end, np.int64)[idx], self.n_layer)
        seen = int(end[np.isin(img, images)].sum())
        return seen / (self.n_layer * n_cells) if n_cells else 1.0

    def vision_cells(self, images=None) -> int:
        _, _, _, img = self.log.live()
        return int(np.sum(img >= 0)) if images is None else int(np.isin(img, images).sum())

    # -- while decoding -----------------------------------------------------------------------
    def start_decoding(self) -> None:
        self._gen_pos = []
        if self.decode_every:
            self.observe(True)

    def decoded(self, pos: int) -> int:
        """After a generated token's decode at `pos`: log its cell; every decode_every
        tokens, re-score every image with those tokens' queries (captured on the backend,
        one row a token). Returns cells freed."""
        self.record(1, [pos])
        if not self.decode_every:
            return 0
        self._gen_pos.append(pos)
        if len(self._gen_pos) < self.decode_every:
            return 0
        window = self.take_queries()
        if window.rows != len(self._gen_pos):
            raise RuntimeError(f"{window.rows} queries captured for {len(self._gen_pos)} "
                               "generated tokens")
        freed = self.evict(window, self._gen_pos)
        self._q.reset()
        self._gen_pos = []
        return freed

    def stop_decoding(self) -> None:
        self.observe(False)
        self._gen_pos = []


__all__ = ["Evictor", "CellLog", "keep_count", "check_keep", "check_every", "layer_budgets",
           "effective_count", "nonincreasing_fit"]
