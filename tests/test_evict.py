"""KV eviction (lightkv_edge/evict.py, issue 12) against its ground truth,
lightkv_edge/reference/evict.py.

- the ggml graph of the importance (native.attention_received) = the reference's;
- a tiny random llama (normal RoPE, GQA; tests/helpers/tiny_llama.py, a float64 HF twin in
  tests/helpers/layer_ref.py): 6 text tokens | an "image" of 64 random embedding rows | 10
  text tokens, in batches of 24; the eviction after the prefill keeps the reference's
  cells, and the greedy tokens with decode-time eviction are the reference's;
- layer mode then eviction on the tiny llama: the reference's compact prefill and eviction;
- the embedded Qwen2-VL model (M-RoPE) in f32, through VisionChat: the same;
- eviction that keeps everything is `off` exactly (tokens and logits);
- cells and KV bytes drop by the evicted fraction; multi-turn keeps working; embed and
  layer modes; bad input is one line and exit code 2.
"""
from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightkv_edge import _libs

llama_cpp = _libs.use_our_llama_cpp()

from lightkv_edge import evict as E
from lightkv_edge.reference import evict as R
from tests.helpers.tiny_llama import BOS, loaded_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
HF_DIR = ROOT / "lightkv_edge" / "models" / "hf"
N_LAYER, N_BATCH, N_IMG = 4, 24, 64
STEPS = 9
torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------
# the importance graph
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("h, hk", [(4, 2), (4, 4), (6, 1)])
def test_attention_received_matches_reference(liblightkv, h, hk):
    from lightkv_edge import native
    rng = np.random.default_rng(h * 10 + hk)
    w, n, d = 5, 40, 16
    q = rng.standard_normal((h, w, d)).astype(np.float32)
    k = rng.standard_normal((hk, n, d)).astype(np.float32)
    k_pos = np.sort(rng.integers(0, 30, n)).astype(np.int32)    # repeats, as M-RoPE images
    q_pos = np.arange(26, 26 + w, dtype=np.int32)               # the later ones see more
    got = native.attention_received(q, k, q_pos, k_pos)
    want = R.attention_received(torch.from_numpy(q).double(), torch.from_numpy(k).double(),
                                torch.from_numpy(q_pos).long(), torch.from_numpy(k_pos).long(),
                                d ** -0.5).numpy()
    # f32 softmax of O(1) logits against f64: 1e-5 is ~100 ulps of the sums (<= w * h)
    assert np.max(np.abs(got - want)) < 1e-5
    assert abs(got.sum() - h * w) < 1e-3          # each query's softmax sums to 1
    assert np.all(got[k_pos > q_pos.max()] == 0)   # keys no query sees receive nothing
    with pytest.raises(ValueError, match="sees no key"):
        native.attention_received(q, k, np.full(w, -1, np.int32), k_pos)


def test_keep_count_and_ties():
    assert [E.keep_count(64, k) for k in (1.0, 0.5, 0.25, 0.1, 0.001)] == [64, 32, 16, 6, 1]
    assert E.keep_count(5, 0.5) == R.keep_count(5, 0.5) == 3     # halves go up
    assert R.select_kept(torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0]), 2).tolist() == [1, 2]


# ---------------------------------------------------------------------------------------
# a tiny llama: normal RoPE, GQA, several batches a segment
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    yield from loaded_tiny_llama(tmp_path_factory.mktemp("evict") / "tiny.gguf",
                                 llama_cpp, seed=11, n_layer=N_LAYER, n_head=4, n_head_kv=2)


@pytest.fixture(scope="module")
def hf(tiny):
    from tests.helpers.layer_ref import hf_llama_from_tiny
    return hf_llama_from_tiny(tiny[0])


def _turn(m, seed=5):
    rng = np.random.default_rng(seed)
    t1 = np.array([BOS] + list(rng.integers(259, m.n_vocab, 5)), np.int32)
    t2 = np.array(rng.integers(259, m.n_vocab, 10), np.int32)
    img = rng.standard_normal((N_IMG, m.n_embd)).astype(np.float32)
    return t1, img, t2


