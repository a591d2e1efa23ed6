"""The layer-adaptive KV eviction (--evict-adaptive, AirCache's layer-wise budget; issue 12)
against reference/evict.py's evict_adaptive, on the tiny random llama of tests/test_evict.py
(normal RoPE, GQA, 4 layers) and through VisionChat on the embedded model.

- the budget rule: flat layers get more, concentrated ones fewer, nested (non-increasing
  with depth), L * keep_count(n, KEEP) in all; native = reference;
- parity: the cells each layer sees, the greedy tokens and logits are the reference's
  (hidden cells masked per layer by patch 0005, unkept cells freed);
- KEEP 1.0 is exactly no eviction; the layer-average visible fraction is KEEP (counted);
- --evict-adaptive without --evict (or with --decode-evict): one line, exit code 2.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lightkv_edge import _libs

llama_cpp = _libs.use_our_llama_cpp()

from lightkv_edge import evict as E
from lightkv_edge.reference import evict as R
from tests.test_evict import (N_IMG, N_LAYER, QUESTION, ROOT, STEPS, TOL, _chat, _Ctx, _cli,
                              _one_line_error, _sample_image, _turn, _turn_segments)

torch.set_num_threads(1)

# the random tiny llama attends almost uniformly in every layer (equal budgets: nothing
# would be hidden); this twin's deeper layers attend sharply (q x SHARP), so their budgets
# are smaller and the per-layer masks matter. TOL is test_evict.py's (f16 cache vs the f64
# reference); the 3x sharper logits amplify the f16 error of K: 3 weight seeds x keeps 0.5,
# 0.25, 0.1 measured at most 6.1e-3 (4x: 8.5e-3, too close to TOL)
SHARP = {2: 3.0, 3: 3.0}


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    from tests.helpers.tiny_llama import loaded_tiny_llama
    yield from loaded_tiny_llama(tmp_path_factory.mktemp("adaptive") / "sharp.gguf",
                                 llama_cpp, seed=11, n_layer=N_LAYER, n_head=4, n_head_kv=2,
                                 q_scale=SHARP)


@pytest.fixture(scope="module")
def hf_sharp(sharp):
    from tests.helpers.layer_ref import hf_llama_from_tiny
    return hf_llama_from_tiny(sharp[0])


# ---------------------------------------------------------------------------------------
# the budget rule
# ---------------------------------------------------------------------------------------
def test_effective_count_and_fit():
    assert E.effective_count(np.ones(8)) == pytest.approx(8.0)
    assert E.effective_count(np.array([5.0, 0, 0, 0])) == pytest.approx(1.0)
    assert E.effective_count(np.zeros(4)) == 4.0            # receives nothing: flat
    assert E.nonincreasing_fit([3, 1, 2, 0]).tolist() == [3, 1.5, 1.5, 0]
    assert R.nonincreasing_fit([3, 1, 2, 0]) == [3, 1.5, 1.5, 0]


def test_layer_budgets_follow_the_skew():
    n = 64
    flat, peaked = np.ones(n), np.r_[np.full(4, 100.0), np.ones(n - 4)]
    b = E.layer_budgets(np.stack([flat, flat, peaked, peaked]), 0.25)
    assert b.sum() == 4 * 16                               # the layer average is KEEP
    assert b[0] == b[1] > 16 > b[2] == b[3] >= 1           # flat keeps more than peaked
    # a flat layer after a peaked one: nested sets need b_0 >= b_1, the fit pools them
    b = E.layer_budgets(np.stack([peaked, flat, flat, flat]), 0.25)
    assert np.all(np.diff(b) <= 0) and b.sum() == 64
    assert E.layer_budgets(np.stack([flat, peaked]), 1.0).tolist() == [n, n]
    assert E.layer_budgets(np.stack([peaked, peaked]), 0.001).tolist() == [1, 1]
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.gamma(rng.uniform(0.05, 3.0), size=(5, 37)) ** rng.uniform(1, 4, (5, 1))
        keep = float(rng.uniform(0.01, 1.0))
        got = E.layer_budgets(s, keep)
        assert got.tolist() == R.layer_budgets(torch.from_numpy(s), keep)
        assert got.sum() == 5 * E.keep_count(37, keep) and got.min() >= 1 and got.max() <= 37


# ---------------------------------------------------------------------------------------
# parity on the tiny llama
# ---------------------------------------------------------------------------------------
def _reference_adaptive(hf, m, t1, img, t2, keep, hide=True):
    emb = m.weights["token_embd.weight"].astype(np.float64)
    x = torch.from_numpy(np.concatenate([emb[t1], img.astype(np.float64), emb[t2]]))
    s, w = len(x), len(t2)
    images = [-1] * len(t1) + [0] * N_IMG + [-1] * len(t2)
    cache = R.Cache.empty(hf)
    out = R.forward(hf, cache, x, torch.arange(s), images)
    budgets = R.evict_adaptive(hf, cache, [q[:, -w:] for q in out.queries],
                               torch.arange(s - w, s), keep)
    seen = {li: (cache.row[(cache.image == 0) & cache.visible(li)] - len(t1)).tolist()
            for li in range(N_LAYER)}
    if not hide:                    # what the model would compute without patch 0005
        cache.end = torch.full_like(cache.end, N_LAYER)
    toks, logits = R.generate(hf, cache, out.logits, s, STEPS)
    return out.logits, budgets[0], seen, toks, logits


def _seen_by_layer(ev):
    log = ev.log
    rows = [i for i, im in enumerate(log.image) if im == 0]
    return {li: [j for j, i in enumerate(rows) if log.alive[i] and log.end[i] > li]
            for li in range(N_LAYER)}


@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_tiny_llama_adaptive_matches_reference(sharp, hf_sharp, keep):
    m, model, hf = *sharp, hf_sharp
    t1, img, t2 = _turn(m)
    ref_logits, ref_budgets, ref_seen, ref_toks, ref_step_logits = _reference_adaptive(
        hf, m, t1, img, t2, keep)
    c = _Ctx(model, dict(keep=keep, adaptive=True))
    try:
        logits, pos, freed = c.prefill(t1, img, t2)
        assert np.max(np.abs(logits - ref_logits.numpy())) < TOL
        assert c.ev.last_budgets[0] == ref_budgets
        assert len(set(ref_budgets)) > 1            # the budgets really differ by layer
        seen = _seen_by_layer(c.ev)
        assert seen == ref_seen
        assert [len(seen[li]) for li in range(N_LAYER)] == ref_budgets
        # freed for real: the cells layer 0 (the largest budget) does not keep
        assert freed == N_IMG - ref_budgets[0]
        assert c.ev.hidden_cells([0]) == ref_budgets[0] - ref_budgets[-1] > 0
        # the layer average of the visible fraction is KEEP, counted from the cells
        assert c.ev.visible_fraction(N_IMG, [0]) == E.keep_count(N_IMG, keep) / N_IMG
        toks, step_logits = c.greedy(logits, pos)
        assert toks == ref_toks
        for a, b in zip(step_logits, ref_step_logits):
            assert np.max(np.abs(a - b.numpy())) < TOL
    finally:
        c.close()


def test_hiding_changes_the_answer_measurably(sharp, hf_sharp):
    """TOL is meaningful here: without the per-layer masks (hidden cells seen by every
    layer) the reference's logits move by far more than TOL."""
    m, hf = sharp[0], hf_sharp
    t1, img, t2 = _turn(m)
    a = _reference_adaptive(hf, m, t1, img, t2, 0.25)[4]
    b = _reference_adaptive(hf, m, t1, img, t2, 0.25, hide=False)[4]
    assert max(float(torch.max(torch.abs(x - y))) for x, y in zip(a[1:], b[1:])) > 0.1


