#!/usr/bin/env python3
"""Microbenchmark: the LightKV merge (native, ggml) vs. the LLM prefill of the same vision
tokens, for a real-shape model.

Default shape: LLaVA-1.5-7B's language model (LLaMA-2-7B: n_embd 4096, n_ff 11008, 32 heads
of 128, 32 layers) and its 576 image tokens (24 x 24). The prefill is measured with the
pinned llama.cpp on a random-weight GGUF of exactly that shape, written here with the gguf
package of the pinned source and quantized to Q4_K_M by llama_model_quantize (speed does not
depend on weight values). A full 7B file (4 GB at Q4_K_M) is slow to write and to run on a
small machine, so by default only --layers of the 32 layers are built and the prefill time
is scaled per layer (the input is given as embeddings and logits are computed for the last
token only, so everything outside the layers is negligible: about 0.1% of one layer).

    python scripts/bench_merge.py [--layers 2] [--threads N] [--tokens 576] [--quant Q4_K_M]

`--merge-only` skips the model: per-call times of --calls repeated merges of one --tokens x
--dim image (the same shape each call, as an engine merging image after image sees it),
e.g. `--merge-only --dim 1536` for the Qwen2-VL-2B width (it prints which lightkv_edge it
ran: run it with another checkout's venv to compare two builds).

Prints the numbers; asserts nothing (tests never assert timings).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(name="LLaVA-1.5-7B language model (LLaMA-2-7B shape)", n_embd=4096, n_ff=11008,
             n_head=32, n_head_kv=32, n_layer=32, n_vocab=32000)

# The small C program that quantizes the GGUF and times the prefill through libllama
# (compiled once against the pinned llama.cpp's headers).
HELPER_C = r"""
#include "llama.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

static void quiet(enum ggml_log_level level, const char * text, void * user) {
    (void) user;
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char ** argv) {
    llama_log_set(quiet, NULL);
    llama_backend_init();
    if (argc == 5 && strcmp(argv[1], "quantize") == 0) {
        llama_model_quantize_params qp = llama_model_quantize_default_params();
        qp.ftype = LLAMA_FTYPE_MOSTLY_Q4_K_M;
        qp.nthread = atoi(argv[4]);
        return llama_model_quantize(argv[2], argv[3], &qp) ? 1 : 0;
    }
    if (argc != 6 || strcmp(argv[1], "prefill") != 0) {
        fprintf(stderr, "usage: %s quantize IN OUT THREADS | prefill MODEL N_TOKENS THREADS REPS\n", argv[0]);
        return 2;
    }
    const int n = atoi(argv[3]), n_threads = atoi(argv[4]), reps = atoi(argv[5]);
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model * model = llama_model_load_from_file(argv[2], mp);
    if (!model) { fprintf(stderr, "could not load %s\n", argv[2]); return 3; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n + 64;
    cp.n_batch = n;
    cp.n_ubatch = n;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "could not create a context\n"); return 4; }
    const int d = llama_model_n_embd(model);
    struct llama_batch b = llama_batch_init(n, d, 1);
    b.n_tokens = n;
    srand(1);
    for (long i = 0; i < (long) n * d; i++) b.embd[i] = ((float) rand() / RAND_MAX - 0.5f) * 0.05f;
    for (int i = 0; i < n; i++) {
        b.pos[i] = i;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = 0;
        b.logits[i] = i == n - 1;
    }
    for (int r = 0; r <= reps; r++) {  /* r == 0 is a warm-up */
        llama_memory_clear(llama_get_memory(ctx), 1);
        const double t0 = now_ms();
        if (llama_decode(ctx, b) != 0) { fprintf(stderr, "llama_decode failed\n"); return 5; }
        llama_synchronize(ctx);
        if (r > 0) printf("%.3f\n", now_ms() - t0);
    }
    llama_batch_free(b);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