class _Ctx:
    """A llama.cpp context on the tiny llama whose decodes are logged by an Evictor."""

    def __init__(self, model, ev_kw, n_ctx=256):
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, N_BATCH, N_BATCH
        cp.n_threads = cp.n_threads_batch = 2
        self.ctx = llama_cpp.llama_init_from_model(model, cp)
        assert self.ctx
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self.ev = E.Evictor(model, self.ctx, **ev_kw) if ev_kw is not None else None

    def close(self):
        llama_cpp.llama_free(self.ctx)

    def decode(self, rows, pos0, *, embd=False, image=-1, logits_last=False):
        n = len(rows)
        b = llama_cpp.llama_batch_init(n, rows.shape[1] if embd else 0, 1)
        b.n_tokens = n
        if embd:
            e = np.ascontiguousarray(rows, np.float32)
            ctypes.memmove(b.embd, e.ctypes.data, e.nbytes)
        for i in range(n):
            if not embd:
                b.token[i] = int(rows[i])
            b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = pos0 + i, 1, 0
            b.logits[i] = logits_last and i == n - 1
        rc = llama_cpp.llama_decode(self.ctx, b)
        llama_cpp.llama_batch_free(b)
        assert rc == 0
        if self.ev:
            self.ev.record(n, np.arange(pos0, pos0 + n), image)

    def logits(self):
        out = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(out, shape=(self.n_vocab,)).copy()

    def prefill(self, t1, img, t2, evict=True):
        """The turn in batches of N_BATCH; the window (t2) observed; then the eviction."""
        pos = 0
        image = self.ev.new_image() if self.ev else -1
        for kind, rows in (("t", t1), ("i", img), ("t", t2)):
            window = self.ev is not None and rows is t2
            if window:
                self.ev.observe(True)
            for lo in range(0, len(rows), N_BATCH):
                hi = min(lo + N_BATCH, len(rows))
                self.decode(rows[lo:hi], pos + lo, embd=kind == "i",
                            image=image if kind == "i" else -1,
                            logits_last=rows is t2 and hi == len(rows))
            if window:
                q = self.ev.take_queries()
                self.ev.observe(False)
            pos += len(rows)
        logits = self.logits()
        freed = 0
        if self.ev and evict:
            freed = self.ev.evict(q, np.arange(pos - len(t2), pos), [image])
        return logits, pos, freed

    def greedy(self, logits, pos, n=STEPS):
        toks, all_logits = [], [logits]
        if self.ev:
            self.ev.start_decoding()
        for i in range(n):
            toks.append(int(np.argmax(all_logits[-1])))
            if self.ev:
                self._decode_generated(toks[-1], pos + i)
            else:
                self.decode(np.array([toks[-1]]), pos + i, logits_last=True)
            all_logits.append(self.logits())
        if self.ev:
            self.ev.stop_decoding()
        return toks, all_logits

    def _decode_generated(self, tok, pos):
        b = llama_cpp.llama_batch_init(1, 0, 1)
        b.n_tokens = 1
        b.token[0], b.pos[0], b.n_seq_id[0], b.seq_id[0][0], b.logits[0] = tok, pos, 1, 0, 1
        rc = llama_cpp.llama_decode(self.ctx, b)
        llama_cpp.llama_batch_free(b)
        assert rc == 0
        self.ev.decoded(pos)

    def kept_rows(self, image=0):
        """Row indices (inside the image) of its live cells."""
        log = self.ev.log
        rows = [i for i, im in enumerate(log.image) if im == image]
        return [j for j, i in enumerate(rows) if log.alive[i]]


