"""Regenerate the benchmark report (report.md in --out, docs/bench by default), with its
JSON, tables and pictures.

    python scripts/bench_report.py                        # the whole report (hours on 2 cores)
    python scripts/bench_report.py --cost-model qwen2vl-2b --cost-model smolvlm-500m
    python scripts/bench_report.py --quick --out /tmp/r   # a smoke run of every step (minutes)

Every step is a command a person can run alone; each is printed before it runs:
1. quality: `python -m lightkv_edge bench` on both embedded models, every method and mode,
   the same questions for every row -> quality.json, its markdown table, quality.png;
2. cost on the embedded 8x8 model: `python -m lightkv_edge cost` (one process per run,
   configurations interleaved) -> cost-<model>.json, its table and three pictures;
3. the same for every --cost-model, a full-depth random-weight model of a real model's shapes
   (scripts/make_shape_models.py builds it once and caches it), with `--encode-once`: its
   vision tower runs once, timed, and every run reuses that output;
4. report.md: the tables and pictures, and how they were made.
Do not run anything else on the machine meanwhile: the cost figures are timings.
The whole report takes longer than one sitting on 2 cores; run the same command again and it
goes on: a quality step done before is kept (steps.json), and each cost sweep keeps its whole
rounds (cost-<model>.runs.jsonl, `cost --resume`). --max-new-rounds N bounds a sitting
(0 writes the report from what is done, partial sweeps marked so). --fresh starts over.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("off,lightkv-protect,lightkv-paper,unguided,random,fastv,dart,pool,"
           "layer,layer-paper,layer-exact,evict,embed+evict")
MODELS = "shapes-8x8,shapes-16x16"
COST_MODES = "off,embed,layer,evict,decode-evict"


def run(cmd: list[str], capture: bool = False) -> str:
    """Run one step, its command printed first, its progress shown as it goes (or, with
    capture, its stdout back). A failed step ends the report with that step's last line."""
    print("$ " + " ".join(["python", *cmd[1:]] if cmd[0] == sys.executable else cmd), flush=True)
    p = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE if capture else None, text=True)
    if p.returncode != 0:
        sys.exit(f"error: step failed (exit {p.returncode}): {' '.join(cmd[1:4])} ...")
    return p.stdout or ""


def shape_model(name: str) -> tuple[str, str]:
    """(text GGUF, mmproj GGUF) of a full-depth shape model, built once and cached."""
    out = run([sys.executable, "scripts/make_shape_models.py", name],
              capture=True).strip().splitlines()
    _, text, mmproj = out[-1].split("\t")
    return text, mmproj


