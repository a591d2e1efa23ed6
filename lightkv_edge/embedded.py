"""The embedded models shipped in lightkv_edge/models/: no download needed.

Two tiny Qwen2-VL-family models trained on the shapes task (lightkv_edge.tasks.shapes), both
on 128x128 images, addressed by name:

    shapes-8x8     64 image tokens (patch 8, 2x2 merge); the default, the quick demo
    shapes-16x16   256 image tokens (patch 4, 2x2 merge); several LightKV windows per side

Each one has a model card (its ``files`` name the GGUF pair, ``image.size`` the only image
size it was trained on).
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelError

MODELS_DIR = Path(__file__).resolve().parent / "models"

EMBEDDED_MODELS = ("shapes-8x8", "shapes-16x16")
DEFAULT_MODEL = "shapes-8x8"
_CARDS = {"shapes-8x8": "model_card.json", "shapes-16x16": "model_card_16.json"}


def _check_name(name: str) -> str:
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"unknown embedded model {name!r} (choose one of "
                         f"{', '.join(EMBEDDED_MODELS)})", param="model_name")
    return name


def embedded_model_card(name: str = DEFAULT_MODEL) -> dict:
    """The model card (parsed JSON) of the embedded model ``name``."""
    path = MODELS_DIR / _CARDS[_check_name(name)]
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"the card of the embedded model {name} is unreadable: {path} "
                         f"({e.__class__.__name__}; reinstall lightkv-edge)") from None


def embedded_model(name: str = DEFAULT_MODEL) -> tuple[Path, Path]:
    """(text model GGUF, mmproj GGUF) of the embedded model ``name``."""
    card = embedded_model_card(name)
    try:
        text, mmproj = MODELS_DIR / card["files"]["model"], MODELS_DIR / card["files"]["mmproj"]
    except (KeyError, TypeError):
        raise ModelError(f"the card of the embedded model {name} names no files "
                         "(reinstall lightkv-edge)") from None
    for p in (text, mmproj):
        if not p.is_file():
            raise ModelError(f"the embedded model {name} is missing {p.name} from {MODELS_DIR} "
                             "(reinstall lightkv-edge, or pass --model and --mmproj)")
    return text, mmproj


def embedded_image_size(name: str = DEFAULT_MODEL) -> tuple[int, int] | None:
    """The (width, height) the embedded model ``name`` was trained on: it only knows that
    grid.  None when its card does not say."""
    try:
        return tuple(embedded_model_card(name)["image"]["size"])
    except ModelError:
        if name not in EMBEDDED_MODELS:
            raise
        return None
    except (KeyError, TypeError):
        return None
