"""The pinned llama.cpp source: verification, patch series, and one-line failures.

Fast and offline: the tests use a temporary LIGHTKV_EDGE_CACHE, small made-up trees and
patches, and pip with no index; only one read-only check looks at the real cache (the
patched tree of the current key, if this machine has one). Nothing here compiles.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "native"
sys.path.insert(0, str(NATIVE))
import llama_source  # noqa: E402

PIN = f"{llama_source.PIN_PACKAGE}=={llama_source.PIN_VERSION}"  # the pin's one home


def run(script: str, *args: str, env_extra: dict | None = None, cache: Path | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LIGHTKV_EDGE_LLAMA_SOURCE", "LIGHTKV_EDGE_CACHE")}
    if cache is not None:
        env["LIGHTKV_EDGE_CACHE"] = str(cache)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(NATIVE / script), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [l for l in r.stderr.splitlines() if l.startswith("lightkv-edge build:")]


def assert_one_line_failure(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errs = error_lines(r)
    assert len(errs) == 1, r.stderr
    # anything else on stderr is a progress line, never a second cause or a wall of text
    others = [l for l in r.stderr.splitlines() if l.strip() and l not in errs]
    assert all(l.startswith("lightkv-edge: ") for l in others), r.stderr
    assert r.stderr.rstrip("\n").splitlines()[-1] == errs[0]  # the cause comes last
    for n in needles:
        assert n in errs[0], errs[0]
    assert r.stdout == ""  # no path printed for the build to pick up
    return errs[0]


def make_tgz(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_tree(root: Path) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "CMakeLists.txt").write_text("project(fake)\n")
    (root / "src" / "a.c").write_text("int a(void) {\n    return 1;\n}\n")
    (root / "src" / "b.c").write_text("int b(void) {\n    return 2;\n}\n")
    return root


GOOD_PATCH = """\
--- a/src/a.c
+++ b/src/a.c
@@ -1,3 +1,3 @@
 int a(void) {
-    return 1;
+    return 42;
 }
"""

BAD_PATCH = """\
--- a/src/b.c
+++ b/src/b.c
@@ -1,3 +1,3 @@
 int b(void) {
-    return 7;
+    return 8;
 }
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("LIGHTKV_EDGE_CACHE", str(d))
    monkeypatch.delenv("LIGHTKV_EDGE_LLAMA_SOURCE", raising=False)
    return d


@pytest.fixture
def patches(tmp_path, monkeypatch):
    """A private patch folder; write(series=[...], **{name: text}) fills it."""
    d = tmp_path / "patches"
    d.mkdir()
    monkeypatch.setattr(llama_source, "PATCH_DIR", d)

    def write(series: list[str], **files: str) -> Path:
        for name, text in files.items():
            (d / name.replace("_", ".")).write_text(text)
        (d / "series").write_text("# test series\n" + "\n".join(series) + "\n")
        return d
    return write


# ---------------------------------------------------------------------------------------
# the pin and the sdist
# ---------------------------------------------------------------------------------------
def test_print_version_prints_the_pin():
    r = run("llama_source.py", "--print-version")
    assert r.returncode == 0 and r.stdout.strip() == PIN


def test_pin_file_names_the_sdist_and_the_tree():
    pins = llama_source.read_pins()
    assert set(pins) >= {llama_source.SDIST_NAME, "vendor/llama.cpp"}
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in pins.values())


def test_local_sdist_with_wrong_sha256_is_refused(tmp_path):
    bogus = make_tgz(tmp_path / llama_source.SDIST_NAME,
                     {llama_source.VENDOR_PREFIX + "CMakeLists.txt": b"evil\n"})
    cache = tmp_path / "cache"
    r = run("llama_source.py", "--source", str(bogus), "--print-dir", cache=cache)
    err = assert_one_line_failure(r, "sha256 mismatch", str(bogus))
    assert hashlib.sha256(bogus.read_bytes()).hexdigest() in err  # says what it got
    # nothing was extracted or left behind
    src = cache / "src"
    assert not src.exists() or not list(src.iterdir())


def test_local_sdist_given_through_the_environment_is_checked_too(tmp_path):
    bogus = make_tgz(tmp_path / "x.tar.gz", {"a": b"b"})
    r = run("llama_source.py", "--print-sdist", cache=tmp_path / "cache",
            env_extra={"LIGHTKV_EDGE_LLAMA_SOURCE": str(bogus)})
    assert_one_line_failure(r, "sha256 mismatch")


def test_missing_local_source_is_one_line(tmp_path):
    r = run("llama_source.py", "--source", str(tmp_path / "nope.tar.gz"), "--print-dir",
            cache=tmp_path / "cache")
    assert_one_line_failure(r, "nope.tar.gz")


