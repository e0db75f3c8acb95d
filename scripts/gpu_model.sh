#!/usr/bin/env bash
# The language model on the lent GPU in one short call (issue 6): the model tests of the
# torch and cupy backends (CUDA-graph decoding included), then the decode benchmark beside
# transformers. Full logs land in $OUT; a short summary is printed last.
#   run(command=". scripts/device_env.sh && bash scripts/gpu_model.sh", carry=[".whl"], timeout_s=420)
# The tests compile the Triton and NVRTC kernels in each worker: the model tests of the two
# GPU backends took more than 70 s on the H100 (2026-11-23), hence the 240 s default.
# Run no git command there: the copy's .git need not match the working tree that travels.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/portassm-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
start=$SECONDS
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -v --tb=short -p no:cacheprovider ${XDIST--n 4} \
  -m "gpu or not gpu" -k "(torch or cupy) and not interpreted" tests/test_model.py >"$OUT/model_tests.log" 2>&1
tests_rc=$?
tests_s=$((SECONDS - start))
start=$SECONDS
timeout "${BENCH_TIMEOUT:-150}" python3 benchmarks/bench_model.py --device "${DEVICE:-cuda}" ${BENCH_ARGS:-} \
  >"$OUT/bench_model.log" 2>&1
bench_rc=$?
bench_s=$((SECONDS - start))
echo "=== test failures and errors"
grep -E "FAILED|ERROR|Error|assert" "$OUT/model_tests.log" | head -n 40
echo "=== warnings about CUDA graphs"
grep -h -i "cuda graph" "$OUT/model_tests.log" "$OUT/bench_model.log" | sort | uniq -c | head -n 10
echo "=== bench log"
grep -v "^$" "$OUT/bench_model.log" | grep -v "^|" | tail -n 16
echo "=== tests: exit $tests_rc after $tests_s s: $(tail -n 1 "$OUT/model_tests.log")"
echo "=== bench: exit $bench_rc after $bench_s s"
cat "$OUT/model_table.md" 2>/dev/null
