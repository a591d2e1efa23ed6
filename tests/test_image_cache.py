"""The image cache (VisionChat(image_cache=N), chat --image-cache N): a picture asked about
again skips the vision encoder, and nothing else changes.

What is checked, on the embedded model: the encoder runs once for a picture asked about
twice (after a reset), in every mode, and the answers equal a chat without the cache; the
cache holds the last N pictures (least recently used leaves first); 0 turns it off; the
same picture twice in one turn is two entries (libmtmd gives both chunks one id); a model
whose pictures become several slices (Idefics3) caches every slice under its own key; bad
values are one line.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from lightkv_edge import model as model_mod
from lightkv_edge import mtmd
from lightkv_edge.errors import InputError
from lightkv_edge.images import load_image
from tests.helpers.images import two_images
from tests.helpers.tiny_vlms import tiny_model


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    a, b = two_images(tmp_path_factory.mktemp("img"), (96, 64))
    return load_image(a), load_image(b)


@pytest.fixture
def encoder_runs(monkeypatch):
    """How many times libmtmd's encoder ran (every mode encodes through VisionModel.encode)."""
    runs = []
    real = mtmd.encode_chunk

    def counted(mctx, chunk):
        runs.append(chunk)
        return real(mctx, chunk)

    monkeypatch.setattr(model_mod.mtmd, "encode_chunk", counted)
    return runs


def _chat(**kw):
    from lightkv_edge.engine import VisionChat
    return VisionChat(n_threads=2, max_tokens=6, **kw)


def _ask_twice(chat, prompt, images):
    first = chat.ask(prompt, images)
    s1 = chat.last_stats
    chat.reset()
    second = chat.ask(prompt, images)
    return first, s1, second, chat.last_stats


@pytest.mark.parametrize("mode", ["off", "embed", "layer"])
def test_a_picture_asked_about_again_skips_the_encoder_and_answers_the_same(
        mode, pictures, encoder_runs):
    a, _ = pictures
    kw = dict(mode=mode, keep=0.6) if mode == "layer" else dict(mode=mode)
    with _chat(image_cache=0, **kw) as plain:
        want = plain.ask("What is in the picture?", [a])
    assert len(encoder_runs) == 1
    with _chat(**kw) as chat:
        first, s1, second, s2 = _ask_twice(chat, "What is in the picture?", [a])
    assert len(encoder_runs) == 2            # one more run, for the first ask only
    assert first == second == want and want  # the same answer, and not an empty one
    assert (s1.images_cached, s2.images_cached) == (0, 1)
    assert s2.t_encode_ms == 0.0 < s1.t_encode_ms
    assert s2.vision_tokens_in == s1.vision_tokens_in > 0


def test_zero_turns_the_cache_off(pictures, encoder_runs):
    a, _ = pictures
    with _chat(mode="off", image_cache=0) as chat:
        _, _, _, s2 = _ask_twice(chat, "Describe it.", [a])
    assert len(encoder_runs) == 2 and s2.images_cached == 0


@pytest.mark.parametrize("size, runs", [(1, 3), (2, 2)])
def test_the_cache_keeps_the_last_n_pictures(size, runs, pictures, encoder_runs):
    a, b = pictures
    with _chat(mode="off", image_cache=size) as chat:
        for im in (a, b, a):     # with room for one, b pushes a out
            chat.reset()
            chat.ask("Describe it.", [im])
    assert len(encoder_runs) == runs


def test_the_same_picture_twice_in_one_turn_is_two_entries(pictures, encoder_runs):
    a, _ = pictures
    prompt = "Compare these."
    with _chat(mode="off") as chat:
        first, s1, second, s2 = _ask_twice(chat, prompt, [a, a])
    assert len(encoder_runs) == 2          # both chunks of the first turn, none after
    assert (s1.images_cached, s2.images_cached) == (0, 2)
    assert first == second


def test_slices_of_one_picture_are_cached_apart(encoder_runs, tmp_path):
    """Idefics3 cuts a large picture into slices, each its own chunk with the picture's
    id: each slice is its own entry, so the second ask gets every slice back in order;
    the cache counts pictures, so room for one picture holds all its slices."""
    from PIL import Image as PILImage

    from lightkv_edge.engine import VisionChat
    m = tiny_model("idefics3")
    p = tmp_path / "wide.png"
    img = PILImage.new("RGB", (700, 300), (240, 240, 240))
    img.paste((200, 20, 20), (20, 20, 200, 200))
    img.paste((20, 20, 200), (450, 60, 680, 280))
    img.save(p)
    pic = load_image(p)
    with VisionChat(str(m.text), str(m.mmproj), mode="off", n_threads=2, max_tokens=6,
                    ignore_eos=True, image_cache=1) as chat, \
            VisionChat(str(m.text), str(m.mmproj), mode="off", n_threads=2, max_tokens=6,
                       ignore_eos=True, image_cache=0) as plain:
        chunks = chat._tokenize(chat.marker + "x", [pic])
        n_slices = sum(mtmd.chunk_get_type(c) == mtmd.CHUNK_IMAGE for c in chat._chunks(chunks))
        keys = sorted(mtmd.image_keys(list(chat._chunks(chunks))).values())
        mtmd.chunks_free(chunks)
        assert n_slices > 1, "the picture should have been cut into slices"
        assert len(set(keys)) == n_slices     # one key per slice
        want = plain.ask("What is here?", [pic])
        encoder_runs.clear()
        first, s1, second, s2 = _ask_twice(chat, "What is here?", [pic])
    assert len(encoder_runs) == n_slices
    assert s2.images_cached == n_slices
    assert first == second == want and len(want) > 0


def test_bad_values_are_one_line():
    with pytest.raises(InputError) as e:
        _chat(image_cache=-1)
    assert e.value.param == "image_cache"
    p = subprocess.run([sys.executable, "-m", "lightkv_edge", "chat", "x.png",
                        "--image-cache", "-1"], capture_output=True, text=True)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "--image-cache" in p.stderr
