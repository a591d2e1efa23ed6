"""`python -m lightkv_edge bench`: accuracy and cost of every method at the same budgets.

Side by side, in one run, on one machine: `off` (all vision tokens, stock llama.cpp) and,
at each kept fraction, LightKV embed mode and the baselines, on a held-out split of the
embedded shapes task. Accuracy per question type is the quality signal; the cost columns
are averages per sample (vision encode, merge, LLM prefill, KV bytes after prefill, decode
tokens/s). Timings are reported, never asserted.

Methods here (embed mode's --method names): off, lightkv-protect (the default LightKV:
prompt-guided, the prompt's top tokens never merged away), lightkv-paper (the published
merge), unguided (the published merge with equal weights, ToMe style), random, fastv, dart,
pool (2x2 pooling: its budget is fixed, so it runs only at keep 0.25). The baselines come
from the PyTorch reference (needs torch), and so does the variant `lightkv-absorb`
(docs/merge-variants.md; not in the default list). `layer` and `layer-exact` are layer
mode (docs/layer-mode.md) with the KV policies compact and exact and the default schedule
for each keep (keep = the layer-averaged kept fraction; `keep_run` is that fraction as
run); a keep the model's depth cannot reach is reported as skipped (not in the default
list either). `--model-name` picks an embedded model. `--split val` evaluates on the
validation split, the one to choose settings on; the default `test` split is for the
final report. Every accuracy comes with its 95 % Wilson interval.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path
import time
from collections import defaultdict

from . import __version__

DEFAULT_KEEPS = (0.75, 0.55, 0.35, 0.25, 0.10)
DEFAULT_METHODS = ("off", "lightkv-protect", "lightkv-paper", "unguided", "random", "fastv",
                   "dart", "pool")
# bench name -> layer mode's KV policy
_LAYER_KV = {"layer": "compact", "layer-exact": "exact"}
SPLITS = ("test", "val")
# KV eviction (docs/eviction.md), not in the default list: `evict` on top of off keeps KEEP
# of each image's cells after the prefill; `embed+evict` reaches the same budget in two
# halves, the merge keeping sqrt(KEEP) and the eviction sqrt(KEEP) of what is left
_EVICT_METHODS = ("evict", "embed+evict")


def _chat_settings(method: str, keep: float) -> dict:
    """VisionChat's mode settings of a bench row."""
    if method == "off":
        return {"mode": "off"}
    if method in _LAYER_KV:
        return {"mode": "layer", "keep": keep, "kv": _LAYER_KV[method]}
    if method == "evict":
        return {"mode": "off", "evict": keep}
    if method == "embed+evict":
        return {"mode": "embed", "keep": keep ** 0.5, "evict": keep ** 0.5}
    return {"mode": "embed", "keep": keep, "method": method}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of k successes out of n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, mid - half), min(1.0, mid + half)


def _first_word(text: str) -> str:
    words = text.strip().lower().replace(".", " ").replace(",", " ").split()
    return words[0] if words else ""


def evaluate(chat, samples, image_of) -> dict:
    """Run every sample through `chat` (reset in between); accuracy and mean costs."""
    correct = defaultdict(int)
    total = defaultdict(int)
    sums = defaultdict(float)
    for s in samples:
        chat.reset()
        answer = chat.ask(s.question, [image_of(s)], max_tokens=4)
        st = chat.last_stats
        total[s.qtype] += 1
        correct[s.qtype] += _first_word(answer) == s.answer
        for k in ("t_encode_ms", "t_merge_ms", "t_prefill_ms", "kv_bytes",
                  "vision_tokens_in", "vision_tokens_kept", "t_decode_ms", "n_decoded", "keep"):
            sums[k] += getattr(st, k)
        if st.evict_vision_before:      # the vision cells the cache holds after eviction
            sums["vision_tokens_kept"] += st.evict_vision_after - st.vision_tokens_kept
    n = sum(total.values())
    k = sum(correct.values())
    out = {"n": n, "correct": k, "accuracy": k / max(n, 1), "ci95": list(wilson(k, n)),
           "per_type": {t: correct[t] / total[t] for t in sorted(total)}}
    for k in ("t_encode_ms", "t_merge_ms", "t_prefill_ms", "kv_bytes",
              "vision_tokens_in", "vision_tokens_kept"):
        out[k] = sums[k] / max(n, 1)
    out["decode_tps"] = sums["n_decoded"] / max(sums["t_decode_ms"] / 1e3, 1e-9)
    out["keep_run"] = sums["keep"] / max(n, 1)
    return out


