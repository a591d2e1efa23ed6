"""Tiny random-weight checkpoints of VLM families libmtmd supports, built from transformers
configs (no download), for scripts/convert.py and the chat engine.

    d = build_idefics3(tmp / "smolvlm")     # SmolVLM / Idefics3: LLaMA text + SigLIP
    d = build_gemma3(tmp / "gemma3")        # Gemma 3: Gemma3 text + SigLIP + pooling

Each writes a Hugging Face checkpoint directory (config.json, model.safetensors,
tokenizer.model, added_tokens.json, tokenizer_config.json, preprocessor_config.json) that
the pinned llama.cpp converter takes as it would a real model.

The tokenizer is a SentencePiece model trained here on a few hundred generated lines, with
byte_fallback (llama.cpp can then tokenize any text), plus the family's special tokens as
added tokens at the end of the vocabulary (the converter marks them USER_DEFINED, so
llama.cpp matches them in any text, as libmtmd needs for the markers it inserts).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

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
                     chat_template: str) -> dict[str, int]:
    """tokenizer.model + added_tokens.json + tokenizer_config.json; returns the ids of the
    special tokens (added after the SentencePiece pieces)."""
    _train_spm(d / "tokenizer.model")
    ids = {t: N_SPM + i for i, t in enumerate(specials)}
    (d / "added_tokens.json").write_text(json.dumps(ids))
    ids.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    tc = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
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
