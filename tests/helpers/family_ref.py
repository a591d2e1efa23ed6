"""transformers references of the tiny checkpoints of every family (scripts/
make_tiny_models.py): the prompt's last logits for the token ids llama.cpp prefilled
(image rows given as -1, replaced by the family's image token), in float32.

LLaVA: this llama.cpp's llava graph (tools/mtmd/models/llava.cpp) appends the class
token AFTER the patches, adds position embeddings 0..n in that order (patch i gets
position i, the class token position n), and keeps rows 1..n: patches 1..n-1 and the
class token. transformers puts the class token first (position 0), patch i at position
i+1, and drops the class token. `reference_logits` returns, for LLaVA, the reproduction of
llama.cpp's order as the reference and transformers' own order as `other` (the test shows
they differ). LLaVA-1.6 images here are one sub-image (32 px): libmtmd encodes them as
LLaVA-1.5 does, so the same reproduction applies; transformers' LlavaNext would add sub-
images and image_newline rows that libmtmd does not produce.

Idefics3: transformers 4.57 gives a tile's patches other position ids than the original
Idefics2/3 code, which llama.cpp follows (_idefics3_original_positions): the reference
uses the original ids, transformers' own computation is `other`.

Every family: llama.cpp embeds patches in f16 (_patch_embedding_in_f16), the reference
does too.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _ids(ids, image_token: int) -> torch.Tensor:
    return torch.tensor([[image_token if t < 0 else t for t in ids]])


def _f16(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def _patch_embedding_in_f16(conv: torch.nn.Module) -> None:
    """Make a tower's patch-embedding convolution see what llama.cpp's does.

    Every family's graph embeds patches with ggml_conv_2d, which unfolds the pixels into
    an F16 buffer (im2col) and multiplies it with the kernel, whose rows the CPU backend
    then converts to F16 too (the vec-dot type of an F16 operand; sums stay f32): pixels
    and weights are both rounded to f16 whatever the file's types. Rounding both here
    reproduces it: measured 9e-8 from llama.cpp's patch rows on the Idefics3 tower,
    against 1e-4 with f32 pixels and weights."""
    with torch.no_grad():
        conv.weight.copy_(_f16(conv.weight))
    forward = conv.forward
    conv.forward = lambda x: forward(_f16(x))


def _llava_model(hf: Path):
    from transformers import AutoConfig, LlavaForConditionalGeneration, \
        LlavaNextForConditionalGeneration
    cfg = AutoConfig.from_pretrained(hf)
    cls = (LlavaNextForConditionalGeneration if cfg.model_type == "llava_next"
           else LlavaForConditionalGeneration)
    return cfg, cls.from_pretrained(hf, dtype=torch.float32).eval()


def _llava_tower(cfg, model, hf: Path, img: Path, cls_first: bool) -> torch.Tensor:
    """The projected image rows [n, D]: transformers' order (cls_first) or llama.cpp's."""
    pre = json.loads((hf / "preprocessor_config.json").read_text())
    x = np.asarray(Image.open(img).convert("RGB"), np.float32) / 255.0
    assert x.shape[:2] == (cfg.vision_config.image_size,) * 2, "needs an unresized image"
    x = (x - np.array(pre["image_mean"], np.float32)) / np.array(pre["image_std"], np.float32)
    px = torch.from_numpy(x).permute(2, 0, 1)[None]
    vm = model.model.vision_tower.vision_model
    n_feat = cfg.vision_config.num_hidden_layers + 1 + cfg.vision_feature_layer
    w = vm.embeddings.patch_embedding.weight
    if not cls_first:       # llama.cpp's patch embedding (_patch_embedding_in_f16)
        w, px = _f16(w), _f16(px)
    patches = torch.nn.functional.conv2d(px, w, stride=cfg.vision_config.patch_size)
    patches = patches.flatten(2).transpose(1, 2)
    cls = vm.embeddings.class_embedding[None, None]
    seq = torch.cat([cls, patches] if cls_first else [patches, cls], 1)
    h = vm.pre_layrnorm(seq + vm.embeddings.position_embedding.weight[None, :seq.shape[1]])
    for layer in vm.encoder.layers[:n_feat]:
        h = layer(h, None, None)[0]
    return model.model.multi_modal_projector(h[:, 1:])[0]


def llava_image_rows(hf: Path, img: Path, *, llama_cpp_order: bool = True) -> np.ndarray:
    """A LLaVA image's projected rows [n, D]: in this llama.cpp's order (patches 1..n-1,
    then the class token; see the module docstring) or transformers' (patches 0..n-1)."""
    cfg, model = _llava_model(Path(hf))
    with torch.no_grad():
        return _llava_tower(cfg, model, Path(hf), img, not llama_cpp_order).numpy()


def _llava(hf: Path, ids, img: Path):
    cfg, model = _llava_model(hf)
    tokens = _ids(ids, cfg.image_token_index)
    out = []
    with torch.no_grad():
        for cls_first in (False, True):
            emb = model.get_input_embeddings()(tokens)
            emb[tokens == cfg.image_token_index] = _llava_tower(cfg, model, hf, img, cls_first)
            out.append(model(inputs_embeds=emb).logits[0, -1].numpy())
    return out[0], out[1]