def _reference(hf, m, t1, img, t2, keep, every, n=STEPS):
    emb = m.weights["token_embd.weight"].astype(np.float64)
    x = torch.from_numpy(np.concatenate([emb[t1], img.astype(np.float64), emb[t2]]))
    s = len(x)
    images = [-1] * len(t1) + [0] * N_IMG + [-1] * len(t2)
    cache = R.Cache.empty(hf)
    out = R.forward(hf, cache, x, torch.arange(s), images)
    w = len(t2)
    R.evict(hf, cache, [q[:, -w:] for q in out.queries], torch.arange(s - w, s), keep)
    kept_after_prefill = (cache.row[cache.image == 0] - len(t1)).tolist()
    toks, logits = R.generate(hf, cache, out.logits, s, n, keep=keep, every=every)
    return out.logits, kept_after_prefill, toks, logits, cache


# llama.cpp keeps K/V in f16 (rel. 2^-11 a value) and computes in f32, the reference in
# f64: through 4 layers the logits (std ~1) differ by ~2e-3 (the level of
# tests/test_layer_mode.py's compact parity, same model); 1e-2 leaves room, while a wrong
# eviction moves them by > 0.1 (test_eviction_changes_the_answer_measurably)
TOL = 1e-2


@pytest.mark.parametrize("keep, every", [(0.25, 3), (0.5, None), (0.1, 2)])
def test_tiny_llama_matches_reference(tiny, hf, keep, every):
    m, model = tiny
    t1, img, t2 = _turn(m)
    ref_logits, ref_kept, ref_toks, ref_step_logits, ref_cache = _reference(
        hf, m, t1, img, t2, keep, every)
    c = _Ctx(model, dict(keep=keep, decode_every=every))
    try:
        logits, pos, freed = c.prefill(t1, img, t2)
        assert np.max(np.abs(logits - ref_logits.numpy())) < TOL
        assert c.kept_rows() == ref_kept
        assert freed == N_IMG - E.keep_count(N_IMG, keep)
        toks, step_logits = c.greedy(logits, pos)
        assert toks == ref_toks
        for a, b in zip(step_logits, ref_step_logits):
            assert np.max(np.abs(a - b.numpy())) < TOL
        # the decode-time evictions kept the reference's cells too
        assert c.kept_rows() == (ref_cache.row[ref_cache.image == 0] - len(t1)).tolist()
        if every:
            assert len(c.kept_rows()) < len(ref_kept)
        # the queries came through liblightkv's graph hook (native.Capture, patch 0007), one
        # Qcur copy a layer read for the window's decode and, with decode_every, for each
        # generated token; the eval callback was never asked, so no graph was split; the
        # nodes were marked in the graphs built (a reused step graph keeps its marks)
        st = c.ev._q.stats()
        assert st["copied"] == N_LAYER * (1 + (STEPS if every else 0))
        assert st["asked"] == st["wanted"] == 0
        assert N_LAYER <= st["marked"] <= st["copied"] and st["marked"] % N_LAYER == 0
    finally:
        c.close()


def test_eviction_changes_the_answer_measurably(tiny, hf):
    """TOL is meaningful: evicting 3/4 of the image moves the reference by far more."""
    m, _ = tiny
    t1, img, t2 = _turn(m)
    a = _reference(hf, m, t1, img, t2, 0.25, None)[3]
    b = _reference(hf, m, t1, img, t2, 1.0, None)[3]
    assert max(float(torch.max(torch.abs(x - y))) for x, y in zip(a[1:], b[1:])) > 0.1


