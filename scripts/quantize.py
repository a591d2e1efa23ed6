#!/usr/bin/env python3
"""Quantize a GGUF text model (Q8_0, Q4_K_M, ...) through llama.cpp's llama_model_quantize.

Uses our own llama.cpp build through llama-cpp-python's ctypes layer (importing
lightkv_edge points it at the package's libllama; --lib-dir overrides).  Parameters start
from llama_model_quantize_default_params(), so every metadata key of the input (tokenizer,
chat template, rope sections, ...) is carried over; llama.cpp adds general.file_type and
its quantize.* keys.

    python scripts/quantize.py shapes-vlm-f16.gguf shapes-vlm-q8_0.gguf --type q8_0

An mmproj (vision) GGUF is not an LLM and is refused here: keep it f16/f32, or write it as
q8_0 directly with `scripts/convert.py --mmproj-outtype q8_0`.
Exit codes: 0 ok, 1 quantization failed, 2 bad input.
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# llama_ftype values (llama.h)
FTYPES = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9,
    "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15,
    "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18, "bf16": 32,
}


class UserError(Exception):
    pass


def gguf_architecture(path: Path) -> str | None:
    """general.architecture of a GGUF file (it is the first key gguf-py writes), or None."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return None
            _ver, = struct.unpack("<I", f.read(4))
            _nt, nkv = struct.unpack("<QQ", f.read(16))
            for _ in range(min(nkv, 64)):
                klen, = struct.unpack("<Q", f.read(8))
                key = f.read(klen).decode("utf-8", "replace")
                vtype, = struct.unpack("<I", f.read(4))
                if vtype != 8:  # not a string: give up (we only look at the first keys)
                    return None
                vlen, = struct.unpack("<Q", f.read(8))
                val = f.read(vlen).decode("utf-8", "replace")
                if key == "general.architecture":
                    return val
    except (OSError, struct.error):
        return None
    return None


def load_llama_cpp(lib_dir: str | None):
    if lib_dir:
        d = str(Path(lib_dir).resolve())
        os.environ["LLAMA_CPP_LIB_PATH"] = d
        os.environ.setdefault("MTMD_CPP_LIB", d)
        try:
            import llama_cpp
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot load llama_cpp from {d}: {e}") from None
        return llama_cpp
    try:
        try:
            from lightkv_edge import _libs
        except ImportError:
            sys.path.insert(0, str(ROOT))
            from lightkv_edge import _libs
        return _libs.use_our_llama_cpp()  # llama_cpp bound to our own build
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(f"our llama.cpp build is not usable ({msg}); build the package "
                        "(`make setup`) or pass --lib-dir") from None


def quantize(inp: Path, out: Path, qtype: str = "q8_0", nthread: int = 0,
             lib_dir: str | None = None, allow_requantize: bool = False,
             progress=print) -> Path:
    inp, out = Path(inp), Path(out)
    if not inp.is_file():
        raise UserError(f"{inp}: no such file")
    with open(inp, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{inp}: not a GGUF file")
    arch = gguf_architecture(inp)
    if arch == "clip":
        raise UserError(f"{inp}: is an mmproj (vision) file; llama_model_quantize only takes "
                        "text models (keep it f16/f32, or convert with --mmproj-outtype q8_0)")
    qtype = qtype.lower()
    if qtype not in FTYPES:
        raise UserError(f"--type {qtype}: expected one of {', '.join(FTYPES)}")
    if out.resolve() == inp.resolve():
        raise UserError("output must differ from input")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such directory")
    llama_cpp = load_llama_cpp(lib_dir)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.nthread = int(nthread)
    params.allow_requantize = bool(allow_requantize)
    progress(f"quantize: {inp} ({inp.stat().st_size / 1e6:.2f} MB, arch {arch}) -> {qtype} ...")
    t0 = time.time()
    rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(),
                                        llama_cpp.byref(params))
    if rc != 0 or not out.is_file():
        raise RuntimeError(f"llama_model_quantize returned {rc} (see the llama.cpp log above)")
    progress(f"quantize: wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in "
             f"{time.time() - t0:.2f} s")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Quantize a GGUF text model with llama_model_quantize (our llama.cpp build).",
        epilog="Exit codes: 0 ok, 1 quantization failed, 2 bad input.")
    ap.add_argument("input", help="GGUF text model (f32/f16/bf16)")
    ap.add_argument("output", help="output GGUF path")
    ap.add_argument("--type", default="q8_0", type=str.lower, choices=sorted(FTYPES),
                    help="target type (default q8_0)")
    ap.add_argument("--threads", type=int, default=0, help="threads (0 = all)")
    ap.add_argument("--allow-requantize", action="store_true",
                    help="allow an already quantized input")
    ap.add_argument("--lib-dir", default=None,
                    help="folder with libllama (default: lightkv_edge's own build)")
    args = ap.parse_args(argv)
    try:
        quantize(Path(args.input), Path(args.output), args.type, args.threads, args.lib_dir,
                 args.allow_requantize)
    except UserError as e:
        print(f"quantize: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"quantize: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
