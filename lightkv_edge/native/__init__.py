"""ctypes binding of liblightkv (native/include/lightkv.h): the LightKV merge and its guidance
score as ggml graphs, on any ggml backend (CPU, CUDA, Metal, Vulkan).

    from lightkv_edge.native import lightkv_merge, guidance_scores_from_qk, backends
    res = lightkv_merge(x, scores, windows=2, ratio=0.5)           # best backend
    res = lightkv_merge(x, None, windows=2, ratio=0.5, backend="CPU")
    model = GuidanceModel("model.gguf")                            # a text model's layer 0
    g = model.scores(image_rows, prompt_token_ids)                 # one ggml graph
    gguf_fields("model.gguf", ["general.architecture"])            # ggml's gguf reader

Same signature and result as lightkv_edge.reference.lightkv_merge, numpy float32 in and
out (other float dtypes are converted). Bad input (and float32 overflow) raises ValueError
with a one-line message; a backend failure (unknown name, compute error) raises
RuntimeError, an allocation failure NativeMemoryError (a RuntimeError and a MemoryError).
"""
from __future__ import annotations

import ctypes as C
import math
import numbers
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

__all__ = ["Capture", "GuidanceModel", "MergePlan", "MergeResult", "NativeMemoryError", "backends",
           "guidance_scores_from_qk", "gguf_fields", "gguf_has_tensor", "lightkv_merge",
           "protect_top", "PROTECT_MODES", "merge_reduce", "ReduceResult", "set_num_threads", "last_n_splits"]

# lightkv_status
_OK, _INVALID, _OOM, _BACKEND, _NUMERIC, _INTERNAL = range(6)
# lightkv_protect_mode, by name: what a protected token is in its window (never a source)
PROTECT_MODES = {"receive": 0, "keep": 1}


class _MergeParams(C.Structure):
    _fields_ = [("windows", C.c_int32), ("ratio", C.c_double), ("grid_rows", C.c_int64),
                ("grid_cols", C.c_int64), ("use_threshold", C.c_int32), ("threshold", C.c_double)]


class _ReduceParams(C.Structure):
    _fields_ = [("target", C.c_int64), ("windows", C.c_int32), ("grid_rows", C.c_int64),
                ("grid_cols", C.c_int64), ("protect_count", C.c_int64), ("protect_mode", C.c_int32)]


class _ContextParams(C.Structure):
    _fields_ = [("backend", C.c_char_p), ("n_threads", C.c_int32), ("force_cpu_ops", C.c_char_p)]


class _Stage(C.Structure):
    _fields_ = [("layer", C.c_int32), ("windows", C.c_int32), ("ratio", C.c_double)]


class _ScheduleParams(C.Structure):
    _fields_ = [("stages", C.POINTER(_Stage)), ("n_stages", C.c_int32),
                ("use_threshold", C.c_int32), ("threshold", C.c_double),
                ("kv", C.c_int32), ("positions", C.c_int32)]


class _Segment(C.Structure):
    _fields_ = [("kind", C.c_int32), ("n", C.c_int64), ("tokens", C.POINTER(C.c_int32)),
                ("embd", C.POINTER(C.c_float)), ("pos", C.POINTER(C.c_int32)), ("n_pos", C.c_int32),
                ("grid_rows", C.c_int64), ("grid_cols", C.c_int64), ("cells", C.POINTER(C.c_int64)),
                ("non_causal", C.c_int32)]


class _LayerPrefillParams(C.Structure):
    _fields_ = [("schedule", C.c_void_p), ("protect", C.c_double), ("turn_start", C.c_int32),
                ("observe_layers", C.POINTER(C.c_int32)), ("n_observe", C.c_int32),
                ("n_batch", C.c_int32)]


