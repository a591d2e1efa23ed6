"""The chat engine and CLI on a real GGUF vision model (the embedded one by default).

What is checked: off mode is the stock libmtmd path token for token; embed mode's own
image decoding (positions, M-RoPE layout, batches) is exact when nothing is merged; the KV
cache really shrinks with the kept fraction; several images, marker placement, multi-turn;
and every kind of bad input ends in one line and exit code 2.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightkv_edge import embed_mode
from tests.helpers.images import two_images
from lightkv_edge.embedded import embedded_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair():
    d = os.environ.get("LIGHTKV_TEST_VLM_DIR")
    if d:
        ggufs = sorted(Path(d).glob("*.gguf"))
        return ([p for p in ggufs if "mmproj" not in p.name][0],
                [p for p in ggufs if "mmproj" in p.name][0])
    return embedded_model()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return two_images(tmp_path_factory.mktemp("img"), (96, 64))


def _chat(pair, **kw):
    from lightkv_edge.engine import VisionChat
    kw.setdefault("max_tokens", 6)
    kw.setdefault("n_threads", 2)
    return VisionChat(str(pair[0]), str(pair[1]), **kw)


def _stock_greedy(pair, prompt_text, image_paths, n_tokens):
    """The stock path, written independently of our engine: libmtmd's own
    mtmd_helper_eval_chunks over the whole prompt, then argmax decoding, as
    llama-mtmd-cli does with greedy sampling."""
    from lightkv_edge import mtmd
    from lightkv_edge.images import load_image
    from lightkv_edge.model import VisionModel, llama_cpp

    eval_chunks = mtmd._fn("mtmd_helper_eval_chunks", ctypes.c_int32, ctypes.c_void_p,
                           ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32,
                           ctypes.c_int32, ctypes.c_bool, ctypes.POINTER(ctypes.c_int32))
    m = VisionModel(pair[0], pair[1], n_threads=2)
    try:
        marker = mtmd.default_marker().decode()
        content = marker * len(image_paths) + prompt_text
        text = m.apply_template([("user", content)], True)
        imgs = [load_image(p) for p in image_paths]
        bitmaps = [mtmd.bitmap_init(i.width, i.height, i.rgb) for i in imgs]
        chunks = mtmd.chunks_init()
        data = text.encode()
        it = mtmd.input_text(data, len(data), True, True)
        arr = (ctypes.c_void_p * len(bitmaps))(*bitmaps)
        assert mtmd.tokenize(m.mctx, chunks, ctypes.byref(it), arr, len(bitmaps)) == 0
        n_past = ctypes.c_int32(0)
        assert eval_chunks(m.mctx, m.ctx, chunks, 0, 0, m.n_batch, True,
                           ctypes.byref(n_past)) == 0
        out, pos = [], n_past.value
        n_vocab = llama_cpp.llama_vocab_n_tokens(m.vocab)
        tok = (llama_cpp.llama_token * 1)()
        for _ in range(n_tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(m.ctx, -1),
                                           shape=(n_vocab,))
            t = int(np.argmax(logits))
            if m.is_eog(t):
                break
            out.append(t)
            tok[0] = t
            b = llama_cpp.llama_batch_get_one(tok, 1)
            p = np.array([pos], dtype=np.int32)
            b.pos = p.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos))
            assert llama_cpp.llama_decode(m.ctx, b) == 0
            pos += 1
        for b in bitmaps:
            mtmd.bitmap_free(b)
        mtmd.chunks_free(chunks)
        return out
    finally:
        m.close()


def _tokens_of(chat, text):
    return chat.m.tokenize(text, parse_special=True)


class _Recorder:
    """Collects the token ids an engine generates."""

    def __init__(self, chat):
        self.tokens = []
        orig = chat._generate

        def gen(max_tokens, stats, answer):
            for t in orig(max_tokens, stats, answer):
                self.tokens.append(t)
                yield t
        chat._generate = gen


def test_off_mode_is_the_stock_path(pair, images):
    prompt = "What colour is the circle?"
    want = _stock_greedy(pair, prompt, [images[0]], 8)
    with _chat(pair, mode="off", max_tokens=8) as chat:
        rec = _Recorder(chat)
        chat.ask(prompt, [images[0]])
    assert len(want) >= 1, "the stock path generated nothing: equality would prove nothing"
    assert rec.tokens == want


def test_embed_decoding_without_merge_is_exact(pair, images, monkeypatch):
    """Route the image through embed mode's own batches and positions, with a merge that
    keeps every row: the generated tokens must be exactly off mode's."""
    def keep_all(embd, grid, text_embd, **kw):
        return embed_mode.MergedImage(embd, np.arange(len(embd)), len(embd), 0.0)
    prompt = "How many red shapes are there?"
    with _chat(pair, mode="off", max_tokens=8) as chat:
        rec_off = _Recorder(chat)
        chat.ask(prompt, [images[0], images[1]])
    monkeypatch.setattr("lightkv_edge.engine.reduce_image", keep_all)
    with _chat(pair, mode="embed", keep=0.5, max_tokens=8) as chat:
        rec_emb = _Recorder(chat)
        chat.ask(prompt, [images[0], images[1]])
        assert chat.last_stats.vision_tokens_kept == chat.last_stats.vision_tokens_in
    assert len(rec_off.tokens) >= 1, "off mode generated nothing: equality would prove nothing"
    assert rec_emb.tokens == rec_off.tokens


