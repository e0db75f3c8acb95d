#!/usr/bin/env bash
# The CuPy backend's GPU work in one call of the lent H100 (device tool), ~2.5 minutes:
#   run(command=". scripts/device_env.sh && bash scripts/gpu_cupy.sh", carry=[".whl"], timeout_s=170)
# 1. benchmarks/gpu_cupy.py --variants --sizes all alone on the GPU (times must not share
#    it; BENCH_ARGS overrides the arguments),
# 2. then, side by side: the cupy tests (cross-backend suite, errors, test_cupy.py with
#    the gpu marker) and compute-sanitizer memcheck + racecheck (scripts/sanitize_cupy.sh;
#    SANITIZE=0 leaves it out); NCU=1 adds scripts/ncu_cupy.sh after the benchmark.
# Logs in $OUT; a summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/portassm-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T_BENCH=${T_BENCH:-60} T_TESTS=${T_TESTS:-85} T_SAN=${T_SAN:-85} SANITIZE=${SANITIZE:-1}
BENCH_ARGS=${BENCH_ARGS:---variants --sizes all}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
start=$SECONDS
# shellcheck disable=SC2086
timeout "$T_BENCH" python3 benchmarks/gpu_cupy.py $BENCH_ARGS >"$OUT/bench_cupy.log" 2>&1
echo "bench exit $? after $((SECONDS - start)) s" >>"$OUT/steps.txt"
if [ "${NCU:-0}" = 1 ]; then  # Nsight Compute over the default kernels (scripts/ncu_cupy.sh), also alone
  start=$SECONDS
  timeout "${T_NCU:-45}" bash scripts/ncu_cupy.sh "$OUT" >"$OUT/ncu.log" 2>&1
  echo "ncu exit $? after $((SECONDS - start)) s" >>"$OUT/steps.txt"
fi
start=$SECONDS
timeout "$T_TESTS" python3 -m pytest -v -p no:cacheprovider -p no:benchmark -n 12 -m "gpu or not gpu" -k cupy \
  tests/test_cupy.py tests/test_agreement.py tests/test_errors.py >"$OUT/tests_cupy.log" 2>&1 &
tests_pid=$!
if [ "$SANITIZE" = 1 ]; then
  timeout "$T_SAN" bash scripts/sanitize_cupy.sh >"$OUT/sanitize_cupy.log" 2>&1 &
  san_pid=$!
fi
wait $tests_pid; echo "tests exit $? after $((SECONDS - start)) s" >>"$OUT/steps.txt"
if [ "$SANITIZE" = 1 ]; then
  wait $san_pid; echo "sanitize exit $? after $((SECONDS - start)) s" >>"$OUT/steps.txt"
fi

echo "## bench (tail)"; grep -v "^\s*$" "$OUT/bench_cupy.log" | grep -v "^|" | grep -v "^(" | tail -n 25
echo "## tests"; grep -E "FAILED|ERROR| passed| failed|error" "$OUT/tests_cupy.log" | grep -v "PASSED" | tail -n 30; grep -c PASSED "$OUT/tests_cupy.log"
echo "## sanitize"; grep -E "==|ERROR SUMMARY|RACECHECK SUMMARY|Error|done|skipped" "$OUT/sanitize_cupy.log" | tail -n 12
echo "workloads run under the sanitizer: $(grep -c "^ran" "$OUT/sanitize_cupy.log")"
[ "${NCU:-0}" = 1 ] && { echo "## ncu"; cat "$OUT/ncu.log"; }
echo "## steps"; cat "$OUT/steps.txt"
echo; cat "$OUT/cupy_table.md" 2>/dev/null