class _GuidanceInfo(C.Structure):
    _fields_ = [("n_embd", C.c_int64), ("n_embd_inp", C.c_int64), ("n_vocab", C.c_int64),
                ("n_head", C.c_int64), ("n_head_kv", C.c_int64), ("head_dim", C.c_int64),
                ("layer", C.c_int32), ("weight_type", C.c_int32), ("has_q_bias", C.c_int32),
                ("has_k_bias", C.c_int32), ("has_q_norm", C.c_int32), ("has_k_norm", C.c_int32),
                ("rms_eps", C.c_float), ("kq_scale", C.c_float), ("text_scale", C.c_float),
                ("vision_scale", C.c_float), ("arch", C.c_char * 64)]


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
        u8p = C.POINTER(C.c_uint8)
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
            "lightkv_merge_plan_create_protected": (C.c_int, [p_ctx, C.c_int64, C.c_int64, C.POINTER(_MergeParams),
                                                              i64p, u8p, C.c_int32, C.POINTER(C.c_void_p)]),
            "lightkv_merge_run_protected": (C.c_int, [p_ctx, f32p, C.c_int64, C.c_int64, f32p,
                                                      C.POINTER(_MergeParams), i64p, u8p, C.c_int32,
                                                      C.POINTER(p_res)]),
            "lightkv_protect_top": (C.c_int, [f32p, C.c_int64, C.c_int64, u8p]),
            "lightkv_merge_run_budget": (C.c_int, [p_ctx, f32p, C.c_int64, C.c_int64, f32p,
                                                   C.POINTER(_MergeParams), i64p, C.c_double,
                                                   C.POINTER(p_res)]),
            "lightkv_merge_reduce": (C.c_int, [p_ctx, f32p, C.c_int64, C.c_int64, f32p,
                                               C.POINTER(_ReduceParams), C.POINTER(p_res)]),
            "lightkv_merge_result_stages": (C.c_int32, [p_res, C.POINTER(C.c_int32), i64p, C.c_int32]),
            "lightkv_merge_result_work": (C.c_int, [p_res, i64p, i64p, i64p]),
            "lightkv_merge_plan_run": (C.c_int, [C.c_void_p, f32p, f32p, C.POINTER(p_res)]),
            "lightkv_merge_plan_free": (None, [C.c_void_p]),
            "lightkv_merge_plan_rows_without_threshold": (C.c_int64, [C.c_void_p]),
            "lightkv_merge_plan_stats": (C.c_int, [C.c_void_p, i64p, i64p, i64p]),
            "lightkv_merge_result_rows": (C.c_int64, [p_res]),
            "lightkv_merge_result_x": (f32p, [p_res]),
            "lightkv_merge_result_kept": (i64p, [p_res]),
            "lightkv_merge_result_assign": (i64p, [p_res]),
            "lightkv_merge_result_weight": (f32p, [p_res]),
            "lightkv_merge_result_free": (None, [p_res]),
            "lightkv_guidance_scores": (C.c_int, [p_ctx, f32p, f32p, C.c_int64, C.c_int64, C.c_int64,
                                                  C.c_int64, i64p, C.c_int64, i64p, C.c_int64,
                                                  C.c_float, f32p]),
            "lightkv_attention_received": (C.c_int, [p_ctx, f32p, f32p, C.c_int64, C.c_int64, C.c_int64,
                                                     C.c_int64, C.c_int64, C.POINTER(C.c_int32),
                                                     C.POINTER(C.c_int32), C.c_float, f32p]),
            "lightkv_capture_create": (C.c_int, [p_ctx, C.POINTER(C.c_void_p)]),
            "lightkv_capture_free": (None, [C.c_void_p]),
            "lightkv_capture_want": (C.c_int, [C.c_void_p, C.POINTER(C.c_int32), C.POINTER(C.c_int32),
                                               C.c_int32]),
            "lightkv_capture_reset": (C.c_int, [C.c_void_p]),
            "lightkv_capture_eval": (C.c_bool, [C.c_void_p, C.c_bool, C.c_void_p]),
            "lightkv_capture_graph": (None, [C.c_void_p, C.c_bool, C.c_void_p]),
            "lightkv_capture_shape": (C.c_int, [C.c_void_p, C.c_int32, C.c_int32, i64p, i64p, i64p]),
            "lightkv_capture_stats": (C.c_int, [C.c_void_p, i64p, i64p, i64p, i64p]),
            "lightkv_capture_read": (C.c_int, [C.c_void_p, C.c_int32, C.c_int32, C.c_int64, C.c_int64,
                                               f32p]),
            "lightkv_capture_guidance": (C.c_int, [C.c_void_p, C.c_int32, i64p, C.c_int64, i64p,
                                                   C.c_int64, C.c_float, f32p]),
            "lightkv_capture_attention_received": (C.c_int, [C.c_void_p, C.c_int32, C.c_int64,
                                                             C.POINTER(C.c_int32), C.c_int64,
                                                             C.POINTER(C.c_int32), C.POINTER(C.c_int32),
                                                             C.c_float, f32p]),
            "lightkv_gguf_open": (C.c_int, [C.c_char_p, C.POINTER(C.c_void_p)]),
            "lightkv_gguf_free": (None, [C.c_void_p]),
            "lightkv_gguf_value": (C.c_int, [C.c_void_p, C.c_char_p, C.POINTER(C.c_int32), i64p,
                                             C.POINTER(C.c_double), C.POINTER(C.c_char_p)]),
            "lightkv_gguf_has_tensor": (C.c_int32, [C.c_void_p, C.c_char_p]),
            "lightkv_guidance_model_create": (C.c_int, [p_ctx, C.c_char_p, C.c_int32, C.POINTER(C.c_void_p)]),
            "lightkv_guidance_model_free": (None, [C.c_void_p]),
            "lightkv_guidance_model_info": (C.c_int, [C.c_void_p, C.POINTER(_GuidanceInfo)]),
            "lightkv_guidance_model_scores": (C.c_int, [C.c_void_p, f32p, C.c_int64, C.POINTER(C.c_int32),
                                                        C.c_int64, f32p]),
            "lightkv_policies_check": (C.c_int, [C.c_int32, C.c_int32]),
            "lightkv_schedule_create": (C.c_int, [C.POINTER(_ScheduleParams), C.c_int32,
                                                  C.POINTER(C.c_void_p)]),
            "lightkv_schedule_free": (None, [C.c_void_p]),
            "lightkv_schedule_check_grid": (C.c_int, [C.c_void_p, C.c_int64, C.c_int64]),
            "lightkv_schedule_keep_fraction": (C.c_double, [C.c_void_p]),
            "lightkv_schedule_report_create": (C.c_int, [C.c_void_p, C.c_int64,
                                                         C.POINTER(C.c_void_p)]),
            "lightkv_schedule_report_free": (None, [C.c_void_p]),
            "lightkv_schedule_report_stage": (C.c_int, [C.c_void_p, C.c_int64, C.c_int64]),
            "lightkv_schedule_report_cells": (C.c_int, [C.c_void_p, C.c_int64, C.c_int64]),
            "lightkv_schedule_report_n_stages": (C.c_int32, [C.c_void_p]),
            "lightkv_schedule_report_stage_rows": (C.c_int, [C.c_void_p, C.c_int32, i64p, i64p]),
            "lightkv_schedule_report_keep_fraction": (C.c_double, [C.c_void_p]),
            "lightkv_schedule_report_cells_freed": (C.c_int64, [C.c_void_p]),
            "lightkv_layer_mode_check": (C.c_int, [C.c_void_p]),
            "lightkv_layer_prefill_check": (C.c_int, [C.c_void_p, C.POINTER(_Segment), C.c_int32,
                                                      C.POINTER(_LayerPrefillParams)]),
            "lightkv_layer_prefill_run": (C.c_int, [C.c_void_p, C.c_void_p, C.POINTER(_Segment),
                                                    C.c_int32, C.POINTER(_LayerPrefillParams),
                                                    C.POINTER(C.c_void_p)]),
            "lightkv_layer_prefill_free": (None, [C.c_void_p]),
            "lightkv_layer_prefill_logits": (f32p, [C.c_void_p, C.POINTER(C.c_int32)]),
            "lightkv_layer_prefill_rows": (C.c_int64, [C.c_void_p]),
            "lightkv_layer_prefill_positions": (C.POINTER(C.c_int32), [C.c_void_p, C.POINTER(C.c_int32)]),
            "lightkv_layer_prefill_n_caches": (C.c_int32, [C.c_void_p]),
            "lightkv_layer_prefill_cells": (C.POINTER(C.c_int32), [C.c_void_p, C.c_int32]),
            "lightkv_layer_prefill_n_images": (C.c_int32, [C.c_void_p]),
            "lightkv_layer_prefill_kept": (i64p, [C.c_void_p, C.c_int32, i64p]),
            "lightkv_layer_prefill_n_ranges": (C.c_int32, [C.c_void_p]),
            "lightkv_layer_prefill_range": (C.POINTER(C.c_int32), [C.c_void_p, C.c_int32, C.c_int32,
                                                                   C.POINTER(C.c_int32),
                                                                   C.POINTER(C.c_int32), i64p]),
            "lightkv_layer_prefill_report": (C.c_void_p, [C.c_void_p]),
            "lightkv_layer_prefill_times": (None, [C.c_void_p, C.POINTER(C.c_double),
                                                   C.POINTER(C.c_double), C.POINTER(C.c_double)]),
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
        # lightkv_merge's plans, by their parameters (LRU, freed before the context): a
        # repeated merge of the same shape reuses the window layout and the similarity graph
        self.plans: OrderedDict[tuple, C.c_void_p] = OrderedDict()

    def plan(self, key: tuple, create) -> C.c_void_p:
        """The cached plan for key, or create() -> a new one (the least recently used goes
        when there are more than _PLAN_CACHE). Call with self.lock held."""
        h = self.plans.get(key)
        if h is not None:
            self.plans.move_to_end(key)
            return h
        h = create()
        self.plans[key] = h
        while len(self.plans) > _PLAN_CACHE:
            _, old = self.plans.popitem(last=False)
            self.lib.lightkv_merge_plan_free(old)
        return h

    def __del__(self):
        if getattr(self, "h", None):
            for h in getattr(self, "plans", {}).values():
                self.lib.lightkv_merge_plan_free(h)
            self.plans = OrderedDict()
            self.lib.lightkv_context_free(self.h)
            self.h = None

    def check(self, status: int):
        if status != _OK:
            _raise(status, self.lib.lightkv_last_error(self.h))