def test_adaptive_keep_one_is_exactly_no_eviction_tiny(sharp):
    m, model = sharp
    t1, img, t2 = _turn(m)
    got = {}
    for kw in (None, dict(keep=1.0, adaptive=True)):
        c = _Ctx(model, kw)
        try:
            logits, pos, freed = c.prefill(t1, img, t2)
            toks, step_logits = c.greedy(logits, pos)
            got[kw is None] = (freed, toks, step_logits)
            if kw:
                assert c.ev.hidden_cells() == 0 and c.ev.last_budgets[0] == [N_IMG] * N_LAYER
        finally:
            c.close()
    assert got[False][0] == 0 and got[False][1] == got[True][1]
    for a, b in zip(got[False][2], got[True][2]):
        assert np.array_equal(a, b)


def test_evictor_refuses_adaptive_with_decode_or_layers(sharp):
    _, model = sharp
    c = _Ctx(model, None)
    try:
        for kw in (dict(decode_every=2), dict(layers=[0, 1])):
            with pytest.raises(ValueError, match="every layer"):
                E.Evictor(model, c.ctx, keep=0.5, adaptive=True, **kw)
    finally:
        c.close()


# ---------------------------------------------------------------------------------------
# VisionChat and the CLI on the embedded model
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0.25])
def test_embedded_qwen2vl_adaptive_matches_reference(embedded_f32_pair, keep):
    """M-RoPE on the trained embedded model (f32), through VisionChat: the reference's
    budgets, the cells each layer sees and the greedy tokens (tests/test_evict.py's
    Qwen2-VL parity, with the adaptive eviction)."""

    from lightkv_edge.engine import VisionChat
    from lightkv_edge.images import as_image
    from tests.test_evict import _Recorder, qwen2vl_reference_prefill

    chat = VisionChat(*map(str, embedded_f32_pair), mode="off", evict=keep,
                      evict_adaptive=True, ignore_eos=True, max_tokens=STEPS, n_threads=2,
                      ctx_size=512)
    try:
        img = as_image(_sample_image(seed=2))     # an image whose layers' budgets differ
        segs, end = _turn_segments(chat, img)
        rec = _Recorder(chat)
        chat.ask(QUESTION, [img])
        eog = chat._eog_tokens
        n_layer = chat._evictor.n_layer
        budgets = chat._evictor.last_budgets[0]
        log = chat._evictor.log
        rows = [i for i, im in enumerate(log.image) if im == 0]
        seen = {li: [j for j, i in enumerate(rows) if log.alive[i] and log.end[i] > li]
                for li in range(n_layer)}
    finally:
        chat.close()

    shim, cache, out, images = qwen2vl_reference_prefill(segs, end)
    S = len(images)
    w = segs[-1].n
    ref_budgets = R.evict_adaptive(shim, cache, [q[:, -w:] for q in out.queries],
                                   torch.arange(S - w, S), keep)[0]
    first = images.index(0)
    assert budgets == ref_budgets and len(set(budgets)) > 1
    assert seen == {li: (cache.row[(cache.image == 0) & cache.visible(li)] - first).tolist()
                    for li in range(n_layer)}
    toks, _ = R.generate(shim, cache, out.logits, S, STEPS, ban=eog)
    assert rec.tokens == toks


