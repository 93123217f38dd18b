#!/usr/bin/env bash
# The test command (README): set up the environment (scripts/setup.sh: CPU-only where no GPU is
# visible, unless LONGCTX_REQUIRE_CUDA=1 as in CI or LONGCTX_CPU_ONLY=0), then run the C++
# standalone tests (CMake + ctest) and the pytest suite. GPU tests skip without a GPU.
# Fails on any error, including pytest finding no tests (exit code 5).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
export VENV
bash "$ROOT/scripts/setup.sh"

echo "== C++ standalone tests (CMake + ctest)"
BUILD=$(mktemp -d)
# Without a GPU the CUDA tests cannot run (ctest skips them): compile the flash tests for one
# (head dim, dtype) only, which checks that they build. LONGCTX_HEADDIMS / LONGCTX_DTYPES, when
# set, choose instead.
CMAKE_ARGS=(-DLONGCTX_WITH_TORCH=OFF -DPython3_EXECUTABLE="$VENV/bin/python")
if ! nvidia-smi -L > /dev/null 2>&1; then
  CMAKE_ARGS+=(-DLONGCTX_HEADDIMS="${LONGCTX_HEADDIMS:-128}" -DLONGCTX_DTYPES="${LONGCTX_DTYPES:-bf16}")
fi
cmake -S "$ROOT" -B "$BUILD" "${CMAKE_ARGS[@]}" > "$BUILD/configure.log"
cmake --build "$BUILD" -j "$(nproc)" > "$BUILD/build.log" || { tail -30 "$BUILD/build.log"; exit 1; }
ctest --test-dir "$BUILD" --output-on-failure

echo "== pytest"
cd "$ROOT/tests"  # tests import the installed package, not the source tree
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$ROOT/tests" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
