"""ctypes binding of liblightkv (native/include/lightkv.h): the LightKV merge and its guidance
score as ggml graphs, on any ggml backend (CPU, CUDA, Metal, Vulkan).

    from lightkv_edge.native import lightkv_merge, guidance_scores_from_qk, backends
    res = lightkv_merge(x, scores, windows=2, ratio=0.5)           # best backend
    res = lightkv_merge(x, None, windows=2, ratio=0.5, backend="CPU")

Same signature and result as lightkv_edge.reference.lightkv_merge, numpy float32 in and
out (other float dtypes are converted). Bad input (and float32 overflow) raises ValueError
with a one-line message; a backend failure (unknown name, compute error) raises
RuntimeError, an allocation failure NativeMemoryError (a RuntimeError and a MemoryError).
"""
from __future__ import annotations

import ctypes as C
import math
import numbers
import threading
from dataclasses import dataclass

import numpy as np

__all__ = ["MergePlan", "MergeResult", "NativeMemoryError", "backends", "guidance_scores_from_qk", "lightkv_merge",
           "set_num_threads", "last_n_splits"]

# lightkv_status
_OK, _INVALID, _OOM, _BACKEND, _NUMERIC, _INTERNAL = range(6)


class _MergeParams(C.Structure):
    _fields_ = [("windows", C.c_int32), ("ratio", C.c_double), ("grid_rows", C.c_int64),
                ("grid_cols", C.c_int64), ("use_threshold", C.c_int32), ("threshold", C.c_double)]


class _ContextParams(C.Structure):
    _fields_ = [("backend", C.c_char_p), ("n_threads", C.c_int32), ("force_cpu_ops", C.c_char_p)]


_lib = None
_lib_lock = threading.Lock()


def _load():
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        from .._libs import lib_path
        lib = C.CDLL(str(lib_path("lightkv")))
        p_ctx, p_res, f32p, i64p = C.c_void_p, C.c_void_p, C.POINTER(C.c_float), C.POINTER(C.c_int64)
        sig = {
            "lightkv_api_version": (C.c_int, []),
            "lightkv_last_error": (C.c_char_p, [p_ctx]),
            "lightkv_backends_list": (C.c_int, [C.POINTER(C.c_char_p), C.c_size_t, C.POINTER(C.c_size_t)]),
            "lightkv_context_create_ext": (C.c_int, [C.POINTER(_ContextParams), C.POINTER(p_ctx)]),
            "lightkv_context_free": (None, [p_ctx]),
            "lightkv_context_backend": (C.c_char_p, [p_ctx]),
            "lightkv_context_last_n_splits": (C.c_int32, [p_ctx]),
            "lightkv_merge_run": (C.c_int, [p_ctx, f32p, C.c_int64, C.c_int64, f32p,
                                            C.POINTER(_MergeParams), C.POINTER(p_res)]),
            "lightkv_merge_plan_create": (C.c_int, [p_ctx, C.c_int64, C.c_int64, C.POINTER(_MergeParams),
                                                    C.POINTER(C.c_void_p)]),
            "lightkv_merge_run_at": (C.c_int, [p_ctx, f32p, C.c_int64, C.c_int64, f32p,
                                               C.POINTER(_MergeParams), i64p, C.POINTER(p_res)]),
            "lightkv_merge_plan_create_at": (C.c_int, [p_ctx, C.c_int64, C.c_int64, C.POINTER(_MergeParams),
                                                       i64p, C.POINTER(C.c_void_p)]),
            "lightkv_merge_plan_run": (C.c_int, [C.c_void_p, f32p, f32p, C.POINTER(p_res)]),
            "lightkv_merge_plan_free": (None, [C.c_void_p]),
            "lightkv_merge_plan_rows_without_threshold": (C.c_int64, [C.c_void_p]),
            "lightkv_merge_result_rows": (C.c_int64, [p_res]),
            "lightkv_merge_result_x": (f32p, [p_res]),
            "lightkv_merge_result_kept": (i64p, [p_res]),
            "lightkv_merge_result_assign": (i64p, [p_res]),
            "lightkv_merge_result_weight": (f32p, [p_res]),
            "lightkv_merge_result_free": (None, [p_res]),
            "lightkv_guidance_scores": (C.c_int, [p_ctx, f32p, f32p, C.c_int64, C.c_int64, C.c_int64,
                                                  C.c_int64, i64p, C.c_int64, i64p, C.c_int64,
                                                  C.c_float, f32p]),
        }
        for name, (res, args) in sig.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        if lib.lightkv_api_version() != 1:
            raise RuntimeError(f"liblightkv API version {lib.lightkv_api_version()} is not the expected 1")
        _lib = lib
        return lib


