#!/usr/bin/env bash
# compute-sanitizer (memcheck, racecheck) on the torch backend's Triton and Gluon kernels at a
# small size: both forwards and both backwards (whole sequence and sequence chunks), and one step.
# Run on the GPU machine from the repository root:  bash scripts/sanitize_torch.sh
# Exits non-zero when a tool reports an error; logs go to $OUT (or /tmp) as sanitize_*.log.
set -u
LOG_DIR="${OUT:-/tmp}"
SCRIPT=$(mktemp /tmp/sanitize_torch_XXXX.py)
cat > "$SCRIPT" <<'PY'
import torch, portassm
from portassm.backends import torch_triton as tt
portassm.set_backend("torch")
g = torch.Generator(device="cuda").manual_seed(0)
def r(*s): return torch.randn(*s, device="cuda", generator=g)
batch, dim, seqlen, dstate = 2, 64, 200, 16
kernels = [(f, b, m, True) for f in ("gluon", "triton") for b in ("gluon", "triton") for m in (1, 10**6)]
kernels += [("gluon", "gluon", m, False) for m in (1, 10**6)]  # the Gluon forward's lane sums through shared memory
for fwd_kernel, bwd_kernel, min_warps, shfl in kernels:  # both forwards and both backwards; whole sequences, then chunks
    tt.configure(min_warps=min_warps, bwd_min_warps=min_warps, ck=16, fwd_kernel=fwd_kernel, bwd_kernel=bwd_kernel,
                 gluon_shfl_sum=shfl)
    args = dict(u=r(batch, dim, seqlen), delta=r(batch, dim, seqlen) * 0.5, A=-torch.rand(dim, dstate, device="cuda") - 0.5,
                B=r(batch, 2, dstate, seqlen), C=r(batch, 2, dstate, seqlen), D=r(dim), z=r(batch, dim, seqlen),
                delta_bias=r(dim) * 0.1, initial_state=r(batch, dim, dstate))
    for v in args.values(): v.requires_grad_(True)
    out, last = portassm.scan(**args, delta_softplus=True, return_last_state=True)
    torch.autograd.backward([out, last], [r(*out.shape), r(*last.shape)])
y, new = portassm.scan_step(r(batch, dim, dstate), r(batch, dim), r(batch, dim), -torch.rand(dim, dstate, device="cuda"),
                            r(batch, dstate), r(batch, dstate), r(dim), r(batch, dim), r(dim), True)
torch.cuda.synchronize()
print("sanitized run finished")
PY
status=0
# compile the kernels once outside the tools (Triton's disk cache serves the sanitized runs),
# then run both tools side by side
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/portassm-triton-cache}
python3 "$SCRIPT" >"$LOG_DIR/sanitize_compile.log" 2>&1 || { echo "the plain run failed:"; tail -n 20 "$LOG_DIR/sanitize_compile.log"; status=1; }
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 9 python3 "$SCRIPT" >"$LOG_DIR/sanitize_$tool.log" 2>&1 &
done
for tool in memcheck racecheck; do
  wait -n
done
for tool in memcheck racecheck; do
  summary=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|Error|finished' "$LOG_DIR/sanitize_$tool.log" | head -4 | tr '\n' ' ')
  echo "compute-sanitizer $tool: $summary"
  grep -q "sanitized run finished" "$LOG_DIR/sanitize_$tool.log" || status=1
  grep -qE "ERROR SUMMARY: [1-9]|RACECHECK SUMMARY: [1-9]|[1-9][0-9]* errors" "$LOG_DIR/sanitize_$tool.log" && status=1
done
rm -f "$SCRIPT"
exit $status
