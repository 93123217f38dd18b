#!/usr/bin/env bash
# Builds the standalone flash-forward test and benchmark (all six instantiations, in parallel)
# and runs them. Needs nvcc (sm_90a) and CUTLASS headers: CUTLASS_INC or the nvidia-cutlass
# package. Logs go to $OUT (or build/flash_fwd) when set.
# Usage: bench/cpp/run_flash_fwd.sh [test|bench|all] (default all)
set -uo pipefail
cd "$(dirname "$0")/../.."
WHAT=${1:-all}
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
CUTLASS_INC=${CUTLASS_INC:-$(python3 -c 'import cutlass_library,os;print(os.path.join(os.path.dirname(cutlass_library.__file__),"source","include"))')}
BUILD=build/flash_fwd
LOG=${OUT:-$BUILD}
mkdir -p $BUILD $LOG
FLAGS="-O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -I csrc -I csrc/include -I $CUTLASS_INC"
HDIMS=${FLASH_HDIMS:-"64 128 256"}
OBJS=()
pids=()
for d in $HDIMS; do for t in bf16 fp16; do
  f=flash_fwd_hdim${d}_${t}_sm90
  OBJS+=($BUILD/$f.o)
  $NVCC $FLAGS -Xptxas -v -c csrc/ops/$f.cu -o $BUILD/$f.o > $LOG/build_$f.log 2>&1 &
  pids+=($!)
done; done
$NVCC $FLAGS -c csrc/common/build_registry.cpp -x cu -o $BUILD/build_registry.o > $LOG/build_reg.log 2>&1 &
pids+=($!)
$NVCC $FLAGS -c tests/cpp/flash_fwd_test.cu -o $BUILD/flash_fwd_test.o > $LOG/build_test.log 2>&1 &
pids+=($!)
$NVCC $FLAGS -c bench/cpp/flash_fwd_bench.cu -o $BUILD/flash_fwd_bench.o > $LOG/build_bench.log 2>&1 &
pids+=($!)
fail=0
for p in "${pids[@]}"; do wait $p || fail=1; done
grep -h -E "error|spill|registers" $LOG/build_*.log | sort | uniq -c
if [ $fail = 1 ]; then echo "BUILD FAILED"; cat $LOG/build_*.log | grep -B2 -A5 error | head -60; exit 1; fi
$NVCC -gencode=arch=compute_90a,code=sm_90a $BUILD/flash_fwd_test.o "${OBJS[@]}" $BUILD/build_registry.o -o $BUILD/flash_fwd_test || exit 1
$NVCC -gencode=arch=compute_90a,code=sm_90a $BUILD/flash_fwd_bench.o "${OBJS[@]}" $BUILD/build_registry.o -o $BUILD/flash_fwd_bench || exit 1
rc=0
if [ $WHAT = test ] || [ $WHAT = all ]; then
  $BUILD/flash_fwd_test 2>&1 | tee $LOG/test.log; rc=${PIPESTATUS[0]}
fi
if [ $WHAT = bench ] || [ $WHAT = all ]; then
  $BUILD/flash_fwd_bench 2>&1 | tee $LOG/bench.log
fi
exit $rc