_PLAN_CACHE = 8   # merge plans kept per context (a few image sizes x merge stages)
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
    if n > 1:
        # duplicates by the sorted row-major cell index, a 1-D sort ~8x cheaper than
        # np.unique(axis=0) at the embedded model's 64 rows; grids too large for an int64
        # cell index (only in tests) compare the pairs
        if rows * cols < 2**63:
            cell = np.sort(a[:, 0] * cols + a[:, 1])
            dup = bool((cell[1:] == cell[:-1]).any())
        else:
            dup = np.unique(a, axis=0).shape[0] != n
        if dup:
            raise ValueError("positions contain duplicates")
    return a


def _i64p(a: np.ndarray):
    return a.ctypes.data_as(C.POINTER(C.c_int64))


def _protection(protected, n: int, mode) -> tuple[np.ndarray | None, int]:
    """(protected mask as uint8 [n] or None, lightkv_protect_mode), checked: ValueError if bad."""
    if mode not in PROTECT_MODES:
        raise ValueError(f"protect_mode must be one of {', '.join(PROTECT_MODES)}, got {mode!r}")
    if protected is None:
        return None, PROTECT_MODES[mode]
    a = np.asarray(protected.detach().cpu().numpy() if hasattr(protected, "detach") else protected)
    if a.dtype != bool:
        raise ValueError(f"protected must be a boolean mask, got dtype {a.dtype}")
    if a.shape != (n,):
        raise ValueError(f"protected must have shape [{n}], got {a.shape}")
    return np.ascontiguousarray(a, dtype=np.uint8), PROTECT_MODES[mode]


def _u8p(a: np.ndarray | None):
    return None if a is None else a.ctypes.data_as(C.POINTER(C.c_uint8))


