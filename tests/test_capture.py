"""The native Q/K capture (native/src/lightkv_capture.cpp, native.Capture): llama.cpp's eval
callback in C, copying the wanted ROPE nodes into tensors on the lightkv backend.

- parity: what it captured equals, bit for bit, what a callback in Python (the path it
  replaced: every node asked, the ROPE nodes copied to numpy) reads in the SAME decodes;
  several decodes and micro-batches (n_ubatch smaller than a decode) concatenate in order;
- it asks only for the wanted nodes: one ROPE node per wanted (layer, kind) and micro-batch
  is answered "wanted" and copied (the projections before RoPE share the name);
- guidance and attention-received from the captured tensors (the keys of attention-received
  read from llama.cpp's K cache, whose tensor the capture finds) equal the same graphs fed
  with the Python-read arrays from the host (bit for bit on CPU);
- bad handles, layers, kinds and reads are one-line errors before any ggml call; a failure
  inside the callback is kept and raised by the next read.
The tiny random llama (tests/helpers/tiny_llama.py, GQA: 4 query heads, 2 key heads)."""
from __future__ import annotations

import ctypes as C

import numpy as np
import pytest

from lightkv_edge import _libs
from tests.helpers.tiny_llama import BOS, loaded_tiny_llama

llama_cpp = _libs.use_our_llama_cpp()

from lightkv_edge import layer_mode, native  # noqa: E402  (after llama_cpp is bound)

pytestmark = pytest.mark.usefixtures("liblightkv")

N_LAYER, N_HEAD, N_HEAD_KV = 3, 4, 2
N_UBATCH = 16
_l = layer_mode._l
_EVAL_CB = C.CFUNCTYPE(C.c_bool, C.c_void_p, C.c_bool, C.c_void_p)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    yield from loaded_tiny_llama(tmp_path_factory.mktemp("capture") / "tiny.gguf", llama_cpp,
                                 seed=3, n_layer=N_LAYER, n_head=N_HEAD, n_head_kv=N_HEAD_KV)


@pytest.fixture
def ctx(tiny):
    _, model = tiny
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = 256, 64, N_UBATCH
    cp.n_threads = cp.n_threads_batch = 2
    c = llama_cpp.llama_init_from_model(model, cp)
    assert c
    yield c
    _l.llama_set_eval_callback(c, None, None)
    llama_cpp.llama_free(c)


def _decode(ctx, tokens, pos0):
    b = llama_cpp.llama_batch_init(len(tokens), 0, 1)
    b.n_tokens = len(tokens)
    for i, t in enumerate(tokens):
        b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = int(t), pos0 + i, 1, 0
        b.logits[i] = i == len(tokens) - 1
    rc = llama_cpp.llama_decode(ctx, b)
    llama_cpp.llama_batch_free(b)
    assert rc == 0


def _tokens(m, n, seed=0):
    rng = np.random.default_rng(seed)
    return np.array([BOS] + list(rng.integers(259, m.n_vocab, n - 1)), np.int32)