def cost(out: Path, text: str, mmproj: str, a, image_size: int, encode_once=False) -> dict:
    stem = Path(text).stem
    # every finished run is kept in cost-<stem>.runs.jsonl: a report cut short (or done over
    # several sittings) goes on from the last whole round
    cmd = [sys.executable, "-m", "lightkv_edge", "cost", "-m", text, "--mmproj", mmproj,
           "--resume", str(out / f"cost-{stem}.runs.jsonl"),
           "--modes", a.cost_modes, "--keep", a.cost_keep, "--runs", str(a.runs),
           "--short-tokens", str(a.short_tokens), "--long-tokens", str(a.long_tokens),
           "--image-size", str(image_size), "--json", str(out / f"cost-{stem}.json"),
           "--markdown", str(out / f"cost-{stem}.md"), "--plots", str(out)]
    if a.threads:
        cmd += ["-t", str(a.threads)]
    if encode_once:     # a full-depth vision tower takes minutes a run on a CPU
        cmd += ["--encode-once"]
    if a.max_new_rounds is not None:
        cmd += ["--max-new-rounds", str(a.max_new_rounds)]
    run(cmd)
    return json.loads((out / f"cost-{stem}.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[1:]))
    ap.add_argument("--out", default="docs/bench", help="folder of the report (default docs/bench)")
    ap.add_argument("--n", type=int, default=400, help="questions per quality row (default 400)")
    ap.add_argument("--seed", type=int, default=0, help="draw of the held-out questions")
    ap.add_argument("--keep", default="0.75,0.55,0.35,0.25,0.1", help="quality keeps")
    ap.add_argument("--cost-modes", default=COST_MODES, help=f"cost modes (default {COST_MODES})")
    ap.add_argument("--cost-keep", default="0.75,0.55,0.25", help="cost keeps")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per cost configuration")
    ap.add_argument("--short-tokens", type=int, default=16)
    ap.add_argument("--long-tokens", type=int, default=512)
    ap.add_argument("--cost-model", action="append", default=[], metavar="NAME",
                    help="a full-depth shape model to cost too (scripts/make_shape_models.py "
                         "names; repeatable)")
    ap.add_argument("-t", "--threads", type=int, default=None, help="CPU threads")
    ap.add_argument("--quick", action="store_true",
                    help="every step at smoke size: n 4, keep 0.75, 1 run, 8-token answers")
    ap.add_argument("--max-new-rounds", type=int, default=None, metavar="N",
                    help="run at most N more rounds of each cost sweep in this sitting (0: "
                         "write the report from what is done); a sweep with fewer than "
                         "--runs rounds is marked partial")
    ap.add_argument("--fresh", action="store_true",
                    help="start over: forget the steps and cost runs of an earlier sitting "
                         "(by default a report goes on where the last one stopped)")
    a = ap.parse_args()
    if a.quick:
        a.n, a.keep, a.cost_keep, a.runs, a.short_tokens, a.long_tokens = 4, "0.75", "0.75", 1, 2, 8
    out = (REPO / a.out).resolve() if not Path(a.out).is_absolute() else Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    from lightkv_edge.bench import markdown_table
    from lightkv_edge.bench_plots import quality_plot
    from lightkv_edge.embedded import embedded_model

    steps_file = out / "steps.json"       # the steps done, for a report made in sittings
    if a.fresh:
        for f in [steps_file, *out.glob("cost-*.runs.jsonl")]:
            f.unlink(missing_ok=True)
    steps = json.loads(steps_file.read_text()) if steps_file.exists() else []

    # 1. quality
    cmd = [sys.executable, "-m", "lightkv_edge", "bench", "--model-name", MODELS,
           "--methods", METHODS, "--keep", a.keep, "--n", str(a.n), "--seed", str(a.seed),
           "--json", str(out / "quality.json"), "--markdown", str(out / "quality.md")]
    if a.threads:
        cmd += ["-t", str(a.threads)]
    # the step as a person would type it in the checkout: no machine's paths in steps.json
    step = " ".join(cmd[1:]).replace(f"{REPO}/", "")
    if step in steps and (out / "quality.json").exists():
        print(f"quality: done before ({steps_file.name}), kept", flush=True)
    else:
        run(cmd)
        steps_file.write_text(json.dumps(steps + [step], indent=1))
    quality = json.loads((out / "quality.json").read_text())
    quality_plot(quality, out / "quality.png")

    # 2. and 3. cost
    costs = [cost(out, *map(str, embedded_model()), a, image_size=128)]
    for name in a.cost_model:
        costs.append(cost(out, *shape_model(name), a, image_size=672, encode_once=True))

    # 4. the report
    from lightkv_edge.bench_cost import markdown_table as cost_table
    lines = ["# lightkv-edge benchmark report", "",
             f"Made by `python scripts/bench_report.py {' '.join(sys.argv[1:])}` on "
             f"{datetime.date.today()}, {platform.machine()} with "
             f"{__import__('os').cpu_count()} CPUs. Accuracy is never a timing; every "
             "timing is a median over runs interleaved across configurations, ratios to "
             "`off` paired run by run.", "",
             "## Quality: accuracy at each kept fraction", "",
             "![accuracy vs kept fraction](quality.png)", "",
             "The ms and tok/s columns here are per-question means of the accuracy run, "
             "which may share the machine; the timings to compare are the cost tables'.",
             "", markdown_table(quality),
             "## Cost", ""]
    for c in costs:
        stem = Path(c["model"]).stem
        lines += [f"### `{c['model']}`", "", cost_table(c),
                  f"![prefill](cost-prefill-{stem}.png) ![KV](cost-kv-{stem}.png) "
                  f"![time to first token](cost-ttft-{stem}.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
