#!/usr/bin/env python3
"""Tiny random-weight checkpoints of every VLM family lightkv-edge covers, built from
transformers configs (no download), converted to GGUF by the pinned llama.cpp converters,
cached.

    python scripts/make_tiny_models.py                  # every family
    python scripts/make_tiny_models.py llava16 qwen25vl # some
    python scripts/make_tiny_models.py --list           # families, modes, what they are

prints, per family, its HF checkpoint directory, text GGUF and mmproj GGUF. Everything is
cached under ~/.cache/lightkv-edge/tiny-models/<family>-<key>/ (--cache DIR elsewhere),
where <key> hashes this file, the transformers version and the llama.cpp tree: a change
to any of them builds afresh; otherwise the cached files are reused. Seeded (--seed,
default 0): the same key and seed give the same weights.

Families (FAMILIES below): LLaVA-1.5 (CLIP + 2-layer MLP projector), LLaVA-1.6 (the same
with anyres: image_grid_pinpoints, several sub-images per picture), SmolVLM / Idefics3,
Qwen2-VL, Qwen2.5-VL, Gemma 3. LLaVA's vision side goes through llama.cpp's legacy path
(tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py: the tower saved as a
CLIPVisionModel, the projector tensors saved apart, as llava_surgery_v2.py would), every
other part through scripts/convert.py (convert_hf_to_gguf.py).

Each checkpoint directory holds config.json, model.safetensors, tokenizer.model,
added_tokens.json, tokenizer_config.json, preprocessor_config.json: what the converter
takes from a real model. The tokenizer is a SentencePiece model trained here on a few
hundred generated lines, with byte_fallback (llama.cpp can then tokenize any text), plus
the family's special tokens as added tokens at the end of the vocabulary (the converter
marks them USER_DEFINED, so llama.cpp matches them in any text, as libmtmd needs for the
markers it inserts).

Exit codes: 0 ok, 1 a build or converter failure, 2 bad input (unknown family).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONVERT = ROOT / "scripts" / "convert.py"
DEFAULT_CACHE = Path.home() / ".cache" / "lightkv-edge" / "tiny-models"

N_SPM = 320  # SentencePiece pieces: <unk> <s> </s>, 256 byte tokens, ~60 learned pieces

_WORDS = ("what colour is the circle square triangle red green blue yellow left right top "
          "bottom how many shapes are there in this image picture describe both is a an "
          "of and which one big small near far user assistant question answer").split()


def _train_spm(path: Path, seed: int = 0) -> None:
    import sentencepiece as spm
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))) + rng.choice("?.!")
             for _ in range(400)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(path.with_suffix("")),
        vocab_size=N_SPM, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)


def _write_tokenizer(d: Path, specials: list[str], *, bos: str, eos: str,
                     chat_template: str, add_bos: bool = True) -> dict[str, int]:
    """tokenizer.model + added_tokens.json + tokenizer_config.json; returns the ids of the
    special tokens (added after the SentencePiece pieces)."""
    _train_spm(d / "tokenizer.model")
    ids = {t: N_SPM + i for i, t in enumerate(specials)}
    (d / "added_tokens.json").write_text(json.dumps(ids))
    ids.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    tc = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": add_bos, "add_eos_token": False,
        "bos_token": bos, "eos_token": eos, "unk_token": "<unk>", "pad_token": "<unk>",
        "chat_template": chat_template,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    return ids


def _vocab_size(n_specials: int) -> int:
    return (N_SPM + n_specials + 63) // 64 * 64


def _save(model, cfg, d: Path, architectures: list[str], text_architectures=None) -> None:
    """save_pretrained, then a config.json holding every value (not only the non-default
    ones: the converter reads e.g. hidden_size from text_config) and the architectures."""
    model.save_pretrained(d, safe_serialization=True)
    c = cfg.to_dict()
    c["architectures"] = architectures
    if text_architectures:
        c["text_config"]["architectures"] = text_architectures
    (d / "config.json").write_text(json.dumps(c, indent=1))


_PREPROC = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255}


def build_idefics3(d, *, seed: int = 0, tile: int = 64, patch: int = 8,
                   longest_edge: int = 128) -> Path:
    """SmolVLM/Idefics3: LLaMA text model (1-D RoPE) + SigLIP tower + pixel-shuffle
    connector (scale factor 2). A tile of `tile` px gives (tile/patch/2)^2 tokens (16 at
    the defaults); libmtmd cuts an image into up to (longest_edge/tile)^2 tiles plus a
    global overview tile, each its own image chunk."""
    import torch
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration,
                              Idefics3VisionConfig, LlamaConfig)
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    n_side = longest_edge // tile
    specials = (["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                 "<|im_start|>", "\n\n"] +
                [f"<row_{r}_col_{c}>" for r in range(1, n_side + 1)
                 for c in range(1, n_side + 1)])
    # llama.cpp recognises the SmolVLM chat format by these two markers in the template
    template = ("<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}: "
                "{{ m['content'] }}<end_of_utterance>\n{% endfor %}"
                "{% if add_generation_prompt %}Assistant:{% endif %}")
    ids = _write_tokenizer(d, specials, bos="<|im_start|>", eos="<end_of_utterance>",
                           chat_template=template)
    text = LlamaConfig(vocab_size=_vocab_size(len(specials)), hidden_size=64,
                       intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=2048,
                       rms_norm_eps=1e-5, rope_theta=10000.0,
                       bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<end_of_utterance>"],
                       pad_token_id=0, tie_word_embeddings=False)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, image_size=tile, patch_size=patch)
    cfg = Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                         scale_factor=2, image_token_id=ids["<image>"],
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(cfg)
    _save(model, cfg, d, ["Idefics3ForConditionalGeneration"], ["VLlama3ForCausalLM"])
    pre = dict(_PREPROC, image_processor_type="Idefics3ImageProcessor", do_resize=True,
               do_image_splitting=True, size={"longest_edge": longest_edge},
               max_image_size={"longest_edge": tile})
    (d / "preprocessor_config.json").write_text(json.dumps(pre))
    return d


def build_gemma3(d, *, seed: int = 0, image: int = 64, patch: int = 8,
                 tokens_per_image: int = 16) -> Path:
    """Gemma 3: Gemma3 text model (1-D RoPE, sliding-window layers) + SigLIP tower +
    average pooling to `tokens_per_image` tokens. libmtmd resizes every image to
    `image` px and decodes its tokens non-causally (mtmd_decode_use_non_causal)."""
    import torch
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration,
                              Gemma3TextConfig, SiglipVisionConfig)
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    specials = ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>",
                "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
                "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    ids = _write_tokenizer(d, specials, bos="<bos>", eos="<eos>", chat_template=template)
    text = Gemma3TextConfig(vocab_size=_vocab_size(len(specials)), hidden_size=64,
                            intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=32, max_position_embeddings=2048,
                            sliding_window=512, rope_theta=10000.0, rope_local_base_freq=10000.0,
                            query_pre_attn_scalar=32, bos_token_id=ids["<bos>"],
                            eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"])
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=image, patch_size=patch)
    cfg = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                       mm_tokens_per_image=tokens_per_image,
                       boi_token_index=ids["<start_of_image>"],
                       eoi_token_index=ids["<end_of_image>"],
                       image_token_index=ids["<image_soft_token>"])
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg)
    _save(model, cfg, d, ["Gemma3ForConditionalGeneration"])
    pre = dict(_PREPROC, image_processor_type="Gemma3ImageProcessor",
               size={"height": image, "width": image}, image_seq_length=tokens_per_image)
    (d / "preprocessor_config.json").write_text(json.dumps(pre))
    return d


_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen_tokenizer(d: Path) -> dict[str, int]:
    # Qwen adds no BOS (its tokenizer_config says add_bos_token false)
    return _write_tokenizer(d, _QWEN_SPECIALS, bos="<|endoftext|>", eos="<|im_end|>",
                            chat_template=_CHATML, add_bos=False)


def _qwen_text(ids: dict[str, int], mrope: list[int]) -> dict:
    n = 2
    return dict(architectures=None, vocab_size=_vocab_size(len(_QWEN_SPECIALS)),
                hidden_size=64, intermediate_size=128, num_hidden_layers=n,
                # head dim 32: the M-RoPE sections cover its 16 rotary pairs
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu",
                rope_scaling={"type": "mrope", "rope_type": "default", "mrope_section": mrope},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                tie_word_embeddings=False, use_sliding_window=False,
                layer_types=["full_attention"] * n)


def _qwen_ids(ids: dict[str, int]) -> dict:
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"],
                vision_end_token_id=ids["<|vision_end|>"])


def _qwen_preproc(d: Path, processor: str, patch: int) -> None:
    pre = dict(_PREPROC, image_processor_type=processor, patch_size=patch,
               temporal_patch_size=2, merge_size=2, min_pixels=(2 * patch) ** 2 * 4,
               max_pixels=(2 * patch) ** 2 * 64, do_resize=True)
    (d / "preprocessor_config.json").write_text(json.dumps(pre))


def build_qwen2vl(d, *, seed: int = 0, patch: int = 8) -> Path:
    """Qwen2-VL: Qwen2 text model with M-RoPE (sections 4/6/6 of a 32-dim head) + ViT with
    2-D RoPE (3 blocks: the converter names the merger through the block index) + 2x2
    patch merger. A 64 px image gives a 4 x 4 grid of 16 tokens, one chunk."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    ids = _qwen_tokenizer(d)
    text = _qwen_text(ids, [4, 6, 6])
    text.pop("architectures")
    vision = dict(depth=3, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                  patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
                  in_channels=3, hidden_act="quick_gelu")
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **_qwen_ids(ids),
                        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg)
    _save(model, cfg, d, ["Qwen2VLForConditionalGeneration"],
          ["Qwen2VLForConditionalGeneration"])
    _qwen_preproc(d, "Qwen2VLImageProcessor", patch)
    return d


