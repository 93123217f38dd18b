#!/usr/bin/env bash
# Builds the standalone flash-forward test and benchmark (all six instantiations, in parallel)
# and runs them. Needs nvcc (sm_90a) and CUTLASS headers: CUTLASS_INC or the nvidia-cutlass
# package. Logs go to $OUT (or build/flash_fwd) when set.
# Usage: bench/cpp/run_flash_fwd.sh [test|bench|all|build|run|torch] (default all)
#   build: compile + link only; run: run the already built test and bench; test/bench/all: build
#   then run that part; sanitize: run the built test's small cases under compute-sanitizer
#   (memcheck, then synccheck).
#   torch: build the extension in place (setup.py), run tests/test_attention_gpu.py and time
#          torch.ops.longctx.flash_attn_fwd against torch SDPA (cuDNN, flash) in one process.
set -uo pipefail
cd "$(dirname "$0")/../.."
WHAT=${1:-all}
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
CUTLASS_INC=${CUTLASS_INC:-$(python3 -c 'import cutlass_library,os;print(os.path.join(os.path.dirname(cutlass_library.__file__),"source","include"))')}
BUILD=build/flash_fwd
if [ "$WHAT" = torch ]; then
  LOG=${OUT:-build}; mkdir -p $LOG
  export PYTHONUNBUFFERED=1
  export PYTHONPATH=$(python3 -c 'import cutlass_library,os;print(os.path.dirname(os.path.dirname(cutlass_library.__file__)))'):${PYTHONPATH:-}
  # The GPU machines' default CXX links libstdc++ statically (exceptions crossing into torch
  # crash); build with the system compiler as scripts/gpu_check.sh does.
  if [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
  start=$(date +%s)
  MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace > $LOG/torch_build.log 2>&1 \
    || { grep -E "error" $LOG/torch_build.log | head -30; exit 1; }
  echo "extension build: $(( $(date +%s) - start )) s"
  export PYTHONPATH=$PWD/python:$PYTHONPATH
  python3 -X faulthandler -m pytest tests/test_attention_gpu.py -v -p no:cacheprovider > $LOG/pytest.txt 2>&1
  echo "pytest exit code $?"
  grep -E -A14 "Fatal Python error" $LOG/pytest.txt | head -16
  grep -E "PASSED|FAILED|ERROR|SKIPPED" $LOG/pytest.txt | awk '{print $NF}' | sort | uniq -c
  grep -E "FAILED|ERROR|Error|assert" $LOG/pytest.txt | head -20
  tail -3 $LOG/pytest.txt
  python3 - <<'PY' 2>&1 | tee $LOG/peers.log
import torch, longctx
from torch.nn.attention import sdpa_kernel, SDPBackend
F = torch.nn.functional
def bench(fn, reps=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    return sorted(ts)[reps // 2]
print("hdim seqlen causal | ours ms TF | cudnn ms TF | flash ms TF")
for d, s, causal in [(128, 16384, False), (128, 16384, True), (128, 1024, True), (64, 16384, True), (256, 16384, True)]:
    b, h = 32768 // s, 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    fl = 4 * b * h * (s * (s + 1) / 2 if causal else s * s) * d
    row = [f"{d} {s} {int(causal)}"]
    t = bench(lambda: torch.ops.longctx.flash_attn_fwd(q, k, v, None, None, 0, 0, d ** -0.5, causal, -1, -1))
    row.append(f"{t:.3f} {fl / t / 1e9:.0f}")
    for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        try:
            with sdpa_kernel(be):
                t = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
            row.append(f"{t:.3f} {fl / t / 1e9:.0f}")
        except Exception as e:
            row.append("n/a")
    print(" | ".join(row))
PY
  exit 0
fi
LOG=${OUT:-$BUILD}
mkdir -p $BUILD $LOG
FLAGS="-O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -I csrc -I csrc/include -I $CUTLASS_INC"
HDIMS=${FLASH_HDIMS:-"64 128 256"}
OBJS=()
for d in $HDIMS; do for t in bf16 fp16; do OBJS+=($BUILD/flash_fwd_hdim${d}_${t}_sm90.o); done; done
if [ "$WHAT" != run ]; then
pids=()
for d in $HDIMS; do for t in bf16 fp16; do
  f=flash_fwd_hdim${d}_${t}_sm90
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
fi
[ "$WHAT" = build ] && exit 0
if [ "$WHAT" = sanitize ]; then
  CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  [ -z "$CS" ] && { echo "compute-sanitizer not found"; exit 1; }
  rc=0
  for tool in memcheck synccheck; do
    $CS --tool $tool --error-exitcode 3 $BUILD/flash_fwd_test 7 quick > $LOG/sanitize_$tool.log 2>&1
    r=$?; echo "compute-sanitizer $tool: exit $r"; [ $r = 0 ] || rc=$r
    grep -E "ERROR SUMMARY|cases failed" $LOG/sanitize_$tool.log; grep -m5 -E "Invalid|Race|Error" $LOG/sanitize_$tool.log
  done
  exit $rc
fi
rc=0
if [ $WHAT = test ] || [ $WHAT = all ] || [ $WHAT = run ]; then
  $BUILD/flash_fwd_test 2>&1 | tee $LOG/test.log; rc=${PIPESTATUS[0]}
fi
if [ $WHAT = bench ] || [ $WHAT = all ] || [ $WHAT = run ]; then
  $BUILD/flash_fwd_bench 2>&1 | tee $LOG/bench.log
fi
exit $rc