def test_kv_cache_shrinks_with_keep(pair, images):
    prompt = "Is there a blue square?"
    with _chat(pair, mode="off") as chat:
        chat.ask(prompt, [images[0]])
        off = chat.last_stats
    with _chat(pair, mode="embed", keep=0.5) as chat:
        chat.ask(prompt, [images[0]])
        emb = chat.last_stats
    n_in = off.vision_tokens_in
    assert emb.vision_tokens_in == n_in
    assert emb.vision_tokens_kept == int(np.ceil(0.5 * n_in))
    # the text is the same, so the cells saved are exactly the vision rows dropped
    assert off.kv_cells - emb.kv_cells == n_in - emb.vision_tokens_kept
    # and llama.cpp's own count of KV bytes falls in the same proportion: its state size
    # is a small fixed header plus the same bytes per cell (measured: per-cell averages of
    # the two runs 0.04 % apart); 2 % leaves room for the header, while bytes that did not
    # follow the cells (e.g. freed cells still counted) would be off by the dropped share
    per_cell_off = off.kv_bytes / off.kv_cells
    per_cell_emb = emb.kv_bytes / emb.kv_cells
    assert abs(per_cell_off - per_cell_emb) / per_cell_off < 0.02
    assert emb.kv_bytes < off.kv_bytes


def test_several_images_and_marker_placement(pair, images):
    from lightkv_edge import mtmd
    marker = mtmd.default_marker().decode()
    with _chat(pair, mode="embed", keep=0.6) as chat:
        chat.ask("Describe both.", [images[0], images[1]])
        st = chat.last_stats
        assert st.vision_tokens_in > 0 and st.vision_tokens_kept < st.vision_tokens_in
    with _chat(pair, mode="embed", keep=0.6) as chat:
        # the image after the question, placed by the marker
        chat.ask(f"What colour is the circle? {marker}", [images[0]])
        assert chat.last_stats.vision_tokens_in > 0
    with _chat(pair, mode="off") as chat:
        with pytest.raises(ValueError, match="markers"):
            chat.ask(f"{marker} {marker} two markers", [images[0]])


def test_multi_turn_keeps_the_image(pair, images):
    with _chat(pair, mode="embed", keep=0.5) as chat:
        chat.ask("What colour is the circle?", [images[0]])
        first = chat.last_stats
        chat.ask("Is there a square?")
        second = chat.last_stats
        assert second.vision_tokens_in == 0
        assert second.kv_cells > first.kv_cells  # the image rows are still in the cache
        chat.reset()
        assert chat.n_cells == 0


def test_prompt_longer_than_context(pair, images):
    with _chat(pair, mode="off", ctx_size=64) as chat:
        with pytest.raises(ValueError, match="context"):
            chat.ask("word " * 200, [images[0]])


# -- the command line ---------------------------------------------------------------------
def _cli(*args, input=None, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "lightkv_edge", *map(str, args)],
                          capture_output=True, text=True, input=input, timeout=timeout,
                          env=env, cwd=REPO)


def _model_args(pair):
    return ["--model", pair[0], "--mmproj", pair[1], "-t", "2"]


def test_cli_answers_once_with_stats(pair, images):
    r = _cli("chat", images[0], "-p", "What colour is the circle?", "-n", "4", "--stats",
             *_model_args(pair))
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("vision_tokens_in", "vision_tokens_kept", "kv_bytes", "t_encode_ms",
                "t_merge_ms", "t_prefill_ms", "t_decode_ms", "n_decoded"):
        assert key in stats
    assert stats["vision_tokens_kept"] < stats["vision_tokens_in"]


