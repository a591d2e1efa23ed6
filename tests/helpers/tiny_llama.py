"""A tiny random-weight llama-architecture GGUF, written with the `gguf` package.

`write_tiny_llama(path)` writes an F32 model (default: hidden 128, 2 layers, 4 heads,
FFN 256, vocab 320) that the pinned llama.cpp loads as `llama`, and returns a
`TinyLlama` holding the weights and the vocabulary, so a test can compare llama.cpp's
logits with `reference_logits()`, a float64 numpy forward pass of the same graph.

The vocabulary is SentencePiece-style (tokenizer.ggml.model = "llama"):
  0 <unk>, 1 <s>, 2 </s>, 3..258 the byte-fallback tokens <0x00>..<0xFF>, then "▁",
  lowercase letters, digits, punctuation and a few merges ("he", "ll", ...).
With the byte tokens present llama.cpp can tokenize any text: a character outside the
vocabulary becomes its UTF-8 bytes (without them llama.cpp throws inside llama_tokenize
and the process aborts; see docs/llama-cpp-notes.md).

Weights are drawn N(0, 1/fan_in) so every matmul roughly keeps the scale of its input
and the logits have a standard deviation of about 1: differences between two builds or
two quantizations then show up at a meaningful scale, not hidden in tiny numbers.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

UNK, BOS, EOS = 0, 1, 2
BYTE0 = 3  # id of <0x00>; byte b is BYTE0 + b
SPACE = "\u2581"  # SentencePiece's word-boundary marker


def _pieces(n_vocab: int) -> list[str]:
    pieces = [SPACE] + list(string.ascii_lowercase)
    n_normal = n_vocab - BYTE0 - 256
    if n_normal < len(pieces):
        raise ValueError(f"n_vocab {n_vocab} is too small (need at least "
                         f"{BYTE0 + 256 + len(pieces)})")
    pieces += ["he", "ll", "lo", "or", "ld", "in", "th", "er", "at", "on",
               SPACE + "h", SPACE + "w", SPACE + "t", SPACE + "a", SPACE + "c",
               SPACE + "th", SPACE + "the", "llo", "wor", SPACE + "wor"]
    pieces += list(".,!?'-") + list(string.digits) + list(string.ascii_uppercase)
    i = 0
    while len(pieces) < n_normal:  # filler pieces, unlikely to be produced by tokenizing
        pieces.append(f"<extra_{i}>")
        i += 1
    return pieces[:n_normal]


@dataclass
class TinyLlama:
    path: Path
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    rms_eps: float
    rope_base: float
    tokens: list[str]
    weights: dict[str, np.ndarray] = field(repr=False)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def byte_token(self, b: int) -> int:
        return BYTE0 + b


def write_tiny_llama(path, *, seed: int = 0, n_embd: int = 128, n_layer: int = 2,
                     n_head: int = 4, n_head_kv: int | None = None, n_ff: int = 256,
                     n_vocab: int = 320, n_ctx: int = 256, rms_eps: float = 1e-5,
                     rope_base: float = 10000.0, q_scale: dict | None = None) -> TinyLlama:
    """Write an F32 llama GGUF with random weights to `path`; return its description.
    q_scale {layer: factor}: that layer's attn_q is multiplied by factor (its attention
    logits too: a sharper, more concentrated attention than random weights give)."""
    import gguf  # the pinned gguf-py (installed from the vendored llama.cpp by setup)

    path = Path(path)
    n_head_kv = n_head if n_head_kv is None else n_head_kv
    head_dim = n_embd // n_head
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int) -> np.ndarray:
        """numpy (rows, cols) = ggml ne (cols, rows): y = W @ x with x of size cols."""
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    weights: dict[str, np.ndarray] = {
        "token_embd.weight": rng.standard_normal((n_vocab, n_embd)).astype(np.float32),
    }
    for i in range(n_layer):
        b = f"blk.{i}."
        weights[b + "attn_norm.weight"] = norm(n_embd)
        weights[b + "attn_q.weight"] = mat(n_head * head_dim, n_embd) * \
            np.float32((q_scale or {}).get(i, 1.0))
        weights[b + "attn_k.weight"] = mat(n_head_kv * head_dim, n_embd)
        weights[b + "attn_v.weight"] = mat(n_head_kv * head_dim, n_embd)
        weights[b + "attn_output.weight"] = mat(n_embd, n_head * head_dim)
        weights[b + "ffn_norm.weight"] = norm(n_embd)
        weights[b + "ffn_gate.weight"] = mat(n_ff, n_embd)
        weights[b + "ffn_up.weight"] = mat(n_ff, n_embd)
        weights[b + "ffn_down.weight"] = mat(n_embd, n_ff)
    weights["output_norm.weight"] = norm(n_embd)
    weights["output.weight"] = mat(n_vocab, n_embd)

    pieces = _pieces(n_vocab)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    assert len(tokens) == n_vocab and len(set(tokens)) == n_vocab
    T = gguf.TokenType
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256 + [T.NORMAL] * len(pieces)
    # SPM merges the adjacent pair whose result has the highest score: longer pieces win.
    scores = [0.0] * (BYTE0 + 256) + [float(len(p)) - i * 1e-3 for i, p in enumerate(pieces)]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("lightkv-edge tiny random llama")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(rms_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_base)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_unk_token_id(UNK)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    for name, arr in weights.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return TinyLlama(path, n_embd, n_layer, n_head, n_head_kv, n_ff, n_vocab, rms_eps,
                     rope_base, tokens, weights)


# ---------------------------------------------------------------------------------------
# numpy reference of llama.cpp's llama graph (float64)
# ---------------------------------------------------------------------------------------
def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope_norm(x: np.ndarray, pos: np.ndarray, base: float) -> np.ndarray:
    """ggml's GGML_ROPE_TYPE_NORM (the llama arch): rotate adjacent pairs (2i, 2i+1).
    x: [T, H, D]."""
    d = x.shape[-1]
    theta = pos[:, None] * base ** (-np.arange(0, d, 2) / d)  # [T, D/2]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def reference_logits(m: TinyLlama, tokens, positions=None) -> np.ndarray:
    """Logits [T, n_vocab] of a causal forward over `tokens` at `positions` (default
    0..T-1; increasing positions with gaps are what patch 0001 lets llama.cpp take)."""
    W = {k: v.astype(np.float64) for k, v in m.weights.items()}
    tokens = np.asarray(tokens)
    T, hd = len(tokens), m.head_dim
    pos = np.arange(T, dtype=np.float64) if positions is None else \
        np.asarray(positions, dtype=np.float64)
    x = W["token_embd.weight"][tokens]
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    group = m.n_head // m.n_head_kv
    for i in range(m.n_layer):
        b = f"blk.{i}."
        h = _rms_norm(x, W[b + "attn_norm.weight"], m.rms_eps)
        q = (h @ W[b + "attn_q.weight"].T).reshape(T, m.n_head, hd)
        k = (h @ W[b + "attn_k.weight"].T).reshape(T, m.n_head_kv, hd)
        v = (h @ W[b + "attn_v.weight"].T).reshape(T, m.n_head_kv, hd)
        q, k = _rope_norm(q, pos, m.rope_base), _rope_norm(k, pos, m.rope_base)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, m.n_head * hd)
        x = x + o @ W[b + "attn_output.weight"].T
        h = _rms_norm(x, W[b + "ffn_norm.weight"], m.rms_eps)
        g = h @ W[b + "ffn_gate.weight"].T
        u = h @ W[b + "ffn_up.weight"].T
        x = x + (g / (1.0 + np.exp(-g)) * u) @ W[b + "ffn_down.weight"].T
    x = _rms_norm(x, W["output_norm.weight"], m.rms_eps)
    return x @ W["output.weight"].T


def loaded_tiny_llama(path, llama_cpp, **kw):
    """Write a tiny llama to `path` (write_tiny_llama's keywords) and load it into llama.cpp
    with the engine's safe default (no extra CPU buffer types); yields (weights, model) and
    frees the model afterwards. For pytest fixtures: `yield from loaded_tiny_llama(...)`."""
    m = write_tiny_llama(path, **kw)
    mp = llama_cpp.llama_model_default_params()
    mp.use_extra_bufts = False
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
    assert model, f"llama.cpp could not load the tiny llama {path}"
    yield m, model
    llama_cpp.llama_model_free(model)
