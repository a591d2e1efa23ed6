"""scripts/make_shape_models.py: the quant mix it writes, the values its random blocks
decode to, and a small text model written its way that llama.cpp loads and runs.

(The full-size shape models are minutes and gigabytes to build: the cost benchmark builds
them; here the same writer makes a 2-layer model of the same architectures.)"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import make_shape_models as sm  # noqa: E402


@pytest.fixture(scope="module")
def gguf():
    try:
        g, _ = sm._gguf()
    except Exception as e:  # noqa: BLE001 - a missing pinned tree fails, never skips
        pytest.fail(f"gguf-py of the pinned llama.cpp is unavailable: {e}", pytrace=False)
    return g


def test_the_real_shapes():
    # numbers from the models' config.json files (README of each repo)
    s, q, l = sm.SHAPES["smolvlm-500m"].text, sm.SHAPES["qwen2vl-2b"].text, \
        sm.SHAPES["llava15-7b"].text
    assert (s.n_embd, s.n_ff, s.n_layer, s.n_head, s.n_head_kv, s.n_vocab) == \
        (960, 2560, 32, 15, 5, 49280)
    assert (q.n_embd, q.n_ff, q.n_layer, q.n_head, q.n_head_kv, q.n_vocab) == \
        (1536, 8960, 28, 12, 2, 151936)
    assert sum(q.mrope_sections) * 2 == q.n_embd // q.n_head
    assert (l.n_embd, l.n_ff, l.n_layer, l.n_head, l.n_head_kv, l.n_vocab) == \
        (4096, 11008, 32, 32, 32, 32000)


def test_q4_k_m_mix(gguf):
    Q = gguf.GGMLQuantizationType
    types = {n: t for n, _, t in sm._text_tensors(sm.SHAPES["llava15-7b"].text, gguf)}
    assert types["token_embd.weight"] == Q.Q4_K and types["output.weight"] == Q.Q6_K
    # use_more_bits on 32 layers: 0-3, 28-31 and every third from 6
    more = [i for i in range(32) if types[f"blk.{i}.attn_v.weight"] == Q.Q6_K]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert more == [i for i in range(32) if types[f"blk.{i}.ffn_down.weight"] == Q.Q6_K]
    assert types["blk.5.attn_q.weight"] == types["blk.5.ffn_up.weight"] == Q.Q4_K
    assert types["blk.5.attn_norm.weight"] == Q.F32
    # SmolVLM: rows of 960 are no multiple of 256 -> llama.cpp's fallbacks; the tied
    # embeddings take the output's type
    types = {n: t for n, _, t in sm._text_tensors(sm.SHAPES["smolvlm-500m"].text, gguf)}
    assert types["token_embd.weight"] == Q.Q8_0 and "output.weight" not in types
    assert types["blk.5.attn_q.weight"] == Q.Q5_0
    assert types["blk.5.ffn_down.weight"] == Q.Q4_K     # rows of 2560 = 10 x 256


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q5_0", "Q8_0"])
def test_random_blocks_decode_to_sane_weights(gguf, name):
    qt = gguf.GGMLQuantizationType[name]
    raw = sm.random_blocks(qt, 64, 512, np.random.default_rng(0), gguf)
    w = gguf.quants.dequantize(raw, qt)
    assert w.shape == (64, 512) and np.isfinite(w).all()
    # weights of a few hundredths, like a trained model's: no overflow through 32 layers
    assert 0.003 < w.std() < 0.1 and np.abs(w).max() < 0.5, (w.std(), np.abs(w).max())


def test_small_model_written_the_same_way_loads_and_runs(gguf, tmp_path):
    """A 2-layer qwen2vl and llama text model with the writer's tokenizer, quant mix and
    random blocks: llama.cpp loads it, tokenizes the chat markers as single tokens and
    decodes a batch to finite logits."""
    from lightkv_edge.model import llama_cpp
    for base in ("qwen2vl-2b", "smolvlm-500m"):
        t = sm.SHAPES[base].text
        small = sm.TextShape(**{**t.__dict__, "n_layer": 2, "n_ff": 512, "n_vocab": 2000})
        shape = sm.Shape(f"small-{base}", "test", small)
        path = tmp_path / f"{base}.gguf"
        sm.write_text_gguf(shape, path)
        mp = llama_cpp.llama_model_default_params()
        mp.use_extra_bufts = False
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        assert model, f"llama.cpp could not load {path}"
        try:
            vocab = llama_cpp.llama_model_get_vocab(model)
            assert llama_cpp.llama_vocab_n_tokens(vocab) == 2000
            marker = small.specials[1].encode()     # a chat marker (CONTROL token)
            buf = (llama_cpp.llama_token * 64)()
            n = llama_cpp.llama_tokenize(vocab, marker + b"ab", len(marker) + 2, buf, 64,
                                         False, True)
            # one token, the second special: ids 0-2 <unk> <s> </s>, 3-258 bytes, 259 on specials
            assert n >= 2 and buf[0] == 259 + 1, list(buf[:n])
            cp = llama_cpp.llama_context_default_params()
            cp.n_ctx, cp.n_batch, cp.n_threads, cp.n_threads_batch = 256, 256, 1, 1
            ctx = llama_cpp.llama_init_from_model(model, cp)
            assert ctx
            try:
                batch = llama_cpp.llama_batch_get_one(buf, n)
                assert llama_cpp.llama_decode(ctx, batch) == 0
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1),
                                               shape=(2000,))
                assert np.isfinite(logits).all() and logits.std() > 0
            finally:
                llama_cpp.llama_free(ctx)
        finally:
            llama_cpp.llama_model_free(model)


@pytest.mark.parametrize("script", ["make_shape_models.py", "make_tiny_models.py"])
def test_unknown_model_is_one_line_exit_2(script, tmp_path):
    import subprocess
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "pixtral-12b",
                        "--cache", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown" in lines[0] and "pixtral-12b" in lines[0], lines
    assert not any(tmp_path.iterdir())     # nothing built
