#!/usr/bin/env bash
# The prepared GPU check (docs/PERFORMANCE.md, "The GPU check"): on a machine with a GPU and
# torch (2.11 or newer, CUDA 13) but no package registry,
#
#   bash tests/gpu/check.sh OUT_DIR
#
#   1. env         what the machine has (tests/gpu/summary.py env): stops here without a GPU
#   2. build       the extension in place against this machine's torch, for the visible GPUs'
#                  architectures (SAGE_DIST_CUDA_ARCHS=visible), then checks that its CUDA
#                  kernels registered
#   3. gpu-tests   tests/gpu/ and tests/test_gpu_ready.py (opcheck, kernels against the
#                  references on mid-row fragments and large shapes, multi-tensor forms,
#                  stochastic rounding bits against the CPU's, aliasing, graph capture, one
#                  synchronisation per step)
#   4. cuda-tests  the CUDA tests of tests/test_kernels.py, test_ops.py, test_precision.py
#   5. bench       python -m sage_dist.bench_gpu: the step on the 1B Llama's shapes
#                  (sage-hybrid, scale, Lion, torch's fused AdamW) against a device-to-device
#                  copy measured in the same run
#   6. summary     OUT_DIR/gpu_check.json (tests/gpu/summary.py summarize)
#
# Everything printed also goes to OUT_DIR/check.log (the build's full output to build.log).
# Each step has a time limit, and all of them together stop by CHECK_BUDGET_S seconds
# (default 470: under 8 minutes). No pip, no DeepSpeed: only torch, numpy, pytest and
# transformers, which such a machine has. Exit status: 0 when gpu_check.json says ok, 1 when
# a step or a test failed, 2 for bad arguments, 3 when the machine cannot run the check.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: bash tests/gpu/check.sh OUT_DIR [options]
  --no-build        use the extension already built in place (skip step 2)
  --no-tests        skip steps 3 and 4
  --no-bench        skip step 5
  --bench-steps N   timed steps per recipe in the benchmark (default 10)
  --model CONFIG    the benchmark's Llama config (default llama_1b)
  --dry-run         print the steps and write the summary without running anything
  -h, --help        this text
environment: PYTHON (default python3), CUDA_HOME (default: found from nvcc or /usr/local/cuda*),
             MAX_JOBS (default: the CPU count), CHECK_BUDGET_S (default 470)
EOF
}

OUT="" BUILD=1 TESTS=1 BENCH=1 DRY=0 BENCH_STEPS=10 MODEL=llama_1b
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --no-build) BUILD=0 ;;
    --no-tests) TESTS=0 ;;
    --no-bench) BENCH=0 ;;
    --dry-run) DRY=1 ;;
    --bench-steps|--model)
      if [ $# -lt 2 ] || [ -z "$2" ]; then
        echo "check.sh: $1 needs a value" >&2; usage >&2; exit 2
      fi
      if [ "$1" = --model ]; then MODEL="$2"; else BENCH_STEPS="$2"; fi
      shift ;;
    -*) echo "check.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *)
      if [ -n "$OUT" ]; then
        echo "check.sh: one OUT_DIR only (got '$OUT' and '$1')" >&2; exit 2
      fi
      OUT="$1" ;;
  esac
  shift
done
if [ -z "$OUT" ]; then
  echo "check.sh: OUT_DIR is required" >&2; usage >&2; exit 2
fi
case "$BENCH_STEPS" in
  ''|*[!0-9]*|0) echo "check.sh: --bench-steps must be a positive integer (got '$BENCH_STEPS')" >&2
                 exit 2 ;;
esac
BUDGET="${CHECK_BUDGET_S:-470}"
case "$BUDGET" in
  ''|*[!0-9]*) echo "check.sh: CHECK_BUDGET_S must be a number of seconds" >&2; exit 2 ;;
esac

