#!/usr/bin/env bash
# One command for a GPU session: build the CUDA extension in place, run the whole test suite (nothing
# GPU-related skips when CUDA is present), the kernel benchmarks, the end-to-end latency bench if it exists,
# and optionally the Triton tuner. Everything lands under $OUT (the device tool brings $OUT back).
#
#   OMNI_RT_COMMIT=<git sha> bash bench/run_gpu.sh           # build + tests + kernels + e2e
#   STAGES="kernels" bash bench/run_gpu.sh                    # any subset of: build tests kernels e2e tune
#   STAGES="build tune kernels" bash bench/run_gpu.sh         # tune, then bench with the new tables
#
# The default stages fit one 10-minute call only if the test suite is quick; for full coverage use two
# calls: STAGES="build tests" and STAGES="build kernels e2e" (a fresh machine needs the build again).
#
# The device machine has no internet: nothing is installed except this repository itself (its CUDA
# extension, built offline by setup.py/CMake). The image already has torch, triton, transformers, onnx,
# pybind11. The tool allows 10 minutes a command: each stage has its own time limit (seconds, env vars
# below) and a stage that runs out is reported, not fatal. The kernel table is printed again last, since
# the reply carries only the end of the output.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench/results/gpu-run}
PY=${PYTHON:-python3}
STAGES=${STAGES:-"build tests kernels e2e"}
TOTAL=${TOTAL:-560}     # the whole script's budget: the tool kills a command at 600 s
T_BUILD=${T_BUILD:-120}
T_TESTS=${T_TESTS:-200}
T_KERNELS=${T_KERNELS:-150}
T_E2E=${T_E2E:-90}
T_TUNE=${T_TUNE:-300}
PYTEST_ARGS=${PYTEST_ARGS:-tests/}  # e.g. PYTEST_ARGS='tests/ -k "cuda or gpu or graph"' for the GPU-only part
E2E_ARGS=${E2E_ARGS:---no-peer}  # transformers' generate on 30B random weights does not fit the window; E2E_ARGS= to run it
T0=$(date +%s)
mkdir -p "$OUT/results"
export OMNI_RT_COMMIT=${OMNI_RT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

stage() {  # stage NAME LIMIT_S CMD...: run with a time limit, log to $OUT/NAME.log, note the outcome
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  local left=$(( TOTAL - (start - T0) - 15 ))  # keep time for the summary and the copy back
  if [ $left -lt 20 ]; then
    echo "=== $name: SKIPPED, ${left}s left of TOTAL=${TOTAL}s (run it in another call: STAGES=\"build $name\")" | tee -a "$SUMMARY"
    return 0
  fi
  [ $limit -gt $left ] && limit=$left
  echo "=== $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - start ))
  local what="rc=$rc"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMED OUT after ${limit}s"
  echo "    $name: $what in ${took}s (log $OUT/$name.log)" | tee -a "$SUMMARY"
  tail -n 5 "$OUT/$name.log" | sed 's/^/    | /'
  return 0
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $OMNI_RT_COMMIT"
  echo "host: $(hostname)"
  nvidia-smi || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv || true
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__, '| gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt" | head -n 40

for s in $STAGES; do
  case $s in
    build)   # the repository's own CUDA extension, in place (no dependencies, no network)
      stage build "$T_BUILD" $PY setup.py build_ext --inplace ;;
    tests)
      eval "stage tests \"\$T_TESTS\" \$PY -m pytest -q -p no:cacheprovider -rs --durations=15 $PYTEST_ARGS" ;;
    tune)
      stage tune "$T_TUNE" $PY bench/tune.py --out "$OUT/results" --budget-s $(( T_TUNE - 60 ))
      mkdir -p "$OUT/tuned" && cp kernels/tuned/*.json "$OUT/tuned/" 2>/dev/null || true ;;
    kernels)
      stage kernels "$T_KERNELS" $PY bench/kernels.py --out "$OUT/results" ;;
    e2e)
      if [ -f bench/e2e_latency.py ]; then
        stage e2e "$T_E2E" $PY bench/e2e_latency.py --out "$OUT/results" $E2E_ARGS
      else
        echo "=== e2e: bench/e2e_latency.py not present, skipped" | tee -a "$SUMMARY"
      fi ;;
    *) echo "unknown stage $s (known: build tests kernels e2e tune)" | tee -a "$SUMMARY" ;;
  esac
done

echo
echo "=== summary"; cat "$SUMMARY"
if [ -f "$OUT/tests.log" ]; then echo "=== tests (tail)"; tail -n 25 "$OUT/tests.log"; fi
if [ -f "$OUT/e2e.log" ]; then echo "=== e2e (tail)"; tail -n 30 "$OUT/e2e.log"; fi
latest=$(ls -t "$OUT"/results/kernels-*.json 2>/dev/null | head -n 1)
if [ -n "$latest" ]; then  # the full table is in kernels.log and the JSON; this one fits the reply's tail
  echo "=== kernels (fastest backend per case; full table in $OUT/kernels.log)"
  $PY bench/summary.py "$latest"
fi
