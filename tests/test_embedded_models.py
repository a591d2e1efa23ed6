"""The two embedded models, addressed by name (lightkv_edge.embedded).

What is checked: each name gives its own GGUF pair and card; both pairs load through
VisionChat (off mode, the stock libmtmd path), make the image-token count their grid says
(64 for the 8x8, 256 for the 16x16) and answer held-out test-split questions; the 8x8 stays
the default; an unknown name is a ModelError that names the choices.
"""
from __future__ import annotations

import pytest

import lightkv_edge
from lightkv_edge.embedded import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    embedded_image_size,
    embedded_model,
    embedded_model_card,
)
from lightkv_edge.errors import ModelError
from lightkv_edge.tasks import shapes as S

GRID = {"shapes-8x8": 8, "shapes-16x16": 16}
N_SAMPLES = 20
# the card reports >= 0.95 test accuracy (n = 1000) for both models: 18 of 20 leaves room
# for the two misses such a model makes in 20 at worst-case luck, and still fails a model
# that answers at the question prior (0.25-0.5)
MIN_CORRECT = 18


def _first_word(text: str) -> str:
    words = text.strip().lower().split()
    return words[0].strip(".,") if words else ""


def test_names_and_default():
    assert EMBEDDED_MODELS == ("shapes-8x8", "shapes-16x16")
    assert DEFAULT_MODEL == "shapes-8x8"
    assert embedded_model() == embedded_model("shapes-8x8")
    assert embedded_image_size() == embedded_image_size("shapes-8x8") == (128, 128)
    pairs = [embedded_model(n) for n in EMBEDDED_MODELS]
    assert len({p for pair in pairs for p in pair}) == 4  # four different files
    assert "16" in pairs[1][0].name and "16" in pairs[1][1].name  # the file names say the grid
    for n in EMBEDDED_MODELS:
        card = embedded_model_card(n)
        g = GRID[n]
        assert card["image"]["grid_tokens"] == [g, g]
        assert card["image"]["image_tokens"] == g * g
        assert embedded_image_size(n) == (128, 128)


@pytest.mark.parametrize("bad", ["shapes-32x32", "", "SHAPES-8X8", "shapes-vlm"])
def test_unknown_name_is_a_model_error(bad):
    for fn in (embedded_model, embedded_image_size, embedded_model_card):
        with pytest.raises(ModelError) as e:
            fn(bad)
        msg = str(e.value)
        assert "\n" not in msg
        assert all(n in msg for n in EMBEDDED_MODELS), msg


@pytest.mark.parametrize("name", EMBEDDED_MODELS)
def test_answers_held_out_questions(name):
    text, mmproj = embedded_model(name)
    g = GRID[name]
    samples = S.dataset("test", N_SAMPLES, seed=0)
    assert all(s.image.size == embedded_image_size(name) for s in samples)
    correct, tokens = 0, set()
    with lightkv_edge.VisionChat(model=str(text), mmproj=str(mmproj), mode="off",
                                 max_tokens=4, n_threads=1) as chat:
        for s in samples:
            chat.reset()
            answer = chat.ask(s.question, [s.image])
            tokens.add(chat.last_stats.vision_tokens_in)
            correct += _first_word(answer) == s.answer
    assert tokens == {g * g}, tokens
    assert correct >= MIN_CORRECT, f"{name}: {correct}/{N_SAMPLES} correct"
