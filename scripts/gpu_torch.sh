#!/usr/bin/env bash
# The torch backend's GPU work in one call of the lent H100 (device tool):
#   run(command="bash scripts/gpu_torch.sh", carry=[".whl"])
# 1. its GPU test suite (-n 16, as CI's command but with the gpu marker) while the
#    benchmark's configurations compile in the background at low priority (Triton's disk
#    cache then serves the timed runs);
# 2. the benchmark table (forward, forward+backward, peak memory, decode step) and, with
#    SWEEP=1, the variant sweep; each step under its own time limit (seconds, env below).
# Logs land in $OUT; the tables print last.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/device_env.sh || exit 1
OUT=${OUT:-/tmp/portassm-gpu}
mkdir -p "$OUT"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/portassm-triton-cache}
T_TESTS=${T_TESTS:-140}
T_PRE=${T_PRE:-150}
T_BENCH=${T_BENCH:-95}
SWEEP=${SWEEP:-1}
sweep_flag=""
[ "$SWEEP" = 1 ] && sweep_flag="--sweep"
start=$SECONDS
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

nice -n 19 timeout "$T_PRE" python3 benchmarks/gpu_torch.py --quick $sweep_flag --precompile 8 --only-precompile \
  >"$OUT/precompile.log" 2>&1 &
pre=$!
t0=$SECONDS
timeout "$T_TESTS" python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 16 -m "gpu or not gpu" \
  -k "torch and not interpreted" --durations=15 tests/ >"$OUT/tests.log" 2>&1
echo "tests: exit $? after $((SECONDS - t0)) s; $(tail -n 1 "$OUT/tests.log")"
echo "kernels compiled so far (cache entries with a cubin): $(find "$TRITON_CACHE_DIR" -name '*.cubin' | wc -l)"
wait $pre
echo "precompile: exit $? after $((SECONDS - t0)) s; $(grep precompiled "$OUT/precompile.log")"
t0=$SECONDS
timeout "$T_BENCH" python3 benchmarks/gpu_torch.py --quick $sweep_flag >"$OUT/bench.log" 2>&1
echo "bench: exit $? after $((SECONDS - t0)) s (total $((SECONDS - start)) s)"
echo
grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 5
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 20
echo
grep -A 17 "slowest" "$OUT/tests.log" | head -n 18
echo
if grep -q "^GPU:" "$OUT/bench.log"; then sed -n '/^GPU:/,$p' "$OUT/bench.log"; else tail -n 40 "$OUT/bench.log"; fi