def test_visionchat_adaptive_keep_one_equals_off_and_two_turns():
    from tests.test_evict import _logits, _Recorder
    img = _sample_image()
    got = {}
    for kw in ({}, dict(evict=1.0, evict_adaptive=True)):
        with _chat(mode="off", ignore_eos=True, **kw) as chat:
            rec = _Recorder(chat)
            chat.ask(QUESTION, [img])
            chat.ask("and the square?")
            got[bool(kw)] = (rec.tokens, _logits(chat), chat.n_cells)
    assert got[True][0] == got[False][0]
    assert np.array_equal(got[True][1], got[False][1])
    assert got[True][2] == got[False][2]
    with _chat(mode="off", evict=0.25, evict_adaptive=True, max_tokens=4) as chat:
        from lightkv_edge.tasks import shapes as S
        samples = S.dataset("test", 2, seed=4)
        ev = chat._evictor
        for i, smp in enumerate(samples):   # the second image is scored per layer with the
            assert chat.ask(smp.question, [smp.image])   # first one's hidden cells left out
            st = chat.last_stats
            b = ev.last_budgets[i]
            assert st.evict_vision_before == 64 and sum(b) == ev.n_layer * 16
            assert st.evict_visible_fraction == 16 / 64
            assert st.evict_vision_after == b[0]          # layer 0 keeps the most
            assert st.evict_hidden == sum(1 for j, im in enumerate(ev.log.image)
                                          if im == i and ev.log.alive[j]
                                          and ev.log.end[j] < ev.n_layer)
            assert chat.n_cells == len(ev.log.live()[0])
            img0 = [(a, e) for a, e, im in zip(ev.log.alive, ev.log.end, ev.log.image)
                    if im == 0]
            if i == 0:
                first = img0
        assert img0 == first               # the first image is not scored again