class _PythonCapture:
    """The oracle: the callback in Python that layer mode and eviction used before (every
    node asked; the ROPE nodes of the wanted names copied to numpy), passing every node on
    to the native capture too, so that both see the same tensors of the same decodes."""

    def __init__(self, names, cap):
        g = C.CDLL(str(_libs.lib_path("ggml-base")))
        g.ggml_get_name.restype, g.ggml_get_name.argtypes = C.c_char_p, [C.c_void_p]
        g.ggml_nbytes.restype, g.ggml_nbytes.argtypes = C.c_size_t, [C.c_void_p]
        g.ggml_op_desc.restype, g.ggml_op_desc.argtypes = C.c_char_p, [C.c_void_p]
        g.ggml_backend_tensor_get.restype = None
        g.ggml_backend_tensor_get.argtypes = [C.c_void_p, C.c_void_p, C.c_size_t, C.c_size_t]
        self.g, self.names, self.got = g, set(names), {n: [] for n in names}
        self.native = native._load().lightkv_capture_eval
        self.cap = cap
        self.cb = _EVAL_CB(self._on_eval)

    def _on_eval(self, t, ask, _ud):
        nat = self.native(t, ask, self.cap.handle)
        name = self.g.ggml_get_name(t)
        mine = name in self.names and self.g.ggml_op_desc(t) == b"ROPE"
        if not ask and mine:
            buf = np.empty(self.g.ggml_nbytes(t) // 4, np.float32)
            self.g.ggml_backend_tensor_get(t, buf.ctypes.data, 0, buf.nbytes)
            self.got[name].append(buf)
        return (mine or nat) if ask else True

    def rows(self, name, n_head, head_dim):
        return np.concatenate(self.got[name]).reshape(-1, n_head, head_dim)


def test_capture_equals_python_capture_bit_for_bit(tiny, ctx):
    """Two decodes (60 and 40 tokens) in micro-batches of 16: 16+16+16+12, 16+16+8 rows
    appended; the 64-row first buffer grows (its 60 rows copied over) on the fifth."""
    m, _ = tiny
    d = m.head_dim
    cap = native.Capture(backend="CPU")
    cap.want({1: "qkc", 2: "q"})
    py = _PythonCapture([b"Qcur-1", b"Kcur-1", b"Qcur-2"], cap)
    _l.llama_set_eval_callback(ctx, C.cast(py.cb, C.c_void_p), None)
    toks = _tokens(m, 100)
    _decode(ctx, toks[:60], 0)
    _decode(ctx, toks[60:], 60)
    _l.llama_set_eval_callback(ctx, None, None)

    assert [len(a) // (N_HEAD * d) for a in py.got[b"Qcur-1"]] == [16, 16, 16, 12, 16, 16, 8]
    for layer, kind, name, heads in ((1, "q", b"Qcur-1", N_HEAD), (1, "k", b"Kcur-1", N_HEAD_KV),
                                     (2, "q", b"Qcur-2", N_HEAD)):
        want = py.rows(name, heads, d)
        assert cap.shape(layer, kind) == (100, heads, d)
        got = cap.read(layer, kind)
        assert got.tobytes() == want.tobytes()
    assert cap.rows(2, "k") == 0 and cap.rows(0, "q") == 0      # not wanted: nothing
    st = cap.stats()
    assert st["wanted"] == st["copied"] == 3 * 7                 # 3 nodes x 7 micro-batches

    # the reads' graphs on the captured tensors = the same graphs fed from the host
    q = py.rows(b"Qcur-1", N_HEAD, d).transpose(1, 0, 2)
    k = py.rows(b"Kcur-1", N_HEAD_KV, d).transpose(1, 0, 2)
    vis, txt = np.arange(5, 80), np.r_[0:5, 80:100]
    g_host = native.guidance_scores_from_qk(q, k, vis, txt, backend="CPU")
    g_cap = cap.guidance(1, vis, txt)
    assert g_cap.tobytes() == g_host.tobytes()
    assert np.all(g_cap > 0)
    # a fresh cache: row i went to cell i; the cache holds Kcur rounded to f16
    nk = N_HEAD_KV * d
    cache, _ = layer_mode.kv_cells_get(ctx, 1, np.arange(100), nk, nk)
    assert np.array_equal(cache, k.transpose(1, 0, 2).reshape(100, nk).astype(np.float16)
                          .astype(np.float32))
    w, kpos = 7, np.arange(95, dtype=np.int32)
    kk = np.ascontiguousarray(cache[:95].reshape(95, N_HEAD_KV, d).transpose(1, 0, 2))
    r_host = native.attention_received(q[:, -w:], kk, np.arange(93, 100), kpos, backend="CPU")
    r_cap = cap.attention_received(1, np.arange(95), np.arange(93, 100), kpos)
    assert r_cap.tobytes() == r_host.tobytes()
    assert abs(r_cap.sum() - N_HEAD * w) < 1e-3                 # every query's softmax sums to 1

    cap.reset()
    assert cap.rows(1, "q") == 0
    cap.close()


def test_asks_only_for_wanted_nodes(tiny, ctx):
    m, _ = tiny
    cap = native.Capture(backend="CPU")
    _l.llama_set_eval_callback(ctx, cap.callback, cap.handle)
    toks = _tokens(m, 40, seed=1)
    cap.want({})
    _decode(ctx, toks[:20], 0)                                   # 2 micro-batches
    st = cap.stats()
    assert st["wanted"] == st["copied"] == 0
    assert st["asked"] > 50 * 2                                  # every node of both graphs
    cap.want({0: "k"})
    _decode(ctx, toks[20:], 20)
    st2 = cap.stats()
    # one ROPE node named Kcur-0 per micro-batch; the projection and reshape named Kcur-0
    # before RoPE are asked about too but not taken
    assert st2["wanted"] == st2["copied"] == 2
    assert st2["asked"] - st["asked"] == st["asked"]             # same graphs, same questions
    assert cap.shape(0, "k") == (20, N_HEAD_KV, m.head_dim)
    _l.llama_set_eval_callback(ctx, None, None)
    cap.close()


def test_capture_leaves_the_logits_unchanged(tiny, ctx):
    """Copying nodes out does not change what llama.cpp computes (CPU: bit for bit)."""
    m, model = tiny
    toks = _tokens(m, 33, seed=2)
    _decode(ctx, toks, 0)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    want = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    cap = native.Capture(backend="CPU")
    cap.want({li: "qk" for li in range(N_LAYER)})
    _l.llama_set_eval_callback(ctx, cap.callback, cap.handle)
    _decode(ctx, toks, 0)
    _l.llama_set_eval_callback(ctx, None, None)
    got = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
    assert np.array_equal(got, want)
    assert cap.rows(N_LAYER - 1, "k") == 33
    cap.close()


def test_bad_input_is_one_line_before_ggml(tiny, ctx):
    m, _ = tiny
    cap = native.Capture(backend="CPU")
    for bad, why in (({-1: "q"}, "layer -1 is out of range"), ({1 << 20: "q"}, "out of range"),
                     ({0: "x"}, "must be letters of 'qkc'"), ({0: ""}, "must be letters of 'qkc'"),
                     ({0: "qq"}, r"\(each once\)"), ({0: 3}, "must be letters of 'qkc'"),
                     ({True: "q"}, "layer must be an integer"), ([0], "must be a dict")):
        with pytest.raises(ValueError, match=why) as e:
            cap.want(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"nothing was captured of Qcur-3 \(not wanted"):
        cap.guidance(3, [0], [1])
    with pytest.raises(ValueError, match="kind must be 'q' or 'k'"):
        cap.rows(0, "qk")
    # the C API itself: a NULL handle and duplicate layers
    lib = native._load()
    i32 = C.POINTER(C.c_int32)
    two = (C.c_int32 * 2)(4, 4)
    kinds = (C.c_int32 * 2)(1, 1)
    assert lib.lightkv_capture_want(None, C.cast(two, i32), C.cast(kinds, i32), 2) == 1
    assert lib.lightkv_last_error(None) == b"cap must not be NULL"
    assert lib.lightkv_capture_want(cap.handle, C.cast(two, i32), C.cast(kinds, i32), 2) == 1
    assert b"layer 4 is wanted twice" in lib.lightkv_last_error(cap._ctx.h)
    assert lib.lightkv_capture_eval(None, True, None) is False   # no capture: wants nothing
    assert lib.lightkv_capture_eval(None, False, None) is True   # and never stops the graph

    # reads of what was captured: rows and indices checked before any graph
    cap.want({0: "qk", 1: "qc"})
    _l.llama_set_eval_callback(ctx, cap.callback, cap.handle)
    _decode(ctx, _tokens(m, 10), 0)
    _l.llama_set_eval_callback(ctx, None, None)
    with pytest.raises(ValueError, match=r"vision indices must be in \[0, 10\), got 10"):
        cap.guidance(0, [10], [0])
    with pytest.raises(ValueError, match="nothing was captured of the K cache of Kcur-0"):
        cap.attention_received(0, [0, 1, 2], [9], np.arange(3))
    with pytest.raises(ValueError, match=r"n_query must be in \[1, 10\]"):
        cap.attention_received(1, [0, 1, 2], np.arange(11), np.arange(3))
    with pytest.raises(ValueError, match="cell 256 is outside the K cache's 256 cells"):
        cap.attention_received(1, [0, 256], [9], [0, 1])
    with pytest.raises(ValueError, match=r"k_pos must be \[3\]"):
        cap.attention_received(1, [0, 1, 2], [9], [0, 1])
    with pytest.raises(ValueError, match="sees no key"):
        cap.attention_received(1, [0, 1, 2], [0], [5, 6, 7])
    assert cap.attention_received(1, [3], [9], [3]).tolist() == [N_HEAD]   # one key: all of it
    cap.close()
    with pytest.raises(ValueError, match="the capture is closed"):
        cap.want({0: "q"})
    cap.close()                                                  # twice is fine


def test_a_failure_inside_the_callback_is_raised_by_the_next_read(tiny):
    """A wanted node of another type (an f16 ROPE node named Qcur-0, built here in a ggml
    context of our own) cannot be reported through llama.cpp: it is kept, nothing more is
    copied, and the next read raises it; reset() clears it."""
    g = C.CDLL(str(_libs.lib_path("ggml-base")))

    class InitParams(C.Structure):
        _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", C.c_void_p), ("no_alloc", C.c_bool)]

    g.ggml_init.restype, g.ggml_init.argtypes = C.c_void_p, [InitParams]
    g.ggml_free.argtypes = [C.c_void_p]
    g.ggml_new_tensor_3d.restype = C.c_void_p
    g.ggml_new_tensor_3d.argtypes = [C.c_void_p, C.c_int, C.c_int64, C.c_int64, C.c_int64]
    g.ggml_new_tensor_1d.restype = C.c_void_p
    g.ggml_new_tensor_1d.argtypes = [C.c_void_p, C.c_int, C.c_int64]
    g.ggml_rope.restype = C.c_void_p
    g.ggml_rope.argtypes = [C.c_void_p, C.c_void_p, C.c_void_p, C.c_int, C.c_int]
    g.ggml_set_name.restype = C.c_void_p
    g.ggml_set_name.argtypes = [C.c_void_p, C.c_char_p]
    GGML_TYPE_F16, GGML_TYPE_I32 = 1, 26
    gctx = g.ggml_init(InitParams(1 << 20, None, True))
    try:
        x = g.ggml_new_tensor_3d(gctx, GGML_TYPE_F16, 8, 2, 3)
        pos = g.ggml_new_tensor_1d(gctx, GGML_TYPE_I32, 3)
        node = g.ggml_rope(gctx, x, pos, 8, 0)
        g.ggml_set_name(node, b"Qcur-0")
        cap = native.Capture(backend="CPU")
        cap.want({0: "q"})
        lib = native._load()
        assert lib.lightkv_capture_eval(node, True, cap.handle) is True
        assert lib.lightkv_capture_eval(node, False, cap.handle) is True   # never stops llama.cpp
        with pytest.raises(RuntimeError, match="the capture failed during the decode: Qcur-0 is f16"):
            cap.read(0, "q")
        cap.reset()
        assert cap.rows(0, "q") == 0
        cap.close()
    finally:
        g.ggml_free(gctx)
