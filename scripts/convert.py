#!/usr/bin/env python3
"""Convert a Hugging Face vision-language checkpoint to GGUF: text model + mmproj.

Runs llama.cpp's own converter (convert_hf_to_gguf.py) from the pinned, verified llama.cpp
source -- the same path a user takes for a real model -- twice, as subprocesses with the
vendored gguf-py first on PYTHONPATH: once for the language model, once with --mmproj for
the vision tower and projector.

    python scripts/convert.py runs/tiny/hf --outdir out --name shapes-vlm --outtype f16

writes out/shapes-vlm-f16.gguf and out/shapes-vlm-mmproj-f16.gguf.

The llama.cpp tree comes from `python native/llama_source.py --print-dir` (fetched, checked
and patched on first use); --llama-cpp DIR uses another tree of the same version instead.
Bad input ends in one line on stderr and exit code 2; a converter failure shows the
converter's last error line and exits 1.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


class UserError(Exception):
    """One-line, user-facing error (exit code 2)."""


class ConverterError(Exception):
    """The llama.cpp converter failed (exit code 1)."""


def find_llama_cpp(explicit: str | None) -> Path:
    if explicit:
        d = Path(explicit).expanduser()
        if not (d / "convert_hf_to_gguf.py").is_file():
            raise UserError(f"--llama-cpp {d}: no convert_hf_to_gguf.py there")
        return d
    script = ROOT / "native" / "llama_source.py"
    if not script.is_file():
        raise UserError("native/llama_source.py not found; pass --llama-cpp DIR")
    r = subprocess.run([sys.executable, str(script), "--print-dir"], capture_output=True,
                       text=True)
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise UserError(f"cannot get the pinned llama.cpp source: {msg} "
                        "(or pass --llama-cpp DIR)")
    d = Path(r.stdout.strip().splitlines()[-1])
    if not (d / "convert_hf_to_gguf.py").is_file():
        raise UserError(f"pinned llama.cpp source at {d} has no convert_hf_to_gguf.py")
    return d


def registered_architectures(llama_dir: Path) -> tuple[set[str], set[str]]:
    """Architectures the converter knows, for text and for mmproj (read from its registry
    without importing it)."""
    init = llama_dir / "conversion" / "__init__.py"
    text: set[str] = set()
    mm: set[str] = set()
    if init.is_file():
        src = init.read_text()
        for name, target in (("TEXT_MODEL_MAP", text), ("MMPROJ_MODEL_MAP", mm)):
            m = re.search(name + r"[^=]*=\s*\{(.*?)\n\}", src, re.S)
            if m:
                target.update(re.findall(r'"([A-Za-z0-9_]+)"\s*:', m.group(1)))
    else:  # older single-file converter: look for register() decorators
        src = (llama_dir / "convert_hf_to_gguf.py").read_text()
        names = set(re.findall(r'"([A-Za-z0-9_]+(?:ForConditionalGeneration|ForCausalLM|Model))"',
                               src))
        text, mm = names, names
    return text, mm


def check_input(model_dir: Path) -> dict:
    if not model_dir.exists():
        raise UserError(f"{model_dir}: no such directory")
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: not a directory")
    cfgp = model_dir / "config.json"
    if not cfgp.is_file():
        raise UserError(f"{model_dir}: no config.json (not a Hugging Face checkpoint)")
    try:
        cfg = json.loads(cfgp.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{cfgp}: unreadable config ({e})") from None
    if not cfg.get("architectures"):
        raise UserError(f"{cfgp}: no 'architectures' field (the converter needs it)")
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise UserError(f"{model_dir}: no weights (*.safetensors or *.bin)")
    return cfg


def _sub_arch(cfg: dict, key: str) -> str | None:
    sub = cfg.get(key)
    archs = sub.get("architectures") if isinstance(sub, dict) else None
    return archs[0] if archs else None


def last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"(Error|error|Exception|FAILED|failed|assert)", ln):
            return ln
    return lines[-1] if lines else "no output"


def run_converter(llama_dir: Path, model_dir: Path, outfile: Path, outtype: str,
                  mmproj: bool, verbose: bool) -> float:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(llama_dir / "gguf-py"), str(llama_dir)] +
        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("NO_LOCAL_GGUF", None)
    cmd = [sys.executable, str(llama_dir / "convert_hf_to_gguf.py"), str(model_dir.resolve()),
           "--outfile", str(outfile.resolve()), "--outtype", outtype]
    if mmproj:
        cmd.append("--mmproj")
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(llama_dir))
    if verbose:
        sys.stderr.write(r.stdout + r.stderr)
    if r.returncode != 0 or not outfile.is_file():
        what = "mmproj" if mmproj else "text model"
        raise ConverterError(f"converter failed on the {what}: "
                             f"{last_error_line(r.stderr + chr(10) + r.stdout)}")
    return time.time() - t0


def convert(model_dir: Path, outdir: Path, name: str | None = None, outtype: str = "f16",
            mmproj_outtype: str | None = None, llama_cpp: str | None = None,
            text: bool = True, vision: bool = True, verbose: bool = False,
            progress=None) -> dict:
    """Convert; returns {"text": path or None, "mmproj": path or None}."""
    if progress is None:
        def progress(msg):
            print(msg, flush=True)
    model_dir = Path(model_dir)
    cfg = check_input(model_dir)
    llama_dir = find_llama_cpp(llama_cpp)
    arch = cfg["architectures"][0]
    # as the converter picks its class (get_model_architecture): an architecture named in
    # text_config / vision_config wins, e.g. SmolVLM's text model is VLlama3ForCausalLM
    text_arch = _sub_arch(cfg, "text_config") or arch
    vision_arch = _sub_arch(cfg, "vision_config") or arch
    text_archs, mm_archs = registered_architectures(llama_dir)
    if text and text_archs and text_arch not in text_archs:
        raise UserError(f"{text_arch}: not a supported architecture of the pinned llama.cpp "
                        "converter")
    if vision and mm_archs and vision_arch not in mm_archs:
        raise UserError(f"{vision_arch}: the pinned converter has no vision (mmproj) support "
                        "for it (use --text-only)")
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype}: expected one of {', '.join(OUTTYPES)}")
    mmproj_outtype = mmproj_outtype or ("f32" if outtype == "f32" else "f16")
    name = name or model_dir.resolve().name
    outdir = Path(outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {outdir}: {e.strerror}") from None
    res = {"text": None, "mmproj": None}
    progress(f"convert: {model_dir} ({arch}) with {llama_dir}")
    if text:
        out = outdir / f"{name}-{outtype}.gguf"
        progress(f"convert: text model -> {out} ...")
        dt = run_converter(llama_dir, model_dir, out, outtype, False, verbose)
        progress(f"convert: text model done in {dt:.1f} s ({out.stat().st_size / 1e6:.2f} MB)")
        res["text"] = out
    if vision:
        out = outdir / f"{name}-mmproj-{mmproj_outtype}.gguf"
        progress(f"convert: mmproj -> {out} ...")
        dt = run_converter(llama_dir, model_dir, out, mmproj_outtype, True, verbose)
        progress(f"convert: mmproj done in {dt:.1f} s ({out.stat().st_size / 1e6:.2f} MB)")
        res["mmproj"] = out
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Convert a Hugging Face VLM checkpoint to GGUF (text model + mmproj) "
                    "with the pinned llama.cpp converter.",
        epilog="Exit codes: 0 ok, 1 converter failure, 2 bad input.")
    ap.add_argument("model_dir", help="Hugging Face checkpoint directory (config.json + weights)")
    ap.add_argument("--outdir", default=".", help="output directory (default: .)")
    ap.add_argument("--name", default=None, help="file name stem (default: the directory name)")
    ap.add_argument("--outtype", default="f16", choices=OUTTYPES, help="text model type")
    ap.add_argument("--mmproj-outtype", default=None, choices=("f32", "f16", "bf16", "q8_0"),
                    help="mmproj type (default: f16, or f32 when --outtype f32)")
    ap.add_argument("--llama-cpp", default=None, metavar="DIR",
                    help="llama.cpp tree to use instead of the pinned one")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--text-only", action="store_true", help="only the text model")
    g.add_argument("--mmproj-only", action="store_true", help="only the mmproj")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the converter's output")
    args = ap.parse_args(argv)
    try:
        res = convert(Path(args.model_dir), Path(args.outdir), args.name, args.outtype,
                      args.mmproj_outtype, args.llama_cpp, text=not args.mmproj_only,
                      vision=not args.text_only, verbose=args.verbose)
    except UserError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    except ConverterError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("convert: interrupted", file=sys.stderr)
        return 130
    for k, v in res.items():
        if v:
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