def protect_top(scores, count) -> np.ndarray:
    """The protected set of LightKV-protect (the reference's rule, computed by liblightkv):
    a boolean [N] mask of the `count` highest scores, equal scores to the lower index.
    scores [N] finite, >= 0; count in [0, N]."""
    sa = _float32_array(scores, "scores", 1)
    n = sa.shape[0]
    count = _int(count, "count")
    if not 0 <= count <= n:
        raise ValueError(f"count must be in [0, {n}], got {count}")
    out = np.zeros(n, np.uint8)
    lib = _load()
    st = lib.lightkv_protect_top(_f32p(sa), n, count, _u8p(out))
    if st != _OK:
        _raise(st, lib.lightkv_last_error(None))
    return out.astype(bool)


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
                  protected=None, protect_mode="receive", _force_cpu_ops=None) -> MergeResult:
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
    protected: None, or bool [N]: tokens that are never sources (LightKV-protect; choose them
    with protect_top). protect_mode: "receive" (they stay destinations, the default) or
    "keep" (no role: they pass untouched). As reference.variants.protected_stage.
    """
    xa = _float32_array(x, "x", 2)
    n, d = xa.shape
    sa = _scores(scores, n)
    p = _params(n, windows, ratio, grid, threshold, positions is not None)
    pa = _positions(positions, n, grid)
    ma, mode = _protection(protected, n, protect_mode)

    ctx = _context(backend, _force_cpu_ops)
    res = C.c_void_p()
    if ma is not None:
        # a protected set is the prompt's own: it almost never repeats, so a cached plan would
        # only be built, used once and evicted; a one-shot run shares the context's scheduler
        with ctx.lock:
            st = ctx.lib.lightkv_merge_run_protected(ctx.h, _f32p(xa), n, d,
                                                     None if sa is None else _f32p(sa), C.byref(p),
                                                     None if pa is None else _i64p(pa), _u8p(ma),
                                                     mode, C.byref(res))
            ctx.check(st)
        return _result(ctx.lib, res, n, d)
    key = (n, d, p.windows, p.ratio, p.grid_rows, p.grid_cols, p.use_threshold, p.threshold,
           None if pa is None else pa.tobytes())

    def create():
        h = C.c_void_p()
        if pa is None:
            st = ctx.lib.lightkv_merge_plan_create(ctx.h, n, d, C.byref(p), C.byref(h))
        else:
            st = ctx.lib.lightkv_merge_plan_create_at(ctx.h, n, d, C.byref(p), _i64p(pa), C.byref(h))
        ctx.check(st)
        return h

    with ctx.lock:
        plan = ctx.plan(key, create)
        st = ctx.lib.lightkv_merge_plan_run(plan, _f32p(xa), None if sa is None else _f32p(sa), C.byref(res))
        ctx.check(st)
    return _result(ctx.lib, res, n, d)


def merge_to_budget(x, scores, *, windows, ratio, protect, grid=None, positions=None,
                    backend=None) -> MergeResult:
    """One layer-mode stage kept to the published stage's budget with LightKV-protect
    (lightkv_merge_run_budget; spec: reference MergeState.step(protect=...)): x [N, D],
    scores [N] (required when protect > 0), windows / ratio / grid / positions as
    lightkv_merge (the published stage whose kept count is the budget), protect in [0, 1]:
    the share of the budget never merged away. kept indexes the input rows."""
    xa = _float32_array(x, "x", 2)
    n, d = xa.shape
    sa = _scores(scores, n)
    p = _params(n, windows, ratio, grid, None, positions is not None)
    pa = _positions(positions, n, grid)
    ctx = _context(backend)
    res = C.c_void_p()
    with ctx.lock:
        ctx.check(ctx.lib.lightkv_merge_run_budget(
            ctx.h, _f32p(xa), n, d, None if sa is None else _f32p(sa), C.byref(p),
            None if pa is None else _i64p(pa), _real(protect, "protect"), C.byref(res)))
    return _result(ctx.lib, res, n, d)


@dataclass(frozen=True)
class ReduceResult(MergeResult):
    """A MergeResult over the original tokens, plus the stages that ran: (windows per side,
    rows left) each, and what the call did (test counters, lightkv_merge_result_work):
    {"graphs": computed, "graph_allocs": graph allocations, "buffers": backend buffers
    allocated for inputs and graphs}."""

    stages: tuple
    work: dict


def merge_reduce(x, scores, *, target, windows, grid=None, protect_count=0,
                 protect_mode="receive", backend=None) -> ReduceResult:
    """Embed mode's whole progressive merge of one image in one native call
    (lightkv_merge_reduce): stages of the merge on what is left until `target` rows remain,
    true 2D windows of the original grid (`windows` per side at first, clamped to the grid,
    one window once a stage merges nothing), ratio min((m - target) / m + 1e-9, 0.5) per
    stage, the `protect_count` highest-scored rows never sources (protect_mode as
    lightkv_merge), a merged row carrying the summed scores of what it absorbed.

    x [N, D]; scores [N] >= 0 or None (unguided); grid (rows, cols) with rows * cols == N,
    or None (the published square padding). As reference.variants.protected_reduce."""
    xa = _float32_array(x, "x", 2)
    n, d = xa.shape
    sa = _scores(scores, n)
    if protect_mode not in PROTECT_MODES:
        raise ValueError(f"protect_mode must be one of {', '.join(PROTECT_MODES)}, got {protect_mode!r}")
    p = _ReduceParams()
    p.target = _int(target, "target")
    p.windows = _int(windows, "windows")
    if not 1 <= p.windows == windows:
        raise ValueError(f"windows must be >= 1, got {windows!r}")
    if grid is None:
        p.grid_rows = p.grid_cols = 0
    else:
        rows, cols = grid
        p.grid_rows, p.grid_cols = _int(rows, "grid rows"), _int(cols, "grid cols")
    p.protect_count = _int(protect_count, "protect_count")
    p.protect_mode = PROTECT_MODES[protect_mode]
    ctx = _context(backend, None)
    res = C.c_void_p()
    with ctx.lock:
        ctx.check(ctx.lib.lightkv_merge_reduce(ctx.h, _f32p(xa), n, d,
                                               None if sa is None else _f32p(sa), C.byref(p),
                                               C.byref(res)))
        k = ctx.lib.lightkv_merge_result_stages(res, None, None, 0)
        win, rows_left = (C.c_int32 * max(k, 1))(), (C.c_int64 * max(k, 1))()
        ctx.lib.lightkv_merge_result_stages(res, win, rows_left, k)
        stages = tuple((int(win[i]), int(rows_left[i])) for i in range(k))
        counts = [C.c_int64() for _ in range(3)]
        ctx.lib.lightkv_merge_result_work(res, *(C.byref(c) for c in counts))
        work = dict(zip(("graphs", "graph_allocs", "buffers"), (c.value for c in counts)))
        r = _result(ctx.lib, res, n, d)
    return ReduceResult(x=r.x, kept=r.kept, assign=r.assign, weight=r.weight, stages=stages,
                        work=work)


def plan_cache_stats(backend: str | None = None) -> list[dict]:
    """What each plan cached by lightkv_merge on that context has done (tests): runs,
    uploads of its constant inputs, buffers and graph allocations made for it."""
    ctx = _context(backend)
    out = []
    with ctx.lock:
        for h in ctx.plans.values():
            out.append(_plan_stats(ctx.lib, h))
    return out


def _plan_stats(lib, h) -> dict:
    runs, uploads, allocs = C.c_int64(), C.c_int64(), C.c_int64()
    st = lib.lightkv_merge_plan_stats(h, C.byref(runs), C.byref(uploads), C.byref(allocs))
    if st != _OK:
        _raise(st, lib.lightkv_last_error(None))
    return {"runs": runs.value, "const_uploads": uploads.value, "allocs": allocs.value}


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

    def stats(self) -> dict:
        """Test counters: runs, uploads of the plan's constant inputs, allocations made for it."""
        with self._ctx.lock:
            return _plan_stats(self._ctx.lib, self._h)

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


def attention_received(q, k, q_pos, k_pos, scale=None, *, backend=None) -> np.ndarray:
    """Attention each key receives from a window of queries (KV eviction's importance),
    as one ggml graph: r_j = sum_h sum_i softmax over the keys of scale * q_h[i] . k[j],
    where query i sees key j only if k_pos[j] <= q_pos[i] (llama.cpp's causal mask).
    q [H, W, d], k [H_kv, N, d] (after RoPE; query head h uses key head h // (H / H_kv));
    q_pos [W], k_pos [N] integers; every query must see a key. -> float32 [N]."""
    qa = _float32_array(q, "q", 3)
    ka = _float32_array(k, "k", 3)
    h, w, dh = qa.shape
    hk, n = ka.shape[0], ka.shape[1]
    if ka.shape[2] != dh or hk < 1 or h % hk:
        raise ValueError(f"k shape {ka.shape} does not fit q shape {qa.shape}")
    qp = np.ascontiguousarray(q_pos, dtype=np.int32)
    kp = np.ascontiguousarray(k_pos, dtype=np.int32)
    if qp.shape != (w,) or kp.shape != (n,):
        raise ValueError(f"q_pos must be [{w}] and k_pos [{n}], got {qp.shape}, {kp.shape}")
    sc = 1.0 / math.sqrt(dh) if scale is None else _real(scale, "scale")
    out = np.zeros(n, np.float32)
    ctx = _context(backend)
    i32 = C.POINTER(C.c_int32)
    with ctx.lock:
        st = ctx.lib.lightkv_attention_received(ctx.h, _f32p(qa), _f32p(ka), h, hk, w, n, dh,
                                                qp.ctypes.data_as(i32), kp.ctypes.data_as(i32),
                                                sc, _f32p(out))
        ctx.check(st)
    return out


