#!/usr/bin/env bash
# The CUDA checks, for a lent GPU machine that can reach nothing (no pip, no downloads):
# build the pinned, patched llama.cpp and liblightkv with -DGGML_CUDA=ON, run the native
# parity suite on the GPU, and run the cost benchmark there; every result is a file in $OUT.
#
#   bash scripts/device_bench.sh pack      # HERE, after `make setup`: packs into .device/
#                                          # (git-ignored) what the GPU machine lacks: the
#                                          # patched llama.cpp source (only what the build
#                                          # reads), llama-cpp-python's and gguf-py's Python
#                                          # layers
#   bash scripts/device_bench.sh run       # THERE, in a copy of the checkout with .device/;
#                                          # OUT=DIR for the results (default device-out/)
#
# `run` is resumable on a machine that stays warm: the llama.cpp build is skipped when its
# install exists. Stages and their files in $OUT: version.txt (backends seen), parity.txt
# (scripts/parity_native.py on CUDA0, then with ops forced to the CPU), pytest.txt (the
# native suites: the GPU-only tests run there), cost-<model>.json/.md (the cost benchmark,
# every layer offloaded), log.txt (everything). CUDA_ARCH (default 90, Hopper; 87 Jetson
# Orin) picks the one architecture compiled, to keep the build inside a short lease.
# A dry run of the whole flow on a CPU machine (checks the script, not CUDA):
#   GPU=0 PY=.venv/bin/python OUT=/tmp/dry bash scripts/device_bench.sh run
# (LLAMA_PREFIX=an existing llama.cpp install skips the llama.cpp build)
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=.device
say() { printf 'device_bench: %s\n' "$*" >&2; }
die() { printf 'device_bench: %s\n' "$*" >&2; exit 2; }

pack() {
  local py=.venv/bin/python
  [ -x "$py" ] || die "run 'make setup' first (the patched tree and the Python layers come from it)"
  local tree site
  tree=$("$py" native/llama_source.py --print-dir) || exit 2
  site=$("$py" -c "import importlib.util as u, os; print(os.path.dirname(os.path.dirname(u.find_spec('llama_cpp').origin)))" \
         2>/dev/null) || die "llama-cpp-python's Python layer is not installed (make setup)"
  rm -rf "$STAGE" && mkdir -p "$STAGE/py"
  grep -qx "/$STAGE/" .git/info/exclude 2>/dev/null || echo "/$STAGE/" >> .git/info/exclude
  # what the CMake build of ggml, libllama and libmtmd reads; models, docs, tests and the
  # other tools stay behind (the whole tree is 176 MB, a lease carries 64 MiB)
  tar -C "$tree" -czf "$STAGE/llama.tar.gz" --exclude='*.gguf' --exclude='.git' \
      CMakeLists.txt cmake common ggml include src vendor licenses tools/CMakeLists.txt tools/mtmd \
      $(cd "$tree" && ls -d LICENSE* 2>/dev/null) 2>/dev/null \
      || die "could not pack the llama.cpp tree $tree"
  cp -r "$site/llama_cpp" "$STAGE/py/" && find "$STAGE/py" -name '*.so*' -delete
  cp -r "$tree/gguf-py/gguf" "$STAGE/py/"
  du -sh "$STAGE" >&2
  local mib
  mib=$(du -sm "$STAGE" | cut -f1)
  [ "$mib" -lt 56 ] || die "$STAGE is $mib MiB: too large to travel with the checkout"
  say "packed. On the GPU machine: carry [\"$STAGE\"], command 'bash scripts/device_bench.sh run'"
}

run() {
  [ -f "$STAGE/llama.tar.gz" ] || die "no $STAGE/llama.tar.gz: run 'bash scripts/device_bench.sh pack' here first"
  local out=${OUT:-device-out} arch=${CUDA_ARCH:-90} py=${PY:-python3} jobs flags backend
  jobs=$(nproc)
  if [ "${GPU:-1}" = 1 ]; then
    flags=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch") backend=CUDA0
  else
    flags=() backend=CPU
  fi
  mkdir -p "$out"
  exec > >(tee -a "$out/log.txt") 2>&1
  local src=/tmp/lkv-llama-src prefix=${LLAMA_PREFIX:-/tmp/lkv-llama-$backend}
  if [ ! -f "$prefix/lib/libmtmd.so" ]; then
    say "building llama.cpp for $backend ($jobs jobs)"
    rm -rf "$src" /tmp/lkv-llama-build && mkdir -p "$src"
    tar -C "$src" -xzf "$STAGE/llama.tar.gz"
    mapfile -t base < <("$py" native/build_llama.py --print-cmake-args)
    cmake -S "$src" -B /tmp/lkv-llama-build -G Ninja "${base[@]}" "${flags[@]}" \
          -DCMAKE_INSTALL_PREFIX="$prefix" >/dev/null
    cmake --build /tmp/lkv-llama-build -j "$jobs" >/dev/null
    cmake --install /tmp/lkv-llama-build >/dev/null
  fi
  say "building liblightkv"
  cmake -S native -B /tmp/lkv-native-build -G Ninja -DLLAMA_PREFIX="$prefix" >/dev/null
  cmake --build /tmp/lkv-native-build -j "$jobs" >/dev/null
  cp /tmp/lkv-native-build/liblightkv.so "$prefix/lib/"
  export LIGHTKV_EDGE_LIB_DIR="$prefix/lib" PYTHONPATH="$PWD/$STAGE/py:$PWD" PYTHONUNBUFFERED=1
  "$py" -c "from lightkv_edge import native; print('backends:', ', '.join(native.backends()))" \
    | tee "$out/version.txt"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$out/version.txt" || true

  say "native parity on $backend"
  { "$py" scripts/parity_native.py --backend "$backend" --cases 300 --max-n 2304 --max-d 4096
    [ "$backend" = CPU ] || "$py" scripts/parity_native.py --backend "$backend" --cases 60 \
      --force-cpu-ops ARGMAX,STEP,CONCAT
  } 2>&1 | tee "$out/parity.txt"
  say "native test suites (the GPU-only tests run here)"
  "$py" -m pytest -q -p no:cacheprovider tests/test_native_api.py tests/test_native_merge.py \
    tests/test_native_positions.py tests/test_native_guidance.py tests/test_guidance_model.py \
    2>&1 | tee "$out/pytest.txt" || true

  say "cost benchmark on $backend"
  local models=("$@")
  [ "${#models[@]}" -gt 0 ] || models=(qwen2vl-2b)
  for m in "${models[@]}"; do
    local line text mmproj
    # built there (gguf-py writes the text model block by block; the mmproj needs the
    # pinned converters): prints "name<TAB>text.gguf<TAB>mmproj.gguf"
    line=$("$py" scripts/make_shape_models.py "$m" | tail -n 1) || { say "no shape model $m"; continue; }
    IFS=$'\t' read -r _ text mmproj <<< "$line"
    # the configurations of the CPU report (scripts/bench_report.py COST_MODES, --cost-keep)
    "$py" -m lightkv_edge cost -m "$text" --mmproj "$mmproj" -ngl 999 \
      --modes off,embed,layer,evict,decode-evict --keep 0.75,0.55,0.25 --runs 5 \
      --long-tokens 512 --image-size 672 \
      --json "$out/cost-${m}.json" --markdown "$out/cost-${m}.md" || say "cost of $m failed"
  done
}

case "${1:-}" in
  pack) pack ;;
  run) shift; run "$@" ;;
  *) die "usage: bash scripts/device_bench.sh pack|run [SHAPE_MODEL ...]" ;;
esac
