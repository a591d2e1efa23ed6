"""The embedded default model shipped in lightkv_edge/models/: no download needed."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelError

MODELS_DIR = Path(__file__).resolve().parent / "models"


def embedded_model() -> tuple[Path, Path]:
    """(text model GGUF, mmproj GGUF) of the shipped tiny shapes VLM."""
    ggufs = sorted(MODELS_DIR.glob("*.gguf"))
    mmproj = [p for p in ggufs if "mmproj" in p.name.lower()]
    text = [p for p in ggufs if "mmproj" not in p.name.lower()]
    if len(mmproj) != 1 or len(text) != 1:
        raise ModelError(f"the embedded model is missing from {MODELS_DIR} "
                         "(reinstall lightkv-edge, or pass --model and --mmproj)")
    return text[0], mmproj[0]


def embedded_image_size() -> tuple[int, int] | None:
    """The (width, height) the embedded model was trained on: it only knows that grid."""
    try:
        card = json.loads((MODELS_DIR / "model_card.json").read_text())
        return tuple(card["image"]["size"])
    except (OSError, KeyError, ValueError, TypeError):
        return None
