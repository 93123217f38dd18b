#!/usr/bin/env bash
# One device call: build the extension, run the standalone CUDA tests (ctest), the GPU test
# suite and the named benchmarks. Logs go to $OUT/log.txt, results to $OUT/results/<gpu>/.
#   scripts/gpu_check.sh [-k PYTEST_EXPR] [bench ...]        e.g. scripts/gpu_check.sh rope
# A bench argument may carry options: 'attn_bwd --only "d=128 s=16384"' (word-split by eval).
# Build switches (LONGCTX_KERNELS, LONGCTX_HEADDIMS, ...) pass through from the environment;
# PYTEST_TARGETS (default: tests) narrows the GPU test run, LONGCTX_SKIP_CTEST=1 skips the
# standalone CMake tests (built with the same build switches; they take ~2 min on 16 cores).
set -uo pipefail
export PYTHONUNBUFFERED=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/longctx_out}
mkdir -p "$OUT"
LOG=$OUT/log.txt
exec > >(tee -a "$LOG") 2>&1
KEXPR=()
if [ "${1:-}" = "-k" ]; then KEXPR=(-k "$2"); shift 2; fi

if ls .whl/*.whl > /dev/null 2>&1; then  # carried wheels (nvidia-cutlass)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"

# The GPU machines export CXX=/opt/gcc/bin/g++, a toolchain that links libstdc++ statically into
# shared objects; a private libstdc++ inside the extension crashes on its first iostream use
# against torch's shared one (seen 2026-11-23). Build with the system compiler.
if [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
JOBS=${MAX_JOBS:-$(nproc)}
echo "== build (setup.py, MAX_JOBS=$JOBS, CXX=${CXX:-default})"
start=$(date +%s)
if ! MAX_JOBS=$JOBS python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  grep -E "error" "$OUT/build.log" | head -40; tail -20 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
grep -E "warning" "$OUT/build.log" | grep -v "cpp_extension" | head -10
rm -f "$OUT/build.log"
export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}

if [ "${LONGCTX_SKIP_CTEST:-0}" != 1 ]; then
  echo "== standalone tests (CMake + ctest: rope, flash forward and backward)"
  start=$(date +%s)
  if cmake -S . -B /tmp/longctx_cmake -DLONGCTX_WITH_TORCH=OFF > "$OUT/cmake.log" 2>&1 \
      && cmake --build /tmp/longctx_cmake -j "$JOBS" >> "$OUT/cmake.log" 2>&1; then
    echo "cmake build: $(( $(date +%s) - start )) s"
    ctest --test-dir /tmp/longctx_cmake --output-on-failure > "$OUT/ctest.txt" 2>&1
    echo "ctest exit code $?"
    grep -E "tests passed|tests failed|Failed|\*\*\*|Skipped" "$OUT/ctest.txt" | tail -15
    [ -x /tmp/longctx_cmake/rope_bench ] && /tmp/longctx_cmake/rope_bench
  else
    echo "cmake build failed"; grep -E "error" "$OUT/cmake.log" | head -30
  fi
fi

echo "== smoke"
python3 -X faulthandler scripts/diag_import.py 2>&1 | head -40
echo "== pytest"
read -r -a TARGETS <<< "${PYTEST_TARGETS:-tests}"
python3 -X faulthandler -m pytest "${TARGETS[@]}" -q -p no:cacheprovider -p no:logging "${KEXPR[@]}" \
  > "$OUT/pytest.txt" 2>&1
echo "pytest exit code $?"
grep -E -A30 "Fatal Python error" "$OUT/pytest.txt" | grep -v "site-packages/(_pytest|pluggy)" | head -40
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.txt" | tail -30

for b in "$@"; do
  read -r name rest <<< "$b"
  echo "== bench/$name.py $rest"
  eval "python3 -X faulthandler bench/$name.py $rest --out \"$OUT/results\""
done
