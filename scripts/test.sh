#!/usr/bin/env bash
# The test command (README): set up the environment (scripts/setup.sh), then run the C++
# standalone tests (CMake + ctest) and the pytest suite. GPU tests skip without a GPU.
# Fails on any error, including pytest finding no tests (exit code 5).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
export VENV
bash "$ROOT/scripts/setup.sh"

echo "== C++ standalone tests (CMake + ctest)"
BUILD=$(mktemp -d)
cmake -S "$ROOT" -B "$BUILD" -DLONGCTX_WITH_TORCH=OFF > "$BUILD/configure.log"
cmake --build "$BUILD" -j "$(nproc)" > "$BUILD/build.log"
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
