#!/usr/bin/env python3
"""What embed mode saves at real model shapes: a random-weight Qwen2-VL-2B-shaped VLM on CPU.

The model has Qwen2-VL-2B's exact per-layer shapes (text: hidden 1536, intermediate 8960,
12 heads, 2 KV heads of 128, M-RoPE sections 16/24/24; vision: embed 1280, 16 heads,
patch 14, temporal patch 2, spatial merge 2, mlp ratio 4, merger out 1536) but only a
few of its layers (--text-layers of 28, --vision-layers of 32), so it builds, converts and
runs in minutes on a small CPU. The vocabulary is cut from 151936 to --vocab (default
32000; the shipped tiny SentencePiece tokenizer, padded by the converter): it changes
only the size of the embedding table and of the one-token output projection, not the
prefill of image tokens. Speed and memory do not depend on weight values.

Build (once, cached under ~/.cache/lightkv-edge/realshape/): random init with
transformers (Qwen2VLConfig, Qwen2VLForConditionalGeneration), saved as f16 safetensors,
converted with scripts/convert.py (f16 text, f16 mmproj), text model quantized to Q4_K_M
with scripts/quantize.py; the HF checkpoint and the f16 text GGUF are then deleted (keep the
latter with --keep-f16).

Measure: for each image size (default 448 -> 16x16 = 256 tokens after the 2x2 merge), one
VisionChat per mode (off; embed at --keep values), a warm-up turn and --runs timed turns
(reset between turns), max 8 decoded tokens with end-of-generation ignored. Reported per
mode: vision tokens in/kept, t_encode_ms, t_merge_ms, t_prefill_ms, kv_bytes, decode
tok/s (means), and an EXTRAPOLATION to the full model: prefill ms / text layers x 28 and
KV bytes / text layers x 28 (the ~45 text tokens of template and prompt are in the
prefill too; the one-token logits are scaled along, a small overestimate), encode ms /
vision layers x 32 (the patch embedding and the merger are scaled along too: an upper
bound).

    python scripts/bench_real_shape.py [--sizes 448 672] [--keep 0.75 0.55 0.35]
        [--text-layers 4] [--vision-layers 4] [--threads 2] [--runs 3]
        [--json FILE] [--markdown FILE]

Prints a markdown table; asserts nothing (tests never assert timings). t_merge_ms is the
whole merge step of embed mode: the first-layer guidance graph (its Q/K projections on the
quantized weights) and the merge graphs. (Before the guidance ran in ggml, numpy's BLAS
pool did the Q/K projections and OPENBLAS_NUM_THREADS=1 mattered on a small machine:
docs/bench/real-shape-cpu.md.) --interleave R repeats the whole sweep R times, modes
interleaved, and reports each mode's median over the sweeps (for a loaded machine).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HF = ROOT / "lightkv_edge" / "models" / "hf"

from lightkv_edge.bench_cost import synthetic_image  # noqa: E402  (the cost benchmark's picture)

FULL_TEXT_LAYERS = 28
FULL_VISION_LAYERS = 32
FULL_VOCAB = 151936
PROMPT = "Describe the objects in this picture and their colours."


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def hf_config(text_layers: int, vision_layers: int, vocab: int) -> dict:
    """Qwen2-VL-2B-Instruct's config.json with fewer layers and a smaller vocabulary;
    special token ids are those of the shipped tokenizer (lightkv_edge/models/hf)."""
    base = json.loads((HF / "config.json").read_text())
    ids = {k: base[k] for k in ("bos_token_id", "eos_token_id", "image_token_id",
                                "video_token_id", "vision_start_token_id",
                                "vision_end_token_id")}
    text = dict(
        architectures=["Qwen2VLForConditionalGeneration"], attention_dropout=0.0,
        bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
        hidden_act="silu", hidden_size=1536, initializer_range=0.02,
        intermediate_size=8960, max_position_embeddings=32768, max_window_layers=28,
        model_type="qwen2_vl_text", num_attention_heads=12, num_hidden_layers=text_layers,
        num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default",
                      "type": "default"},
        rope_theta=1000000.0, sliding_window=None, use_cache=True,
        use_sliding_window=False, vocab_size=vocab,
        layer_types=["full_attention"] * text_layers, tie_word_embeddings=True)
    vision = dict(depth=vision_layers, embed_dim=1280, hidden_act="quick_gelu",
                  hidden_size=1536, in_channels=3, initializer_range=0.02, mlp_ratio=4,
                  model_type="qwen2_vl", num_heads=16, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return dict(ids, model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"],
                text_config=text, vision_config=vision, tie_word_embeddings=True,
                transformers_version="4.57.6", dtype="float16")


def build(args, cache: Path) -> tuple[Path, Path]:
    stem = f"qwen2vl-2b-shape-t{args.text_layers}-v{args.vision_layers}-vocab{args.vocab}"
    text_q = cache / f"{stem}-q4_k_m.gguf"
    mmproj = cache / f"{stem}-mmproj-f16.gguf"
    if text_q.exists() and mmproj.exists():
        log(f"using the cached model {text_q.name} + {mmproj.name}")
        return text_q, mmproj
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    hf = cache / f"{stem}-hf"
    shutil.rmtree(hf, ignore_errors=True)
    hf.mkdir(parents=True)
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json"):
        shutil.copy(HF / f, hf / f)
    pre = json.loads((HF / "preprocessor_config.json").read_text())
    # Qwen2-VL-2B's image processor limits
    pre.update(patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=3136,
               max_pixels=12845056)
    (hf / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (hf / "config.json").write_text(json.dumps(hf_config(args.text_layers,
                                                         args.vision_layers, args.vocab)))
    log(f"building a random Qwen2-VL-2B-shaped checkpoint ({args.text_layers} text, "
        f"{args.vision_layers} vision layers, vocab {args.vocab}) ...")
    t0 = time.perf_counter()
    cfg = Qwen2VLConfig.from_pretrained(hf)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).to(torch.float16)
    model.save_pretrained(hf, safe_serialization=True)
    del model
    gc.collect()
    c = json.loads((hf / "config.json").read_text())   # save_pretrained rewrites it
    c["architectures"] = ["Qwen2VLForConditionalGeneration"]
    (hf / "config.json").write_text(json.dumps(c))
    log(f"  built in {time.perf_counter() - t0:.0f} s")

    log("converting with scripts/convert.py (f16 text, f16 mmproj) ...")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "convert.py"), str(hf),
                    "--outdir", str(cache), "--name", stem, "--outtype", "f16",
                    "--mmproj-outtype", "f16"], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(hf)
    text_f16 = cache / f"{stem}-f16.gguf"
    log(f"  converted in {time.perf_counter() - t0:.0f} s")
    log("quantizing the text model to Q4_K_M with scripts/quantize.py ...")
    t0 = time.perf_counter()
    tmp = text_q.with_suffix(".tmp")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "quantize.py"), str(text_f16),
                    str(tmp), "--type", "q4_k_m", "--threads", str(args.threads)],
                   check=True, stdout=subprocess.DEVNULL)
    tmp.rename(text_q)
    if not args.keep_f16:
        text_f16.unlink()
    log(f"  quantized in {time.perf_counter() - t0:.0f} s")
    return text_q, mmproj


KEYS = ("vision_tokens_in", "vision_tokens_kept", "kv_cells", "kv_bytes", "t_encode_ms",
        "t_merge_ms", "t_prefill_ms", "t_decode_ms", "n_decoded", "decode_tps")


def measure(model: Path, mmproj: Path, image, mode: str, keep: float, args) -> list[dict]:
    """The statistics of --runs turns after a warm-up turn, one dict per turn."""
    from lightkv_edge import VisionChat
    runs = []
    with VisionChat(model, mmproj, mode=mode, keep=keep, n_threads=args.threads,
                    max_tokens=8, ignore_eos=True, ctx_size=4096) as chat:
        for r in range(args.runs + 1):          # r == 0 is the warm-up
            chat.reset()
            chat.ask(PROMPT, [image])
            s = chat.last_stats.as_dict()
            if r > 0:
                runs.append({k: s[k] for k in KEYS})
    return runs


def summarise(runs: list[dict], median: bool) -> dict:
    """Means of the turns (medians with --interleave, where turns come from several sweeps)."""
    agg = np.median if median else np.mean
    out = {k: float(agg([x[k] for x in runs])) for k in KEYS}
    out["t_prefill_ms_runs"] = [x["t_prefill_ms"] for x in runs]
    out["t_merge_ms_runs"] = [x["t_merge_ms"] for x in runs]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--sizes", type=int, nargs="+", default=[448],
                    help="square image sizes in px (448 -> 256 tokens, 672 -> 576)")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.55, 0.35])
    ap.add_argument("--text-layers", type=int, default=4, help="text layers built (of 28)")
    ap.add_argument("--vision-layers", type=int, default=4,
                    help="vision layers built (of 32; at least 3: llama.cpp's converter maps "
                         "the merger's mlp.2 through the block index)")
    ap.add_argument("--vocab", type=int, default=32000, help=f"vocabulary (real: {FULL_VOCAB})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up")
    ap.add_argument("--interleave", type=int, default=1,
                    help="repeat the sweep over modes this many times; report medians")
    ap.add_argument("--keep-f16", action="store_true", help="also keep the f16 text GGUF")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "lightkv-edge" / "realshape"))
    ap.add_argument("--build-only", action="store_true",
                    help="build (or find) the cached model and exit")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--markdown", metavar="FILE")
    args = ap.parse_args()
    if args.vision_layers < 3 or args.text_layers < 1:
        ap.error("--vision-layers must be >= 3 and --text-layers >= 1")

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.build_only:
        model, mmproj = build(args, cache)
        print(model)
        print(mmproj)
        return 0
    # build in a child process: torch (with its own OpenMP runtime and thread pool) must
    # not be loaded in the process that times llama.cpp -- with it loaded, the prefill on
    # 2 cores ran several times slower in a first try
    out = subprocess.run([sys.executable, __file__, "--build-only", "--cache", str(cache),
                          "--text-layers", str(args.text_layers), "--vision-layers",
                          str(args.vision_layers), "--vocab", str(args.vocab), "--threads",
                          str(args.threads)] + (["--keep-f16"] if args.keep_f16 else []),
                         check=True, stdout=subprocess.PIPE, text=True)
    model, mmproj = (Path(p) for p in out.stdout.strip().splitlines()[-2:])

    lt, lv = args.text_layers, args.vision_layers
    turns: dict[tuple, list] = {}
    for sweep in range(args.interleave):
        for size in args.sizes:
            image = synthetic_image(size)
            for mode, keep in [("off", 1.0)] + [("embed", k) for k in args.keep]:
                log(f"sweep {sweep + 1}/{args.interleave}: {size}px {mode} keep {keep} ...")
                t0 = time.perf_counter()
                runs = measure(model, mmproj, image, mode, keep, args)
                turns.setdefault((size, mode, keep), []).extend(runs)
                log(f"  {time.perf_counter() - t0:.0f} s: prefill "
                    f"{np.mean([x['t_prefill_ms'] for x in runs]):.0f} ms, merge "
                    f"{np.mean([x['t_merge_ms'] for x in runs]):.1f} ms, load "
                    f"{os.getloadavg()[0]:.1f}")
    results = []
    for (size, mode, keep), runs in turns.items():
        r = summarise(runs, median=args.interleave > 1)
        r.update(image_px=size, mode=mode, keep=keep,
                 est_prefill_ms_full=r["t_prefill_ms"] / lt * FULL_TEXT_LAYERS,
                 est_kv_bytes_full=r["kv_bytes"] / lt * FULL_TEXT_LAYERS,
                 est_encode_ms_full=r["t_encode_ms"] / lv * FULL_VISION_LAYERS)
        results.append(r)
    for r in results:
        base = next(b for b in results if b["image_px"] == r["image_px"] and b["mode"] == "off")
        r["prefill_saved_pct"] = 100 * (1 - r["t_prefill_ms"] / base["t_prefill_ms"])
        r["kv_saved_pct"] = 100 * (1 - r["kv_bytes"] / base["kv_bytes"])
        r["merge_pct_of_off_prefill"] = 100 * r["t_merge_ms"] / base["t_prefill_ms"]
        r["merge_pct_of_off_prefill_full"] = 100 * r["t_merge_ms"] / base["est_prefill_ms_full"]

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    meta = dict(interleave=args.interleave, loadavg_end=os.getloadavg(), model=f"random-weight Qwen2-VL-2B shape: {lt}/{FULL_TEXT_LAYERS} text layers "
                      f"(Q4_K_M), {lv}/{FULL_VISION_LAYERS} vision layers (f16 mmproj), vocab "
                      f"{args.vocab} (real {FULL_VOCAB})",
                text_model=model.name, mmproj=mmproj.name, device=cpu,
                cpus=os.cpu_count(), threads=args.threads,
                openblas_num_threads=os.environ.get("OPENBLAS_NUM_THREADS"),
                runs=args.runs, max_tokens=8, prompt=PROMPT,
                peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                date_utc=time.strftime("%Y-%m-%d %H:%M", time.gmtime()))

    hdr = ("| image | mode | keep | tokens kept / in | encode ms | merge ms | prefill ms "
           f"| KV MiB | decode tok/s | prefill saved | merge / prefill ({lt} L) "
           f"| merge / est. prefill ({FULL_TEXT_LAYERS} L) "
           f"| est. prefill ms ({FULL_TEXT_LAYERS} L) | est. KV MiB ({FULL_TEXT_LAYERS} L) "
           f"| est. encode ms ({FULL_VISION_LAYERS} L) |")
    lines = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    mib = 1024 * 1024
    for r in results:
        lines.append(
            f"| {r['image_px']} px | {r['mode']} | {r['keep']:.2f} "
            f"| {r['vision_tokens_kept']:.0f} / {r['vision_tokens_in']:.0f} "
            f"| {r['t_encode_ms']:.0f} | {r['t_merge_ms']:.1f} | {r['t_prefill_ms']:.0f} "
            f"| {r['kv_bytes'] / mib:.2f} | {r['decode_tps']:.1f} "
            f"| {r['prefill_saved_pct']:.0f} % | {r['merge_pct_of_off_prefill']:.1f} % "
            f"| {r['merge_pct_of_off_prefill_full']:.1f} % "
            f"| {r['est_prefill_ms_full']:.0f} | {r['est_kv_bytes_full'] / mib:.1f} "
            f"| {r['est_encode_ms_full']:.0f} |")
    table = "\n".join(lines)
    env = f"OPENBLAS_NUM_THREADS={meta['openblas_num_threads'] or 'unset'}"
    stat = (f"medians of {args.interleave} x {args.runs} runs (sweeps interleaved)"
            if args.interleave > 1 else f"means of {args.runs} runs after a warm-up")
    print(f"model: {meta['model']}; device: {cpu}, {args.threads} threads, {env}; {stat}; "
          f"load average at the end {meta['loadavg_end'][0]:.1f}")
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta, results=results), indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(
            f"Model: {meta['model']}. Device: {cpu}, {args.threads} threads, {env}. "
            f"{stat[0].upper() + stat[1:]}; max 8 decoded tokens. Columns 'est.' are "
            f"EXTRAPOLATIONS (measured / layers built x layers of the real model).\n\n"
            + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