class NativeMemoryError(MemoryError, RuntimeError):
    """A host or device allocation failed (also a RuntimeError: a backend-side failure)."""


def _raise(status: int, message: bytes | None):
    msg = (message or b"").decode("utf-8", "replace") or f"liblightkv status {status}"
    if status in (_INVALID, _NUMERIC):
        raise ValueError(msg)
    if status == _OOM:
        raise NativeMemoryError(msg)
    raise RuntimeError(msg)


# ------------------------------------------------------------------------ contexts (cached)
class _Context:
    def __init__(self, backend: str | None, n_threads: int, force_cpu_ops: str | None):
        lib = _load()
        p = _ContextParams(backend.encode() if backend else None, int(n_threads),
                           force_cpu_ops.encode() if force_cpu_ops else None)
        h = C.c_void_p()
        st = lib.lightkv_context_create_ext(C.byref(p), C.byref(h))
        if st != _OK:
            msg = lib.lightkv_last_error(None)
            raise (ValueError if st == _INVALID else RuntimeError)(
                (msg or b"").decode() or "could not create a lightkv context")
        self.lib, self.h = lib, h
        self.lock = threading.Lock()  # a context is used by one thread at a time
        self.name = lib.lightkv_context_backend(h).decode()

    def __del__(self):
        if getattr(self, "h", None):
            self.lib.lightkv_context_free(self.h)
            self.h = None

    def check(self, status: int):
        if status != _OK:
            _raise(status, self.lib.lightkv_last_error(self.h))


_contexts: dict[tuple, _Context] = {}
_ctx_lock = threading.Lock()
_n_threads = 0


def _context(backend: str | None, force_cpu_ops: str | None = None) -> _Context:
    if backend is not None and not isinstance(backend, str):
        raise ValueError(f"backend must be a string or None, got {backend!r}")
    key = ((backend or "").lower(), _n_threads, force_cpu_ops or "")
    with _ctx_lock:
        ctx = _contexts.get(key)
        if ctx is None:
            ctx = _contexts[key] = _Context(backend, _n_threads, force_cpu_ops)
        return ctx


def set_num_threads(n: int) -> None:
    """CPU threads of contexts created from now on (0 = all hardware threads)."""
    global _n_threads
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    _n_threads = int(n)


def backends() -> list[str]:
    """Names of the ggml devices this build can run on, e.g. ['CPU'] or ['CUDA0', 'CPU']."""
    lib = _load()
    count = C.c_size_t()
    st = lib.lightkv_backends_list(None, 0, C.byref(count))
    if st != _OK:
        _raise(st, lib.lightkv_last_error(None))
    names = (C.c_char_p * max(1, count.value))()
    st = lib.lightkv_backends_list(names, count.value, C.byref(count))
    if st != _OK:
        _raise(st, lib.lightkv_last_error(None))
    return [names[i].decode() for i in range(count.value)]


def last_n_splits(backend: str | None = None, force_cpu_ops: str | None = None) -> int:
    """Backend splits of the graphs of the last call on that context (tests of the fallback)."""
    ctx = _context(backend, force_cpu_ops)
    return int(ctx.lib.lightkv_context_last_n_splits(ctx.h))


