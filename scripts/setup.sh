#!/usr/bin/env bash
# Sets up a fresh machine for longctx: a virtual environment with torch and the build tools, then
# builds and installs longctx into it. Idempotent; ends with one line on what was built.
#   VENV=.venv bash scripts/setup.sh
# Torch: the CUDA 13.0 build (torch==2.14.1, ~5.5 GB installed) so that the CUDA kernels are
# compiled whenever nvcc is present (set CUDA_HOME; /usr/local/cuda is used when it exists).
# Without a visible GPU (nvidia-smi -L lists none) the build is CPU-only unless
# LONGCTX_CPU_ONLY=0 or LONGCTX_REQUIRE_CUDA=1 (CI) asks for the CUDA kernels. LONGCTX_* build
# switches (see setup.py) pass through. Each step's full output is in $VENV/logs/.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
source "$ROOT/scripts/common.sh"
default_to_cpu_only

if [ ! -x "$VENV/bin/python" ]; then
  echo "== virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
LOGS=$VENV/logs
mkdir -p "$LOGS"
PIP=("$VENV/bin/python" -m pip)
# Byte-compiling the ~7,800 files of torch and its dependencies at install costs about a minute;
# Python compiles what it imports on first use instead.
run_step "pip" "$LOGS/pip.log" "^Successfully" "s/^/   /" \
  "${PIP[@]}" install --upgrade pip
# transformers: the optional [hf] extra, pinned, for tests/integrations (CI runs them).
run_step "torch, the build tools and the test dependencies ($TORCH_SPEC, ~5.5 GB; about 1 min from a local copy)" \
  "$LOGS/deps.log" "^(Downloading|Installing collected packages)" "s/^(.{0,96}).*/   \1/" \
  "${PIP[@]}" install --no-compile "$TORCH_SPEC" "nvidia-cutlass==4.2.0.0" numpy pytest ninja \
  setuptools wheel "transformers==5.18.0"

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ -n "${CUDA_HOME:-}" ]; then export PATH=$CUDA_HOME/bin:$PATH; fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1
# pip -v passes the build's output through: setup.py's "longctx build:" line, then ninja's
# "[i/n] <compiler> ... -c <source>" line as each file is compiled.
run_step "build and install longctx (MAX_JOBS=$MAX_JOBS)" "$LOGS/build.log" \
  "^ *(longctx build:|\[[0-9]+/[0-9]+\] )" \
  "s#^ *(\[[0-9]+/[0-9]+\]) .* -c ([^ ]+) .*#   \1 \2#; s#^ *(longctx build:)#   \1#; s#$ROOT/##" \
  "${PIP[@]}" install -v --no-build-isolation --no-deps "$ROOT"
"$VENV/bin/longctx" info --short
echo "longctx installed in $VENV (longctx info: the build and GPUs in full)"
