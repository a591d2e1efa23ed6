#!/usr/bin/env python3
"""Train the embedded tiny Qwen2-VL model on the shapes task (CPU, a few minutes per stage).

Recipe (what worked on a 2-core CPU; see lightkv_edge/models/model_card.json):

  tokenizer  SentencePiece BPE (480 pieces) trained on the task text, byte_fallback,
             ChatML specials as control symbols; every answer word is one token.
  stage lm   The language model alone (no vision forward, ~3 steps/s).  Each image token
             is replaced by a fixed "code" vector: the sum of one random vector per
             attribute of the object covering that token (colour, shape, horizontal side,
             vertical side, is-centre; background tokens get the "none" vectors), plus noise.
             Besides the answer loss, the attention of the last prompt token is supervised:
             layer 0 heads 0/1/2 read the shape word / the colour word / the question-type
             word, and layer 1 heads 0-1 read the tokens of the object the question names
             (the <|vision_start|> sink when there is none; for "how many", the sink plus
             the centre token of every object of that colour, so the share of attention
             left on the sink encodes the count).  Curriculum: 1 object, then up to 3, then 5.
  stage vision  The vision tower + merger alone, regressing each image token onto its code
             (MSE + per-attribute classification against the same code book): direct,
             per-token supervision from the generator, no language model in the loop.
  stage joint  The tower is frozen, its outputs for 8192 training images are computed once,
             and the language model is fine-tuned on them (same losses), so it learns the
             tower's real output distribution; the best held-out checkpoint is kept.
  stage joint2  The same from the best checkpoint at a lower learning rate, with 30% extra
             "how many" questions asked about the cached images (colours with 2-3 objects
             favoured) and 30% of questions capitalised ("What colour ...").
  stage ship  Test-split accuracy with transformers, export (safetensors, config,
             tokenizer, chat template, preprocessor config), scripts/convert.py (f16 text +
             f16 mmproj), scripts/quantize.py (Q8_0), files into lightkv_edge/models/
             (--grid 8: shapes-vlm-*, hf/, model_card.json; --grid 16: shapes16-vlm-*,
             hf16/, model_card_16.json; each grid replaces only its own files).

16x16 grid (the second embedded model, shapes16-vlm; 128 px, patch 4, 1024 patches): the
vision tower's full attention over 1024 patches with head dim 16 is what made it cost seconds
per step on CPU (about 75% of a tower step is attention, and it grows with the square of the
patches), and the language side sees 281 instead of 89 tokens.  So it is not trained from
scratch: --init-from starts it from the trained 8x8 model (the language side as it is; the
tower's patch-8 embedding folded to patch 4, which makes the new tower on a 128 px image
compute what the old one computes on it upscaled to 256 px: colour/shape/side of object
tokens 1.00/0.83/0.66 before any step), the vision stage fine-tunes the tower on whole images
(batch 8), and the joint stage asks --j-questions questions about each cached image, whose
image tokens then run through the language model once per image (LM.shared; causal
attention makes their states independent of the question).  --v-crop trains the tower on
crops instead; it learns colour and shape cheaply but not the left/right/top/bottom
attributes: a crop hides where the image's edges are, and the tower has only relative
(rotary) positions.  Exact commands: lightkv_edge/models/model_card_16.json ("recipe").

Every stage is resumable (--resume picks up the newest checkpoint of that stage in
--run-dir), seeded (--seed), and prints progress and held-out accuracy per question type.

    python scripts/train_tiny.py --seed 0                   # all stages, export, ship
    python scripts/train_tiny.py --stage lm --resume        # one stage, continue
    python scripts/train_tiny.py --stage eval --ckpt runs/tiny/best.pt   # test accuracy

The ship stage quantizes through our llama.cpp build: run it with the project's
environment (e.g. .venv/bin/python) where `llama_cpp` is installed.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lightkv_edge.tasks import shapes as S  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

# attribute groups of the per-token code book (index 0 = none / background)
GROUPS = {"colour": 1 + len(S.COLOUR_NAMES), "shape": 1 + len(S.SHAPES), "hside": 3,
          "vside": 3, "centre": 2}


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ------------------------------------------------------------------ tokenizer

def train_tokenizer(out_dir: Path):
    import sentencepiece as spm
    lines = S.corpus_lines(3000, 0)
    chat = ["user\n", "assistant\n", "\n"] * 300 + [a for a in S.ALL_ANSWERS] * 200
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines + chat), model_writer=buf, model_type="bpe",
        vocab_size=480, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, control_symbols=SPECIALS, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())
    return load_tokenizer(out_dir)


class Tok:
    """SentencePiece encoding exactly as llama.cpp's SPM tokenizer does it for this model:
    the text is split at special tokens, and every text fragment is encoded on its own with
    a leading space (add_space_prefix), which is sentencepiece's add_dummy_prefix."""

    def __init__(self, path: Path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.ids = {s: self.sp.piece_to_id(s) for s in SPECIALS}
        self.vocab_size = self.sp.get_piece_size()
        self.answer_ids = {}
        for a in S.ALL_ANSWERS:
            ids = self.sp.encode(a)
            if len(ids) != 1:
                raise RuntimeError(f"answer word {a!r} is not a single token: {ids}")
            self.answer_ids[a] = ids[0]

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        i = 0
        while i < len(text):
            j = min((text.find(s, i) for s in SPECIALS if text.find(s, i) >= 0), default=-1)
            if j < 0:
                out += self.sp.encode(text[i:])
                break
            if j > i:
                out += self.sp.encode(text[i:j])
            s = next(s for s in SPECIALS if text.startswith(s, j))
            out.append(self.ids[s])
            i = j + len(s)
        return out


def load_tokenizer(d: Path) -> Tok:
    return Tok(d / "tokenizer.model")


def prompt_parts(tok: Tok, question: str):
    """(prefix ids ending in <|vision_start|>, suffix ids starting with <|vision_end|>)."""
    pre = tok.encode("<|im_start|>user\n<|vision_start|>")
    suf = tok.encode(f"<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n")
    return pre, suf


# ------------------------------------------------------------------ model

def make_config(args, tok: Tok):
    from transformers import Qwen2VLConfig
    g = args.grid
    patch = S.IMAGE_SIZE // (2 * g)
    hd = args.hidden // args.heads
    sec = [hd // 2 - 2 * ((hd // 2) * 3 // 8), (hd // 2) * 3 // 8, (hd // 2) * 3 // 8]
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=args.vdepth, embed_dim=args.vdim, hidden_size=args.hidden,
                           num_heads=args.vheads, mlp_ratio=2, patch_size=patch,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           hidden_act="quick_gelu"),
        text_config=dict(vocab_size=tok.vocab_size, hidden_size=args.hidden,
                         intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         rope_theta=10000.0, max_position_embeddings=2048,
                         rms_norm_eps=1e-6, tie_word_embeddings=False,
                         rope_scaling={"type": "mrope", "mrope_section": sec},
                         bos_token_id=tok.ids["<|endoftext|>"],
                         eos_token_id=tok.ids["<|im_end|>"]),
        image_token_id=tok.ids["<|image_pad|>"], video_token_id=tok.ids["<|video_pad|>"],
        vision_start_token_id=tok.ids["<|vision_start|>"],
        vision_end_token_id=tok.ids["<|vision_end|>"],
        tie_word_embeddings=False,
        bos_token_id=tok.ids["<|endoftext|>"], eos_token_id=tok.ids["<|im_end|>"])
    cfg.architectures = ["Qwen2VLForConditionalGeneration"]
    return cfg