def _qwen(hf: Path, ids, img: Path, v25: bool):
    from transformers import AutoConfig, Qwen2VLImageProcessor
    from transformers import Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration
    cfg = AutoConfig.from_pretrained(hf)
    cls = Qwen2_5_VLForConditionalGeneration if v25 else Qwen2VLForConditionalGeneration
    model = cls.from_pretrained(hf, dtype=torch.float32).eval()
    proc = Qwen2VLImageProcessor.from_pretrained(hf)
    px = proc(images=[Image.open(img).convert("RGB")], return_tensors="pt")
    _patch_embedding_in_f16(model.model.visual.patch_embed.proj)
    with torch.no_grad():
        return model(input_ids=_ids(ids, cfg.image_token_id), pixel_values=px["pixel_values"],
                     image_grid_thw=px["image_grid_thw"]).logits[0, -1].numpy(), None


def qwen25vl_image_rows(hf: Path, img: Path, *, window_px: int | None = None,
                        windows: bool = True) -> np.ndarray:
    """The Qwen2.5-VL tower's image rows (merged tokens, in libmtmd's order), f32 with
    llama.cpp's f16 patch embedding; window_px replaces the checkpoint's window size,
    windows=False makes every block attend to the whole image."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    px = Qwen2VLImageProcessor.from_pretrained(hf)(images=[Image.open(img).convert("RGB")],
                                                   return_tensors="pt")
    vis = model.model.visual
    _patch_embedding_in_f16(vis.patch_embed.proj)
    if window_px is not None:
        vis.window_size = window_px
    if not windows:
        vis.fullatt_block_indexes = list(range(len(vis.blocks)))
    with torch.no_grad():
        return vis(px["pixel_values"], grid_thw=px["image_grid_thw"]).numpy()


def _gemma3(hf: Path, ids, img: Path):
    from transformers import AutoConfig, Gemma3ForConditionalGeneration, Gemma3ImageProcessor
    cfg = AutoConfig.from_pretrained(hf)
    model = Gemma3ForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    px = Gemma3ImageProcessor.from_pretrained(hf)(images=[Image.open(img).convert("RGB")],
                                                  return_tensors="pt")["pixel_values"]
    tokens = _ids(ids, cfg.image_token_index)
    _patch_embedding_in_f16(model.model.vision_tower.vision_model.embeddings.patch_embedding)
    # image tokens attend to each other both ways (token_type_ids 1), as libmtmd decodes them
    with torch.no_grad():
        return model(input_ids=tokens, pixel_values=px,
                     token_type_ids=(tokens == cfg.image_token_index).long()
                     ).logits[0, -1].numpy(), None


def _idefics3_original_positions(embeddings):
    """Swap in the position ids of the original Idefics2/3 code for the tower's embeddings.

    On a full tile (every patch real) the original code (`torch.arange(0, 1 - 1e-6, 1 / n)`
    bucketed by boundaries 1/n .. (n-1)/n; transformers still ships it in its
    phi4_multimodal copy) gives patch (h, w) the position h * n + w: what llama.cpp's siglip
    graph adds (the learned table in order). transformers 4.57's idefics3 computes the
    coordinates as `h / n * (1 - 1e-6)`, which falls just below the boundary h / n: patch
    h gets bucket h - 1 (and 0 stays 0), so rows 0 and 1 (and columns 0 and 1) share one
    position and the table's last row and column are never used. That is transformers'
    change, not llama.cpp's: the measured difference was 0.15 on the image rows and 4.9e-2
    of the largest logit; 1.3e-3 once the positions agree, all of it the text model's
    (llama.cpp's flash attention: tests/test_families.py, PARITY_RTOL)."""
    import types

    def forward(self, pixel_values, patch_attention_mask):
        assert bool(patch_attention_mask.all()), "only full tiles: no padded patches"
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight[None, :x.shape[1]]
    embeddings.forward = types.MethodType(forward, embeddings)


def _idefics3(hf: Path, ids, img: Path):
    from transformers import AutoConfig, Idefics3ForConditionalGeneration, \
        Idefics3ImageProcessor
    cfg = AutoConfig.from_pretrained(hf)
    model = Idefics3ForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    px = Idefics3ImageProcessor.from_pretrained(hf)(images=[[Image.open(img).convert("RGB")]],
                                                    return_tensors="pt")
    tokens = _ids(ids, cfg.image_token_id)
    n_tiles = px["pixel_values"].shape[1]
    per_tile = (cfg.vision_config.image_size // cfg.vision_config.patch_size
                // cfg.scale_factor) ** 2
    assert int((tokens == cfg.image_token_id).sum()) == n_tiles * per_tile, \
        "transformers and libmtmd cut the image into different numbers of tiles"
    with torch.no_grad():
        def last_logits():
            return model(input_ids=tokens, pixel_values=px["pixel_values"],
                         pixel_attention_mask=px["pixel_attention_mask"]).logits[0, -1].numpy()
        own = last_logits()
        _idefics3_original_positions(model.model.vision_model.embeddings)
        _patch_embedding_in_f16(model.model.vision_model.embeddings.patch_embedding)
        return last_logits(), own


def reference_logits(family: str, hf: Path, ids, img: Path):
    """(reference logits, other logits or None): see the module docstring."""
    hf = Path(hf)
    if family in ("llava15", "llava16"):
        return _llava(hf, ids, img)
    if family in ("qwen2vl", "qwen25vl"):
        return _qwen(hf, ids, img, family == "qwen25vl")
    if family == "gemma3":
        return _gemma3(hf, ids, img)
    if family == "idefics3":
        return _idefics3(hf, ids, img)
    raise ValueError(family)
