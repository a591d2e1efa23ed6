"""`python -m lightkv_edge cost`: what each mode costs on a given model, measured side by side.

Quality is `bench`'s job (the embedded shapes task); this is the cost of a configuration on
any GGUF pair, e.g. the full-depth random-weight models of `scripts/make_shape_models.py`
(speed and memory do not depend on the weight values) or a real model.

How it measures, so the figures can be trusted on a small, shared machine:
- one fresh process per (configuration, run): the model is loaded, one warm-up turn runs,
  then one timed turn with a short answer and one with a long answer (end-of-generation
  ignored, so every configuration decodes the same number of tokens); peak RSS is that
  process's own (`ru_maxrss`), so configurations do not share a heap;
- runs are interleaved: run 1 of every configuration, then run 2 of every configuration,
  ..., the order rotated each round, so a drift of the machine's speed hits all alike;
- each figure is reported as the median over the runs with its min and max; ratios to
  `off` are taken run by run (run i of a configuration over run i of `off`) and their
  median reported, as `farm`-style A/B timing does.

Configurations: `off`; `embed`, `layer` at each kept fraction; `evict` (off + KV eviction
keeping that fraction after the prefill), `decode-evict` (the same, re-scored every
64 answer tokens) and `embed+evict` (merge to sqrt(KEEP), evict to sqrt(KEEP) of that). Per configuration: vision tokens in and kept, vision encode ms, merge
(and guidance) ms, LLM prefill ms, time to first token (the engine's: from the call to the first
answer token sampled and decoded), KV cells and bytes after the
prefill (after the eviction, for the evict modes), decode tokens/s for the short and the
long answer, KV bytes at the end of the long answer, and peak RSS. Threads: --threads for llama.cpp and our
merge; BLAS/OpenMP pools of the worker are set to 1 (stated in the report).
Timings are reported, never asserted.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

# evict: off + KV eviction keeping KEEP after the prefill; decode-evict: the same, and
# re-scored down to KEEP of what is left every 64 answer tokens (docs/eviction.md);
# embed+evict: the same final budget in two halves, as bench's row of that name
MODES = ("off", "embed", "layer", "evict", "decode-evict", "embed+evict")
DECODE_EVICT_EVERY = 64
DEFAULT_KEEPS = (0.75, 0.55, 0.35, 0.25, 0.10)
PROMPT = "Describe the objects in this picture and their colours."
# figures a worker reports, in the order of the table
FIGURES = ("vision_tokens_in", "vision_tokens_kept", "t_encode_ms", "t_merge_ms",
           "t_guidance_ms", "t_compact_ms", "t_prefill_ms", "ttft_ms", "kv_cells", "kv_bytes",
           "decode_tps_short", "decode_tps_long", "kv_bytes_end_long", "peak_rss_mb")
TIMED = ("t_encode_ms", "t_merge_ms", "t_prefill_ms", "ttft_ms", "decode_tps_short",
         "decode_tps_long")


@dataclass(frozen=True)
class Config:
    mode: str
    keep: float          # 1.0 for off

    @property
    def name(self) -> str:
        return "off" if self.mode == "off" else f"{self.mode}@{self.keep:g}"


def parse_configs(modes: str, keeps: str | None) -> list[Config]:
    """`off` once, then every other mode at every kept fraction."""
    names = [m.strip() for m in modes.split(",") if m.strip()]
    bad = [m for m in names if m not in MODES]
    if bad or not names:
        raise InputError(f"unknown mode {', '.join(bad) or repr(modes)} "
                         f"(choose from {', '.join(MODES)})", param="modes")
    try:
        ks = [float(k) for k in keeps.split(",")] if keeps else list(DEFAULT_KEEPS)
    except ValueError:
        raise InputError(f"keeps must be a comma-separated list of numbers, got {keeps!r}",
                         param="keeps") from None
    if not ks or any(not 0 < k <= 1 for k in ks):
        raise InputError(f"every one of keeps must be in (0, 1], got {keeps}", param="keeps")
    out = [Config("off", 1.0)] if "off" in names else []
    out += [Config(m, k) for m in names if m != "off" for k in ks]
    return out


def synthetic_image(size: int):
    """A deterministic picture with structure (discs on a gradient, mild noise), size^2 px:
    the cost does not depend on what the picture shows, only on its size."""
    import numpy as np

    from .images import Image
    rng = np.random.default_rng(size)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([180 * xx + 40, 160 * yy + 50, 120 * (1 - xx) + 60], -1)
    for _ in range(12):
        cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.04, 0.12)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    img += rng.normal(0, 6, img.shape)
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    return Image(f"synthetic-{size}px", size, size, np.ascontiguousarray(rgb).tobytes())


# ------------------------------------------------------------------------ one run (worker)
def mode_settings(mode: str, keep: float, method: str | None = None) -> dict:
    """VisionChat's settings of a configuration (method: embed mode's, None = its default)."""
    if mode == "embed" and method:
        return {"mode": mode, "keep": keep, "method": method}
    if mode == "evict":
        return {"mode": "off", "evict": keep}
    if mode == "decode-evict":
        return {"mode": "off", "evict": keep, "decode_evict": DECODE_EVICT_EVERY}
    if mode == "embed+evict":
        return {"mode": "embed", "keep": keep ** 0.5, "evict": keep ** 0.5,
                **({"method": method} if method else {})}
    return {"mode": mode, "keep": keep}


def _job_image(job: dict):
    from .images import as_image
    return as_image(job["image"]) if job.get("image") else synthetic_image(job["image_size"])


def encode_once(job: dict) -> dict:
    """--encode-once: encode the picture twice in this process (the first run pays for the
    cold start), keep the second's time, and save its output for every run to reuse."""
    import numpy as np

    from . import mtmd
    from .engine import VisionChat

    chat = VisionChat(job["model"], job["mmproj"], mode="off", n_threads=job["threads"],
                      ctx_size=job["ctx_size"], gpu_layers=job.get("gpu_layers"),
                      image_cache=0)
    try:
        chunks = chat._tokenize(chat.marker + PROMPT, [_job_image(job)])
        try:
            chunk_list = list(chat._chunks(chunks))
            keys = mtmd.image_keys(chunk_list)
            t_ms, saved = 0.0, {}
            for _ in range(2):
                t_ms = 0.0
                for ch, key in keys.items():
                    embd, ms, _ = chat.m.encode(ch)
                    t_ms += ms
                    saved[key] = embd
        finally:
            mtmd.chunks_free(chunks)
    finally:
        chat.close()
    np.savez(job["encode_to"], **{k.replace("/", "@"): v for k, v in saved.items()})
    return {"t_encode_ms": t_ms, "image_chunks": len(saved)}


