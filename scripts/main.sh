#!/usr/bin/env bash
# The main job (README): set up the environment, then show what longctx does on this machine:
# the build and GPU (`longctx info`), a capacity plan for a long-context model (`longctx plan`)
# and the kernel benchmarks (`longctx bench`; without a GPU, a correctness smoke test of the CPU
# kernels at small sizes). Without a visible GPU the build is CPU-only (scripts/setup.sh says how
# to build the CUDA kernels anyway).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
export VENV
start=$SECONDS
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"  # longctx bench writes bench/results/<gpu>/ here
echo
echo "== longctx info"
"$VENV/bin/longctx" info
echo
echo "== longctx plan --model llama-3.1-70b --context 128k --kv-dtype bf16 --gpus 4"
"$VENV/bin/longctx" plan --model llama-3.1-70b --context 128k --kv-dtype bf16 --gpus 4
echo
echo "== longctx bench --quick"
"$VENV/bin/longctx" bench --quick
echo
echo "main job done in $((SECONDS - start)) s"
