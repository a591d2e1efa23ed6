#!/usr/bin/env bash
# One-shot set-up on a fresh machine: a virtual environment in .venv, the Python
# dependencies, the pinned llama.cpp (built once, cached in ~/.cache/lightkv-edge), our
# native library, llama-cpp-python's Python layer bound to that build, and the package
# itself (editable). Idempotent and quick when nothing changed.
#   CMAKE_ARGS="-DGGML_CUDA=ON" bash scripts/setup.sh     # NVIDIA (Jetson, desktop)
#   CMAKE_ARGS="-DGGML_METAL=ON" bash scripts/setup.sh    # macOS (default there)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
say() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: %s\n' "$*" >&2; exit 2; }

command -v "$PYTHON" >/dev/null || die "$PYTHON not found (Python >= 3.10 is needed)"
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  # system site-packages are visible (a torch already installed is reused), but every
  # requirement below is installed into the venv at its pinned version
  "$PYTHON" -m venv --system-site-packages "$VENV" || die "could not create $VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)
LOG="$VENV/setup.log"
: > "$LOG"

say "installing Python dependencies"
"${PIP[@]}" install -r requirements-dev.txt >>"$LOG" 2>&1 \
  || die "pip could not install requirements-dev.txt (see $LOG)"

# The verified, patched llama.cpp tree (from the sdist, or $LIGHTKV_EDGE_LLAMA_SOURCE).
TREE=$("$PY" native/llama_source.py --print-dir) || exit 2

# llama-cpp-python's version has one home: PIN_VERSION in native/llama_source.py.
PIN=$("$PY" native/llama_source.py --print-version) || exit 2    # llama-cpp-python==X.Y.Z
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != sys.argv[1])" \
     "${PIN#*==}" 2>/dev/null; then
  say "installing llama-cpp-python's Python layer (no native build: it loads ours)"
  SDIST=$("$PY" native/llama_source.py --print-sdist) || exit 2
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "${PIP[@]}" install --no-deps \
    --no-build-isolation "$SDIST" >>"$LOG" 2>&1 || die "installing llama-cpp-python failed (see $LOG)"
fi
# gguf-py from the pinned tree (pyproject.toml requires exactly its version).
GGUF_VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$TREE/gguf-py/pyproject.toml" | head -n 1)
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('gguf') != sys.argv[1])" \
     "$GGUF_VERSION" 2>/dev/null; then
  say "installing gguf-py $GGUF_VERSION from the pinned llama.cpp"
  "${PIP[@]}" install "$TREE/gguf-py" >>"$LOG" 2>&1 || die "installing gguf-py failed (see $LOG)"
fi
# The package's runtime dependencies, read from pyproject.toml (their one list).
mapfile -t RUNTIME < <("$PY" - <<'PYEOF'
try:
    import tomllib
except ImportError:  # Python 3.10: pip carries a TOML reader
    from pip._vendor import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
PYEOF
)
[ "${#RUNTIME[@]}" -gt 0 ] || die "could not read the dependencies from pyproject.toml"
"${PIP[@]}" install "${RUNTIME[@]}" >>"$LOG" 2>&1 \
  || die "pip could not install the runtime dependencies ${RUNTIME[*]} (see $LOG)"

say "building lightkv-edge (llama.cpp compiles once; later runs reuse the cache)"
if ! "${PIP[@]}" install --no-deps --no-build-isolation -e . >>"$LOG" 2>&1; then
  cause=$(grep -h -m1 "lightkv-edge build:" "$LOG" | sed 's/^ *//')
  die "${cause:-building the package failed (see $LOG)}"
fi
"$PY" -m lightkv_edge --version >&2 || die "the package does not start (see above)"