# ------------------------------------------------------------------------ argument helpers
def _float32_array(a, what: str, ndim: int) -> np.ndarray:
    if isinstance(a, (np.ndarray, list, tuple)) or np.isscalar(a):
        arr = np.asarray(a)
    elif hasattr(a, "__array__") and not hasattr(a, "requires_grad"):
        arr = np.asarray(a)
    elif hasattr(a, "detach"):  # a torch tensor
        arr = a.detach().cpu().numpy()
    else:
        raise ValueError(f"{what} must be a numpy array, got {type(a).__name__}")
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{what} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{what} must be {ndim}-D, got shape {arr.shape}")
    if arr.dtype != np.float32:
        with np.errstate(over="ignore", invalid="ignore"):
            conv = arr.astype(np.float32)
        if np.isfinite(arr).all() and not np.isfinite(conv).all():
            raise ValueError(f"{what} holds values outside the float32 range")
        arr = conv
    return np.ascontiguousarray(arr)


def _int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {v!r}")
    return int(v)


def _real(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{what} must be a real number, got {v!r}")
    return float(v)


def _f32p(a: np.ndarray):
    return a.ctypes.data_as(C.POINTER(C.c_float))


# ------------------------------------------------------------------------ merge
@dataclass(frozen=True)
class MergeResult:
    """x [M, D] float32; kept [M] int64 (original index of each row, ascending);
    assign [N] int64 (output row of each input token); weight [N] float32 (coefficient of
    each token in its row: x[j] = sum over assign[i] == j of weight[i] * x_in[i])."""

    x: np.ndarray
    kept: np.ndarray
    assign: np.ndarray
    weight: np.ndarray


def _scores(scores, n: int):
    sa = None if scores is None else _float32_array(scores, "scores", 1)
    if sa is not None and sa.shape[0] != n:
        raise ValueError(f"scores must have shape [{n}], got {sa.shape}")
    return sa


def _positions(positions, n: int, grid) -> np.ndarray | None:
    """positions [n, 2] int64 (row, col) on the original grid, checked: ValueError if bad."""
    if positions is None:
        return None
    if grid is None:
        raise ValueError("positions need grid=(rows, cols): the original grid they lie on")
    a = np.asarray(positions.detach().cpu().numpy() if hasattr(positions, "detach") else positions)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"positions must be an integer array, got dtype {a.dtype}")
    if a.shape != (n, 2):
        raise ValueError(f"positions must have shape [{n}, 2], got {a.shape}")
    if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
        raise ValueError("positions are outside the grid")
    a = np.ascontiguousarray(a.astype(np.int64))
    rows, cols = grid
    bad = (a[:, 0] < 0) | (a[:, 0] >= rows) | (a[:, 1] < 0) | (a[:, 1] >= cols)
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        raise ValueError(f"position {i} = ({a[i, 0]}, {a[i, 1]}) is outside the {rows}x{cols} grid")
    if n > 1 and np.unique(a, axis=0).shape[0] != n:
        raise ValueError("positions contain duplicates")
    return a


def _i64p(a: np.ndarray):
    return a.ctypes.data_as(C.POINTER(C.c_int64))


