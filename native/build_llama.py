#!/usr/bin/env python3
"""Build the pinned, patched llama.cpp once and cache the result.

The build is keyed by (pinned source sha256, patch-series hash, build flags, compiler),
so an install with unchanged inputs, also from a fresh clone on the same machine, reuses
the cached libraries instead of compiling again. Called by the top-level CMakeLists.txt;
also usable by hand:

    python native/build_llama.py [-DGGML_CUDA=ON ...]     # prints the install prefix

The prefix holds lib/ (libggml*, libllama, libmtmd, one soname each, rpath $ORIGIN) and
include/. Progress goes to stderr, the full log to <cache>/build/<key>/build.log, and a
failure ends in one line, "lightkv-edge build: <cause>" (also written to --error-file).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_source  # noqa: E402
from llama_source import SourceError  # noqa: E402

# Bump when the recipe below changes in a way that changes the binaries.
RECIPE_VERSION = 1

# What we build: the core libraries and libmtmd, nothing else of llama.cpp's tree.
BASE_ARGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_COMMON=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_MTMD=ON",  # libmtmd alone, without the rest of tools/
    "-DMTMD_VIDEO=OFF",
    "-DLLAMA_CURL=OFF",
    "-DCMAKE_INSTALL_LIBDIR=lib",
    "-DCMAKE_INSTALL_INCLUDEDIR=include",
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    # one file per library (libllama.so, no .so.0 -> .so.0.5.0 chain): wheels cannot
    # hold symlinks, and ctypes loads the plain name
    "-DCMAKE_PLATFORM_NO_VERSIONED_SONAME=ON",
]

# THE rule for which CMake cache variables reach the llama.cpp build (and its cache key).
# The top-level CMakeLists.txt hands every user-settable cache variable to this script
# (--cache-vars) and forwards nothing on its own, so this is the only place that decides.
# Forwarded: llama.cpp's and ggml's own options and the toolkit/architecture variables of
# their backends. Not forwarded:
#   - LLAMA_PREFIX, our own cache variable (the result of this script): forwarding it would
#     change the key on every configure and recompile llama.cpp each time;
#   - CMAKE_BUILD_TYPE (always Release, BASE_ARGS) and CMAKE_C/CXX_COMPILER (taken from
#     CC/CXX, like the top-level project's, and part of the key through compiler_id):
#     CMake and scikit-build set them on every configure, so forwarding them would give
#     the default build a different key from a hand-run one.
FORWARDED = re.compile(r"^-D(?!LLAMA_PREFIX[:=])(GGML_|LLAMA_|BLAS_|CUDAToolkit_|CMAKE_CUDA_|"
                       r"CMAKE_OSX_ARCHITECTURES[:=]|CMAKE_OSX_DEPLOYMENT_TARGET[:=])")


def forwarded(candidates: list[str]) -> list[str]:
    """The -DNAME[:TYPE]=VALUE flags among `candidates` that reach the llama.cpp build."""
    return [f for f in candidates if FORWARDED.match(f)]


def read_cache_vars(path: str) -> list[str]:
    """-DNAME=VALUE lines written by CMakeLists.txt, one cache variable a line."""
    return [line for line in Path(path).read_text().splitlines() if line.startswith("-D")]


def fail(msg: str, error_file: str | None) -> int:
    line = f"lightkv-edge build: {msg}"
    print(line, file=sys.stderr)
    if error_file:
        Path(error_file).write_text(msg + "\n")
    return 2


def find_compilers() -> tuple[str, str]:
    cc = os.environ.get("CC") or next(
        (c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    cxx = os.environ.get("CXX") or next(
        (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if not cc or not shutil.which(cc.split()[0]):
        raise SourceError("no C compiler found (install gcc or clang, or set CC)")
    if not cxx or not shutil.which(cxx.split()[0]):
        raise SourceError("no C++ compiler found (install g++ or clang++, or set CXX)")
    return cc, cxx


def compiler_id(cxx: str) -> str:
    """The compiler's real path and version: 'c++' and 'g++' name the same binary."""
    exe = shutil.which(cxx.split()[0]) or cxx
    try:
        r = subprocess.run([exe, "--version"], capture_output=True, text=True)
        version = (r.stdout.splitlines() or ["?"])[0].split(" ", 1)[-1]
    except OSError:
        version = "?"
    return f"{os.path.realpath(exe)} {version}"


