"""Prompt guidance: how strongly each vision token's query matches the text keys.

    g_i = sum_h sum_{j in text} softmax_over_queries(logits[h, :, j])[i]

The softmax runs over the *query* axis (dim -2): for every key j, a distribution over all
S queries. That is the published normalisation, and it is what makes a vision token weigh
more when it matches the prompt better than the other tokens do. Logits are pre-softmax,
unmasked (no causal mask). Accumulation is float32 at least (float64 for float64 input);
the published code uses the model's half precision.
"""

from __future__ import annotations

import math

import torch

from ._util import back, to_torch


def _index(sel, s: int, what: str, device) -> torch.Tensor:
    """Index array or boolean mask over S -> int64 index tensor (duplicates rejected)."""
    t, _ = to_torch(sel, what)
    if t.numel() == 0 and t.dtype != torch.bool:  # e.g. [] arrives as an empty float array
        return torch.zeros(0, dtype=torch.int64, device=device)
    if t.dtype == torch.bool:
        if t.dim() != 1 or t.shape[0] != s:
            raise ValueError(f"{what} mask must have shape [{s}], got {tuple(t.shape)}")
        t = torch.nonzero(t).flatten()
    else:
        if t.dtype.is_floating_point or t.dtype.is_complex:
            raise ValueError(f"{what} must be integer indices or a boolean mask")
        t = t.to(torch.int64).reshape(-1)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= s):
            raise ValueError(f"{what} indices must be in [0, {s})")
        if torch.unique(t).numel() != t.numel():
            raise ValueError(f"{what} indices contain duplicates")
    return t.to(device)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point:
        raise ValueError(f"attention tensors must be floating point, got {dtype}")
    return torch.float64 if dtype == torch.float64 else torch.float32


def guidance_scores(logits, vision, text):
    """logits [H, S, S] (query axis -2, key axis -1) -> scores [n_vision] >= 0."""
    t, is_np = to_torch(logits, "logits")
    if t.dim() != 3 or t.shape[1] != t.shape[2]:
        raise ValueError(f"logits must be [H, S, S], got shape {tuple(t.shape)}")
    acc = _acc_dtype(t.dtype)
    if not bool(torch.isfinite(t).all()):
        raise ValueError("logits contain NaN or Inf (they must be unmasked)")
    s = t.shape[1]
    v = _index(vision, s, "vision", t.device)
    k = _index(text, s, "text", t.device)
    p = torch.softmax(t.to(acc), dim=-2)                     # over queries, per key
    out = p[:, v][:, :, k].sum(dim=(0, 2))
    return back(out, is_np)


def guidance_scores_from_qk(q, k, vision, text, scale=None):
    """Same scores from queries q [H, S, d] and keys k [H_kv, S, d] (after RoPE).

    Only the text-key columns of Q K^T are needed: softmax over queries is per key.
    With grouped-query attention (H_kv divides H), query head h uses key head
    h // (H / H_kv), as in Hugging Face's repeat_kv.
    """
    qt, is_np = to_torch(q, "q")
    kt, _ = to_torch(k, "k")
    if qt.dim() != 3 or kt.dim() != 3:
        raise ValueError(f"q and k must be [H, S, d], got {tuple(qt.shape)} and {tuple(kt.shape)}")
    h, s, d = qt.shape
    if kt.shape[1:] != (s, d) or kt.shape[0] < 1 or h % kt.shape[0]:
        raise ValueError(f"k shape {tuple(kt.shape)} does not fit q shape {tuple(qt.shape)}")
    acc = _acc_dtype(qt.dtype)
    if not (bool(torch.isfinite(qt).all()) and bool(torch.isfinite(kt).all())):
        raise ValueError("q or k contain NaN or Inf")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    v = _index(vision, s, "vision", qt.device)
    j = _index(text, s, "text", qt.device)
    kt = kt.to(qt.device).repeat_interleave(h // kt.shape[0], dim=0)
    logits = torch.einsum("hsd,htd->hst", qt.to(acc), kt[:, j].to(acc)) * scale  # [H, S, T]
    p = torch.softmax(logits, dim=1)                         # over all S queries
    return back(p[:, v].sum(dim=(0, 2)), is_np)