# ------------------------------------------------------------------------ Q/K capture
class Capture:
    """Q/K of llama.cpp's graphs, copied by liblightkv (C: no Python per graph node) into
    tensors on this lightkv backend, appended along the token axis over micro-batches and
    decodes until reset(); read with one graph each:

        cap = Capture(backend="CPU")
        cap.want({3: "qk"})                                   # Qcur-3 and Kcur-3
        llama_set_graph_hook(lctx, cap.graph_hook, cap.handle)   # after every want()
        ... llama_decode ...
        g = cap.guidance(3, vision_rows, text_rows)           # [V] to the host, nothing else

    graph_hook (lightkv_capture_graph, patch 0007's hook: the graph computes in one piece) or
    callback (lightkv_capture_eval, the eval callback: each wanted node splits the compute);
    layer_mode.attach_capture sets the right one. Layer numbers and kinds are checked in
    liblightkv (ValueError, one line); a failure inside llama.cpp's compute (a node of another
    shape, out of memory, a wanted node the graph did not keep) is raised by the next read.
    Unset the hook or callback before the capture goes (close() or garbage collection)."""

    _KINDS = {"q": 1, "k": 2}
    _LETTERS = {"q": 1, "k": 2, "c": 4}    # c: the layer's K cache tensor (no rows)

    def __init__(self, *, backend: str | None = None):
        self._ctx = _context(backend)
        lib = self._ctx.lib
        self._h = C.c_void_p()
        with self._ctx.lock:
            self._ctx.check(lib.lightkv_capture_create(self._ctx.h, C.byref(self._h)))
        # the C functions' addresses: what llama_set_eval_callback / llama_set_graph_hook take
        self.callback = C.cast(lib.lightkv_capture_eval, C.c_void_p)
        self.graph_hook = C.cast(lib.lightkv_capture_graph, C.c_void_p)
        self.backend = self._ctx.name

    @property
    def handle(self) -> C.c_void_p:
        """The capture's C handle (the callback's user_data)."""
        if not self._h:
            raise ValueError("the capture is closed")
        return self._h

    def _call(self, fn, *args):
        h = self.handle
        with self._ctx.lock:
            self._ctx.check(fn(h, *args))

    @classmethod
    def _kind(cls, kind) -> int:
        if kind not in ("q", "k"):
            raise ValueError(f"kind must be 'q' or 'k', got {kind!r}")
        return cls._KINDS[kind]

    def want(self, layers: dict) -> None:
        """Capture from now on {layer: letters}, letters of "q" (Qcur rows), "k" (Kcur
        rows), "c" (the layer's K cache, for attention_received), e.g. "qk" or "qc"; an
        empty dict: nothing."""
        if not isinstance(layers, dict):
            raise ValueError(f"layers must be a dict {{layer: letters of 'qkc'}}, got {layers!r}")
        ls, ks = [], []
        for layer, kinds in layers.items():
            ls.append(_int(layer, "layer"))
            if not isinstance(kinds, str) or not kinds or len(set(kinds)) != len(kinds) or \
                    not set(kinds) <= set(self._LETTERS):
                raise ValueError(f"what to capture of layer {layer} must be letters of 'qkc' "
                                 f"(each once), got {kinds!r}")
            ks.append(sum(self._LETTERS[c] for c in kinds))
        if not all(-2**31 <= x < 2**31 for x in ls):
            raise ValueError(f"layers out of range: {ls}")
        la = np.asarray(ls, np.int32)
        ka = np.asarray(ks, np.int32)
        i32 = C.POINTER(C.c_int32)
        self._call(self._ctx.lib.lightkv_capture_want, la.ctypes.data_as(i32), ka.ctypes.data_as(i32),
                   len(ls))

    def reset(self) -> None:
        """Forget every captured row (and a failure kept from the callback)."""
        self._call(self._ctx.lib.lightkv_capture_reset)

    def shape(self, layer: int, kind: str = "q") -> tuple[int, int, int]:
        """(rows captured, heads, head_dim) of Qcur / Kcur of layer ((0, 0, 0) when none)."""
        r, h, d = C.c_int64(), C.c_int64(), C.c_int64()
        self._call(self._ctx.lib.lightkv_capture_shape, _int(layer, "layer"), self._kind(kind),
                   C.byref(r), C.byref(h), C.byref(d))
        return r.value, h.value, d.value

    def rows(self, layer: int, kind: str = "q") -> int:
        return self.shape(layer, kind)[0]

    def stats(self) -> dict:
        """Counters: nodes the eval callback was asked about and answered 'wanted' (each a
        piece of a graph computed apart), nodes the graph hook marked as outputs (per graph
        built), copies made."""
        a, w, m, c = C.c_int64(), C.c_int64(), C.c_int64(), C.c_int64()
        self._call(self._ctx.lib.lightkv_capture_stats, C.byref(a), C.byref(w), C.byref(m), C.byref(c))
        return {"asked": a.value, "wanted": w.value, "marked": m.value, "copied": c.value}

    def read(self, layer: int, kind: str = "q") -> np.ndarray:
        """Host copy of every captured row: float32 [rows, heads, head_dim] (tests)."""
        n, h, d = self.shape(layer, kind)
        out = np.zeros((n, h, d), np.float32)
        self._call(self._ctx.lib.lightkv_capture_read, _int(layer, "layer"), self._kind(kind), 0, n,
                   _f32p(out))
        return out

    def guidance(self, layer: int, vision, text, scale=None) -> np.ndarray:
        """guidance_scores_from_qk of layer's captured Q and K (the captured rows are the
        sequence), computed on the backend: float32 [n_vision]. scale: default 1/sqrt(d)."""
        n, _, d = self.shape(layer, "q")
        sc = (1.0 / math.sqrt(d) if d else 1.0) if scale is None else _real(scale, "scale")
        v = _index(vision, n, "vision")
        t = _index(text, n, "text")
        out = np.zeros(v.shape[0], np.float32)
        i64 = C.POINTER(C.c_int64)
        self._call(self._ctx.lib.lightkv_capture_guidance, _int(layer, "layer"), v.ctypes.data_as(i64),
                   v.shape[0], t.ctypes.data_as(i64), t.shape[0], sc, _f32p(out))
        return out

    def attention_received(self, layer: int, cells, q_pos, k_pos, scale=None) -> np.ndarray:
        """attention_received with the queries = the last len(q_pos) captured Q rows of
        layer and the keys = rows `cells` of layer's K cache (wanted with "c" during the
        decodes), read where llama.cpp keeps them: float32 [len(cells)]. k_pos: the cells'
        positions. scale: default 1/sqrt(head_dim)."""
        ca = np.asarray(cells)
        if ca.ndim != 1 or (ca.size and not np.issubdtype(ca.dtype, np.integer)):
            raise ValueError(f"cells must be a 1-D integer array, got {ca.dtype} {ca.shape}")
        ca = np.ascontiguousarray(ca, dtype=np.int32)
        qp = np.ascontiguousarray(q_pos, dtype=np.int32).reshape(-1)
        kp = np.ascontiguousarray(k_pos, dtype=np.int32)
        if kp.shape != ca.shape:
            raise ValueError(f"k_pos must be [{ca.shape[0]}], got {kp.shape}")
        _, _, d = self.shape(layer, "q")
        sc = (1.0 / math.sqrt(d) if d else 1.0) if scale is None else _real(scale, "scale")
        out = np.zeros(ca.shape[0], np.float32)
        i32 = C.POINTER(C.c_int32)
        self._call(self._ctx.lib.lightkv_capture_attention_received, _int(layer, "layer"), qp.shape[0],
                   ca.ctypes.data_as(i32), ca.shape[0], qp.ctypes.data_as(i32), kp.ctypes.data_as(i32),
                   sc, _f32p(out))
        return out

    def close(self) -> None:
        """Free the capture (llama.cpp must not hold its callback any more)."""
        if getattr(self, "_h", None):
            self._ctx.lib.lightkv_capture_free(self._h)
            self._h = None

    def __del__(self):
        self.close()


