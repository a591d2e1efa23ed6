"""Patch 0001 (native/patches/0001-position-gaps.patch): llama_set_position_gaps.

Stock llama.cpp refuses a sequence whose positions jump (normal RoPE); with the switch on,
it accepts them and computes exactly what a forward at those positions gives."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from lightkv_edge import _libs
from tests.helpers.tiny_llama import loaded_tiny_llama, reference_logits

llama_cpp = _libs.use_our_llama_cpp()
set_gaps = llama_cpp.llama_cpp._lib.llama_set_position_gaps
set_gaps.argtypes = [ctypes.c_void_p, ctypes.c_bool]
set_gaps.restype = None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    yield from loaded_tiny_llama(tmp_path_factory.mktemp("gaps") / "tiny.gguf",
                                 llama_cpp, seed=3)


def _decode(model, tokens, positions, *, gaps: bool):
    """Decode tokens in two batches (so the jump also crosses a batch boundary);
    returns (rc of the second batch, logits of the last token or None)."""
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_threads, cp.n_threads_batch = 256, 64, 2, 2
    ctx = llama_cpp.llama_init_from_model(model, cp)
    try:
        set_gaps(ctx, gaps)
        half = len(tokens) // 2
        rc = 0
        for lo, hi in ((0, half), (half, len(tokens))):
            b = llama_cpp.llama_batch_init(hi - lo, 0, 1)
            b.n_tokens = hi - lo
            for i in range(lo, hi):
                j = i - lo
                b.token[j] = tokens[i]
                b.pos[j] = positions[i]
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = 0
                b.logits[j] = i == len(tokens) - 1
            rc = llama_cpp.llama_decode(ctx, b)
            llama_cpp.llama_batch_free(b)
            if rc != 0:
                return rc, None
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        out = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        return rc, out.copy()
    finally:
        llama_cpp.llama_free(ctx)


TOKENS = [1, 300, 301, 302, 303, 304, 305, 306, 307, 308]
GAPPED = [0, 1, 2, 5, 6, 9, 10, 11, 20, 21]   # jumps inside and across the batches


def test_stock_refuses_gaps(tiny):
    _, model = tiny
    rc, _ = _decode(model, TOKENS, GAPPED, gaps=False)
    assert rc != 0   # refused with an error code, not an abort


def test_gaps_match_a_forward_at_those_positions(tiny):
    m, model = tiny
    rc, got = _decode(model, TOKENS, GAPPED, gaps=True)
    assert rc == 0
    want = reference_logits(m, TOKENS, GAPPED)[-1]
    # f32 weights, f16 KV cache in llama.cpp vs float64 numpy: the smoke test measured
    # 1.6e-3..2.4e-3 at contiguous positions; 2e-2 leaves room, while a wrong position
    # (e.g. the contiguous ones) moves the logits by far more (checked below)
    assert np.max(np.abs(got - want)) < 2e-2
    contiguous = reference_logits(m, TOKENS)[-1]
    assert np.max(np.abs(contiguous - want)) > 0.1


def test_gaps_do_not_change_contiguous_decoding(tiny):
    _, model = tiny
    pos = list(range(len(TOKENS)))
    _, a = _decode(model, TOKENS, pos, gaps=False)
    _, b = _decode(model, TOKENS, pos, gaps=True)
    assert np.array_equal(a, b)   # the switch only relaxes a check


def test_positions_must_still_increase(tiny):
    _, model = tiny
    rc, _ = _decode(model, TOKENS, [0, 1, 2, 3, 4, 3, 4, 5, 6, 7], gaps=True)
    assert rc != 0
