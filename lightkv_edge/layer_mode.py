"""Layer mode: LightKV inside the LLM's prefill, with the KV cache really compacted.

The paper's method proper: the vision rows are merged *between decoder layers*, guided by
that layer's own attention from the prompt, so the following layers run on fewer rows and
the KV cache ends with fewer vision entries. The pinned llama.cpp runs every layer in one
graph per llama_decode, so the prefill of a turn is split at the merge layers with our
patches (native/patches/0003, 0004):

    stage 0: every row of the turn (text tokens and image embeddings) through layers
             [0, l1 + 1); the hidden state leaving layer l1 comes back, and layer
             l1's post-RoPE Q/K stay on the lightkv backend (native.Capture:
             liblightkv's graph hook, patch 0007, copies them there after the graph);
    merge:   each image's rows are merged in its own windows (native LightKV merge),
             guided by layer l1's attention from the turn's text rows;
    compact: the turn's cells are freed, the kept rows run through [l1 + 1, l2 + 1) into
             fresh cells, and layers [0, l1 + 1) of those cells are filled with the merge's
             weighted combination of the stored K/V (K merged as stored, after RoPE);
    ...      and so on; the last range ends at the model's depth and gives the logits.

After the prefill every layer holds exactly the final rows (text + final vision cells):
KV policy `compact`. KV policy `exact` (the paper's semantics) frees and compacts nothing:
each range's rows stay in their own cells, seen only by that range's layers (patch 0005,
llama_kv_cells_set_layers), so every layer keeps the rows it ran on. Ground truth of both:
`lightkv_edge.reference.prefill_with_merge(..., kv_policy=...)`. Schedule layers are
0-based and a merge at layer l merges what layer l outputs (the reference's convention).
The schedule's rules and the run's report (kept fraction, cells freed) are liblightkv's
(lightkv_schedule, lightkv_schedule_report in native/include/lightkv.h).

Entry points:
    LayerRunner(model, ctx, ...)       a llama.cpp model + context (raw pointers)
      .prefill(segments, stages, ...)  one turn given as text/image Segments -> LayerPrefill
    prefill_chunks(vision_model, chunks, stages, ...)   a turn as libmtmd chunks
    parse_schedule / default_schedule / check_schedule / layer_keep_fraction
"""
from __future__ import annotations

import ctypes as C
import math
import time
from dataclasses import dataclass, field

import numpy as np

from ._libs import use_our_llama_cpp

llama_cpp = use_our_llama_cpp()

KV_POLICIES = ("compact", "exact")
POSITION_POLICIES = ("keep", "renumber")
# layer mode's merge rule per stage: method -> LightKV-protect's fraction (prefill's
# `protect`). lightkv-protect (the default, as in embed mode): the top rows of the
# stage's budget by that layer's guidance are never sources; lightkv-paper: the
# published stage (docs/layer-mode.md, "Methods")
DEFAULT_METHOD = "lightkv-protect"
METHODS = {"lightkv-protect": 1.0, "lightkv-paper": 0.0}

# the paper's schedule on a 32-layer model: merges after layers 12, 18 and 24
_PAPER_LAYERS = (12, 18, 24)
_PAPER_DEPTH = 32
_PAPER_WINDOWS = (4, 2, 1)


# ---------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    layer: int      # 0-based decoder layer whose output is merged
    windows: int    # windows per grid side
    ratio: float    # fraction of each window's rows dropped, in [0, 1)


def parse_schedule(text: str) -> tuple[Stage, ...]:
    """"L:W:R,L:W:R,..." (e.g. "12:4:0.5,18:2:0.5,24:1:0.5") -> stages."""
    stages = []
    for part in str(text).split(","):
        bits = part.strip().split(":")
        if len(bits) != 3:
            raise ValueError(f"schedule stage {part.strip()!r} is not LAYER:WINDOWS:RATIO")
        try:
            stages.append(Stage(int(bits[0]), int(bits[1]), float(bits[2])))
        except ValueError:
            raise ValueError(f"cannot parse schedule stage {part.strip()!r}") from None
    return tuple(stages)


def check_schedule(stages, n_layer: int, grids=(), *, kv: str = "compact",
                   positions: str = "keep") -> tuple[Stage, ...]:
    """Validate before any compute, with liblightkv's rules (lightkv_schedule_create, the
    one home of them): layers strictly increasing in [0, n_layer - 1) (a merge after the
    last layer would save nothing and leave no layer to run), windows >= 1 and no larger
    than the smallest side of any image's grid, ratios in [0, 1), known policies."""
    return _native_schedule(stages, n_layer, grids, kv=kv, positions=positions)[0]


def _native_schedule(stages, n_layer, grids=(), *, kv="compact", positions="keep"):
    from . import native
    stages = tuple(s if isinstance(s, Stage) else Stage(*s) for s in stages)
    for s in stages:       # the types here; the values in liblightkv
        if isinstance(s.layer, bool) or not isinstance(s.layer, (int, np.integer)):
            raise ValueError(f"schedule layer must be an integer, got {s.layer!r}")
        if isinstance(s.windows, bool) or not isinstance(s.windows, (int, np.integer)):
            raise ValueError(f"schedule windows must be an integer >= 1, got {s.windows!r}")
        if isinstance(s.ratio, bool) or not isinstance(s.ratio, (int, float, np.floating)):
            raise ValueError(f"schedule ratio must be in [0, 1), got {s.ratio!r}")
    sched = native.LayerSchedule([(s.layer, s.windows, s.ratio) for s in stages], n_layer,
                                 kv=kv, positions=positions)
    for rows, cols in grids:
        sched.check_grid(rows, cols)
    return stages, sched


def check_policies(positions: str, kv: str) -> None:
    """The position and KV policies layer mode has (liblightkv's lightkv_policies_check)."""
    from . import native
    native.check_layer_policies(kv, positions)


