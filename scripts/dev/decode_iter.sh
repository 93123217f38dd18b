#!/usr/bin/env bash
# One device call for a decode-kernel iteration (development): restricted build, the decode GPU
# tests (PYTEST_K, default "decode and not prefill"; PYTEST_K=skip skips them), the probe at
# batch 1 (PROFILE_ARGS) and, with STAMPS=1, a second build with LONGCTX_DECODE_STAMPS and the
# per-warp timelines (scripts/dev/decode_stamps.py) at STAMP_CTX. Output under $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/python CC=/usr/bin/gcc CXX=/usr/bin/g++ PYTHONUNBUFFERED=1
export LONGCTX_KERNELS=${LONGCTX_KERNELS:-kvcache,flash_fwd,rope} LONGCTX_HEADDIMS=${LONGCTX_HEADDIMS:-128}
export LONGCTX_DTYPES=${LONGCTX_DTYPES:-bf16} LONGCTX_DISABLE_NCCL=1 MAX_JOBS=16
build() {
  local t=$(date +%s)
  python3 setup.py build_ext --inplace > /tmp/build.log 2>&1 || { grep -B2 -A6 error /tmp/build.log | head -60; exit 1; }
  echo "build $(( $(date +%s) - t )) s"
}
build
if [ "${PYTEST_K:-}" != skip ]; then
  python3 -m pytest tests/test_kvcache_gpu.py -q -x -p no:cacheprovider -k "${PYTEST_K:-decode and not prefill}" > $OUT/pytest.txt 2>&1
  echo "pytest rc $?"; tail -3 $OUT/pytest.txt
fi
python3 scripts/decode_profile.py ${PROFILE_ARGS:---formats fp8,int8 --ctx 1024,32768,131072} 2>&1 | tee $OUT/profile.txt | grep -v "^\s*$" | head -80
for c in ${NCU_CTX:-}; do  # warp stall reasons of the decode kernel (Nsight Compute)
  echo "== ncu $c"
  ncu --clock-control none --cache-control none -k regex:decode_staged --launch-skip 5 \
    --launch-count 1 --section SpeedOfLight --section WarpStateStats \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
    python3 scripts/dev/ncu_decode_drive.py $c > $OUT/ncu_$c.txt 2>&1
  grep -E "Duration|Throughput|Warp Cycles|stalled" $OUT/ncu_$c.txt | awk '$NF+0 > 0.05 || !/stalled/' | head -40
done
if [ "${STAMPS:-0}" = 1 ]; then
  sed -i '1i #define LONGCTX_DECODE_STAMPS' csrc/include/longctx/kvcache/kvcache_decode_staged.cuh
  build
  for c in ${STAMP_CTX:-1024 32768}; do for f in fp8 int8; do
    python3 scripts/dev/decode_stamps.py run $c $f > $OUT/st_${c}_$f.txt 2>&1
    echo "== stamps $c $f"; python3 scripts/dev/decode_stamps.py parse $OUT/st_${c}_$f.txt | head -24
  done; done
  sed -i '1d' csrc/include/longctx/kvcache/kvcache_decode_staged.cuh
fi
