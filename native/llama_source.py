#!/usr/bin/env python3
"""The pinned llama.cpp source: fetch it with pip, verify it, patch it, cache it.

The llama.cpp we build against is the copy vendored in the llama-cpp-python sdist named
in PIN below. It arrives through pip's own index (no address is written anywhere), its
sha256 must match native/llama.cpp.sha256, and the patch series in native/patches/ is
applied to a private copy in the cache, never to a tree the user owns.

Usable standalone (the build, scripts/convert.py and the Makefile call it):

    python native/llama_source.py --print-dir      # patched llama.cpp tree
    python native/llama_source.py --print-sdist    # verified sdist (for llama-cpp-python)
    python native/llama_source.py --print-key      # source sha256 + patch-series hash

Offline machines and Jetson images that carry their own tree: set
LIGHTKV_EDGE_LLAMA_SOURCE (or pass --source) to a local copy of the same sdist (.tar.gz)
or to an unpacked llama.cpp tree of the same version; it is checked against the pinned
hashes and patched like the downloaded one.

Every failure ends in one line on stderr, "lightkv-edge build: <cause>", and exit code 2.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PIN_PACKAGE = "llama-cpp-python"
PIN_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{PIN_VERSION}.tar.gz"
VENDOR_PREFIX = f"llama_cpp_python-{PIN_VERSION}/vendor/llama.cpp/"

NATIVE_DIR = Path(__file__).resolve().parent
PIN_FILE = NATIVE_DIR / "llama.cpp.sha256"
PATCH_DIR = NATIVE_DIR / "patches"

# Folders that a local llama.cpp tree may carry but that are not source.
_TREE_SKIP = {".git", "build", ".cache", "__pycache__", ".devops", ".github"}


class SourceError(RuntimeError):
    """A one-line, user-facing reason why the pinned source cannot be had."""


def cache_root() -> Path:
    env = os.environ.get("LIGHTKV_EDGE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lightkv-edge"


def read_pins() -> dict[str, str]:
    """native/llama.cpp.sha256 holds 'sha256  name' lines: the sdist and the vendored tree."""
    pins = {}
    try:
        lines = PIN_FILE.read_text().splitlines()
    except OSError as e:
        raise SourceError(f"cannot read the pin file {PIN_FILE}: {e.strerror}")
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            digest, name = line.split(maxsplit=1)
            pins[name] = digest
    for need in (SDIST_NAME, "vendor/llama.cpp"):
        if need not in pins:
            raise SourceError(f"{PIN_FILE.name} has no sha256 for {need}")
    return pins


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root: Path) -> str:
    """Order-independent digest of a source tree: sha256 over sorted 'path\\0sha256\\n'."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _TREE_SKIP)
        for name in filenames:
            if name in _TREE_SKIP:  # the sdist's vendored tree has a submodule .git file
                continue
            p = Path(dirpath) / name
            if p.is_symlink() or not p.is_file():
                continue
            entries.append(f"{p.relative_to(root).as_posix()}\0{sha256_file(p)}\n")
    h = hashlib.sha256()
    for e in sorted(entries):
        h.update(e.encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# patch series
# ---------------------------------------------------------------------------------------
def patch_series() -> list[Path]:
    series = PATCH_DIR / "series"
    if not series.exists():
        return []
    patches = []
    for line in series.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        p = PATCH_DIR / line
        if not p.is_file():
            raise SourceError(f"patch series names {line}, which is not in native/patches/")
        patches.append(p)
    return patches


def patch_series_hash() -> str:
    h = hashlib.sha256()
    for p in patch_series():
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _git_apply(tree: Path, patch: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", "apply", "--whitespace=nowarn", *extra, str(patch)],
        cwd=tree, capture_output=True, text=True)


def apply_patches(tree: Path) -> None:
    """Apply the series in order. A patch that is already applied is skipped (idempotent);
    one that neither applies nor is applied stops everything, naming the patch."""
    if shutil.which("git") is None:
        raise SourceError("git is needed to apply native/patches (install git)")
    for p in patch_series():
        if _git_apply(tree, p, "--check").returncode == 0:
            r = _git_apply(tree, p)
            if r.returncode != 0:
                raise SourceError(f"patch {p.name} failed to apply: {_first_line(r.stderr)}")
        elif _git_apply(tree, p, "--reverse", "--check").returncode == 0:
            continue  # already in the tree
        else:
            r = _git_apply(tree, p, "--check")
            raise SourceError(
                f"patch {p.name} does not apply to llama.cpp from {PIN_PACKAGE} "
                f"{PIN_VERSION}: {_first_line(r.stderr)}")


def _first_line(text: str) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return "(no message)"


# ---------------------------------------------------------------------------------------
# fetching
# ---------------------------------------------------------------------------------------
def _pip_download(dest: Path) -> Path:
    """Download the sdist with pip into dest; pip chooses the index, we name no address."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(dest),
           f"{PIN_PACKAGE}=={PIN_VERSION}"]
    try:  # metadata preparation needs the build backend; use ours if it is installed
        import scikit_build_core  # noqa: F401
        cmd.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    print(f"lightkv-edge: downloading {PIN_PACKAGE}=={PIN_VERSION} source with pip",
          file=sys.stderr)
    r = subprocess.run(cmd, capture_output=True, text=True)
    out = dest / SDIST_NAME
    if r.returncode != 0 or not out.exists():
        err = [l for l in (r.stderr or "").splitlines() if "ERROR" in l or "error" in l]
        raise SourceError(
            f"pip could not download {PIN_PACKAGE}=={PIN_VERSION} "
            f"({(err[0].strip() if err else _first_line(r.stderr))}); "
            "on an offline machine set LIGHTKV_EDGE_LLAMA_SOURCE to a local copy")
    return out


def obtain_sdist(local: str | None = None) -> Path:
    """The verified sdist, from the cache, a local file, or pip."""
    pins = read_pins()
    want = pins[SDIST_NAME]
    cached = cache_root() / "downloads" / SDIST_NAME
    src = Path(local).expanduser() if local else None
    if src is not None and src.is_dir():
        src = None  # an unpacked llama.cpp tree has no Python layer: cache or pip
    if src is not None:
        if not src.is_file():
            raise SourceError(f"local source {src} does not exist")
        got = sha256_file(src)
        if got != want:
            raise SourceError(f"sha256 mismatch for {src}: expected {want}, got {got} "
                              f"(not the {PIN_PACKAGE} {PIN_VERSION} sdist)")
        return src
    if cached.exists() and sha256_file(cached) == want:
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        got_path = _pip_download(Path(tmp))
        got = sha256_file(got_path)
        if got != want:
            raise SourceError(f"sha256 mismatch for the downloaded {SDIST_NAME}: expected "
                              f"{want}, got {got}; refusing to build from it")
        os.replace(got_path, cached)
    return cached


def _extract_vendor(sdist: Path, dest: Path) -> None:
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(VENDOR_PREFIX):
                continue
            m.name = m.name[len(VENDOR_PREFIX):]
            # the submodule's .git file would make `git apply` look for a repository
            if m.name and m.name.split("/")[0] not in _TREE_SKIP:
                members.append(m)
        tar.extractall(dest, members=members, filter="data")


# ---------------------------------------------------------------------------------------
# the patched tree
# ---------------------------------------------------------------------------------------
def source_key(local: str | None = None) -> str:
    """What the patched tree depends on: the pinned source and the patch series."""
    return f"{read_pins()['vendor/llama.cpp'][:16]}-{patch_series_hash()[:16]}"


def patched_tree(local: str | None = None) -> Path:
    """Path of the verified, patched llama.cpp tree (created once per key)."""
    local = local or os.environ.get("LIGHTKV_EDGE_LLAMA_SOURCE") or None
    pins = read_pins()
    key = source_key(local)
    tree = cache_root() / "src" / f"llama.cpp-{key}"
    if (tree / ".lightkv-patched").exists():
        return tree
    tree.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=tree.parent))
    try:
        if local and Path(local).expanduser().is_dir():
            src = Path(local).expanduser()
            got = sha256_tree(src)
            if got != pins["vendor/llama.cpp"]:
                raise SourceError(
                    f"local llama.cpp tree {src} does not match the pinned source "
                    f"(tree sha256 {got[:16]}..., expected {pins['vendor/llama.cpp'][:16]}...)")
            shutil.rmtree(work)
            shutil.copytree(src, work, symlinks=True,
                            ignore=lambda d, names: [n for n in names if n in _TREE_SKIP])
        else:
            _extract_vendor(obtain_sdist(local), work)
            got = sha256_tree(work)
            if got != pins["vendor/llama.cpp"]:
                raise SourceError(f"the vendored llama.cpp tree hashes to {got[:16]}..., "
                                  f"expected {pins['vendor/llama.cpp'][:16]}...")
        apply_patches(work)
        (work / ".lightkv-patched").write_text(patch_series_hash() + "\n")
        if tree.exists():  # a half-made tree from an interrupted run
            shutil.rmtree(tree)
        os.replace(work, tree)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return tree


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", help="local sdist (.tar.gz) or llama.cpp tree to use "
                    "instead of downloading (default: $LIGHTKV_EDGE_LLAMA_SOURCE)")
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--print-dir", action="store_true", help="print the patched tree")
    what.add_argument("--print-sdist", action="store_true", help="print the verified sdist")
    what.add_argument("--print-key", action="store_true", help="print the source key")
    what.add_argument("--print-version", action="store_true", help="print the pin")
    args = ap.parse_args(argv)
    try:
        if args.print_sdist:
            print(obtain_sdist(args.source or os.environ.get("LIGHTKV_EDGE_LLAMA_SOURCE")))
        elif args.print_key:
            print(source_key(args.source))
        elif args.print_version:
            print(f"{PIN_PACKAGE}=={PIN_VERSION}")
        else:
            print(patched_tree(args.source))
    except SourceError as e:
        print(f"lightkv-edge build: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lightkv-edge build: interrupted", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