def run_bench(args) -> int:
    from .embed_mode import METHODS, NATIVE_METHODS
    from .embedded import DEFAULT_MODEL, embedded_model
    from .engine import VisionChat
    from .errors import InputError
    from .images import image_from_pil
    from .tasks import shapes

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else \
        list(DEFAULT_METHODS)
    for m in methods:
        if m != "off" and m not in METHODS and m not in _LAYER_KV and m not in _EVICT_METHODS:
            raise InputError(f"unknown method {m!r} (choose from "
                             f"{', '.join(['off', *METHODS, *_LAYER_KV, *_EVICT_METHODS])})")
    try:
        keeps = [float(k) for k in args.keep.split(",")] if args.keep else list(DEFAULT_KEEPS)
    except ValueError:
        raise InputError(f"--keep must be a comma-separated list of numbers: {args.keep}")
    if any(not 0 < k <= 1 for k in keeps):
        raise InputError("every --keep must be in (0, 1]")
    split = getattr(args, "split", "test")
    if split not in SPLITS:
        raise InputError(f"--split must be one of {', '.join(SPLITS)} (train is what the "
                         f"model learnt from), got {split!r}")
    if any(m != "off" and m not in (*NATIVE_METHODS, *_LAYER_KV, *_EVICT_METHODS)
           for m in methods):
        # the baselines run on the PyTorch reference; torch's own OpenMP pool would spin
        # against llama.cpp's threads and slow every later row (seen: prefill 5x slower)
        import torch
        torch.set_num_threads(1)
    n = args.n or (40 if args.quick else 400)
    if args.quick:
        keeps = keeps[1:2] if not args.keep else keeps
    samples = shapes.dataset(split, n, seed=args.seed)
    image_of = (lambda s: image_from_pil(s.image, "sample"))
    if (args.model is None) != (args.mmproj is None):
        raise InputError("give both --model and --mmproj (or neither)")
    model_names = getattr(args, "model_name", None)
    if model_names is not None and args.model is not None:
        raise InputError("give either --model-name or --model/--mmproj, not both")
    if isinstance(model_names, str):
        model_names = [model_names]

    def model_file(name):  # no machine paths in results
        return Path(args.model or embedded_model(name or DEFAULT_MODEL)[0]).name

    results = []
    per_model = [("off", 1.0)] if "off" in methods else []
    per_model += [(m, k) for k in keeps for m in methods if m != "off"
                  and not (m == "pool" and abs(k - 0.25) > 1e-9)]
    runs = [(name, m, k) for name in (model_names or [None]) for m, k in per_model]
    for i, (model_name, method, keep) in enumerate(runs, 1):
        t0 = time.perf_counter()
        chat = VisionChat(args.model, args.mmproj, **_chat_settings(method, keep),
                          seed=args.seed, max_tokens=4, n_threads=args.threads,
                          model_name=model_name)
        try:
            r = evaluate(chat, samples, image_of)
        except InputError as e:
            if method not in _LAYER_KV or e.param != "keep":
                raise
            # a keep this model's depth cannot reach in layer mode: the other rows go on
            print(f"[{i}/{len(runs)}] {method:9s} keep {keep:.2f}  skipped: {e}", flush=True)
            continue
        finally:
            chat.close()
        r = {"model": model_file(model_name), "method": method, "keep": keep, **r}
        results.append(r)
        print(f"[{i}/{len(runs)}] {method:9s} keep {keep:.2f}  acc {r['accuracy']:.3f}  "
              + " ".join(f"{t} {a:.2f}" for t, a in r["per_type"].items())
              + f"  prefill {r['t_prefill_ms']:.1f} ms  kv {r['kv_bytes'] / 1024:.1f} KiB"
              f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = {"version": __version__, "models": [model_file(m) for m in (model_names or [None])],
           "device": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "seed": args.seed, "split": split, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_table(out))
        print(f"wrote {args.markdown}")
    return 0


def markdown_table(out: dict) -> str:
    """The results as markdown: a table per model, rows grouped by kept fraction."""
    n = out["results"][0]["n"] if out["results"] else 0
    lines = [f"Held-out `{out['split']}` split, seed {out['seed']}, n = {n} per row, the same "
             f"questions for every row; device: {out['device']}; lightkv-edge "
             f"{out['version']}. Costs are means per sample."]
    for model in out["models"]:
        lines += ["", f"Model `{model}`:", ""] if len(out["models"]) > 1 else [""]
        lines += _model_table([r for r in out["results"] if r["model"] == model])
    return "\n".join(lines) + "\n"


def _model_table(rows: list[dict]) -> list[str]:
    rows = sorted(rows, key=lambda r: (-r["keep"], r["method"] != "lightkv-protect", r["method"]))
    types = sorted({t for r in rows for t in r["per_type"]})
    head = ["method", "keep", "tokens kept", "accuracy", "95 % CI", *types, "encode ms",
            "merge ms", "prefill ms", "KV KiB", "decode tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], f"{r['keep']:.2f}",
                 f"{r['vision_tokens_kept']:.1f} / {r['vision_tokens_in']:.0f}",
                 f"**{r['accuracy']:.3f}**" if r["method"] == "lightkv-protect"
                 else f"{r['accuracy']:.3f}",
                 "{:.3f}-{:.3f}".format(*r["ci95"]),
                 *[f"{r['per_type'].get(t, float('nan')):.3f}" for t in types],
                 f"{r['t_encode_ms']:.1f}", f"{r['t_merge_ms']:.2f}", f"{r['t_prefill_ms']:.1f}",
                 f"{r['kv_bytes'] / 1024:.1f}", f"{r['decode_tps']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