def cpu_id() -> str:
    """The CPU model and feature flags: GGML_NATIVE (the default) tunes the build to this
    CPU, so a cache shared with another CPU must not hand out these binaries."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform
        return platform.processor() or platform.machine()
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", info, re.M)
    digest = hashlib.sha256((flags.group(1) if flags else "").encode()).hexdigest()[:12]
    return f"{model.group(1).strip() if model else '?'} {digest}"


def key_material(flags: list[str], cxx: str) -> dict:
    native = not any(re.match(r"-DGGML_NATIVE=(OFF|0|FALSE|NO)$", f, re.I) for f in flags)
    return {
        "recipe": RECIPE_VERSION,
        "source": llama_source.read_pins()["vendor/llama.cpp"],
        "patches": llama_source.patch_series_hash(),
        "flags": sorted(flags),
        "compiler": compiler_id(cxx),
        "platform": sys.platform,
        "cpu": cpu_id() if native else None,
    }


def build_key(flags: list[str], cxx: str) -> str:
    material = json.dumps(key_material(flags, cxx), sort_keys=True).encode()
    return hashlib.sha256(material).hexdigest()[:20]


def _run_logged(cmd: list[str], log, label: str, cwd: Path | None = None) -> int:
    """Run cmd, append everything to log, show a compact progress line on stderr."""
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    tty = sys.stderr.isatty()
    last_pct = -10
    for line in proc.stdout:
        log.write(line)
        m = re.match(r"^\[\s*(\d+)\s*/\s*(\d+)\]|^\[\s*(\d+)%\]", line)
        if not m:
            continue
        pct = (int(m.group(1)) * 100 // max(int(m.group(2)), 1)) if m.group(1) else int(m.group(3))
        if tty:
            print(f"\r{label}: {pct:3d}%", end="", file=sys.stderr, flush=True)
        elif pct >= last_pct + 10:
            print(f"{label}: {pct}%", file=sys.stderr, flush=True)
            last_pct = pct
    rc = proc.wait()
    if tty:
        print(file=sys.stderr)
    return rc


def _first_error(log_path: Path) -> str:
    text = log_path.read_text(errors="replace").splitlines()
    for pat in (r"error:", r"CMake Error", r"Error", r"FAILED"):
        for i, line in enumerate(text):
            if re.search(pat, line):
                detail = line.strip()
                if pat == "CMake Error" and i + 1 < len(text):
                    detail += " " + " ".join(l.strip() for l in text[i + 1:i + 3] if l.strip())
                return detail[:300]
    return "see the log"


@contextlib.contextmanager
def _exclusive(root: Path):
    """One build at a time in a cache entry: a second process (another checkout's install,
    a test building the stock tool) waits here, then finds the finished build and reuses it
    instead of deleting the first one's work directory under it."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as f:
        try:
            import fcntl
        except ImportError:       # no POSIX locks (Windows): builds are not shared there
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(flags: list[str], jobs: int | None = None) -> Path:
    cc, cxx = find_compilers()
    root = llama_source.cache_root() / "build" / build_key(flags, cxx)
    with _exclusive(root):
        return _build(flags, cc, cxx, jobs)


def _build(flags: list[str], cc: str, cxx: str, jobs: int | None) -> Path:
    tree = llama_source.patched_tree()
    key = build_key(flags, cxx)
    root = llama_source.cache_root() / "build" / key
    prefix = root / "install"
    stamp = prefix / ".complete"
    if stamp.exists():
        print(f"lightkv-edge: reusing the cached llama.cpp build {key}", file=sys.stderr)
        return prefix
    if shutil.which("cmake") is None:
        raise SourceError("cmake not found (pip install cmake)")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    log_path = root / "build.log"
    rpath = "@loader_path" if sys.platform == "darwin" else "$ORIGIN"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(tree), "-B", str(root / "build"), *gen, *BASE_ARGS,
                 f"-DCMAKE_INSTALL_PREFIX={prefix}", f"-DCMAKE_INSTALL_RPATH={rpath}",
                 f"-DCMAKE_C_COMPILER={cc}", f"-DCMAKE_CXX_COMPILER={cxx}", *flags]
    jobs = jobs or os.cpu_count() or 2
    t0 = time.time()
    print(f"lightkv-edge: building llama.cpp {key} (once; later installs reuse it), "
          f"log: {log_path}", file=sys.stderr)
    with open(log_path, "w") as log:
        if _run_logged(configure, log, "configure llama.cpp") != 0:
            raise SourceError(f"configuring llama.cpp failed: {_first_error(log_path)} "
                              f"(log: {log_path})")
        if _run_logged(["cmake", "--build", str(root / "build"), "-j", str(jobs)],
                       log, "compile llama.cpp") != 0:
            raise SourceError(f"compiling llama.cpp failed: {_first_error(log_path)} "
                              f"(log: {log_path})")
        if _run_logged(["cmake", "--install", str(root / "build")], log, "install") != 0:
            raise SourceError(f"installing llama.cpp failed (log: {log_path})")
    info = {"key": key, "inputs": key_material(flags, cxx), "flags": flags, "seconds": round(time.time() - t0, 1),
            "source_dir": str(tree), "pin": f"{llama_source.PIN_PACKAGE}=="
                                              f"{llama_source.PIN_VERSION}"}
    (prefix / "lightkv-build.json").write_text(json.dumps(info, indent=1) + "\n")
    stamp.write_text(key + "\n")
    shutil.rmtree(root / "build", ignore_errors=True)  # objects are not needed again
    print(f"lightkv-edge: llama.cpp built in {info['seconds']} s", file=sys.stderr)
    return prefix