"""


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def llama_prefix() -> Path:
    out = subprocess.run([sys.executable, str(ROOT / "native" / "build_llama.py")],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def build_helper(prefix: Path, cache: Path) -> Path:
    key = hashlib.sha256((HELPER_C + str(prefix)).encode()).hexdigest()[:12]
    exe = cache / f"prefill-helper-{key}"
    if exe.exists():
        return exe
    src = cache / f"prefill-helper-{key}.c"
    src.write_text(HELPER_C)
    cc = os.environ.get("CC") or shutil.which("cc") or "gcc"
    subprocess.run([cc, "-O2", "-o", str(exe), str(src), f"-I{prefix / 'include'}",
                    f"-L{prefix / 'lib'}", "-lllama", "-lggml", "-lggml-base",
                    f"-Wl,-rpath,{prefix / 'lib'}"], check=True)
    return exe


def write_random_gguf(path: Path, n_layer: int, source_dir: Path):
    """A LLaMA-architecture GGUF of SHAPE with random F16 weights and a stand-in vocabulary."""
    sys.path.insert(0, str(source_dir / "gguf-py"))
    import gguf

    e, f, v = SHAPE["n_embd"], SHAPE["n_ff"], SHAPE["n_vocab"]
    rng = np.random.default_rng(0)
    block = (rng.standard_normal((256, max(e, f))) * 0.02).astype(np.float16)

    def mat(rows, cols):  # random-looking weights, cheap to make: a tiled random block
        reps = -(-rows // block.shape[0])
        return np.ascontiguousarray(np.tile(block[:, :cols], (reps, 1))[:rows])

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("lightkv-bench random LLaMA-2-7B shape")
    w.add_context_length(4096)
    w.add_embedding_length(e)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(f)
    w.add_rope_dimension_count(e // SHAPE["n_head"])
    w.add_head_count(SHAPE["n_head"])
    w.add_head_count_kv(SHAPE["n_head_kv"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    tokens += [f"\u2581t{i}".encode() for i in range(v - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (v - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * v)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    ones = np.ones(e, np.float32)
    w.add_tensor("token_embd.weight", mat(v, e))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{t}.weight", mat(e, e))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(f, e))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(f, e))
        w.add_tensor(f"blk.{i}.ffn_down.weight", mat(e, f))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", mat(v, e))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def model_path(args, helper: Path, cache: Path) -> Path:
    final = cache / f"llama2-7b-shape-{args.layers}L-{args.quant}.gguf"
    if final.exists():
        return final
    src_dir = Path(subprocess.run([sys.executable, str(ROOT / "native" / "llama_source.py"), "--print-dir"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    f16 = cache / f"llama2-7b-shape-{args.layers}L-F16.gguf"
    if not f16.exists():
        log(f"writing a random-weight GGUF ({args.layers} layers, F16) to {f16} ...")
        tmp = f16.with_suffix(".tmp")
        write_random_gguf(tmp, args.layers, src_dir)
        tmp.rename(f16)
    if args.quant == "F16":
        return f16
    log(f"quantizing to {args.quant} with llama_model_quantize ...")
    tmp = final.with_suffix(".tmp")
    subprocess.run([str(helper), "quantize", str(f16), str(tmp), str(args.threads)], check=True)
    tmp.rename(final)
    return final


def time_ms(fn, reps: int) -> float:
    fn()  # warm-up (creates the context, allocates buffers)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def merge_only(args) -> int:
    """Per-call time of repeated merges of one image shape (and of the first-layer guidance
    when --guidance-gguf is given)."""
    from lightkv_edge import native
    native.set_num_threads(args.threads)
    n, d = args.tokens, args.dim
    side = int(round(n ** 0.5))
    grid = (side, side) if side * side == n else None
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((n, d)).astype(np.float32) for _ in range(4)]
    gs = [rng.random(n).astype(np.float32) for _ in range(4)]
    times, cpu = [], []
    for i in range(args.calls + 1):          # call 0: warm-up (context, first plan)
        t0, c0 = time.perf_counter(), time.process_time()
        native.lightkv_merge(xs[i % 4], gs[i % 4], windows=args.windows, ratio=0.5, grid=grid,
                             backend=args.backend)
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
    t, c = np.array(times), np.array(cpu)
    # CPU time (all threads of this process) is the steadier figure on a loaded machine;
    # with more than one thread it includes ggml's spin-waits
    print(f"merge {n} x {d}, windows {args.windows}, ratio 0.5, guided, {args.threads} threads, "
          f"backend {args.backend}: per call wall median {np.median(t):.2f} ms (min {t.min():.2f}), "
          f"CPU median {np.median(c):.2f} ms (min {c.min():.2f}); n = {len(t)}, load "
          f"{os.getloadavg()[0]:.1f}; {native.__file__}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="layers actually built (of 32)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--tokens", type=int, default=576, help="vision tokens (a square number)")
    ap.add_argument("--text", type=int, default=40, help="prompt tokens around the image (guidance)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quant", choices=["Q4_K_M", "F16"], default="Q4_K_M")
    ap.add_argument("--backend", default="CPU", help="ggml backend of the merge")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "lightkv-edge" / "bench"))
    ap.add_argument("--merge-only", action="store_true", help="only time repeated merges")
    ap.add_argument("--dim", type=int, default=SHAPE["n_embd"], help="--merge-only: row width")
    ap.add_argument("--windows", type=int, default=4, help="--merge-only: windows per side")
    ap.add_argument("--calls", type=int, default=50, help="--merge-only: timed calls")
    args = ap.parse_args()
    if args.merge_only:
        return merge_only(args)

    from lightkv_edge import native

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    prefix = llama_prefix()
    helper = build_helper(prefix, cache)
    model = model_path(args, helper, cache)

    # ---- prefill
    log(f"timing the prefill of {args.tokens} embeddings ...")
    out = subprocess.run([str(helper), "prefill", str(model), str(args.tokens), str(args.threads),
                          str(args.reps)], check=True, capture_output=True, text=True)
    t_layers = min(float(v) for v in out.stdout.split())
    per_layer = t_layers / args.layers
    t_prefill = per_layer * SHAPE["n_layer"]

    # ---- merge and guidance (native)
    native.set_num_threads(args.threads)
    n, d = args.tokens, SHAPE["n_embd"]
    side = int(round(n ** 0.5))
    grid = (side, side) if side * side == n else None
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    g = rng.random(n).astype(np.float32)
    h, dh = SHAPE["n_head"], d // SHAPE["n_head"]
    s = n + args.text
    q = rng.standard_normal((h, s, dh)).astype(np.float32)
    k = rng.standard_normal((h, s, dh)).astype(np.float32)
    vis = np.arange(args.text // 2, args.text // 2 + n)
    txt = np.setdiff1d(np.arange(s), vis)

    t_merge = time_ms(lambda: native.lightkv_merge(x, g, windows=2, ratio=0.5, grid=grid,
                                                   backend=args.backend), args.reps)
    t_guid = time_ms(lambda: native.guidance_scores_from_qk(q, k, vis, txt, backend=args.backend),
                     args.reps)

    # the paper's LLaVA schedule: layers 12-18-24, windows 4-2-1, ratio 0.5 each
    def schedule():
        xs, gs = x, g
        for w in (4, 2, 1):
            r = native.lightkv_merge(xs, gs, windows=w, ratio=0.5, backend=args.backend)
            xs, gs = r.x, np.bincount(r.assign, weights=gs, minlength=r.x.shape[0]).astype(np.float32)
        return xs
    t_sched = time_ms(schedule, args.reps)
    rows = [n]
    xs = x
    for w in (4, 2, 1):
        xs = native.lightkv_merge(xs, None, windows=w, ratio=0.5).x
        rows.append(xs.shape[0])

    pct = lambda t: 100.0 * t / t_prefill  # noqa: E731
    print(f"model      {SHAPE['name']}, random weights, {args.quant}; {args.layers} of "
          f"{SHAPE['n_layer']} layers built, prefill scaled per layer")
    print(f"machine    {os.cpu_count()} CPU threads, {args.threads} used (llama.cpp and merge); "
          f"merge backend {args.backend}")
    print(f"prefill    {args.tokens} vision tokens: {t_layers:.1f} ms for {args.layers} layers "
          f"= {per_layer:.1f} ms/layer -> {t_prefill:.0f} ms for {SHAPE['n_layer']} layers")
    print(f"merge      one stage ({n} x {d}, windows 2, ratio 0.5, guided): {t_merge:.2f} ms "
          f"= {pct(t_merge):.3f}% of the prefill")
    print(f"guidance   one layer ({h} heads x {dh}, {s} positions, {len(txt)} text keys): "
          f"{t_guid:.2f} ms = {pct(t_guid):.3f}%")
    print(f"schedule   3 stages (windows 4-2-1, ratio 0.5, tokens {'->'.join(map(str, rows))}): "
          f"{t_sched:.2f} ms merge + {3 * t_guid:.2f} ms guidance = "
          f"{pct(t_sched + 3 * t_guid):.3f}% of the prefill")
    verdict = "met" if pct(t_merge + t_guid) < 2.0 else "NOT met"
    print(f"target     merge + guidance < 2% of the prefill on CPU: {verdict} "
          f"({pct(t_merge + t_guid):.3f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
