"""Test-suite configuration.

In CI (CI=true) hypothesis draws the same examples every run (derandomize), so a red CI
means a change broke something, not that a new random draw came up; on a developer's
machine it keeps exploring new examples.

`liblightkv`: the fixture every native test module uses (pytestmark); it fails, never skips,
when the library does not load.
"""
import os
import signal

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def sigint_raises_keyboard_interrupt():
    """Python's own Ctrl-C handler in every test. A suite started in the background of a
    non-interactive shell inherits SIGINT ignored (POSIX), and Python then keeps it ignored:
    the Ctrl-C tests would see every signal swallowed (seen: 4 failures and a timeout)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.fixture(scope="session")
def liblightkv():
    """liblightkv loaded, with the names of its ggml devices. A build that does not load
    FAILS every test that needs it (never a skip: a broken build must not turn the parity
    suites into skips that leave CI green)."""
    try:
        from lightkv_edge import native
        return native.backends()
    except Exception as e:  # noqa: BLE001 - any reason is a failure, reported in one line
        pytest.fail(f"liblightkv does not load ({type(e).__name__}: {e}); run `make setup`",
                    pytrace=False)


@pytest.fixture(scope="session")
def embedded_f32_pair(tmp_path_factory):
    """The shipped HF checkpoint of the embedded model converted to f32 GGUFs (text,
    mmproj) by scripts/convert.py, once per test session: the tight parity tests need
    weights without quantization error."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    hf = root / "lightkv_edge" / "models" / "hf"
    if not (hf / "model.safetensors").is_file():
        pytest.fail(f"{hf} has no model.safetensors (the shipped HF checkpoint)")
    out = tmp_path_factory.mktemp("embedded-f32")
    r = subprocess.run([sys.executable, str(root / "scripts" / "convert.py"), str(hf),
                        "--outdir", str(out), "--name", "shapes", "--outtype", "f32"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"conversion failed: {r.stderr.strip()}")
    return out / "shapes-f32.gguf", out / "shapes-mmproj-f32.gguf"
