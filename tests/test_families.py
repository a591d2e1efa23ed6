"""The chat engine's off and embed modes on other VLM families libmtmd supports.

Tiny random-weight checkpoints are built from transformers configs (tests/helpers/
tiny_vlms.py, no download) and converted by scripts/convert.py, i.e. by the pinned
llama.cpp converter, once per module:

- SmolVLM / Idefics3 (Idefics3ForConditionalGeneration): LLaMA text model with normal 1-D
  RoPE, SigLIP tower, pixel-shuffle connector. libmtmd tiles each image (64 px tiles, up to
  2x2, plus a global overview tile), each tile its own 16-token image chunk between text
  chunks (<fake_token_around_image><row_r_col_c>, <global-img>).
- Gemma 3 (Gemma3ForConditionalGeneration): Gemma3 text model (normal RoPE, sliding-window
  layers), SigLIP tower, average pooling to 16 tokens; libmtmd decodes image tokens
  non-causally (mtmd_decode_use_non_causal).

Both are normal-RoPE models, so embed mode keeps each merged row at its original 1-D
position, which llama.cpp accepts only through our patch 0001 (llama_set_position_gaps).
Conversion needs the pinned llama.cpp source and the chat needs our build: when either is
missing these tests FAIL with the reason, they do not skip.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.images import two_images
from tests.helpers.pinned import llama_cpp_dir

from lightkv_edge import embed_mode

ROOT = Path(__file__).resolve().parent.parent
CONVERT = ROOT / "scripts" / "convert.py"

# vision tokens libmtmd makes of the two test images (64x64 and 128x48 px)
FAMILIES = {
    # 64x64 -> 2x2 tiles + overview = 5 chunks; 128x48 -> 2x1 tiles + overview = 3 chunks
    "idefics3": {"chunks": (5, 3), "per_chunk": 16, "non_causal": False},
    # any image -> one 64 px chunk of 16 tokens
    "gemma3": {"chunks": (1, 1), "per_chunk": 16, "non_causal": True},
}
PROMPT = "What colour is the circle?"
N_TOK = 6


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{family: (text gguf, mmproj gguf)}: every checkpoint built first, then all the
    converter runs (text and mmproj of each family) in parallel: each is mostly the
    converter's own start-up."""
    from tests.helpers.tiny_vlms import build_gemma3, build_idefics3
    llama_dir = llama_cpp_dir()
    builders = {"idefics3": build_idefics3, "gemma3": build_gemma3}
    out = tmp_path_factory.mktemp("gguf")
    procs = []
    for fam, build in builders.items():
        hf = build(tmp_path_factory.mktemp(f"hf_{fam}"))
        for part in ("--text-only", "--mmproj-only"):
            procs.append((fam, part, subprocess.Popen(
                [sys.executable, str(CONVERT), str(hf), "--outdir", str(out), "--name", fam,
                 "--outtype", "f32", "--llama-cpp", str(llama_dir), part],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for fam, part, p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, f"{fam} {part}: {stderr.strip()[-500:]}"
        assert "done" in stdout
    return {fam: (out / f"{fam}-f32.gguf", out / f"{fam}-mmproj-f32.gguf") for fam in builders}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, converted):
    return request.param, converted[request.param]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return two_images(tmp_path_factory.mktemp("img"), (128, 48))


def _chat(pair, **kw):
    from lightkv_edge.engine import VisionChat
    kw.setdefault("max_tokens", N_TOK)
    kw.setdefault("n_threads", 1)
    kw.setdefault("ignore_eos", True)   # random weights: always decode N_TOK tokens
    return VisionChat(str(pair[0]), str(pair[1]), **kw)


def _run(pair, imgs, with_logits=False, **kw):
    """One turn; returns (generated token ids, stats, next position) and, with_logits, the
    logits of the prompt's last token (what the first answer token is sampled from)."""
    from lightkv_edge.engine import llama_cpp
    with _chat(pair, **kw) as chat:
        tokens, logits = [], []
        orig = chat._generate

        def gen(max_tokens, stats, answer):
            n_vocab = llama_cpp.llama_vocab_n_tokens(chat.m.vocab)
            logits.append(np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(chat.m.ctx, -1), shape=(n_vocab,)).copy())
            for t in orig(max_tokens, stats, answer):
                tokens.append(t)
                yield t
        chat._generate = gen
        chat.ask(PROMPT, imgs)
        out = (tokens, chat.last_stats, chat.n_past)
        return out + (logits[0],) if with_logits else out


def _keep_all(embd, grid, text_embd, **kw):
    return embed_mode.MergedImage(embd, np.arange(len(embd)), len(embd), 0.0)


def _n_in(fam, n_images):
    f = FAMILIES[fam]
    return sum(f["chunks"][:n_images]) * f["per_chunk"]


def _n_kept(fam, n_images, keep):
    # one merge per image chunk, ceil(keep * n) rows each
    f = FAMILIES[fam]
    return sum(f["chunks"][:n_images]) * math.ceil(keep * f["per_chunk"])


def test_converted_metadata(family, converted):
    fam, (text, mmproj) = family
    sys.path.insert(0, str(llama_cpp_dir() / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)

    def field(r, k):
        f = r.fields[k]
        return f.contents()
    t, m = GGUFReader(str(text)), GGUFReader(str(mmproj))
    assert field(t, "general.architecture") == {"idefics3": "llama", "gemma3": "gemma3"}[fam]
    assert field(m, "clip.projector_type") == {"idefics3": "idefics3", "gemma3": "gemma3"}[fam]
    assert field(m, "clip.vision.projection_dim") == 64


def test_off_mode_answers(family, images):
    fam, pair = family
    tok1, st1, _ = _run(pair, [images[0]], mode="off")
    assert len(tok1) == N_TOK and st1.n_decoded == N_TOK
    assert st1.vision_tokens_in == st1.vision_tokens_kept == _n_in(fam, 1)
    tok2, st2, _ = _run(pair, [images[0], images[1]], mode="off")
    assert len(tok2) == N_TOK
    assert st2.vision_tokens_in == _n_in(fam, 2)
    assert st2.kv_cells > st1.kv_cells + FAMILIES[fam]["per_chunk"]


def test_embed_without_merge_is_exact(family, images, monkeypatch):
    """embed mode's own image batches, positions and causal switch, with a merge that keeps
    every row: the same tokens as off mode (libmtmd's own helper)."""
    fam, pair = family
    two = [images[0], images[1]]
    tok_off, st_off, pos_off, lg_off = _run(pair, two, mode="off", with_logits=True)
    monkeypatch.setattr("lightkv_edge.engine.reduce_image", _keep_all)
    from lightkv_edge.engine import llama_cpp
    calls = []
    orig = llama_cpp.llama_set_causal_attn

    def set_causal(ctx, causal):
        calls.append(bool(causal))
        return orig(ctx, causal)
    monkeypatch.setattr(llama_cpp, "llama_set_causal_attn", set_causal)
    tok_emb, st_emb, pos_emb, lg_emb = _run(pair, two, mode="embed", keep=0.5,
                                            with_logits=True)
    assert st_emb.vision_tokens_kept == st_emb.vision_tokens_in == _n_in(fam, 2)
    assert (st_emb.kv_cells, pos_emb) == (st_off.kv_cells, pos_off)
    assert len(tok_off) == N_TOK, tok_off  # both sides generated: equality proves something
    assert tok_emb == tok_off
    # the greedy tokens of a tiny random model say little (they often repeat one token):
    # the prompt's last logits must match too
    np.testing.assert_allclose(lg_emb, lg_off, rtol=0, atol=1e-4 * np.abs(lg_off).max())
    # Gemma 3's image rows were decoded non-causally, one switch off/on per image chunk
    n_chunks = sum(FAMILIES[fam]["chunks"])
    assert calls == ([False, True] * n_chunks if FAMILIES[fam]["non_causal"] else [])


def test_embed_keep_half_shrinks_the_cache(family, images):
    fam, pair = family
    _, off, pos_off = _run(pair, [images[0], images[1]], mode="off")
    toks, emb, pos_emb = _run(pair, [images[0], images[1]], mode="embed", keep=0.5)
    assert len(toks) == N_TOK
    n_in = _n_in(fam, 2)
    assert emb.vision_tokens_in == off.vision_tokens_in == n_in
    assert emb.vision_tokens_kept == _n_kept(fam, 2, 0.5) == math.ceil(0.5 * n_in)
    assert off.kv_cells - emb.kv_cells == n_in - emb.vision_tokens_kept
    assert emb.kv_bytes < off.kv_bytes
    # positions kept: the images still span their full extent, the text after them too
    assert pos_emb == pos_off


def test_positions_keep_needs_the_gaps_patch(family, images, monkeypatch):
    """Merged rows at their original 1-D positions leave gaps in the sequence: decoding
    them works with patch 0001's llama_set_position_gaps, and is refused by llama.cpp
    without it (so the gaps are really there)."""
    from lightkv_edge.errors import ModelError
    fam, pair = family
    toks, st, _ = _run(pair, [images[0]], mode="embed", keep=0.5, positions="keep")
    assert len(toks) == N_TOK and st.vision_tokens_kept == _n_kept(fam, 1, 0.5)
    monkeypatch.setattr("lightkv_edge.engine._set_position_gaps", lambda ctx, on: None)
    with pytest.raises(ModelError, match="decode"):
        _run(pair, [images[0]], mode="embed", keep=0.5, positions="keep")


def test_positions_renumber(family, images, monkeypatch):
    fam, pair = family
    _, off, pos_off = _run(pair, [images[0], images[1]], mode="off")
    # renumbered rows are contiguous: no gaps switch needed
    monkeypatch.setattr("lightkv_edge.engine._set_position_gaps", lambda ctx, on: None)
    toks, emb, pos_emb = _run(pair, [images[0], images[1]], mode="embed", keep=0.5,
                              positions="renumber")
    assert len(toks) == N_TOK
    dropped = emb.vision_tokens_in - emb.vision_tokens_kept
    assert dropped == _n_in(fam, 2) - _n_kept(fam, 2, 0.5) > 0
    assert pos_emb == pos_off - dropped
    assert off.kv_cells - emb.kv_cells == dropped


def test_merge_gets_no_fake_grid(family, images, monkeypatch):
    """For normal-RoPE models libmtmd reports an image's tokens as nx = n, ny = 1, which is
    no layout: the merge must not get a 1 x n strip as its grid (it would clamp the windows
    to one); it squares the rows instead, like the published code."""
    fam, pair = family
    seen = []
    real = embed_mode.reduce_image

    def spy(embd, grid, text_embd, **kw):
        seen.append((len(embd), grid))
        return real(embd, grid, text_embd, **kw)
    monkeypatch.setattr("lightkv_edge.engine.reduce_image", spy)
    _run(pair, [images[0]], mode="embed", keep=0.5)
    assert len(seen) == FAMILIES[fam]["chunks"][0]
    for n, grid in seen:
        assert n == FAMILIES[fam]["per_chunk"]
        assert grid is None or (min(grid) > 1 and grid[0] * grid[1] == n), grid


def test_layer_mode_refuses_gemma3_in_one_line(converted, images):
    """Gemma 3 (non-causal image rows, a graph our layer patches do not cover): `chat
    --mode layer` is refused before any compute with one line and exit code 2."""
    text, mmproj = converted["gemma3"]
    r = subprocess.run([sys.executable, "-m", "lightkv_edge", "chat", str(images[0]),
                        "-p", PROMPT, "--model", str(text), "--mmproj", str(mmproj),
                        "--mode", "layer"], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "layer mode" in lines[0] and "architecture" in lines[0]
    assert "Traceback" not in r.stderr


def test_kv_eviction(family, images):
    """KV eviction (docs/eviction.md) on the llama graph with several image chunks a turn
    (idefics3: each chunk is an image and keeps its share); Gemma 3's graph is not covered
    by the patches (and its images attend both ways): refused before any compute."""
    from lightkv_edge.errors import InputError
    fam, pair = family
    if fam == "gemma3":
        with pytest.raises(InputError, match="does not cover") as e:
            _chat(pair, mode="off", evict=0.5)
        assert e.value.param == "evict"
        return
    toks, st, _ = _run(pair, [images[0], images[1]], mode="off", evict=0.5, decode_evict=2)
    assert len(toks) == N_TOK
    n_in = _n_in(fam, 2)
    assert st.evict_vision_before == n_in
    assert st.evict_vision_after == sum(FAMILIES[fam]["chunks"]) * 8   # 8 of 16 a chunk
    assert st.evict_decode_freed > 0
    assert st.evict_kv_bytes_after < st.evict_kv_bytes_before
