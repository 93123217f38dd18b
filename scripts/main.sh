#!/usr/bin/env bash
# The main job (README): set up the environment, then show what longctx does on this machine:
# the build and GPU (`longctx info`), a capacity plan for a long-context model (`longctx plan`)
# and the kernel benchmarks (`longctx bench`; CPU kernels at small sizes when there is no GPU).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
export VENV
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"  # longctx bench writes bench/results/<gpu>/ here
"$VENV/bin/longctx" info
"$VENV/bin/longctx" plan --model llama-3.1-70b --context 128k --kv-dtype bf16 --gpus 4
"$VENV/bin/longctx" bench --quick