def test_cli_json(pair, images):
    r = _cli("chat", images[0], "-p", "Is there a circle?", "-n", "3", "--json", "--mode",
             "off", *_model_args(pair))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert isinstance(out["answer"], str) and out["stats"]["mode"] == "off"


def test_cli_interactive(pair, images):
    script = f"What colour is the circle?\n/image {images[1]}\nAnd this one?\n/stats\n/quit\n"
    r = _cli("chat", images[0], "-n", "3", *_model_args(pair), input=script)
    assert r.returncode == 0, r.stderr
    assert "attached to your next message" in r.stderr
    assert '"vision_tokens_in"' in r.stderr  # /stats of the second turn


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_bad_inputs(pair, images, tmp_path):
    m = _model_args(pair)
    _one_line_error(_cli("chat", tmp_path / "missing.png", "-p", "hi", *m), "not found")
    _one_line_error(_cli("chat", tmp_path, "-p", "hi", *m), "directory")
    notimg = tmp_path / "notes.png"
    notimg.write_text("this is not a picture")
    _one_line_error(_cli("chat", notimg, "-p", "hi", *m), "not an image")
    broken = tmp_path / "broken.png"              # a real PNG, cut in half
    src = images[0].read_bytes()
    broken.write_bytes(src[: len(src) // 2])
    _one_line_error(_cli("chat", broken, "-p", "hi", *m), "cannot read image")
    huge = tmp_path / "huge.png"
    Image.new("1", (9000, 8000)).save(huge)     # 72 MP, a few kB on disk
    _one_line_error(_cli("chat", huge, "-p", "hi", *m), "too large")
    for keep in ("0", "1.5", "-0.2", "abc"):
        _one_line_error(_cli("chat", images[0], "-p", "hi", "--keep", keep, *m), "--keep")
    _one_line_error(_cli("chat", images[0], "-p", "   ", *m), "empty prompt")
    # a model without vision: no mmproj, or a text model given as the mmproj
    _one_line_error(_cli("chat", images[0], "-p", "hi", "--model", pair[0]), "--mmproj")
    _one_line_error(_cli("chat", images[0], "-p", "hi", "--model", pair[0],
                         "--mmproj", pair[0]), "not a vision projector")
    _one_line_error(_cli("chat", images[0], "-p", "hi", "--model", notimg,
                         "--mmproj", pair[1]), "not a GGUF")
    # llama.cpp rounds the context up to a multiple of 256: overflow that
    _one_line_error(_cli("chat", images[0], "-p", "word " * 300, "-c", "256", *m), "context")


def test_cli_mmproj_that_does_not_match(pair, images, tmp_path):
    from tests.helpers.tiny_llama import write_tiny_llama
    other = tmp_path / "other.gguf"
    write_tiny_llama(other, n_embd=64)   # the embedded model's LLM is wider
    _one_line_error(_cli("chat", images[0], "-p", "hi", "--model", other,
                         "--mmproj", pair[1]), "cannot use the mmproj", "mismatch")


def _default_sigint() -> None:
    """The child gets the default SIGINT disposition whatever this process inherited
    (conftest.sigint_raises_keyboard_interrupt says why), so its Python raises on Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_cli_ctrl_c_during_generation(pair, images):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "lightkv_edge", "chat", str(images[0]),
                          "-p", "Tell me everything.", "-n", "1000", "--ignore-eos",
                          *map(str, _model_args(pair))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO,
                         preexec_fn=_default_sigint)
    try:
        first = p.stdout.read(1)          # generation has started
        assert first
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130
    assert b"Traceback" not in err and b"interrupted" in err


def test_cli_hf_repo_from_the_local_cache(pair, images, tmp_path):
    """--hf-repo resolves a GGUF + mmproj pair from huggingface_hub's cache layout, offline
    (no request is made: HF_HUB_OFFLINE=1)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-vlm-GGUF"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for src, name in ((pair[0], "tiny-vlm-Q8_0.gguf"), (pair[1], "mmproj-tiny-vlm-f16.gguf")):
        blob = repo / "blobs" / f"blob-{name}"
        blob.write_bytes(Path(src).read_bytes())
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    r = subprocess.run([sys.executable, "-m", "lightkv_edge", "chat", str(images[0]), "-p",
                        "What colour is the circle?", "-n", "3", "--json", "-t", "2",
                        "--hf-repo", "someone/tiny-vlm-GGUF"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["vision_tokens_in"] > 0
    r = subprocess.run([sys.executable, "-m", "lightkv_edge", "chat", str(images[0]), "-p",
                        "hi", "--hf-repo", "someone/not-cached"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    _one_line_error(r, "cache")
