"""llama.cpp's own llama-mtmd-cli, built from the pinned tree, as the control of `off` mode.

The stock CLI prints the answer through common_log, whose worker thread is never joined
at exit (the logger singleton is leaked on purpose, see common/log.cpp's
common_log_main), so the tail of the answer is sometimes lost: CI once saw b'\\xaa' where
the rerun and we printed b'\\xaah', and earlier 2 of 6 tokens, and once nothing at all.
A lost tail is a strict prefix of the full answer, so the comparison asks the CLI again
only for a strict prefix of ours; any other difference fails at once. How often depends
on the machine: on a fresh 2-core machine the tiny LLaVA model's run (about 10 ms from the
last log line to exit) printed nothing in 26 of 32 runs (measured 2026-12-02, 4 ways of
calling it), so the attempts are many; each costs tens of milliseconds.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ATTEMPTS = 40   # P(every attempt loses its tail) <= 0.82 ** 40 < 1e-3 at that rate


def build_mtmd_cli() -> str:
    """Path of llama-mtmd-cli from the pinned tree (cached beside our libraries)."""
    r = subprocess.run([sys.executable, str(REPO / "native" / "build_llama.py"),
                        "--tool", "llama-mtmd-cli"], capture_output=True, text=True)
    assert r.returncode == 0, f"llama-mtmd-cli could not be built: {r.stderr[-400:]}"
    return r.stdout.strip().splitlines()[-1]


def stock_answer(exe: str, model, mmproj, image, prompt: str, n_tokens: int, ours: bytes,
                 ignore_eos: bool = False) -> bytes:
    """The stock CLI's greedy answer (stripped raw bytes), rerun while it is a strict
    prefix of `ours` (its lost log tail). --no-repack: the same CPU weight layout as ours
    (we load with use_extra_bufts off), so both do the same arithmetic."""
    cmd = [exe, "-m", str(model), "--mmproj", str(mmproj), "--image", str(image),
           "-p", prompt, "--temp", "0", "-n", str(n_tokens), "-t", "2", "--no-warmup",
           "--no-repack"] + (["--ignore-eos"] if ignore_eos else [])
    ours = ours.strip()
    for _ in range(ATTEMPTS):
        r = subprocess.run(cmd, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr[-400:]
        got = r.stdout.strip()
        if not (len(got) < len(ours) and ours.startswith(got)):
            return got
    return got
