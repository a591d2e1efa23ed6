"""Gemma 3's layer maths for the in-LLM reference (`llm.prefill_with_merge`).

What differs from LLaMA (transformers' modeling_gemma3, llama.cpp's src/models/gemma3.cpp):
  - token embeddings are scaled by sqrt(D) (in the embedding module; image rows are not);
  - Q and K get an RMS norm per head (q_norm / k_norm) before RoPE;
  - sliding layers (config.layer_types) rotate with their own base (rope_local_base_freq,
    transformers' rotary_emb_local) and see only keys less than `sliding_window`
    positions back; full layers use rope_theta and see every earlier key;
  - the attention logits are scaled by query_pre_attn_scalar ** -0.5 (not head_dim), and
    the guidance uses that scale too (it is the layer's own Q K^T);
  - four "sandwich" RMS norms: input, post-attention (on the attention output, before
    the residual add), pre- and post-feed-forward; RMS weights are stored as w with
    (1 + w) applied;
  - optional final logit soft-capping (off in every Gemma 3 release), applied as
    llama.cpp and transformers' Gemma3ForCausalLM do (Gemma3ForConditionalGeneration
    ignores it); the config's attn_logit_softcapping is not applied: neither transformers'
    Gemma 3 attention nor llama.cpp's gemma3 graph applies it;
  - image rows attend bidirectionally inside their own image (transformers with
    token_type_ids, libmtmd's non-causal image decode): prefill_with_merge's
    non_causal_images defaults to True for this family.

The sliding window is taken on positions (llama.cpp's rule, a key at p0 is hidden from a
query at p1 when p1 - p0 >= window), not on row indices as transformers does; the two
agree while nothing is merged. As in transformers' mask, an image's rows see each other
even beyond the window (llama.cpp would apply the window there too; the two differ only
for an image longer than the window, which no Gemma 3 release produces: 256 rows, window
1024 / 512).
"""

from __future__ import annotations

import torch

from .llm import causal_hidden


def is_gemma3(model) -> bool:
    """Gemma3ForCausalLM, Gemma3ForConditionalGeneration or a Gemma3TextModel inside."""
    try:
        from transformers.models.gemma3.modeling_gemma3 import Gemma3TextModel
    except ImportError:  # a transformers without Gemma 3 has no such model either
        return False
    return isinstance(_text_model(model), Gemma3TextModel)


def _text_model(model):
    inner = getattr(model, "model", None)
    return getattr(inner, "language_model", inner)


class Gemma3Maths:
    """Layer maths of a Gemma 3 text model (see the module docstring)."""

    non_causal_images = True

    def __init__(self, model):
        from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb
        self.model = model
        self.text = _text_model(model)
        self.config = self.text.config
        self.layers = self.text.layers
        self.rope = apply_rotary_pos_emb

    def _sliding(self, li: int) -> bool:
        return bool(self.layers[li].self_attn.is_sliding)

    def qkv(self, li: int, h, pos):
        layer = self.layers[li]
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q = attn.q_norm(attn.q_proj(x).view(shape).transpose(1, 2))
        k = attn.k_norm(attn.k_proj(x).view(shape).transpose(1, 2))
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        rotary = self.text.rotary_emb_local if self._sliding(li) else self.text.rotary_emb
        cos, sin = rotary(h, pos[None].to(h.device))
        q, k = self.rope(q, k, cos, sin)
        return q, k, v

    def scaling(self, li: int) -> float:
        return self.layers[li].self_attn.scaling    # query_pre_attn_scalar ** -0.5

    def window_hidden(self, li: int, q_pos, k_pos) -> torch.Tensor | None:
        """[Sq, Sk] bool: keys outside a sliding layer's window (None on a full layer)."""
        if not self._sliding(li):
            return None
        return (q_pos[:, None] - k_pos[None, :]) >= int(self.config.sliding_window)

    def hidden(self, li: int, pos) -> torch.Tensor:
        """Causal, and on a sliding layer the keys outside the window."""
        hidden = causal_hidden(pos.numel())
        window = self.window_hidden(li, pos, pos)
        return hidden if window is None else hidden | window

    def attend(self, li: int, h, q, k, v, hidden):
        """Attention of queries q over keys k / values v (hidden: [Sq, Sk] bool, True =
        not seen), o_proj, post-attention norm, residual, sandwiched MLP."""
        layer = self.layers[li]
        attn = layer.self_attn
        rep = attn.num_key_value_groups
        kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        logits = (q @ kk.transpose(2, 3)) * attn.scaling
        logits = logits.masked_fill(hidden, float("-inf"))
        p = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
        o = (p @ vv).transpose(1, 2).reshape(*h.shape[:-1], -1)
        h = h + layer.post_attention_layernorm(attn.o_proj(o))
        return h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))

    def finish(self, li: int, h, q, k, v, hidden):
        return self.attend(li, h, q, k, v, hidden)

    def logits(self, h) -> torch.Tensor:
        x = self.model.lm_head(self.text.norm(h))[0, -1]
        cap = self.config.final_logit_softcapping
        if cap is not None:
            x = torch.tanh(x / cap) * cap
        return x.float()