@pytest.mark.parametrize("keep, every", [(0.5, 2), (0.25, None)])
def test_layer_mode_then_eviction_matches_reference(tiny, hf, keep, every):
    """Layer mode (merges after layers 0 and 1, KV compacted), then the eviction scored on
    the final cells with the window's queries of each layer as that layer ran: against
    reference.prefill_with_merge(kv_policy="compact") followed by reference/evict.py."""
    from lightkv_edge.layer_mode import LayerRunner, Segment, Stage
    from lightkv_edge.reference import Schedule, prefill_with_merge
    m, model = tiny
    t1, img, t2 = _turn(m)
    s1, s2 = len(t1), len(t1) + N_IMG
    s, w, grid = s2 + len(t2), len(t2), (8, 8)
    emb = m.weights["token_embd.weight"].astype(np.float64)
    x = torch.from_numpy(np.concatenate([emb[t1], img.astype(np.float64), emb[t2]]))
    ref = prefill_with_merge(hf, x, [(s1, N_IMG, grid)], Schedule((0, 1), (2, 1), (0.5, 0.5)),
                             positions="keep", kv_policy="compact")
    is_img = (ref.kept >= s1) & (ref.kept < s2)
    cache = R.Cache(list(ref.keys), list(ref.values), ref.positions.clone(),
                    torch.where(is_img, 0, -1), ref.kept.clone())
    R.evict(hf, cache, [q[:, -w:] for q in ref.queries], ref.positions[-w:], keep)
    ref_kept = (cache.row[cache.image == 0] - s1).tolist()
    ref_toks, ref_logits = R.generate(hf, cache, ref.logits, ref.next_position, STEPS,
                                      keep=keep, every=every)

    c = _Ctx(model, None)
    try:
        run = LayerRunner(model, c.ctx, n_batch=N_BATCH, use_mrope=False)
        c.ev = ev = E.Evictor(model, c.ctx, keep=keep, decode_every=every)
        segs = [Segment("text", np.arange(s1)[None], tokens=t1),
                Segment("image", np.arange(s1, s2)[None], embd=img, grid=grid),
                Segment("text", np.arange(s2, s)[None], tokens=t2)]
        res = run.prefill(segs, (Stage(0, 2, 0.5), Stage(1, 1, 0.5)), observe_q=ev.layers)
        ev.arm()                       # the runner ends with the stock range
        image, n_vis = ev.new_image(), res.vision_out
        for lo, hi, im in ((0, s1, -1), (s1, s1 + n_vis, image), (s1 + n_vis, None, -1)):
            ev.add_cells(res.cells[lo:hi], res.positions[0, lo:hi], im)
        assert res.window_q.rows == len(t2)          # the last segment's queries
        # each layer's queries as that layer ran: every row, then the rows each merge left
        ran = [s] + [s1 + st["vision_out"] + len(t2) for st in res.stages]
        assert [res.window_q.capture.rows(li) for li in range(N_LAYER)] == \
            [ran[0], ran[1], ran[2], ran[2]]
        assert np.max(np.abs(res.logits - ref.logits.numpy())) < TOL
        ev.evict(res.window_q, np.arange(s2, s), [image])
        assert res.kept[0][c.kept_rows()].tolist() == ref_kept
        toks, step_logits = c.greedy(res.logits, s)
        assert toks == ref_toks
        for a, b in zip(step_logits, ref_logits):
            assert np.max(np.abs(a - b.numpy())) < TOL
        assert res.kept[0][c.kept_rows()].tolist() == \
            (cache.row[cache.image == 0] - s1).tolist()
    finally:
        c.close()


def test_keep_one_is_exactly_no_eviction_tiny(tiny):
    """Scoring that frees nothing (eval callback on, cells logged) leaves llama.cpp's
    logits bit for bit those of plain decodes."""
    m, model = tiny
    t1, img, t2 = _turn(m)
    c = _Ctx(model, None)
    try:
        want_logits, pos, _ = c.prefill(t1, img, t2)
        want = c.greedy(want_logits, pos)
    finally:
        c.close()
    c = _Ctx(model, dict(keep=1.0, decode_every=2))
    try:
        logits, pos, freed = c.prefill(t1, img, t2)
        assert freed == 0 and np.array_equal(logits, want_logits)
        toks, step_logits = c.greedy(logits, pos)
        assert toks == want[0]
        for a, b in zip(step_logits, want[1]):
            assert np.array_equal(a, b)
    finally:
        c.close()


def test_evictor_refuses_bad_settings(tiny):
    _, model = tiny
    c = _Ctx(model, None)
    try:
        for kw, why in ((dict(keep=0.0), "kept fraction"), (dict(keep=1.5), "kept fraction"),
                        (dict(keep=float("nan")), "kept fraction"),
                        (dict(keep=0.5, decode_every=0), "interval"),
                        (dict(keep=0.5, layers=[N_LAYER]), "layers"),
                        (dict(keep=0.5, window=0), "window")):
            with pytest.raises(ValueError, match=why):
                E.Evictor(model, c.ctx, **kw)
    finally:
        c.close()


