"""Print the numba backend's CPU figures as a table: G state updates/s and the ratio to the PyTorch loop.

Batch 1, dim 1536, dstate 16, float32 (delta_softplus, z, D, delta_bias), seqlen 1024
and 4096: the forward (``portassm.scan``), forward+backward as training runs it
(``portassm.scan_with_vjp`` then its ``vjp``: the backward starts from the forward's
checkpoints, no forward is recomputed), the same through ``scan`` then ``scan_vjp``
(whose backward first rebuilds the checkpoints), and one decoding step at batch 1 (the
kernel alone on one thread and on two, the backend's wrapper, and ``portassm.scan_step``
with its checks). The PyTorch loop is ``benchmarks/baselines.py``'s HF-style sequential
scan, timed in the same run. Times are the median (and the best) of ``--repeat`` calls
after one warm-up call (compilation or the disk cache is never timed, except by
``--first-call``)::

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


def timings(fn, repeat: int) -> tuple[float, float]:
    """``(median, best)`` wall-clock seconds of ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def median_time(fn, repeat: int) -> float:
    return timings(fn, repeat)[0]


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
    print("fwd: portassm.scan; f+b: portassm.scan_with_vjp + its vjp (the training path: the backward starts from the")
    print("forward's checkpoints); scan+scan_vjp: the backward rebuilds the checkpoints first. ms: median (best)")
    head = f"{'seqlen':>6} | {'numba fwd ms':>15} {'G/s':>5} | {'torch loop ms':>13} {'G/s':>6} | {'ratio':>6} | " \
           f"{'f+b ms':>15} {'f+b / f':>7} | {'scan+scan_vjp':>13} {'/ f':>5} | {'torch f+b ms':>12} {'ratio':>6}"
    print(head)
    print("-" * len(head), flush=True)
    for seqlen in args.seqlens:
        p = problem(seqlen)
        updates = DIM * seqlen * DSTATE
        dout = np.random.default_rng(1).standard_normal(p["u"].shape).astype(np.float32)
        fwd, fwd_best = timings(lambda p=p: portassm.scan(**p), args.repeat)
        both, both_best = timings(lambda p=p, dout=dout: portassm.scan_with_vjp(**p)[1](dout), args.repeat)
        again = median_time(lambda p=p, dout=dout: (portassm.scan(**p), portassm.scan_vjp(dout, **p)), max(3, args.repeat // 2))
        t_fwd, t_both = torch_loop(seqlen, max(1, args.repeat // 3), args.torch_backward) if not args.no_torch else (None, None)
        tf = f"{t_fwd * 1e3:13.1f} {updates / t_fwd / 1e9:6.3f}" if t_fwd else f"{'n/a':>13} {'':>6}"
        ratio = f"{t_fwd / fwd:6.1f}" if t_fwd else f"{'n/a':>6}"
        tb = f"{t_both * 1e3:12.1f} {t_both / both:6.1f}" if t_both else f"{'n/a':>12} {'':>6}"
        print(f"{seqlen:6d} | {fwd * 1e3:7.2f} ({fwd_best * 1e3:5.2f}) {updates / fwd / 1e9:5.2f} | {tf} | {ratio} | "
              f"{both * 1e3:7.2f} ({both_best * 1e3:5.1f}) {both / fwd:7.2f} | {again * 1e3:13.2f} {again / fwd:5.2f} | {tb}",
              flush=True)

    s = {k: v.astype(np.float32) for k, v in make_step_problem(Size(1, DIM, 1, DSTATE)).items()}
    step_ops = timings(lambda: portassm.scan_step(**s, dt_softplus=True), 3000)
    backend_args = (s["state"], s["x"], s["dt"], s["A"], s["B"][:, None], s["C"][:, None], s["D"], s["z"], s["dt_bias"], True, "mamba")
    step_backend = timings(lambda: backend.scan_step(*backend_args), 3000)
    import numba

    from portassm.backends import numba_cpu

    y, new_state = np.empty((1, DIM), np.float32), np.empty((1, DIM, DSTATE), np.float32)
    kernel_args = (*backend_args[:9], True, True, DIM, DIM, y, new_state)
    serial = timings(lambda: numba_cpu._SCAN_STEP_SERIAL[0](*kernel_args), 3000)  # what runs at this size
    threads = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    parallel = timings(lambda: numba_cpu._SCAN_STEP[0](*kernel_args), 3000)  # blocks of 64 channels over the threads
    numba.set_num_threads(threads)
    us = lambda t: f"{t[0] * 1e6:.1f} ({t[1] * 1e6:.1f})"
    print(f"\nscan_step, batch 1, dim {DIM}, us, median (best): {us(step_ops)} through portassm.scan_step, "
          f"{us(step_backend)} calling the backend, kernel alone {us(serial)} on one thread (what runs), "
          f"{us(parallel)} the parallel kernel on {min(2, numba.config.NUMBA_NUM_THREADS)} threads "
          f"(checks: {(step_ops[0] - step_backend[0]) * 1e6:.1f} us, the backend's wrapper: "
          f"{(step_backend[0] - serial[0]) * 1e6:.1f} us)")
    if args.first_call:
        first_call()


if __name__ == "__main__":
    main()
