"""Print the numba backend's CPU figures as a table: G state updates/s and the ratio to the PyTorch loop.

Batch 1, dim 1536, dstate 16, float32 (delta_softplus, z, D, delta_bias), seqlen 1024
and 4096: forward, forward+backward (``scan_with_vjp`` then its ``vjp``: the backward
starts from the forward's checkpoints), and one decoding step at batch 1 (the kernel
alone, the backend's wrapper, and ``portassm.scan_step`` with its checks). The PyTorch loop
is ``benchmarks/baselines.py``'s HF-style sequential scan, timed in the same run.
Times are the median of ``--repeat`` calls after one warm-up call (compilation or the
disk cache is never timed, except by ``--first-call``)::

    python scripts/bench_numba_table.py                 # the table
    python scripts/bench_numba_table.py --threads 1     # one thread
    python scripts/bench_numba_table.py --first-call    # also: first call in a fresh process, cold and warm cache
    python scripts/bench_numba_table.py --torch-backward # also the PyTorch loop's forward+backward (slow)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import portassm
from portassm.bench import Size, make_problem, make_step_problem

DIM, DSTATE = 1536, 16


def median_time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def problem(seqlen: int) -> dict:
    p = {k: v.astype(np.float32) for k, v in make_problem(Size(1, DIM, seqlen, DSTATE)).items()}
    return {**p, "delta_softplus": True}


def torch_loop(seqlen: int, repeat: int, backward: bool) -> tuple[float | None, float | None]:
    try:
        import torch
        from baselines import sequential_scan
    except ImportError:
        return None, None
    p = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in problem(seqlen).items()}
    with torch.no_grad():
        fwd = median_time(lambda: sequential_scan(**p), repeat)
    if not backward:
        return fwd, None
    for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"):
        p[name].requires_grad_(True)
    dout = torch.randn(p["u"].shape)
    both = median_time(lambda: sequential_scan(**p).backward(dout), max(1, repeat // 2))
    return fwd, both


FIRST_CALL = """
import time, numpy as np, portassm
from portassm.bench import Size, make_problem
p = {k: v.astype(np.float32) for k, v in make_problem(Size(1, 1536, 1024, 16)).items()}
portassm.set_backend("numba")
t = time.perf_counter(); portassm.scan(**p, delta_softplus=True); fwd = time.perf_counter() - t
t = time.perf_counter(); portassm.scan_with_vjp(**p, delta_softplus=True)[1](p["u"]); bwd = time.perf_counter() - t
print(f"{fwd:.2f} {bwd:.2f}")
"""


def first_call() -> None:
    """First calls in fresh processes, empty cache then the cache the first run wrote: scan, then scan_with_vjp + vjp."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONPATH": str(ROOT)}
        for label in ("cold cache", "warm cache"):
            out = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True, check=True)
            fwd, bwd = out.stdout.split()
            print(f"first call in a fresh process, {label}: scan {fwd} s, scan_with_vjp + vjp {bwd} s (float32, mamba, selective)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="numba threads (default: numba's, NUMBA_NUM_THREADS)")
    parser.add_argument("--repeat", type=int, default=7, help="timed calls per figure (default 7)")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--first-call", action="store_true", help="also time first calls in fresh processes")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch loop")
    parser.add_argument("--torch-backward", action="store_true", help="also time the PyTorch loop's backward (slow)")
    args = parser.parse_args()

    options = {} if args.threads is None else {"threads": args.threads}
    backend = portassm.set_backend("numba", **options)
    print(backend.describe(), f"; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\nbatch 1, dim {DIM}, dstate {DSTATE}, float32; G = 1e9 state updates (batch*dim*seqlen*dstate) per second")
    head = f"{'seqlen':>6} | {'numba fwd ms':>12} {'G/s':>6} | {'torch loop ms':>13} {'G/s':>6} | {'ratio':>6} | " \
           f"{'numba f+b ms':>12} {'f+b / f':>7} | {'torch f+b ms':>12} {'ratio':>6}"
    print(head)
    print("-" * len(head), flush=True)
    for seqlen in args.seqlens:
        p = problem(seqlen)
        updates = DIM * seqlen * DSTATE
        dout = np.random.default_rng(1).standard_normal(p["u"].shape).astype(np.float32)
        fwd = median_time(lambda p=p: portassm.scan(**p), args.repeat)
        both = median_time(lambda p=p, dout=dout: portassm.scan_with_vjp(**p)[1](dout), max(3, args.repeat // 2))
        t_fwd, t_both = torch_loop(seqlen, max(1, args.repeat // 3), args.torch_backward) if not args.no_torch else (None, None)
        tf = f"{t_fwd * 1e3:13.1f} {updates / t_fwd / 1e9:6.3f}" if t_fwd else f"{'n/a':>13} {'':>6}"
        ratio = f"{t_fwd / fwd:6.1f}" if t_fwd else f"{'n/a':>6}"
        tb = f"{t_both * 1e3:12.1f} {t_both / both:6.1f}" if t_both else f"{'n/a':>12} {'':>6}"
        print(f"{seqlen:6d} | {fwd * 1e3:12.2f} {updates / fwd / 1e9:6.2f} | {tf} | {ratio} | "
              f"{both * 1e3:12.2f} {both / fwd:7.2f} | {tb}", flush=True)

    s = {k: v.astype(np.float32) for k, v in make_step_problem(Size(1, DIM, 1, DSTATE)).items()}
    step_ops = median_time(lambda: portassm.scan_step(**s, dt_softplus=True), 2000)
    backend_args = (s["state"], s["x"], s["dt"], s["A"], s["B"][:, None], s["C"][:, None], s["D"], s["z"], s["dt_bias"], True, "mamba")
    step_backend = median_time(lambda: backend.scan_step(*backend_args), 2000)
    from portassm.backends import numba_cpu

    y, new_state = np.empty((1, DIM), np.float32), np.empty((1, DIM, DSTATE), np.float32)
    kernel_args = (*backend_args[:9], True, True, DIM, DIM, y, new_state)
    step_kernel = median_time(lambda: numba_cpu._SCAN_STEP_SERIAL[0](*kernel_args), 2000)  # what runs at this size
    print(f"\nscan_step, batch 1, dim {DIM} (median): {step_ops * 1e6:.1f} us through portassm.scan_step, "
          f"{step_backend * 1e6:.1f} us calling the backend directly, {step_kernel * 1e6:.1f} us the kernel alone "
          f"(checks: {(step_ops - step_backend) * 1e6:.1f} us, the backend's wrapper: {(step_backend - step_kernel) * 1e6:.1f} us)")
    if args.first_call:
        first_call()


if __name__ == "__main__":
    main()