def test_embed_and_layer_modes_with_adaptive_eviction():
    """On top of embed and layer (compact) modes, over two turns with an image each (layer
    mode's ranged decodes run with the first image's cells hidden from deeper layers)."""
    from lightkv_edge.tasks import shapes as S
    samples = S.dataset("test", 2, seed=2)
    for kw in (dict(mode="embed", keep=0.5), dict(mode="layer", schedule="0:2:0.5,1:1:0.5")):
        with _chat(evict=0.5, evict_adaptive=True, max_tokens=4, **kw) as chat:
            ev = chat._evictor
            for i, smp in enumerate(samples):
                assert chat.ask(smp.question, [smp.image])
                st = chat.last_stats
                n = st.vision_tokens_kept
                assert st.evict_vision_before == n
                assert sum(ev.last_budgets[i]) == ev.n_layer * E.keep_count(n, 0.5)
                assert st.evict_vision_after == ev.last_budgets[i][0]
                assert st.evict_visible_fraction == E.keep_count(n, 0.5) / n
                assert chat.n_cells == len(ev.log.live()[0])
            assert chat.ask("and the square?")


def test_cli_adaptive(tmp_path):
    png = ROOT / "lightkv_edge" / "models" / "example.png"
    base = ["chat", png, "-p", QUESTION, "-n", "3", "-t", "2"]
    r = _cli(*base, "--evict", "0.25", "--evict-adaptive", "--stats")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout.strip().splitlines()[-1])
    n = st["vision_tokens_kept"]
    assert st["evict_vision_before"] == n
    assert st["evict_visible_fraction"] == round(E.keep_count(n, 0.25) / n, 3)
    freed = st["evict_vision_before"] - st["evict_vision_after"]
    assert freed > 0 and st["evict_kv_bytes_after"] < st["evict_kv_bytes_before"]
    # only the freed cells give bytes back: the hidden ones stay allocated
    assert (st["evict_kv_bytes_before"] - st["evict_kv_bytes_after"]) % freed == 0
    _one_line_error(_cli(*base, "--evict-adaptive"), "--evict-adaptive", "--evict")
    _one_line_error(_cli(*base, "--evict", "0.5", "--evict-adaptive", "--decode-evict", "2"),
                    "--evict-adaptive")


def test_library_errors_name_evict_adaptive():
    from lightkv_edge.errors import InputError
    for kw in (dict(evict_adaptive=True), dict(evict=0.5, evict_adaptive=1),
               dict(evict=0.5, evict_adaptive=True, evict_layers=[0]),
               dict(mode="layer", kv="exact", evict=0.5, evict_adaptive=True)):
        with pytest.raises(InputError) as e:
            _chat(**kw)
        assert e.value.param == "evict_adaptive"