def layer_keep_fraction(stages, n_layer: int) -> float:
    """The paper's kept fraction: the vision rows present at each layer, averaged over the
    layers, if every stage kept exactly (1 - ratio) of its rows."""
    return _native_schedule(stages, n_layer)[1].keep_fraction


def default_schedule(n_layer: int, keep: float = 0.55, grid=None) -> tuple[Stage, ...]:
    """The paper's schedule scaled to the depth: merges after layers 12-18-24 of 32 with
    4-2-1 windows, one ratio for all stages chosen so that the layer-averaged kept fraction
    is `keep`. A stage drops at most half of a window (the bipartite matching), so ratios
    stay <= 0.5. A keep those layers cannot reach even at 0.5 (the paper's own layers stop
    at ~0.57) moves the merges earlier, all by one factor of depth (12f-18f-24f of 32, the
    latest that reaches `keep`; distinct layers, at most n_layer - 2); a keep below what
    merges after the first layers reach is refused.
    grid (rows, cols): windows are clipped to a quarter of the smaller side (a first-stage
    window of at least 4x4 rows: on small grids whole-row budgets would otherwise round
    most of the ratio away; the paper's 24x24 keeps 4-2-1), and the ratio is chosen on the
    rows the merge will really drop (per window floor(ratio * rows)), the nearest to keep."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if n_layer < 2:
        raise ValueError("layer mode needs a model of at least 2 layers")
    side = min(grid) if grid else None

    def stages_at(f: float, r: float):
        layers = []
        for l in _PAPER_LAYERS:
            x = max(round(f * l * n_layer / _PAPER_DEPTH), layers[-1] + 1 if layers else 0)
            if x <= n_layer - 2:
                layers.append(x)
        windows = [min(w, max(1, side // 4)) if side else w
                   for w in _PAPER_WINDOWS[:len(layers)]]
        return [Stage(l, w, r) for l, w in zip(layers, windows)]

    def frac(f, r):
        stages = stages_at(f, r)
        if not stages:      # a model too shallow for any merge at this depth factor
            return 1.0
        if not side:
            return layer_keep_fraction(stages, n_layer)
        return _as_run_keep(stages, n_layer, int(grid[0]) * int(grid[1]))

    if keep >= 1.0:
        return tuple(stages_at(1.0, 0.0))
    steps = 64
    f = next((k / steps for k in range(steps, -1, -1) if frac(k / steps, 0.5) <= keep), None)
    if f is None:
        low = stages_at(0.0, 0.5)
        raise ValueError(f"keep {keep} is below what layer mode reaches on {n_layer} layers "
                         f"({frac(0.0, 0.5):.3f}, merges after layers "
                         f"{', '.join(str(s.layer) for s in low)} at ratio 0.5); "
                         "give a higher --keep or --schedule")
    lo, hi = 0.0, 0.5
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if frac(f, mid) > keep else (lo, mid)
    # whole rows make frac a step function: the step just above keep may be nearer
    r = lo if lo > 0 and abs(frac(f, lo) - keep) < abs(frac(f, hi) - keep) else hi
    return tuple(stages_at(f, r))


def _as_run_keep(stages, n_layer: int, n: int) -> float:
    """The layer-averaged kept fraction of n image rows under `stages` (no threshold), the
    rows spread evenly over each stage's windows: each window drops floor(ratio * rows),
    at most half (lightkv.h's budget)."""
    _, sched = _native_schedule(stages, n_layer)
    report, cur = sched.report(n), n
    for s in stages:
        w = s.windows * s.windows
        per = cur / w
        out = cur - w * min(math.floor(s.ratio * per), math.floor(per / 2))
        report.stage(cur, out)
        cur = out
    return report.keep_fraction


# ---------------------------------------------------------------------------------------
# the C API of our patches
# ---------------------------------------------------------------------------------------
_l = llama_cpp.llama_cpp._lib
_i32p, _f32p = C.POINTER(C.c_int32), C.POINTER(C.c_float)
for _name, _res, _args in (
        ("llama_set_layer_range", C.c_bool, [C.c_void_p, C.c_int32, C.c_int32]),
        ("llama_get_layer_range_out", _f32p, [C.c_void_p]),
        ("llama_get_layer_range_cells", C.c_int32, [C.c_void_p, _i32p, C.c_int32]),
        ("llama_set_eval_callback", None, [C.c_void_p, C.c_void_p, C.c_void_p]),
        ("llama_kv_cells_merge", C.c_bool, [C.c_void_p, C.c_int32, C.c_int32, C.c_int32, _i32p,
                                            _i32p, _f32p, C.c_int32, _i32p]),
        ("llama_kv_cells_rm", C.c_bool, [C.c_void_p, C.c_int32, _i32p]),
        ("llama_kv_cells_get", C.c_bool, [C.c_void_p, C.c_int32, C.c_int32, _i32p, _f32p, _f32p]),
        ("llama_kv_cells_set_layers", C.c_bool, [C.c_void_p, C.c_int32, _i32p, C.c_int32,
                                                 C.c_int32]),
        ("llama_kv_cells_set_pos", C.c_bool, [C.c_void_p, C.c_int32, _i32p, _i32p]),
        ("llama_kv_cells_select", C.c_int32, [C.c_void_p, C.c_int32]),
        ("llama_model_n_swa", C.c_int32, [C.c_void_p]),
        ("llama_set_position_gaps", None, [C.c_void_p, C.c_bool])):
    _fn = getattr(_l, _name)
    _fn.restype, _fn.argtypes = _res, _args

# patch 0007's graph hook; a llama.cpp built without it leaves the capture the eval callback
HAS_GRAPH_HOOK = hasattr(_l, "llama_set_graph_hook")
if HAS_GRAPH_HOOK:
    _l.llama_set_graph_hook.restype = None
    _l.llama_set_graph_hook.argtypes = [C.c_void_p, C.c_void_p, C.c_void_p]


def _arch(model) -> str:
    """The model's general.architecture ("" if unreadable)."""
    buf = C.create_string_buffer(64)
    n = llama_cpp.llama_model_meta_val_str(model, b"general.architecture", buf, len(buf))
    return buf.value.decode() if n > 0 else ""


def _ip(a: np.ndarray):
    return a.ctypes.data_as(_i32p)


def attach_capture(ctx, capture, via: str | None = None) -> None:
    """Let `capture` (native.Capture) copy its wanted Q/K from the graphs of the following
    llama_decode calls on ctx; None: stop. Call it again after each capture.want(): the
    graph hook (patch 0007, the default when llama.cpp has it) marks the wanted nodes when
    llama.cpp builds a graph, and setting it makes llama.cpp build the next one. via "eval":
    the eval callback instead (each wanted node then ends a piece of the compute: the
    scheduler synchronises before calling back), which tests compare the hook with."""
    if via is None:
        via = "hook" if HAS_GRAPH_HOOK else "eval"
    if via not in ("hook", "eval"):
        raise ValueError(f"via must be 'hook' or 'eval', got {via!r}")
    if via == "hook" and not HAS_GRAPH_HOOK:
        raise RuntimeError("this llama.cpp build has no graph hook (native/patches/0007)")
    if HAS_GRAPH_HOOK:
        on = capture is not None and via == "hook"
        _l.llama_set_graph_hook(ctx, capture.graph_hook if on else None, capture.handle if on else None)
    on = capture is not None and via == "eval"
    _l.llama_set_eval_callback(ctx, capture.callback if on else None, capture.handle if on else None)


def kv_cells_set_layers(ctx, cells, il_begin: int, il_end: int) -> None:
    """Make the occupied `cells` visible only to layers [il_begin, il_end) (patch 0005)."""
    c = np.ascontiguousarray(cells, dtype=np.int32)
    if not _l.llama_kv_cells_set_layers(ctx, len(c), _ip(c), int(il_begin), int(il_end)):
        raise RuntimeError("llama.cpp could not restrict the KV cells to a layer range")


def kv_cells_set_pos(ctx, cells, positions) -> None:
    """Record `positions` for the occupied `cells` without re-rotating their K (patch 0006)."""
    c = np.ascontiguousarray(cells, dtype=np.int32)
    p = np.ascontiguousarray(positions, dtype=np.int32)
    if p.shape != c.shape:
        raise ValueError("kv_cells_set_pos needs one position a cell")
    if not _l.llama_kv_cells_set_pos(ctx, len(c), _ip(c), _ip(p)):
        raise RuntimeError("llama.cpp could not set the KV cells' positions")


def kv_cells_get(ctx, layer: int, cells, n_embd_k: int, n_embd_v: int):
    """K [n, n_embd_k] and V [n, n_embd_v] (float32, K after RoPE) of `cells` in `layer`."""
    c = np.ascontiguousarray(cells, dtype=np.int32)
    k = np.empty((len(c), n_embd_k), np.float32)
    v = np.empty((len(c), n_embd_v), np.float32)
    if not _l.llama_kv_cells_get(ctx, layer, len(c), _ip(c), k.ctypes.data_as(_f32p),
                                 v.ctypes.data_as(_f32p)):
        raise RuntimeError("llama.cpp could not read the KV cells")
    return k, v


@dataclass(frozen=True)
class QueryWindow:
    """An observation window's queries (KV eviction, evict.py): the last `rows` Qcur rows
    that `capture` (native.Capture) holds of each layer it observed, on the lightkv
    backend; they never come to the host."""
    capture: object
    rows: int


# ---------------------------------------------------------------------------------------
# one turn
# ---------------------------------------------------------------------------------------
@dataclass
class Segment:
    """A run of rows of the turn: text (token ids) or one image (embeddings; grid (rows,
    cols), or None for the published padded square).
    pos: [n_pos, n] positions (1 row, or the 4 M-RoPE sections t, y, x, z).
    cells: None (image rows in raster order of the grid), or [n, 2] (row, col) of every
    row on it (families.row_cells: LLaVA's).
    non_causal: the image's rows attend to each other both ways (libmtmd's
    decode_use_non_causal: Gemma 3); each range decodes its (kept) rows in one batch with
    causal attention off, as libmtmd decodes the image."""
    kind: str
    pos: np.ndarray
    tokens: np.ndarray | None = None
    embd: np.ndarray | None = None
    grid: tuple[int, int] | None = None
    cells: np.ndarray | None = None
    non_causal: bool = False

    @property
    def n(self) -> int:
        return self.pos.shape[1]


@dataclass
class _Rows:
    seg: Segment
    x: np.ndarray | None          # [m, D] rows entering the next range (None: tokens)
    pos: np.ndarray               # [n_pos, m]
    orig: np.ndarray              # [m] original index inside the segment
    gpos: np.ndarray | None       # [m, 2] (row, col) on the original grid (images)
    grid_rc: tuple[int, int] | None
    cells: list | None = None     # [m] KV cells of the rows, one array per cache
    h: list = field(default_factory=list)


@dataclass
class LayerPrefill:
    logits: np.ndarray                  # [n_vocab] float32, of the turn's last row
    kept: list[np.ndarray]              # per image: original indices of its final rows
    cells: np.ndarray                   # KV cells of the turn's final rows, row order
                                        # (the full-attention or only cache: cache_cells[0])
    positions: np.ndarray               # [n_pos, S_final] their positions
    stages: list[dict]                  # per stage: layer, rows and vision rows in/out
    vision_in: int
    vision_out: int
    keep_fraction: float                # layer-averaged kept fraction, as run
    cells_freed: int
    # the turn's live cells by the layers that see them: [(il_begin, il_end, cells)];
    # compact: one entry, every layer; exact: one per range of layers between merges
    # (cells of the full-attention or only cache; cache_layer_cells: one such list a cache)
    layer_cells: list = field(default_factory=list)
    # per KV cache (runner.caches: the only one, or the iSWA pair's full-attention and
    # sliding-window caches), the final rows' cells and the layer_cells
    cache_cells: list = field(default_factory=list)
    cache_layer_cells: list = field(default_factory=list)
    t_guidance_ms: float = 0.0
    t_merge_ms: float = 0.0
    t_compact_ms: float = 0.0
    # observe_q: the last segment's Qcur rows (after RoPE) of the observed layers, kept in
    # the runner's capture until its next prefill (None without observe_q)
    window_q: QueryWindow | None = None


class LayerRunner:
    """Layer-mode prefills on one llama.cpp context (llama, qwen2, qwen2vl and gemma3
    graphs; one KV cache, or the iSWA pair of a model with sliding-window layers).

    model, ctx: the llama_model / llama_context pointers; n_batch: the context's n_batch.
    Turns on position gaps (patch 0001) for normal-RoPE models, since kept rows keep their
    original positions; it stays on for the context's later decodes, which need it too.

    KV caches: a model with sliding-window layers (Gemma 3) gets llama.cpp's iSWA pair, a
    full-attention cache (0) and a sliding-window cache (1) with a cell in each for every
    row. Patch 0003's llama_kv_cells_select names the cache the cell calls edit, so each
    step on cells (free, compact, restrict to layers, set positions) runs once per cache,
    on that cache's cells (a layer range covers the layers it holds)."""

    def __init__(self, model, ctx, *, n_batch: int, use_mrope: bool, backend=None):
        self.model, self.ctx, self.n_batch = model, ctx, int(n_batch)
        self.use_mrope = bool(use_mrope)
        self.n_layer = llama_cpp.llama_model_n_layer(model)
        self.n_embd = llama_cpp.llama_model_n_embd(model)
        self.n_head = llama_cpp.llama_model_n_head(model)
        self.n_head_kv = llama_cpp.llama_model_n_head_kv(model)
        self.head_dim = self.n_embd // self.n_head
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self.backend = backend
        from . import native
        # the merge layers' Q/K (and the eviction's window queries), copied on the lightkv
        # backend by liblightkv's eval callback
        self.capture = native.Capture(backend=backend)
        # the patches cover some graph builders only: ask llama.cpp (no compute) first
        covered = _l.llama_set_layer_range(ctx, 0, self.n_layer)
        _l.llama_set_layer_range(ctx, 0, -1)
        if not covered:
            raise ValueError("layer mode does not cover this model's architecture or memory "
                             "(the llama, qwen2, qwen2vl and gemma3 graphs with one KV cache "
                             "or the sliding-window pair are patched)")
        # the caches and their sizes in cells (llama_kv_cells_select); n_ubatch bounds a
        # non-causal image, which must be decoded in one ubatch
        self.cache_size = [int(_l.llama_kv_cells_select(ctx, 0))]
        if _l.llama_model_n_swa(model) > 0:
            n_swa_cells = int(_l.llama_kv_cells_select(ctx, 1))
            if n_swa_cells > 0:
                self.cache_size.append(n_swa_cells)
            _l.llama_kv_cells_select(ctx, 0)
        self.caches = range(len(self.cache_size))
        self.n_ubatch = int(llama_cpp.llama_n_ubatch(ctx))
        # the guidance's scale is the layer's own: 1/sqrt(head_dim) (the capture's default),
        # except Gemma 3 27B, whose query_pre_attn_scalar is n_embd / n_head (llama.cpp's
        # f_attention_scale: src/models/gemma3.cpp, by model type, 62 layers)
        self.guidance_scale = None
        if _arch(model) == "gemma3" and self.n_layer == 62:
            self.guidance_scale = (self.n_embd / self.n_head) ** -0.5
        if not self.use_mrope:
            _l.llama_set_position_gaps(ctx, True)

    # -- one decode -----------------------------------------------------------------------
    def _decode(self, rows: _Rows, lo: int, hi: int, *, logits_last: bool):
        n = hi - lo
        pos = np.ascontiguousarray(rows.pos[:, lo:hi], dtype=np.int32)
        seq0 = np.zeros(1, np.int32)
        n_seq = np.ones(n, np.int32)
        seq_ptrs = (C.POINTER(C.c_int32) * n)(*[seq0.ctypes.data_as(_i32p)] * n)
        logits = np.zeros(n, np.int8)
        logits[-1] = logits_last
        b = llama_cpp.llama_batch()
        b.n_tokens = n
        if rows.x is None:
            toks = np.ascontiguousarray(rows.seg.tokens[rows.orig[lo:hi]], dtype=np.int32)
            pos = np.ascontiguousarray(pos[0])            # one position a token
            b.token = toks.ctypes.data_as(C.POINTER(llama_cpp.llama_token))
            b.embd = C.cast(None, _f32p)
            keep = toks
        else:
            embd = np.ascontiguousarray(rows.x[lo:hi], dtype=np.float32)
            if rows.seg.kind == "text" and self.use_mrope:
                pos = np.ascontiguousarray(np.repeat(pos[:1], 4, 0))  # text: t = y = x = z
            b.token = C.cast(None, C.POINTER(llama_cpp.llama_token))
            b.embd = embd.ctypes.data_as(_f32p)
            keep = embd
        b.pos = pos.ctypes.data_as(C.POINTER(llama_cpp.llama_pos))
        b.n_seq_id = n_seq.ctypes.data_as(_i32p)
        b.seq_id = seq_ptrs
        b.logits = logits.ctypes.data_as(C.POINTER(C.c_int8))
        rc = llama_cpp.llama_decode(self.ctx, b)
        del keep
        if rc != 0:
            raise RuntimeError(f"llama_decode failed in layer mode (rc={rc})")
        out = []
        for c in self.caches:
            self._select(c)
            cells = np.empty(n, np.int32)
            got = _l.llama_get_layer_range_cells(self.ctx, _ip(cells), n)
            if got != n:
                raise RuntimeError("llama.cpp did not report the KV cells of the batch")
            out.append(cells)
        self._select(0)
        return out

    def _select(self, cache: int) -> None:
        """The KV cache the following cell calls name (patch 0003)."""
        if _l.llama_kv_cells_select(self.ctx, cache) < 0:
            raise RuntimeError(f"llama.cpp has no KV cache {cache} here")

    def _decode_rows(self, r: _Rows, *, last: bool, is_last_rows: bool,
                     held: list[set]) -> None:
        """Decode r's rows through the current layer range: in batches of n_batch, or, for a
        non-causal image, all in one batch with causal attention off (libmtmd's way).
        r.cells gets their cells in each cache, r.h the hidden state leaving the range.
        held: per cache, the cells of this turn still needed (none may be taken again: the
        sliding-window cache may reuse a cell whose position left the window)."""
        r.h, cells = [], []
        step = len(r.orig) if r.seg.non_causal else self.n_batch
        if r.seg.non_causal:
            llama_cpp.llama_set_causal_attn(self.ctx, False)
        try:
            for lo in range(0, len(r.orig), step):
                hi = min(lo + step, len(r.orig))
                got = self._decode(r, lo, hi, logits_last=is_last_rows and hi == len(r.orig))
                for c, cc in zip(self.caches, got):
                    if len(set(cc.tolist()) | held[c]) != len(cc) + len(held[c]):
                        raise RuntimeError(
                            "llama.cpp's sliding-window KV cache gave a cell of this turn to "
                            "another row during a layer-mode prefill; create the context with "
                            "swa_full (a full-size sliding-window cache)")
                    held[c].update(cc.tolist())
                cells.append(got)
                if not last:
                    out = _l.llama_get_layer_range_out(self.ctx)
                    if not out:
                        raise RuntimeError("llama.cpp returned no hidden state")
                    r.h.append(np.ctypeslib.as_array(out, shape=(hi - lo, self.n_embd))
                               .copy())
        finally:
            if r.seg.non_causal:
                llama_cpp.llama_set_causal_attn(self.ctx, True)
        r.cells = [np.concatenate([got[c] for got in cells]) for c in self.caches]

    # -- the prefill ------------------------------------------------------------------------
    def prefill(self, segments: list[Segment], stages, *, positions: str = "keep",
                kv: str = "compact", turn_start: int | None = None,
                observe_q=(), protect: float = 0.0) -> LayerPrefill:
        """Prefill one turn (its segments in order; the last must be text) under `stages`.
        turn_start: first position of the turn, for positions="renumber" (default: the
        first segment's first position). observe_q: layers whose queries of the last
        (text) segment come back in window_q (KV eviction's window, evict.py).
        protect: LightKV-protect's fraction of each stage's budget (METHODS; 0: the
        published stage), as reference.prefill_with_merge(protect=...)."""
        check_policies(positions, kv)
        check_protect(protect)
        if not segments or segments[-1].kind != "text":
            raise ValueError("the turn must end with text (the logits to sample from)")
        grids = []
        for s in segments:
            if s.kind == "image":
                if s.embd is None:
                    raise ValueError("an image segment needs embd")
                if s.embd.shape != (s.n, self.n_embd):
                    raise ValueError(f"image embd must be [{s.n}, {self.n_embd}], "
                                     f"got {tuple(s.embd.shape)}")
                grids.append(window_grid(s.n, s.grid))
                if s.non_causal and s.n > min(self.n_batch, self.n_ubatch):
                    raise ValueError(
                        f"an image of {s.n} rows attends to itself both ways and must be "
                        f"decoded in one batch, but this context takes "
                        f"{min(self.n_batch, self.n_ubatch)} (raise n_batch and n_ubatch)")
            elif s.kind == "text":
                if s.tokens is None or len(s.tokens) != s.n:
                    raise ValueError("a text segment needs one token per position column")
            else:
                raise ValueError(f"unknown segment kind {s.kind!r}")
        stages, sched = _native_schedule(stages, self.n_layer, grids, kv=kv,
                                         positions=positions)
        self._check_sliding_cache(sum(s.n for s in segments), len(stages) + 1, kv)
        n_pos = 4 if self.use_mrope else 1
        for s in segments:
            if s.pos.shape[0] != n_pos and not (s.kind == "text" and s.pos.shape[0] == 1):
                raise ValueError(f"positions need {n_pos} rows, got {s.pos.shape[0]}")
        start = int(segments[0].pos[0, 0]) if turn_start is None else int(turn_start)

        rows = []
        for s in segments:
            m = s.n
            pos = s.pos if s.kind == "image" or s.pos.shape[0] == n_pos else \
                np.repeat(s.pos[:1], n_pos, 0)
            if s.kind == "image":
                rc = window_grid(m, s.grid)
                gpos = (np.stack([np.arange(m) // rc[1], np.arange(m) % rc[1]], 1)
                        if s.cells is None else np.asarray(s.cells, np.int64))
                rows.append(_Rows(s, np.asarray(s.embd, np.float32), pos.astype(np.int32),
                                  np.arange(m), gpos, rc))
            else:
                rows.append(_Rows(s, None, pos.astype(np.int32), np.arange(m), None, None))

        bounds = [0] + [s.layer + 1 for s in stages] + [self.n_layer]
        n_vis = sum(r.seg.n for r in rows if r.seg.kind == "image")
        report, present = [], [n_vis]
        run_report = sched.report(n_vis)      # liblightkv: the numbers of the run
        t_guid = t_merge = t_compact = 0.0
        caches = self.caches
        prev_cells = None        # per cache: the cells of the rows entering this range
        layer_cells = []         # exact: (il_begin, il_end, [cells per cache]) of each range
        to_rows = []             # exact + renumber: each range's cells -> index of the row
                                 # they are merged into, in the current rows
        maps = None              # per rows: (assign into the new rows, weight) of the merge
        held = [set() for _ in caches]   # per cache: the turn's cells still needed
        cells_before = None
        logits = None
        window_q = None
        self.capture.reset()
        try:
            for k in range(len(bounds) - 1):
                a, b = bounds[k], bounds[k + 1]
                last = k == len(bounds) - 2
                if not _l.llama_set_layer_range(self.ctx, a, b):
                    raise RuntimeError(f"llama.cpp refused the layer range [{a}, {b})")
                if prev_cells is not None and kv == "compact":
                    # the rows enter the range in fresh cells: free the turn's cells (their
                    # K/V of layers < a stay in the tensors until the compaction reads them)
                    for c in caches:
                        self._select(c)
                        if not _l.llama_kv_cells_rm(self.ctx, len(prev_cells[c]),
                                                    _ip(prev_cells[c])):
                            raise RuntimeError("llama.cpp could not free the turn's KV cells")
                        held[c] = set()
                elif prev_cells is not None:
                    # exact: the previous range's cells stay, seen by its layers only
                    for c in caches:
                        self._select(c)
                        kv_cells_set_layers(self.ctx, prev_cells[c], bounds[k - 1], a)
                    layer_cells.append((bounds[k - 1], a, prev_cells))
                self._select(0)
                observed = [li for li in observe_q if a <= li < b]
                want = {li: "qc" for li in observed}   # the window's queries, the K cache
                if not last:                            # the merge layer's guidance
                    want[b - 1] = "qkc" if b - 1 in want else "qk"
                self.capture.want(want)
                attach_capture(self.ctx, self.capture if want else None)
                for r in rows:
                    self._decode_rows(r, last=last, is_last_rows=last and r is rows[-1],
                                      held=held)
                for li in observed:
                    if self.capture.rows(li) != sum(len(r.orig) for r in rows):
                        raise RuntimeError(f"llama.cpp's graph gave no Qcur-{li} for every row "
                                           "(the architecture names it otherwise)")
                if observe_q:            # the last segment is decoded last in every range
                    window_q = QueryWindow(self.capture, len(rows[-1].orig))
                new_cells = [np.concatenate([r.cells[c] for r in rows]) for c in caches]
                if cells_before is None:
                    cells_before = len(new_cells[0])
                if maps is not None and kv == "compact":
                    t0 = time.perf_counter()
                    for c in caches:
                        self._compact(prev_cells[c], maps, rows, a, cache=c)
                    t_compact += (time.perf_counter() - t0) * 1e3
                if last:
                    if kv == "exact":
                        for c in caches:
                            self._select(c)
                            kv_cells_set_layers(self.ctx, new_cells[c], a, b)
                        self._select(0)
                        layer_cells.append((a, b, new_cells))
                    out = llama_cpp.llama_get_logits_ith(self.ctx, -1)
                    logits = np.ctypeslib.as_array(out, shape=(self.n_vocab,)).copy()
                    break

                # guidance from layer b-1's Q/K (one graph on the lightkv backend for every
                # image: the totals do not depend on which rows are read), then each image
                # merged in its windows
                stage = stages[k]
                offsets = np.cumsum([0] + [len(r.orig) for r in rows])
                text_rows = np.concatenate([np.arange(offsets[i], offsets[i + 1])
                                            for i, r in enumerate(rows) if r.seg.kind == "text"])
                guided = [i for i, r in enumerate(rows)
                          if r.seg.kind == "image" and stage.ratio != 0.0]
                scores_all = {}
                if guided:
                    t0 = time.perf_counter()
                    for li, kind in ((b - 1, "q"), (b - 1, "k")):
                        if self.capture.rows(li, kind) != offsets[-1]:
                            raise RuntimeError(
                                f"llama.cpp's graph gave no Qcur-{li}/Kcur-{li} for every row "
                                "(the architecture names them otherwise)")
                    vis = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in guided])
                    g = self.capture.guidance(b - 1, vis, text_rows,
                                              scale=self.guidance_scale)
                    cuts = np.cumsum([0] + [offsets[i + 1] - offsets[i] for i in guided])
                    scores_all = {i: g[cuts[j]:cuts[j + 1]] for j, i in enumerate(guided)}
                    t_guid += (time.perf_counter() - t0) * 1e3
                maps, vis_in, vis_out = [], 0, 0
                from . import native
                for i, r in enumerate(rows):
                    h = np.concatenate(r.h)
                    m = len(r.orig)
                    if r.seg.kind == "text" or stage.ratio == 0.0:
                        r.x = h
                        maps.append((np.arange(m), np.ones(m, np.float32)))
                        if r.seg.kind == "image":
                            vis_in += m
                            vis_out += m
                        continue
                    scores = scores_all[i]
                    t0 = time.perf_counter()
                    # a raster no earlier stage merged: the plain grid (the published square
                    # padding without one); else every row at its cell
                    first = len(r.orig) == r.seg.n and r.seg.cells is None
                    grid = (r.grid_rc if _grid_matches(r.seg) else None) if first \
                        else r.grid_rc
                    res = _merge_stage(h, scores, stage, grid=grid,
                                       positions=None if first else r.gpos,
                                       grid_rc=r.grid_rc, gpos=r.gpos, protect=protect,
                                       backend=self.backend)
                    t_merge += (time.perf_counter() - t0) * 1e3
                    kept = np.asarray(res.kept, np.int64)
                    maps.append((np.asarray(res.assign, np.int64),
                                 np.asarray(res.weight, np.float32)))
                    r.x = np.asarray(res.x, np.float32)
                    r.orig, r.gpos = r.orig[kept], r.gpos[kept]
                    r.pos = r.pos[:, kept]
                    vis_in += m
                    vis_out += len(kept)
                if kv == "exact" and positions == "renumber":
                    step = np.concatenate([a + base for (a, _), base in zip(
                        maps, np.cumsum([0] + [len(r.orig) for r in rows])[:-1])])
                    to_rows = [step[d] for d in to_rows] + [step]
                if positions == "renumber":
                    p = start
                    for r in rows:
                        r.pos = np.repeat((p + np.arange(len(r.orig), dtype=np.int32))[None],
                                          n_pos, 0)
                        p += len(r.orig)
                report.append({"layer": stage.layer, "windows": stage.windows,
                               "ratio": stage.ratio, "vision_in": vis_in,
                               "vision_out": vis_out})
                present.append(vis_out)
                run_report.stage(vis_in, vis_out)
                prev_cells = new_cells
            if kv == "exact" and positions == "renumber":
                # the earlier ranges' rows were stored at positions beyond the renumbered
                # turn's end, where the causal mask would hide them from every later token
                # (and the next position would not follow the sequence's): each takes the
                # position of the final row it was merged into. K keeps the rotation it was
                # stored with, as in the reference (its later tokens attend to every cached
                # row)
                final_pos = np.concatenate([r.pos[0] for r in rows])
                for (_, _, cells), dest in zip(layer_cells, to_rows):
                    for c in caches:
                        self._select(c)
                        kv_cells_set_pos(self.ctx, cells[c], final_pos[dest])
        finally:
            attach_capture(self.ctx, None)
            self.capture.want({})
            _l.llama_set_layer_range(self.ctx, 0, -1)
            _l.llama_kv_cells_select(self.ctx, 0)

        final_cells = [np.concatenate([r.cells[c] for r in rows]) for c in caches]
        if kv == "compact":
            layer_cells = [(0, self.n_layer, final_cells)]
        run_report.cells(cells_before, sum(len(cells[0]) for _, _, cells in layer_cells))
        return LayerPrefill(
            logits=logits, kept=[r.orig.copy() for r in rows if r.seg.kind == "image"],
            cells=final_cells[0], positions=np.concatenate([r.pos for r in rows], axis=1),
            stages=report, vision_in=n_vis, vision_out=present[-1],
            keep_fraction=run_report.keep_fraction, cells_freed=run_report.cells_freed,
            layer_cells=[(lo, hi, cells[0]) for lo, hi, cells in layer_cells],
            cache_cells=final_cells,
            cache_layer_cells=[[(lo, hi, cells[c]) for lo, hi, cells in layer_cells]
                               for c in caches],
            t_guidance_ms=t_guid, t_merge_ms=t_merge, t_compact_ms=t_compact,
            window_q=window_q)

    def _check_sliding_cache(self, n_rows: int, n_ranges: int, kv: str) -> None:
        """A sliding-window cache (the iSWA pair's, cache 1) holds window + n_ubatch cells
        (padded) unless the context was made with swa_full, and llama.cpp gives a new row a
        cell whose position has left the window. The prefill needs every row of the turn in
        its own cell until the merge has read it: compact, the turn's rows (each later
        range's rows take the cells the previous one freed); exact, each range's rows (at
        most every row once per range). Refused before any compute when it cannot."""
        for c in self.caches[1:]:
            need = n_rows if kv == "compact" else n_rows * n_ranges
            if need > self.cache_size[c]:
                raise ValueError(
                    f"the sliding-window KV cache holds {self.cache_size[c]} cells, but a "
                    f"layer-mode prefill of this turn ({n_rows} rows"
                    + ("" if kv == "compact" else f" in each of {n_ranges} layer ranges")
                    + f", kv {kv}) needs {need}; create the context with swa_full or a "
                    "larger n_ubatch")

    def _compact(self, src_cells, maps, rows, n_layers: int, cache: int = 0):
        """Layers [0, n_layers) of the new rows' cells := the merge's weighted combination
        of the previous rows' stored K/V (src_cells, in the previous row order), in one KV
        cache (the layers of the range it holds)."""
        dst_of_src, weight, base = [], [], 0
        for (assign, w), r in zip(maps, rows):
            dst_of_src.append(assign + base)
            weight.append(w)
            base += len(r.orig)
        dst_of_src = np.ascontiguousarray(np.concatenate(dst_of_src), dtype=np.int32)
        weight = np.ascontiguousarray(np.concatenate(weight), dtype=np.float32)
        dst_cells = np.ascontiguousarray(np.concatenate([r.cells[cache] for r in rows]),
                                         dtype=np.int32)
        src = np.ascontiguousarray(src_cells, dtype=np.int32)
        self._select(cache)
        ok = _l.llama_kv_cells_merge(self.ctx, 0, n_layers, len(src), _ip(src),
                                     _ip(dst_of_src), weight.ctypes.data_as(_f32p),
                                     len(dst_cells), _ip(dst_cells))
        self._select(0)
        if not ok:
            raise RuntimeError("llama.cpp could not compact the KV cells")


def _grid_matches(seg: Segment) -> bool:
    return seg.grid is not None and int(seg.grid[0]) * int(seg.grid[1]) == seg.n


def window_grid(n: int, grid) -> tuple[int, int]:
    """The grid the windows of an image of n rows are cut on: its grid (rows, cols), or,
    without one (normal-RoPE chunks), the published padded square."""
    if grid and grid[0] * grid[1] == n:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(n - 1) + 1
    return side, side


def check_protect(protect) -> None:
    """LightKV-protect's fraction: a number in [0, 1] (ValueError otherwise)."""
    if isinstance(protect, bool) or not isinstance(protect, (int, float, np.floating)) \
            or not 0.0 <= float(protect) <= 1.0:
        raise ValueError(f"protect must be a number in [0, 1], got {protect!r}")


def _merge_stage(h, scores, stage: Stage, *, grid, positions, grid_rc, gpos, protect,
                 backend):
    """One image's rows h at one stage -> a native MergeResult-like (x, kept, assign,
    weight) over h's rows.

    protect 0: the published stage (windows, ratio) as given. protect > 0 (spec:
    reference MergeState.step): the stage's budget is the rows the published stage keeps
    on these rows (liblightkv's rows_without_threshold of that stage's plan: m - sum
    over windows of min(floor(ratio * n_w), n_w // 2)); the round(protect * budget) rows
    with the highest guidance of THIS layer are never sources (mode "receive"); the
    stage merges at its ratio in its windows with that rule, then again on what is left
    until exactly the budget remains (merge_to_budget: protection leaves a window short
    of sources)."""
    from . import native
    from .embed_mode import protected_count
    from .merge_to_budget import merge_to_budget
    if not protect:
        return native.lightkv_merge(h, scores, windows=stage.windows, ratio=stage.ratio,
                                    grid=grid, positions=positions, backend=backend)
    target = native.MergePlan(len(h), h.shape[1], windows=stage.windows, ratio=stage.ratio,
                              grid=grid, positions=positions,
                              backend=backend).rows_without_threshold
    p = protected_count(float(protect), target)
    return merge_to_budget(h, scores, target=target, grid=grid_rc, positions=gpos,
                           windows=stage.windows, ratio=stage.ratio,
                           protected=native.protect_top(scores, p) if p else None,
                           backend=backend)


# ---------------------------------------------------------------------------------------
# a turn as libmtmd chunks (what the engine holds)
# ---------------------------------------------------------------------------------------
def segments_from_chunks(vm, chunks, n_past: int) -> tuple[list[Segment], int, float]:
    """libmtmd chunks of one turn -> (segments, the position after them, encoder ms).
    Images are encoded here (the vision tower runs once, as in every mode)."""
    from . import mtmd
    from .families import row_cells
    segs, t_enc = [], 0.0
    n_pos = 4 if vm.use_mrope else 1
    keys = mtmd.image_keys(chunks)
    for ch in chunks:
        kind = mtmd.chunk_get_type(ch)
        if kind == mtmd.CHUNK_TEXT:
            cnt = C.c_size_t()
            p = mtmd.chunk_get_tokens_text(ch, C.byref(cnt))
            toks = np.array([p[i] for i in range(cnt.value)], np.int32)
            pos = n_past + np.arange(len(toks), dtype=np.int32)
            segs.append(Segment("text", np.repeat(pos[None], n_pos, 0), tokens=toks))
            n_past += len(toks)
        elif kind == mtmd.CHUNK_IMAGE:
            embd, t_ms, _ = vm.encode(ch, keys.get(ch))
            t_enc += t_ms
            n = len(embd)
            pos = mtmd.image_positions(ch, n_past, vm.use_mrope)
            grid = mtmd.image_grid(ch, vm.use_mrope)   # None: no token grid (normal RoPE)
            cells = None if grid else row_cells(getattr(vm, "projector", None), n,
                                                getattr(vm, "class_token", False))
            segs.append(Segment("image", pos, embd=embd, grid=grid, cells=cells,
                                non_causal=bool(mtmd.decode_use_non_causal(vm.mctx, ch))))
            n_past += mtmd.chunk_get_n_pos(ch)
        else:
            raise ValueError("layer mode takes text and images only")
    return segs, n_past, t_enc


def prefill_chunks(vm, chunks, stages, *, n_past: int, positions: str = "keep",
                   kv: str = "compact", runner: LayerRunner | None = None, observe_q=(),
                   protect: float = 0.0):
    """Prefill one turn of a VisionModel's conversation in layer mode.

    vm: lightkv_edge.model.VisionModel; chunks: the turn's libmtmd chunks in order (the
    last one text); stages: Stage tuples (check_schedule); n_past: the turn's first
    position. Returns (LayerPrefill, n_past after the turn, encoder ms). The KV cache then
    holds the turn's text rows and each image's final rows, in every layer; the logits of
    the last row are in LayerPrefill.logits and in the context (sample with idx -1).
    protect: LightKV-protect's fraction of each stage's budget (METHODS[method])."""
    from . import mtmd
    check_policies(positions, kv)     # before the vision encoder runs
    check_protect(protect)
    run = runner or LayerRunner(vm.model, vm.ctx, n_batch=vm.n_batch, use_mrope=vm.use_mrope)
    grids, n_rows = [], 0           # checked before the vision encoder runs
    for ch in chunks:
        n = mtmd.chunk_get_n_tokens(ch)
        n_rows += n
        if mtmd.chunk_get_type(ch) == mtmd.CHUNK_IMAGE:
            # an image whose rows attend to each other both ways (Gemma 3) is decoded in
            # one batch in every range, as libmtmd decodes it
            if mtmd.decode_use_non_causal(vm.mctx, ch) and n > min(run.n_batch, run.n_ubatch):
                raise ValueError(
                    f"an image of {n} rows attends to itself both ways and must be decoded "
                    f"in one batch, but this context takes {min(run.n_batch, run.n_ubatch)}")
            grids.append(window_grid(n, mtmd.image_grid(ch, vm.use_mrope)))
    check_schedule(stages, llama_cpp.llama_model_n_layer(vm.model), grids, kv=kv,
                   positions=positions)
    run._check_sliding_cache(n_rows, len(stages) + 1, kv)
    segs, end, t_enc = segments_from_chunks(vm, chunks, n_past)
    res = run.prefill(segs, stages, positions=positions, kv=kv, turn_start=n_past,
                      observe_q=observe_q, protect=protect)
    if positions == "renumber":
        end = n_past + res.positions.shape[1]
    return res, end, t_enc
