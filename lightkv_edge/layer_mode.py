"""Layer mode: LightKV inside the LLM's prefill, with the KV cache really compacted.

The paper's method proper: the vision rows are merged *between decoder layers*, guided by
that layer's own attention from the prompt, so the following layers run on fewer rows and
the KV cache ends with fewer vision entries. The pinned llama.cpp runs every layer in one
graph per llama_decode, so the prefill of a turn is split at the merge layers with our
patches (native/patches/0003, 0004), by liblightkv's driver (lightkv_layer_prefill_run,
native/src/lightkv_layer_prefill.cpp); this module hands it a turn's segments:

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
The schedule's rules, the turn's checks and the run's report (kept fraction, cells freed)
are liblightkv's (lightkv_schedule, lightkv_layer_prefill_check, lightkv_schedule_report
in native/include/lightkv.h).

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
    """Layer-mode prefills on one llama.cpp context: liblightkv's driver
    (lightkv_layer_prefill_run, native/src/lightkv_layer_prefill.cpp) with this runner's
    capture, which holds the stages' Q/K and the observed queries on the lightkv backend.

    model, ctx: the llama_model / llama_context pointers; n_batch: rows per llama_decode
    (the context's n_batch). use_mrope: the model's positions have 4 sections (libmtmd's
    rule; liblightkv reads the same from the model). A context layer mode does not cover
    is a ValueError here, before any compute.

    KV caches: a model with sliding-window layers (Gemma 3) gets llama.cpp's iSWA pair, a
    full-attention cache (0) and a sliding-window cache (1) with a cell in each for every
    row; `caches` and `cache_size` say which this context has."""

    def __init__(self, model, ctx, *, n_batch: int, use_mrope: bool, backend=None):
        from . import native
        self.model, self.ctx, self.n_batch = model, ctx, int(n_batch)
        self.use_mrope = bool(use_mrope)
        self.n_layer = llama_cpp.llama_model_n_layer(model)
        self.backend = backend
        native.layer_mode_check(ctx)
        # the merge layers' Q/K (and the eviction's window queries), copied on the lightkv
        # backend by liblightkv's graph hook
        self.capture = native.Capture(backend=backend)
        self.cache_size = [int(_l.llama_kv_cells_select(ctx, 0))]
        if _l.llama_model_n_swa(model) > 0:
            n_swa_cells = int(_l.llama_kv_cells_select(ctx, 1))
            if n_swa_cells > 0:
                self.cache_size.append(n_swa_cells)
            _l.llama_kv_cells_select(ctx, 0)
        self.caches = range(len(self.cache_size))
        self.n_ubatch = int(llama_cpp.llama_n_ubatch(ctx))

    def check(self, segments, stages, *, positions: str = "keep", kv: str = "compact",
              protect: float = 0.0):
        """What prefill() refuses, without computing: segments may lack their tokens and
        embd (images not encoded yet). Returns the native schedule."""
        from . import native
        check_protect(protect)
        _, sched = _native_schedule(stages, self.n_layer, kv=kv, positions=positions)
        native.layer_prefill_check(self.ctx, segments, sched, protect=protect,
                                   n_batch=self.n_batch)
        return sched

    def prefill(self, segments: list[Segment], stages, *, positions: str = "keep",
                kv: str = "compact", turn_start: int | None = None,
                observe_q=(), protect: float = 0.0) -> LayerPrefill:
        """Prefill one turn (its segments in order; the last must be text) under `stages`.
        turn_start: first position of the turn, for positions="renumber" (default: the
        first segment's first position). observe_q: layers whose queries of the last
        (text) segment come back in window_q (KV eviction's window, evict.py).
        protect: LightKV-protect's fraction of each stage's budget (METHODS; 0: the
        published stage), as reference.prefill_with_merge(protect=...)."""
        from . import native
        check_protect(protect)
        stages, sched = _native_schedule(stages, self.n_layer, kv=kv, positions=positions)
        observe_q = tuple(int(li) for li in observe_q)
        r = native.layer_prefill(self.capture, self.ctx, segments, sched, protect=protect,
                                 turn_start=turn_start, observe=observe_q, n_batch=self.n_batch)
        report = [{"layer": s.layer, "windows": s.windows, "ratio": s.ratio,
                   "vision_in": a, "vision_out": b} for s, (a, b) in zip(stages, r.stages)]
        vision_in = sum(s.n for s in segments if s.kind == "image")
        return LayerPrefill(
            logits=r.logits, kept=r.kept, cells=r.cells[0], positions=r.positions,
            stages=report, vision_in=vision_in,
            vision_out=report[-1]["vision_out"] if report else vision_in,
            keep_fraction=r.keep_fraction, cells_freed=r.cells_freed,
            layer_cells=[(lo, hi, cells[0]) for lo, hi, cells in r.ranges],
            cache_cells=r.cells,
            cache_layer_cells=[[(lo, hi, cells[c]) for lo, hi, cells in r.ranges]
                               for c in self.caches],
            t_guidance_ms=r.t_guidance_ms, t_merge_ms=r.t_merge_ms,
            t_compact_ms=r.t_compact_ms,
            window_q=QueryWindow(self.capture, segments[-1].n) if observe_q else None)


def window_grid(n: int, grid) -> tuple[int, int]:
    """The grid the windows of an image of n rows are cut on: its grid (rows, cols), or,
    without one (normal-RoPE chunks), the published padded square (liblightkv's rule for
    a segment's windows, here for the schedule the engine derives before a turn)."""
    if grid and grid[0] * grid[1] == n:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(n - 1) + 1
    return side, side


def check_protect(protect) -> None:
    """LightKV-protect's fraction: a number in [0, 1] (ValueError otherwise)."""
    if isinstance(protect, bool) or not isinstance(protect, (int, float, np.floating)) \
            or not 0.0 <= float(protect) <= 1.0:
        raise ValueError(f"protect must be a number in [0, 1], got {protect!r}")


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
    # the turn's shape (no token, no encoded image): liblightkv checks it before any compute
    shape = []
    for ch in chunks:
        n = mtmd.chunk_get_n_tokens(ch)
        if mtmd.chunk_get_type(ch) == mtmd.CHUNK_IMAGE:
            grid = mtmd.image_grid(ch, vm.use_mrope)
            shape.append(Segment("image", np.zeros((4 if vm.use_mrope else 1, n), np.int32),
                                 grid=grid, non_causal=bool(mtmd.decode_use_non_causal(vm.mctx, ch))))
        else:
            shape.append(Segment("text", np.zeros((1, n), np.int32)))
    run.check(shape, stages, positions=positions, kv=kv, protect=protect)
    segs, end, t_enc = segments_from_chunks(vm, chunks, n_past)
    res = run.prefill(segs, stages, positions=positions, kv=kv, turn_start=n_past,
                      observe_q=observe_q, protect=protect)
    if positions == "renumber":
        end = n_past + res.positions.shape[1]
    return res, end, t_enc