def build_qwen25vl(d, *, seed: int = 0, patch: int = 8) -> Path:
    """Qwen2.5-VL: as Qwen2-VL, with a SwiGLU + RMSNorm ViT, window attention in every block
    but the full-attention ones (1 and 3). The window is 112 px, every released
    Qwen2.5-VL's: the converter does not write it and llama.cpp assumes 112 (a smaller
    one here made blocks 0 and 2 attend in other windows than transformers'). At patch 8
    that is 7 x 7 merged tokens: a 128 px picture (8 x 8) has four uneven windows."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    ids = _qwen_tokenizer(d)
    text = _qwen_text(ids, [4, 6, 6])
    text.pop("architectures")
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2,
                  out_hidden_size=64, patch_size=patch, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1, 3],
                  in_channels=3, hidden_act="silu")
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_qwen_ids(ids),
                           tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    _save(model, cfg, d, ["Qwen2_5_VLForConditionalGeneration"],
          ["Qwen2_5_VLForConditionalGeneration"])
    _qwen_preproc(d, "Qwen2_5_VLImageProcessor", patch)
    return d


# CLIP's normalisation (what llava-hf's processors use)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_VICUNA = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }}\n"
           "{% elif m['role'] == 'assistant' %}ASSISTANT: {{ m['content'] }}</s>\n"
           "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}ASSISTANT: {% endif %}")


def _build_llava(d, *, seed: int, image: int, patch: int, pinpoints) -> Path:
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    specials = ["<image>"]
    ids = _write_tokenizer(d, specials, bos="<s>", eos="</s>", chat_template=_VICUNA)
    text = LlamaConfig(vocab_size=_vocab_size(len(specials)), hidden_size=64,
                       intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=2048,
                       rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, tie_word_embeddings=False)
    # 3 blocks, features from the second-to-last (vision_feature_layer -2): llama.cpp runs
    # the first 2
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, image_size=image, patch_size=patch,
                              projection_dim=64, hidden_act="quick_gelu")
    common = dict(vision_config=vision.to_dict(), text_config=text.to_dict(),
                  image_token_index=ids["<image>"], vision_feature_layer=-2,
                  vision_feature_select_strategy="default", projector_hidden_act="gelu",
                  tie_word_embeddings=False)
    torch.manual_seed(seed)
    if pinpoints is None:
        from transformers import LlavaConfig, LlavaForConditionalGeneration
        cfg = LlavaConfig(**common)
        model = LlavaForConditionalGeneration(cfg)
        arch = "LlavaForConditionalGeneration"
        pre = dict(image_processor_type="CLIPImageProcessor", crop_size={"height": image,
                   "width": image}, size={"shortest_edge": image})
    else:
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
        cfg = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
        model = LlavaNextForConditionalGeneration(cfg)
        with torch.no_grad():   # transformers initialises it to zeros: make it tell
            model.model.image_newline.normal_(0, 1 / 8)
        arch = "LlavaNextForConditionalGeneration"
        pre = dict(image_processor_type="LlavaNextImageProcessor", crop_size={
                   "height": image, "width": image}, size={"shortest_edge": image},
                   image_grid_pinpoints=pinpoints)
    _save(model, cfg, d, [arch])
    pre.update(image_mean=CLIP_MEAN, image_std=CLIP_STD, do_normalize=True, do_rescale=True,
               rescale_factor=1 / 255, do_resize=True, do_center_crop=True)
    (d / "preprocessor_config.json").write_text(json.dumps(pre))
    return d


def build_llava15(d, *, seed: int = 0, image: int = 32, patch: int = 8) -> Path:
    """LLaVA-1.5: LLaMA text model + CLIP ViT (class token, learned position embeddings,
    features of the second-to-last block, class token dropped) + 2-layer GELU MLP
    projector. libmtmd resizes every image to `image` px: (image/patch)^2 = 16 tokens."""
    return _build_llava(d, seed=seed, image=image, patch=patch, pinpoints=None)


def build_llava16(d, *, seed: int = 0, image: int = 32, patch: int = 8) -> Path:
    """LLaVA-1.6 (LLaVA-NeXT): LLaVA-1.5 with anyres: a picture larger than `image` px is
    resized to the best of the grid pinpoints and cut into `image` px sub-images, each
    encoded like a LLaVA-1.5 image, after an overview of the whole picture."""
    pins = [[image, 2 * image], [2 * image, image], [2 * image, 2 * image]]
    return _build_llava(d, seed=seed, image=image, patch=patch, pinpoints=pins)


def llava_surgery(hf: Path, out: Path) -> tuple[Path, Path, Path]:
    """What llava_surgery_v2.py does to a LLaVA checkpoint, on ours: (a LLaMA text
    checkpoint, a CLIPVisionModel directory, the projector tensors file) for the text
    converter and the legacy image-encoder converter."""
    import torch
    from safetensors.torch import load_file, save_file
    sd = load_file(str(hf / "model.safetensors"))
    cfg = json.loads((hf / "config.json").read_text())
    text_dir, vis_dir = out / "text", out / "vision"
    for p in (text_dir, vis_dir):
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
    # transformers saves LLaVA under its legacy names (language_model.model.*,
    # language_model.lm_head.*, vision_tower.*, multi_modal_projector.*, image_newline);
    # newer layouts put a "model." before the parts: read both
    def part(prefix):
        out = {}
        for k, v in sd.items():
            for p in (prefix, "model." + prefix):
                if k.startswith(p):
                    out[k[len(p):]] = v
        return out
    text = {"model." + k: v for k, v in part("language_model.model.").items()}
    text.update({"lm_head." + k: v for k, v in part("language_model.lm_head.").items()})
    if not text:    # the newer layout: model.language_model.* and lm_head.*
        text = {"model." + k: v for k, v in part("language_model.").items()}
        text.update({k: v for k, v in sd.items() if k.startswith("lm_head.")})
    vis = {"vision_model." + k: v for k, v in part("vision_tower.vision_model.").items()}
    proj = {"multi_modal_projector." + k: v.float()
            for k, v in part("multi_modal_projector.").items()}
    proj.update({"image_newline": v.float() for k, v in sd.items()
                 if k in ("image_newline", "model.image_newline")})
    if not text or not vis or len(proj) < 4:
        raise RuntimeError(f"{hf}: not the LLaVA tensor layout this surgery knows")
    save_file(text, str(text_dir / "model.safetensors"))
    tc = dict(cfg["text_config"], architectures=["LlamaForCausalLM"], model_type="llama")
    (text_dir / "config.json").write_text(json.dumps(tc, indent=1))
    for f in ("tokenizer.model", "added_tokens.json", "tokenizer_config.json"):
        shutil.copy(hf / f, text_dir / f)
    # vision tower: a CLIPVisionModel checkpoint; its config carries what the legacy
    # converter reads from a LLaVA config (feature layer, anyres pinpoints)
    save_file(vis, str(vis_dir / "model.safetensors"))
    vc = dict(cfg["vision_config"], architectures=["CLIPVisionModel"],
              model_type="clip_vision_model", vision_feature_layer=cfg["vision_feature_layer"])
    if "image_grid_pinpoints" in cfg:
        vc.update(image_grid_pinpoints=cfg["image_grid_pinpoints"],
                  mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres")
    (vis_dir / "config.json").write_text(json.dumps(vc, indent=1))
    proj_path = out / "llava.projector"
    torch.save(proj, proj_path)
    return text_dir, vis_dir, proj_path


@dataclass(frozen=True)
class Family:
    name: str
    build: object            # builder(dir, seed=) -> HF checkpoint directory
    what: str
    text_arch: str           # general.architecture of the text GGUF
    projector: str           # clip.projector_type of the mmproj
    modes: tuple[str, ...]   # chat modes lightkv-edge runs it in
    hf_repo: str             # a real GGUF repo of the family (README's commands)


# layer mode covers the llama, qwen2, qwen2vl and gemma3 graphs (patch 0003), Gemma 3's
# sliding-window pair of KV caches included (patches 0003-0006)
FAMILIES = {f.name: f for f in (
    Family("llava15", build_llava15, "LLaVA-1.5 (CLIP + MLP projector)", "llama", "mlp",
           ("off", "embed", "layer"), "second-state/Llava-v1.5-7B-GGUF"),
    Family("llava16", build_llava16, "LLaVA-1.6 / NeXT (anyres sub-images)", "llama", "mlp",
           ("off", "embed", "layer"), "cjpais/llava-1.6-mistral-7b-gguf"),
    Family("idefics3", build_idefics3, "SmolVLM / Idefics3", "llama", "idefics3",
           ("off", "embed", "layer"), "ggml-org/SmolVLM-500M-Instruct-GGUF"),
    Family("qwen2vl", build_qwen2vl, "Qwen2-VL", "qwen2vl", "qwen2vl_merger",
           ("off", "embed", "layer"), "ggml-org/Qwen2-VL-2B-Instruct-GGUF"),
    Family("qwen25vl", build_qwen25vl, "Qwen2.5-VL", "qwen2vl", "qwen2.5vl_merger",
           ("off", "embed", "layer"), "ggml-org/Qwen2.5-VL-3B-Instruct-GGUF"),
    Family("gemma3", build_gemma3, "Gemma 3", "gemma3", "gemma3",
           ("off", "embed", "layer"), "ggml-org/gemma-3-4b-it-GGUF"),
)}


class UserError(Exception):
    """Bad input: one line, exit code 2."""


def _llama_dir() -> Path:
    r = subprocess.run([sys.executable, str(ROOT / "native" / "llama_source.py"), "--print-dir"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("the pinned llama.cpp source is unavailable: "
                           + (r.stderr.strip().splitlines() or ["?"])[-1])
    return Path(r.stdout.strip().splitlines()[-1])


def cache_key(llama_dir: Path) -> str:
    import transformers
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(transformers.__version__.encode())
    h.update(llama_dir.name.encode())
    return h.hexdigest()[:12]


def _run(cmd, env=None, cwd=None) -> None:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd)
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr + "\n" + r.stdout).splitlines() if ln.strip()]
        raise RuntimeError(f"{Path(str(cmd[1])).name} failed: {(lines or ['?'])[-1]}")


def _convert_legacy_llava(llama_dir: Path, hf: Path, work: Path, out: Path, name: str,
                          outtype: str) -> tuple[Path, Path]:
    text_dir, vis_dir, proj = llava_surgery(hf, work)
    _run([sys.executable, CONVERT, text_dir, "--outdir", out, "--name", name, "--outtype",
          outtype, "--llama-cpp", llama_dir, "--text-only"])
    env = dict(os.environ, PYTHONPATH=str(llama_dir / "gguf-py"))
    legacy = llama_dir / "tools" / "mtmd" / "legacy-models" / "convert_image_encoder_to_gguf.py"
    cmd = [sys.executable, legacy, "-m", vis_dir, "--llava-projector", proj, "--output-dir",
           work / "mmproj", "--clip-model-is-vision", "--projector-type", "mlp",
           "--image-mean", *CLIP_MEAN, "--image-std", *CLIP_STD]
    if outtype == "f32":
        cmd.append("--use-f32")
    _run(cmd, env=env)
    ftype = "f32" if outtype == "f32" else "f16"
    mmproj = out / f"{name}-mmproj-{ftype}.gguf"
    shutil.move(str(work / "mmproj" / f"mmproj-model-{ftype}.gguf"), mmproj)
    return out / f"{name}-{outtype}.gguf", mmproj


@dataclass(frozen=True)
class TinyModel:
    family: str
    hf: Path        # the transformers checkpoint
    text: Path      # text GGUF (f32)
    mmproj: Path    # mmproj GGUF (f32; LLaVA's patch embedding is f16, see the legacy path)


def tiny_model(family: str, cache: Path | None = None, seed: int = 0,
               log=lambda msg: None) -> TinyModel:
    """The family's tiny checkpoint and its f32 GGUFs, built once per cache key and seed."""
    if family not in FAMILIES:
        raise UserError(f"unknown family {family!r} (known: {', '.join(FAMILIES)})")
    fam = FAMILIES[family]
    llama_dir = _llama_dir()
    d = Path(cache or DEFAULT_CACHE) / f"{family}-{cache_key(llama_dir)}-s{seed}"
    res = TinyModel(family, d / "hf", d / f"{family}-f32.gguf", d / f"{family}-mmproj-f32.gguf")
    if (d / "done").is_file():
        return res
    for old in d.parent.glob(f"{family}-*-s{seed}"):   # built by an older key
        if old != d and "." not in old.name:
            shutil.rmtree(old, ignore_errors=True)
    log(f"{family}: building the tiny checkpoint in {d} ...")
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fam.build(tmp / "hf", seed=seed)
        log(f"{family}: converting with the pinned llama.cpp converters ...")
        if family.startswith("llava"):
            _convert_legacy_llava(llama_dir, tmp / "hf", tmp / "surgery", tmp, family, "f32")
            shutil.rmtree(tmp / "surgery")
        else:
            _run([sys.executable, CONVERT, tmp / "hf", "--outdir", tmp, "--name", family,
                  "--outtype", "f32", "--llama-cpp", llama_dir])
        (tmp / "done").write_text("ok\n")
        if (d / "done").is_file():  # another process finished first: keep its files (a
            shutil.rmtree(tmp)      # test may be reading them); ours are the same
        else:
            shutil.rmtree(d, ignore_errors=True)
            os.replace(tmp, d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"{family}: done")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Exit codes: 0 ok, 1 build failure, 2 bad input.")
    ap.add_argument("families", nargs="*", help=f"default: all ({', '.join(FAMILIES)})")
    ap.add_argument("--cache", default=None, help=f"cache directory (default {DEFAULT_CACHE})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true", help="list the families and exit")
    args = ap.parse_args(argv)
    if args.list:
        for f in FAMILIES.values():
            print(f"{f.name:9} {f.what}; text {f.text_arch}, projector {f.projector}; "
                  f"modes {', '.join(f.modes)}")
        return 0
    try:
        for name in args.families or list(FAMILIES):
            m = tiny_model(name, Path(args.cache) if args.cache else None, args.seed,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
            print(f"{name}\t{m.hf}\t{m.text}\t{m.mmproj}")
    except UserError as e:
        print(f"make_tiny_models: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"make_tiny_models: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
