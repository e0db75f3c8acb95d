#!/usr/bin/env bash
# The Gluon forward of the torch backend on the lent H100, in one call (device tool):
#   run(command="bash scripts/gpu_torch_gluon.sh", carry=[".whl"])
# Its GPU tests (-k gluon) while the benchmark's configurations compile in the background,
# then the Triton and the Gluon forward side by side at every anchor size and dtype
# (python3 benchmarks/gpu_torch.py --quick --gluon --gluon-variants). Logs land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/device_env.sh || exit 1
OUT=${OUT:-/tmp/portassm-gpu}
mkdir -p "$OUT"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/portassm-triton-cache}
T_TESTS=${T_TESTS:-100}
T_PRE=${T_PRE:-100}
T_BENCH=${T_BENCH:-40}
TESTS_K=${TESTS_K:-gluon}
TESTS_PATH=${TESTS_PATH:-tests/test_torch_triton.py}
TESTS_N=${TESTS_N:-3}
PRE_N=${PRE_N:-10}
BENCH_FLAGS=${BENCH_FLAGS:---gluon --gluon-variants}
start=$SECONDS
nice -n 5 timeout "$T_PRE" python3 benchmarks/gpu_torch.py --quick $BENCH_FLAGS --precompile "$PRE_N" --only-precompile \
  >"$OUT/precompile.log" 2>&1 &
pre=$!
# SIGINT at the limit: pytest then still prints its summary of what failed so far
timeout -s INT -k 10 "$T_TESTS" python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n "$TESTS_N" \
  -m "gpu or not gpu" -k "$TESTS_K" -rfE --tb=short $TESTS_PATH >"$OUT/tests.log" 2>&1
echo "tests: exit $? after $((SECONDS - start)) s"
wait $pre
echo "precompile: exit $? after $((SECONDS - start)) s; $(grep precompiled "$OUT/precompile.log")"
timeout "$T_BENCH" python3 benchmarks/gpu_torch.py --quick $BENCH_FLAGS >"$OUT/bench.log" 2>&1
echo "bench: exit $? after $((SECONDS - start)) s"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 3
grep -E "^(FAILED|ERROR|E  )" "$OUT/tests.log" | cut -c1-300 | head -n 30
grep -i "fail" "$OUT/precompile.log" | head -n 5
grep "^|" "$OUT/bench.log"
tail -n 5 "$OUT/bench.log"
