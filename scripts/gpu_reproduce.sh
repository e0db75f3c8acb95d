#!/usr/bin/env bash
# The paper's synthetic tasks on the lent H100 in one device call (issue 7):
#   run(command="bash scripts/gpu_reproduce.sh", carry=[".whl"], timeout_s=600)
# Four trainings run at once, each its own process on the one GPU (the model is tiny:
# a step is bound by kernel launches, so the GPU has room for all four): selective
# copying and induction heads, each with the selective layer (S6) and the time-invariant
# one (S4-style), every layer with the same wall-clock budget (TRAIN seconds; the
# learning rate decays over it). Logs, tables (.md), measurements (.json) and plots
# (.png) land in $OUT (packed into reproduce.tar.gz); the tables are printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/device_env.sh || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/portassm-reproduce}
TRAIN=${TRAIN:-200}
SEED=${SEED:-0}
LENGTHS=${LENGTHS:-"256 1024 4096 16384 65536 262144 1048576"}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
git log -1 --format='commit %h %cd' 2>/dev/null || true
start=$SECONDS
pids=()
for layer in s6 s4; do
  python3 -m portassm reproduce selective-copying --device cuda --layers $layer --steps 1000000 \
    --time-limit "$TRAIN" --eval-every 500 --seed "$SEED" --out "$OUT" >"$OUT/selective-copying-$layer.log" 2>&1 &
  pids+=($!)
  # shellcheck disable=SC2086
  python3 -m portassm reproduce induction-heads --device cuda --layers $layer --steps 1000000 \
    --time-limit "$TRAIN" --eval-every 500 --seed "$SEED" --test-samples 128 --test-lengths $LENGTHS \
    --out "$OUT" >"$OUT/induction-heads-$layer.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
echo "all runs done after $((SECONDS - start)) s (exit $status)"
for log in "$OUT"/*.log; do echo "== $log"; tail -n 4 "$log"; done
for table in "$OUT"/*.md; do echo; echo "## $(basename "$table")"; cat "$table"; done
# the device tool returns a few files only: pack the plots, measurements and logs into one
(cd "$OUT" && tar czf reproduce.tar.gz ./*.json ./*.png ./*.log && rm -f ./*.json ./*.png ./*.log)
exit $status
