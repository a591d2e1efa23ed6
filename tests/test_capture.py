"""The native Q/K capture (native/src/lightkv_capture.cpp, native.Capture): llama.cpp's graph
hook (patch 0007) or eval callback in C, copying the wanted ROPE nodes into tensors on the
lightkv backend.

- parity: what it captured equals, bit for bit, what a callback in Python (the path it
  replaced: every node asked, the ROPE nodes copied to numpy) reads in the SAME decodes;
  several decodes and micro-batches (n_ubatch smaller than a decode) concatenate in order;
- it asks only for the wanted nodes: one ROPE node per wanted (layer, kind) and micro-batch
  is answered "wanted" and copied (the projections before RoPE share the name);
- guidance and attention-received from the captured tensors (the keys of attention-received
  read from llama.cpp's K cache, whose tensor the capture finds) equal the same graphs fed
  with the Python-read arrays from the host (bit for bit on CPU);
- bad handles, layers, kinds and reads are one-line errors before any ggml call; a failure
  inside the callback is kept and raised by the next read;
- the graph hook (the path layer mode and eviction take) captures the eval callback's rows
  bit for bit over micro-batches, prefills and reused decode-step graphs, with the logits
  unchanged, while the eval callback is asked nothing and answers nothing "wanted" (each
  "wanted" is a piece of the graph computed apart, with a backend synchronisation); a node
  wanted after its graph was built, which the graph did not keep, is a failure, not a read.
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


@pytest.mark.parametrize("via", ["eval", "hook"])
def test_capture_leaves_the_logits_unchanged(tiny, ctx, via):
    """Copying nodes out does not change what llama.cpp computes (CPU: bit for bit)."""
    m, model = tiny
    toks = _tokens(m, 33, seed=2)
    _decode(ctx, toks, 0)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    want = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    cap = native.Capture(backend="CPU")
    cap.want({li: "qk" for li in range(N_LAYER)})
    layer_mode.attach_capture(ctx, cap, via=via)
    _decode(ctx, toks, 0)
    layer_mode.attach_capture(ctx, None)
    got = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
    assert np.array_equal(got, want)
    assert cap.rows(N_LAYER - 1, "k") == 33
    cap.close()


def _n_reused(ctx) -> int:
    return llama_cpp.llama_perf_context(ctx).n_reused


def _logits(ctx, model) -> np.ndarray:
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()


N_STEPS = 8   # single-token decode steps after the prefills (their graph is reused)


def _run(ctx, model, toks, via, want):
    """From an empty cache: the prefills of toks[:60] and toks[60:100] (micro-batches
    16+16+16+12 and 16+16+8), then N_STEPS one-token decodes of toks[100:], the capture
    attached `via` the hook or the eval callback; -> (capture, logits after each decode,
    graphs reused during the decode steps, graphs reused in all)."""
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    cap = native.Capture(backend="CPU")
    cap.want(want)
    if via:
        layer_mode.attach_capture(ctx, cap, via=via)
    logits = []
    reused0 = _n_reused(ctx)
    _decode(ctx, toks[:60], 0)
    logits.append(_logits(ctx, model))
    _decode(ctx, toks[60:100], 60)
    logits.append(_logits(ctx, model))
    reused = _n_reused(ctx)
    for i in range(100, 100 + N_STEPS):
        _decode(ctx, toks[i:i + 1], i)
        logits.append(_logits(ctx, model))
    reused = _n_reused(ctx) - reused
    layer_mode.attach_capture(ctx, None)
    return cap, logits, reused, _n_reused(ctx) - reused0


def test_graph_hook_captures_the_eval_callbacks_rows_without_splitting(tiny, ctx):
    """The same prefills and decode steps three times: no capture, the eval callback, the
    graph hook. The hook's rows equal the eval callback's bit for bit (7 micro-batches and
    8 decode steps appended in order), every logit is bit-identical in the three runs, and
    the decode steps reuse their graph with the hook attached (its marks persist: the
    copies go on). Structure: per micro-batch the eval callback answers one "wanted" per
    read node (each one a piece of the graph computed apart, then a backend sync): 3 here;
    with the hook the eval callback is never asked and the graph runs in one piece."""
    m, model = tiny
    d = m.head_dim
    toks = _tokens(m, 100 + N_STEPS, seed=4)
    want = {0: "k", 1: "qkc", 2: "q"}
    nodes = 4                                          # read ROPE nodes per micro-batch
    n_ub = 7 + N_STEPS                                 # micro-batches: prefills + steps
    n_rows = 100 + N_STEPS
    _, stock, stock_reused, _ = _run(ctx, model, toks, None, want)
    ev, ev_logits, ev_reused, _ = _run(ctx, model, toks, "eval", want)
    hk, hk_logits, hk_reused, hk_reused_all = _run(ctx, model, toks, "hook", want)
    try:
        for a, b, c in zip(stock, ev_logits, hk_logits):
            assert a.tobytes() == b.tobytes() == c.tobytes()
        for layer, kind, heads in ((0, "k", N_HEAD_KV), (1, "q", N_HEAD), (1, "k", N_HEAD_KV),
                                   (2, "q", N_HEAD)):
            assert hk.shape(layer, kind) == ev.shape(layer, kind) == (n_rows, heads, d)
            assert hk.read(layer, kind).tobytes() == ev.read(layer, kind).tobytes()
        assert hk.rows(0, "q") == hk.rows(2, "k") == 0             # not wanted: nothing
        # the graph of a one-token step is reused after the first step, with or without
        # the hook (so the copies below come from reused graphs too)
        assert stock_reused == ev_reused == hk_reused == N_STEPS - 1
        est, hst = ev.stats(), hk.stats()
        assert est["wanted"] == est["copied"] == nodes * n_ub      # a split per read node
        assert est["asked"] > 50 * n_ub and est["marked"] == 0     # every node asked
        assert hst["asked"] == hst["wanted"] == 0                  # no split, nothing asked
        assert hst["copied"] == nodes * n_ub
        # marked once per graph built, not again when reused (the decode steps after the
        # first, and prefill micro-batches of the same shape as the one before)
        assert hk_reused_all > hk_reused
        assert hst["marked"] == nodes * (n_ub - hk_reused_all)
        # the reads of the hook's capture: the same K cache found, the same scores
        vis, txt = np.arange(5, 80), np.r_[0:5, 80:n_rows]
        assert hk.guidance(1, vis, txt).tobytes() == ev.guidance(1, vis, txt).tobytes()
        cells, qpos = np.arange(100), np.arange(n_rows - 4, n_rows)
        assert hk.attention_received(1, cells, qpos, cells).tobytes() == \
            ev.attention_received(1, cells, qpos, cells).tobytes()
    finally:
        ev.close()
        hk.close()


def test_a_node_wanted_after_its_graph_was_built_is_a_failure_not_a_read(tiny, ctx):
    """A reused graph keeps the marks it was built with: a layer wanted later without
    setting the hook again is not kept (its memory may hold another node's data), so the
    capture fails rather than copy it; setting the hook again rebuilds the graph."""
    m, model = tiny
    toks = _tokens(m, 12, seed=5)
    cap = native.Capture(backend="CPU")
    cap.want({0: "q"})
    layer_mode.attach_capture(ctx, cap)
    for i in range(3):                                 # built once, then reused
        _decode(ctx, toks[i:i + 1], i)
    reused = _n_reused(ctx)
    cap.want({0: "q", 1: "q"})                         # the hook not set again
    _decode(ctx, toks[3:4], 3)
    assert _n_reused(ctx) == reused + 1                # the old graph ran: Qcur-1 unmarked
    with pytest.raises(RuntimeError, match="Qcur-1 was wanted after llama.cpp built the graph"):
        cap.read(1, "q")
    cap.reset()
    layer_mode.attach_capture(ctx, cap)                # as attach_capture's callers do
    _decode(ctx, toks[4:5], 4)
    assert _n_reused(ctx) == reused + 1                # built anew, with both marked
    _decode(ctx, toks[5:6], 5)
    assert _n_reused(ctx) == reused + 2
    assert cap.rows(0, "q") == cap.rows(1, "q") == 2
    layer_mode.attach_capture(ctx, None)
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


class _OwnGraph:
    """A ROPE node named Qcur-0 of a given type in a ggml context and graph of our own
    (no llama.cpp): what the capture's callback and hook are handed, minus the compute."""

    class InitParams(C.Structure):
        _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", C.c_void_p), ("no_alloc", C.c_bool)]

    GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_I32 = 0, 1, 26

    def __init__(self):
        g = self.g = C.CDLL(str(_libs.lib_path("ggml-base")))
        g.ggml_init.restype, g.ggml_init.argtypes = C.c_void_p, [self.InitParams]
        g.ggml_free.argtypes = [C.c_void_p]
        g.ggml_new_tensor_3d.restype = C.c_void_p
        g.ggml_new_tensor_3d.argtypes = [C.c_void_p, C.c_int, C.c_int64, C.c_int64, C.c_int64]
        g.ggml_new_tensor_1d.restype = C.c_void_p
        g.ggml_new_tensor_1d.argtypes = [C.c_void_p, C.c_int, C.c_int64]
        g.ggml_rope.restype = C.c_void_p
        g.ggml_rope.argtypes = [C.c_void_p, C.c_void_p, C.c_void_p, C.c_int, C.c_int]
        g.ggml_set_name.restype = C.c_void_p
        g.ggml_set_name.argtypes = [C.c_void_p, C.c_char_p]
        g.ggml_new_graph.restype, g.ggml_new_graph.argtypes = C.c_void_p, [C.c_void_p]
        g.ggml_build_forward_expand.argtypes = [C.c_void_p, C.c_void_p]
        self.ctx = g.ggml_init(self.InitParams(1 << 22, None, True))

    def rope(self, ggml_type):
        """(node, graph holding it)"""
        g = self.g
        x = g.ggml_new_tensor_3d(self.ctx, ggml_type, 8, 2, 3)
        pos = g.ggml_new_tensor_1d(self.ctx, self.GGML_TYPE_I32, 3)
        node = g.ggml_rope(self.ctx, x, pos, 8, 0)
        g.ggml_set_name(node, b"Qcur-0")
        gf = g.ggml_new_graph(self.ctx)
        g.ggml_build_forward_expand(gf, node)
        return node, gf

    def close(self):
        self.g.ggml_free(self.ctx)


@pytest.fixture
def own_graph():
    o = _OwnGraph()
    yield o
    o.close()


def test_a_failure_inside_the_callback_is_raised_by_the_next_read(own_graph):
    """A wanted node of another type (an f16 ROPE node named Qcur-0) cannot be reported
    through llama.cpp: it is kept, nothing more is copied, and the next read raises it;
    reset() clears it."""
    node, _ = own_graph.rope(_OwnGraph.GGML_TYPE_F16)
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


def test_a_failure_inside_the_graph_hook_is_raised_by_the_next_read(own_graph):
    """The hook marks the wanted node when the graph is built and copies it once computed;
    an f16 node fails there like in the callback; an f32 node of a graph it never saw built
    (so not kept) fails before any copy; a NULL capture or graph is ignored."""
    lib = native._load()
    cap = native.Capture(backend="CPU")
    cap.want({0: "q"})
    node, gf = own_graph.rope(_OwnGraph.GGML_TYPE_F16)
    lib.lightkv_capture_graph(gf, False, cap.handle)
    assert cap.stats()["marked"] == 1
    lib.lightkv_capture_graph(gf, True, cap.handle)
    with pytest.raises(RuntimeError, match="the capture failed during the decode: Qcur-0 is f16"):
        cap.read(0, "q")
    cap.reset()
    _, gf32 = own_graph.rope(_OwnGraph.GGML_TYPE_F32)
    lib.lightkv_capture_graph(gf32, True, cap.handle)
    with pytest.raises(RuntimeError, match="Qcur-0 was wanted after llama.cpp built the graph, "
                                           "which did not keep it"):
        cap.read(0, "q")
    lib.lightkv_capture_graph(None, False, cap.handle)
    lib.lightkv_capture_graph(gf32, False, None)
    assert cap.stats() == {"asked": 0, "wanted": 0, "marked": 1, "copied": 0}
    cap.close()
