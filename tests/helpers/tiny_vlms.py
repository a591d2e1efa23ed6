"""The tests' door to scripts/make_tiny_models.py (the one home of the tiny checkpoints of
every family): its builders, and `tiny_model(family)`, which builds or reuses the cached
checkpoint + f32 GGUFs and FAILS the test with the reason when that is impossible (a test
never skips for a missing converter or tree)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import make_tiny_models as _m  # noqa: E402

FAMILIES = _m.FAMILIES
build_gemma3, build_idefics3 = _m.build_gemma3, _m.build_idefics3
build_qwen2vl, build_qwen25vl = _m.build_qwen2vl, _m.build_qwen25vl
build_llava15, build_llava16 = _m.build_llava15, _m.build_llava16


def tiny_model(family: str) -> "_m.TinyModel":
    try:
        return _m.tiny_model(family)
    except Exception as e:  # noqa: BLE001 - any reason fails the test, in one line
        pytest.fail(f"the tiny {family} model could not be built: {type(e).__name__}: {e}",
                    pytrace=False)
