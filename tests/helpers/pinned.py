"""The pinned llama.cpp tree, for tests that run its converter."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def llama_cpp_dir() -> Path:
    """The verified, patched tree (native/llama_source.py --print-dir); a missing tree
    fails the test with the reason, it never skips."""
    r = subprocess.run([sys.executable, str(ROOT / "native" / "llama_source.py"), "--print-dir"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail("the pinned llama.cpp source is unavailable (native/llama_source.py "
                    f"--print-dir): {r.stderr.strip()[-300:]}")
    return Path(r.stdout.strip().splitlines()[-1])
