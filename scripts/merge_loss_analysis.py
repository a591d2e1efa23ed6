"""Why the published guided merge loses at low keeps: what happens to the asked object.

For held-out shapes questions (default: validation split) this runs the shipped embedded
model once per question to capture the image rows and the prompt's first-layer guidance
(exactly what embed mode's merge sees), then, for each method at each keep, looks at the
image token that holds most of each asked object (the target object; for "how many X
shapes" every X object; "is there ..." with answer no has none):

  gone   the token is not a kept row's own token (it was merged away, or pruned);
  coeff  its coefficient in the row it ended in (1 = intact, 0 = dropped), mean;
  blur   the token ended in a row where it weighs less than one half, fraction.

    .venv/bin/python scripts/merge_loss_analysis.py --n 300 --split val --json out.json
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def asked_objects(s) -> list[int]:
    if s.qtype == "count":
        colour = s.question.split()[2]
        return [i for i, o in enumerate(s.objects) if o.colour == colour]
    return [] if s.target is None else [s.target]


def main_tokens(s, grid) -> list[int]:
    """Index of the grid token holding most pixels of each asked object."""
    from lightkv_edge.tasks import shapes
    omap = shapes.object_map(s.objects)
    rows, cols = grid
    ph, pw = omap.shape[0] // rows, omap.shape[1] // cols
    out = []
    for i in asked_objects(s):
        cnt = (omap == i).reshape(rows, ph, cols, pw).sum(axis=(1, 3)).flatten()
        out.append(int(np.argmax(cnt)))
    return out


def capture(split: str, n: int, seed: int, threads: int | None):
    """[(sample, embd [N, D], grid, guidance [N])] through the real engine."""
    from lightkv_edge import embed_mode, engine
    from lightkv_edge.engine import VisionChat
    from lightkv_edge.images import image_from_pil
    from lightkv_edge.tasks import shapes

    samples = shapes.dataset(split, n, seed=seed)
    got = []
    real = engine.reduce_image

    def spy(embd, grid, text_embd, **kw):
        g = embed_mode.prompt_guidance(np.ascontiguousarray(embd, np.float32), text_embd,
                                       kw["layer"])
        got.append((np.array(embd, np.float32), tuple(grid), np.asarray(g, np.float64)))
        return real(embd, grid, text_embd, **kw)

    engine.reduce_image = spy
    # keep 1.0 skips the merge step altogether; 0.999 still keeps all 64 (ceil) and runs it
    chat = VisionChat(mode="embed", keep=0.999, method="lightkv-paper", max_tokens=1,
                      n_threads=threads)
    try:
        for s in samples:
            chat.reset()
            chat.ask(s.question, [image_from_pil(s.image, "sample")], max_tokens=1)
    finally:
        chat.close()
        engine.reduce_image = real
    return [(s, *c) for s, c in zip(samples, got)]


def reducers():
    from lightkv_edge.reference import variants as V
    from lightkv_edge import reference as ref

    def fastv(x, g, keep, grid):
        return ref.fastv_topk(x, g, n_keep=V.budget_of(keep, len(x)))
    return {
        "lightkv": lambda x, g, k, grid: V.protected_reduce(x, g, keep=k, grid=grid),
        "unguided": lambda x, g, k, grid: V.protected_reduce(x, None, keep=k, grid=grid),
        "fastv": fastv,
        "protect-k-0.5": lambda x, g, k, grid: V.protected_reduce(x, g, keep=k, grid=grid,
                                                                  protect=0.5),
        "protect": lambda x, g, k, grid: V.protected_reduce(x, g, keep=k, grid=grid,
                                                            protect=1.0, mode="receive"),
        "absorb": lambda x, g, k, grid: V.absorb_reduce(x, g, keep=k, grid=grid),
    }


def analyse(data, keeps, methods) -> list[dict]:
    red = reducers()
    rows = []
    for name in methods:
        for keep in keeps:
            gone = coeff = blur = 0.0
            cnt = 0
            src_slot = 0
            for s, x, grid, g in data:
                toks = main_tokens(s, grid)
                if not toks:
                    continue
                r = red[name](x, g, keep, grid)
                kept = set(np.asarray(r.kept).tolist())
                for t in toks:
                    cnt += 1
                    a, w = int(r.assign[t]), float(r.weight[t])
                    gone += t not in kept
                    coeff += w if a >= 0 else 0.0
                    blur += a >= 0 and w < 0.5
                    src_slot += t % 2 == 0
            rows.append({"method": name, "keep": keep, "tokens": cnt,
                         "gone": gone / cnt, "coeff": coeff / cnt, "blur": blur / cnt,
                         "at_source_slot": src_slot / cnt})
            print(f"{name:9s} keep {keep:.2f}  asked tokens {cnt}  gone {gone / cnt:.3f}  "
                  f"mean coeff {coeff / cnt:.3f}  blurred {blur / cnt:.3f}  "
                  f"at a source slot {src_slot / cnt:.3f}", flush=True)
    return rows


def guidance_rank(data) -> dict:
    """Where the asked objects' main tokens rank by guidance (0 = highest)."""
    ranks = []
    for s, x, grid, g in data:
        order = np.argsort(-g, kind="stable")
        pos = np.empty(len(g), int)
        pos[order] = np.arange(len(g))
        ranks += [int(pos[t]) for t in main_tokens(s, grid)]
    ranks = np.array(ranks)
    return {"tokens": len(ranks), "median_rank": float(np.median(ranks)),
            **{f"in_top_{k}": float(np.mean(ranks < k)) for k in (7, 16, 23, 36)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="val")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--keeps", default="0.75,0.55,0.35,0.25,0.1")
    ap.add_argument("--methods", default="lightkv,unguided,fastv,protect-k-0.5,protect,absorb")
    ap.add_argument("--json")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    data = capture(a.split, a.n, a.seed, a.threads)
    rank = guidance_rank(data)
    print("guidance rank of the asked objects' main tokens:", rank)
    rows = analyse(data, [float(k) for k in a.keeps.split(",")], a.methods.split(","))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"split": a.split, "n": a.n, "seed": a.seed, "rank": rank,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