def build_model(cfg, seed: int):
    import torch
    from transformers import Qwen2VLForConditionalGeneration
    torch.manual_seed(seed)
    m = Qwen2VLForConditionalGeneration(cfg).float()
    m.eval()
    return m


def patchify(images: np.ndarray, patch: int):
    """uint8 [B, H, W, 3] -> float32 [B, N, 3*2*p*p] in Qwen2-VL's merge order (the same as
    Qwen2VLImageProcessor with do_resize=False)."""
    import torch
    x = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).float().div_(255.0)
    mean = torch.tensor(IMAGE_MEAN).view(1, 1, 1, 3)
    std = torch.tensor(IMAGE_STD).view(1, 1, 1, 3)
    x = ((x - mean) / std).permute(0, 3, 1, 2)  # B C H W
    B, C, H, W = x.shape
    gh, gw = H // patch, W // patch
    x = x.unsqueeze(1).expand(B, 2, C, H, W)  # two temporal frames
    x = x.reshape(B, 2, C, gh // 2, 2, patch, gw // 2, 2, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(B, gh * gw, C * 2 * patch * patch).contiguous()


class Vision:
    """Batched forward of the HF Qwen2-VL vision tower (same weights, same maths, images of
    one size stacked in a batch instead of the HF per-image loop)."""

    def __init__(self, model):
        import torch
        self.v = model.model.visual
        vc = model.config.vision_config
        self.heads = vc.num_heads
        self.patch = vc.patch_size
        self.gp = S.IMAGE_SIZE // self.patch
        thw = torch.tensor([[1, self.gp, self.gp]])
        rot = self.v.rot_pos_emb(thw)
        emb = torch.cat((rot, rot), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()

    def crop_rows(self, r0: int, c0: int, side: int):
        """Rows of the full image's patch sequence (merge order) that a crop of side x side
        patches at patch offset (r0, c0) covers, in the crop's own merge order: the crop keeps
        its absolute 2D rotary positions, so the tower sees a window of the real image."""
        import torch
        r = torch.arange(side).view(-1, 1).expand(side, side)
        c = torch.arange(side).view(1, -1).expand(side, side)
        # crop coords in the crop's merge order (the order patchify gives the cropped pixels)
        r = r.reshape(side // 2, 2, side // 2, 2).permute(0, 2, 1, 3).reshape(-1) + r0
        c = c.reshape(side // 2, 2, side // 2, 2).permute(0, 2, 1, 3).reshape(-1) + c0
        return ((r // 2) * (self.gp // 2) + c // 2) * 4 + (r % 2) * 2 + c % 2

    def __call__(self, px, rows=None):
        """px [B, N, 3*2*p*p] -> merged tokens [B, N/4, D].  rows [B, N] (optional): which
        rows of the full image's patch sequence each patch is (crops, see crop_rows)."""
        import torch.nn.functional as F
        from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half
        v = self.v
        B, N, _ = px.shape
        w = v.patch_embed.proj.weight
        x = F.linear(px, w.reshape(w.shape[0], -1))
        E = x.shape[-1]
        hd = E // self.heads
        if rows is None:
            cos, sin = self.cos[None, :, None, :], self.sin[None, :, None, :]
        else:
            cos, sin = self.cos[rows][:, :, None, :], self.sin[rows][:, :, None, :]
        for blk in v.blocks:
            h = blk.norm1(x)
            q, k, vv = blk.attn.qkv(h).reshape(B, N, 3, self.heads, hd).unbind(2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               vv.transpose(1, 2))
            x = x + blk.attn.proj(a.transpose(1, 2).reshape(B, N, E))
            x = x + blk.mlp(blk.norm2(x))
        m = v.merger
        return m.mlp(m.ln_q(x).reshape(B, N // 4, 4 * E))


class LM:
    """Batched forward of the HF Qwen2-VL language model with explicit attention
    probabilities of the last prompt position (for the attention supervision)."""

    def __init__(self, model):
        self.m = model
        self.lm = model.model.language_model
        tc = model.config.text_config
        self.heads = tc.num_attention_heads
        self.kv = tc.num_key_value_heads
        self.hd = tc.hidden_size // self.heads
        self.sec = tc.rope_scaling["mrope_section"]
        self.img = None  # (first image position, count): record layer-0 self-attention
        self.self_p = None

    def __call__(self, emb, pos, last):
        """emb [B,S,D] input embeddings, pos [3,B,S] M-RoPE positions, last [B] index of the
        last prompt token.  Returns (logits [B,S,V], probs: list per layer of [B,H,S] = the
        attention of the last prompt token)."""
        import torch
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_multimodal_rotary_pos_emb
        B, Sq, D = emb.shape
        cos, sin = self.lm.rotary_emb(emb, pos)
        mask = torch.full((Sq, Sq), float("-inf")).triu(1)
        x = emb
        probs = []
        ar = torch.arange(B)
        for layer in self.lm.layers:
            at = layer.self_attn
            h = layer.input_layernorm(x)
            q = at.q_proj(h).view(B, Sq, self.heads, self.hd).transpose(1, 2)
            k = at.k_proj(h).view(B, Sq, self.kv, self.hd).transpose(1, 2)
            v = at.v_proj(h).view(B, Sq, self.kv, self.hd).transpose(1, 2)
            q, k = apply_multimodal_rotary_pos_emb(q, k, cos, sin, self.sec)
            sc = (q @ k.transpose(-1, -2)) * (self.hd ** -0.5) + mask
            p = sc.softmax(-1)
            probs.append(p[ar, :, last, :])
            if self.img is not None and len(probs) == 1:
                k0, n = self.img
                idx = torch.arange(k0, k0 + n)
                self.self_p = p[:, :, idx, idx]  # [B, H, n]: image tokens -> themselves
            o = (p @ v).transpose(1, 2).reshape(B, Sq, D)
            x = x + at.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm.norm(x), probs

    def shared(self, emb, pos, last, share: int, prefix: int):
        """The same as __call__ for a batch whose rows come in groups of ``share`` that hold
        one image each (several questions about it): the first ``prefix`` positions (the
        text before the image and the image tokens) are identical within a group, and as
        attention is causal their states do not depend on the question, so they are
        computed once per group and only the question rows run per batch row.  This is what
        makes the 16x16 grid (256 image tokens, about 25 question tokens) affordable."""
        import torch
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_multimodal_rotary_pos_emb
        B, Sq, D = emb.shape
        P, G = prefix, B // share
        cos, sin = self.lm.rotary_emb(emb, pos)                    # [3, B, S, hd]
        cos_i, sin_i = cos[:, ::share, :P], sin[:, ::share, :P]     # [3, G, P, hd]
        cos_q, sin_q = cos[:, :, P:], sin[:, :, P:]                 # [3, B, S-P, hd]
        mask = torch.full((Sq, Sq), float("-inf")).triu(1)
        xi, xq = emb[::share, :P], emb[:, P:]                       # [G, P, D], [B, S-P, D]
        probs = []
        ar = torch.arange(B)

        def heads(at, h, n, rows):
            return (at.q_proj(h).view(rows, n, self.heads, self.hd).transpose(1, 2),
                    at.k_proj(h).view(rows, n, self.kv, self.hd).transpose(1, 2),
                    at.v_proj(h).view(rows, n, self.kv, self.hd).transpose(1, 2))

        for layer in self.lm.layers:
            at = layer.self_attn
            qi, ki, vi = heads(at, layer.input_layernorm(xi), P, G)           # [G, H, P, hd]
            qq, kq, vq = heads(at, layer.input_layernorm(xq), Sq - P, B)      # [B, H, S-P, hd]
            qi, ki = apply_multimodal_rotary_pos_emb(qi, ki, cos_i, sin_i, self.sec)
            qq, kq = apply_multimodal_rotary_pos_emb(qq, kq, cos_q, sin_q, self.sec)
            pi = ((qi @ ki.transpose(-1, -2)) * (self.hd ** -0.5) + mask[:P, :P]).softmax(-1)
            k_all = torch.cat([ki.repeat_interleave(share, 0), kq], 2)       # [B, H, S, hd]
            v_all = torch.cat([vi.repeat_interleave(share, 0), vq], 2)
            pq = ((qq @ k_all.transpose(-1, -2)) * (self.hd ** -0.5) + mask[P:]).softmax(-1)
            probs.append(pq[ar, :, last - P, :])                              # [B, H, S]
            xi = xi + at.o_proj((pi @ vi).transpose(1, 2).reshape(G, P, D))
            xq = xq + at.o_proj((pq @ v_all).transpose(1, 2).reshape(B, Sq - P, D))
            xi = xi + layer.mlp(layer.post_attention_layernorm(xi))
            xq = xq + layer.mlp(layer.post_attention_layernorm(xq))
        x = torch.cat([xi.repeat_interleave(share, 0), xq], 1)
        return self.lm.norm(x), probs


# ------------------------------------------------------------------ data

def token_labels(objects, grid: int):
    """Per image token (row-major grid x grid): attribute labels of the object covering it
    (the object with most pixels in the token, at least 8; an object's centre token is
    always its own) and the index of that object (-1 background)."""
    om = S.object_map(objects)
    cs = S.IMAGE_SIZE // grid
    n = len(objects)
    blk = (np.arange(S.IMAGE_SIZE) // cs)
    tid = (blk[:, None] * grid + blk[None, :]).ravel()
    cnt = np.bincount(tid * (n + 1) + (om.ravel() + 1), minlength=grid * grid * (n + 1))
    cnt = cnt.reshape(grid * grid, n + 1)[:, 1:]
    owner = np.where(cnt.max(1) >= 8, cnt.argmax(1), -1) if n else np.full(grid * grid, -1)
    centre = np.zeros(grid * grid, dtype=np.int64)
    for i, o in enumerate(objects):
        t = min(int(o.cy // cs), grid - 1) * grid + min(int(o.cx // cs), grid - 1)
        owner[t] = i
        centre[t] = 1
    lab = np.zeros((grid * grid, 5), dtype=np.int64)
    for t in range(grid * grid):
        i = owner[t]
        if i < 0:
            continue
        o = objects[i]
        lab[t, 0] = 1 + S.COLOUR_NAMES.index(o.colour)
        lab[t, 1] = 1 + S.SHAPES.index(o.shape)
        lab[t, 2] = 1 if o.cx < S.IMAGE_SIZE / 2 else 2
        lab[t, 3] = 1 if o.cy < S.IMAGE_SIZE / 2 else 2
        lab[t, 4] = centre[t]
    return lab, owner


def attention_target(sample, owner, grid: int):
    """Distribution over [sink, image tokens...] that the retrieval heads should put on."""
    t = np.zeros(1 + grid * grid, dtype=np.float32)
    if sample.qtype == "count":
        colour = sample.question.split()[2]
        t[0] = 1.0
        for i, o in enumerate(sample.objects):
            if o.colour == colour:
                cs = S.IMAGE_SIZE // grid
                tok = min(int(o.cy // cs), grid - 1) * grid + min(int(o.cx // cs), grid - 1)
                t[1 + tok] = 1.0
    elif sample.target is None:
        t[0] = 1.0
    else:
        t[1:] = (owner == sample.target).astype(np.float32)
    return t / t.sum()


class Batcher:
    """Builds padded batches: token ids, M-RoPE positions, label codes, targets."""

    def __init__(self, tok: Tok, grid: int):
        self.tok, self.grid = tok, grid
        self.cache = {}

    def word_id(self, w):
        ids = self.tok.sp.encode(w)
        assert len(ids) == 1, (w, ids)
        return ids[0]

    def parts(self, q):
        if q not in self.cache:
            self.cache[q] = prompt_parts(self.tok, q)
        return self.cache[q]

    def build(self, samples, with_images=False):
        import torch
        g, tok = self.grid, self.tok
        B = len(samples)
        rows, labs, atts, qspans, lasts, ans, qheads = [], [], [], [], [], [], []
        for s in samples:
            pre, suf = self.parts(s.question)
            lab, owner = token_labels(s.objects, g)
            ids = pre + [tok.ids["<|image_pad|>"]] * (g * g) + suf
            qs = len(pre) + g * g + 1
            qe = len(ids) - len(tok.encode("<|im_end|>\n<|im_start|>assistant\n"))
            words = s.question.rstrip("?").split()
            shape = next((w for w in words if w in S.SHAPES), "shapes")
            colour = next((w for w in words if w in S.COLOUR_NAMES), None)
            typew = {"colour": "colour", "count": "many", "exists": "there",
                     "where": "left" if "left" in words else "top"}[s.qtype]
            qids = ids[qs:qe]
            heads = []
            for w in (shape, colour or typew, typew):
                wid = self.word_id(w)
                heads.append(qs + qids.index(wid))
            qheads.append(heads)
            a = tok.answer_ids[s.answer]
            rows.append(ids + [a])
            lasts.append(len(ids) - 1)
            qspans.append((qs, qe))
            labs.append(lab)
            atts.append(attention_target(s, owner, g))
            ans.append(a)
        L = max(len(r) for r in rows) + 1
        ids = torch.full((B, L), tok.ids["<|endoftext|>"], dtype=torch.long)
        pos = torch.zeros((3, B, L), dtype=torch.long)
        qmask = torch.zeros((B, 4, L))  # [uniform question, shape word, colour word, type word]
        k = len(self.parts(samples[0].question)[0])  # prefix length incl. <|vision_start|>
        r = torch.arange(g * g)
        for b, row in enumerate(rows):
            ids[b, :len(row)] = torch.tensor(row)
            pos[:, b, :k] = torch.arange(k)
            pos[0, b, k:k + g * g] = k
            pos[1, b, k:k + g * g] = k + r // g
            pos[2, b, k:k + g * g] = k + r % g
            n_after = L - k - g * g
            pos[:, b, k + g * g:] = k + g + torch.arange(n_after)
            qs, qe = qspans[b]
            qmask[b, 0, qs:qe] = 1.0 / (qe - qs)
            for h, pidx in enumerate(qheads[b]):
                qmask[b, 1 + h, pidx] = 1.0
        out = dict(ids=ids, pos=pos, last=torch.tensor(lasts), ans=torch.tensor(ans),
                   labels=torch.from_numpy(np.stack(labs)), att=torch.from_numpy(np.stack(atts)),
                   qmask=qmask, k=k)
        if with_images:
            out["images"] = np.stack([np.asarray(s.image) for s in samples])
        return out


def optimizer_step(loss, opt, params) -> None:
    """One update, the same in every stage: gradients clipped to norm 1."""
    import torch
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def codes_for(codebook, labels):
    """labels [B, N, 5] -> sum of the code vectors of each attribute [B, N, D]."""
    out = 0
    for gi, (name, _) in enumerate(GROUPS.items()):
        out = out + codebook[name][labels[..., gi]]
    return out


def lm_step(model, lmf, batch, img_emb, args, train=True):
    """Language-model loss on a batch whose image tokens carry ``img_emb`` [B, N, D]."""
    import torch
    import torch.nn.functional as F
    ids, k, g2 = batch["ids"], batch["k"], args.grid * args.grid
    emb = model.model.language_model.embed_tokens(ids)
    emb = torch.cat([emb[:, :k], img_emb.to(emb.dtype), emb[:, k + g2:]], 1)
    lmf.img = (k, g2) if args.self_w > 0 else None
    share = batch.get("share", 1)
    if share > 1:
        if args.self_w > 0:
            raise SystemExit("--self-w needs unshared batches (--j-questions 1)")
        hid, probs = lmf.shared(emb, batch["pos"], batch["last"], share, k + g2)
    else:
        hid, probs = lmf(emb, batch["pos"], batch["last"])
    B = ids.shape[0]
    ar = torch.arange(B)
    la = model.lm_head(hid[ar, batch["last"]])
    loss_ans = F.cross_entropy(la, batch["ans"])
    end_id = model.config.eos_token_id
    loss_end = F.cross_entropy(model.lm_head(hid[ar, batch["last"] + 1]),
                               torch.full((B,), end_id, dtype=torch.long))
    # attention supervision: layer 0 head 0 -> question words; layer 1 heads 0..1 -> target
    if args.q_sup == "words":
        # heads 0, 1, 2 of layer 0 read the shape word, the colour word, the type word
        p0 = probs[0][:, :3]
        loss_q = -(batch["qmask"][:, 1:] * (p0 + 1e-6).log()).sum(-1).mean(1).mean()
    else:
        p0 = probs[0][:, 0]
        loss_q = -(batch["qmask"][:, 0] * (p0 + 1e-6).log()).sum(1).mean()
    tgt = batch["att"]
    loss_r = 0
    for h in range(args.sup_heads):
        p1 = probs[1][:, h, k - 1:k + g2]  # sink (<|vision_start|>) + image tokens
        loss_r = loss_r + -(tgt * (p1 + 1e-6).log()).sum(1).mean()
    loss_r = loss_r / max(1, args.sup_heads)
    loss = loss_ans + 0.2 * loss_end + args.att_w * (loss_q + loss_r)
    if args.self_w > 0:
        # layer 0: image tokens attend to themselves, so the keys the retrieval heads see
        # in layer 1 are each token's own content, not a blur of its neighbours
        loss = loss + args.self_w * -(lmf.self_p + 1e-6).log().mean()
    pred = la.argmax(-1)
    return loss, pred, dict(ans=loss_ans.item(), q=loss_q.item(), r=float(loss_r.detach()))


def accuracy(samples, preds, tok: Tok):
    inv = {v: k for k, v in tok.answer_ids.items()}
    res = {}
    for s, p in zip(samples, preds):
        r = res.setdefault(s.qtype, [0, 0])
        r[0] += int(inv.get(int(p)) == s.answer)
        r[1] += 1
    per = {k: v[0] / v[1] for k, v in sorted(res.items())}
    overall = sum(v[0] for v in res.values()) / max(1, sum(v[1] for v in res.values()))
    return overall, per


def fmt_acc(overall, per):
    return f"overall {overall:.3f} " + " ".join(f"{k} {v:.3f}" for k, v in per.items())


# ------------------------------------------------------------------ stages

def get_codebook(run: Path, hidden: int, seed: int):
    import torch
    p = run / "codebook.pt"
    if p.exists():
        return torch.load(p)
    gen = torch.Generator().manual_seed(1000 + seed)
    cb = {n: torch.randn(k, hidden, generator=gen) / math.sqrt(hidden) * 1.0
          for n, k in GROUPS.items()}
    torch.save(cb, p)
    return cb


def save_ckpt(path: Path, model, opt, step, extra=None):
    import torch
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict() if opt else None,
                "step": step, "extra": extra or {}}, tmp)
    os.replace(tmp, path)


def load_ckpt(path: Path, model, opt=None):
    import torch
    st = torch.load(path, weights_only=False)
    model.load_state_dict(st["model"])
    if opt is not None and st.get("opt"):
        opt.load_state_dict(st["opt"])
    return st["step"], st.get("extra", {})


def load_init_weights(model, hf_dir: Path):
    """Copy every weight of a saved checkpoint (safetensors names as save_pretrained writes
    them: model.layers..., visual..., lm_head...) into ``model``.  A vision patch embedding
    whose patch is twice this model's is folded (each 2x2 block of its pixel weights
    summed): the new tower on an image then computes exactly what the old one computes on
    that image upscaled 2x (nearest), the same 32x32 patch grid and rotary positions."""
    from safetensors.torch import load_file
    sd = model.state_dict()
    n = 0
    for k, v in load_file(str(hf_dir / "model.safetensors")).items():
        if k.startswith("visual."):
            name = "model." + k
        elif k.startswith("model."):
            name = "model.language_model." + k[len("model."):]
        else:
            name = k
        if name not in sd:
            raise SystemExit(f"--init-from: {k} has no place in this model")
        if k == "visual.patch_embed.proj.weight" and v.shape != sd[name].shape:
            o, c, t, p, _ = v.shape
            if p != 2 * sd[name].shape[-1] or p % 2:
                raise SystemExit(f"--init-from: patch {p} does not fold into {sd[name].shape}")
            v = v.reshape(o, c, t, p // 2, 2, p // 2, 2).sum((4, 6))
        if sd[name].shape != v.shape:
            raise SystemExit(f"--init-from: {k} {tuple(v.shape)} does not fit this model")
        sd[name] = v
        n += 1
    if n != len(sd):
        raise SystemExit(f"--init-from: {n} of {len(sd)} tensors in {hf_dir}")
    model.load_state_dict(sd)


def lr_at(step, args, total):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    f = (step - args.warmup) / max(1, total - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, f))))


def curriculum(step, args):
    """max objects per image: 1 first, then 2-3, then the full task."""
    if step < args.cur1:
        return 1
    if step < args.cur2:
        return 3
    return S.MAX_OBJECTS


def train_samples(step, bs, args, max_obj):
    return [S.make_sample(S.sample_rng("train", args.seed * 1000 + 7, step * bs + i),
                          S.QTYPES[(step * bs + i) % 4], max_objects=max_obj)
            for i in range(bs)]


def stage_lm(args, run, tok, model, cb):
    import torch
    lmf = LM(model)
    params = [p for n, p in model.named_parameters() if not n.startswith("model.visual")]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    ck = run / "lm.pt"
    step = 0
    if args.resume and ck.exists():
        step, _ = load_ckpt(ck, model, opt)
        log(f"[lm] resumed at step {step}")
    bt = Batcher(tok, args.grid)
    val = S.dataset("val", args.n_val, seed=args.seed)
    vb = bt.build(val)
    best = -1.0
    t0 = time.time()
    end = min(args.lm_steps, args.lm_stop_step or args.lm_steps)
    while step < end:
        mo = curriculum(step, args)
        b = bt.build(train_samples(step, args.bs, args, mo))
        img = codes_for(cb, b["labels"])
        img = img + args.noise * torch.randn_like(img) / math.sqrt(img.shape[-1])
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, args, args.lm_steps)
        model.train()
        loss, pred, parts = lm_step(model, lmf, b, img, args)
        optimizer_step(loss, opt, params)
        step += 1
        if step % 25 == 0:
            acc = (pred == b["ans"]).float().mean().item()
            log(f"[lm] step {step} maxobj {mo} loss {loss.item():.3f} ans {parts['ans']:.3f} "
                f"attq {parts['q']:.3f} attr {parts['r']:.3f} train_acc {acc:.2f} "
                f"{(time.time() - t0) / 60:.1f} min")
        if step % args.eval_every == 0 or step == args.lm_steps:
            model.eval()
            with torch.no_grad():
                _, pv, _ = lm_step(model, lmf, vb, codes_for(cb, vb["labels"]), args)
            ov, per = accuracy(val, pv, tok)
            log(f"[lm] EVAL step {step} (oracle codes) {fmt_acc(ov, per)}")
            save_ckpt(ck, model, opt, step, {"acc": ov, "per": per})
            if ov > best:
                best = ov
            if ov >= args.lm_stop:
                log(f"[lm] reached {ov:.3f} >= {args.lm_stop}, stopping")
                break
    save_ckpt(ck, model, opt, step)
    return model


def stage_vision(args, run, tok, model, cb):
    import torch
    import torch.nn.functional as F
    vis = Vision(model)
    params = list(model.model.visual.parameters())
    opt = torch.optim.AdamW(params, lr=args.vlr, weight_decay=0.01)
    ck = run / "vision.pt"
    step = 0
    if args.resume and ck.exists():
        step, _ = load_ckpt(ck, model, opt)
        log(f"[vision] resumed at step {step}")
    val = S.dataset("val", 256, seed=args.seed + 1, balanced=False)
    vlab = torch.from_numpy(np.stack([token_labels(s.objects, args.grid)[0] for s in val]))
    vpx = patchify(np.stack([np.asarray(s.image) for s in val]), vis.patch)
    names = list(GROUPS)
    total = args.v_steps + args.v_full_steps
    rng = np.random.default_rng(args.seed + 13)
    end = min(total, args.v_stop_step or total)
    t0 = time.time()
    while step < end:
        crop = args.v_crop > 0 and step < args.v_steps
        bs = args.vbs if step < args.v_steps else args.v_full_bs
        smp = [S.make_sample(S.sample_rng("train", args.seed * 1000 + 9, step * args.vbs + i),
                             None) for i in range(bs)]
        lab = torch.from_numpy(np.stack([token_labels(s.objects, args.grid)[0] for s in smp]))
        if crop:
            px, lab, rows, keep = crop_batch(smp, lab, vis, args.v_crop, args.grid, rng)
        else:
            px, rows = patchify(np.stack([np.asarray(s.image) for s in smp]), vis.patch), None
        for gr in opt.param_groups:
            gr["lr"] = args.vlr * min(1.0, (step + 1) / 100) * (
                0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))
        out = vis(px, rows)
        tgt = codes_for(cb, lab)
        fg = (lab[..., 0] > 0).float()
        wt = 1.0 + 4.0 * fg  # object tokens matter more than background
        if crop:
            # tokens of an object the crop cuts carry no loss: their labels (shape, side,
            # centre) describe the whole object, which the crop may not show
            wt = wt * keep
            loss = ((out - tgt) ** 2 * keep[..., None]).sum() / keep.sum().clamp(min=1)
        else:
            loss = F.mse_loss(out, tgt) * out.shape[-1]
        for gi, n in enumerate(names):
            lg = out @ cb[n].T * 8.0
            ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lab[..., gi].reshape(-1),
                                 reduction="none")
            loss = loss + (ce * wt.reshape(-1)).sum() / wt.sum()
        optimizer_step(loss, opt, params)
        step += 1
        if step % 25 == 0:
            log(f"[vision] step {step} loss {loss.item():.3f} {'crop' if crop else 'full'} "
                f"{(time.time() - t0) / 60:.1f} min")
        if step % args.v_eval_every == 0 or step == total:
            with torch.no_grad():
                out = vis(vpx)
            fgm = vlab[..., 0] > 0
            msg = []
            for gi, n in enumerate(names):
                pr = (out @ cb[n].T).argmax(-1)
                ok = pr == vlab[..., gi]
                msg.append(f"{n} {ok[fgm].float().mean():.3f}/{ok[~fgm].float().mean():.3f}")
            log(f"[vision] EVAL step {step} (object/background token acc) " + " ".join(msg))
            save_ckpt(ck, model, opt, step)
    save_ckpt(ck, model, opt, step)
    return model


def crop_batch(smp, lab, vis, side: int, grid: int, rng):
    """Random side x side-patch crops (token-aligned) of the samples' images: patches,
    token labels, the crop's rows of the full patch sequence (rotary positions), and a 0/1
    mask of the tokens whose object the crop shows whole (background tokens always 1)."""
    import torch
    p, nt = vis.patch, side // 2
    pxs, labs, rows, keeps = [], [], [], []
    for s, lb in zip(smp, lab):
        t0, u0 = (int(v) for v in rng.integers(0, grid - nt + 1, size=2))
        y0, x0 = 2 * t0 * p, 2 * u0 * p
        img = np.asarray(s.image)[y0:y0 + side * p, x0:x0 + side * p]
        pxs.append(img)
        labs.append(lb.view(grid, grid, -1)[t0:t0 + nt, u0:u0 + nt].reshape(nt * nt, -1))
        rows.append(vis.crop_rows(2 * t0, 2 * u0, side))
        om = S.object_map(s.objects)
        inside = np.zeros(len(s.objects) + 1, dtype=np.float32)
        inside[0] = 1.0
        for i in range(len(s.objects)):
            ys, xs = np.nonzero(om == i)
            inside[i + 1] = float(ys.min() >= y0 and ys.max() < y0 + side * p
                                  and xs.min() >= x0 and xs.max() < x0 + side * p)
        _, owner = token_labels(s.objects, grid)
        own = owner.reshape(grid, grid)[t0:t0 + nt, u0:u0 + nt].reshape(-1)
        keeps.append(inside[own + 1])
    return (patchify(np.stack(pxs), p), torch.stack(labs), torch.stack(rows),
            torch.from_numpy(np.stack(keeps)))


def cache_features(args, run, model, n, tag):
    """Tower outputs for n training images: [n, N, D] float16, with the samples' seeds."""
    import torch
    p = run / f"cache_{tag}_{n}.pt"
    if p.exists():
        return torch.load(p)
    vis = Vision(model)
    feats = []
    t0 = time.time()
    with torch.no_grad():
        for st in range(0, n, 64):
            smp = [S.make_sample(S.sample_rng("train", args.seed * 1000 + 11, i),
                                 S.QTYPES[i % 4]) for i in range(st, min(n, st + 64))]
            px = patchify(np.stack([np.asarray(s.image) for s in smp]), vis.patch)
            feats.append(vis(px).half())
            if (st // 64) % 20 == 0:
                log(f"[cache] {st + len(smp)}/{n} {(time.time() - t0):.0f} s")
    f = torch.cat(feats)
    torch.save(f, p)
    return f


def eval_full(args, model, tok, samples, bs=128, feats=None):
    """Accuracy with the real vision tower (HF-equivalent batched forward); ``feats``: the
    tower's outputs for ``samples`` computed before (the joint stages freeze the tower)."""
    import torch
    vis, lmf, bt = Vision(model), LM(model), Batcher(tok, args.grid)
    preds = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(samples), bs):
            ch = samples[i:i + bs]
            b = bt.build(ch, with_images=feats is None)
            img = feats[i:i + bs] if feats is not None else vis(patchify(b["images"], vis.patch))
            _, p, _ = lm_step(model, lmf, b, img, args, train=False)
            preds += p.tolist()
    return accuracy(samples, preds, tok)


def question_about(objects, rng) -> S.Sample:
    """A new question (uniform type) about an existing image, worded and balanced like the
    generator's: colour of a shape that appears once, how many of a colour (2-3 favoured),
    is there (present or absent 50/50), where (an object clearly off-centre on the axis)."""
    for _ in range(20):
        qt = S.QTYPES[int(rng.integers(4))]
        if qt == "colour":
            once = [i for i, o in enumerate(objects)
                    if sum(p.shape == o.shape for p in objects) == 1]
            if once:
                i = once[int(rng.integers(len(once)))]
                return S.Sample(None, f"what colour is the {objects[i].shape}?",
                                objects[i].colour, qt, objects, i)
        elif qt == "count":
            cnt = {c: sum(o.colour == c for o in objects) for c in S.COLOUR_NAMES}
            w = np.array([(1.0, 1.0, 3.0, 3.0)[min(cnt[c], 3)] for c in S.COLOUR_NAMES])
            c = S.COLOUR_NAMES[int(rng.choice(4, p=w / w.sum()))]
            return S.Sample(None, f"how many {c} shapes are there?", S.COUNT_WORDS[cnt[c]],
                            qt, objects, None)
        elif qt == "exists":
            pairs = [(o.colour, o.shape) for o in objects]
            if rng.integers(2):
                i = int(rng.integers(len(objects)))
                c, sh, ans, tgt = objects[i].colour, objects[i].shape, "yes", i
            else:
                absent = [(c, sh) for c in S.COLOUR_NAMES for sh in S.SHAPES
                          if (c, sh) not in pairs]
                c, sh = absent[int(rng.integers(len(absent)))]
                ans, tgt = "no", None
            return S.Sample(None, f"is there a {c} {sh}?", ans, qt, objects, tgt)
        else:
            x = bool(rng.integers(2))
            half = S.IMAGE_SIZE / 2.0
            cand = [i for i, o in enumerate(objects)
                    if abs((o.cx if x else o.cy) - half) >= S.WHERE_MARGIN * S.IMAGE_SIZE]
            if cand:
                i = cand[int(rng.integers(len(cand)))]
                o = objects[i]
                if x:
                    return S.Sample(None, f"is the {o.colour} {o.shape} on the left or the "
                                    "right?", "left" if o.cx < half else "right", qt, objects, i)
                return S.Sample(None, f"is the {o.colour} {o.shape} at the top or the bottom?",
                                "top" if o.cy < half else "bottom", qt, objects, i)
    raise RuntimeError("no question fits this image")  # every image has an exists question


def stage_joint(args, run, tok, model, cb, tag="joint"):
    import torch
    # the cache file is keyed by the tower's weights, so a retrained tower is not mixed up
    key = f"v{abs(float(model.model.visual.merger.mlp[2].weight.double().sum())):.6f}"
    feats = cache_features(args, run, model, args.n_cache, key)
    lmf = LM(model)
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if not n.startswith("model.visual")]
    opt = torch.optim.AdamW(params, lr=args.jlr, weight_decay=0.01, betas=(0.9, 0.98))
    ck = run / f"{tag}.pt"
    step = 0
    if args.resume and ck.exists():
        step, _ = load_ckpt(ck, model, opt)
        log(f"[joint] resumed at step {step}")
    elif args.init_ckpt:
        load_ckpt(args.init_ckpt, model)
        log(f"[joint] weights from {args.init_ckpt}")
    bt = Batcher(tok, args.grid)
    val = S.dataset("val", args.j_n_val, seed=args.seed)
    with torch.no_grad():  # the tower is frozen: its outputs on the validation images once
        vis = Vision(model)
        vfeat = torch.cat([vis(patchify(np.stack([np.asarray(s.image) for s in val[i:i + 64]]),
                                        vis.patch)) for i in range(0, len(val), 64)])
    best = -1.0
    if (run / "best.pt").exists():
        best = torch.load(run / "best.pt", weights_only=False)["extra"].get("acc", -1.0)
    n = feats.shape[0]
    rng = np.random.default_rng(args.seed + 5)
    t0 = time.time()
    nq = args.j_questions
    if args.bs % nq:
        raise SystemExit(f"--bs {args.bs} must be a multiple of --j-questions {nq}")
    while step < args.j_steps:
        idx = rng.integers(0, n, size=args.bs // nq)
        smp = [S.make_sample(S.sample_rng("train", args.seed * 1000 + 11, int(i)), S.QTYPES[i % 4])
               for i in idx]
        if nq > 1:
            # nq questions per cached image in consecutive rows: its own, then new ones
            smp = [q for s in smp for q in [s] + [question_about(s.objects, rng)
                                                  for _ in range(nq - 1)]]
            idx = np.repeat(idx, nq)
        if args.count_frac > 0:
            # extra "how many" questions about any cached image (its features are cached,
            # so a new question costs nothing); colours with 2-3 objects are favoured
            for j, s in enumerate(smp):
                if rng.random() < args.count_frac:
                    cnt = {c: sum(o.colour == c for o in s.objects) for c in S.COLOUR_NAMES}
                    w = np.array([(1.0, 1.0, 3.0, 3.0)[cnt[c]] for c in S.COLOUR_NAMES])
                    c = S.COLOUR_NAMES[int(rng.choice(4, p=w / w.sum()))]
                    smp[j] = S.Sample(None, f"how many {c} shapes are there?",
                                      S.COUNT_WORDS[cnt[c]], "count", s.objects, None)
        if args.case_aug > 0:
            # users type "What colour ...?": capitalise the first letter of some questions
            for j, s in enumerate(smp):
                if rng.random() < args.case_aug:
                    smp[j] = S.Sample(None, s.question[:1].upper() + s.question[1:], s.answer,
                                      s.qtype, s.objects, s.target)
        b = bt.build(smp)
        b["share"] = nq
        img = feats[torch.from_numpy(idx)].float()
        for gr in opt.param_groups:
            gr["lr"] = args.jlr * min(1.0, (step + 1) / 50) * (
                0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.j_steps))))
        model.train()
        loss, pred, parts = lm_step(model, lmf, b, img, args)
        optimizer_step(loss, opt, params)
        step += 1
        if step % 25 == 0:
            acc = (pred == b["ans"]).float().mean().item()
            log(f"[joint] step {step} loss {loss.item():.3f} ans {parts['ans']:.3f} "
                f"attr {parts['r']:.3f} train_acc {acc:.2f} {(time.time() - t0) / 60:.1f} min")
        if step % args.j_eval_every == 0 or step == args.j_steps:
            ov, per = eval_full(args, model, tok, val, feats=vfeat)
            log(f"[joint] EVAL step {step} (real tower) {fmt_acc(ov, per)}")
            save_ckpt(ck, model, opt, step, {"acc": ov, "per": per})
            if ov > best:
                best = ov
                save_ckpt(run / "best.pt", model, None, step, {"acc": ov, "per": per})
                log(f"[joint] new best {ov:.3f} -> {run / 'best.pt'}")
    return model


def export(args, run, tok, model, out: Path, ckpt: Path | None = None):
    import shutil
    if ckpt is not None:
        load_ckpt(ckpt, model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["Qwen2VLForConditionalGeneration"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copy(run / "tokenizer.model", out / "tokenizer.model")
    dec = {str(tok.ids[s]): {"content": s, "lstrip": False, "rstrip": False, "normalized": False,
                             "single_word": False, "special": True} for s in SPECIALS}
    tc = {"add_bos_token": False, "add_eos_token": False, "add_prefix_space": True,
          "added_tokens_decoder": dec, "bos_token": None, "eos_token": "<|im_end|>",
          "pad_token": "<|endoftext|>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE,
          "model_max_length": 2048, "tokenizer_class": "LlamaTokenizer",
          "legacy": False, "sp_model_kwargs": {}}
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"}, indent=2))
    patch = model.config.vision_config.patch_size
    pp = {"image_processor_type": "Qwen2VLImageProcessor", "do_resize": False,
          "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
          "do_convert_rgb": True, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD,
          "patch_size": patch, "temporal_patch_size": 2, "merge_size": 2,
          "min_pixels": 4 * (2 * patch) ** 2, "max_pixels": S.IMAGE_SIZE ** 2,
          "processor_class": "Qwen2VLProcessor"}
    (out / "preprocessor_config.json").write_text(json.dumps(pp, indent=2))
    gc = {"bos_token_id": tok.ids["<|endoftext|>"], "eos_token_id": tok.ids["<|im_end|>"],
          "pad_token_id": tok.ids["<|endoftext|>"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gc, indent=2))
    log(f"[export] wrote {out}")


def ship_names(grid: int) -> tuple[str, str, str]:
    """(file name stem, HF checkpoint folder, model card) in lightkv_edge/models/ of the
    model with this grid: the 8x8 default keeps its original names, others say their grid
    (shapes16-vlm-q8_0.gguf, hf16/, model_card_16.json)."""
    if grid == 8:
        return "shapes-vlm", "hf", "model_card.json"
    return f"shapes{grid}-vlm", f"hf{grid}", f"model_card_{grid}.json"


def ship(args, run, tok, model, hf_dir: Path, models_dir: Path, ckpt: Path, info: dict):
    """Export the checkpoint to ``hf_dir``, convert (scripts/convert.py) and quantize
    (scripts/quantize.py) it, and write the pair + its model card into ``models_dir``
    (replacing only this grid's files)."""
    import shutil
    import subprocess
    import tempfile
    export(args, run, tok, model, hf_dir, ckpt)
    name, hf_name, card_name = ship_names(args.grid)
    with tempfile.TemporaryDirectory() as td:
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert.py"), str(hf_dir),
                            "--outdir", td, "--name", name, "--outtype", "f16"])
        if r.returncode:
            raise SystemExit(f"ship: conversion failed ({r.returncode})")
        q = Path(td) / f"{name}-{args.ship_type}.gguf"
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "quantize.py"),
                            str(Path(td) / f"{name}-f16.gguf"), str(q), "--type", args.ship_type])
        if r.returncode:
            raise SystemExit(f"ship: quantization failed ({r.returncode})")
        models_dir.mkdir(parents=True, exist_ok=True)
        for old in models_dir.glob(f"{name}-*.gguf"):
            old.unlink()
        shutil.copy(q, models_dir / q.name)
        shutil.copy(Path(td) / f"{name}-mmproj-f16.gguf", models_dir / f"{name}-mmproj-f16.gguf")
    card_p = models_dir / card_name
    card = json.loads(card_p.read_text()) if card_p.exists() else {}
    card.update(info)
    card["files"] = {"model": f"{name}-{args.ship_type}.gguf",
                     "mmproj": f"{name}-mmproj-f16.gguf", "hf_checkpoint": f"{hf_name}/"}
    card_p.write_text(json.dumps(card, indent=2) + "\n")
    log(f"[ship] wrote {models_dir}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__[__doc__.index("Recipe"):])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage", default="all", choices=["all", "tokenizer", "lm", "vision",
                                                       "joint", "joint2", "export", "eval",
                                                       "ship"])
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "tiny")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "tiny" / "hf")
    ap.add_argument("--resume", action="store_true", help="continue from the stage's checkpoint")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest on a shared 2-core machine)")
    ap.add_argument("--grid", type=int, default=8, help="image tokens per side (8, 16)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vdim", type=int, default=64)
    ap.add_argument("--vdepth", type=int, default=3)
    ap.add_argument("--vheads", type=int, default=4)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--lm-steps", type=int, default=3000)
    ap.add_argument("--lm-stop", type=float, default=0.995)
    ap.add_argument("--lm-stop-step", type=int, default=1600,
                    help="end the lm stage at this step (the lr schedule still spans "
                         "--lm-steps); the joint stage continues the training")
    ap.add_argument("--cur1", type=int, default=200)
    ap.add_argument("--cur2", type=int, default=600)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--att-w", type=float, default=1.0)
    ap.add_argument("--sup-heads", type=int, default=2)
    ap.add_argument("--self-w", type=float, default=0.0,
                    help="weight of the layer-0 image-token self-attention loss")
    ap.add_argument("--q-sup", default="words", choices=["words", "uniform"],
                    help="layer-0 supervision: named words per head, or the whole question")
    ap.add_argument("--n-val", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--vbs", type=int, default=32)
    ap.add_argument("--vlr", type=float, default=2e-3)
    ap.add_argument("--v-steps", type=int, default=2000)
    ap.add_argument("--v-eval-every", type=int, default=200)
    ap.add_argument("--v-crop", type=int, default=0,
                    help="vision: train on random crops of this many patches per side "
                         "(absolute rotary positions kept; 0 = whole images). Attention "
                         "over 1024 patches is what makes the 16x16 tower slow")
    ap.add_argument("--v-full-steps", type=int, default=0,
                    help="vision: whole-image steps after the --v-steps (crop) steps")
    ap.add_argument("--v-full-bs", type=int, default=8, help="batch of the whole-image steps")
    ap.add_argument("--v-stop-step", type=int, default=0,
                    help="end the vision stage at this step (the lr schedule still spans "
                         "--v-steps + --v-full-steps); 0 = run them all")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="HF checkpoint (e.g. lightkv_edge/models/hf) whose tokenizer and "
                         "weights start this run: the 16x16 model starts from the 8x8 one, "
                         "its patch-8 embedding folded to patch 4 (see load_init_weights)")
    ap.add_argument("--n-cache", type=int, default=8192)
    ap.add_argument("--jlr", type=float, default=1e-3)
    ap.add_argument("--count-frac", type=float, default=0.0,
                    help="joint: fraction of extra 'how many' questions on cached images")
    ap.add_argument("--j2-steps", type=int, default=1500)
    ap.add_argument("--j2-lr", type=float, default=5e-4)
    ap.add_argument("--j2-count-frac", type=float, default=0.3)
    ap.add_argument("--j2-case-aug", type=float, default=0.3)
    ap.add_argument("--case-aug", type=float, default=0.0,
                    help="joint: fraction of questions with a capitalised first letter")
    ap.add_argument("--init-ckpt", type=Path, default=None,
                    help="joint: start from these weights (fresh optimizer and schedule)")
    ap.add_argument("--j-steps", type=int, default=3000)
    ap.add_argument("--j-questions", type=int, default=1,
                    help="joint: questions per cached image in a batch (its own + new ones); "
                         "the image's tokens run once per image (LM.shared)")
    ap.add_argument("--j-eval-every", type=int, default=250)
    ap.add_argument("--j-n-val", type=int, default=600)
    ap.add_argument("--ckpt", type=Path, default=None, help="export/eval: checkpoint to load")
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--ship-type", default="q8_0", help="quantization of the shipped model")
    ap.add_argument("--models-dir", type=Path, default=ROOT / "lightkv_edge" / "models")
    args = ap.parse_args(argv)
    if S.IMAGE_SIZE % (2 * args.grid):
        ap.error(f"--grid must divide {S.IMAGE_SIZE // 2}")

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.v_crop and (args.v_crop % 2 or not 2 <= args.v_crop <= 2 * args.grid):
        ap.error(f"--v-crop must be even and at most {2 * args.grid} (patches per side)")
    run = args.run_dir
    run.mkdir(parents=True, exist_ok=True)
    if args.init_from and not (run / "tokenizer.model").exists():
        # the language side's token ids must be the ones it was trained with
        import shutil
        shutil.copy(args.init_from / "tokenizer.model", run / "tokenizer.model")
        log(f"[tokenizer] copied from {args.init_from}")
    if not (run / "tokenizer.model").exists() or args.stage == "tokenizer":
        train_tokenizer(run)
        log(f"[tokenizer] trained: {run / 'tokenizer.model'}")
    tok = load_tokenizer(run)
    cfg = make_config(args, tok)
    model = build_model(cfg, args.seed)
    cb = get_codebook(run, args.hidden, args.seed)
    (run / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    if args.init_from:
        load_init_weights(model, args.init_from)
        log(f"[init] all weights from {args.init_from}")
    np_ = sum(p.numel() for p in model.parameters())
    log(f"model: {np_ / 1e6:.2f}M params, grid {args.grid}x{args.grid}, vocab {tok.vocab_size}")

    def load_parts():
        # combine the newest language-model and vision checkpoints
        sd = model.state_dict()
        for name, pref in (("lm.pt", None), ("vision.pt", "model.visual")):
            if (run / name).exists():
                st = torch.load(run / name, weights_only=False)["model"]
                for k, v in st.items():
                    if (pref is None) == (not k.startswith("model.visual")):
                        sd[k] = v
        model.load_state_dict(sd)

    if args.stage in ("lm", "all"):
        stage_lm(args, run, tok, model, cb)
    if args.stage in ("vision", "all"):
        stage_vision(args, run, tok, model, cb)
    if args.stage in ("joint", "all"):
        if args.resume and (run / "joint.pt").exists():
            load_ckpt(run / "joint.pt", model)
        elif not args.init_ckpt:
            load_parts()
        stage_joint(args, run, tok, model, cb)
    if args.stage in ("joint2", "all"):
        # second joint phase from the best checkpoint: extra "how many" questions on the
        # cached images and capitalised questions, lower learning rate
        import copy
        a2 = copy.copy(args)
        a2.jlr, a2.j_steps = args.j2_lr, args.j2_steps
        a2.count_frac, a2.case_aug = args.j2_count_frac, args.j2_case_aug
        a2.init_ckpt = None if (args.resume and (run / "joint2.pt").exists()) else run / "best.pt"
        stage_joint(a2, run, tok, model, cb, tag="joint2")
    if args.stage in ("export", "all"):
        export(args, run, tok, model, args.out, args.ckpt or (run / "best.pt"))
    if args.stage in ("ship", "all"):
        ck = args.ckpt or (run / "best.pt")
        load_ckpt(ck, model)
        test = S.dataset("test", args.n_test, seed=args.seed)
        ov, per = eval_full(args, model, tok, test)
        log(f"[ship] test n={len(test)} (transformers, f32) {fmt_acc(ov, per)}")
        info = {"test_accuracy_hf_f32": {"overall": ov, "per_type": per, "n": len(test),
                                         "split": "test", "seed": args.seed}}
        ship(args, run, tok, model, args.models_dir / ship_names(args.grid)[1],
             args.models_dir, ck, info)
    if args.stage == "eval":
        load_ckpt(args.ckpt or (run / "best.pt"), model)
        test = S.dataset("test", args.n_test, seed=args.seed)
        ov, per = eval_full(args, model, tok, test)
        log(f"[eval] test n={len(test)} {fmt_acc(ov, per)}")
        print(json.dumps({"overall": ov, "per_type": per, "n": len(test)}))


if __name__ == "__main__":
    main()
