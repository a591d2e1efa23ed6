"""What the LightKV merge does on real photographs (issue 11): scikit-image's bundled sample
photos (and one flat synthetic image) through the embedded models' trained encoders.

The models only know coloured shapes, so their answers about photos mean nothing; what is
measured is the merge's input: for every vision token, the cosine similarity to its best
partner inside its window (the windows embed mode's first stage cuts), and how many tokens
an adaptive (similarity-threshold) budget would keep: the published merge run stage after
stage (ratio 0.5, windows then one window) with a threshold T, until no pair above T is left.
A flat image should collapse to a few rows, a busy one keep most of them.

    .venv/bin/python scripts/merge_on_photos.py --json docs/bench/merge-on-photos.json \
        --picture docs/bench/merge-on-photos-astronaut.png

scikit-image is a script/test dependency (requirements-dev.txt), not a runtime one.
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "brick", "grass")
THRESHOLDS = (0.8, 0.9, 0.95, 0.98, 0.99)
PROMPT = "what colour is the circle?"


def photo(name: str) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a scikit-image sample, or 'flat': a smooth grey gradient."""
    if name == "flat":
        yy, xx = np.mgrid[0:256, 0:256]
        v = 110 + 0.1 * xx + 0.05 * yy
        return np.stack([v, v, v + 10], axis=-1).astype(np.uint8)
    from skimage import data
    im = getattr(data, name)()
    if im.ndim == 2:
        im = np.stack([im] * 3, axis=-1)
    return np.ascontiguousarray(im[..., :3]).astype(np.uint8)


def best_partner_cosine(x: np.ndarray, win: np.ndarray) -> np.ndarray:
    """Per token: the highest cosine to another token of its window (-1 if alone)."""
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
    out = np.full(len(x), -1.0)
    for w in np.unique(win):
        idx = np.nonzero(win == w)[0]
        if len(idx) < 2:
            continue
        s = xn[idx] @ xn[idx].T
        np.fill_diagonal(s, -np.inf)
        out[idx] = s.max(axis=1)
    return out


def window_of(n_rows: int, n_cols: int, w: int) -> np.ndarray:
    """Window id of every token of the grid, cut as the native merge cuts (first parts longer)."""
    def cut(length):
        base, extra = divmod(length, w)
        return np.repeat(np.arange(w), [base + (p < extra) for p in range(w)])
    r, c = cut(n_rows), cut(n_cols)
    return (r[:, None] * w + c[None, :]).reshape(-1)


def adaptive_keep(x: np.ndarray, grid, windows: int, threshold: float) -> int:
    """Rows left after merging, stage by stage, every pair above `threshold` (the published
    merge with a threshold: at most half of a window per stage), until no stage merges."""
    from lightkv_edge import native
    rows, cols = grid
    kept = np.arange(len(x))
    w = windows
    while True:
        pos = np.stack([kept // cols, kept % cols], axis=1)
        res = native.lightkv_merge(x, None, windows=w, ratio=0.5, grid=grid, positions=pos,
                                   threshold=threshold)
        if len(res.kept) == len(x):
            if w == 1:
                return len(x)
            w = 1
            continue
        x, kept = res.x, kept[res.kept]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="shapes-8x8,shapes-16x16")
    ap.add_argument("--photos", default=",".join(PHOTOS + ("flat",)))
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--picture", help="write --show-merge of the first photo (second model)")
    ap.add_argument("--picture-keep", type=float, default=0.25)
    a = ap.parse_args()

    from PIL import Image as PILImage
    from lightkv_edge import embed_mode, engine
    from lightkv_edge.engine import VisionChat

    seen = {}
    real = engine.reduce_image

    def spy(embd, grid, text_ids, **kw):
        seen["x"], seen["grid"] = np.array(embd, np.float32), grid
        seen["g"] = embed_mode.prompt_guidance(np.ascontiguousarray(embd, np.float32),
                                               text_ids, kw["layer"])
        return real(embd, grid, text_ids, **kw)

    names = a.photos.split(",")
    results = []
    engine.reduce_image = spy
    try:
        for model in a.models.split(","):
            with VisionChat(model_name=model, keep=0.5, max_tokens=1,
                            n_threads=a.threads) as chat:
                for name in names:
                    rgb = photo(name)
                    pil = PILImage.fromarray(rgb)
                    chat.reset()
                    chat.ask(PROMPT, [pil])
                    x, grid = seen["x"], seen["grid"]
                    n = len(x)
                    rows, cols = grid
                    w = embed_mode.default_windows(rows, cols)
                    best = best_partner_cosine(x.astype(np.float64), window_of(rows, cols, w))
                    g = seen["g"]
                    top = np.argsort(-g)[: max(1, math.ceil(0.1 * n))]
                    row = {"model": model, "photo": name, "size": [rgb.shape[1], rgb.shape[0]],
                           "tokens": n, "grid": [rows, cols], "windows": w,
                           "best_cosine_median": float(np.median(best)),
                           "best_cosine_p10": float(np.percentile(best, 10)),
                           "best_cosine_p90": float(np.percentile(best, 90)),
                           "guidance_top10pct_share": float(g[top].sum() / max(g.sum(), 1e-12)),
                           "by_threshold": []}
                    for t in THRESHOLDS:
                        k = adaptive_keep(x, grid, w, t)
                        row["by_threshold"].append({
                            "threshold": t,
                            "below": int((best < t).sum()),      # no partner that similar
                            "adaptive_kept": k, "adaptive_keep": k / n})
                    results.append(row)
                    print(f"{model:13s} {name:10s} n {n:3d}  best cos median "
                          f"{row['best_cosine_median']:.3f}  adaptive keep "
                          + " ".join(f"T{r['threshold']}:{r['adaptive_keep']:.2f}"
                                     for r in row["by_threshold"]), flush=True)
            if a.picture and model == a.models.split(",")[-1]:
                with VisionChat(model_name=model, keep=a.picture_keep, max_tokens=1,
                                n_threads=a.threads) as chat:
                    rgb = photo(names[0])
                    pil = PILImage.fromarray(rgb).resize((256, 256), PILImage.Resampling.BICUBIC)
                    chat.ask(PROMPT, [pil])
                    print("wrote", chat.show_merge(a.picture)[0])
    finally:
        engine.reduce_image = real
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"prompt": PROMPT, "thresholds": list(THRESHOLDS),
                       "method": "adaptive_kept: native published merge with a threshold, "
                                 "ratio 0.5 per stage, embed mode's windows then one window, "
                                 "until a stage merges nothing; below: tokens whose best "
                                 "partner in their window has a cosine under the threshold",
                       "results": results}, f, indent=1)
        print("wrote", a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
