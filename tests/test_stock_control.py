"""`off` mode is the control of every comparison: it must answer exactly as llama.cpp's
own llama-mtmd-cli does, built from the same pinned tree (native/build_llama.py --tool,
cached beside the libraries; the first build takes a few minutes)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightkv_edge.embedded import embedded_model

REPO = Path(__file__).resolve().parents[1]
N_TOKENS = 6


@pytest.fixture(scope="module")
def mtmd_cli():
    r = subprocess.run([sys.executable, str(REPO / "native" / "build_llama.py"),
                        "--tool", "llama-mtmd-cli"], capture_output=True, text=True)
    assert r.returncode == 0, f"llama-mtmd-cli could not be built: {r.stderr[-400:]}"
    return r.stdout.strip().splitlines()[-1]


def _stock_answer(exe, model, mmproj, image, question) -> str:
    # greedy (--temp 0), and the same CPU weight layout as ours (--no-repack: we load
    # with use_extra_bufts off), so the two runs do the same arithmetic
    # Once, in a full CI-like run, the stock binary printed nothing with exit code 0 for
    # one question that it answers "yes" in every rerun (15 of 15): a glitch of the
    # control, not of ours. An empty stock answer is asked for once more; a second empty
    # one fails the comparison as before.
    for _ in range(2):
        r = subprocess.run([exe, "-m", str(model), "--mmproj", str(mmproj), "--image",
                            str(image), "-p", question, "--temp", "0", "-n", str(N_TOKENS),
                            "-t", "2", "--no-warmup", "--no-repack"],
                           capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr[-400:]
        if r.stdout.strip():
            break
    return r.stdout.strip()


def test_off_mode_answers_like_llama_mtmd_cli(mtmd_cli, tmp_path):
    from lightkv_edge.engine import VisionChat
    from lightkv_edge.tasks import shapes

    model, mmproj = embedded_model()
    samples = shapes.dataset("test", 12, seed=21)
    with VisionChat(str(model), str(mmproj), mode="off", max_tokens=N_TOKENS,
                    n_threads=2) as chat:
        for i, s in enumerate(samples):
            path = tmp_path / f"{i}.png"
            s.image.save(path)
            chat.reset()
            ours = chat.ask(s.question, [path]).strip()
            assert ours, f"no answer to {s.question!r}: equality would prove nothing"
            assert ours == _stock_answer(mtmd_cli, model, mmproj, path, s.question), s.question