def test_failed_pip_download_is_one_line(tmp_path):
    cache = tmp_path / "cache"
    # a corrupt sdist in the cache is not trusted: it must try pip again
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / llama_source.SDIST_NAME).write_bytes(b"not the sdist")
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    r = run("llama_source.py", "--print-dir", cache=cache, timeout=120,
            env_extra={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty),
                       "PIP_CONFIG_FILE": os.devnull})
    err = assert_one_line_failure(r, "pip", PIN)
    assert "LIGHTKV_EDGE_LLAMA_SOURCE" in err  # tells an offline user what to do
    # the temporary download folder is gone; the corrupt file was not "verified" in place
    assert [p.name for p in (cache / "downloads").iterdir()] == [llama_source.SDIST_NAME]


# ---------------------------------------------------------------------------------------
# local trees
# ---------------------------------------------------------------------------------------
def test_tree_hash_is_content_based(tmp_path):
    t = make_tree(tmp_path / "t")
    h = llama_source.sha256_tree(t)
    (t / ".git").mkdir()
    (t / ".git" / "HEAD").write_text("ref: x\n")
    (t / "build").mkdir()
    (t / "build" / "junk.o").write_bytes(b"\0")
    assert llama_source.sha256_tree(t) == h  # VCS and build folders do not count
    (t / "src" / "a.c").write_text("int a(void) { return 0; }\n")
    assert llama_source.sha256_tree(t) != h
    (t / "src" / "a.c").unlink()
    assert llama_source.sha256_tree(t) != h


def test_local_tree_with_wrong_hash_is_refused(tmp_path, cache):
    t = make_tree(tmp_path / "tree")
    with pytest.raises(llama_source.SourceError, match="does not match the pinned source"):
        llama_source.patched_tree(str(t))
    assert not list((cache / "src").glob("llama.cpp-*"))  # no tree entered the cache
    assert not list((cache / "src").glob(".llama.cpp-*"))  # no leftover work dir
    # and through the command line: one line, exit 2
    r = run("llama_source.py", "--source", str(t), "--print-dir", cache=cache)
    assert_one_line_failure(r, "does not match the pinned source", str(t))


def test_local_tree_with_the_pinned_hash_is_copied_and_patched(tmp_path, cache, patches,
                                                               monkeypatch):
    t = make_tree(tmp_path / "tree")
    # a submodule-style .git file (the sdist's vendored tree has one): not hashed, not
    # copied, and it must not make `git apply` look for a repository that is not there
    (t / ".git").write_text("gitdir: ../../.git/modules/vendor/llama.cpp\n")
    pins = dict(llama_source.read_pins())
    pins["vendor/llama.cpp"] = llama_source.sha256_tree(t)  # pretend this tree is the pin
    monkeypatch.setattr(llama_source, "read_pins", lambda: pins)
    patches(["good.patch"], good_patch=GOOD_PATCH)
    monkeypatch.setenv("LIGHTKV_EDGE_LLAMA_SOURCE", str(t))
    out = llama_source.patched_tree()
    assert out.parent == cache / "src" and out != t
    assert "return 42;" in (out / "src" / "a.c").read_text()
    assert "return 1;" in (t / "src" / "a.c").read_text()  # the user's tree is untouched
    assert (out / ".lightkv-patched").exists() and not (out / ".git").exists()
    assert llama_source.patched_tree() == out  # second call: the cached tree


# ---------------------------------------------------------------------------------------
# the patch series
# ---------------------------------------------------------------------------------------
def test_good_patch_applies_once_and_is_idempotent(tmp_path, patches):
    t = make_tree(tmp_path / "tree")
    patches(["good.patch"], good_patch=GOOD_PATCH)
    llama_source.apply_patches(t)
    after = (t / "src" / "a.c").read_text()
    assert "return 42;" in after and "return 1;" not in after
    llama_source.apply_patches(t)  # already applied: skipped, not an error
    assert (t / "src" / "a.c").read_text() == after
    assert (t / "src" / "b.c").read_text() == "int b(void) {\n    return 2;\n}\n"


def test_bad_patch_stops_with_its_name(tmp_path, patches):
    t = make_tree(tmp_path / "tree")
    patches(["good.patch", "bad.patch"], good_patch=GOOD_PATCH, bad_patch=BAD_PATCH)
    with pytest.raises(llama_source.SourceError) as e:
        llama_source.apply_patches(t)
    msg = str(e.value)
    assert "bad.patch" in msg and "does not apply" in msg and "\n" not in msg
    assert llama_source.PIN_VERSION in msg


def test_series_naming_a_missing_patch_is_an_error(patches):
    patches(["ghost.patch"])
    with pytest.raises(llama_source.SourceError, match="ghost.patch"):
        llama_source.patch_series()


