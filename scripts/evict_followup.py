#!/usr/bin/env python3
"""Does an evicted cache still answer a *later* question? (docs/eviction.md)

A single-turn benchmark cannot see eviction after the prefill: the first answer token is
sampled from logits computed before anything is freed, and the shapes task answers in one
word. So here, per held-out sample: turn 1 asks an unrelated "is there a C S?" question
with the image (its window guides the eviction), turn 2 asks the sample's own question
without the image, on the cache that is left. Accuracy of both turns, with 95 % Wilson
intervals, for off and for --evict at several keeps (and one --decode-evict row).

    python scripts/evict_followup.py [--n 400] [--seed 0] [-t 1] [--adaptive]

--adaptive: the --evict rows with --evict-adaptive instead (no --decode-evict row, which it
does not take); the rows then also give the layer-averaged visible fraction.

Prints one JSON line per row; asserts nothing; times nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightkv_edge.bench import _first_word, wilson  # noqa: E402
from lightkv_edge.engine import VisionChat  # noqa: E402
from lightkv_edge.tasks import shapes as S  # noqa: E402

ROWS = ((None, None), (0.5, None), (0.25, None), (0.1, None), (0.5, 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--adaptive", action="store_true")
    ap.add_argument("--keeps", default=None,
                    help="comma-separated keeps of the evict rows (default: 0.5,0.25,0.1)")
    args = ap.parse_args()
    rows = ROWS
    if args.keeps:
        rows = [(None, None)] + [(float(k), None) for k in args.keeps.split(",")]
    if args.adaptive:
        rows = [(k, e) for k, e in rows if e is None]
    samples = S.dataset("test", args.n, seed=args.seed)
    rng = np.random.default_rng(args.seed + 1)
    firsts = []
    for s in samples:
        c = S.COLOUR_NAMES[int(rng.integers(len(S.COLOUR_NAMES)))]
        sh = S.SHAPES[int(rng.integers(len(S.SHAPES)))]
        present = any((o.colour, o.shape) == (c, sh) for o in s.objects)
        firsts.append((f"is there a {c} {sh}?", "yes" if present else "no"))
    for evict, every in rows:
        adaptive = args.adaptive and evict is not None
        chat = VisionChat(mode="off", evict=evict, decode_evict=every, max_tokens=4,
                          n_threads=args.threads, evict_adaptive=adaptive)
        k1 = k2 = 0
        cells, visible = [], []
        try:
            for s, (q1, a1) in zip(samples, firsts):
                chat.reset()
                k1 += _first_word(chat.ask(q1, [s.image])) == a1
                st = chat.last_stats
                cells.append(st.evict_vision_after if evict else st.vision_tokens_kept)
                visible.append(st.evict_visible_fraction)
                k2 += _first_word(chat.ask(s.question)) == s.answer
        finally:
            chat.close()
        n = len(samples)
        print(json.dumps({"evict": evict, "decode_evict": every, "adaptive": adaptive,
                          "n": n, "turn1": k1 / n,
                          "turn1_ci95": wilson(k1, n), "turn2": k2 / n,
                          "turn2_ci95": wilson(k2, n),
                          "vision_cells_after_prefill": float(np.mean(cells)),
                          "visible_fraction": float(np.mean(visible))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