# ------------------------------------------------------------------------ GGUF metadata
_KIND_ABSENT, _KIND_INT, _KIND_FLOAT, _KIND_BOOL, _KIND_STRING, _KIND_ARRAY = range(6)


def _path_arg(path) -> bytes:
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise ValueError(f"path must be a string or a path, got {type(path).__name__}")
    return os.fsencode(path)


def gguf_fields(path, keys) -> dict:
    """Metadata values of a GGUF file, read by ggml's own gguf reader in C (the header, the
    key/values and the tensor infos; no tensor data): {key: str | int | float | bool | None
    (absent)}. An array value raises ValueError (not needed so far). A file that is not a
    readable GGUF raises ValueError with ggml's reason."""
    lib = _load()
    h = C.c_void_p()
    st = lib.lightkv_gguf_open(_path_arg(path), C.byref(h))
    if st != _OK:
        _raise(st, lib.lightkv_last_error(None))
    out = {}
    try:
        kind, iv, fv, sv = C.c_int32(), C.c_int64(), C.c_double(), C.c_char_p()
        for key in keys:
            st = lib.lightkv_gguf_value(h, key.encode(), C.byref(kind), C.byref(iv), C.byref(fv), C.byref(sv))
            if st != _OK:
                _raise(st, lib.lightkv_last_error(None))
            k = kind.value
            if k == _KIND_ARRAY:
                raise ValueError(f"{key} is an array of {iv.value} values in {os.fspath(path)}")
            out[key] = {_KIND_ABSENT: None, _KIND_INT: iv.value, _KIND_FLOAT: fv.value,
                        _KIND_BOOL: bool(iv.value),
                        _KIND_STRING: (sv.value or b"").decode("utf-8", "replace")}[k]
    finally:
        lib.lightkv_gguf_free(h)
    return out


def gguf_has_tensor(path, name: str) -> bool:
    """Whether a GGUF file has a tensor of that name (ggml's gguf reader, no data read)."""
    lib = _load()
    h = C.c_void_p()
    st = lib.lightkv_gguf_open(_path_arg(path), C.byref(h))
    if st != _OK:
        _raise(st, lib.lightkv_last_error(None))
    try:
        return bool(lib.lightkv_gguf_has_tensor(h, name.encode()))
    finally:
        lib.lightkv_gguf_free(h)


# ------------------------------------------------------------------------ guidance model
class GuidanceModel:
    """One layer's attention input of a llama.cpp text model (layer 0 by default), read from
    its GGUF by liblightkv (weights in their stored type on the context's backend), and the
    guidance of image rows from a prompt's tokens through it, as one ggml graph:

        model = GuidanceModel("model.gguf")
        g = model.scores(image_rows, token_ids)   # float32 [N]

    image_rows [N, n_embd_inp] float (what libmtmd gives the LLM); token_ids [T] ints (the
    prompt's tokens, looked up in the model's own token_embd). Unsupported models (no separate
    attn_q/attn_k, LayerNorm models) raise ValueError with one line."""

    _INFO = ("n_embd", "n_embd_inp", "n_vocab", "n_head", "n_head_kv", "head_dim", "layer",
             "weight_type", "rms_eps", "kq_scale", "text_scale", "vision_scale")

    def __init__(self, gguf_path, *, layer: int = 0, backend: str | None = None):
        layer = _int(layer, "layer")
        if not 0 <= layer < 2**31:
            raise ValueError(f"layer must be >= 0, got {layer}")
        self._ctx = _context(backend)
        lib = self._ctx.lib
        self._h = C.c_void_p()
        with self._ctx.lock:
            st = lib.lightkv_guidance_model_create(self._ctx.h, _path_arg(gguf_path), layer, C.byref(self._h))
            self._ctx.check(st)
            info = _GuidanceInfo()
            self._ctx.check(lib.lightkv_guidance_model_info(self._h, C.byref(info)))
        for name in self._INFO:
            setattr(self, name, getattr(info, name))
        self.arch = info.arch.decode()
        self.has_q_bias, self.has_k_bias = bool(info.has_q_bias), bool(info.has_k_bias)
        self.has_q_norm, self.has_k_norm = bool(info.has_q_norm), bool(info.has_k_norm)
        self.backend = self._ctx.name

    def scores(self, vision, text_tokens) -> np.ndarray:
        """Guidance of every image row (float32 [N]); an empty prompt gives zeros."""
        va = _float32_array(vision, "vision", 2)
        if va.shape[1] != self.n_embd_inp:
            raise ValueError(f"vision rows have {va.shape[1]} columns, the model's input has {self.n_embd_inp}")
        ta = np.asarray(text_tokens.detach().cpu().numpy() if hasattr(text_tokens, "detach") else text_tokens)
        if ta.size == 0:
            ta = np.zeros(0, np.int32)
        if ta.ndim != 1 or ta.dtype == bool or not np.issubdtype(ta.dtype, np.integer):
            raise ValueError(f"text_tokens must be a 1-D integer array, got {ta.dtype} {ta.shape}")
        if ta.size and (ta.min() < 0 or ta.max() >= self.n_vocab):
            raise ValueError(f"token ids must be in [0, {self.n_vocab}), got {int(ta.min())}..{int(ta.max())}")
        ta = np.ascontiguousarray(ta, dtype=np.int32)
        out = np.zeros(va.shape[0], np.float32)
        with self._ctx.lock:
            st = self._ctx.lib.lightkv_guidance_model_scores(
                self._h, _f32p(va), va.shape[0], ta.ctypes.data_as(C.POINTER(C.c_int32)), ta.shape[0], _f32p(out))
            self._ctx.check(st)
        return out

    def __del__(self):
        if getattr(self, "_h", None):
            self._ctx.lib.lightkv_guidance_model_free(self._h)
            self._h = None