def test_series_hash_is_part_of_the_key(patches):
    patches([])
    empty = llama_source.source_key()
    patches(["good.patch"], good_patch=GOOD_PATCH)
    one = llama_source.source_key()
    assert one != empty
    patches(["good.patch"], good_patch=GOOD_PATCH.replace("42", "43"))
    assert llama_source.source_key() not in (empty, one)  # content counts, not only names
    patches(["# only a comment", ""])
    assert llama_source.source_key() == empty  # comments and blank lines do not


def test_repository_series_is_consistent():
    """Every patch the real series names exists (a typo would break every fresh build)."""
    for p in llama_source.patch_series():
        assert p.is_file() and p.read_text().strip(), p


def test_repository_series_is_applied_in_the_cached_tree(tmp_path):
    """Read-only: in the patched tree of the current key (if this machine has built it),
    the real series is applied: undone last patch first, on a copy of the files it
    touches, every patch reverses cleanly (later patches edit lines near earlier ones,
    so each is checked against the tree as it was right after it)."""
    tree = llama_source.cache_root() / "src" / f"llama.cpp-{llama_source.source_key()}"
    if not (tree / ".lightkv-patched").exists():
        pytest.skip(f"no patched tree for the current key in {tree.parent}")
    assert (tree / ".lightkv-patched").read_text().strip() == llama_source.patch_series_hash()
    series = llama_source.patch_series()
    touched = {line[6:].strip() for p in series for line in p.read_text().splitlines()
               if line.startswith("+++ b/")}
    for rel in touched:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tree / rel, tmp_path / rel)
    for p in reversed(series):
        r = llama_source._git_apply(tmp_path, p, "--reverse")
        assert r.returncode == 0, f"{p.name} is not applied in {tree}: {r.stderr}"
    assert touched


# ---------------------------------------------------------------------------------------
# the toolchain check (CMakeLists.txt runs it before project())
# ---------------------------------------------------------------------------------------
def test_missing_c_compiler_is_one_line(tmp_path):
    errf = tmp_path / "err.txt"
    r = run("build_llama.py", "--check-toolchain", "--error-file", str(errf),
            env_extra={"CC": "/nonexistent/cc"})
    err = assert_one_line_failure(r, "no C compiler found")
    assert errf.read_text().strip() == err[len("lightkv-edge build: "):]


def test_missing_cxx_compiler_is_one_line():
    r = run("build_llama.py", "--check-toolchain", env_extra={"CXX": "/nonexistent/c++"})
    assert_one_line_failure(r, "no C++ compiler found")


def test_toolchain_check_passes_here():
    r = run("build_llama.py", "--check-toolchain")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""


# ---------------------------------------------------------------------------------------
# one source of truth each: the llama-cpp-python pin, the runtime dependencies (numpy's
# minimum, gguf), the forwarded CMake flags
# ---------------------------------------------------------------------------------------
def _toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    return tomllib.loads(path.read_text())


def _runtime_deps() -> dict[str, str]:
    """pyproject's [project].dependencies as {name: specifier}."""
    out = {}
    for dep in _toml(ROOT / "pyproject.toml")["project"]["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", dep)
        out[m.group(1).lower().replace("_", "-")] = m.group(2).strip()
    return out


