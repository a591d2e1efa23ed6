"""Ground truth for layer mode: transformers models holding exactly the weights of a GGUF,
and a greedy continuation of `reference.prefill_with_merge`'s cache.

- `hf_llama_from_tiny(m)`: a float64 LlamaForCausalLM with the TinyLlama's weights. The
  GGUF stores Q/K rows in llama.cpp's RoPE layout (adjacent pairs); HF rotates halves, so
  the rows are un-permuted (the inverse of the converter's permutation).
- `greedy_after_prefill(model, pre, n)`: n greedy tokens decoded one by one on top of the
  PrefillResult's per-layer K/V (the compacted cache for kv_policy="compact"), each new
  token at pre.next_position + step: the reference's view of what llama.cpp decodes next.
  A Gemma 3 model decodes with its own layer maths (reference/gemma3.py: its sliding
  layers see the cache entries less than `sliding_window` positions back).
"""
from __future__ import annotations

import numpy as np
import torch


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF q/k rows (pairs interleaved per head) -> HF rows (halves per head)."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_llama_from_tiny(m, dtype=torch.float64):
    import transformers
    cfg = transformers.LlamaConfig(
        vocab_size=m.n_vocab, hidden_size=m.n_embd, intermediate_size=m.n_ff,
        num_hidden_layers=m.n_layer, num_attention_heads=m.n_head,
        num_key_value_heads=m.n_head_kv, rms_norm_eps=m.rms_eps, rope_theta=m.rope_base,
        max_position_embeddings=1024, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    W = m.weights

    def put(param, arr):
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(dtype))

    put(model.model.embed_tokens.weight, W["token_embd.weight"])
    for i, layer in enumerate(model.model.layers):
        b = f"blk.{i}."
        put(layer.input_layernorm.weight, W[b + "attn_norm.weight"])
        put(layer.self_attn.q_proj.weight, _unpermute(W[b + "attn_q.weight"], m.n_head))
        put(layer.self_attn.k_proj.weight, _unpermute(W[b + "attn_k.weight"], m.n_head_kv))
        put(layer.self_attn.v_proj.weight, W[b + "attn_v.weight"])
        put(layer.self_attn.o_proj.weight, W[b + "attn_output.weight"])
        put(layer.post_attention_layernorm.weight, W[b + "ffn_norm.weight"])
        put(layer.mlp.gate_proj.weight, W[b + "ffn_gate.weight"])
        put(layer.mlp.up_proj.weight, W[b + "ffn_up.weight"])
        put(layer.mlp.down_proj.weight, W[b + "ffn_down.weight"])
    put(model.model.norm.weight, W["output_norm.weight"])
    put(model.lm_head.weight, W["output.weight"])
    return model


@torch.no_grad()
def greedy_after_prefill(model, pre, n: int, rope=None, forced=None
                         ) -> tuple[list[int], list[torch.Tensor]]:
    """n greedy tokens after the prefill `pre` (the first is argmax of pre.logits);
    returns (tokens, logits of each step's input, the first being pre.logits).
    forced: the first len(forced) steps decode these instead (a later turn's prompt)."""
    from lightkv_edge.reference.llm import _rope_fn, layer_qkv, maths_for
    from lightkv_edge.reference.gemma3 import Gemma3Maths
    maths = maths_for(model)
    if isinstance(maths, Gemma3Maths):
        return _greedy_with_maths(model, maths, pre, n, forced)
    base = model.model
    rope = rope or _rope_fn(model)
    keys = [k.clone() for k in pre.keys]
    values = [v.clone() for v in pre.values]
    logits = pre.logits
    tokens, all_logits = [], [logits]
    pos = pre.next_position
    emb = model.get_input_embeddings()
    for step in range(n):
        tok = int(forced[step]) if forced is not None and step < len(forced) \
            else int(torch.argmax(logits))
        tokens.append(tok)
        h = emb(torch.tensor([[tok]])).to(emb.weight.dtype)
        cos, sin = base.rotary_emb(h, torch.tensor([[pos]]))
        for li, layer in enumerate(base.layers):
            q, k, v = layer_qkv(layer, h, cos, sin, rope)
            keys[li] = torch.cat([keys[li], k[0]], dim=1)
            values[li] = torch.cat([values[li], v[0]], dim=1)
            attn = layer.self_attn
            rep = attn.num_key_value_groups
            kk = keys[li].repeat_interleave(rep, dim=0)[None]
            vv = values[li].repeat_interleave(rep, dim=0)[None]
            p = torch.softmax((q @ kk.transpose(2, 3)) * attn.scaling, dim=-1)
            o = (p @ vv).transpose(1, 2).reshape(1, 1, -1)
            h = h + attn.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = model.lm_head(base.norm(h))[0, -1].float()
        all_logits.append(logits)
        pos += 1
    return tokens, all_logits


@torch.no_grad()
def _greedy_with_maths(model, maths, pre, n, forced):
    """greedy_after_prefill through a LayerMaths with attend() (Gemma 3): the same steps,
    each new token's query seeing every cached entry its layer's window allows."""
    keys = [k.clone() for k in pre.keys]
    values = [v.clone() for v in pre.values]
    kv_pos = [p.clone() for p in pre.kv_positions]
    logits = pre.logits
    tokens, all_logits = [], [logits]
    pos = pre.next_position
    emb = model.get_input_embeddings()
    for step in range(n):
        tok = int(forced[step]) if forced is not None and step < len(forced) \
            else int(torch.argmax(logits))
        tokens.append(tok)
        h = emb(torch.tensor([[tok]])).to(emb.weight.dtype)
        p = torch.tensor([pos])
        for li in range(len(maths.layers)):
            q, k, v = maths.qkv(li, h, p)
            keys[li] = torch.cat([keys[li], k[0]], dim=1)
            values[li] = torch.cat([values[li], v[0]], dim=1)
            kv_pos[li] = torch.cat([kv_pos[li], p])
            hidden = maths.window_hidden(li, p, kv_pos[li])
            if hidden is None:
                hidden = torch.zeros(1, kv_pos[li].numel(), dtype=torch.bool)
            h = maths.attend(li, h, q, keys[li][None], values[li][None], hidden)
        logits = maths.logits(h)
        all_logits.append(logits)
        pos += 1
    return tokens, all_logits
