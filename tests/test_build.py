"""The foundation is wired: one pinned llama.cpp, built once, used by everything.

- our libraries load from lightkv_edge._libs.lib_dir();
- the recorded pin is native/llama_source.py's, and so is the installed Python layer;
- llama_cpp and llama_cpp.mtmd_cpp loaded OUR libllama / libmtmd (there is one llama.cpp);
- `python -m lightkv_edge --version` reports version, pin and devices;
- building again with unchanged inputs is a cache hit (no compile);
- `import lightkv_edge; import llama_cpp` loads our build in a clean environment (README);
- the production path (an embed-mode chat) never imports torch.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lightkv_edge
from lightkv_edge import _libs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "native"))
import llama_source  # noqa: E402

PIN = f"{llama_source.PIN_PACKAGE}=={llama_source.PIN_VERSION}"  # the pin's one home

# library -> a symbol it must export (proves it is the library we think it is)
LIBS = {
    "ggml-base": "ggml_init",
    "ggml": "ggml_backend_dev_count",
    "ggml-cpu": "ggml_backend_cpu_init",
    "llama": "llama_model_load_from_file",
    "mtmd": "mtmd_init_from_file",
    "lightkv": "lightkv_api_version",
}


@pytest.fixture(scope="module")
def build_info():
    from lightkv_edge import _build_info
    return _build_info


@pytest.mark.parametrize("name", list(LIBS))
def test_library_loads_from_lib_dir(name):
    path = _libs.lib_path(name)
    assert path.parent == _libs.lib_dir()
    assert path.is_file(), f"{path} missing"
    lib = ctypes.CDLL(str(path))
    assert hasattr(lib, LIBS[name]), f"{path.name} does not export {LIBS[name]}"


def test_pin_recorded_and_python_layer_match(build_info):
    assert build_info.LLAMA_CPP_PIN == PIN
    assert re.fullmatch(r"[0-9a-f]{20}", build_info.LLAMA_CPP_BUILD_KEY)
    assert "CPU" in build_info.BACKENDS
    llama_cpp = _libs.use_our_llama_cpp()
    assert llama_cpp.__version__ == PIN.split("==")[1]


def test_llama_cpp_uses_our_libraries():
    llama_cpp = _libs.use_our_llama_cpp()
    import llama_cpp.mtmd_cpp as mtmd_cpp
    d = _libs.lib_dir().resolve()
    assert Path(llama_cpp.llama_cpp._lib._name).resolve() == d / _libs._lib_name("llama")
    assert Path(mtmd_cpp._libmtmd._name).resolve() == d / _libs._lib_name("mtmd")
    # ... and only ours: no libllama shipped inside the llama_cpp package (no second build)
    pkg = Path(llama_cpp.__file__).parent
    assert not list(pkg.glob("lib/*llama*")), list(pkg.glob("lib/*"))
    # the process has exactly one libllama / libggml-base mapped, from our folder
    if Path("/proc/self/maps").exists():
        maps = Path("/proc/self/maps").read_text().splitlines()
        for base in ("llama", "ggml-base", "mtmd"):
            name = _libs._lib_name(base)
            paths = {l.split()[-1] for l in maps if l.split()[-1].endswith("/" + name)}
            assert {Path(p).resolve() for p in paths} == {d / name}, paths


def test_our_libraries_are_the_recorded_build(build_info):
    """The libraries in lib_dir are byte-identical to the cached build named by the key
    (the wheel copies the cache; it does not compile llama.cpp a second time)."""
    sys.path.insert(0, str(ROOT / "native"))
    import llama_source
    prefix = llama_source.cache_root() / "build" / build_info.LLAMA_CPP_BUILD_KEY / "install"
    if not prefix.exists():
        pytest.skip(f"the build cache {prefix} is not on this machine (installed elsewhere)")
    info = json.loads((prefix / "lightkv-build.json").read_text())
    assert info["key"] == build_info.LLAMA_CPP_BUILD_KEY and info["pin"] == PIN
    for base in ("llama", "mtmd", "ggml", "ggml-base", "ggml-cpu"):
        name = _libs._lib_name(base)
        assert (_libs.lib_dir() / name).read_bytes() == (prefix / "lib" / name).read_bytes()


def test_version_command():
    r = subprocess.run([sys.executable, "-m", "lightkv_edge", "--version"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"lightkv-edge {lightkv_edge.__version__}"
    assert any(PIN in l for l in lines), r.stdout
    assert not any("not built" in l for l in lines), r.stdout
    devices = [l for l in lines if l.startswith("devices:")]
    assert len(devices) == 1 and re.search(r"\bCPU\b", devices[0]), r.stdout


def test_rebuild_with_unchanged_inputs_is_a_cache_hit(build_info):
    """native/build_llama.py with the installed build's flags reuses the cache: it prints
    the prefix of the recorded key and compiles nothing."""
    sys.path.insert(0, str(ROOT / "native"))
    import build_llama
    import llama_source
    flags = [f for f in build_info.BUILD_FLAGS if build_llama.FORWARDED.match(f)]
    _, cxx = build_llama.find_compilers()
    key = build_llama.build_key(flags, cxx)
    # Guard: never start a 4-minute cold compile from a test. If the key differs, the
    # installed package does not match what a rebuild would produce now: a real failure.
    assert key == build_info.LLAMA_CPP_BUILD_KEY, (
        f"a rebuild now would use key {key}, the installed build is "
        f"{build_info.LLAMA_CPP_BUILD_KEY}: inputs changed (rerun `make setup`)")
    prefix = llama_source.cache_root() / "build" / key / "install"
    if not (prefix / ".complete").exists():
        pytest.skip(f"the build cache {prefix} is not on this machine")
    env = dict(os.environ)
    # build_llama.py looks for cmake on PATH; the venv's cmake is where setup put it
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    r = subprocess.run([sys.executable, str(ROOT / "native" / "build_llama.py"), *flags],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert f"reusing the cached llama.cpp build {key}" in r.stderr, r.stderr
    assert "building llama.cpp" not in r.stderr
    assert Path(r.stdout.strip()) == prefix


def test_lib_dir_serves_plain_llama_cpp():
    """`python -m lightkv_edge --lib-dir` names the folder that makes a plain
    `import llama_cpp` (no lightkv_edge) load our build."""
    d = subprocess.run([sys.executable, "-m", "lightkv_edge", "--lib-dir"],
                       capture_output=True, text=True, check=True).stdout.strip()
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=d, MTMD_CPP_LIB=d)
    out = subprocess.run([sys.executable, "-c", "import llama_cpp, llama_cpp.mtmd_cpp as m; "
                          "print(llama_cpp.llama_cpp._lib._name); print(m._libmtmd._name)"],
                         capture_output=True, text=True, env=env, check=True).stdout.split()
    assert out == [str(Path(d) / "libllama.so"), str(Path(d) / "libmtmd.so")]


def _clean_env() -> dict:
    """The environment of a fresh shell: none of the variables that point llama_cpp or
    lightkv_edge at a library folder."""
    drop = ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB", "LIGHTKV_EDGE_LIB_DIR")
    return {k: v for k, v in os.environ.items() if k not in drop}


def test_import_lightkv_edge_then_llama_cpp_uses_our_build():
    """The README's promise, exactly: `import lightkv_edge` and then `import llama_cpp`, in
    a clean environment, loads our libllama and libmtmd."""
    code = ("import lightkv_edge\nimport llama_cpp\nimport llama_cpp.mtmd_cpp as m\n"
            "print(llama_cpp.llama_cpp._lib._name)\nprint(m._libmtmd._name)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=_clean_env(), cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-600:]
    d = _libs.lib_dir().resolve()
    got = [Path(p).resolve() for p in r.stdout.split()]
    assert got == [d / _libs._lib_name("llama"), d / _libs._lib_name("mtmd")], r.stdout


def test_plain_llama_cpp_alone_finds_no_library():
    """The control of the test above: llama-cpp-python carries no libllama of its own, so
    without lightkv_edge (and without the variables) `import llama_cpp` cannot load one.
    This is what makes the promise above necessary, and that test not vacuous."""
    r = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True,
                       text=True, env=_clean_env(), cwd=ROOT, timeout=120)
    assert r.returncode != 0
    assert "Shared library with base name 'llama' not found" in r.stderr, r.stderr[-600:]


_NO_TORCH_CHAT = """
import importlib.abc, runpy, sys