# ---------------------------------------------------------------------------------------
# the embedded Qwen2-VL model (M-RoPE), f32, through VisionChat
# ---------------------------------------------------------------------------------------
QUESTION = "what colour is the circle?"


def _sample_image(seed=3):
    from lightkv_edge.tasks import shapes as S
    return S.dataset("test", 1, seed=seed)[0].image


def _turn_segments(chat, img):
    """(segments, end position) of the one-image turn chat.ask(QUESTION, [img]) prefills:
    what the float64 reference is fed (layer_mode's own reading of libmtmd's chunks)."""
    from lightkv_edge import layer_mode, mtmd
    from lightkv_edge.engine import _Turn

    full = chat._render([_Turn("user", chat.marker + QUESTION, [img])], True)
    chunks = chat._tokenize(full, [img])
    try:
        segs, end, _ = layer_mode.segments_from_chunks(
            chat.m, [mtmd.chunks_get(chunks, i) for i in range(mtmd.chunks_size(chunks))], 0)
    finally:
        mtmd.chunks_free(chunks)
    return segs, end


class _Recorder:
    """The token ids an engine generates (tests/test_chat.py's recorder)."""

    def __init__(self, chat):
        self.tokens = []
        orig = chat._generate

        def gen(max_tokens, stats, answer):
            for t in orig(max_tokens, stats, answer):
                self.tokens.append(t)
                yield t
        chat._generate = gen


@pytest.mark.parametrize("keep, every", [(0.25, 3), (0.5, None)])
def test_embedded_qwen2vl_matches_reference(embedded_f32_pair, keep, every):

    from lightkv_edge.engine import VisionChat
    from lightkv_edge.images import as_image

    chat = VisionChat(*map(str, embedded_f32_pair), mode="off", evict=keep,
                      decode_evict=every, ignore_eos=True, max_tokens=STEPS, n_threads=2,
                      ctx_size=512)
    try:
        img = as_image(_sample_image())
        segs, end = _turn_segments(chat, img)
        rec = _Recorder(chat)
        chat.ask(QUESTION, [img])
        eog = chat._eog_tokens
        st = chat.last_stats
        log = chat._evictor.log
        kept = [j for j, i in enumerate(k for k, im in enumerate(log.image) if im == 0)
                if log.alive[i]]
    finally:
        chat.close()

    shim, cache, out, images = qwen2vl_reference_prefill(segs, end)
    S = len(images)
    w = segs[-1].n
    R.evict(shim, cache, [q[:, -w:] for q in out.queries], torch.arange(S - w, S), keep)
    first = images.index(0)
    n_img = images.count(0)
    assert st.evict_vision_before == n_img
    assert st.evict_vision_after == E.keep_count(n_img, keep)
    toks, _ = R.generate(shim, cache, out.logits, S, STEPS, keep=keep, every=every, ban=eog)
    assert rec.tokens == toks
    assert kept == (cache.row[cache.image == 0] - first).tolist()


# ---------------------------------------------------------------------------------------
# the engine on the shipped model: exactness, cells and bytes, modes, turns
# ---------------------------------------------------------------------------------------
def _chat(**kw):
    from lightkv_edge.engine import VisionChat
    kw.setdefault("max_tokens", 8)
    kw.setdefault("n_threads", 2)
    return VisionChat(**kw)


def _logits(chat):
    n_vocab = llama_cpp.llama_vocab_n_tokens(chat.m.vocab)
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(chat.m.ctx, -1),
                                 shape=(n_vocab,)).copy()


