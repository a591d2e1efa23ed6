"""liblightkv's API: bad input never crashes (ValueError in Python, an error code and message
in C), backend selection, the C plan API, and the scheduler's CPU-fallback path."""
from __future__ import annotations

import ctypes as C
import math

import numpy as np
import pytest

from lightkv_edge import native

pytestmark = pytest.mark.usefixtures("liblightkv")  # fails (never skips) without the library

from lightkv_edge.native import _MergeParams, _load

native.set_num_threads(1)

RNG = np.random.default_rng(0)
X = RNG.standard_normal((16, 8)).astype(np.float32)
OK = dict(windows=2, ratio=0.5)


def with_value(i, j, v):
    x = X.copy()
    x[i, j] = v
    return x


BAD_MERGES = {
    "N == 0": (np.zeros((0, 8), np.float32), None, OK),
    "D == 0": (np.zeros((16, 0), np.float32), None, OK),
    "x 1-D": (np.zeros(16, np.float32), None, OK),
    "x 3-D": (np.zeros((2, 8, 8), np.float32), None, OK),
    "x strings": (np.array([["a"]]), None, OK),
    "x NaN": (with_value(3, 4, np.nan), None, OK),
    "x +Inf": (with_value(0, 0, np.inf), None, OK),
    "x -Inf": (with_value(15, 7, -np.inf), None, OK),
    "x beyond float32": (X.astype(np.float64) * 1e300, None, OK),
    "scores NaN": (X, np.where(np.arange(16) == 3, np.nan, 1.0), OK),
    "scores Inf": (X, np.where(np.arange(16) == 3, np.inf, 1.0), OK),
    "scores negative": (X, np.where(np.arange(16) == 3, -1e-3, 1.0), OK),
    "scores wrong length": (X, np.ones(15), OK),
    "scores 2-D": (X, np.ones((16, 1)), OK),
    "grid mismatch": (X, None, dict(OK, grid=(3, 5))),
    "grid zero": (X, None, dict(OK, grid=(0, 16))),
    "grid negative": (X, None, dict(OK, grid=(-4, -4))),
    "grid not a pair": (X, None, dict(OK, grid=(16,))),
    "grid float": (X, None, dict(OK, grid=(4.0, 4))),
    "windows 0": (X, None, dict(OK, windows=0)),
    "windows negative": (X, None, dict(OK, windows=-1)),
    "windows > side (square)": (X, None, dict(OK, windows=5)),
    "windows > side (grid)": (X, None, dict(OK, windows=3, grid=(2, 8))),
    "windows float": (X, None, dict(OK, windows=2.5)),
    "windows bool": (X, None, dict(OK, windows=True)),
    "windows huge": (X, None, dict(OK, windows=2 ** 40)),
    "ratio 1": (X, None, dict(OK, ratio=1.0)),
    "ratio negative": (X, None, dict(OK, ratio=-0.1)),
    "ratio NaN": (X, None, dict(OK, ratio=math.nan)),
    "ratio Inf": (X, None, dict(OK, ratio=math.inf)),
    "ratio string": (X, None, dict(OK, ratio="0.5")),
    "threshold NaN": (X, None, dict(OK, threshold=math.nan)),
    "threshold Inf": (X, None, dict(OK, threshold=math.inf)),
}


@pytest.mark.parametrize("name", list(BAD_MERGES))
def test_bad_merge_input_raises_value_error(name):
    x, scores, kw = BAD_MERGES[name]
    with pytest.raises(ValueError) as ei:
        native.lightkv_merge(x, scores, **kw)
    msg = str(ei.value)
    assert msg and "\n" not in msg


def test_good_input_after_bad_input_still_works():
    for name in ("x NaN", "windows > side (square)"):
        x, s, kw = BAD_MERGES[name]
        with pytest.raises(ValueError):
            native.lightkv_merge(x, s, **kw)
    assert native.lightkv_merge(X, None, **OK).x.shape == (8, 8)


# ------------------------------------------------------------------ the C API directly
def _lib():
    lib = _load()
    f32p = C.POINTER(C.c_float)
    lib.lightkv_context_create.argtypes = [C.c_char_p, C.POINTER(C.c_void_p)]
    lib.lightkv_context_create.restype = C.c_int
    lib.lightkv_merge_plan_create.argtypes = [C.c_void_p, C.c_int64, C.c_int64,
                                              C.POINTER(_MergeParams), C.POINTER(C.c_void_p)]
    lib.lightkv_merge_plan_create.restype = C.c_int
    lib.lightkv_merge_plan_run.argtypes = [C.c_void_p, f32p, f32p, C.POINTER(C.c_void_p)]
    lib.lightkv_merge_plan_run.restype = C.c_int
    lib.lightkv_merge_plan_free.argtypes = [C.c_void_p]
    lib.lightkv_merge_plan_rows_without_threshold.argtypes = [C.c_void_p]
    lib.lightkv_merge_plan_rows_without_threshold.restype = C.c_int64
    lib.lightkv_status_string.argtypes = [C.c_int]
    lib.lightkv_status_string.restype = C.c_char_p
    lib.lightkv_merge_params_default.restype = _MergeParams
    return lib


