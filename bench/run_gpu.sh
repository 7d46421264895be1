#!/usr/bin/env bash
# One command for a GPU session (bench/README.md, "Running on a GPU machine"): every stage runs under its own
# time limit, in the order of what it tells us, and writes its results into $OUT as it goes; the default
# stages add up to TOTAL=480 s at most (the device tool gives one command 10 minutes, machine start included).
#
#   OMNI_RT_COMMIT=$(git rev-parse HEAD) bash bench/run_gpu.sh     # every default stage
#   bash bench/run_gpu.sh --dry-run                                 # list stages, commands, limits; run nothing
#   STAGES="build kernels_decode" bash bench/run_gpu.sh             # any subset, in the order given
#
# Stages (--dry-run prints each one's limit in seconds; T_<STAGE> overrides it, e.g. T_TESTS=200):
#   env             environment.txt: nvidia-smi, nvcc, versions, commit, the pytest plugins found
#   build           the CUDA extension (setup.py build_ext --inplace: CMake + nvcc); FAILS if CMake fails
#   tests           the GPU tests (GPU_TESTS: test_csrc, test_kernels_model, test_timing, test_sampling, test_triton_*), graph tests
#                   left to `graphs`; pytest-xdist workers, per-test timeout, JUnit XML -> $OUT/tests.xml
#   kernels_decode  bench/kernels.py decode rows of moe_experts and decode_attention -> $OUT/results/*.json
#   graphs          CUDA-graph replay vs eager: tests/test_graphs.py + every GPU test named *graph*
#   e2e             bench/e2e_latency.py, released shapes at E2E_LAYERS thinker layers (rows say so)
#   kernels_rest    bench/kernels.py, every row kernels_decode did not run
#   tune            (not default) bench/tune.py, then the tuned tables are copied to $OUT/tuned
#
# Nothing is installed or downloaded: the GPU image has torch, triton, transformers, nvcc, pybind11,
# pytest-xdist, pytest-timeout and no soundfile/soxr/cffi (nothing here needs them). A stage that fails or
# runs out of time is recorded (its rc in $OUT/summary.tsv) and the next one runs; the summary is printed
# last, since the device tool returns only the end of the output.
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/bench/results/gpu-run}
PY=${PYTHON:-python3}
TOTAL=${TOTAL:-480}
DEFAULT_STAGES="env build tests kernels_decode graphs e2e kernels_rest"
STAGES=${STAGES:-$DEFAULT_STAGES}
T_ENV=${T_ENV:-15}
T_BUILD=${T_BUILD:-75}
T_TESTS=${T_TESTS:-160}
T_KERNELS_DECODE=${T_KERNELS_DECODE:-60}
T_GRAPHS=${T_GRAPHS:-45}
T_E2E=${T_E2E:-65}
T_KERNELS_REST=${T_KERNELS_REST:-50}
T_TUNE=${T_TUNE:-300}
T_REPORT=${T_REPORT:-10}   # the summary printed at the end
KILL_GRACE=5               # a stage gets SIGTERM at limit - KILL_GRACE, SIGKILL at its limit
XDIST_WORKERS=${XDIST_WORKERS:-4}
TEST_TIMEOUT=${TEST_TIMEOUT:-120}  # per test (pytest-timeout)
# The tests that matter on a GPU: those that skip without CUDA and the Triton tests (compiled there, run
# under the interpreter on a CPU). The CPU parity suite (transformers oracle) runs in CI, not here.
GPU_TESTS=${GPU_TESTS:-"tests/test_csrc.py tests/test_kernels_model.py tests/test_timing.py tests/test_sampling.py $(ls tests/test_triton_*.py 2>/dev/null | tr '\n' ' ')"}
GRAPH_TESTS=${GRAPH_TESTS:-"tests/test_graphs.py"}
KERNELS_DECODE_OPS=${KERNELS_DECODE_OPS:-moe_experts:decode,decode_attention}
E2E_LAYERS=${E2E_LAYERS:-8}
E2E_ARGS=${E2E_ARGS:-"--layers $E2E_LAYERS --concurrency 1,4 --inputs audio --repeats 1 --max-new-tokens 16 --talker-max-new-tokens 16 --no-peer"}
export OMNI_RT_COMMIT=${OMNI_RT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export PYTHON=$PY  # the env stage runs this script again

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }

