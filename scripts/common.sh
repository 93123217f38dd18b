# Sourced by scripts/setup.sh (and the tests of tests/cli/test_scripts.py), not run.
#
# run_step: progress for the long steps. A step's full output goes to a log file; the terminal
# gets the step's name, the log lines that say how far it is, a line every HEARTBEAT_S seconds
# while it runs, and its time, or the log's last lines if it fails.
# default_to_cpu_only: the build's default where no GPU is visible.

HEARTBEAT_S=${HEARTBEAT_S:-20}
_SEEN=0  # lines of the current step's log already looked at

# Prints the new complete lines of log $1 that match the extended regex $2, rewritten by the sed
# script $3.
_progress_lines() {
  local log=$1 show=$2 format=$3 upto
  upto=$(wc -l < "$log")
  if [ "$upto" -gt "$_SEEN" ]; then
    sed -n "$((_SEEN + 1)),${upto}p" "$log" | grep -E "$show" | sed -E "$format" || true
  fi
  _SEEN=$upto
}

# run_step LABEL LOG SHOW FORMAT CMD...: runs CMD with its output in LOG; shows LOG's lines that
# match SHOW (rewritten by the sed script FORMAT) as they come, a heartbeat, and the time taken.
run_step() {
  local label=$1 log=$2 show=$3 format=$4
  shift 4
  local start=$SECONDS beat=$SECONDS rc=0 pid
  echo "== $label"
  _SEEN=0
  "$@" > "$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2> /dev/null; do
    sleep 2
    _progress_lines "$log" "$show" "$format"
    if [ $((SECONDS - beat)) -ge "$HEARTBEAT_S" ]; then
      echo "   ... $((SECONDS - start)) s"
      beat=$SECONDS
    fi
  done
  wait "$pid" || rc=$?
  _progress_lines "$log" "$show" "$format"
  if [ "$rc" -ne 0 ]; then
    echo "   FAILED (exit code $rc) after $((SECONDS - start)) s; the end of $log:"
    tail -n 40 "$log"
    return "$rc"
  fi
  echo "   done in $((SECONDS - start)) s"
}

# Without a visible GPU (nvidia-smi -L fails or lists none) the sm_90a kernels cannot run here,
# and compiling them takes 12-25 minutes on 2 cores against about 3 for the CPU-only build: export
# LONGCTX_CPU_ONLY=1 and say so, unless LONGCTX_CPU_ONLY is set (0 asks for the CUDA kernels) or
# LONGCTX_REQUIRE_CUDA=1 (CI).
default_to_cpu_only() {
  if [ -n "${LONGCTX_CPU_ONLY:-}" ] || [ "${LONGCTX_REQUIRE_CUDA:-0}" = 1 ]; then
    return 0
  fi
  if nvidia-smi -L 2> /dev/null | grep -q "^GPU "; then
    return 0
  fi
  export LONGCTX_CPU_ONLY=1
  echo "no GPU visible (nvidia-smi -L lists none): building the CPU kernels only;"
  echo "  LONGCTX_CPU_ONLY=0 builds the CUDA kernels as well (12-25 min on 2 cores)"
}