@pytest.fixture(scope="module")
def cctx():
    lib = _lib()
    h = C.c_void_p()
    assert lib.lightkv_context_create(b"cpu", C.byref(h)) == 0
    yield lib, h
    lib.lightkv_context_free(h)


def _f32(a):
    return a.ctypes.data_as(C.POINTER(C.c_float))


def test_c_plan_reuse_matches_one_shot(cctx):
    lib, h = cctx
    p = lib.lightkv_merge_params_default()
    p.windows, p.ratio = 2, 0.5
    plan = C.c_void_p()
    assert lib.lightkv_merge_plan_create(h, 36, 12, C.byref(p), C.byref(plan)) == 0
    try:
        assert lib.lightkv_merge_plan_rows_without_threshold(plan) == 20  # 4 windows of 9, r = 4
        for seed in (1, 2):
            x = np.random.default_rng(seed).standard_normal((36, 12)).astype(np.float32)
            res = C.c_void_p()
            assert lib.lightkv_merge_plan_run(plan, _f32(x), None, C.byref(res)) == 0
            m = lib.lightkv_merge_result_rows(res)
            out = np.ctypeslib.as_array(lib.lightkv_merge_result_x(res), shape=(m * 12,)).reshape(m, 12).copy()
            lib.lightkv_merge_result_free(res)
            assert np.array_equal(out, native.lightkv_merge(x, None, windows=2, ratio=0.5, backend="cpu").x)
    finally:
        lib.lightkv_merge_plan_free(plan)


def test_c_null_and_shape_errors_return_codes(cctx):
    lib, h = cctx
    INVALID, OOM = 1, 2
    p = lib.lightkv_merge_params_default()
    x = np.ones((4, 4), np.float32)
    res = C.c_void_p()
    assert lib.lightkv_merge_run(h, None, 4, 4, None, C.byref(p), C.byref(res)) == INVALID
    assert b"x must not be NULL" in lib.lightkv_last_error(h)
    assert lib.lightkv_merge_run(h, _f32(x), 4, 4, None, None, C.byref(res)) == INVALID
    assert lib.lightkv_merge_run(h, _f32(x), 4, 4, None, C.byref(p), None) == INVALID
    assert lib.lightkv_merge_run(None, _f32(x), 4, 4, None, C.byref(p), C.byref(res)) == INVALID
    assert b"ctx" in lib.lightkv_last_error(None)
    assert lib.lightkv_merge_run(h, _f32(x), 0, 4, None, C.byref(p), C.byref(res)) == INVALID
    assert lib.lightkv_merge_run(h, _f32(x), 4, -1, None, C.byref(p), C.byref(res)) == INVALID
    assert lib.lightkv_merge_run(h, _f32(x), -4, 4, None, C.byref(p), C.byref(res)) == INVALID
    # absurd sizes are refused before any memory is touched
    assert lib.lightkv_merge_run(h, _f32(x), 1 << 29, 1 << 20, None, C.byref(p), C.byref(res)) in (INVALID, OOM)
    assert lib.lightkv_merge_run(h, _f32(x), 1 << 62, 1 << 62, None, C.byref(p), C.byref(res)) in (INVALID, OOM)
    assert not res.value  # no result on failure
    plan = C.c_void_p()
    p.grid_rows, p.grid_cols = 3, 3
    assert lib.lightkv_merge_plan_create(h, 10, 4, C.byref(p), C.byref(plan)) == INVALID
    assert not plan.value
    assert b"grid" in lib.lightkv_last_error(h)
    assert lib.lightkv_merge_plan_run(None, _f32(x), None, C.byref(res)) == INVALID
    # *_free accept NULL; accessors of NULL return 0 / NULL
    lib.lightkv_merge_result_free(None)
    lib.lightkv_merge_plan_free(None)
    lib.lightkv_context_free(None)
    assert lib.lightkv_merge_result_rows(None) == 0
    assert lib.lightkv_status_string(INVALID) == b"invalid argument"


