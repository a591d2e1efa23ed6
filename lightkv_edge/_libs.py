"""Where our native libraries are, and loading llama_cpp from them.

Everything native (libggml*, libllama, libmtmd from the pinned llama.cpp, and our own
liblightkv) sits in one folder. Lookup order:
1. $LIGHTKV_EDGE_LIB_DIR (a developer pointing at another build);
2. the folder recorded by the build in lightkv_edge/_build_info.py (an installed wheel,
   or an editable install, whose generated module lives beside the installed libraries).

llama-cpp-python's Python layer reads LLAMA_CPP_LIB_PATH and MTMD_CPP_LIB once, at its
first import (it ships no libllama of its own: `make setup` installs it without a native
build). `point_llama_cpp_here()` sets both to this folder; `import lightkv_edge` calls it,
so a later `import llama_cpp` (and `llama_cpp.mtmd_cpp`) runs exactly the llama.cpp we
built. `use_our_llama_cpp()` does the same and imports it, checking that nobody imported
llama_cpp from another build first.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


from .errors import LightKVError


class NativeLibraryError(LightKVError, RuntimeError):
    """The native build is missing or unusable (one-line, user-facing message)."""


def _lib_name(base: str) -> str:
    if sys.platform == "darwin":
        return f"lib{base}.dylib"
    if sys.platform == "win32":
        return f"{base}.dll"
    return f"lib{base}.so"


def lib_dir() -> Path:
    env = os.environ.get("LIGHTKV_EDGE_LIB_DIR")
    if env:
        d = Path(env).expanduser()
        if not (d / _lib_name("llama")).exists():
            raise NativeLibraryError(f"LIGHTKV_EDGE_LIB_DIR={d} holds no {_lib_name('llama')}")
        return d
    try:
        from . import _build_info
    except ImportError:
        raise NativeLibraryError(
            "lightkv-edge's native libraries are not built: run `make setup` "
            "(or `pip install -e .`) in the repository") from None
    d = Path(_build_info.__file__).resolve().parent / _build_info.LIB_SUBDIR
    if not (d / _lib_name("llama")).exists():
        raise NativeLibraryError(f"the native libraries are missing from {d}: reinstall")
    return d


def lib_path(base: str) -> Path:
    """Full path of one of our libraries, e.g. lib_path('lightkv')."""
    return lib_dir() / _lib_name(base)


def point_llama_cpp_here() -> bool:
    """Point a not yet imported llama_cpp at our libraries (its two environment variables).
    Quiet and cheap (no library is loaded): False when llama_cpp is already imported or
    our build is missing, in which case use_our_llama_cpp() reports the problem."""
    if "llama_cpp" in sys.modules:
        return False
    try:
        d = str(lib_dir())
    except NativeLibraryError:
        return False
    os.environ["LLAMA_CPP_LIB_PATH"] = d
    os.environ["MTMD_CPP_LIB"] = d
    return True


def use_our_llama_cpp():
    """Import llama_cpp bound to our build (sets its library paths first)."""
    d = str(lib_dir())
    if "llama_cpp" in sys.modules:
        loaded = os.environ.get("LLAMA_CPP_LIB_PATH")
        if loaded != d:
            raise NativeLibraryError(
                "llama_cpp was imported before lightkv_edge and loaded another libllama; "
                "import lightkv_edge first")
    os.environ["LLAMA_CPP_LIB_PATH"] = d
    os.environ["MTMD_CPP_LIB"] = d
    try:
        import llama_cpp
        import llama_cpp.mtmd_cpp  # noqa: F401
    except ImportError as e:
        raise NativeLibraryError(
            f"llama-cpp-python's Python layer is not installed ({e}): set up with `make "
            "setup` (README), which installs it without compiling llama.cpp again") from None
    return llama_cpp
