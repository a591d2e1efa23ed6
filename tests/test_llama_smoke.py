"""A tiny llama model, written here with the gguf package, runs through our llama.cpp.

Everything goes through llama-cpp-python's low-level ctypes layer bound to *our* build
(lightkv_edge._libs.use_our_llama_cpp), so these tests prove that the pinned, patched
llama.cpp we compiled loads a GGUF, tokenizes, decodes multi-token batches, continues
from its KV cache, and quantizes, and that the results are numerically right:

- F32 model: llama.cpp's logits are checked against a float64 numpy forward pass of the
  same graph (tests/helpers/tiny_llama.py), for the whole prompt batch and for every
  greedily decoded token.
- Q8_0 model (quantized by llama_model_quantize): loaded with the project's safe
  default `use_extra_bufts=False` and fed its 24-token prompt in ONE llama_decode, the exact
  case that segfaulted in the pinned ggml's AMX path (docs/llama-cpp-notes.md).
  Its logits must stay close to the F32 model's.

The unsafe setting (use_extra_bufts=True) is never run in this process: on an AMX CPU it
would crash the whole test session.
"""
from __future__ import annotations

import ctypes
import inspect

import numpy as np
import pytest

from lightkv_edge import _libs

llama_cpp = _libs.use_our_llama_cpp()

from helpers.tiny_llama import BOS, BYTE0, reference_logits, write_tiny_llama  # noqa: E402

PROMPT = "hello world, the quick brown fox"
N_GREEDY = 4

# Tolerances (logits of this model have a standard deviation of about 1, see helpers).
# F32 vs float64 numpy: llama.cpp keeps K and V in an F16 cache by default (and, with
# flash attention, rounds Q to F16 too), so attention inputs carry a relative rounding
# error of 2^-11 ~ 5e-4; through 2 layers that is a few 1e-3 on the logits (measured on
# four seeds: max 1.6e-3 to 2.4e-3). 2e-2 leaves a wide margin and still catches any wrong op (a wrong RoPE, norm
# or mask moves logits by O(1)).
F32_ATOL = 2e-2
# Q8_0 vs F32: Q8_0 stores each block of 32 weights as int8 times one scale (relative
# step 1/127 of the block's largest weight), and the CPU also quantizes the activations
# to Q8_0 for the dot products. Each matmul then has a relative error of roughly 0.5%,
# 7 matmuls per layer, 2 layers and the output: measured relative RMS error of the logits
# 1.6e-2 to 1.8e-2 on four seeds (max abs 0.06 to 0.08; the notes saw 0.04 on another
# model). 5% relative RMS bounds that with a 3x margin; a broken quantized path (wrong
# scales, garbage, another model) is at 100% or more.
Q8_REL_RMS = 0.05


# ---------------------------------------------------------------------------------------
# a minimal owner of llama.cpp objects
# ---------------------------------------------------------------------------------------
class Llama:
    """Model + context + batch through the low-level API, freed in close()."""

    def __init__(self, path, *, use_extra_bufts: bool, n_ctx: int = 64):
        self.model = self.ctx = None
        self.batch = None
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = use_extra_bufts
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        assert self.model, f"llama.cpp could not load {path}"
        try:
            self.vocab = llama_cpp.llama_model_get_vocab(self.model)
            self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
            cp = llama_cpp.llama_context_default_params()
            cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
            cp.n_threads = cp.n_threads_batch = 2
            self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
            assert self.ctx, "llama.cpp could not create a context"
            self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        except BaseException:
            self.close()
            raise

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        data = text.encode()
        buf = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, len(buf),
                                     add_special, False)
        assert n >= 0, f"tokenize failed ({n})"
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        assert n >= 0
        return buf.raw[:n]

    def decode(self, tokens: list[int], pos0: int) -> np.ndarray:
        """One llama_decode of all `tokens` (positions pos0...), logits for every one."""
        b = self.batch
        b.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1
        rc = llama_cpp.llama_decode(self.ctx, b)
        assert rc == 0, f"llama_decode returned {rc}"
        out = np.empty((len(tokens), self.n_vocab), np.float32)
        for i in range(len(tokens)):
            p = llama_cpp.llama_get_logits_ith(self.ctx, i)
            assert p, f"no logits for batch row {i}"
            out[i] = np.ctypeslib.as_array(p, shape=(self.n_vocab,))
        return out

    def close(self):
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _backend():
    llama_cpp.llama_backend_init()
    yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf", seed=1234)


