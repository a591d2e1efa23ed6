#!/usr/bin/env python3
"""Random-weight GGUFs with the full depth and exact shapes of real VLMs, for cost
measurements (speed and memory do not depend on weight values).

    python scripts/make_shape_models.py                    # all three
    python scripts/make_shape_models.py smolvlm-500m qwen2vl-2b
    python scripts/make_shape_models.py --list

prints, per model, its text GGUF and mmproj GGUF, cached under
~/.cache/lightkv-edge/shape-models/ (--cache DIR elsewhere); a model whose two files are
there is not built again (files are written under a temporary name and renamed when
complete, so an interrupted build leaves nothing that looks finished).

Text model: written straight into a GGUF with the pinned tree's gguf-py, tensor by
tensor, as random quantized blocks -- never a float copy of the weights (LLaVA-1.5-7B's
would be 14 GB of f16). The quant mix is the one llama.cpp's Q4_K_M picks for these
architectures (src/llama-quant.cpp): Q4_K everywhere; Q6_K for the output matrix (and the
token embeddings when they are tied to it) and for attn_v and ffn_down in the layers
where `use_more_bits` holds (the first and last eighth, and every third in between);
a tensor whose rows are not a multiple of 256 falls back as llama.cpp does (Q4_K -> Q5_0,
Q6_K -> Q8_0: SmolVLM's 960-wide rows); norms and biases f32. Block scales are set to
sane values (weights of a few hundredths), the quants are random bytes.

Tokenizer: a SentencePiece-type vocabulary of the real model's size (<unk> <s> </s>, the
256 byte tokens, the family's special tokens, then distinct filler pieces), so the
embedding table and the output projection cost what they cost in the real model; the
real chat template markers of each family, so libmtmd and llama.cpp's chat templates
treat it as the real one.

mmproj: the real vision tower and projector shapes, random-initialised with transformers
(a text model of one tiny layer beside it, never used) and converted at f16 by the pinned
converters: scripts/convert.py (SmolVLM, Qwen2-VL), the legacy image-encoder converter
for LLaVA (as scripts/make_tiny_models.py does).

Exit codes: 0 ok, 1 a build failure, 2 bad input (unknown model).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
DEFAULT_CACHE = Path.home() / ".cache" / "lightkv-edge" / "shape-models"

SMOLVLM_TEMPLATE = ("<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}: "
                    "{{ m['content'] }}<end_of_utterance>\n{% endfor %}"
                    "{% if add_generation_prompt %}Assistant:{% endif %}")


@dataclass(frozen=True)
class TextShape:
    arch: str                   # general.architecture
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    n_ctx: int
    rope_base: float
    rms_eps: float
    tied: bool                  # output projection shares token_embd
    qkv_bias: bool = False
    mrope_sections: tuple = ()
    specials: tuple = ()        # added after the byte tokens, CONTROL
    bos: str = "<s>"
    eos: str = "</s>"
    add_bos: bool = True
    template: str = ""


@dataclass(frozen=True)
class Shape:
    name: str
    real: str                   # the model whose shapes these are
    text: TextShape
    vision: dict = field(default_factory=dict)


SHAPES = {s.name: s for s in (
    Shape("smolvlm-500m", "HuggingFaceTB/SmolVLM-500M-Instruct (SmolLM2-360M text, SigLIP-B/16-512)",
          TextShape("llama", 960, 2560, 32, 15, 5, 49280, 8192, 100000.0, 1e-5, True,
                    specials=("<|im_start|>", "<end_of_utterance>", "<image>",
                              "<fake_token_around_image>", "<global-img>", "\n\n")
                    + tuple(f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)),
                    bos="<|im_start|>", eos="<end_of_utterance>", template=SMOLVLM_TEMPLATE),
          dict(kind="idefics3", hidden=768, layers=12, heads=12, ff=3072, image=512, patch=16,
               scale_factor=4, longest_edge=2048)),
    Shape("qwen2vl-2b", "Qwen/Qwen2-VL-2B-Instruct",
          TextShape("qwen2vl", 1536, 8960, 28, 12, 2, 151936, 32768, 1e6, 1e-6, True,
                    qkv_bias=True, mrope_sections=(16, 24, 24, 0),
                    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                              "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                              "<|video_pad|>"),
                    bos="<|endoftext|>", eos="<|im_end|>", add_bos=False,
                    template=("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                              "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                              "{% if add_generation_prompt %}<|im_start|>assistant\n"
                              "{% endif %}")),
          dict(kind="qwen2vl", embed=1280, layers=32, heads=16, mlp_ratio=4, patch=14)),
    Shape("llava15-7b", "liuhaotian/llava-v1.5-7b (Vicuna-7B text, CLIP ViT-L/14-336)",
          TextShape("llama", 4096, 11008, 32, 32, 32, 32000, 4096, 10000.0, 1e-5, False,
                    template=("{% for m in messages %}{% if m['role'] == 'user' %}USER: "
                              "{{ m['content'] }}\n{% elif m['role'] == 'assistant' %}"
                              "ASSISTANT: {{ m['content'] }}</s>\n{% else %}{{ m['content'] }}"
                              "\n{% endif %}{% endfor %}"
                              "{% if add_generation_prompt %}ASSISTANT: {% endif %}")),
          dict(kind="llava", hidden=1024, layers=24, heads=16, ff=4096, image=336, patch=14)),
)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _gguf():
    from make_tiny_models import _llama_dir
    d = _llama_dir()
    sys.path.insert(0, str(d / "gguf-py"))
    import gguf
    return gguf, d


# -- quantized blocks ----------------------------------------------------------------------
def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fallback(qtype, n_cols: int, gguf):
    Q = gguf.GGMLQuantizationType
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if n_cols % block == 0:
        return qtype
    return {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}[qtype]


def random_blocks(qtype, n_rows: int, n_cols: int, rng, gguf) -> np.ndarray:
    """n_rows x n_cols weights of `qtype` as raw bytes (n_rows, bytes per row): random
    quants, block scales set so the weights are a few hundredths."""
    Q = gguf.GGMLQuantizationType
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    nb = n_rows * n_cols // block
    raw = rng.integers(0, 256, size=(nb, nbytes), dtype=np.uint8)

    def f16(v):
        return np.full(nb, v, np.float16).view(np.uint8).reshape(nb, 2)
    if qtype == Q.Q4_K:       # d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 of quants
        raw[:, 0:2], raw[:, 2:4] = f16(1e-4), f16(1e-4)
    elif qtype == Q.Q6_K:     # 128 + 64 bytes of quants, 16 int8 scales, d (f16) last
        raw[:, 192:208] = rng.integers(-32, 32, size=(nb, 16), dtype=np.int8).view(np.uint8)
        raw[:, 208:210] = f16(3e-5)
    elif qtype in (Q.Q5_0, Q.Q8_0):   # d (f16) first
        raw[:, 0:2] = f16(4e-3 if qtype == Q.Q5_0 else 4e-4)
    else:
        raise ValueError(qtype)
    return raw.reshape(n_rows, -1)


# -- text model ----------------------------------------------------------------------------
def _vocab(t: TextShape, gguf):
    TT = gguf.TokenType
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TT.UNKNOWN, TT.CONTROL, TT.CONTROL] + [TT.BYTE] * 256
    for s in t.specials:
        if s not in toks:
            toks.append(s)
            types.append(TT.CONTROL)
    letters = "abcdefghijklmnopqrstuvwxyz"
    base = ["\u2581"] + [c for c in letters] + ["\u2581" + c for c in letters]
    seen = set(toks)
    fill = []
    for p in base:
        if p not in seen:
            fill.append(p)
            seen.add(p)
    i = 0
    while len(toks) + len(fill) < t.n_vocab:
        # distinct pieces; two-letter words first, then numbered ones
        p = ("\u2581" + letters[i // 26 % 26] + letters[i % 26]) if i < 676 else f"\u2581w{i}"
        i += 1
        if p not in seen:
            fill.append(p)
            seen.add(p)
    toks += fill
    types += [TT.NORMAL] * len(fill)
    scores = [0.0] * (len(toks) - len(fill)) + [-float(k) for k in range(len(fill))]
    return toks, scores, types


def _text_tensors(t: TextShape, gguf):
    """(name, numpy shape (rows, cols), type) in file order."""
    Q, F32 = gguf.GGMLQuantizationType, gguf.GGMLQuantizationType.F32
    d_head = t.n_embd // t.n_head
    kv = d_head * t.n_head_kv
    out = [("token_embd.weight", (t.n_vocab, t.n_embd),
            _fallback(Q.Q6_K if t.tied else Q.Q4_K, t.n_embd, gguf))]
    for i in range(t.n_layer):
        more = _use_more_bits(i, t.n_layer)
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (t.n_embd,), F32),
                (b + "attn_q.weight", (t.n_embd, t.n_embd), _fallback(Q.Q4_K, t.n_embd, gguf)),
                (b + "attn_k.weight", (kv, t.n_embd), _fallback(Q.Q4_K, t.n_embd, gguf)),
                (b + "attn_v.weight", (kv, t.n_embd),
                 _fallback(Q.Q6_K if more else Q.Q4_K, t.n_embd, gguf))]
        if t.qkv_bias:
            out += [(b + "attn_q.bias", (t.n_embd,), F32), (b + "attn_k.bias", (kv,), F32),
                    (b + "attn_v.bias", (kv,), F32)]
        out += [(b + "attn_output.weight", (t.n_embd, t.n_embd),
                 _fallback(Q.Q4_K, t.n_embd, gguf)),
                (b + "ffn_norm.weight", (t.n_embd,), F32),
                (b + "ffn_gate.weight", (t.n_ff, t.n_embd), _fallback(Q.Q4_K, t.n_embd, gguf)),
                (b + "ffn_up.weight", (t.n_ff, t.n_embd), _fallback(Q.Q4_K, t.n_embd, gguf)),
                (b + "ffn_down.weight", (t.n_embd, t.n_ff),
                 _fallback(Q.Q6_K if more else Q.Q4_K, t.n_ff, gguf))]
    out.append(("output_norm.weight", (t.n_embd,), F32))
    if not t.tied:
        out.append(("output.weight", (t.n_vocab, t.n_embd), _fallback(Q.Q6_K, t.n_embd, gguf)))
    return out


def write_text_gguf(shape: Shape, path: Path, seed: int = 0) -> None:
    gguf, _ = _gguf()
    t = shape.text
    Q = gguf.GGMLQuantizationType
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), t.arch)
    w.add_name(f"random-weight {shape.name} shape model")
    w.add_description(f"random weights with the shapes of {shape.real}; for cost "
                      "measurements only (lightkv-edge scripts/make_shape_models.py)")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_context_length(t.n_ctx)
    w.add_embedding_length(t.n_embd)
    w.add_block_count(t.n_layer)
    w.add_feed_forward_length(t.n_ff)
    w.add_head_count(t.n_head)
    w.add_head_count_kv(t.n_head_kv)
    w.add_layer_norm_rms_eps(t.rms_eps)
    w.add_rope_freq_base(t.rope_base)
    w.add_rope_dimension_count(t.n_embd // t.n_head)
    w.add_vocab_size(t.n_vocab)
    if t.mrope_sections:
        w.add_rope_dimension_sections(list(t.mrope_sections))
    toks, scores, types = _vocab(t, gguf)
    assert len(toks) == t.n_vocab, (len(toks), t.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(toks.index(t.bos))
    w.add_eos_token_id(toks.index(t.eos))
    w.add_unk_token_id(0)
    w.add_add_bos_token(t.add_bos)
    w.add_add_eos_token(False)
    w.add_chat_template(t.template)
    tensors = _text_tensors(t, gguf)
    for name, shp, qt in tensors:
        if qt == Q.F32:
            w.add_tensor_info(name, shp, np.dtype(np.float32), int(np.prod(shp)) * 4)
        else:
            block, nbytes = gguf.GGML_QUANT_SIZES[qt]
            byte_shape = (shp[0], shp[1] // block * nbytes)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                              raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    total = sum(int(np.prod(s)) for _, s, _ in tensors)
    done, t0, last = 0, time.perf_counter(), 0.0
    for name, shp, qt in tensors:
        if qt == Q.F32:
            # norm weights near one (RMSNorm gains), biases small
            arr = (1.0 + 0.02 * rng.standard_normal(shp) if name.endswith("norm.weight")
                   else 0.02 * rng.standard_normal(shp)).astype(np.float32)
        else:
            arr = random_blocks(qt, shp[0], shp[1], rng, gguf)
        w.write_tensor_data(arr)
        done += int(np.prod(shp))
        now = time.perf_counter()
        if now - last > 5 or done == total:
            last = now
            log(f"  {shape.name} text: {100 * done / total:5.1f} % of {total / 1e9:.2f} B "
                f"weights written ({now - t0:.0f} s)")
    w.close()
    os.replace(tmp, path)


# -- mmproj --------------------------------------------------------------------------------
def _tiny_text(hidden: int, heads: int, kv: int):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=heads,
                       num_key_value_heads=kv).to_dict()


def write_mmproj(shape: Shape, path: Path, seed: int = 0) -> None:
    """The real vision tower and projector at f16, through the pinned converters."""
    import torch
    import make_tiny_models as tm
    t, v = shape.text, shape.vision
    work = path.with_name(path.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    hf = work / "hf"
    hf.mkdir(parents=True)
    torch.manual_seed(seed)
    specials = [s for s in t.specials]
    ids = tm._write_tokenizer(hf, specials or ["<image>"], bos="<s>", eos="</s>",
                              chat_template=t.template)
    log(f"  {shape.name} mmproj: random-initialising the vision tower with transformers ...")
    if v["kind"] == "idefics3":
        from transformers import (Idefics3Config, Idefics3ForConditionalGeneration,
                                  Idefics3VisionConfig)
        vision = Idefics3VisionConfig(hidden_size=v["hidden"], intermediate_size=v["ff"],
                                      num_hidden_layers=v["layers"],
                                      num_attention_heads=v["heads"], image_size=v["image"],
                                      patch_size=v["patch"])
        text = _tiny_text(t.n_embd, t.n_head, t.n_head_kv)
        text["vocab_size"] = tm._vocab_size(len(specials))
        cfg = Idefics3Config(vision_config=vision.to_dict(), text_config=text,
                             scale_factor=v["scale_factor"], image_token_id=ids["<image>"])
        model = Idefics3ForConditionalGeneration(cfg).to(torch.float16)
        tm._save(model, cfg, hf, ["Idefics3ForConditionalGeneration"], ["VLlama3ForCausalLM"])
        pre = dict(tm._PREPROC, image_processor_type="Idefics3ImageProcessor",
                   do_resize=True, do_image_splitting=True,
                   size={"longest_edge": v["longest_edge"]},
                   max_image_size={"longest_edge": v["image"]})
        (hf / "preprocessor_config.json").write_text(json.dumps(pre))
    elif v["kind"] == "qwen2vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
        text = _tiny_text(64, 2, 2)
        text.update(vocab_size=tm._vocab_size(len(specials)),
                    rope_scaling={"type": "mrope", "rope_type": "default",
                                  "mrope_section": [8, 12, 12]})
        vision = dict(depth=v["layers"], embed_dim=v["embed"], hidden_size=t.n_embd,
                      num_heads=v["heads"], mlp_ratio=v["mlp_ratio"], patch_size=v["patch"],
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                      hidden_act="quick_gelu")
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision,
                            **tm._qwen_ids({k: ids[k] for k in ids}))
        model = Qwen2VLForConditionalGeneration(cfg).to(torch.float16)
        tm._save(model, cfg, hf, ["Qwen2VLForConditionalGeneration"],
                 ["Qwen2VLForConditionalGeneration"])
        # Qwen2-VL-2B's image processor limits
        pre = dict(image_mean=[0.48145466, 0.4578275, 0.40821073],
                   image_std=[0.26862954, 0.26130258, 0.27577711],
                   image_processor_type="Qwen2VLImageProcessor", patch_size=14,
                   temporal_patch_size=2, merge_size=2, min_pixels=3136, max_pixels=12845056)
        (hf / "preprocessor_config.json").write_text(json.dumps(pre))
    elif v["kind"] == "llava":
        from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
        vision = CLIPVisionConfig(hidden_size=v["hidden"], intermediate_size=v["ff"],
                                  num_hidden_layers=v["layers"], num_attention_heads=v["heads"],
                                  image_size=v["image"], patch_size=v["patch"],
                                  projection_dim=768, hidden_act="quick_gelu")
        text = _tiny_text(t.n_embd, t.n_head, t.n_head_kv)
        text["vocab_size"] = tm._vocab_size(1)
        cfg = LlavaConfig(vision_config=vision.to_dict(), text_config=text,
                          image_token_index=ids["<image>"], vision_feature_layer=-2,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu")
        model = LlavaForConditionalGeneration(cfg).to(torch.float16)
        tm._save(model, cfg, hf, ["LlavaForConditionalGeneration"])
    else:
        raise ValueError(v["kind"])
    del model
    gc.collect()
    log(f"  {shape.name} mmproj: converting at f16 with the pinned converter ...")
    llama_dir = tm._llama_dir()
    if v["kind"] == "llava":
        _, vis_dir, proj = tm.llava_surgery(hf, work / "surgery")
        env = dict(os.environ, PYTHONPATH=str(llama_dir / "gguf-py"))
        legacy = (llama_dir / "tools" / "mtmd" / "legacy-models" /
                  "convert_image_encoder_to_gguf.py")
        tm._run([sys.executable, legacy, "-m", vis_dir, "--llava-projector", proj,
                 "--output-dir", work / "out", "--clip-model-is-vision", "--projector-type",
                 "mlp", "--image-mean", *tm.CLIP_MEAN, "--image-std", *tm.CLIP_STD], env=env)
        out = work / "out" / "mmproj-model-f16.gguf"
    else:
        tm._run([sys.executable, tm.CONVERT, hf, "--outdir", work / "out", "--name", "m",
                 "--outtype", "f16", "--mmproj-outtype", "f16", "--llama-cpp", llama_dir,
                 "--mmproj-only"])
        out = work / "out" / "m-mmproj-f16.gguf"
    os.replace(out, path)
    shutil.rmtree(work)


def shape_model(name: str, cache: Path | None = None, seed: int = 0) -> tuple[Path, Path]:
    if name not in SHAPES:
        raise KeyError(name)
    shape = SHAPES[name]
    d = Path(cache or DEFAULT_CACHE)
    d.mkdir(parents=True, exist_ok=True)
    text, mmproj = d / f"{name}-shape-q4_k_m.gguf", d / f"{name}-shape-mmproj-f16.gguf"
    if not mmproj.is_file():
        log(f"{name}: building the mmproj ({shape.real}) ...")
        t0 = time.perf_counter()
        write_mmproj(shape, mmproj, seed)
        log(f"{name}: mmproj done in {time.perf_counter() - t0:.0f} s "
            f"({mmproj.stat().st_size / 1e9:.2f} GB)")
    if not text.is_file():
        log(f"{name}: writing the text model ({shape.text.n_layer} layers, vocab "
            f"{shape.text.n_vocab}, Q4_K_M mix) ...")
        t0 = time.perf_counter()
        write_text_gguf(shape, text, seed)
        log(f"{name}: text model done in {time.perf_counter() - t0:.0f} s "
            f"({text.stat().st_size / 1e9:.2f} GB)")
    return text, mmproj


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Exit codes: 0 ok, 1 build failure, 2 bad input.")
    ap.add_argument("models", nargs="*", help=f"default: all ({', '.join(SHAPES)})")
    ap.add_argument("--cache", default=None, help=f"output directory (default {DEFAULT_CACHE})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        for s in SHAPES.values():
            t = s.text
            print(f"{s.name:13} {s.real}: {t.arch}, {t.n_layer} layers, hidden {t.n_embd}, "
                  f"ffn {t.n_ff}, heads {t.n_head}/{t.n_head_kv}, vocab {t.n_vocab}")
        return 0
    unknown = [m for m in args.models if m not in SHAPES]
    if unknown:
        print(f"make_shape_models: error: unknown model {unknown[0]!r} "
              f"(known: {', '.join(SHAPES)})", file=sys.stderr)
        return 2
    try:
        for name in args.models or list(SHAPES):
            text, mmproj = shape_model(name, Path(args.cache) if args.cache else None,
                                       args.seed)
            print(f"{name}\t{text}\t{mmproj}")
    except (RuntimeError, OSError) as e:
        print(f"make_shape_models: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
