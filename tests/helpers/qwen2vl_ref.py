"""`reference.prefill_with_merge` on a Qwen2-VL text model, with M-RoPE positions.

prefill_with_merge runs a LlamaForCausalLM-shaped model (model.model.layers / rotary_emb
/ norm, lm_head) with 1-D positions: each row's position is its original index (positions
"keep") or its new index ("renumber"). `Qwen2VLText(vl, table)` wraps a
Qwen2VLForConditionalGeneration's language model in that shape; its rotary_emb maps a 1-D
position p to the M-RoPE triple table[p] = (t, h, w) of original row p (libmtmd's decoder
positions for the image rows, t = h = w for text), so "keep" runs exactly at the real
M-RoPE positions. With first_only=True the table applies only while all n_orig rows are
present (the layers before the first merge); afterwards position p is (p, p, p): what
"renumber" does on the llama.cpp side (the rows renumbered, all four sections = p).

The module-level `apply_rotary_pos_emb` is what prefill_with_merge picks for this model
class (it looks in the model's module): the multimodal rotation with the model's sections.
"""
from __future__ import annotations

import torch

_SECTION: list[int] = []


def apply_rotary_pos_emb(q, k, cos, sin):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        apply_multimodal_rotary_pos_emb,
    )
    return apply_multimodal_rotary_pos_emb(q, k, cos, sin, _SECTION)


class _Rotary(torch.nn.Module):
    def __init__(self, rotary, table, n_orig):
        super().__init__()
        self.rotary = rotary
        self.table = table            # [P, 3] int64
        self.n_orig = n_orig          # None, or: use the table only for n_orig rows

    def forward(self, x, position_ids):
        p = position_ids.to(torch.int64)                       # [1, S]
        use = self.n_orig is None or p.shape[1] == self.n_orig
        pid = (self.table[p[0]].T[:, None, :] if use
               else p[None].expand(3, *p.shape))               # [3, 1, S]
        return self.rotary(x, pid)


class _Base(torch.nn.Module):
    def __init__(self, lm, table, n_orig):
        super().__init__()
        self.layers = lm.layers
        self.norm = lm.norm
        self.embed_tokens = lm.embed_tokens
        self.rotary_emb = _Rotary(lm.rotary_emb, table, n_orig)


class Qwen2VLText(torch.nn.Module):
    def __init__(self, vl, table, n_orig=None, first_only=False):
        super().__init__()
        _SECTION[:] = list(vl.config.text_config.rope_scaling["mrope_section"])
        self.model = _Base(vl.model.language_model, table, n_orig if first_only else None)
        self.lm_head = vl.lm_head
        self.config = vl.config.text_config

    def get_input_embeddings(self):
        return self.model.embed_tokens