def _load_encoded(path: str) -> dict:
    import numpy as np
    with np.load(path) as z:
        return {k.replace("@", "/"): z[k] for k in z.files}


def measure(job: dict) -> dict:
    """One configuration in this process: warm-up turn, a short and a long timed turn.
    With job["encoded"] (--encode-once) the picture's encoder output is read from that
    file: the warm-up is a text turn and the timed turns skip the encoder."""
    import resource

    from .engine import VisionChat
    from .errors import ModelError

    image = _job_image(job)
    encoded = job.get("encoded")
    chat = VisionChat(job["model"], job["mmproj"], **mode_settings(job["mode"], job["keep"], job.get("method")),
                      n_threads=job["threads"], ctx_size=job["ctx_size"],
                      gpu_layers=job.get("gpu_layers"), ignore_eos=True,
                      image_cache=4 if encoded else 0)
    try:
        if encoded:
            entries = _load_encoded(encoded)
            chat.m.add_encoded_images(entries)
            chat.ask("Hello.", [], max_tokens=2)           # warm-up: pages, backends
        else:
            chat.ask(PROMPT, [image], max_tokens=2)       # warm-up: caches, graphs, pages
        out: dict = {}
        for key, n_tokens in (("short", job["short_tokens"]), ("long", job["long_tokens"])):
            chat.reset()
            for _ in chat.stream(PROMPT, [image], max_tokens=n_tokens):
                pass
            st = chat.last_stats
            if encoded and st.images_cached != len(entries):
                raise ModelError(f"the encoder ran in a timed turn ({st.images_cached} of "
                                   f"{len(entries)} image chunks came from --encode-once)")
            out[f"decode_tps_{key}"] = st.decode_tps
            out[f"n_decoded_{key}"] = st.n_decoded
            out[f"kv_bytes_end_{key}"] = chat.m.kv_bytes()   # after the answer
            if key == "short":      # the prefill figures of the first timed turn
                # the vision cells the cache holds: after the eviction when one ran
                kept = st.evict_vision_after if st.evict_vision_before else st.vision_tokens_kept
                out.update(vision_tokens_in=st.vision_tokens_in, vision_tokens_kept=kept,
                           t_encode_ms=st.t_encode_ms, t_merge_ms=st.t_merge_ms,
                           t_guidance_ms=st.t_guidance_ms, t_compact_ms=st.t_compact_ms,
                           t_prefill_ms=st.t_prefill_ms, ttft_ms=st.ttft_ms,
                           kv_cells=st.kv_cells, kv_bytes=st.kv_bytes)
    finally:
        chat.close()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _worker_main(argv: list[str]) -> int:
    from .errors import LightKVError

    job = json.loads(argv[0])
    try:
        result = encode_once(job) if job.get("encode_to") else measure(job)
    except LightKVError as e:      # the parent shows this one line
        print(" ".join(str(e).split()), file=sys.stderr)
        # a keep this model's depth cannot reach in layer mode: the parent skips the
        # configuration (as bench does), the others go on
        return UNREACHABLE if job["mode"] == "layer" and getattr(e, "param", None) == "keep" \
            else 2
    print(json.dumps(result), flush=True)
    return 0


