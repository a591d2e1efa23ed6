"""scripts/convert.py and scripts/quantize.py on a tiny random Qwen2-VL checkpoint.

The checkpoint reuses the shipped model's config and tokenizer (lightkv_edge/models/hf) at
random init.  Conversion needs the pinned llama.cpp source (native/llama_source.py
--print-dir) and quantization needs our llama.cpp build: when either is missing these
tests FAIL with the reason, they do not skip.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.pinned import llama_cpp_dir

ROOT = Path(__file__).resolve().parent.parent
HF = ROOT / "lightkv_edge" / "models" / "hf"
CONVERT = ROOT / "scripts" / "convert.py"
QUANTIZE = ROOT / "scripts" / "quantize.py"


def _gguf_reader(llama_dir: Path):
    sys.path.insert(0, str(llama_dir / "gguf-py"))
    try:
        import gguf  # the vendored gguf-py
    finally:
        sys.path.pop(0)
    return gguf.GGUFReader


def _kv(reader) -> dict:
    out = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            v = f.contents()
        except Exception:  # noqa: BLE001
            v = [bytes(p).hex() for p in f.parts]
        out[name] = v
    return out


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    if not (HF / "config.json").is_file():
        pytest.fail(f"{HF} missing: the shipped HF config/tokenizer is needed")
    d = tmp_path_factory.mktemp("tiny_qwen2vl")
    for f in HF.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, d / f.name)
    cfg = Qwen2VLConfig.from_pretrained(d)
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(d, safe_serialization=True)
    c = json.loads((d / "config.json").read_text())
    c["architectures"] = ["Qwen2VLForConditionalGeneration"]
    (d / "config.json").write_text(json.dumps(c))
    return d


@pytest.fixture(scope="module")
def converted(tiny_ckpt, tmp_path_factory):
    llama_dir = llama_cpp_dir()
    out = tmp_path_factory.mktemp("gguf")
    r = subprocess.run([sys.executable, str(CONVERT), str(tiny_ckpt), "--outdir", str(out),
                        "--name", "tiny", "--outtype", "f16", "--llama-cpp", str(llama_dir)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "text model done" in r.stdout and "mmproj done" in r.stdout
    return llama_dir, out / "tiny-f16.gguf", out / "tiny-mmproj-f16.gguf"


def test_convert_outputs(converted):
    llama_dir, text, mmproj = converted
    R = _gguf_reader(llama_dir)
    t, m = _kv(R(str(text))), _kv(R(str(mmproj)))
    assert t["general.architecture"] == "qwen2vl"
    assert t["tokenizer.ggml.model"] == "llama"
    assert "<|im_start|>" in t["tokenizer.chat_template"]
    assert t["tokenizer.ggml.eos_token_id"] == 5  # <|im_end|>
    assert "<|vision_start|>" in t["tokenizer.ggml.tokens"]
    assert m["general.architecture"] == "clip"
    assert m["clip.projector_type"] == "qwen2vl_merger"
    assert len(m["clip.vision.image_mean"]) == 3


def test_quantize_keeps_metadata(converted, tmp_path):
    llama_dir, text, mmproj = converted
    out = tmp_path / "tiny-q8_0.gguf"
    r = subprocess.run([sys.executable, str(QUANTIZE), str(text), str(out), "--type", "q8_0"],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"quantize failed (is the native build there?): {r.stderr[-500:]}"
    assert "wrote" in r.stdout
    R = _gguf_reader(llama_dir)
    a, b = _kv(R(str(text))), _kv(R(str(out)))
    for k, v in a.items():
        if k == "general.file_type":
            continue
        assert k in b, f"metadata key {k} lost"
        assert b[k] == v, f"metadata key {k} changed"
    assert b["general.file_type"] == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    types = {t.tensor_type.name for t in R(str(out)).tensors}
    assert "Q8_0" in types
    assert out.stat().st_size < text.stat().st_size


def _one_line_error(r, code=2):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_convert_bad_inputs(tmp_path):
    r = subprocess.run([sys.executable, str(CONVERT), str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert "no such directory" in _one_line_error(r)
    r = subprocess.run([sys.executable, str(CONVERT), str(tmp_path)], capture_output=True,
                       text=True)
    assert "config.json" in _one_line_error(r)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooBarForCausalLM"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    r = subprocess.run([sys.executable, str(CONVERT), str(tmp_path), "--llama-cpp",
                        str(llama_cpp_dir())], capture_output=True, text=True)
    assert "not a supported architecture" in _one_line_error(r)
    r = subprocess.run([sys.executable, str(CONVERT), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "mmproj" in r.stdout


def test_quantize_bad_inputs(tmp_path, converted):
    _, _, mmproj = converted
    r = subprocess.run([sys.executable, str(QUANTIZE), str(tmp_path / "no.gguf"),
                        str(tmp_path / "o.gguf")], capture_output=True, text=True)
    assert "no such file" in _one_line_error(r)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    r = subprocess.run([sys.executable, str(QUANTIZE), str(bad), str(tmp_path / "o.gguf")],
                       capture_output=True, text=True)
    assert "not a GGUF" in _one_line_error(r)
    r = subprocess.run([sys.executable, str(QUANTIZE), str(mmproj), str(tmp_path / "o.gguf")],
                       capture_output=True, text=True)
    assert "mmproj" in _one_line_error(r)
    r = subprocess.run([sys.executable, str(QUANTIZE), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "q4_k_m" in r.stdout
