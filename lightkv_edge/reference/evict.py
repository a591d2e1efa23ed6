"""Reference of KV eviction (AirCache-style after the prefill, LightVLM-style while decoding)
on a Hugging Face LLaMA/Qwen2 decoder: the ground truth of lightkv_edge/evict.py.

The cache is a set of entries, each with its K (after RoPE) and V in every layer, a
position and the image it belongs to (-1: text). A query sees the entries whose position is
not after its own (llama.cpp's causal mask; rows are numbered in sequence order here, so
for M-RoPE models the position is the row's index and the model's rotary embedding maps it
to the (t, h, w) triple, see tests/helpers/qwen2vl_ref.py).

Importance of a vision entry = the attention it receives from an observation window of
queries, softmax over every entry the query sees, summed over heads, window queries and
the layers read. Each image keeps keep_count(n, keep) = max(1, floor(keep * n + 1/2)) of
its n entries, the most important, ties to the lower row; the others leave the cache of
every layer, for every later token. Positions never change.

    cache = Cache.empty(model)
    out = forward(model, cache, x, positions, images)     # a turn's rows -> logits, queries
    evict(cache, out.queries, window, keep, layers)        # after the prefill
    tokens, logits = generate(model, cache, out.logits, next_position, n,
                              keep=keep, every=N, layers=layers)   # decode-time eviction
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .llm import _rope_fn, layer_qkv


def keep_count(n: int, keep: float) -> int:
    """Entries an image of n keeps: round(keep * n), halves up, at least 1."""
    return max(1, int(math.floor(keep * n + 0.5))) if n > 0 else 0


def select_kept(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ties to the lower index, ascending."""
    s = scores.detach().to(torch.float64).cpu()
    order = sorted(range(s.numel()), key=lambda i: (-float(s[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.int64)


def attention_received(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor,
                       k_pos: torch.Tensor, scaling: float) -> torch.Tensor:
    """q [H, W, d], k [H_kv, N, d] -> [N]: sum over heads and queries of the softmax over
    the keys each query sees (k_pos <= q_pos)."""
    rep = q.shape[0] // k.shape[0]
    kk = k.repeat_interleave(rep, dim=0)
    logits = (q @ kk.transpose(1, 2)) * scaling                      # [H, W, N]
    hidden = k_pos[None, :] > q_pos[:, None]                         # [W, N]
    logits = logits.masked_fill(hidden[None], float("-inf"))
    p = torch.softmax(logits.to(torch.float64), dim=-1)
    return p.sum(dim=(0, 1))


@dataclass
class Cache:
    keys: list[torch.Tensor]        # per layer [H_kv, N, d], after RoPE
    values: list[torch.Tensor]      # per layer [H_kv, N, d]
    pos: torch.Tensor               # [N] position of each entry
    image: torch.Tensor             # [N] image id of each entry, -1 for text
    row: torch.Tensor               # [N] the entry's row in the conversation (0, 1, ...)

    @classmethod
    def empty(cls, model):
        base = model.model
        attn = base.layers[0].self_attn
        n_kv = model.config.num_key_value_heads
        dt = base.embed_tokens.weight.dtype
        z = torch.zeros(n_kv, 0, attn.head_dim, dtype=dt)
        e = torch.zeros(0, dtype=torch.int64)
        return cls([z.clone() for _ in base.layers], [z.clone() for _ in base.layers],
                   e.clone(), e.clone(), e.clone())

    def keep_only(self, idx: torch.Tensor) -> None:
        self.keys = [k[:, idx] for k in self.keys]
        self.values = [v[:, idx] for v in self.values]
        self.pos, self.image, self.row = self.pos[idx], self.image[idx], self.row[idx]

    def __len__(self) -> int:
        return int(self.pos.numel())


@dataclass
class Forward:
    logits: torch.Tensor            # [vocab] float32, of the last row
    queries: list[torch.Tensor]     # per layer [H, n, d]: the rows' queries, after RoPE
    positions: torch.Tensor         # [n]


@torch.no_grad()
def forward(model, cache: Cache, x: torch.Tensor, positions, images=None) -> Forward:
    """Run rows x [n, D] (input embeddings) at `positions` [n] on top of `cache`, appending
    their K/V; images: [n] image id per row (-1 text; default all text)."""
    base = model.model
    rope = _rope_fn(model)
    pos = torch.as_tensor(positions, dtype=torch.int64)
    n = x.shape[0]
    img = torch.full((n,), -1, dtype=torch.int64) if images is None else \
        torch.as_tensor(images, dtype=torch.int64)
    h = x.to(base.embed_tokens.weight.dtype)[None]
    cos, sin = base.rotary_emb(h, pos[None])
    all_pos = torch.cat([cache.pos, pos])
    hidden = all_pos[None, :] > pos[:, None]                          # [n, N + n]
    queries = []
    for li, layer in enumerate(base.layers):
        q, k, v = layer_qkv(layer, h, cos, sin, rope)
        queries.append(q[0])
        cache.keys[li] = torch.cat([cache.keys[li], k[0]], dim=1)
        cache.values[li] = torch.cat([cache.values[li], v[0]], dim=1)
        attn = layer.self_attn
        rep = attn.num_key_value_groups
        kk = cache.keys[li].repeat_interleave(rep, dim=0)[None]
        vv = cache.values[li].repeat_interleave(rep, dim=0)[None]
        logits = (q @ kk.transpose(2, 3)) * attn.scaling
        logits = logits.masked_fill(hidden[None, None], float("-inf"))
        p = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
        o = (p @ vv).transpose(1, 2).reshape(1, n, -1)
        h = h + attn.o_proj(o)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    first_row = int(cache.row.max()) + 1 if len(cache) else 0
    cache.pos = all_pos
    cache.image = torch.cat([cache.image, img])
    cache.row = torch.cat([cache.row, first_row + torch.arange(n)])
    logits = model.lm_head(base.norm(h))[0, -1].float()
    return Forward(logits, queries, pos)


def evict(model, cache: Cache, queries, q_pos, keep: float, layers=None,
          images=None) -> dict[int, torch.Tensor]:
    """Score the vision entries of `images` (default: every image in the cache) with the
    window `queries` (per layer [H, W, d]) at positions q_pos [W], summed over `layers`
    (default: all), and keep keep_count(n, keep) of each image's n entries.
    Returns {image id: the scores of its entries before the eviction}."""
    n_layer = len(cache.keys)
    layers = range(n_layer) if layers is None else layers
    q_pos = torch.as_tensor(q_pos, dtype=torch.int64)
    total = torch.zeros(len(cache), dtype=torch.float64)
    for li in layers:
        scaling = model.model.layers[li].self_attn.scaling
        total += attention_received(queries[li].to(torch.float64),
                                    cache.keys[li].to(torch.float64), q_pos, cache.pos,
                                    scaling)
    ids = sorted(set(cache.image.tolist()) - {-1}) if images is None else list(images)
    keep_mask = torch.ones(len(cache), dtype=torch.bool)
    scores = {}
    for i in ids:
        rows = torch.nonzero(cache.image == i).flatten()
        scores[i] = total[rows]
        kept = select_kept(total[rows], keep_count(rows.numel(), keep))
        keep_mask[rows] = False
        keep_mask[rows[kept]] = True
    cache.keep_only(torch.nonzero(keep_mask).flatten())
    return scores


@torch.no_grad()
def generate(model, cache: Cache, logits: torch.Tensor, next_position: int, n: int, *,
             keep: float = 1.0, every: int | None = None, layers=None, ban=()):
    """n greedy tokens (the first is argmax of `logits`), each decoded at next_position +
    step. With `every`: after every `every` decoded tokens, each image's remaining entries
    are scored with those tokens' queries and keep_count(remaining, keep) of them stay.
    ban: tokens never chosen (llama.cpp's --ignore-eos bans the end-of-generation ones).
    Returns (tokens, logits of each step's input, the first being `logits`)."""
    emb = model.get_input_embeddings()
    tokens, all_logits = [], [logits]
    window: list[list[torch.Tensor]] = []
    window_pos: list[int] = []
    pos = int(next_position)
    for step in range(n):
        pick = logits.clone()
        pick[list(ban)] = float("-inf")
        tok = int(torch.argmax(pick))
        tokens.append(tok)
        out = forward(model, cache, emb(torch.tensor([tok])), [pos])
        logits = out.logits
        all_logits.append(logits)
        window.append(out.queries)
        window_pos.append(pos)
        pos += 1
        if every and (step + 1) % every == 0:
            q = [torch.cat([w[li] for w in window], dim=1) for li in range(len(cache.keys))]
            evict(model, cache, q, window_pos, keep, layers)
            window, window_pos = [], []
    return tokens, all_logits
