#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck over every kernel of the CuPy backend, at
# small sizes: forward (whole and chunked, with and without checkpoints), backward
# (whole and chunked, recomputing or reusing checkpoints), the chunk combine, the
# decoding step (allocating, and in place); both layouts (one state per lane: dstate <= 32; split:
# dstate 33), shared-memory B/C tiles (one and two groups per block) and direct reads
# (many groups), time-invariant B/C, float32, float64 and bfloat16; the backward with
# four states per lane (mamba, B and C selective), and the forward's and
# backward's fewer-states kernels forced.
# Run on the GPU machine, from the repository root:  bash scripts/sanitize_cupy.sh
# Exit status: non-zero when either tool reports an error.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
script="$(mktemp --suffix=.py)"
cat >"$script" <<'PY'
import numpy as np, cupy as cp, portassm
from portassm.backends import cupy_cuda
portassm.set_backend("cupy")
rng = np.random.default_rng(0)
def run(batch, dim, seqlen, dstate, bc_shape, dtype, chunk, method="mamba"):
    cupy_cuda.configure(chunk=chunk)
    f = lambda *s: cp.asarray(rng.standard_normal(s)).astype(dtype)
    u, z, dout = f(batch, dim, seqlen), f(batch, dim, seqlen), f(batch, dim, seqlen)
    delta = cp.asarray(rng.uniform(-3, 0.5, (batch, dim, seqlen))).astype(dtype)
    A = cp.asarray(-rng.uniform(0.3, 3, (dim, dstate)), dtype=cp.float32)
    B, C = f(*bc_shape), f(*bc_shape)
    D, bias = cp.ones(dim, cp.float32), cp.zeros(dim, cp.float32)
    h0 = cp.asarray(rng.standard_normal((batch, dim, dstate)), dtype=cp.float32)
    kw = dict(D=D, z=z, delta_bias=bias, delta_softplus=True, initial_state=h0, discretization=method)
    portassm.scan(u, delta, A, B, C, **kw, return_last_state=True)
    portassm.scan_vjp(dout, u, delta, A, B, C, **kw, dlast_state=h0)
    if len(bc_shape) != 2:
        Bt = B[..., 0] if len(bc_shape) == 3 else B[:, :, :, 0]
        Ct = C[..., 0] if len(bc_shape) == 3 else C[:, :, :, 0]
        portassm.scan_step(h0, u[..., 0], delta[..., 0], A, Bt, Ct, D, z[..., 0], bias, True, discretization=method)
        if dtype == "float32" and len(bc_shape) == 3:  # the backend's step into given arrays, the state in place
            y = cp.empty((batch, dim), dtype=cp.float32)
            cupy_cuda.scan_step(h0, u[..., 0], delta[..., 0], A, B[:, None, :, 0], C[:, None, :, 0], D, z[..., 0], bias,
                                True, method, out=(y, h0))
    portassm.scan_with_vjp(u, delta, A, B, C, **kw)[1](dout)  # the forward's checkpoints reused
    cp.cuda.runtime.deviceSynchronize()
    print("ran", batch, dim, seqlen, dstate, bc_shape, getattr(dtype, "__name__", dtype), chunk, method,
          cupy_cuda._options["layout"], cupy_cuda._defines, flush=True)
# the defaults (the lanes kernels where dstate <= 32, else split), then the split layout
# (chunked: its chunk pass and combine too)
for layout, chunks in ((None, (None, 32)), ("split", (32,))):
  cupy_cuda.configure(layout=layout)
  for chunk in chunks:
    run(2, 40, 70, 16, (2, 16, 70), "float32", chunk)              # one group, dim not a multiple of 32
    run(2, 96, 70, 5, (2, 2, 5, 70), "float64", chunk, "zoh")      # blocks spanning two groups
    run(1, 40, 50, 33, (1, 8, 33, 50), "float32", chunk, "bilinear")  # direct B/C reads, 8 states a thread
    run(2, 64, 45, 16, (64, 16), "float32", chunk)                 # time-invariant B, C
    run(2, 64, 70, 16, (2, 2, 16, 70), "float32", chunk, "zoh")    # one-state-per-lane backward, 2 groups
    run(2, 64, 72, 16, (2, 1, 16, 72), "float32", chunk)           # 16-byte B/C loads (seqlen % 4 == 0)
    run(2, 64, 70, 13, (2, 2, 13, 70), "float32", chunk)           # four states a lane backward: dstate 13, 2 groups
    run(2, 40, 70, 24, (2, 1, 24, 70), "float32", chunk)           # 32 lanes per channel
    run(2, 40, 70, 5, (2, 5, 70), "float32", chunk, "bilinear")    # dstate 5: lanes 5-7 and every second state unused
# the one-state-per-lane forward in place of the two-states-per-lane one (blocks inside
# one group, across two and three)
for defines in (("LS_PAIR=0", "BW_QUAD=0"), ("FW_QUAD=0",)):
    cupy_cuda._defines = defines
    cupy_cuda.configure(layout="lanes")
    for chunk in (None, 32):
        run(2, 64, 70, 16, (2, 2, 16, 70), "float32", chunk)
        run(2, 40, 72, 24, (2, 1, 24, 72), "float32", chunk)
        run(2, 12, 70, 16, (2, 3, 16, 70), "float32", chunk, "bilinear")
cupy_cuda._defines = ()
cupy_cuda.configure(layout=None)
# the four-states-per-lane forward's lean instance (5 blocks a multiprocessor), forced
cupy_cuda.configure(quad_wide=True)
for chunk in (None, 32):
    run(2, 64, 72, 16, (2, 2, 16, 72), "float32", chunk)
    run(2, 64, 70, 13, (2, 2, 13, 70), "float32", chunk)
cupy_cuda.configure(quad_wide=None)
try:
    import ml_dtypes
    run(2, 64, 70, 16, (2, 16, 70), ml_dtypes.bfloat16, None)
except TypeError as exc:
    print("bfloat16 skipped:", exc)
print("sanitize workload done")
PY
# the two tools side by side (each in its own process), their reports one after the other
status=0
for tool in memcheck racecheck; do
  (cd "$here" && compute-sanitizer --tool "$tool" --error-exitcode 7 python3 "$script" >"$script.$tool.log" 2>&1) &
  eval "pid_$tool=$!"
done
for tool in memcheck racecheck; do
  eval "wait \$pid_$tool" || status=1
  echo "== compute-sanitizer --tool $tool"
  cat "$script.$tool.log"
  rm -f "$script.$tool.log"
done
rm -f "$script"
exit $status
