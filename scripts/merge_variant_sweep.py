"""Ablation sweep of the LightKV variants' settings through the real engine (embed mode).

Every configuration runs the shipped embedded model on the same held-out questions (the
validation split by default: settings are chosen there, never on test), at the same kept
count as the benchmark's methods. A configuration is a reference function with settings;
the engine's merge step is swapped for it for the duration of its rows (the guidance is
the engine's own first-layer guidance). Output: accuracy, correct, n and the 95 % Wilson
interval per (configuration, keep), printed and written as JSON.

    .venv/bin/python scripts/merge_variant_sweep.py --n 100 --configs protect-r-1.0,absorb-w1

`native-protect-F` is the shipped native merge (`embed_mode.merge_image(protect=F)`,
lightkv-protect with another fraction F of the budget protected): fast enough for the
16x16 model (`--model-name shapes-16x16`).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _native_protect(x, g, *, keep, grid, windows, protect, text_tokens, layer):
    from types import SimpleNamespace

    from lightkv_edge import embed_mode
    m = embed_mode.merge_image(x, grid, text_tokens, keep=keep, windows=windows,
                               layer=layer, protect=protect)
    return SimpleNamespace(x=m.embd, kept=m.kept)    # the fields the sweep reads


def configs() -> dict:
    from lightkv_edge.reference import variants as V
    out = {"paper": (V.protected_reduce, {})}
    for f in (0.25, 0.5, 0.75, 1.0):
        out[f"protect-k-{f}"] = (V.protected_reduce, {"protect": f, "mode": "keep"})
        out[f"protect-r-{f}"] = (V.protected_reduce, {"protect": f, "mode": "receive"})
    out["gorder"] = (V.protected_reduce, {"order": "guidance"})
    out["gorder-protect-r-0.5"] = (V.protected_reduce, {"order": "guidance", "protect": 0.5,
                                                        "mode": "receive"})
    for w in (1, 2, 4):
        out[f"absorb-w{w}"] = (V.absorb_reduce, {"windows": w})
        for t in (0.5, 0.8, 0.9):
            out[f"absorb-w{w}-t{t}"] = (V.absorb_reduce, {"windows": w, "threshold": t})
    for f in (0.25, 0.5, 0.75, 1.0):
        out[f"native-protect-{f}"] = (_native_protect, {"protect": f})
    for w in (2, 4):
        out[f"protect-r-1.0-w{w}"] = (V.protected_reduce, {"protect": 1.0, "mode": "receive",
                                                           "windows": w})
        out[f"protect-k-0.5-w{w}"] = (V.protected_reduce, {"protect": 0.5, "mode": "keep",
                                                           "windows": w})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="val")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--keeps", default="0.75,0.55,0.35,0.25,0.1")
    ap.add_argument("--configs", required=True, help="comma-separated, or 'list'")
    ap.add_argument("--model-name", default=None, help="embedded model (default shapes-8x8)")
    ap.add_argument("--json")
    a = ap.parse_args()
    table = configs()
    if a.configs == "list":
        print("\n".join(table))
        return 0
    names = a.configs.split(",")
    for n in names:
        if n not in table:
            raise SystemExit(f"unknown configuration {n!r} (--configs list)")

    import torch
    torch.set_num_threads(1)
    from lightkv_edge import embed_mode, engine
    from lightkv_edge.bench import evaluate
    from lightkv_edge.engine import VisionChat
    from lightkv_edge.images import image_from_pil
    from lightkv_edge.tasks import shapes

    samples = shapes.dataset(a.split, a.n, seed=a.seed)
    image_of = (lambda s: image_from_pil(s.image, "sample"))
    real = engine.reduce_image
    results = []
    try:
        for name in names:
            fn, settings = table[name]
            for keep in [float(k) for k in a.keeps.split(",")]:
                def reduce(embd, grid, text_embd, *, keep, windows, method, layer, seed,
                           fn=fn, settings=settings):
                    t0 = time.perf_counter()
                    x = np.ascontiguousarray(embd, dtype=np.float32)
                    kw = {"windows": windows, **settings}
                    if fn is _native_protect:   # the guidance is computed inside
                        g = None
                        kw.update(text_tokens=text_embd, layer=layer)
                    else:
                        g = embed_mode.prompt_guidance(x, text_embd, layer)
                    res = fn(x, g, keep=keep, grid=grid, **kw)
                    return embed_mode.MergedImage(np.asarray(res.x, np.float32),
                                                  np.asarray(res.kept), len(x),
                                                  (time.perf_counter() - t0) * 1e3)
                engine.reduce_image = reduce
                t0 = time.perf_counter()
                chat = VisionChat(mode="embed", keep=keep, method="lightkv-paper", max_tokens=4,
                                  n_threads=a.threads, model_name=a.model_name)
                try:
                    r = evaluate(chat, samples, image_of)
                finally:
                    chat.close()
                r = {"config": name, "keep": keep, "settings": {k: v for k, v in
                                                                 settings.items()}, **r}
                results.append(r)
                print(f"{name:22s} keep {keep:.2f}  acc {r['accuracy']:.3f} "
                      f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]  "
                      + " ".join(f"{t} {v:.2f}" for t, v in r["per_type"].items())
                      + f"  kept {r['vision_tokens_kept']:.1f}"
                      f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
                if a.json:
                    with open(a.json, "w") as f:
                        json.dump({"split": a.split, "n": a.n, "seed": a.seed,
                                   "model_name": a.model_name or "shapes-8x8",
                                   "results": results}, f, indent=1)
    finally:
        engine.reduce_image = real
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
