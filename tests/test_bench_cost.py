"""`python -m lightkv_edge cost`: the sweep's bookkeeping, its report and pictures, its
errors, and one real (tiny) sweep end to end. Never timings: only that every figure is
there, in its range, and paired the way the report says."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightkv_edge import bench_cost
from lightkv_edge.embedded import embedded_model
from lightkv_edge.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "lightkv_edge", "cost", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_configs_are_off_once_then_every_mode_at_every_keep():
    cs = bench_cost.parse_configs("off,embed,layer", "0.5,0.25")
    assert [c.name for c in cs] == ["off", "embed@0.5", "embed@0.25", "layer@0.5", "layer@0.25"]
    assert [c.name for c in bench_cost.parse_configs("embed", None)] == \
        [f"embed@{k:g}" for k in bench_cost.DEFAULT_KEEPS]
    # the eviction configurations, as VisionChat settings (embed+evict: bench's split)
    assert bench_cost.mode_settings("evict", 0.25) == {"mode": "off", "evict": 0.25}
    assert bench_cost.mode_settings("decode-evict", 0.25) == {
        "mode": "off", "evict": 0.25, "decode_evict": bench_cost.DECODE_EVICT_EVERY}
    assert bench_cost.mode_settings("embed+evict", 0.25) == {
        "mode": "embed", "keep": 0.5, "evict": 0.5}
    assert bench_cost.mode_settings("embed", 0.5, "lightkv-paper") == {
        "mode": "embed", "keep": 0.5, "method": "lightkv-paper"}


@pytest.mark.parametrize("modes, keeps", [("off,bogus", None), ("", None),
                                          ("embed", "0.5,x"), ("embed", "0"),
                                          ("embed", "1.5")])
def test_bad_configs_are_input_errors(modes, keeps):
    with pytest.raises(InputError):
        bench_cost.parse_configs(modes, keeps)


def _fake_run(scale: float, kept: int) -> dict:
    r = {f: 1.0 for f in bench_cost.FIGURES}
    r.update(vision_tokens_in=64, vision_tokens_kept=kept, t_prefill_ms=10 * scale,
             ttft_ms=20 * scale, kv_bytes=1000 * kept / 64, decode_tps_long=5 / scale,
             peak_rss_mb=100.0)
    return r


def test_ratios_to_off_are_paired_by_round():
    cs = bench_cost.parse_configs("off,embed", "0.5")
    # the machine gets 2x slower in round 2: paired ratios stay exactly 0.5, unpaired
    # medians would not
    runs = {"off": [_fake_run(1, 64), _fake_run(2, 64), _fake_run(1, 64)],
            "embed@0.5": [_fake_run(0.5, 32), _fake_run(1, 32), _fake_run(0.5, 32)]}
    rows = bench_cost.summarize(cs, runs)
    assert "vs_off" not in rows[0]
    e = rows[1]
    assert e["vs_off"]["t_prefill_ms"] == {"median": 0.5, "min": 0.5, "max": 0.5, "n": 3}
    assert e["vs_off"]["kv_bytes"]["median"] == 0.5
    assert e["t_prefill_ms"] == {"median": 5.0, "min": 5.0, "max": 10.0, "n": 3}
    table = bench_cost.markdown_table({"model": "m.gguf", "mmproj": "p.gguf", "image": "x",
                                       "machine": "cpu", "cpu_count": 2, "threads": 2,
                                       "runs": 3, "long_tokens": 512, "rows": rows})
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert len(lines) == 1 + len(cs)          # header + one row per configuration
    assert "0.50x" in lines[2] and "32 / 64" in lines[2]


def test_plots_are_written(tmp_path):
    from lightkv_edge.bench_plots import cost_plots
    cs = bench_cost.parse_configs("off,embed,layer", "0.75,0.5")
    runs = {c.name: [_fake_run(c.keep, int(64 * c.keep)) for _ in range(2)] for c in cs}
    out = {"model": "m.gguf", "runs": 2, "threads": 2, "rows": bench_cost.summarize(cs, runs)}
    files = cost_plots(out, tmp_path)
    assert [f.name for f in files] == ["cost-prefill-m.png", "cost-kv-m.png", "cost-ttft-m.png"]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000


def test_quality_plot_is_written(tmp_path):
    from lightkv_edge.bench_plots import quality_plot
    rows = [{"model": mo, "method": "off", "keep": 1.0, "n": 40, "accuracy": 0.9,
             "ci95": [0.8, 0.95]} for mo in ("a.gguf", "b.gguf")]
    rows += [{"model": mo, "method": m, "keep": k, "n": 40, "accuracy": a * k,
              "ci95": [a * k - .1, a * k]}
             for mo in ("a.gguf", "b.gguf") for m, a in (("embed", 0.9), ("fastv", 0.8))
             for k in (0.25, 0.55, 0.75)]
    b = {"models": ["a.gguf", "b.gguf"], "split": "test", "seed": 0, "results": rows}
    f = quality_plot(b, tmp_path / "q.png")
    assert f.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, needle", [
    (["--modes", "off,bogus"], "unknown mode bogus"),
    (["--keep", "1.5"], "--keep"),
    (["-m", "MODEL"], "give both --model and --mmproj"),
    (["-m", "README.md", "--mmproj", "README.md"], "not a GGUF file"),
    (["-m", "MODEL", "--mmproj", "MMPROJ", "--json", "/nonexistent-dir/c.json"], "cannot write"),
    (["-m", "MODEL", "--mmproj", "MMPROJ", "--image", "README.md"], "README.md"),
    (["-m", "MODEL", "--mmproj", "MMPROJ", "--method", "bogus"], "unknown method 'bogus'"),
])
def test_bad_input_is_one_line_exit_2(args, needle):
    model, mmproj = embedded_model()
    args = [{"MODEL": str(model), "MMPROJ": str(mmproj)}.get(a, a) for a in args]
    p = _cli(*args, timeout=120)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr, p.stderr


def test_a_tiny_sweep_end_to_end(tmp_path):
    """Three configurations, two rounds, on the embedded model: every figure present and
    sane, the processes really separate (one row per run in raw), files written; layer
    mode at a keep the 3-layer model cannot reach is skipped with its reason, the rest go on."""
    model, mmproj = embedded_model()
    out = tmp_path / "cost.json"
    p = _cli("-m", str(model), "--mmproj", str(mmproj), "--modes", "off,embed,evict,layer",
             "--keep", "0.55", "--runs", "2", "--short-tokens", "2", "--long-tokens", "4",
             "--image-size", "128", "-t", "1", "--json", str(out),
             "--markdown", str(tmp_path / "cost.md"))
    assert p.returncode == 0, p.stderr
    d = json.loads(out.read_text())
    assert [r["config"] for r in d["rows"]] == ["off", "embed@0.55", "evict@0.55"]
    assert all(len(v) == 2 for v in d["raw"].values()) and set(d["raw"]) == {
        "off", "embed@0.55", "evict@0.55"}
    assert list(d["skipped"]) == ["layer@0.55"] and "--schedule" in d["skipped"]["layer@0.55"]
    assert p.stderr.count("layer@0.55: skipped") == 1       # tried once, not every round
    off, emb, ev = d["rows"]
    assert off["vision_tokens_kept"]["median"] == off["vision_tokens_in"]["median"] == 64
    assert emb["vision_tokens_kept"]["median"] == 36          # ceil(0.55 * 64)
    assert emb["kv_bytes"]["median"] < off["kv_bytes"]["median"]
    assert off["t_merge_ms"]["max"] == 0 and emb["t_merge_ms"]["min"] > 0
    # eviction: all 64 rows prefilled, round(0.55 * 64) = 35 cells kept, bytes after it
    assert ev["vision_tokens_kept"]["median"] == 35
    assert ev["kv_bytes"]["median"] < off["kv_bytes"]["median"]
    assert ev["kv_bytes_end_long"]["median"] < off["kv_bytes_end_long"]["median"]
    for r in d["rows"]:
        for f in bench_cost.FIGURES:
            assert r[f]["min"] <= r[f]["median"] <= r[f]["max"] and r[f]["n"] == 2
        assert r["ttft_ms"]["min"] >= r["t_prefill_ms"]["min"] > 0
        assert r["peak_rss_mb"]["min"] > 10
    for run in d["raw"]["off"] + d["raw"]["embed@0.55"] + d["raw"]["evict@0.55"]:
        assert run["n_decoded_short"] == 2 and run["n_decoded_long"] == 4   # eos ignored
    assert (tmp_path / "cost.md").read_text().count("\n| ") == 4
    assert "layer@0.55: skipped" in (tmp_path / "cost.md").read_text()


def test_encode_once_reuses_one_encoding_in_every_run(tmp_path):
    """--encode-once: one encoding, timed in its own process, stands in for every run's; the
    runs skip the encoder (the worker fails if a timed turn ran it) and give the same
    figures otherwise (tokens kept, KV bytes) as the usual runs."""
    model, mmproj = embedded_model()
    common = ["-m", str(model), "--mmproj", str(mmproj), "--modes", "off,embed",
              "--keep", "0.55", "--runs", "1", "--short-tokens", "2", "--long-tokens", "4",
              "--image-size", "128", "-t", "1"]
    once, usual = tmp_path / "once.json", tmp_path / "usual.json"
    p = _cli(*common, "--encode-once", "--json", str(once),
             "--markdown", str(tmp_path / "cost.md"))
    assert p.returncode == 0, p.stderr
    q = _cli(*common, "--json", str(usual))
    assert q.returncode == 0, q.stderr
    d, u = json.loads(once.read_text()), json.loads(usual.read_text())
    assert d["encode_once"] is True and u["encode_once"] is False
    enc = {run["t_encode_ms"] for runs in d["raw"].values() for run in runs}
    assert len(enc) == 1 and enc.pop() > 0            # one measurement, in every run
    for r, w in zip(d["rows"], u["rows"]):
        assert r["config"] == w["config"]
        assert r["ttft_ms"]["min"] > r["t_encode_ms"]["min"]
        for f in ("vision_tokens_in", "vision_tokens_kept", "kv_cells", "kv_bytes"):
            assert r[f]["median"] == w[f]["median"], f
    assert "--encode-once" in (tmp_path / "cost.md").read_text()


def test_resume_keeps_whole_rounds_and_reruns_a_cut_one(tmp_path):
    """--resume: a second process keeps the file's whole rounds (the same runs, not new
    ones) and runs only the rounds left; a round cut short runs again whole, never mixed
    with the runs of the cut attempt; a file of another sweep is refused in one line."""
    model, mmproj = embedded_model()
    runs_file = tmp_path / "runs.jsonl"
    common = ["-m", str(model), "--mmproj", str(mmproj), "--modes", "off,embed",
              "--keep", "0.55", "--short-tokens", "2", "--long-tokens", "4",
              "--image-size", "128", "-t", "1", "--resume", str(runs_file)]
    first, second, third = (tmp_path / f"{n}.json" for n in ("a", "b", "c"))
    p = _cli(*common, "--runs", "2", "--json", str(first))
    assert p.returncode == 0, p.stderr
    a = json.loads(first.read_text())
    assert a["rounds_resumed"] == 0
    p = _cli(*common, "--runs", "3", "--json", str(second))
    assert p.returncode == 0, p.stderr
    assert "2 of 3 rounds done before, 1 to run" in p.stderr
    b = json.loads(second.read_text())
    assert b["rounds_resumed"] == 2
    for name in ("off", "embed@0.55"):
        assert len(b["raw"][name]) == 3
        assert b["raw"][name][:2] == a["raw"][name]          # kept, not measured again
    # a sitting that only reports: the whole rounds so far, marked partial
    md = tmp_path / "cost.md"
    p = _cli(*common, "--runs", "5", "--max-new-rounds", "0", "--json", str(second),
             "--markdown", str(md))
    assert p.returncode == 0, p.stderr
    b = json.loads(second.read_text())
    assert (b["runs"], b["runs_planned"], b["rounds_resumed"]) == (3, 5, 3)
    assert "Partial: 3 of 5 planned rounds" in md.read_text()
    p = _cli(*[x for x in common if x not in ("--resume", str(runs_file))],
             "--max-new-rounds", "1")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "--max-new-rounds needs --resume" in p.stderr
    # cut round 2 after its first run: the next process runs round 2 again, whole
    lines = runs_file.read_text().splitlines()
    last_begin = max(i for i, x in enumerate(lines) if '"begin_round": 2' in x)
    runs_file.write_text("\n".join(lines[:last_begin + 2]) + "\n")
    p = _cli(*common, "--runs", "3", "--json", str(third))
    assert p.returncode == 0, p.stderr
    assert "2 of 3 rounds done before, 1 to run" in p.stderr
    c = json.loads(third.read_text())
    cut_run = json.loads(lines[last_begin + 1])
    assert cut_run["round"] == 2
    assert c["raw"][cut_run["config"]][2] != cut_run["run"]     # measured again
    assert all(len(v) == 3 for v in c["raw"].values())
    assert runs_file.read_text().count('"begin_round": 2') == 2
    # another sweep in the same file: refused before any run
    p = _cli(*[("8" if x == "4" else x) for x in common], "--runs", "3")
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1
    assert "holds another sweep (it differs in long_tokens)" in p.stderr
