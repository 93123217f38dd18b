#!/usr/bin/env bash
# One device call on a 2+ GPU machine (nvidia-h200-x2): build the kernels ring attention needs,
# run the multi-GPU ring tests and bench/ring.py under torchrun. Logs to $OUT/log.txt, results
# to $OUT/results/<gpu>/ring.{json,md} (+ ring_trace.json.gz with --trace).
#   scripts/gpu_ring.sh [bench/ring.py arguments...]      e.g. scripts/gpu_ring.sh --quick --trace 32768
# LONGCTX_RING_TESTS=0 skips the pytest part; LONGCTX_RING_SKIP_BUILD=1 reuses an in-place build
# (after scripts/gpu_check.sh in the same call). NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/longctx_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=index,name,driver_version,clocks.sm,temperature.gpu --format=csv
nvidia-smi topo -m | head -5
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda, 'nccl', torch.cuda.nccl.version())"
if [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi  # see gpu_check.sh
export LONGCTX_KERNELS=${LONGCTX_KERNELS:-flash_fwd,flash_bwd} LONGCTX_HEADDIMS=${LONGCTX_HEADDIMS:-128} \
       LONGCTX_DTYPES=${LONGCTX_DTYPES:-bf16}
if [ "${LONGCTX_RING_SKIP_BUILD:-0}" = 1 ]; then
  echo "build: skipped (LONGCTX_RING_SKIP_BUILD=1: using the in-place build already there)"
else
  start=$(date +%s)
  if ! MAX_JOBS=32 LONGCTX_REQUIRE_CUDA=1 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    grep -E "error" "$OUT/build.log" | head -40; tail -20 "$OUT/build.log"; exit 1
  fi
  echo "build: $(( $(date +%s) - start )) s"; rm -f "$OUT/build.log"
fi
export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import longctx; b = longctx.build_info(); print('with_nccl', b['with_nccl'], b['switches'])"
if [ "${LONGCTX_RING_TESTS:-1}" != 0 ]; then
  echo "== pytest (ring on GPUs)"
  timeout 300 python3 -X faulthandler -m pytest tests/ring/test_ring_gpu.py -q -p no:cacheprovider \
    > "$OUT/pytest_ring.txt" 2>&1
  echo "pytest exit code $?"
  grep -E "^(FAILED|ERROR)|passed|failed|Error" "$OUT/pytest_ring.txt" | tail -30
fi
NGPU=$(nvidia-smi -L | wc -l)
echo "== bench/ring.py on $NGPU GPUs: $*"
torchrun --standalone --nproc-per-node "$NGPU" bench/ring.py --out "$OUT/results" "$@"
