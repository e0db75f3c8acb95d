#!/usr/bin/env bash
# The CuPy backend's GPU work in one call of the lent H100 (device tool), ~4 minutes:
#   run(command=". scripts/device_env.sh && bash scripts/gpu_cupy.sh", carry=[".whl"], timeout_s=270)
# 1. benchmarks/gpu_cupy.py --variants alone on the GPU (times must not share it),
# 2. then, side by side: the cupy tests (cross-backend suite, errors, test_cupy.py with
#    the gpu marker) and compute-sanitizer memcheck + racecheck (scripts/sanitize_cupy.sh).
# Logs in $OUT; a summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/portassm-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T_BENCH=${T_BENCH:-140} T_TESTS=${T_TESTS:-110} T_SAN=${T_SAN:-110}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
start=$SECONDS
timeout "$T_BENCH" python3 benchmarks/gpu_cupy.py --variants >"$OUT/bench_cupy.log" 2>&1
echo "bench exit $? after $((SECONDS - start)) s" >>"$OUT/steps.txt"
start=$SECONDS
timeout "$T_TESTS" python3 -m pytest -v -p no:cacheprovider -p no:benchmark -n 8 -m "gpu or not gpu" -k cupy \
  tests/test_cupy.py tests/test_agreement.py tests/test_errors.py >"$OUT/tests_cupy.log" 2>&1 &
tests_pid=$!
timeout "$T_SAN" bash scripts/sanitize_cupy.sh >"$OUT/sanitize_cupy.log" 2>&1 &
san_pid=$!
wait $tests_pid; echo "tests exit $? after $((SECONDS - start)) s" >>"$OUT/steps.txt"
wait $san_pid; echo "sanitize exit $? after $((SECONDS - start)) s" >>"$OUT/steps.txt"

echo "## bench (tail)"; grep -v "^\s*$" "$OUT/bench_cupy.log" | grep -v "^|" | tail -n 40
echo "## tests"; grep -E "FAILED|ERROR| passed| failed|error" "$OUT/tests_cupy.log" | grep -v "PASSED" | tail -n 30; grep -c PASSED "$OUT/tests_cupy.log"
echo "## sanitize"; grep -E "==|ERROR SUMMARY|RACECHECK SUMMARY|Error|done|skipped" "$OUT/sanitize_cupy.log" | tail -n 12
echo "## steps"; cat "$OUT/steps.txt"
echo; cat "$OUT/cupy_table.md" 2>/dev/null
