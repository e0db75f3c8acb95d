#!/usr/bin/env bash
# Everything that needs the GPU, in one call of the lent H100 (device tool):
#   run(command="bash scripts/gpu_all.sh", carry=[".whl"], timeout_s=600)
# Phase 1, correctness, side by side (nothing is timed while the GPU is shared):
#   the GPU test suites of the torch backend, the cupy backend and the language model
#   (CUDA-graph decoding included), and compute-sanitizer (memcheck, racecheck) on the
#   torch and cupy kernels at small sizes.
# Phase 2, speed, one benchmark at a time on an otherwise idle GPU:
#   torch scan (forward, forward+backward, peak memory, decode step), cupy scan (the same,
#   with the launch-layout variants at the first size), the language model beside
#   transformers (eager and CUDA-graph decoding), the scaling study and memory table.
# A short table of every step and the benchmark tables are printed last; full logs land
# in $OUT. STEPS names a subset, e.g. STEPS="tests_model bench_model".
# Run no git command there: the copy's .git need not match the working tree that travels.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/device_env.sh || exit 1
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/portassm-triton-cache}
OUT=${OUT:-/tmp/portassm-gpu}
mkdir -p "$OUT"
: >"$OUT/steps.txt"
STEPS=${STEPS:-"tests_torch tests_cupy tests_model sanitize_torch sanitize_cupy bench_torch bench_cupy bench_model bench_scaling"}
want() { [[ " $STEPS " == *" $1 "* ]]; }
T=${STEP_TIMEOUT:-240}  # seconds for each step; T_<step> overrides it for one, e.g. T_bench_torch=120

step() {  # step NAME COMMAND...: run under the time limit, log to $OUT/NAME.log, record the exit
  local name=$1; shift
  local start=$SECONDS
  local limit_var="T_$name"
  timeout "${!limit_var:-$T}" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $((SECONDS - start))" >>"$OUT/steps.txt"
  return $rc
}
# the GPU suites: -v so that a suite stopped by its time limit still shows what passed
PYTEST=(python3 -m pytest -v -rfE -p no:cacheprovider -p no:benchmark -m "gpu or not gpu")

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, cupy; print('torch', torch.__version__, 'triton', triton.__version__, 'cupy', cupy.__version__)"

# phase 1: correctness, side by side
pids=()
want tests_torch && { step tests_torch "${PYTEST[@]}" -n 8 -k "torch and not interpreted" tests/ & pids+=($!); }
want tests_cupy && { step tests_cupy "${PYTEST[@]}" -n 4 -k cupy tests/test_cupy.py tests/test_agreement.py tests/test_errors.py & pids+=($!); }
want tests_model && { step tests_model "${PYTEST[@]}" -n 3 -k "(torch or cupy) and not interpreted" tests/test_model.py & pids+=($!); }
want sanitize_torch && { step sanitize_torch bash scripts/sanitize_torch.sh & pids+=($!); }
want sanitize_cupy && { step sanitize_cupy bash scripts/sanitize_cupy.sh & pids+=($!); }
for pid in "${pids[@]}"; do wait "$pid"; done

# phase 2: speed, one at a time
want bench_model && step bench_model python3 benchmarks/bench_model.py --device cuda
want bench_scaling && step bench_scaling python3 -m portassm bench --scaling --memory --backends torch cupy \
  --max-time 0.5 --json "$OUT/bench_scaling.json" --markdown "$OUT/scaling_table.md"
want bench_cupy && step bench_cupy python3 benchmarks/gpu_cupy.py ${CUPY_BENCH_ARGS:-}
want bench_torch && step bench_torch python3 benchmarks/gpu_torch.py --quick --graph ${TORCH_BENCH_ARGS:-}

echo
echo "## failures"
for name in tests_torch tests_cupy tests_model; do
  [ -f "$OUT/$name.log" ] && {
    echo "$name: $(grep -c PASSED "$OUT/$name.log") passed lines; $(tail -n 1 "$OUT/$name.log")"
    grep -E "^(FAILED|ERROR)" "$OUT/$name.log" | head -n 15
  }
done
for name in sanitize_torch sanitize_cupy; do
  [ -f "$OUT/$name.log" ] && { echo "$name:"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/$name.log" | sort | uniq -c; }
done
[ -f "$OUT/bench_model.log" ] && grep -h -i "warning" "$OUT/bench_model.log" | sort | uniq -c | head -n 5
for table in "$OUT"/*_table.md; do
  [ -f "$table" ] && { echo; cat "$table"; }
done
echo
echo "## steps (name, exit code, seconds)"
cat "$OUT/steps.txt"
! grep -qv " 0 " "$OUT/steps.txt"
