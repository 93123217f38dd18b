#!/usr/bin/env bash
# compute-sanitizer over small calls that reach every CUDA kernel path of the default dispatch
# (tests/support/sanitize_cases.py), after the extension is built in place (scripts/gpu_check.sh
# builds it; so does `python setup.py build_ext --inplace`).
#   scripts/gpu_sanitize.sh [TOOL,...] [--only SUBSTR,...]
# TOOLs: memcheck, racecheck, synccheck, initcheck (default: memcheck,racecheck,synccheck).
# torch's caching allocator is off, so every tensor is its own allocation and memcheck sees an
# access past a tensor's end. Reports go to $OUT/sanitize_<tool>.txt (OUT defaults to
# /tmp/longctx_out). Exit status: 0 when every tool reported no error and every case passed.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/longctx_out}
mkdir -p "$OUT"
TOOLS=memcheck,racecheck,synccheck
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then TOOLS=$1; shift; fi
SAN=${COMPUTE_SANITIZER:-compute-sanitizer}
command -v "$SAN" > /dev/null 2>&1 || SAN=${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer
if ! [ -x "$(command -v "$SAN")" ]; then
  echo "gpu_sanitize: compute-sanitizer not found" >&2; exit 2
fi
export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
status=0
IFS=',' read -r -a TL <<< "$TOOLS"
for tool in "${TL[@]}"; do
  case $tool in memcheck|racecheck|synccheck|initcheck) ;;
    *) echo "gpu_sanitize: unknown tool '$tool' (memcheck, racecheck, synccheck, initcheck)" >&2
       exit 2 ;;
  esac
  log=$OUT/sanitize_$tool.txt
  start=$(date +%s)
  "$SAN" --tool "$tool" --error-exitcode 99 --print-limit 20 \
    python3 tests/support/sanitize_cases.py "$@" > "$log" 2>&1
  rc=$?
  echo "$tool: exit code $rc in $(( $(date +%s) - start )) s; $(grep -E '^=+ ERROR SUMMARY' "$log" \
    | tail -1 | sed 's/^=* //')"
  grep -E "cases passed|^FAILED" "$log"
  [ $rc -ne 0 ] && { status=1; grep -E "^=+ +(Invalid|Race|Barrier|Uninitialized|Error)" "$log" \
    | sort | uniq -c | head -10; }
done
exit $status
