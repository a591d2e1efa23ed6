"""The benchmark command: the contract of its JSON (timings are reported, never asserted)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_json_and_table(tmp_path):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    r = subprocess.run([sys.executable, "-m", "lightkv_edge", "bench", "--n", "8",
                        "--methods", "off,lightkv-protect,unguided,random,pool", "--keep", "0.5,0.25",
                        "-t", "2", "--json", str(out), "--markdown", str(md)],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    for key in ("models", "device", "version", "results"):
        assert key in data
    assert data["models"] == ["shapes-vlm-q8_0.gguf"]
    runs = {(x["method"], x["keep"]) for x in data["results"]}
    # off once; every other method at every keep, pooling only where its budget allows
    assert runs == {("off", 1.0), ("lightkv-protect", 0.5), ("unguided", 0.5), ("random", 0.5),
                    ("lightkv-protect", 0.25), ("unguided", 0.25), ("random", 0.25), ("pool", 0.25)}
    for x in data["results"]:
        for key in ("method", "keep", "accuracy", "per_type", "n", "t_encode_ms",
                    "t_merge_ms", "t_prefill_ms", "kv_bytes", "decode_tps"):
            assert key in x, key
        assert x["n"] == 8 and 0.0 <= x["accuracy"] <= 1.0
        assert set(x["per_type"]) <= {"colour", "count", "exists", "where"}
    by = {(x["method"], x["keep"]): x for x in data["results"]}
    # the same budget gives the same KV size, whatever the method
    assert by[("lightkv-protect", 0.5)]["kv_bytes"] == by[("random", 0.5)]["kv_bytes"]
    assert by[("lightkv-protect", 0.5)]["kv_bytes"] < by[("off", 1.0)]["kv_bytes"]
    assert "| method | keep |" in md.read_text()


def test_bench_over_both_embedded_models_in_one_json_and_table(tmp_path):
    """--model-name LIST: every row of every model on the same questions, in one JSON
    (each row names its model) and one markdown file with a table per model."""
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    r = subprocess.run([sys.executable, "-m", "lightkv_edge", "bench", "--n", "4",
                        "--model-name", "shapes-8x8,shapes-16x16", "--methods",
                        "off,lightkv-protect,fastv", "--keep", "0.5", "-t", "2",
                        "--json", str(out), "--markdown", str(md)],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert len(data["models"]) == 2 and len(set(data["models"])) == 2
    by = {(x["model"], x["method"]): x for x in data["results"]}
    assert set(by) == {(m, k) for m in data["models"] for k in ("off", "lightkv-protect", "fastv")}
    for model, n_in in zip(data["models"], (64, 256)):   # 8x8 and 16x16 grids
        assert by[(model, "off")]["vision_tokens_in"] == n_in
        for m in ("lightkv-protect", "fastv"):           # the same budget for both methods
            assert by[(model, m)]["vision_tokens_kept"] == n_in // 2
    text = md.read_text()
    assert all(f"Model `{m}`" in text for m in data["models"])
    assert text.count("| method | keep |") == 2


def test_bench_bad_arguments():
    for args in (["--methods", "nosuch"], ["--keep", "0"], ["--keep", "x"],
                 ["--model-name", "shapes-8x8,nosuch"],
                 ["--model-name", "shapes-8x8,shapes-8x8"]):
        r = subprocess.run([sys.executable, "-m", "lightkv_edge", "bench", "--n", "2", *args],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def _bench_rows(tmp_path, *, n: int, methods: str, keeps: str):
    """Run `bench` on the embedded model; (the finished process, rows by (method, keep))."""
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, "-m", "lightkv_edge", "bench", "--n", str(n),
                        "--methods", methods, "--keep", keeps, "-t", "2", "--json", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr
    return r, {(x["method"], x["keep"]): x for x in json.loads(out.read_text())["results"]}


def test_bench_layer_rows(tmp_path):
    """`layer` and `layer-exact` rows at the asked keeps, the layer-averaged keep as run
    beside them; a keep the embedded 3-layer model cannot reach in layer mode (0.35 <
    0.583) is skipped with its reason, and the other rows go on."""
    r, by = _bench_rows(tmp_path, n=4, methods="off,layer,layer-exact", keeps="0.75,0.35")
    assert set(by) == {("off", 1.0), ("layer", 0.75), ("layer-exact", 0.75)}
    assert r.stdout.count("skipped") == 2 and "--schedule" in r.stdout
    for m in ("layer", "layer-exact"):
        assert abs(by[m, 0.75]["keep_run"] - 0.75) < 0.05      # merge budgets are whole rows
        assert by[m, 0.75]["vision_tokens_kept"] < by[m, 0.75]["vision_tokens_in"]
    # compact frees the merged-away cells; exact keeps every layer range's rows (more
    # cells than off: the text rows once per range)
    assert by["layer", 0.75]["kv_bytes"] < by["off", 1.0]["kv_bytes"] \
        < by["layer-exact", 0.75]["kv_bytes"]


def test_bench_eviction_rows(tmp_path):
    """`evict` (on off) and `embed+evict` rows: their budget is the vision cells the cache
    holds after the eviction, and the KV bytes follow it."""
    import math
    from lightkv_edge.evict import keep_count
    _, by = _bench_rows(tmp_path, n=2, methods="off,evict,embed+evict", keeps="0.5,0.25,0.1")
    assert set(by) == {("off", 1.0)} | {(m, k) for m in ("evict", "embed+evict")
                                        for k in (0.5, 0.25, 0.1)}
    n = by[("off", 1.0)]["vision_tokens_in"]
    for k in (0.5, 0.25, 0.1):
        assert by[("evict", k)]["vision_tokens_kept"] == keep_count(n, k)
        merged = math.ceil(k ** 0.5 * n)                 # embed keeps ceil(keep * n)
        assert by[("embed+evict", k)]["vision_tokens_kept"] == keep_count(merged, k ** 0.5)
        assert by[("evict", k)]["kv_bytes"] < by[("off", 1.0)]["kv_bytes"]
    assert by[("evict", 0.1)]["kv_bytes"] < by[("evict", 0.5)]["kv_bytes"]