# ------------------------------------------------------------------ layer mode's schedule
KV_POLICIES = {"compact": 0, "exact": 1}          # lightkv_kv_policy
POSITION_POLICIES = {"keep": 0, "renumber": 1}    # lightkv_positions_policy


def _policy_ids(kv: str, positions: str) -> tuple[int, int]:
    if positions not in POSITION_POLICIES:
        raise ValueError(f"positions must be one of {', '.join(POSITION_POLICIES)}, "
                         f"got {positions!r}")
    if kv not in KV_POLICIES:
        raise ValueError(f"KV policy {kv!r} is not available in layer mode "
                         f"(built: {', '.join(KV_POLICIES)})")
    return KV_POLICIES[kv], POSITION_POLICIES[positions]


def check_layer_policies(kv: str, positions: str) -> None:
    """The KV and position policies of layer mode, alone (lightkv_policies_check)."""
    lib = _load()
    st = lib.lightkv_policies_check(*_policy_ids(kv, positions))
    if st:
        _raise(st, lib.lightkv_last_error(None))


class LayerSchedule:
    """A validated layer-mode schedule (liblightkv's lightkv_schedule): stages of
    (layer, windows, ratio) for a model of n_layer layers, with the KV and position
    policies. Bad values raise ValueError naming them."""

    def __init__(self, stages, n_layer: int, *, kv: str = "compact", positions: str = "keep",
                 threshold: float | None = None):
        lib = _load()
        kv_id, pos_id = _policy_ids(kv, positions)
        arr = (_Stage * max(1, len(stages)))(*[_Stage(int(layer), int(w), float(r))
                                                for layer, w, r in stages])
        p = _ScheduleParams(arr, len(stages), threshold is not None,
                            0.0 if threshold is None else float(threshold), kv_id, pos_id)
        h = C.c_void_p()
        st = lib.lightkv_schedule_create(C.byref(p), int(n_layer), C.byref(h))
        if st:
            _raise(st, lib.lightkv_last_error(None))
        self._lib, self._h = lib, h
        self.stages, self.n_layer, self.kv, self.positions = tuple(stages), int(n_layer), kv, positions

    def check_grid(self, rows: int, cols: int) -> None:
        st = self._lib.lightkv_schedule_check_grid(self._h, int(rows), int(cols))
        if st:
            _raise(st, self._lib.lightkv_last_error(None))

    @property
    def keep_fraction(self) -> float:
        """Layer-averaged kept fraction if every stage keeps exactly (1 - ratio)."""
        return float(self._lib.lightkv_schedule_keep_fraction(self._h))

    def report(self, vision_rows: int) -> "LayerReport":
        return LayerReport(self, vision_rows)

    def __del__(self):
        if getattr(self, "_h", None):
            self._lib.lightkv_schedule_free(self._h)
            self._h = None


class LayerReport:
    """What one layer-mode prefill did (lightkv_schedule_report): each stage's vision rows
    in/out, the layer-averaged kept fraction as run, and the KV cells freed."""

    def __init__(self, schedule: LayerSchedule, vision_rows: int):
        lib = schedule._lib
        h = C.c_void_p()
        st = lib.lightkv_schedule_report_create(schedule._h, int(vision_rows), C.byref(h))
        if st:
            _raise(st, lib.lightkv_last_error(None))
        self._lib, self._h, self._schedule = lib, h, schedule   # the report points at it

    def _check(self, st):
        if st:
            _raise(st, self._lib.lightkv_last_error(None))

    def stage(self, vision_in: int, vision_out: int) -> None:
        self._check(self._lib.lightkv_schedule_report_stage(self._h, int(vision_in),
                                                            int(vision_out)))

    def cells(self, before: int, after: int) -> None:
        self._check(self._lib.lightkv_schedule_report_cells(self._h, int(before), int(after)))

    @property
    def stages(self) -> list[tuple[int, int]]:
        out = []
        for i in range(self._lib.lightkv_schedule_report_n_stages(self._h)):
            a, b = C.c_int64(), C.c_int64()
            self._check(self._lib.lightkv_schedule_report_stage_rows(self._h, i, C.byref(a),
                                                                     C.byref(b)))
            out.append((a.value, b.value))
        return out

    @property
    def keep_fraction(self) -> float:
        return float(self._lib.lightkv_schedule_report_keep_fraction(self._h))

    @property
    def cells_freed(self) -> int:
        return int(self._lib.lightkv_schedule_report_cells_freed(self._h))

    def __del__(self):
        if getattr(self, "_h", None):
            self._lib.lightkv_schedule_report_free(self._h)
            self._h = None


# ------------------------------------------------------------------ layer mode's prefill
_SEGMENT_KINDS = {"text": 0, "image": 1}


@dataclass
class NativeLayerPrefill:
    """What lightkv_layer_prefill_run did (host copies; see lightkv.h)."""
    logits: np.ndarray            # [n_vocab] float32
    positions: np.ndarray         # [n_pos, S] int32, the final rows'
    cells: list                   # per KV cache: [S] int32
    kept: list                    # per image: original indices of its final rows
    ranges: list                  # [(il_begin, il_end, [cells per cache])]
    stages: list                  # per stage: (vision_in, vision_out)
    keep_fraction: float
    cells_freed: int
    t_guidance_ms: float
    t_merge_ms: float
    t_compact_ms: float