environment() {  # what ran where: printed into environment.txt by the env stage
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $OMNI_RT_COMMIT"
  echo "host: $(hostname) | cpus: $(nproc) | $(free -g 2>/dev/null | awk '/Mem:/ {print "memory: " $2 " GiB"}')"
  git status --short 2>/dev/null | head -n 20 | sed 's/^/dirty: /'
  nvidia-smi || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,power.draw,power.limit,temperature.gpu \
    --format=csv || true
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not found"
  command -v cmake >/dev/null && cmake --version | head -n 1 || echo "cmake: not found"
  "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "triton", "transformers", "onnx", "onnxruntime", "pybind11", "pytest", "xdist",
             "pytest_timeout", "cupy", "numpy", "soundfile", "soxr", "cffi", "tensorrt"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', 'present')}")
    except Exception as exc:  # absent is information too
        print(f"{name}: not available ({type(exc).__name__})")
import torch
print("torch cuda", torch.version.cuda, "| gpu", torch.cuda.is_available() and torch.cuda.get_device_name())
EOF
}

has_module() { "$PY" -c "import $1" >/dev/null 2>&1; }

pytest_cmd() {  # pytest_cmd JUNIT_NAME LIMIT ARGS...: pytest with the plugins this image has
  local junit=$1 limit=$2; shift 2
  local flags="-p no:cacheprovider -v -rfEs --tb=short --durations=15 --junitxml=$OUT/$junit.xml"
  if has_module xdist; then flags="$flags -n $XDIST_WORKERS"; fi
  if has_module pytest_timeout; then
    flags="$flags --timeout=$TEST_TIMEOUT"
    # stop starting tests 20 s before the stage's limit, so pytest still writes the JUnit XML
    if "$PY" -c "import pytest_timeout as t, sys; sys.exit(0 if hasattr(t, 'SESSION_TIMEOUT_KEY') else 1)" 2>/dev/null \
       && [ "$limit" -gt 40 ]; then
      flags="$flags --session-timeout=$(( limit - 20 ))"
    fi
  fi
  echo "$PY -m pytest $flags $*"
}

stage_cmd() {  # stage_cmd NAME LIMIT: the command line a stage runs (also what --dry-run prints)
  local name=$1 limit=$2
  case $name in
    env)            echo "bash bench/run_gpu.sh --environment > $OUT/environment.txt 2>&1; cat $OUT/environment.txt" ;;
    build)          echo "rm -f runtime/omni_rt_cuda*.so && OMNI_RT_REQUIRE_CUDA=1 $PY setup.py build_ext --inplace && ls -l runtime/omni_rt_cuda*.so" ;;
    tests)          pytest_cmd tests "$limit" -k "'not graph'" $GPU_TESTS ;;
    kernels_decode) echo "$PY bench/kernels.py --ops $KERNELS_DECODE_OPS --out $OUT/results" ;;
    graphs)         pytest_cmd graphs "$limit" -k graph $GRAPH_TESTS $GPU_TESTS ;;
    e2e)            echo "$PY bench/e2e_latency.py --out $OUT/results $E2E_ARGS" ;;
    kernels_rest)   echo "$PY bench/kernels.py --skip-ops $KERNELS_DECODE_OPS --out $OUT/results" ;;
    tune)           echo "$PY bench/tune.py --out $OUT/results --budget-s $(( limit > 120 ? limit - 60 : limit / 2 )) && mkdir -p $OUT/tuned && cp kernels/tuned/*.json $OUT/tuned/" ;;
    *)              return 1 ;;
  esac
}

stage_limit() {  # the T_<NAME> limit of a stage
  local var="T_$(echo "$1" | tr '[:lower:]' '[:upper:]')"
  echo "${!var:-0}"
}