def _tracked_texts() -> dict[str, str]:
    r = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                       cwd=ROOT, capture_output=True, text=True, check=True)
    out = {}
    for name in filter(None, r.stdout.split("\0")):
        try:
            out[name] = (ROOT / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            pass
    return out


def test_llama_cpp_python_pin_has_one_home():
    """native/llama_source.py holds the version; setup.sh asks it, pyproject does not name
    it, and every mention elsewhere (docs, hash file) agrees with it."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "native/llama_source.py --print-version" in setup
    assert llama_source.PIN_VERSION not in setup
    assert llama_source.PIN_VERSION not in (ROOT / "pyproject.toml").read_text()
    mention = re.compile(r"llama[-_]cpp[-_]python(?:==|-| `?)(\d+\.\d+\.\d+)")
    seen = 0
    for name, text in _tracked_texts().items():
        for m in mention.finditer(text):
            seen += 1
            assert m.group(1) == llama_source.PIN_VERSION, f"{name}: {m.group(0)}"
    assert seen >= 5, seen


def test_pip_install_does_not_compile_llama_cpp_twice():
    """The metadata pip resolves names no llama-cpp-python (whose sdist would compile its own
    llama.cpp); the package says how to get its Python layer instead."""
    meta = _toml(ROOT / "pyproject.toml")["project"]
    every = list(meta["dependencies"]) + [d for ds in meta.get("optional-dependencies", {}).values()
                                          for d in ds]
    assert not [d for d in every if d.lower().replace("_", "-").startswith("llama-cpp-python")]
    req = (ROOT / "requirements-dev.txt").read_text().lower().replace("_", "-")
    assert "\nllama-cpp-python" not in "\n" + req


def test_missing_python_layer_is_a_one_line_instruction(tmp_path):
    """Without llama-cpp-python (a plain `pip install .`), the first use of llama.cpp stops
    with one line that names the set-up command; nothing crashes."""
    shadow = tmp_path / "llama_cpp"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('No module named llama_cpp')\n")
    code = ("from lightkv_edge import _libs\n"
            "try:\n    _libs.use_our_llama_cpp()\n"
            "except _libs.NativeLibraryError as e:\n    print(e)\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and "make setup" in lines[0], r.stdout


def test_runtime_dependencies_have_one_list():
    """pyproject.toml lists the runtime dependencies; requirements-dev.txt repeats none of
    them (setup installs pyproject's list), so numpy's minimum has one value."""
    deps = _runtime_deps()
    assert {"numpy", "pillow", "threadpoolctl", "gguf"} <= set(deps), deps
    req = [l.split("#")[0].strip() for l in (ROOT / "requirements-dev.txt").read_text().splitlines()]
    names = {re.split(r"[<>=!~ \[]", l)[0].lower().replace("_", "-") for l in req if l}
    assert not names & set(deps), names & set(deps)
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert '["project"]["dependencies"]' in setup  # setup installs pyproject's list


def test_gguf_and_numpy_pins_match_the_pinned_gguf_py():
    """gguf is the gguf-py of the pinned tree: pyproject requires exactly its version, and
    numpy's minimum is gguf-py's own (ours cannot be lower than what gguf needs)."""
    from tests.helpers.pinned import llama_cpp_dir
    gguf = _toml(llama_cpp_dir() / "gguf-py" / "pyproject.toml")["project"]
    deps = _runtime_deps()
    assert deps["gguf"] == f"=={gguf['version']}", deps["gguf"]
    numpy_min = next(re.search(r">=\s*([\d.]+)", d).group(1) for d in gguf["dependencies"]
                     if d.startswith("numpy"))
    assert deps["numpy"] == f">={numpy_min}", deps["numpy"]


FORWARD_CASES = {
    "-DGGML_CUDA=ON": True,
    "-DGGML_NATIVE:BOOL=OFF": True,
    "-DLLAMA_CURL=OFF": True,
    "-DCMAKE_CUDA_ARCHITECTURES=80;87": True,
    "-DCUDAToolkit_ROOT=/opt/cuda": True,
    "-DBLAS_LIBRARIES=/usr/lib/libopenblas.so": True,
    "-DCMAKE_OSX_ARCHITECTURES=arm64": True,
    "-DLLAMA_PREFIX=/cache/build/abc/install": False,   # our own result
    "-DCMAKE_BUILD_TYPE=Release": False,                # set by scikit-build on every build
    "-DCMAKE_C_COMPILER=/usr/bin/cc": False,            # set by project(); CC decides
    "-DCMAKE_CXX_COMPILER=/usr/bin/c++": False,
    "-DCMAKE_C_COMPILER_AR=/usr/bin/gcc-ar": False,
    "-DCMAKE_INSTALL_PREFIX=/tmp/x": False,
    "-DPython_EXECUTABLE=/usr/bin/python3": False,
    "-DSKBUILD_PLATLIB_DIR=/tmp/x": False,
}


def test_forwarded_cmake_flags_have_one_rule(tmp_path):
    """CMakeLists.txt hands every cache variable to build_llama.py, whose FORWARDED rule
    alone filters them (no second regex in CMake); checked through the same file handshake
    CMake uses, without building anything."""
    import build_llama
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert "--cache-vars" in cmake and "MATCHES" not in cmake
    cand = tmp_path / "vars.txt"
    cand.write_text("".join(f + "\n" for f in FORWARD_CASES))
    out = tmp_path / "flags.txt"
    r = run("build_llama.py", "--check-toolchain", "--cache-vars", str(cand), "--flags-out", str(out))
    assert r.returncode == 0, r.stderr
    want = [f for f, fwd in FORWARD_CASES.items() if fwd]
    assert json.loads("[" + out.read_text() + "]") == want
    assert build_llama.forwarded(list(FORWARD_CASES)) == want


def test_default_build_forwards_nothing(tmp_path):
    """What CMake hands over in a default CPU build (compilers, build type, install paths,
    our LLAMA_PREFIX) forwards no flag: the default build's cache key is the hand-run key."""
    import build_llama
    defaults = [f for f, fwd in FORWARD_CASES.items() if not fwd]
    assert build_llama.forwarded(defaults) == []
