#!/usr/bin/env bash
# Builds the standalone flash-backward test and benchmark (instantiations in parallel, one
# object per tests/cpp/flash_bwd_inst.cu configuration) and runs them; `peers` times torch SDPA's
# flash and cuDNN backward at the benchmark's shapes. Needs nvcc (sm_90a) and CUTLASS headers
# (CUTLASS_INC or the nvidia-cutlass package). Logs go to $OUT (or build/flash_bwd).
# Usage: bench/cpp/run_flash_bwd.sh [build|test|bench|all|peers|sass] (default all)
set -uo pipefail
cd "$(dirname "$0")/../.."
WHAT=${1:-all}
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
BUILD=build/flash_bwd
LOG=${OUT:-$BUILD}
mkdir -p $BUILD $LOG
if [ "$WHAT" = peers ]; then
  PYTHONUNBUFFERED=1 python3 - <<'PY' 2>&1 | tee $LOG/peers.log
import torch
from torch.nn.attention import sdpa_kernel, SDPBackend
F = torch.nn.functional
def bench(fn, reps=10):
    for _ in range(2): fn()
    torch.cuda.synchronize(); ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    return sorted(ts)[reps // 2]
print("peers bwd: seqlen causal | cudnn ms TF | flash ms TF")
d = 128
for s, causal in [(16384, False), (16384, True), (1024, False), (1024, True)]:
    b, h = 32768 // s, 2048 // d
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    fl = 2.5 * 4 * b * h * (s * (s + 1) / 2 if causal else s * s) * d
    row = [f"{s} {int(causal)}"]
    for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        try:
            with sdpa_kernel(be):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                g = torch.randn_like(o)
                t = bench(lambda: torch.autograd.grad(o, (q, k, v), g, retain_graph=True))
            row.append(f"{t:.3f} {fl / t / 1e9:.0f}")
        except Exception as e:
            row.append(f"n/a ({type(e).__name__})")
    print(" | ".join(row))
PY
  exit 0
fi
CUTLASS_INC=${CUTLASS_INC:-$(python3 -c 'import cutlass_library,os;print(os.path.join(os.path.dirname(cutlass_library.__file__),"source","include"))')}
FLAGS="-O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -DLONGCTX_BWD_AB_VARIANTS -I csrc -I csrc/include -I $CUTLASS_INC"
# name:defines
CONFIGS=${FLASH_BWD_CONFIGS:-"h128bf:-DLCX_HD=128_-DLCX_BF16=1 h128fp:-DLCX_HD=128_-DLCX_BF16=0 h64bf:-DLCX_HD=64_-DLCX_BF16=1 h64fp:-DLCX_HD=64_-DLCX_BF16=0 h256bf:-DLCX_HD=256_-DLCX_BF16=1 h256fp:-DLCX_HD=256_-DLCX_BF16=0 h128v1:-DLCX_HD=128_-DLCX_BF16=1_-DV1=1"}
OBJS=()
if [ "$WHAT" != run ]; then
  pids=()
  for cfg in $CONFIGS; do
    nm=${cfg%%:*}; defs=${cfg#*:}; defs=${defs//_-/ -}
    $NVCC $FLAGS -Xptxas -v $defs -c tests/cpp/flash_bwd_inst.cu -o $BUILD/inst_$nm.o > $LOG/build_$nm.log 2>&1 &
    pids+=($!)
  done
  $NVCC $FLAGS -c tests/cpp/flash_bwd_test.cu -o $BUILD/test.o > $LOG/build_test.log 2>&1 & pids+=($!)
  $NVCC $FLAGS -c bench/cpp/flash_bwd_bench.cu -o $BUILD/bench.o > $LOG/build_bench.log 2>&1 & pids+=($!)
  fail=0; for p in "${pids[@]}"; do wait $p || fail=1; done
  for cfg in $CONFIGS; do nm=${cfg%%:*}; echo "$nm: $(grep -A2 'flash_bwd_kernel\|flash_bwd_sm90_kernel' $LOG/build_$nm.log | grep -oE 'Used [0-9]+ registers|[0-9]+ bytes spill stores' | tr '\n' ' ')"; done
  if [ $fail = 1 ]; then echo "BUILD FAILED"; grep -h -B2 -A5 error $LOG/build_*.log | head -60; fi
fi
for cfg in $CONFIGS; do nm=${cfg%%:*}; [ -f $BUILD/inst_$nm.o ] && OBJS+=($BUILD/inst_$nm.o); done
$NVCC -gencode=arch=compute_90a,code=sm_90a $BUILD/test.o "${OBJS[@]}" -o $BUILD/flash_bwd_test || exit 1
$NVCC -gencode=arch=compute_90a,code=sm_90a $BUILD/bench.o "${OBJS[@]}" -o $BUILD/flash_bwd_bench || exit 1
[ "$WHAT" = build ] && exit 0
if [ "$WHAT" = sass ]; then cuobjdump --dump-sass $BUILD/inst_h128bf.o | grep -oE "HGMMA[.A-Z0-9]*|UBLKRED[.A-Z0-9]*|UTMALDG[.A-Z0-9]*|HMMA[.A-Z0-9]*|LDSM[.A-Z0-9]*|RED[.A-Z0-9]*|LDL|STL" | sort | uniq -c; exit 0; fi
rc=0
if [ $WHAT = test ] || [ $WHAT = all ]; then $BUILD/flash_bwd_test 2>&1 | tee $LOG/test.log; rc=${PIPESTATUS[0]}; fi
if [ $WHAT = bench ] || [ $WHAT = all ]; then $BUILD/flash_bwd_bench 2>&1 | tee $LOG/bench.log; fi
exit $rc