def _segments(segments, need_data: bool):
    """Segment-like objects (kind, pos [n_pos, n], tokens, embd, grid, cells, non_causal) ->
    a ctypes array, with the numpy arrays it points into (kept alive by the caller)."""
    arr = (_Segment * max(1, len(segments)))()
    keep = []
    for i, s in enumerate(segments):
        if s.kind not in _SEGMENT_KINDS:
            raise ValueError(f"unknown segment kind {s.kind!r}")
        seg = arr[i]
        seg.kind = _SEGMENT_KINDS[s.kind]
        pos = np.asarray(s.pos)
        if pos.ndim != 2:
            raise ValueError(f"segment {i}: positions must be [n_pos, n], got shape {pos.shape}")
        seg.n_pos, seg.n = pos.shape
        if need_data or pos.size:
            pos = np.ascontiguousarray(pos, dtype=np.int32)
            keep.append(pos)
            seg.pos = pos.ctypes.data_as(C.POINTER(C.c_int32))
        if s.tokens is not None:
            t = np.ascontiguousarray(s.tokens, dtype=np.int32)
            if t.shape != (seg.n,):
                raise ValueError(f"text segment {i} needs one token per position column")
            keep.append(t)
            seg.tokens = t.ctypes.data_as(C.POINTER(C.c_int32))
        if s.embd is not None:
            e = np.ascontiguousarray(s.embd, dtype=np.float32)
            if e.ndim != 2 or e.shape[0] != seg.n:
                raise ValueError(f"image segment {i}: embd must be [{seg.n}, n_embd], got {e.shape}")
            keep.append(e)
            seg.embd = e.ctypes.data_as(C.POINTER(C.c_float))
        if s.grid is not None:
            seg.grid_rows, seg.grid_cols = (int(v) for v in s.grid)
        if s.cells is not None:
            c = np.ascontiguousarray(s.cells, dtype=np.int64)
            if c.shape != (seg.n, 2):
                raise ValueError(f"image segment {i}: cells must be [{seg.n}, 2], got {c.shape}")
            keep.append(c)
            seg.cells = c.ctypes.data_as(C.POINTER(C.c_int64))
        seg.non_causal = bool(s.non_causal)
    return arr, keep


def _prefill_params(schedule: LayerSchedule, protect: float, turn_start, observe, n_batch):
    obs = np.ascontiguousarray(list(observe), dtype=np.int32)
    p = _LayerPrefillParams(schedule._h, float(protect),
                            -1 if turn_start is None else int(turn_start),
                            obs.ctypes.data_as(C.POINTER(C.c_int32)), len(obs), int(n_batch or 0))
    return p, obs


def layer_mode_check(lctx) -> None:
    """ValueError when a llama.cpp context cannot run layer mode (lightkv_layer_mode_check)."""
    lib = _load()
    st = lib.lightkv_layer_mode_check(lctx)
    if st:
        _raise(st, lib.lightkv_last_error(None))


def layer_prefill_check(lctx, segments, schedule: LayerSchedule, *, protect: float = 0.0,
                        n_batch: int = 0) -> None:
    """Everything layer_prefill checks before any compute, for segments whose tokens and
    embd may still be None (images not encoded yet): ValueError naming what is wrong."""
    lib = _load()
    arr, keep = _segments(segments, False)
    p, obs = _prefill_params(schedule, protect, None, (), n_batch)
    st = lib.lightkv_layer_prefill_check(lctx, arr, len(segments), C.byref(p))
    del keep, obs
    if st:
        _raise(st, lib.lightkv_last_error(None))


def layer_prefill(capture: Capture, lctx, segments, schedule: LayerSchedule, *,
                  protect: float = 0.0, turn_start: int | None = None, observe=(),
                  n_batch: int = 0) -> NativeLayerPrefill:
    """One turn's layer-mode prefill on the llama.cpp context lctx (lightkv_layer_prefill_run):
    bad input is a ValueError before any compute, a failure of llama.cpp a RuntimeError."""
    lib = capture._ctx.lib
    arr, keep = _segments(segments, True)
    p, obs = _prefill_params(schedule, protect, turn_start, observe, n_batch)
    h = C.c_void_p()
    capture._call(lib.lightkv_layer_prefill_run, lctx, arr, len(segments), C.byref(p), C.byref(h))
    del keep, obs
    try:
        nv = C.c_int32()
        logits = np.ctypeslib.as_array(lib.lightkv_layer_prefill_logits(h, C.byref(nv)),
                                       shape=(nv.value,)).copy()
        rows = lib.lightkv_layer_prefill_rows(h)
        npos = C.c_int32()
        ptr = lib.lightkv_layer_prefill_positions(h, C.byref(npos))
        positions = np.ctypeslib.as_array(ptr, shape=(npos.value * rows,)).reshape(npos.value, rows).copy() \
            if rows else np.zeros((npos.value, 0), np.int32)
        n_caches = lib.lightkv_layer_prefill_n_caches(h)

        def ints(ptr, n, dtype=np.int32):
            return np.ctypeslib.as_array(ptr, shape=(n,)).copy() if n else np.zeros(0, dtype)
        cells = [ints(lib.lightkv_layer_prefill_cells(h, c), rows) for c in range(n_caches)]
        kept = []
        for i in range(lib.lightkv_layer_prefill_n_images(h)):
            n = C.c_int64()
            ptr = lib.lightkv_layer_prefill_kept(h, i, C.byref(n))
            kept.append(ints(ptr, n.value, np.int64))
        ranges = []
        for i in range(lib.lightkv_layer_prefill_n_ranges(h)):
            per_cache, lo, hi = [], C.c_int32(), C.c_int32()
            for c in range(n_caches):
                n = C.c_int64()
                ptr = lib.lightkv_layer_prefill_range(h, i, c, C.byref(lo), C.byref(hi), C.byref(n))
                per_cache.append(ints(ptr, n.value))
            ranges.append((lo.value, hi.value, per_cache))
        rep = lib.lightkv_layer_prefill_report(h)
        stages = []
        for i in range(lib.lightkv_schedule_report_n_stages(rep)):
            a, b = C.c_int64(), C.c_int64()
            lib.lightkv_schedule_report_stage_rows(rep, i, C.byref(a), C.byref(b))
            stages.append((a.value, b.value))
        tg, tm, tc = C.c_double(), C.c_double(), C.c_double()
        lib.lightkv_layer_prefill_times(h, C.byref(tg), C.byref(tm), C.byref(tc))
        return NativeLayerPrefill(
            logits=logits, positions=positions, cells=cells, kept=kept, ranges=ranges,
            stages=stages, keep_fraction=float(lib.lightkv_schedule_report_keep_fraction(rep)),
            cells_freed=int(lib.lightkv_schedule_report_cells_freed(rep)),
            t_guidance_ms=tg.value, t_merge_ms=tm.value, t_compact_ms=tc.value)
    finally:
        lib.lightkv_layer_prefill_free(h)
