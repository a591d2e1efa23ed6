"""`off` mode is the control of every comparison: it must answer exactly as llama.cpp's
own llama-mtmd-cli does, built from the same pinned tree (native/build_llama.py --tool,
cached beside the libraries; the first build takes a few minutes)."""
from __future__ import annotations

import pytest

from lightkv_edge.embedded import embedded_model
from tests.helpers.stock_cli import build_mtmd_cli, stock_answer

N_TOKENS = 6


@pytest.fixture(scope="module")
def mtmd_cli():
    return build_mtmd_cli()


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
            stock = stock_answer(mtmd_cli, model, mmproj, path, s.question, N_TOKENS,
                                 ours.encode())
            assert ours.encode() == stock, s.question