@pytest.mark.parametrize("mode", ["off", "embed"])
def test_keep_one_equals_no_eviction_exactly(mode):
    img = _sample_image()
    got = {}
    for evict in (None, 1.0):
        with _chat(mode=mode, evict=evict, decode_evict=2 if evict else None,
                   ignore_eos=True) as chat:
            rec = _Recorder(chat)
            chat.ask(QUESTION, [img])
            chat.ask("and the square?")          # a second turn on the same cache
            got[evict] = (rec.tokens, _logits(chat), chat.n_cells, chat.last_stats.kv_bytes)
    assert len(got[None][0]) == 16
    assert got[1.0][0] == got[None][0]
    assert np.array_equal(got[1.0][1], got[None][1])
    assert got[1.0][2:] == got[None][2:]


def test_cells_and_bytes_drop_by_the_evicted_fraction():
    img = _sample_image()
    per_cell = []
    for keep in (0.5, 0.25):
        with _chat(mode="off", evict=keep) as chat:
            chat.ask(QUESTION, [img])
            st = chat.last_stats
            n = st.vision_tokens_in
            assert st.evict_vision_before == n == 64
            assert st.evict_vision_after == E.keep_count(n, keep)
            freed = st.evict_vision_before - st.evict_vision_after
            # llama.cpp's state size: a fixed header plus the same bytes per cell, so the
            # bytes freed are exactly freed cells x bytes per cell
            d = st.evict_kv_bytes_before - st.evict_kv_bytes_after
            assert d % freed == 0
            per_cell.append(d // freed)
            assert st.kv_bytes == st.evict_kv_bytes_after      # after the prefill
            assert chat.n_cells == len(chat._evictor.log.live()[0])
    # f16 K and V of every layer: at least 2 * n_layer * n_embd_kv * 2 bytes a cell
    with _chat(mode="off") as chat:
        n_layer = llama_cpp.llama_model_n_layer(chat.m.model)
        n_embd_kv = (llama_cpp.llama_model_n_embd(chat.m.model)
                     // llama_cpp.llama_model_n_head(chat.m.model)
                     * llama_cpp.llama_model_n_head_kv(chat.m.model))
    assert per_cell[0] == per_cell[1] >= 4 * n_layer * n_embd_kv


def test_multi_turn_with_evictions():
    """Two images in two turns, then a text turn, with eviction after each prefill and
    while decoding: every turn answers, the bookkeeping matches llama.cpp's cache."""
    from lightkv_edge.tasks import shapes as S
    samples = S.dataset("test", 2, seed=4)
    mem_max = llama_cpp.llama_memory_seq_pos_max
    with _chat(mode="off", evict=0.5, decode_evict=2, ignore_eos=True, max_tokens=4) as chat:
        a1 = chat.ask(samples[0].question, [samples[0].image])
        s1 = chat.last_stats
        a2 = chat.ask(samples[1].question, [samples[1].image])
        s2 = chat.last_stats
        a3 = chat.ask("is there a circle?")
        s3 = chat.last_stats
        assert a1 and a2 and a3
        assert s1.evict_vision_after == 32 and s2.evict_vision_before == 64
        assert s2.evict_vision_after == 32        # the first image is not scored again
        assert s3.evict_vision_before == 0        # no image in the third turn
        assert s1.evict_decode_freed > 0 and s3.evict_decode_freed > 0
        live = chat._evictor.log.live()
        assert chat.n_cells == len(live[0])
        assert mem_max(chat.m.mem, 0) == chat.n_past - 1
        assert len(set(live[1].tolist())) == len(live[1])
        # a turn that fails (too long) leaves the cache and the log as they were
        before = (chat.n_cells, chat.n_past, len(chat._evictor.log.cells))
        with pytest.raises(ValueError, match="context"):
            chat.ask("word " * 5000)
        assert (chat.n_cells, chat.n_past, len(chat._evictor.log.cells)) == before
        chat.reset()
        assert chat._evictor.log.cells == []


def test_embed_and_layer_modes_with_eviction():
    img = _sample_image()
    with _chat(mode="embed", keep=0.5, evict=0.5) as chat:
        assert chat.ask(QUESTION, [img])
        st = chat.last_stats
        assert st.evict_vision_before == st.vision_tokens_kept == 32
        assert st.evict_vision_after == 16
        assert st.kv_cells == st.prompt_tokens and st.kv_bytes == st.evict_kv_bytes_after
    with _chat(mode="layer", schedule="0:2:0.5,1:1:0.5", evict=0.5, decode_evict=2,
               ignore_eos=True) as chat:
        assert chat.ask(QUESTION, [img])
        st = chat.last_stats
        assert st.evict_vision_before == st.vision_tokens_kept == 16
        assert st.evict_vision_after == 8
        assert st.evict_decode_freed > 0
        assert chat.ask("and the square?")        # layer mode's range reset, then re-armed
        assert chat.n_cells == len(chat._evictor.log.live()[0])


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lightkv_edge", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_eviction_flags(tmp_path):
    png = ROOT / "lightkv_edge" / "models" / "example.png"
    base = ["chat", png, "-p", QUESTION, "-n", "3", "-t", "2"]
    r = _cli(*base, "--evict", "0.25", "--decode-evict", "1", "--stats")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout.strip().splitlines()[-1])
    assert (st["evict_vision_before"], st["evict_vision_after"]) == (
        st["vision_tokens_kept"], E.keep_count(st["vision_tokens_kept"], 0.25))
    assert st["evict_kv_bytes_after"] < st["evict_kv_bytes_before"]
    _one_line_error(_cli(*base, "--evict", "0"), "--evict")
    _one_line_error(_cli(*base, "--evict", "1.5"), "--evict")
    _one_line_error(_cli(*base, "--evict", "x"), "--evict")
    _one_line_error(_cli(*base, "--evict", "0.5", "--decode-evict", "0"), "--decode-evict")
    _one_line_error(_cli(*base, "--decode-evict", "2"), "--decode-evict", "--evict")
    _one_line_error(_cli(*base, "--evict", "0.5", "--evict-layers", "7"), "--evict-layers")
    _one_line_error(_cli(*base, "--evict", "0.5", "--evict-window", "0"), "--evict-window")