@pytest.fixture(scope="module")
def tiny_q8(tiny):
    out = tiny.path.with_name("tiny-q8_0.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(tiny.path).encode(), str(out).encode(),
                                        ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize returned {rc}"
    return out


# ---------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------
def test_project_default_is_the_safe_one():
    """The engine loads models with use_extra_bufts=False unless asked otherwise (stock
    llama.cpp turns it on: that is the AMX/repack path that crashed)."""
    from lightkv_edge.model import VisionModel
    default = inspect.signature(VisionModel).parameters["use_extra_bufts"].default
    assert default is False
    assert llama_cpp.llama_model_default_params().use_extra_bufts is True  # why we override


def test_tokenizer_spm_with_byte_fallback(tiny):
    with Llama(tiny.path, use_extra_bufts=False) as m:
        assert m.n_vocab == tiny.n_vocab
        toks = m.tokenize(PROMPT)
        assert toks[0] == BOS and len(toks) >= 8, toks
        assert b"".join(m.piece(t) for t in toks[1:]).strip() == PROMPT.encode()
        # characters outside the vocabulary become their UTF-8 bytes (no abort)
        toks = m.tokenize("\u00e9\u65e5", add_special=False)
        want = [BYTE0 + b for b in "\u00e9\u65e5".encode()]
        assert toks[-len(want):] == want, toks


def test_f32_matches_numpy_and_greedy_decodes(tiny):
    with Llama(tiny.path, use_extra_bufts=False) as m:
        tokens = m.tokenize(PROMPT)
        logits = m.decode(tokens, 0)  # the whole prompt in one batch
        ref = reference_logits(tiny, tokens)
        np.testing.assert_allclose(logits, ref, atol=F32_ATOL, rtol=0)
        generated = []
        for _ in range(N_GREEDY):  # one token at a time, from the KV cache
            nxt = int(np.argmax(logits[-1]))
            generated.append(nxt)
            tokens.append(nxt)
            logits = m.decode([nxt], len(tokens) - 1)
            ref = reference_logits(tiny, tokens)[-1:]
            np.testing.assert_allclose(logits, ref, atol=F32_ATOL, rtol=0)
        assert len(generated) == N_GREEDY and all(0 <= t < tiny.n_vocab for t in generated)
        # the greedy path is the reference's wherever the reference's choice is clear
        full = reference_logits(tiny, tokens)
        n_prompt = len(tokens) - N_GREEDY
        for j, t in enumerate(generated):
            row = np.sort(full[n_prompt - 1 + j])
            if row[-1] - row[-2] > 2 * F32_ATOL:
                assert t == int(np.argmax(full[n_prompt - 1 + j]))


def test_q8_0_multitoken_batch_with_safe_default(tiny, tiny_q8):
    from gguf import GGMLQuantizationType, GGUFReader
    types = {t.name: t.tensor_type for t in GGUFReader(str(tiny_q8)).tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.1.ffn_down.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32

    with Llama(tiny.path, use_extra_bufts=False) as m:
        tokens = m.tokenize(PROMPT)
        f32 = m.decode(tokens, 0)
    assert len(tokens) >= 8  # a multi-token batch: the case that crashed under AMX
    with Llama(tiny_q8, use_extra_bufts=False) as m:
        assert m.tokenize(PROMPT) == tokens
        q8 = m.decode(tokens, 0)  # ONE llama_decode of the whole prompt
        nxt = int(np.argmax(q8[-1]))
        q8_next = m.decode([nxt], len(tokens))  # and a step from the KV cache
    assert np.isfinite(q8).all() and np.isfinite(q8_next).all()
    rel = np.sqrt(np.mean((q8 - f32) ** 2) / np.mean(f32 ** 2))
    assert 0 < rel < Q8_REL_RMS, f"Q8_0 logits relative RMS error {rel:.4f}"
    # the bound means something: unrelated logits of the same model are ~100% apart
    shifted = np.roll(f32, 1, axis=0)
    assert np.sqrt(np.mean((shifted - f32) ** 2) / np.mean(f32 ** 2)) > 10 * Q8_REL_RMS
    # most next-token choices survive quantization
    agree = np.mean(np.argmax(q8, -1) == np.argmax(f32, -1))
    assert agree >= 0.75, f"argmax agreement {agree:.2f}"
