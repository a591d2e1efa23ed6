"""KV eviction: after a turn's prefill (AirCache's observation window) and while decoding
(LightVLM's decoding stage), the least attended vision KV cells are freed for real.

Importance of a vision cell = the attention it receives from an observation window of
queries (after the prefill: the turn's text rows after its last image; while decoding: the
last N generated tokens), softmax over every cell the query sees, summed over heads,
window queries and the layers read. Each image keeps keep_count(n, keep) of its n cells,
the most important, ties to the earlier cell; the others are freed in every layer with
patch 0004's llama_kv_cells_rm (by index: M-RoPE image cells share their temporal position).
Positions never change. Ground truth: lightkv_edge/reference/evict.py.

How the pieces are read, without a new llama.cpp patch:
- the cell of every row: the context keeps the layer range [0, n_layer) set (patch 0003),
  which is the stock graph but records the KV cell of each token of the last decode;
  the engine decodes the rows itself (no libmtmd helper) and logs them here (CellLog);
- the window's queries: Qcur-<layer> (after RoPE) through the eval callback (patch 0004,
  layer_mode._QKCapture), switched on only for the window's decodes;
- the keys: llama_kv_cells_get of every live cell, per layer read;
- the scores: one small ggml graph in liblightkv (native.attention_received).
The patches cover the llama, qwen2 and qwen2vl graphs; other architectures are refused
when the Evictor is made (before any compute).
"""
from __future__ import annotations

import ctypes as C
import math
import time
from dataclasses import dataclass, field

import numpy as np

from .layer_mode import _QKCapture, _ip, _l, kv_cells_get, llama_cpp


def keep_count(n: int, keep: float) -> int:
    """Cells an image of n keeps: round(keep * n), halves up, at least 1."""
    return max(1, int(math.floor(keep * n + 0.5))) if n > 0 else 0


def check_keep(keep) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float, np.integer, np.floating)) \
            or not math.isfinite(keep) or not 0.0 < keep <= 1.0:
        raise ValueError(f"evict (the kept fraction) must be a number in (0, 1], got {keep!r}")
    return float(keep)


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

    def add(self, cells, pos, image: int) -> None:
        self.cells += [int(c) for c in cells]
        self.pos += [int(p) for p in pos]
        self.image += [image] * len(cells)
        self.alive += [True] * len(cells)

    def drop_from(self, n_past: int) -> None:
        """Forget the rows at positions >= n_past (what llama_memory_seq_rm removed)."""
        keep = [i for i, p in enumerate(self.pos) if p < n_past]
        for name in ("cells", "pos", "image", "alive"):
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
    last image); decode_every: re-score and evict every N generated tokens (None: never)."""

    def __init__(self, model, ctx, *, keep: float, layers=None, window: int | None = None,
                 decode_every: int | None = None, backend=None):
        self.keep = check_keep(keep)
        self.decode_every = check_every(decode_every)
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
        if not _l.llama_set_layer_range(ctx, 0, self.n_layer):
            raise ValueError("KV eviction does not cover this model's architecture (the "
                             "llama, qwen2 and qwen2vl graphs are patched)")
        self._q = _QKCapture()
        self.log = CellLog()
        self.n_images = 0
        self._gen_q: list[dict] = []        # per generated token: {layer: [H*d]}
        self._gen_pos: list[int] = []
        self.t_score_ms = 0.0

    # -- the cells ------------------------------------------------------------------------
    def arm(self) -> None:
        """(Re)set the layer range [0, n_layer) that records cells (layer mode resets it)."""
        _l.llama_set_layer_range(self.ctx, 0, self.n_layer)

    def clear(self) -> None:
        self.log = CellLog()
        self.n_images = 0
        self._gen_q, self._gen_pos = [], []

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
        """Capture Qcur of the read layers in the following decodes (or stop)."""
        if on:
            self._q.want_q(self.layers)
            _l.llama_set_eval_callback(self.ctx, C.cast(self._q.cb, C.c_void_p), None)
        else:
            _l.llama_set_eval_callback(self.ctx, None, None)
            self._q.want(None)

    def take_queries(self) -> dict[int, np.ndarray]:
        """{layer: [rows, H * d]} captured since observe(True), in decode order."""
        out = {}
        for li in self.layers:
            got = self._q.got.get(f"Qcur-{li}".encode(), [])
            if not got:
                raise RuntimeError(f"llama.cpp's graph gave no Qcur-{li}")
            out[li] = np.concatenate(got).reshape(-1, self.n_head * self.head_dim)
        for v in self._q.got.values():
            v.clear()
        return out

    # -- scoring and freeing ------------------------------------------------------------------
    def scores(self, queries: dict[int, np.ndarray], q_pos) -> tuple[np.ndarray, np.ndarray]:
        """Attention received by every live cell from the window, summed over the read
        layers -> (indices into the log, scores)."""
        t0 = time.perf_counter()
        idx, cells, pos, _ = self.log.live()
        q_pos = np.asarray(q_pos, np.int32)
        total = np.zeros(len(cells), np.float64)
        nk = self.n_head_kv * self.head_dim
        for li in self.layers:
            q = queries[li][-len(q_pos):].reshape(len(q_pos), self.n_head, self.head_dim)
            k, _ = kv_cells_get(self.ctx, li, cells, nk, nk)
            k = k.reshape(len(cells), self.n_head_kv, self.head_dim).transpose(1, 0, 2)
            from . import native
            total += native.attention_received(q.transpose(1, 0, 2), k, q_pos, pos,
                                               backend=self.backend)
        self.t_score_ms += (time.perf_counter() - t0) * 1e3
        return idx, total

    def evict(self, queries: dict[int, np.ndarray], q_pos, images=None) -> int:
        """Keep keep_count(n, keep) of the n live cells of each image in `images` (default:
        every image with live cells); returns the number of cells freed."""
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

    def vision_cells(self, images=None) -> int:
        _, _, _, img = self.log.live()
        return int(np.sum(img >= 0)) if images is None else int(np.isin(img, images).sum())

    # -- while decoding -----------------------------------------------------------------------
    def start_decoding(self) -> None:
        self._gen_q, self._gen_pos = [], []
        if self.decode_every:
            self.observe(True)

    def decoded(self, pos: int) -> int:
        """After a generated token's decode at `pos`: log its cell; every decode_every
        tokens, re-score every image with those tokens' queries. Returns cells freed."""
        self.record(1, [pos])
        if not self.decode_every:
            return 0
        self._gen_q.append(self.take_queries())
        self._gen_pos.append(pos)
        if len(self._gen_q) < self.decode_every:
            return 0
        q = {li: np.concatenate([g[li] for g in self._gen_q]) for li in self.layers}
        freed = self.evict(q, self._gen_pos)
        self._gen_q, self._gen_pos = [], []
        return freed

    def stop_decoding(self) -> None:
        self.observe(False)
        self._gen_q, self._gen_pos = [], []


__all__ = ["Evictor", "CellLog", "keep_count", "check_keep", "check_every"]
