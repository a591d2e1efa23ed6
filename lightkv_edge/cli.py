"""`python -m lightkv_edge ...`: chat about images, with or without LightKV.

Every user mistake ends in one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import re
import sys

from . import __version__
from .embed_mode import DEFAULT_METHOD, METHODS
from .embedded import DEFAULT_MODEL, EMBEDDED_MODELS
from .errors import LightKVError

EXAMPLES = """\
examples:
  python -m lightkv_edge chat photo.png                    interactive chat, embedded model
  python -m lightkv_edge chat photo.png -p "what colour is the circle?" --stats
  python -m lightkv_edge chat a.png b.png -p "..." --mode off     stock llama.cpp (control)
  python -m lightkv_edge chat img.jpg --model m.gguf --mmproj mmproj.gguf --keep 0.5
  python -m lightkv_edge chat img.jpg --hf-repo OWNER/REPO-GGUF --hf-file '*Q4_K_M*'
"""


# the library names its parameters in errors (InputError.param); here they are flags
FLAG_OF = {"keep": "--keep", "windows": "--windows", "ctx_size": "-c/--ctx-size",
           "max_tokens": "-n/--max-tokens", "temp": "--temp", "seed": "--seed",
           "n_threads": "-t/--threads", "gpu_layers": "-ngl/--gpu-layers",
           "model_name": "--model-name", "schedule": "--schedule", "kv": "--kv",
           "modes": "--modes", "keeps": "--keep", "run_timeout": "--run-timeout",
           "show_merge": "--show-merge",
           "evict": "--evict", "decode_evict": "--decode-evict",
           "evict_layers": "--evict-layers", "evict_window": "--evict-window",
           "evict_adaptive": "--evict-adaptive", "image_cache": "--image-cache",
           "max_new_rounds": "--max-new-rounds"}


def user_message(e: Exception) -> str:
    """A library error as one line, its parameter names replaced by the flags."""
    text = " ".join(str(e).split())
    for param, flag in FLAG_OF.items():
        text = re.sub(rf"(?<![\w-]){param}\b", flag, text)
    return text


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if not (0.0 < v <= 1.0):
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _layer_list(text: str) -> list[int]:
    try:
        v = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of layers: {text!r}")
    if any(x < 0 for x in v):
        raise argparse.ArgumentTypeError(f"layers must be >= 0, got {text}")
    return v


def _model_names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",")]
    bad = [x for x in names if x not in EMBEDDED_MODELS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown embedded model {bad[0]!r} (choose from "
                                         f"{', '.join(EMBEDDED_MODELS)})")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a model is named twice: {text}")
    return names


def _temperature(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if not (v >= 0.0):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not usage + error) and exit code 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m lightkv_edge",
                 description="Vision-language chat on llama.cpp, made cheaper by LightKV "
                             "(prompt-guided merging of the image's vision tokens).",
                 epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="store_true",
                    help="print our version, the pinned llama.cpp and the backends")
    ap.add_argument("--lib-dir", action="store_true",
                    help="print the folder of our llama.cpp libraries (for "
                         "LLAMA_CPP_LIB_PATH / MTMD_CPP_LIB when using llama_cpp directly)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    chat = sub.add_parser(
        "chat", help="chat about one or more images",
        description="Answer a question about images (-p), or chat interactively. "
                    "Without --model/--hf-repo the embedded shapes model is used (it "
                    "answers questions about coloured shapes, and sees every image at "
                    "its training size, 128x128).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    chat.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    chat.add_argument("-p", "--prompt", help="ask this once and exit (default: interactive)")
    src = chat.add_argument_group("model (default: the embedded model, no download)")
    src.add_argument("--model-name", metavar="NAME", choices=EMBEDDED_MODELS,
                     help="which embedded model: " + ", ".join(EMBEDDED_MODELS)
                          + f" (default {DEFAULT_MODEL}; the 16x16 one has 256 image "
                          "tokens, several merge windows per side)")
    src.add_argument("-m", "--model", metavar="F", help="GGUF text model")
    src.add_argument("--mmproj", metavar="F", help="GGUF vision projector matching --model")
    src.add_argument("--hf-repo", metavar="REPO",
                     help="download a GGUF + mmproj pair from this Hugging Face repo")
    src.add_argument("--hf-file", metavar="PATTERN",
                     help="which GGUF of --hf-repo to use (glob, e.g. '*Q4_K_M*')")
    lk = chat.add_argument_group("LightKV")
    lk.add_argument("--mode", choices=("off", "embed", "layer"), default="embed",
                    help="off: stock llama.cpp; embed: merge the image embeddings before "
                         "the LLM, guided by the prompt (default); layer: merge between "
                         "the LLM's decoder layers, guided by each layer's attention, and "
                         "compact the KV cache (llama/qwen2/qwen2-vl text models)")
    lk.add_argument("--keep", type=_fraction, default=0.55, metavar="FRACTION",
                    help="fraction of vision tokens kept, in (0, 1] (default 0.55)")
    lk.add_argument("--windows", type=_positive_int, default=None, metavar="N",
                    help="merge windows per side (default: chosen from the grid)")
    lk.add_argument("--method", default=DEFAULT_METHOD, metavar="NAME",
                    choices=METHODS,
                    help="embed mode's reduction: lightkv-protect (default: the prompt-"
                         "guided LightKV merge in which the tokens the prompt points at "
                         "are never merged away), lightkv-paper (the published merge), "
                         "unguided (the same merge, equal weights), lightkv-absorb (a "
                         "variant, docs/merge-variants.md), or a baseline: random, fastv, "
                         "dart, pool (lightkv-absorb and the baselines run on the PyTorch "
                         "reference: they need torch); layer mode: lightkv-protect "
                         "(default) or lightkv-paper at each stage")
    lk.add_argument("--schedule", metavar="L:W:R,...",
                    help="layer mode: merge after decoder layer L (0-based) with W windows "
                         "per side, dropping R of each window, e.g. 12:4:0.5,18:2:0.5 "
                         "(default: the paper's 12-18-24 of 32 layers, windows 4-2-1, "
                         "scaled to the model's depth, earlier if --keep needs it, with "
                         "the ratio that gives --keep as the layer-averaged kept fraction)")
    lk.add_argument("--kv", choices=("compact", "exact"), default="compact",
                    help="layer mode's KV policy: compact (every layer keeps only the final "
                         "merged rows; cells are freed) or exact (the paper's semantics: "
                         "each layer keeps the rows it ran on; more cells than off)")
    ev = chat.add_argument_group("KV eviction (docs/eviction.md; any mode)")
    ev.add_argument("--evict", type=_fraction, default=None, metavar="KEEP",
                    help="after each turn's prefill keep KEEP of every image's vision KV "
                         "cells, those its question attends to most, and free the rest "
                         "(llama/qwen2/qwen2-vl text models)")
    ev.add_argument("--decode-evict", type=_positive_int, default=None, metavar="N",
                    help="while answering, every N tokens re-score the vision cells with "
                         "those N tokens' attention and keep KEEP of each image's "
                         "remaining cells (needs --evict)")
    ev.add_argument("--evict-layers", type=_layer_list, default=None, metavar="L,L,...",
                    help="decoder layers whose attention is summed (default: all)")
    ev.add_argument("--evict-adaptive", action="store_true",
                    help="AirCache-style budget per layer (needs --evict): each layer keeps "
                         "its own most attended cells, few where its attention is "
                         "concentrated, more where flat; KEEP on average over the layers. "
                         "Cells no layer keeps are freed, the others only hidden from the "
                         "deeper layers (docs/eviction.md)")
    ev.add_argument("--evict-window", type=_positive_int, default=None, metavar="N",
                    help="the last N text rows of the turn observe (default: all the text "
                         "after its last image)")
    gen = chat.add_argument_group("generation")
    gen.add_argument("-n", "--max-tokens", type=_positive_int, default=256, metavar="N",
                     help="most tokens to generate per answer (default 256)")
    gen.add_argument("--temp", type=_temperature, default=0.0,
                     help="sampling temperature; 0 = greedy (default)")
    gen.add_argument("--seed", type=_nonneg_int, default=0, help="sampling seed (default 0)")
    gen.add_argument("--ignore-eos", action="store_true",
                     help="never stop at end-of-generation tokens (until -n or Ctrl-C)")
    gen.add_argument("-c", "--ctx-size", type=_positive_int, default=4096, metavar="N",
                     help="context size in tokens (default 4096)")
    gen.add_argument("-ngl", "--gpu-layers", type=_nonneg_int, default=None, metavar="N",
                     help="layers to offload to the GPU (default: all when a GPU exists)")
    gen.add_argument("-t", "--threads", type=_positive_int, default=None,
                     help="CPU threads (default: all cores)")
    gen.add_argument("--image-cache", type=_nonneg_int, default=4, metavar="N",
                     help="keep the vision encoder's output for the last N pictures, so a "
                          "picture asked about again (e.g. after /reset) skips the encoder "
                          "(default 4; 0: off)")
    out = chat.add_argument_group("output")
    out.add_argument("--stats", action="store_true",
                     help="end with one JSON line of statistics (tokens kept, KV bytes, ms)")
    out.add_argument("--json", action="store_true",
                     help="print the answer and statistics as one JSON object")
    out.add_argument("--show-merge", metavar="OUT.png",
                     help="embed mode: after each answer, write the image with the merge "
                          "drawn over it (kept rows outlined, merge groups tinted, windows, "
                          "the prompt's guidance as dots); the k-th further image of a turn "
                          "goes to OUT-k.png")
    out.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")

    bench = sub.add_parser(
        "bench", help="accuracy and cost of LightKV and the baselines on the shapes task",
        description="Side-by-side benchmark on a held-out split of the embedded shapes "
                    "task: off vs LightKV embed mode vs baselines at the same kept "
                    "fractions. Needs torch (for the baselines).")
    bench.add_argument("--quick", action="store_true",
                       help="40 samples, one kept fraction (0.55) unless --keep is given")
    bench.add_argument("--n", type=_positive_int, default=None,
                       help="samples (default 400; 40 with --quick)")
    bench.add_argument("--json", metavar="FILE", help="write the results as JSON")
    bench.add_argument("--markdown", metavar="FILE", help="write the results as a table")
    bench.add_argument("--seed", type=_nonneg_int, default=0,
                       help="draws a fresh held-out set (default 0)")
    bench.add_argument("--split", choices=("test", "val"), default="test",
                       help="held-out split: test (default, for reporting) or val (for "
                            "choosing settings)")
    bench.add_argument("--methods", metavar="LIST",
                       help="comma-separated (default: off,lightkv-protect,lightkv-paper,"
                            "unguided,random,fastv,dart,pool; also lightkv-absorb)")
    bench.add_argument("--model-name", metavar="LIST", type=_model_names,
                       help="embedded models, comma-separated, each measured on the same "
                            "questions: " + ", ".join(EMBEDDED_MODELS)
                            + f" (default {DEFAULT_MODEL})")
    bench.add_argument("--keep", metavar="LIST",
                       help="comma-separated kept fractions (default 0.75,0.55,0.35,0.25,0.1)")
    bench.add_argument("-m", "--model", metavar="F", help="GGUF text model")
    bench.add_argument("--mmproj", metavar="F", help="GGUF vision projector")
    bench.add_argument("-t", "--threads", type=_positive_int, default=None,
                       help="CPU threads (default: all cores)")

    cost = sub.add_parser(
        "cost", help="what each mode costs on a model: time, KV cache, memory",
        description="Cost of off and of each LightKV mode at each kept fraction on one "
                    "GGUF pair, side by side: vision encode, merge, LLM prefill, time to "
                    "first token, KV bytes, decode speed of a short and a long answer, "
                    "peak RSS. One fresh process per run (a warm-up turn first), "
                    "configurations interleaved, medians with min and max, ratios to off "
                    "paired run by run. Full-depth random-weight models of real shapes: "
                    "scripts/make_shape_models.py.",
        epilog="example:\n  python -m lightkv_edge cost -m text.gguf --mmproj mmproj.gguf "
               "--modes off,embed --keep 0.55,0.25 --runs 5 --json cost.json --plots docs/bench",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    cost.add_argument("-m", "--model", metavar="F", help="GGUF text model (required)")
    cost.add_argument("--mmproj", metavar="F", help="its GGUF vision projector (required)")
    cost.add_argument("--modes", default="off,embed", metavar="LIST",
                      help="comma-separated: off, embed, layer, evict (off + KV eviction), "
                           "decode-evict (eviction re-scored every 64 answer tokens), "
                           "embed+evict (merge and evict, sqrt(KEEP) each) (default off,embed)")
    cost.add_argument("--keep", metavar="LIST",
                      help="kept fractions of every mode but off (default 0.75,0.55,0.35,0.25,0.1)")
    cost.add_argument("--method", metavar="NAME",
                      help="embed mode's reduction (default: its default, lightkv-protect)")
    cost.add_argument("--runs", type=_positive_int, default=5,
                      help="timed runs per configuration, each in a fresh process (default 5)")
    cost.add_argument("--image", metavar="F",
                      help="the picture (default: a synthetic one of --image-size pixels)")
    cost.add_argument("--image-size", type=_positive_int, default=672, metavar="PX",
                      help="side of the synthetic picture (default 672: 576 tokens on Qwen2-VL)")
    cost.add_argument("--short-tokens", type=_positive_int, default=16, metavar="N",
                      help="tokens of the short answer (default 16)")
    cost.add_argument("--long-tokens", type=_positive_int, default=512, metavar="N",
                      help="tokens of the long answer (default 512)")
    cost.add_argument("-c", "--ctx-size", type=_positive_int, default=4096, metavar="N",
                      help="context size (default 4096)")
    cost.add_argument("-t", "--threads", type=_positive_int, default=None,
                      help="CPU threads (default: all cores)")
    cost.add_argument("-ngl", "--gpu-layers", type=_nonneg_int, default=None, metavar="N",
                      help="layers to offload to the GPU (default: all when a GPU exists)")
    cost.add_argument("--run-timeout", type=_positive_int, default=1800, metavar="S",
                      help="give up on a run after S seconds (default 1800)")
    cost.add_argument("--encode-once", action="store_true",
                      help="encode the picture once (timed in its own process) and let every "
                           "run reuse that output: the runs skip the vision encoder, TTFT is "
                           "that encode time plus each run's own (for full-depth models, "
                           "whose encoder takes minutes on a CPU)")
    cost.add_argument("--resume", metavar="FILE",
                      help="append every finished run to FILE (JSON lines) and, when FILE "
                           "already holds whole rounds of this same sweep, keep them and run "
                           "only the rounds left (a round cut short runs again whole, since "
                           "ratios pair the runs of one round); for sweeps of hours")
    cost.add_argument("--max-new-rounds", type=_nonneg_int, default=None, metavar="N",
                      help="with --resume: run at most N rounds now, and report the rounds "
                           "done so far (0: only report them)")
    cost.add_argument("--json", metavar="FILE", help="write the results as JSON")
    cost.add_argument("--markdown", metavar="FILE", help="write the table as markdown")
    cost.add_argument("--plots", metavar="DIR", help="write the cost pictures (PNG) there")
    return ap


def print_version() -> None:
    from . import _libs, backends
    print(f"lightkv-edge {__version__}")
    try:
        from . import _build_info
        print(f"llama.cpp: {_build_info.LLAMA_CPP_PIN} (vendored source, "
              f"build {_build_info.LLAMA_CPP_BUILD_KEY})")
        print(f"built backends: {', '.join(_build_info.BACKENDS)}")
        devs = backends.devices()
        print("devices: " + ", ".join(f"{d.name} ({d.description})" for d in devs))
    except (ImportError, _libs.NativeLibraryError) as e:
        print(f"llama.cpp: not built ({e})")


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        if args.version:
            print_version()
            return 0
        if args.lib_dir:
            from . import _libs
            print(_libs.lib_dir())
            return 0
        if args.command == "chat":
            from .chat import run_chat
            return run_chat(args)
        if args.command == "bench":
            from .bench import run_bench
            return run_bench(args)
        if args.command == "cost":
            from .bench_cost import run_cost
            return run_cost(args)
        ap.print_help()
        return 2
    except LightKVError as e:
        print("error: " + user_message(e), file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug of ours: still one line, --verbose shows where
        if getattr(args, "verbose", False):
            raise
        print(f"internal error: {type(e).__name__}: {e} (rerun with -v for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