def test_c_guidance_null_and_range_errors(cctx):
    lib, h = cctx
    q = np.ones((2, 5, 4), np.float32)
    v = np.array([0, 1], np.int64)
    t = np.array([3, 7], np.int64)  # 7 is out of range
    i64 = C.POINTER(C.c_int64)
    out = np.zeros(2, np.float32)
    st = lib.lightkv_guidance_scores(h, _f32(q), _f32(q), 2, 2, 5, 4, v.ctypes.data_as(i64), 2,
                                     t.ctypes.data_as(i64), 2, 0.5, _f32(out))
    assert st == 1 and b"text indices" in lib.lightkv_last_error(h)
    st = lib.lightkv_guidance_scores(h, None, _f32(q), 2, 2, 5, 4, v.ctypes.data_as(i64), 2,
                                     t.ctypes.data_as(i64), 1, 0.5, _f32(out))
    assert st == 1
    st = lib.lightkv_guidance_scores(h, _f32(q), _f32(q), 2, 2, 5, 4, v.ctypes.data_as(i64), 2,
                                     t.ctypes.data_as(i64), 1, 0.5, None)
    assert st == 1


# ------------------------------------------------------------------ backends
def test_backends_lists_cpu():
    names = native.backends()
    assert "CPU" in names


@pytest.mark.parametrize("name", ["CPU", "cpu", None])
def test_backend_selection(name):
    a = native.lightkv_merge(X, None, backend=name, **OK)
    b = native.lightkv_merge(X, None, backend="CPU", **OK)
    assert np.array_equal(a.kept, b.kept)


def test_unknown_backend_is_runtime_error():
    with pytest.raises(RuntimeError, match="no ggml backend named"):
        native.lightkv_merge(X, None, backend="NoSuchDevice0", **OK)
    with pytest.raises(ValueError):
        native.lightkv_merge(X, None, backend=3, **OK)


# ------------------------------------------------------------------ CPU fallback
FORCE = "ARGMAX,STEP,GET_ROWS,MUL_MAT,SOFT_MAX,CONCAT"


def test_forced_cpu_ops_give_the_same_result_on_cpu():
    """On the CPU backend the pinned nodes are already on the CPU: one split per graph."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((100, 32)).astype(np.float32)
    s = rng.random(100).astype(np.float32)
    a = native.lightkv_merge(x, s, windows=2, ratio=0.5, backend="CPU")
    b = native.lightkv_merge(x, s, windows=2, ratio=0.5, backend="CPU", _force_cpu_ops=FORCE)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.assign, b.assign)
    assert native.last_n_splits("CPU", FORCE) == 2  # graph 1 + graph 2


def _devices() -> list[str]:
    """Non-CPU devices, for parametrizing at collection time. A library that does not load
    gives none here, and the liblightkv fixture fails every test of this module instead."""
    try:
        return [b for b in native.backends() if b != "CPU"]
    except Exception:  # noqa: BLE001 - reported by the fixture, as a failure
        return []


GPUS = _devices()


@pytest.mark.skipif(not GPUS, reason="no non-CPU ggml backend in this build")
@pytest.mark.parametrize("backend", GPUS)
def test_cpu_fallback_path_on_a_device(backend):
    """Pin ops to the CPU as if the device lacked them: the scheduler splits the graphs and
    copies tensors between device and host; the result must still match the reference
    (tests/helpers/parity.py rules, every case checked)."""
    from tests.helpers import parity
    rng = np.random.default_rng(10)
    checked = 0
    for _ in range(6):
        case = parity.random_case(rng, max_n=900, max_d=256, max_work=2e6)
        rep = parity.check_case(case, backend, "ARGMAX,STEP,CONCAT")
        assert rep.ok, rep.errors[:3]
        checked += rep.checked
        assert native.last_n_splits(backend, "ARGMAX,STEP,CONCAT") > 2
    assert checked >= 100, checked


# ------------------------------------------------------------------ Python plan
def test_merge_plan_reuse_and_shape_mismatch():
    plan = native.MergePlan(36, 12, windows=2, ratio=0.5)
    assert plan.rows_without_threshold == 20
    rng = np.random.default_rng(11)
    for _ in range(2):
        x = rng.standard_normal((36, 12)).astype(np.float32)
        s = rng.random(36).astype(np.float32)
        a, b = plan(x, s), native.lightkv_merge(x, s, windows=2, ratio=0.5)
        assert np.array_equal(a.x, b.x) and np.array_equal(a.assign, b.assign)
    with pytest.raises(ValueError, match="plan was made for"):
        plan(np.zeros((36, 11), np.float32))          # D mismatch
    with pytest.raises(ValueError, match="plan was made for"):
        plan(np.zeros((35, 12), np.float32))          # N mismatch
    with pytest.raises(ValueError):
        plan(np.zeros((36, 12), np.float32), np.ones(35))
    with pytest.raises(ValueError):
        plan(np.full((36, 12), np.nan, np.float32))
    with pytest.raises(ValueError):
        native.MergePlan(36, 12, windows=7, ratio=0.5)  # windows > side 6
    with pytest.raises(ValueError):
        native.MergePlan(0, 12, windows=1, ratio=0.5)
