"""scripts/bench_report.py, the one command behind the benchmark report: every step at
smoke size, and the report holds what the issue names (never a timing asserted)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _report(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/bench_report.py", "--quick", "-t", "2",
                           "--out", str(out), *extra], cwd=REPO, capture_output=True,
                          text=True, timeout=1200)


def test_quick_report_has_every_method_model_and_picture(tmp_path):
    r = _report(tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    quality = json.loads((tmp_path / "quality.json").read_text())
    methods = set(__import__("scripts.bench_report", fromlist=["METHODS"]).METHODS.split(","))
    assert len(quality["models"]) == 2
    for model in quality["models"]:
        rows = [x for x in quality["results"] if x["model"] == model]
        # pool runs only at keep 0.25 (its budget is fixed); every other method is here
        assert {x["method"] for x in rows} == methods - {"pool"}, model
        for x in rows:
            assert 0.0 <= x["accuracy"] <= 1.0 and x["n"] == 4
        # the same budget, whatever the method: equal kept counts at a keep
        kept = {x["vision_tokens_kept"] for x in rows
                if x["method"] in ("lightkv-protect", "lightkv-paper", "random", "fastv", "dart")}
        assert len(kept) == 1, (model, kept)
    report = (tmp_path / "report.md").read_text()
    assert all(f"Model `{m}`" in report for m in quality["models"])
    cost = json.loads((tmp_path / "cost-shapes-vlm-q8_0.json").read_text())
    assert {x["config"] for x in cost["rows"]} | set(cost["skipped"]) == {
        "off", "embed@0.75", "layer@0.75", "evict@0.75", "decode-evict@0.75"}
    for png in ("quality.png", "cost-prefill-shapes-vlm-q8_0.png", "cost-kv-shapes-vlm-q8_0.png",
                "cost-ttft-shapes-vlm-q8_0.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG", png
        assert f"({png})" in report, png
    # each step is printed as the command a person can rerun alone
    assert "$ python -m lightkv_edge bench" in r.stdout
    assert "$ python -m lightkv_edge cost" in r.stdout
    # the same command again goes on where the first stopped: nothing is measured anew,
    # the report is written from the kept steps and runs
    before = (tmp_path / "cost-shapes-vlm-q8_0.runs.jsonl").read_text()
    again = _report(tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "quality: done before (steps.json), kept" in again.stdout
    assert "1 of 1 rounds done before, 0 to run" in again.stderr
    assert (tmp_path / "cost-shapes-vlm-q8_0.runs.jsonl").read_text() == before
    assert json.loads((tmp_path / "cost-shapes-vlm-q8_0.json").read_text())["raw"] == cost["raw"]
    # --fresh measures anew
    fresh = _report(tmp_path, "--fresh")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "done before" not in fresh.stdout + fresh.stderr