case "${1:-}" in
  --environment) environment; exit 0 ;;
  -h|--help) usage; exit 0 ;;
  --dry-run|"") ;;
  *) echo "unknown argument $1 (use --dry-run or --help)" >&2; exit 2 ;;
esac

for s in $STAGES; do
  if ! stage_cmd "$s" 0 >/dev/null; then
    echo "unknown stage $s (known: $DEFAULT_STAGES tune)" >&2
    exit 2
  fi
done

if [ "${1:-}" = "--dry-run" ]; then
  sum=0
  printf '%-16s %8s  %s\n' stage limit_s command
  for s in $STAGES; do
    limit=$(stage_limit "$s")
    sum=$(( sum + limit ))
    printf '%-16s %8s  %s\n' "$s" "$limit" "$(stage_cmd "$s" "$limit")"
  done
  sum=$(( sum + T_REPORT ))
  printf '%-16s %8s  %s\n' report "$T_REPORT" "the summary: kernel tables, e2e rows, failed tests, each stage's rc and time"
  echo "sum: ${sum} s of TOTAL=${TOTAL} s"
  [ "$sum" -le "$TOTAL" ] || echo "warning: the stages add up to more than TOTAL; the last ones get what is left"
  exit 0
fi

mkdir -p "$OUT/results"
T0=$(date +%s)
SUMMARY="$OUT/summary.tsv"
printf 'stage\trc\tseconds\tlimit_s\tstatus\n' > "$SUMMARY"

run_stage() {  # run_stage NAME: its command under its limit (capped by what TOTAL has left), log in $OUT/NAME.log
  local name=$1 limit left start rc took status cmd
  limit=$(stage_limit "$name")
  start=$(date +%s)
  left=$(( TOTAL - T_REPORT - (start - T0) ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    printf '%s\t-\t0\t%s\tSKIPPED: %ss left of TOTAL\n' "$name" "$limit" "$left" >> "$SUMMARY"
    echo "=== $name: SKIPPED (${left}s left of TOTAL=${TOTAL}s; run it alone: STAGES=\"build $name\")"
    return
  fi
  cmd=$(stage_cmd "$name" "$limit")
  echo "=== $name (limit ${limit}s): $cmd"
  timeout --kill-after=$KILL_GRACE $(( limit - KILL_GRACE )) bash -c "$cmd" > "$OUT/$name.log" 2>&1
  rc=$?
  took=$(( $(date +%s) - start ))
  case $rc in
    0) status=ok ;;
    124|137) status="TIMED OUT" ;;
    *) status=FAILED ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$limit" "$status" >> "$SUMMARY"
  echo "    $name: $status (rc=$rc) in ${took}s, log $OUT/$name.log"
  tail -n 4 "$OUT/$name.log" | cut -c1-200 | sed 's/^/    | /'
}

report() {  # what the reply's tail should hold, most important last
  local f
  for f in $(ls "$OUT"/results/kernels-*.json 2>/dev/null); do
    echo "=== $(basename "$f")"
    "$PY" bench/summary.py "$f" | cut -c1-140
  done
  if ls "$OUT"/results/e2e_latency-*.json >/dev/null 2>&1; then
    echo "=== e2e (tail of $OUT/e2e.log)"
    tail -n 12 "$OUT/e2e.log"
  fi
  for f in tests graphs; do
    [ -f "$OUT/$f.log" ] || continue
    echo "=== $f: failures and errors (full log $OUT/$f.log, JUnit $OUT/$f.xml)"
    grep -E '^(FAILED|ERROR) ' "$OUT/$f.log" | head -n 25 | cut -c1-200
    grep -E '^=+ .*(passed|failed|error|skipped).* =+$' "$OUT/$f.log" | tail -n 1
  done
  echo "=== stages (rc, seconds, limit) -- $OUT/summary.tsv; total $(( $(date +%s) - T0 ))s of TOTAL=${TOTAL}s"
  column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
}

for s in $STAGES; do
  run_stage "$s"
done
echo
export OUT PY T0 TOTAL SUMMARY
timeout "$T_REPORT" bash -c "$(declare -f report); report" | tee "$OUT/report.txt"
