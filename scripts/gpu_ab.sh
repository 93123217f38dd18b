#!/usr/bin/env bash
# One device call: a before/after A/B of the named benchmarks. Builds a base tree ("before") and
# this working tree ("after"), each in its own folder, runs N alternating rounds (before_1,
# after_1, before_2, ...) of the benchmarks, each bench importing its own tree's build, then
# compares each case's ratio to its same-run peer (python -m longctx.bench.ab, criterion in its
# docstring and docs/design.md).
#   scripts/gpu_ab.sh [-n ROUNDS] BASE bench ...
#   e.g. scripts/gpu_ab.sh 58b9117 rope 'attn_fwd --no-flex' attn_bwd 'kvcache --groups decode'
# BASE: a git ref of this repository (extracted with git archive into /tmp/longctx_ab/base; needs
# .git on the device) or the path to a base tree, built in place (for the device tool: a
# `git worktree add .ab_base REF` in a folder .git/info/exclude ignores, carried with the call). A bench argument may carry options (word-split by eval);
# each runs as `python3 bench/<name>.py <opts> --out <dir>` from within its tree, so the base's own
# bench CLI applies. ROUNDS defaults to 3. Results: $OUT/ab/{before,after}_<i>/<gpu>/<name>.json,
# the report $OUT/ab/report.md (+ report.json), logs $OUT/log.txt. Build switches (LONGCTX_KERNELS,
# LONGCTX_HEADDIMS, ...) and MAX_JOBS pass through to both builds; AB_ARGS adds options to the
# comparison (e.g. AB_ARGS='--one-sided --peer rope=eager'). Exit status: the comparison's (0 all
# pass, 1 some fail, 2 bad input), 3 when a build fails, 64 on bad usage.
set -uo pipefail
export PYTHONUNBUFFERED=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/longctx_out}
AB=$OUT/ab
mkdir -p "$AB"
exec > >(tee -a "$OUT/log.txt") 2>&1
usage() { sed -n '7,8p' "$0" | sed 's/^# *//'; exit 64; }
ROUNDS=3
if [ "${1:-}" = "-n" ]; then ROUNDS=${2:-}; shift 2 || usage; fi
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_ab.sh: -n: not a positive count: $ROUNDS"; usage; }
[ $# -ge 2 ] || usage
BASE=$1; shift

if ls .whl/*.whl > /dev/null 2>&1; then  # carried wheels (nvidia-cutlass)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
SITE_PATH=${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu \
  --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"

if [ -d "$BASE" ]; then
  BASE_DIR=$(cd "$BASE" && pwd)
  echo "== base: the tree at $BASE_DIR"
elif git rev-parse --verify --quiet "$BASE^{commit}" > /dev/null; then
  BASE_DIR=/tmp/longctx_ab/base
  rm -rf "$BASE_DIR" && mkdir -p "$BASE_DIR"
  git archive --format=tar "$BASE" | tar -x -C "$BASE_DIR" || exit 3
  echo "== base: $(git log -1 --format='%h %s' "$BASE" | cut -c1-90)"
else
  echo "gpu_ab.sh: BASE $BASE is neither a folder nor a git ref of $ROOT"; exit 64
fi
echo "== after: the working tree $ROOT at $(git log -1 --format=%h HEAD)" \
     "($(git status --porcelain | wc -l) changed paths)"

# System compiler: see gpu_check.sh (a static libstdc++ inside the extension crashes).
if [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
JOBS=${MAX_JOBS:-$(nproc)}
build() {  # build SIDE TREE
  local log=$AB/build_$1.log start
  start=$(date +%s)
  echo "== build $1 ($2, MAX_JOBS=$JOBS)"
  if ! (cd "$2" && MAX_JOBS=$JOBS python3 setup.py build_ext --inplace) > "$log" 2>&1; then
    grep -E "error" "$log" | head -40; tail -20 "$log"; exit 3
  fi
  echo "build $1: $(( $(date +%s) - start )) s"; rm -f "$log"
  (cd "$2" && PYTHONPATH=$2/python${SITE_PATH:+:$SITE_PATH} python3 -c \
    "import longctx; print('  ', longctx.__file__, longctx.build_info().get('switches'))")
}
build before "$BASE_DIR"
build after "$ROOT"

SUITES=()
for b in "$@"; do read -r name _ <<< "$b"; SUITES+=("$name"); done
for i in $(seq 1 "$ROUNDS"); do
  for side in before after; do
    if [ "$side" = before ]; then tree=$BASE_DIR; else tree=$ROOT; fi
    dir=$AB/${side}_$i
    mkdir -p "$dir"
    for b in "$@"; do
      read -r name rest <<< "$b"
      echo "== round $i $side: bench/$name.py $rest"
      start=$(date +%s)
      (cd "$tree" && export PYTHONPATH=$tree/python${SITE_PATH:+:$SITE_PATH} &&
        eval "python3 -X faulthandler bench/$name.py $rest --out \"$dir\"") > "$dir/$name.log" 2>&1
      rc=$?
      echo "   exit code $rc, $(( $(date +%s) - start )) s"
      [ "$rc" = 0 ] || tail -15 "$dir/$name.log"
    done
  done
done

echo "== compare (python -m longctx.bench.ab)"
args=()
for i in $(seq 1 "$ROUNDS"); do args+=("$AB/before_$i"); done
args+=(--after)
for i in $(seq 1 "$ROUNDS"); do args+=("$AB/after_$i"); done
# shellcheck disable=SC2086  # AB_ARGS is a list of options
PYTHONPATH=$ROOT/python${SITE_PATH:+:$SITE_PATH} python3 -m longctx.bench.ab --before "${args[@]}" \
  --suites "$(IFS=,; echo "${SUITES[*]}")" --out "$AB/report.md" --json "$AB/report.json" \
  ${AB_ARGS:-} > /dev/null
rc=$?
tail -1 "$AB/report.md" 2> /dev/null
echo "A/B exit code $rc (report: $AB/report.md)"
exit "$rc"