def _params(n: int, windows, ratio, grid, threshold, with_positions: bool = False) -> _MergeParams:
    p = _MergeParams()
    p.windows = _int(windows, "windows")
    if not (-2**31 <= p.windows < 2**31) or p.windows != windows:
        raise ValueError(f"windows={windows} is out of range")
    p.ratio = _real(ratio, "ratio")
    if grid is None:
        p.grid_rows = p.grid_cols = 0
    else:
        try:
            rows, cols = grid
        except (TypeError, ValueError):
            raise ValueError(f"grid must be (rows, cols) or None, got {grid!r}") from None
        rows, cols = _int(rows, "grid rows"), _int(cols, "grid cols")
        if rows < 1 or cols < 1:
            raise ValueError(f"grid must be positive (rows, cols), got {grid!r}")
        if with_positions:
            if rows * cols < n:
                raise ValueError(f"grid {rows}x{cols} = {rows * cols} cells holds fewer than N = {n} tokens")
            if rows >= 2**62 or cols >= 2**62:
                raise ValueError(f"grid {rows}x{cols} is too large")
        elif rows * cols != n:
            raise ValueError(f"grid {rows}x{cols} = {rows * cols} tokens does not match N = {n}")
        p.grid_rows, p.grid_cols = rows, cols
    if threshold is None:
        p.use_threshold, p.threshold = 0, 0.0
    else:
        p.use_threshold, p.threshold = 1, _real(threshold, "threshold")
        if math.isnan(p.threshold):
            raise ValueError("threshold must not be NaN")
    return p


def _result(lib, res, n: int, d: int) -> MergeResult:
    try:
        m = lib.lightkv_merge_result_rows(res)
        out_x = np.ctypeslib.as_array(lib.lightkv_merge_result_x(res), shape=(m * d,)).reshape(m, d).copy()
        kept = np.ctypeslib.as_array(lib.lightkv_merge_result_kept(res), shape=(m,)).copy()
        assign = np.ctypeslib.as_array(lib.lightkv_merge_result_assign(res), shape=(n,)).copy()
        weight = np.ctypeslib.as_array(lib.lightkv_merge_result_weight(res), shape=(n,)).copy()
    finally:
        lib.lightkv_merge_result_free(res)
    return MergeResult(x=out_x, kept=kept.astype(np.int64, copy=False),
                       assign=assign.astype(np.int64, copy=False), weight=weight)


def lightkv_merge(x, scores, *, windows, ratio, grid=None, threshold=None, positions=None, backend=None,
                  _force_cpu_ops=None) -> MergeResult:
    """One LightKV merge stage of the N vision tokens x [N, D] (see the reference).

    scores: [N] guidance weights >= 0, or None (unguided, all weights 1). windows: windows
    per side. ratio: fraction dropped, in [0, 1). grid: (rows, cols) with rows * cols == N,
    or None (the published square padding). threshold: minimum best-match cosine for a
    merge, or None. backend: a name from backends() ("CPU", "CUDA0", ...), "cpu", "gpu",
    or None for the best available.
    positions: None, or int [N, 2] (row, col) of every token on the ORIGINAL grid `grid`
    (required; N <= rows * cols: the survivors of earlier stages, in ascending original
    order; inside the grid, distinct): true 2D windows of the original grid for a later
    stage of a progressive schedule (as reference.MergeState.step).
    """
    xa = _float32_array(x, "x", 2)
    n, d = xa.shape
    sa = _scores(scores, n)
    p = _params(n, windows, ratio, grid, threshold, positions is not None)
    pa = _positions(positions, n, grid)

    ctx = _context(backend, _force_cpu_ops)
    res = C.c_void_p()
    with ctx.lock:
        if pa is None:
            st = ctx.lib.lightkv_merge_run(ctx.h, _f32p(xa), n, d, None if sa is None else _f32p(sa),
                                           C.byref(p), C.byref(res))
        else:
            st = ctx.lib.lightkv_merge_run_at(ctx.h, _f32p(xa), n, d, None if sa is None else _f32p(sa),
                                              C.byref(p), _i64p(pa), C.byref(res))
        ctx.check(st)
    return _result(ctx.lib, res, n, d)