class NoTorch(importlib.abc.MetaPathFinder):
    tried = []
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            NoTorch.tried.append(name)
        return None

sys.meta_path.insert(0, NoTorch())
sys.argv = ["lightkv_edge", "chat", "lightkv_edge/models/example.png",
            "-p", "what colour is the circle?"]
try:
    runpy.run_module("lightkv_edge", run_name="__main__", alter_sys=True)
except SystemExit as e:
    if e.code not in (None, 0):
        raise
sys.stdout.flush()
print()
print("TORCH-IMPORTS:", NoTorch.tried, "torch" in sys.modules)
"""


def test_embed_mode_chat_never_imports_torch():
    """`python -m lightkv_edge chat lightkv_edge/models/example.png -p ...` with the default
    mode (embed, on the embedded model): torch is never even looked for. The baselines that
    need the PyTorch reference are benchmark-only and import it lazily."""
    r = subprocess.run([sys.executable, "-c", _NO_TORCH_CHAT], capture_output=True, text=True,
                       env=_clean_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-800:]
    answer, _, verdict = r.stdout.rpartition("TORCH-IMPORTS:")
    assert verdict.strip() == "[] False", (verdict, r.stderr[-800:])
    assert answer.strip(), "the chat produced no answer"


def test_native_suites_fail_without_the_library(tmp_path):
    """A build whose liblightkv does not load turns the native parity suites red (errors),
    never into skips that leave CI green. Only the GPU-only test may skip (no device)."""
    env = dict(_clean_env(), LIGHTKV_EDGE_LIB_DIR=str(tmp_path))  # a folder with no library
    mods = [f"tests/test_native_{m}.py" for m in ("api", "guidance", "merge", "positions")]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *mods],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    summary = r.stdout.strip().splitlines()[-1]
    assert r.returncode == 1, r.stdout[-800:]
    assert re.search(r"\d{2,} errors", summary) and "passed" not in summary, summary
    skipped = re.search(r"(\d+) skipped", summary)
    assert skipped is None or int(skipped.group(1)) <= 1, summary
    assert "liblightkv does not load" in r.stdout


def test_a_second_build_of_one_cache_entry_waits_for_the_first(tmp_path):
    """build_llama._exclusive: while one process holds a cache entry, another cannot take
    it (so it cannot delete the first one's work directory), and gets it once released."""
    sys.path.insert(0, str(ROOT / "native"))
    import build_llama
    root = tmp_path / "build" / "somekey"
    probe = ("import fcntl, sys; f = open(sys.argv[1], 'w')\n"
             "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n"
             "    sys.exit(3)\n")
    lock = str(root.parent / "somekey.lock")
    with build_llama._exclusive(root):
        held = subprocess.run([sys.executable, "-c", probe, lock], timeout=60)
    free = subprocess.run([sys.executable, "-c", probe, lock], timeout=60)
    assert held.returncode == 3 and free.returncode == 0