def build_tool(flags: list[str], target: str, jobs: int | None = None) -> Path:
    """One of llama.cpp's own programs (e.g. llama-mtmd-cli), built statically from the
    same patched tree with the same flags, cached beside the libraries: the stock
    reference that tests compare our `off` mode with."""
    cc, cxx = find_compilers()
    root = llama_source.cache_root() / "build" / build_key(flags, cxx)
    with _exclusive(root):
        return _build_tool(flags, target, cc, cxx, root, jobs)


def _build_tool(flags: list[str], target: str, cc: str, cxx: str, root: Path,
                jobs: int | None) -> Path:
    tree = llama_source.patched_tree()
    exe = root / "tools" / target
    if exe.exists():
        return exe
    if shutil.which("cmake") is None:
        raise SourceError("cmake not found (pip install cmake)")
    work = root / "tool-build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log_path = root / f"{target}.log"
    args = [a for a in BASE_ARGS if not a.startswith(("-DBUILD_SHARED_LIBS", "-DLLAMA_BUILD_COMMON",
                                                       "-DLLAMA_BUILD_TOOLS", "-DLLAMA_BUILD_MTMD"))]
    configure = ["cmake", "-S", str(tree), "-B", str(work),
                 *(["-G", "Ninja"] if shutil.which("ninja") else []), *args,
                 "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=ON",
                 f"-DCMAKE_C_COMPILER={cc}", f"-DCMAKE_CXX_COMPILER={cxx}", *flags]
    print(f"lightkv-edge: building llama.cpp's {target} (once), log: {log_path}",
          file=sys.stderr)
    with open(log_path, "w") as log:
        if _run_logged(configure, log, f"configure {target}") != 0:
            raise SourceError(f"configuring {target} failed: {_first_error(log_path)}")
        if _run_logged(["cmake", "--build", str(work), "--target", target, "-j",
                        str(jobs or os.cpu_count() or 2)], log, f"compile {target}") != 0:
            raise SourceError(f"compiling {target} failed: {_first_error(log_path)}")
    built = next(work.rglob(target), None)
    if built is None:
        raise SourceError(f"{target} was not produced (log: {log_path})")
    exe.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(built, exe)
    shutil.rmtree(work, ignore_errors=True)
    return exe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--error-file", help="write the one-line cause of a failure here")
    ap.add_argument("--check-toolchain", action="store_true",
                    help="only check that compilers, cmake and git are there")
    ap.add_argument("-j", "--jobs", type=int, help="parallel compile jobs (default: cores)")
    ap.add_argument("--tool", metavar="TARGET",
                    help="build one of llama.cpp's programs (e.g. llama-mtmd-cli) statically "
                         "and print its path")
    ap.add_argument("--cache-vars", metavar="FILE",
                    help="candidate -DNAME=VALUE lines (from CMakeLists.txt), filtered by "
                         "FORWARDED like the command-line flags")
    ap.add_argument("--flags-out", metavar="FILE",
                    help="write the forwarded flags here, as comma-separated Python strings")
    ap.add_argument("--print-cmake-args", action="store_true",
                    help="print the CMake arguments of our llama.cpp build, one a line (for "
                         "building a packed tree by hand: scripts/device_bench.sh)")
    args, rest = ap.parse_known_args(argv)
    if args.print_cmake_args:
        print("\n".join(BASE_ARGS))
        return 0
    try:
        candidates = rest + (read_cache_vars(args.cache_vars) if args.cache_vars else [])
    except OSError as e:
        return fail(f"cannot read {args.cache_vars}: {e.strerror}", args.error_file)
    flags = forwarded(candidates)
    if args.flags_out:
        Path(args.flags_out).write_text(", ".join(json.dumps(f) for f in flags))
    try:
        if args.check_toolchain:
            find_compilers()
            if shutil.which("git") is None:
                raise SourceError("git is needed to apply native/patches (install git)")
            return 0
        print(build_tool(flags, args.tool, args.jobs) if args.tool else build(flags, args.jobs))
    except SourceError as e:
        return fail(str(e), args.error_file)
    except KeyboardInterrupt:
        return fail("interrupted", args.error_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