# ------------------------------------------------------------------------ the sweep
def _run_worker(job: dict, timeout: float) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lightkv_edge.bench_cost", json.dumps(job)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise InputError(f"one run of {job['mode']}@{job['keep']} took over {timeout:.0f} s "
                         "(raise --run-timeout, or fewer --long-tokens)",
                         param="run_timeout") from None
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        if p.returncode == UNREACHABLE:
            raise _Unreachable(tail)
        raise InputError(f"a run of {job['mode']}@{job['keep']} failed: {tail}", param="model")
    return json.loads(p.stdout.strip().splitlines()[-1])


UNREACHABLE = 3   # the worker's exit code for a layer-mode keep the model cannot reach


class _Unreachable(Exception):
    """A configuration this model cannot run (its reason in the message)."""


class RunsFile:
    """--resume FILE: every finished run appended as a JSON line, so a sweep of hours
    survives its process (or session) and goes on where it stopped. The first line names
    the sweep (model, configurations, answer lengths, ...): a file of another sweep is
    refused. A round (every configuration once) counts only when whole: the ratios to off
    pair runs of one round, which ran side by side; a round cut short is run again."""

    def __init__(self, path: str, sweep: dict):
        self.path, self.sweep = Path(path), sweep
        self.rounds: dict[int, dict[str, dict]] = {}
        self.skipped: dict[str, str] = {}
        if self.path.exists() and self.path.stat().st_size:
            self._load()
        else:
            self._write([{"sweep": sweep}])

    def _load(self) -> None:
        try:
            lines = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            head = lines[0]["sweep"]
        except (OSError, ValueError, KeyError, IndexError):
            raise InputError(f"{self.path} is not a runs file of `cost --resume`",
                             param="resume") from None
        differ = sorted(k for k in set(head) | set(self.sweep)
                        if head.get(k) != self.sweep.get(k))
        if differ:
            raise InputError(f"{self.path} holds another sweep (it differs in "
                             f"{', '.join(differ)}); give another --resume file",
                             param="resume")
        for x in lines[1:]:
            if "begin_round" in x:      # a round run again starts from nothing
                self.rounds[x["begin_round"]] = {}
            elif "skipped" in x:
                self.skipped[x["skipped"]] = x["reason"]
            elif "round" in x:
                self.rounds.setdefault(x["round"], {})[x["config"]] = x["run"]

    def _write(self, lines: list[dict], mode: str = "w") -> None:
        try:
            with open(self.path, mode) as f:
                f.writelines(json.dumps(x) + "\n" for x in lines)
        except OSError as e:
            raise InputError(f"cannot write {self.path}: {e.strerror}", param="resume") from None

    def done(self, i: int, names: list[str]) -> dict[str, dict] | None:
        """Round i's runs when the file holds it whole (every name not skipped), else None."""
        got = self.rounds.get(i, {})
        want = [n for n in names if n not in self.skipped]
        return {n: got[n] for n in want} if all(n in got for n in want) else None

    def begin(self, i: int) -> None:
        self.rounds[i] = {}
        self._write([{"begin_round": i}], "a")

    def add(self, i: int, name: str, run: dict) -> None:
        self._write([{"round": i, "config": name, "run": run,
                      "at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}], "a")

    def skip(self, name: str, reason: str) -> None:
        self.skipped[name] = reason
        self._write([{"skipped": name, "reason": reason}], "a")


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def summarize(configs: list[Config], runs: dict[str, list[dict]]) -> list[dict]:
    """Median / min / max of every figure, and run-by-run ratios to off."""
    rows = []
    base = runs.get("off")
    for c in configs:
        rs = runs[c.name]
        row = {"config": c.name, "mode": c.mode, "keep": c.keep,
               **{f: _spread([r[f] for r in rs]) for f in FIGURES}}
        if base and c.mode != "off":
            row["vs_off"] = {f: _spread([r[f] / b[f] for r, b in zip(rs, base) if b[f]])
                             for f in ("t_prefill_ms", "ttft_ms", "kv_bytes",
                                       "decode_tps_long", "kv_bytes_end_long", "peak_rss_mb")}
        rows.append(row)
    return rows


def run_cost(args) -> int:
    from .model import check_gguf

    configs = parse_configs(args.modes, args.keep)
    if args.max_new_rounds is not None and not args.resume:
        raise InputError("max_new_rounds needs --resume FILE, where the other sittings' "
                         "rounds are kept", param="max_new_rounds")
    if args.method is not None:
        from .embed_mode import METHODS
        if args.method not in METHODS:
            raise InputError(f"unknown method {args.method!r} (choose from "
                             f"{', '.join(METHODS)})", param="method")
    if not args.model or not args.mmproj:
        raise InputError("give both --model and --mmproj (the text model and its vision "
                         "projector)", param="model")
    check_gguf(args.model, "model")
    check_gguf(args.mmproj, "mmproj")
    if args.image:
        from .images import load_image
        load_image(args.image)            # a bad picture fails here, not in every run
    for path in (args.json, args.markdown, args.resume):
        _check_writable(path)
    if args.plots:
        try:
            Path(args.plots).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot make the plots folder {args.plots}: {e.strerror}",
                             param="plots") from None
        _check_writable(str(Path(args.plots) / "cost.png"))
    job_base = dict(model=str(Path(args.model).resolve()), mmproj=str(Path(args.mmproj).resolve()),
                    image=args.image, image_size=args.image_size, threads=args.threads,
                    ctx_size=args.ctx_size, gpu_layers=args.gpu_layers,
                    short_tokens=args.short_tokens, long_tokens=args.long_tokens,
                    method=args.method)
    configs_names = [c.name for c in configs]
    resume = RunsFile(args.resume, _sweep_id(args, configs)) if args.resume else None
    skipped: dict[str, str] = dict(resume.skipped) if resume else {}
    # round -> its runs, for the rounds --resume's file holds whole
    kept = {i: r for i in range(args.runs) if resume and (r := resume.done(i, configs_names))}
    todo = [i for i in range(args.runs) if i not in kept]
    if args.max_new_rounds is not None:       # this sitting's share of a long sweep
        todo = todo[:args.max_new_rounds]
    if resume and kept:
        print(f"{args.resume}: {len(kept)} of {args.runs} rounds done before, "
              f"{len(todo)} to run", file=sys.stderr, flush=True)
    if not kept and not todo:
        raise InputError("--max-new-rounds 0 with no round done before: nothing to report",
                         param="max_new_rounds")
    encoded = None
    if args.encode_once and todo:
        import tempfile
        tmp = tempfile.TemporaryDirectory(prefix="lightkv-cost-")
        job_base["encoded"] = str(Path(tmp.name) / "encoded.npz")
        print("encoding the picture once (twice, the second timed) ...", file=sys.stderr,
              flush=True)
        encoded = _run_worker(dict(job_base, mode="off", keep=1.0,
                                   encode_to=job_base["encoded"]), args.run_timeout)
        print(f"vision encode {encoded['t_encode_ms']:.0f} ms "
              f"({encoded['image_chunks']} image chunk(s))", file=sys.stderr, flush=True)
    runs: dict[str, list[dict]] = {c.name: [] for c in configs}
    total = len(todo) * len(configs)
    t_start = time.perf_counter()
    done = 0
    for i in range(args.runs):
        if i in kept:               # a whole round from --resume's file
            for name, r in kept[i].items():
                runs[name].append(r)
            continue
        if i not in todo:           # left for a later sitting
            continue
        if resume:
            resume.begin(i)
        order = configs[i % len(configs):] + configs[:i % len(configs)]   # rotated
        for c in order:
            if c.name in skipped:
                continue
            try:
                r = _run_worker(dict(job_base, mode=c.mode, keep=c.keep), args.run_timeout)
            except _Unreachable as e:
                skipped[c.name] = str(e)
                if resume:
                    resume.skip(c.name, str(e))
                total -= len([j for j in todo if j >= i])
                print(f"{c.name}: skipped: {e}", file=sys.stderr, flush=True)
                continue
            if encoded:     # the one encoding stands in for every run's
                r["t_encode_ms"] = encoded["t_encode_ms"]
                r["ttft_ms"] += encoded["t_encode_ms"]
            runs[c.name].append(r)
            if resume:
                resume.add(i, c.name, r)
            done += 1
            eta = (time.perf_counter() - t_start) / done * (total - done)
            print(f"[{done}/{total}] {c.name:12s} prefill {r['t_prefill_ms']:8.1f} ms  "
                  f"ttft {r['ttft_ms']:8.1f} ms  kv {r['kv_bytes'] / 2**20:7.2f} MiB  "
                  f"decode {r['decode_tps_long']:6.1f} tok/s  rss {r['peak_rss_mb']:6.0f} MB"
                  f"  (eta {eta:.0f} s)", file=sys.stderr, flush=True)
    # runs[name][i] is round i of every configuration: the ratios to off pair by round
    out = {"model": Path(args.model).name, "mmproj": Path(args.mmproj).name,
           "machine": machine(),
           "cpu_count": os.cpu_count(), "threads": args.threads,
           "blas_threads": 1, "runs": len(kept) + len(todo), "runs_planned": args.runs,
           "warmup_turns": 1,
           "image": args.image or f"synthetic {args.image_size}x{args.image_size}",
           "short_tokens": args.short_tokens, "long_tokens": args.long_tokens,
           "embed_method": args.method or "default",
           "encode_once": bool(args.encode_once),
           "rounds_resumed": len(kept),
           "rows": summarize([c for c in configs if c.name not in skipped], runs),
           "skipped": skipped, "raw": {k: v for k, v in runs.items() if k not in skipped}}
    print(markdown_table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(out))
        print(f"wrote {args.markdown}", file=sys.stderr)
    if args.plots:
        from .bench_plots import cost_plots
        for p in cost_plots(out, Path(args.plots)):
            print(f"wrote {p}", file=sys.stderr)
    return 0


def machine() -> str:
    """The CPU the timings ran on: its model name and the vector units ggml's kernels use
    (a virtual machine may name every CPU alike). Runs of other machines are never pooled:
    a fresh machine named the same but with AMX ran the same sweep 6x faster."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name") and not name:
                    name = ln.split(":", 1)[1].strip()
                elif ln.startswith(("flags", "Features")) and not flags:
                    flags = set(ln.split(":", 1)[1].split())
    except OSError:
        pass
    units = [u for u in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "asimd",
                         "sve") if u in flags]
    return " ".join(x for x in (platform.machine(), name or platform.processor(),
                                f"({' '.join(units)})" if units else "") if x)


def _sweep_id(args, configs: list[Config]) -> dict:
    """What makes two sweeps' runs comparable: the machine, the files (by name and size),
    the configurations and every setting of a run."""
    def file_id(path):
        return f"{Path(path).name} ({Path(path).stat().st_size} bytes)"
    return {"model": file_id(args.model), "mmproj": file_id(args.mmproj),
            "configs": [c.name for c in configs], "method": args.method,
            "image": file_id(args.image) if args.image else f"synthetic {args.image_size}",
            "short_tokens": args.short_tokens, "long_tokens": args.long_tokens,
            "ctx_size": args.ctx_size, "threads": args.threads,
            "gpu_layers": args.gpu_layers, "encode_once": bool(args.encode_once),
            "machine": machine(), "cpu_count": os.cpu_count()}


def _check_writable(path: str | None) -> None:
    if not path:
        return
    d = Path(path).resolve().parent
    if not d.is_dir() or not os.access(d, os.W_OK):
        raise InputError(f"cannot write {path}: {d} is not a writable folder", param="output")


def markdown_table(out: dict) -> str:
    """Medians with [min, max] over the runs; the x columns are the run-by-run ratios to off."""
    def cell(row, f, fmt):
        s = row[f]
        return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}, {fmt.format(s['max'])}]"

    def ratio(row, f):
        return "" if "vs_off" not in row else f"{row['vs_off'][f]['median']:.2f}x"

    head = ["config", "tokens kept", "encode ms", "merge ms", "prefill ms", "prefill vs off",
            "TTFT ms", "TTFT vs off", "KV MiB", "decode tok/s (short)",
            f"decode tok/s ({out['long_tokens']})", "decode vs off",
            f"KV MiB after {out['long_tokens']}", "peak RSS MB"]
    lines = [f"Model `{out['model']}` + `{out['mmproj']}`; image {out['image']}; "
             f"{out['machine']}, {out['cpu_count']} CPUs, {out['threads'] or 'all'} threads "
             f"(BLAS/OpenMP pools 1); {out['runs']} runs per configuration after one warm-up "
             "turn each, one process per run, configurations interleaved. Median [min, max]."
             + (" The picture was encoded once (--encode-once): encode ms is that one "
                "measurement, and TTFT is it plus each run's own time to the first token."
                if out.get("encode_once") else "")
             + (f" {out['rounds_resumed']} of the {out['runs']} rounds were run by an earlier "
                "process (--resume), each round whole." if out.get("rounds_resumed") else "")
             + (f" **Partial: {out['runs']} of {out['runs_planned']} planned rounds so far**; "
                "the same command with --resume goes on."
                if out.get("runs_planned", out["runs"]) > out["runs"] else ""),
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in out["rows"]:
        lines.append("| " + " | ".join([
            r["config"],
            f"{r['vision_tokens_kept']['median']:.0f} / {r['vision_tokens_in']['median']:.0f}",
            cell(r, "t_encode_ms", "{:.0f}"), cell(r, "t_merge_ms", "{:.1f}"),
            cell(r, "t_prefill_ms", "{:.0f}"), ratio(r, "t_prefill_ms"),
            cell(r, "ttft_ms", "{:.0f}"), ratio(r, "ttft_ms"),
            f"{r['kv_bytes']['median'] / 2**20:.2f}",
            cell(r, "decode_tps_short", "{:.1f}"), cell(r, "decode_tps_long", "{:.1f}"),
            ratio(r, "decode_tps_long"), f"{r['kv_bytes_end_long']['median'] / 2**20:.2f}",
            f"{r['peak_rss_mb']['median']:.0f}"]) + " |")
    split = [r for r in out["rows"] if r.get("t_compact_ms", {}).get("median")]
    if split:
        lines.append("\nmerge ms of layer mode, medians: " + "; ".join(
            f"{r['config']} guidance {r['t_guidance_ms']['median']:.1f} + merge "
            f"{r['t_merge_ms']['median'] - r['t_guidance_ms']['median'] - r['t_compact_ms']['median']:.1f}"
            f" + KV compaction {r['t_compact_ms']['median']:.1f}" for r in split) + ".")
    for name, reason in out.get("skipped", {}).items():
        lines.append(f"\n{name}: skipped ({reason})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