def test_library_errors_name_the_parameter():
    from lightkv_edge.errors import InputError
    for kw, param in ((dict(evict=0.0), "evict"), (dict(evict=True), "evict"),
                      (dict(evict=0.5, decode_evict=0), "decode_evict"),
                      (dict(decode_evict=3), "decode_evict"),
                      (dict(evict=0.5, evict_layers=[99]), "evict")):
        with pytest.raises(InputError) as e:
            _chat(**kw)
        assert e.value.param == param


def qwen2vl_reference_prefill(segs, end: int):
    """The embedded Qwen2-VL in float64 (transformers' weights, our reference decoder) run
    over the turn the engine prefilled (its segments: text ids or image rows at their M-RoPE
    positions; STEPS answer positions after `end`): (model, cache, forward output, image of
    each row: 0 or -1 for text)."""
    from transformers import Qwen2VLForConditionalGeneration

    from tests.helpers.qwen2vl_ref import Qwen2VLText
    vl = Qwen2VLForConditionalGeneration.from_pretrained(HF_DIR, torch_dtype=torch.float64)
    vl.eval()
    S = sum(s.n for s in segs)
    table = np.concatenate([s.pos[:3].T if s.kind == "image" else
                            np.repeat(s.pos[:1].T, 3, 1) for s in segs])
    table = np.concatenate([table, np.repeat((end + np.arange(STEPS + 1))[:, None], 3, 1)])
    shim = Qwen2VLText(vl, torch.from_numpy(table.astype(np.int64)))
    emb = shim.get_input_embeddings()
    rows, images = [], []
    for s in segs:
        if s.kind == "text":
            rows.append(emb(torch.from_numpy(s.tokens.astype(np.int64))).detach())
            images += [-1] * s.n
        else:
            rows.append(torch.from_numpy(s.embd).to(torch.float64))
            images += [0] * s.n
    cache = R.Cache.empty(shim)
    return shim, cache, R.forward(shim, cache, torch.cat(rows), torch.arange(S), images), images
