"""The vision-language model families lightkv-edge covers, known by their mmproj's
`clip.projector_type`, and the chat modes each runs in.

`off` is stock libmtmd and runs whatever libmtmd runs. `embed` and `layer` reduce the
image rows libmtmd produces: they are offered only where we have checked what those rows
are (one chunk per image or sub-image, their positions and, for M-RoPE, their grid) on
a tiny checkpoint of the family (scripts/make_tiny_models.py, tests/test_families.py).
Layer mode also needs a text graph that patch 0003 covers (llama, qwen2, qwen2vl; Gemma
3's is not), which lightkv_edge.layer_mode checks on the text model itself.
"""
from __future__ import annotations

from .errors import InputError

# projector type -> (family, modes)
FAMILIES = {
    "mlp": ("LLaVA-1.5 / LLaVA-1.6", ("off", "embed", "layer")),
    "idefics3": ("SmolVLM / Idefics3", ("off", "embed", "layer")),
    "qwen2vl_merger": ("Qwen2-VL", ("off", "embed", "layer")),
    "qwen2.5vl_merger": ("Qwen2.5-VL", ("off", "embed", "layer")),
    "gemma3": ("Gemma 3", ("off", "embed")),
}


def check_mode(projector: str | None, mode: str, mmproj) -> None:
    """InputError (param 'mode') when `mode` is not covered for this projector."""
    if mode == "off":
        return
    if not projector:
        raise InputError(f"mode {mode} needs to know the model family, but {mmproj} has no "
                         "clip.projector_type (use mode off)", param="mode")
    if projector not in FAMILIES:
        covered = ", ".join(f"{p} ({f})" for p, (f, _) in FAMILIES.items())
        raise InputError(f"mode {mode} does not cover the projector type {projector!r} of "
                         f"{mmproj} (covered: {covered}); use mode off", param="mode")
    family, modes = FAMILIES[projector]
    if mode not in modes:
        raise InputError(f"mode {mode} does not cover {family} (its modes: "
                         f"{', '.join(modes)})", param="mode")
