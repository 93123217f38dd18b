#!/usr/bin/env bash
# Session 10's device call (development): restricted build; with AB=1 the paired A/B of the int8
# scale layouts (default head-major vs slot-major, scripts/dev/decode_ab.py --slot-scales); with
# BENCH=1 the full bench/kvcache.py run; then the GPU tests whose node ids are listed in $IDS.
set -uo pipefail
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/python CC=/usr/bin/gcc CXX=/usr/bin/g++ PYTHONUNBUFFERED=1
export LONGCTX_KERNELS=kvcache,flash_fwd,rope LONGCTX_HEADDIMS=64,128,256 LONGCTX_DTYPES=bf16,fp16 LONGCTX_DISABLE_NCCL=1 MAX_JOBS=16
t=$(date +%s); python3 setup.py build_ext --inplace > /tmp/build.log 2>&1 || { grep -B2 -A6 error /tmp/build.log | head -60; exit 1; }; echo "build $(( $(date +%s) - t )) s"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
if [ "${AB:-0}" = 1 ]; then
  python3 scripts/dev/decode_ab.py --slot-scales --formats int8 --ctx 32768,131072 --batch 1 --rounds 10 2>&1 | tee $OUT/ab_b1.txt
  python3 scripts/dev/decode_ab.py --slot-scales --formats int8 --ctx 32768,131072 --batch 16 --rounds 4 2>&1 | tee $OUT/ab_b16.txt
fi
if [ "${BENCH:-0}" = 1 ]; then t=$(date +%s); python3 bench/kvcache.py --out $OUT/results > $OUT/bench.txt 2>&1; echo "bench rc $? $(( $(date +%s) - t )) s"; fi
if [ -n "${IDS:-}" ]; then
  t=$(date +%s); timeout ${PT_LIMIT:-330} python3 -m pytest -q -p no:cacheprovider $(cat ${IDS}) > $OUT/pytest_${IDS%.txt}.txt 2>&1; echo "pytest rc $? $(( $(date +%s) - t )) s"; tail -3 $OUT/pytest_${IDS%.txt}.txt
fi