mkdir -p "$OUT" || { echo "check.sh: cannot create $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
LOG="$OUT/check.log"
STEPS="$OUT/steps.tsv"
: > "$LOG"
: > "$STEPS"
rm -f "$OUT"/pytest-*.xml "$OUT/bench_gpu.json" "$OUT/gpu_check.json" "$OUT/env.json"
START=$(date +%s)

say() { echo "[check] $*" | tee -a "$LOG"; }

# run_step NAME LIMIT_S COMMAND...: runs COMMAND (output to the terminal and check.log) under
# min(LIMIT_S, what is left of the budget); records name, exit status, seconds in steps.tsv.
run_step() {
  local name="$1" limit="$2"; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  [ "$limit" -gt "$left" ] && limit="$left"
  say "$name: $* (limit ${limit} s)"
  if [ "$DRY" = 1 ]; then
    printf '%s\tdry-run\t0\n' "$name" >> "$STEPS"
    return 0
  fi
  if [ "$limit" -lt 5 ]; then
    say "$name: not started, the time budget (${BUDGET} s) is spent"
    printf '%s\t124\t0\tbudget spent\n' "$name" >> "$STEPS"
    return 124
  fi
  local t0 rc ms
  t0=$(date +%s%N)
  if declare -F "$1" > /dev/null; then  # a function of this script: run it in a child bash
    timeout --kill-after=10 "$limit" bash -c "$(declare -f "$1"); $*" 2>&1 | tee -a "$LOG"
  else
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  fi
  rc=${PIPESTATUS[0]}
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '%s\t%s\t%d.%03d\n' "$name" "$rc" $(( ms / 1000 )) $(( ms % 1000 )) >> "$STEPS"
  [ "$rc" -ne 0 ] && say "$name: exit status $rc"
  return "$rc"
}

skip_step() { printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$STEPS"; say "$1: skipped ($2)"; }

finish() {
  "$PY" tests/gpu/summary.py summarize "$OUT" 2>&1 | tee -a "$LOG"
  if [ "$DRY" = 1 ]; then exit 0; fi
  if "$PY" -c "import json,sys; sys.exit(0 if json.load(open('$OUT/gpu_check.json'))['ok'] else 1)"; then
    say "GPU check passed ($(( $(date +%s) - START )) s); results: $OUT/gpu_check.json"
    exit 0
  fi
  say "GPU check FAILED ($(( $(date +%s) - START )) s); see $OUT/gpu_check.json and $LOG"
  exit "${1:-1}"
}

say "sage_dist GPU check in $ROOT, results in $OUT, budget ${BUDGET} s"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" PYTHONDONTWRITEBYTECODE=1 OUT PY
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# 1. env
if ! run_step env 60 "$PY" tests/gpu/summary.py env "$OUT/env.json"; then
  [ "$DRY" = 1 ] || finish 3
fi

# 2. build
if [ -z "${CUDA_HOME:-}" ]; then
  for d in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent)")")")" \
           /usr/local/cuda /usr/local/cuda-13*; do
    if [ -x "$d/bin/nvcc" ] && [ -f "$d/include/cuda_runtime.h" ]; then export CUDA_HOME="$d"; break; fi
  done
fi
if [ "$BUILD" = 1 ]; then
  say "CUDA_HOME=${CUDA_HOME:-not found}"
  build() {
    # The full compiler output goes to build.log; its summary lines to the terminal.
    SAGE_DIST_CUDA_ARCHS="${SAGE_DIST_CUDA_ARCHS:-visible}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
    local rc=$?
    grep -E "\[sage_dist setup\]|error" "$OUT/build.log" | cut -c1-300 | head -40
    [ "$rc" -ne 0 ] && tail -n 30 "$OUT/build.log"
    return "$rc"
  }
  if ! run_step build 300 build; then finish 1; fi
else
  skip_step build "--no-build"
fi
registered() {
  "$PY" -c "
import torch, sage_dist.ops as o
assert o.HAS_EXTENSION, o.EXTENSION_ERROR
assert o.has_cuda_kernels(), 'sage_dist._C has no CUDA kernels: was it built with CUDA_HOME set?'
missing = [op for op in o.OPS if not o.has_kernel(op, 'cuda')]
assert not missing, f'no CUDA kernel for {missing}'
print('CUDA kernels registered for all', len(o.OPS), 'ops')"
}
if ! run_step kernels 60 registered; then [ "$DRY" = 1 ] || finish 1; fi

# 3, 4. tests
if [ "$TESTS" = 1 ]; then
  PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider -o addopts="")
  run_step gpu-tests 200 "${PYTEST[@]}" tests/gpu tests/test_gpu_ready.py \
    --junitxml="$OUT/pytest-gpu.xml"
  run_step cuda-tests 90 "${PYTEST[@]}" tests/test_kernels.py tests/test_ops.py \
    tests/test_precision.py -k cuda --junitxml="$OUT/pytest-cuda.xml"
else
  skip_step gpu-tests "--no-tests"
  skip_step cuda-tests "--no-tests"
fi

# 5. bench
if [ "$BENCH" = 1 ]; then
  run_step bench 180 "$PY" -m sage_dist.bench_gpu --model "$MODEL" --steps "$BENCH_STEPS" \
    --json "$OUT/bench_gpu.json"
else
  skip_step bench "--no-bench"
fi

# 6. summary
finish 1
