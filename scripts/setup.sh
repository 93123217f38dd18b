#!/usr/bin/env bash
# Sets up a fresh machine for longctx: a virtual environment with torch and the build tools, then
# builds and installs longctx into it. Idempotent; prints the path of the environment.
#   VENV=.venv bash scripts/setup.sh
# Torch: the CUDA 13.0 build (torch==2.14.1) so that the CUDA kernels are compiled whenever nvcc is
# present (set CUDA_HOME; /usr/local/cuda is used when it exists). LONGCTX_* build switches
# (see setup.py) pass through.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC" "nvidia-cutlass==4.2.0.0" numpy pytest ninja \
  setuptools wheel
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ -n "${CUDA_HOME:-}" ]; then export PATH=$CUDA_HOME/bin:$PATH; fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
"$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps "$ROOT"
"$VENV/bin/python" -c "import longctx, json; print(json.dumps(longctx.build_info(), indent=1))"
echo "longctx installed in $VENV"
