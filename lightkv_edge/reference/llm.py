"""In-LLM reference: a Hugging Face LLaMA/Qwen2/Gemma 3 prefill with LightKV merges
between layers.

This is the ground truth for llama.cpp's `layer` mode. The decoder is run layer by layer
with the model's own modules (embed_tokens, input_layernorm, q/k/v/o projections, rotary
embedding, post_attention_layernorm, mlp, final norm, lm_head); attention is plain eager
causal attention over the current rows (which are always in ascending original order).
The per-family layer maths is a `LayerMaths` (`maths_for(model)`): `LlamaMaths` here,
`gemma3.Gemma3Maths` for Gemma 3 (Q/K norms, sandwich norms, sliding layers, images
attended bidirectionally).

Conventions the native implementation must match:
  - Schedule layers are 0-based. A merge at layer l uses layer l's Q and K (after RoPE,
    no causal mask) for guidance (text = every row that is not a vision row of any image,
    softmax over all current queries) and merges the hidden states that layer l outputs.
    Layer l itself still attends over, and caches, the pre-merge rows.
  - positions="keep": a merged row keeps its destination's position (orig position ids
    are 0..S-1); "renumber": after each merge the whole sequence is renumbered 0..S'-1
    (the published behaviour; text after the image moves down).
  - kv_policy="exact": each layer's cache holds the rows present when that layer ran.
    "compact": after prefill, every earlier layer's cached K (post-RoPE, as stored) and V
    are merged with the composed coefficients of the later stages, so all layers end with
    the final row set; the positions of those cells are the final positions.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from .guidance import guidance_scores_from_qk
from .merge import check_slices
from .schedule import MergeState, Schedule


@dataclass
class PrefillResult:
    logits: torch.Tensor              # [vocab] float32 logits of the last token
    keys: list[torch.Tensor]          # per layer [H_kv, S_l, head_dim], post-RoPE
    values: list[torch.Tensor]        # per layer [H_kv, S_l, head_dim]
    kv_positions: list[torch.Tensor]  # per layer [S_l] position of each cache entry
    kept: torch.Tensor                # [S_final] original sequence index of each row
    positions: torch.Tensor           # [S_final] position of each final row
    hidden: torch.Tensor              # [S_final, D] last layer output (before final norm)
    states: list[MergeState]          # one per image, in vision_slices order
    next_position: int                # position of the next (decoded) token
    # per layer [H, S_l, head_dim]: the queries (after RoPE) of the rows present when that
    # layer ran (KV eviction scores with the last text rows' ones: reference/evict.py)
    queries: list[torch.Tensor] | None = None
    # per stage, per image (vision_slices order): the guidance scores that stage merged
    # with (None when unguided): the published normalisation on that layer's Q/K
    guidance: list[list[torch.Tensor | None]] | None = None


def _rope_fn(model):
    """The model family's own apply_rotary_pos_emb (same maths for LLaMA and Qwen2)."""
    mod = importlib.import_module(type(model).__module__)
    fn = getattr(mod, "apply_rotary_pos_emb", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as fn
    return fn


def layer_qkv(layer, h, cos, sin, rope):
    """Layer input h [1, S, D] -> q [1, H, S, d], k, v [1, H_kv, S, d] (q, k after RoPE)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    q, k = rope(q, k, cos, sin)
    return q, k, v


def layer_finish(layer, h, q, k, v, hidden=None):
    """Eager attention, o_proj, residual, MLP block (HF's decoder-layer maths).
    hidden: [S, S] bool, True where a query does not see a key; default causal."""
    attn = layer.self_attn
    rep = attn.num_key_value_groups
    kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = h.shape[1]
    logits = (q @ kk.transpose(2, 3)) * attn.scaling
    if hidden is None:
        hidden = torch.ones(s, s, dtype=torch.bool, device=h.device).triu(1)
    logits = logits.masked_fill(hidden, float("-inf"))
    p = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    o = (p @ vv).transpose(1, 2).reshape(*h.shape[:-1], -1)
    h = h + attn.o_proj(o)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def causal_hidden(n: int, device=None) -> torch.Tensor:
    """[n, n] bool: True above the diagonal (a row does not see later rows)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


class LlamaMaths:
    """The layer maths of LlamaForCausalLM / Qwen2ForCausalLM-shaped models (and the test
    shims shaped like them: model.model.layers / rotary_emb / norm, lm_head): causal
    attention, one RoPE for every layer, images attended causally like text."""

    non_causal_images = False

    def __init__(self, model):
        if getattr(model.config, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported by the reference")
        self.model = model
        self.base = model.model
        self.layers = self.base.layers
        self.rope = _rope_fn(model)

    def qkv(self, li: int, h, pos):
        """Layer li's q [1, H, S, d], k, v [1, H_kv, S, d] (q, k after RoPE) at positions
        pos [S] of the rows h [1, S, D]."""
        cos, sin = self.base.rotary_emb(h, pos[None].to(h.device))
        return layer_qkv(self.layers[li], h, cos, sin, self.rope)

    def scaling(self, li: int) -> float:
        """The attention logits' scale (also the guidance's)."""
        return self.layers[li].self_attn.scaling

    def hidden(self, li: int, pos) -> torch.Tensor:
        """[S, S] bool, True where a prefill row (at positions pos [S], ascending) does not
        see another: causal. prefill_with_merge opens each image to itself on top."""
        return causal_hidden(pos.numel())

    def finish(self, li: int, h, q, k, v, hidden):
        return layer_finish(self.layers[li], h, q, k, v, hidden)

    def logits(self, h) -> torch.Tensor:
        """[vocab] float32 logits of the last row of h [1, S, D]."""
        return self.model.lm_head(self.base.norm(h))[0, -1].float()


def maths_for(model):
    """The LayerMaths of `model`'s family: Gemma3Maths for Gemma 3 (its text model or
    the whole VLM), LlamaMaths otherwise."""
    from .gemma3 import Gemma3Maths, is_gemma3
    return Gemma3Maths(model) if is_gemma3(model) else LlamaMaths(model)


def _embeddings(model, input_ids, vision_embeds, slices):
    emb = model.get_input_embeddings()
    t = torch.as_tensor(input_ids)
    if t.dtype.is_floating_point:                       # already inputs_embeds
        h = t if t.dim() == 3 else t.unsqueeze(0)
        if h.dim() != 3 or h.shape[-1] != emb.embedding_dim:
            raise ValueError(f"inputs_embeds must be [S, {emb.embedding_dim}], got {tuple(t.shape)}")
    else:
        ids = t if t.dim() == 2 else t.unsqueeze(0)
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [S] or [1, S], got {tuple(t.shape)}")
        h = emb(ids.to(emb.weight.device))
    if h.shape[0] != 1:
        raise ValueError(f"batch size must be 1, got {h.shape[0]}")
    if h.shape[1] == 0:
        raise ValueError("empty input sequence")
    h = h.to(emb.weight.dtype).clone()
    if vision_embeds is not None:
        if len(vision_embeds) != len(slices):
            raise ValueError("vision_embeds needs one tensor per vision slice")
        for (start, n, _), ve in zip(slices, vision_embeds):
            ve = torch.as_tensor(ve)
            if tuple(ve.shape) != (n, h.shape[2]):
                raise ValueError(f"vision embeds must be [{n}, {h.shape[2]}], got {tuple(ve.shape)}")
            h[0, start:start + n] = ve.to(h)
    return h


@torch.no_grad()
def prefill_with_merge(model, input_ids, vision_slices, schedule: Schedule, *,
                       positions: str = "keep", kv_policy: str = "exact",
                       guided: bool = True, vision_embeds=None,
                       protect: float = 0.0,
                       non_causal_images: bool | None = None) -> PrefillResult:
    """Prefill `input_ids` ([S] / [1, S] token ids, or [S, D] / [1, S, D] inputs_embeds
    already holding the vision rows) through a LlamaForCausalLM / Qwen2ForCausalLM /
    Gemma 3 (Gemma3ForCausalLM or Gemma3ForConditionalGeneration), merging each image of
    `vision_slices` [(start, n, grid), ...] after the layers of `schedule`. Optionally
    `vision_embeds` (one [n, D] tensor per slice) are spliced in (unscaled: Gemma 3 scales
    only token embeddings by sqrt(D), as transformers and llama.cpp do).
    non_causal_images: each image's rows see each other both ways (text stays causal);
    None: the family's way (Gemma 3: yes, as transformers with token_type_ids and libmtmd
    do; the others: no).
    protect: LightKV-protect's fraction at every stage (MergeState.step: the top
    round(protect * budget) rows by that layer's guidance are never sources, mode
    "receive"; the stage keeps exactly the published stage's rows); 0 is the published
    merge (layer mode's lightkv-paper), 1 layer mode's default lightkv-protect."""
    if positions not in ("keep", "renumber"):
        raise ValueError(f"positions must be 'keep' or 'renumber', got {positions!r}")
    if kv_policy not in ("exact", "compact"):
        raise ValueError(f"kv_policy must be 'exact' or 'compact', got {kv_policy!r}")
    if not isinstance(schedule, Schedule):
        raise ValueError("schedule must be a Schedule")
    maths = maths_for(model)
    layers = maths.layers
    if schedule.layers and schedule.layers[-1] >= len(layers):
        raise ValueError(f"schedule layer {schedule.layers[-1]} >= {len(layers)} decoder layers")
    if non_causal_images is None:
        non_causal_images = maths.non_causal_images

    probe = torch.as_tensor(input_ids)
    seq_len = probe.shape[-2] if probe.dtype.is_floating_point else probe.shape[-1]
    slices = check_slices(vision_slices, seq_len)
    h = _embeddings(model, input_ids, vision_embeds, slices)
    dev = h.device

    orig = torch.arange(seq_len)                      # original index of each row
    pos = torch.arange(seq_len)                       # position id of each row
    states = [MergeState(n, grid) for _, n, grid in slices]
    seq_maps: list[tuple[torch.Tensor, torch.Tensor]] = []  # whole-sequence stage maps
    layer_stage: list[int] = []                       # stages done before each layer ran
    keys, values, kv_pos, queries = [], [], [], []
    guidance: list[list[torch.Tensor | None]] = []

    for li in range(len(layers)):
        q, k, v = maths.qkv(li, h, pos)
        keys.append(k[0])
        values.append(v[0])
        queries.append(q[0])
        kv_pos.append(pos.clone())
        layer_stage.append(len(seq_maps))
        image = torch.full((orig.numel(),), -1, dtype=torch.int64)  # image of each row
        for i, (s, n, _) in enumerate(slices):
            image[(orig >= s) & (orig < s + n)] = i
        hidden = maths.hidden(li, pos)
        if non_causal_images:   # an image's rows see each other both ways
            same = (image[:, None] == image[None, :]) & (image[:, None] >= 0)
            hidden = hidden & ~same.to(hidden.device)
        h = maths.finish(li, h, q, k, v, hidden.to(dev))
        stage = schedule.stage_at(li)
        if stage is None:
            continue

        # rows of each image in the current sequence, and the text rows (everything else)
        vis_rows = [torch.nonzero((orig >= s) & (orig < s + n)).flatten() for s, n, _ in slices]
        is_text = torch.ones(orig.numel(), dtype=torch.bool)
        for r in vis_rows:
            is_text[r] = False
        text_rows = torch.nonzero(is_text).flatten()

        keep = is_text.clone()
        new_vis = []
        guidance.append([])
        for st, rows in zip(states, vis_rows):
            scores = (guidance_scores_from_qk(q[0], k[0], rows, text_rows, maths.scaling(li))
                      if guided else None)
            guidance[-1].append(scores)
            hv = h[0, rows]
            if hv.dtype not in (torch.float32, torch.float64):  # half models: merge in f32
                hv = hv.float()
            res = st.step(hv, scores, windows=schedule.windows[stage],
                          ratio=schedule.ratios[stage], threshold=schedule.threshold,
                          protect=protect)
            keep[rows[res.kept.cpu()]] = True
            new_vis.append((rows, res))

        # whole-sequence map of this stage: old row -> new row, coefficient
        new_row = torch.cumsum(keep.to(torch.int64), 0) - 1
        seq_assign = new_row.clone()
        seq_weight = torch.ones(orig.numel(), dtype=torch.float64)
        h_new = h[:, keep].clone()
        for rows, res in new_vis:
            seq_assign[rows] = new_row[rows[res.kept.cpu()]][res.assign.cpu()]
            seq_weight[rows] = res.weight.cpu().to(torch.float64)
            h_new[0, new_row[rows[res.kept.cpu()]]] = res.x.to(h.dtype)
        seq_maps.append((seq_assign, seq_weight))
        h = h_new
        orig = orig[keep]
        pos = pos[keep] if positions == "keep" else torch.arange(orig.numel())

    final_hidden = h[0]
    logits = maths.logits(h)

    if kv_policy == "compact":
        for li, st in enumerate(layer_stage):
            if st == len(seq_maps):
                continue
            assign = torch.arange(keys[li].shape[1])
            weight = torch.ones(assign.numel(), dtype=torch.float64)
            for a, w in seq_maps[st:]:
                weight = weight * w[assign]
                assign = a[assign]
            keys[li] = _compact(keys[li], assign, weight, orig.numel())
            values[li] = _compact(values[li], assign, weight, orig.numel())
            kv_pos[li] = pos.clone()

    next_position = int(pos[-1]) + 1 if positions == "renumber" else seq_len
    return PrefillResult(logits=logits, keys=keys, values=values, kv_positions=kv_pos,
                         kept=orig, positions=pos, hidden=final_hidden, states=states,
                         next_position=next_position, queries=queries, guidance=guidance)


def _compact(t: torch.Tensor, assign: torch.Tensor, weight: torch.Tensor, m: int):
    """Merge cache rows t [H, S, d] into m rows: out[:, j] = sum weight[i] t[:, i]."""
    a = assign.to(t.device)
    w = weight.to(t.device)
    out = torch.zeros(t.shape[0], m, t.shape[2], dtype=torch.float64, device=t.device)
    out.index_add_(1, a, t.to(torch.float64) * w[None, :, None])
    return out.to(t.dtype)
