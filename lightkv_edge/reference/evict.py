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

Layer-adaptive budget (AirCache's idea, our rule; `evict_adaptive`): each layer l has its
own importance s_l (the window's attention in that layer alone) and a budget b_l that
follows how flat s_l is (layer_budgets); each layer keeps its own top-b_l entries. Since
llama.cpp can only restrict a cell to one contiguous layer range (patch 0005), the kept
sets are nested along depth: b_0 >= b_1 >= ..., layer l keeps its top-b_l among the
entries layer l-1 kept, so an entry is visible to layers [0, end) (end 0: removed).
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
                       k_pos: torch.Tensor, scaling: float, visible=None) -> torch.Tensor:
    """q [H, W, d], k [H_kv, N, d] -> [N]: sum over heads and queries of the softmax over
    the keys each query sees (k_pos <= q_pos, and visible [N] where given: the keys this
    layer may see)."""
    rep = q.shape[0] // k.shape[0]
    kk = k.repeat_interleave(rep, dim=0)
    logits = (q @ kk.transpose(1, 2)) * scaling                      # [H, W, N]
    hidden = k_pos[None, :] > q_pos[:, None]                         # [W, N]
    if visible is not None:
        hidden = hidden | ~visible[None, :]
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
    end: torch.Tensor | None = None  # [N] the entry is seen by layers [0, end) (None: all)

    def __post_init__(self):
        if self.end is None:
            self.end = torch.full_like(self.pos, len(self.keys))

    def visible(self, layer: int) -> torch.Tensor:
        return self.end > layer

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
        self.end = self.end[idx]

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
    causal_hidden = all_pos[None, :] > pos[:, None]                   # [n, N + n]
    all_end = torch.cat([cache.end, torch.full((n,), len(base.layers), dtype=torch.int64)])
    queries = []
    for li, layer in enumerate(base.layers):
        hidden = causal_hidden | (all_end <= li)[None, :]
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
    cache.pos, cache.end = all_pos, all_end
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
                                    scaling, cache.visible(li))
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


def effective_count(scores: torch.Tensor) -> float:
    """exp(entropy) of the scores made a distribution: n for flat scores, 1 when one entry
    takes everything (a layer that receives nothing counts as flat)."""
    s = scores.to(torch.float64)
    total = float(s.sum())
    if total <= 0:
        return float(s.numel())
    p = s / total
    p = p[p > 0]
    return math.exp(-float((p * p.log()).sum()))


def nonincreasing_fit(w) -> list[float]:
    """The least-squares non-increasing sequence nearest w (pool adjacent violators)."""
    blocks: list[list[float]] = []                   # [mean, length]
    for x in w:
        blocks.append([float(x), 1.0])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            m2, n2 = blocks.pop()
            m1, n1 = blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, k in blocks for _ in range(int(k))]


def layer_budgets(per_layer: torch.Tensor, keep: float) -> list[int]:
    """Budgets b_l of an image's n entries from per_layer [L, n] importance: proportional
    to the non-increasing fit of each layer's effective count (a concentrated layer gets
    few entries, a flat one many; nested kept sets need b_0 >= b_1 >= ...), scaled so the
    layers hold L * keep_count(n, keep) in all (the layer average keeps what the uniform
    eviction keeps), each in [1, n]; integers by largest remainder, ties to the shallower."""
    n_layer, n = per_layer.shape
    total = n_layer * keep_count(n, keep)
    w = nonincreasing_fit([effective_count(per_layer[li]) for li in range(n_layer)])

    def clipped(c):
        return [min(float(n), max(1.0, c * x)) for x in w]
    lo, hi = 0.0, float(n)                           # every w >= 1: hi * w >= n
    for _ in range(200):                             # bisection: sum(clipped) is monotone
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(clipped(mid)) < total else (lo, mid)
    t = clipped(hi)
    b = [int(math.floor(x)) for x in t]
    extra = total - sum(b)
    order = sorted(range(n_layer), key=lambda li: (-(t[li] - b[li]), li))
    for li in order[:extra]:
        b[li] += 1
    assert sum(b) == total and all(1 <= x <= n for x in b), (b, total)
    assert all(b[i] >= b[i + 1] for i in range(n_layer - 1)), b
    return b


def evict_adaptive(model, cache: Cache, queries, q_pos, keep: float,
                   images=None) -> dict[int, list[int]]:
    """The layer-adaptive eviction of `images` (default: every image in the cache): per
    layer, the attention each entry receives from the window in that layer; budgets from
    layer_budgets; layer 0 keeps its top-b_0 entries, layer l its top-b_l among those layer
    l-1 kept (ties to the lower row). An entry kept by layers [0, e) is seen by them only;
    kept by none, it leaves the cache. Returns {image id: the budgets}."""
    n_layer = len(cache.keys)
    q_pos = torch.as_tensor(q_pos, dtype=torch.int64)
    per_layer = torch.stack([
        attention_received(queries[li].to(torch.float64), cache.keys[li].to(torch.float64),
                           q_pos, cache.pos, model.model.layers[li].self_attn.scaling,
                           cache.visible(li))
        for li in range(n_layer)])                                     # [L, N]
    ids = sorted(set(cache.image.tolist()) - {-1}) if images is None else list(images)
    budgets = {}
    end = cache.end.clone()
    for i in ids:
        rows = torch.nonzero(cache.image == i).flatten()
        b = layer_budgets(per_layer[:, rows], keep)
        budgets[i] = b
        alive = torch.arange(rows.numel())
        e = torch.zeros(rows.numel(), dtype=torch.int64)
        for li in range(n_layer):
            alive = alive[select_kept(per_layer[li, rows[alive]], b[li])]
            e[alive] = li + 1
        end[rows] = e
    cache.end = end
    cache.keep_only(torch.nonzero(end > 0).flatten())
    return budgets


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