class MergePlan:
    """A merge fixed for N tokens of D features (window layout and budgets computed once),
    run on many inputs: plan = MergePlan(576, 4096, windows=2, ratio=0.5); plan(x, scores).
    positions / grid as in lightkv_merge (a later stage: true 2D windows of the original grid)."""

    def __init__(self, n, d, *, windows, ratio, grid=None, threshold=None, positions=None, backend=None):
        self.n, self.d = _int(n, "n"), _int(d, "d")
        p = _params(self.n, windows, ratio, grid, threshold, positions is not None)
        pa = _positions(positions, self.n, grid)
        self._ctx = _context(backend)
        lib = self._ctx.lib
        self._h = C.c_void_p()
        with self._ctx.lock:
            if pa is None:
                st = lib.lightkv_merge_plan_create(self._ctx.h, self.n, self.d, C.byref(p), C.byref(self._h))
            else:
                st = lib.lightkv_merge_plan_create_at(self._ctx.h, self.n, self.d, C.byref(p), _i64p(pa),
                                                      C.byref(self._h))
            self._ctx.check(st)
        self.rows_without_threshold = int(lib.lightkv_merge_plan_rows_without_threshold(self._h))

    def __call__(self, x, scores=None) -> MergeResult:
        xa = _float32_array(x, "x", 2)
        if xa.shape != (self.n, self.d):
            raise ValueError(f"x has shape {xa.shape}, the plan was made for ({self.n}, {self.d})")
        sa = _scores(scores, self.n)
        res = C.c_void_p()
        with self._ctx.lock:
            st = self._ctx.lib.lightkv_merge_plan_run(self._h, _f32p(xa), None if sa is None else _f32p(sa),
                                                      C.byref(res))
            self._ctx.check(st)
        return _result(self._ctx.lib, res, self.n, self.d)

    def __del__(self):
        if getattr(self, "_h", None):
            self._ctx.lib.lightkv_merge_plan_free(self._h)
            self._h = None


# ------------------------------------------------------------------------ guidance
def _index(sel, s: int, what: str) -> np.ndarray:
    a = np.asarray(sel.detach().cpu().numpy() if hasattr(sel, "detach") else sel)
    if a.dtype == bool:
        if a.ndim != 1 or a.shape[0] != s:
            raise ValueError(f"{what} mask must have shape [{s}], got {a.shape}")
        return np.ascontiguousarray(np.nonzero(a)[0].astype(np.int64))
    if a.size == 0:
        return np.zeros(0, np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what} must be integer indices or a boolean mask")
    return np.ascontiguousarray(a.reshape(-1).astype(np.int64))


def guidance_scores_from_qk(q, k, vision, text, scale=None, *, backend=None) -> np.ndarray:
    """Per-vision-token guidance from one layer's q [H, S, d] and k [H_kv, S, d] (after RoPE):
    softmax of scale * q k^T over the QUERY axis (no causal mask), rows = vision, columns =
    text, summed over heads and text keys -> float32 [n_vision]. vision/text: index arrays
    or boolean masks over S. scale: default 1/sqrt(d). Grouped-query attention: H_kv must
    divide H; query head h uses key head h // (H / H_kv)."""
    qa = _float32_array(q, "q", 3)
    ka = _float32_array(k, "k", 3)
    h, s, dh = qa.shape
    hk = ka.shape[0]
    if ka.shape[1:] != (s, dh) or hk < 1 or h % hk:
        raise ValueError(f"k shape {ka.shape} does not fit q shape {qa.shape}")
    sc = 1.0 / math.sqrt(dh) if scale is None else _real(scale, "scale")
    if not math.isfinite(sc):
        raise ValueError(f"scale must be finite, got {scale!r}")
    v = _index(vision, s, "vision")
    t = _index(text, s, "text")
    out = np.zeros(v.shape[0], np.float32)
    ctx = _context(backend)
    i64 = C.POINTER(C.c_int64)
    with ctx.lock:
        st = ctx.lib.lightkv_guidance_scores(ctx.h, _f32p(qa), _f32p(ka), h, hk, s, dh,
                                             v.ctypes.data_as(i64), v.shape[0],
                                             t.ctypes.data_as(i64), t.shape[0], sc, _f32p(out))
        ctx.check(st)
    return out
