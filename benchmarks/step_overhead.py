"""Where a decode step's host time goes: ``portassm.scan_step`` against the backend call.

Per backend given (torch, cupy; CUDA only): microseconds per call over 2000 calls back
to back (``time.perf_counter``, one synchronisation at the end), for the argument checks
alone, the public call and the backend call, then a cProfile of the public call.

    python3 benchmarks/step_overhead.py torch cupy
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

import numpy as np

import portassm
from portassm import checks
from portassm.backend import get_backend


def per_call_us(fn, sync, n=2000):
    for _ in range(50):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - start) / n * 1e6


def main(names):
    rng = np.random.default_rng(0)
    dim, dstate = 1536, 16
    host = {
        "state": rng.standard_normal((1, dim, dstate)),
        "x": rng.standard_normal((1, dim)),
        "dt": rng.standard_normal((1, dim)),
        "A": -(rng.random((dim, dstate)) + 0.5),
        "B": rng.standard_normal((1, dstate)),
        "C": rng.standard_normal((1, dstate)),
        "D": rng.standard_normal(dim),
        "z": rng.standard_normal((1, dim)),
        "dt_bias": rng.random(dim),
    }
    for name in names:
        one_backend(name, host)


def one_backend(name, host):
    portassm.set_backend(name)
    backend = get_backend()
    mod = backend.module
    a = {k: mod.asarray(v.astype(np.float32)) for k, v in host.items()}
    args = (a["state"], a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"], a["dt_bias"])
    if name == "torch":
        import torch

        sync = torch.cuda.synchronize
    else:
        import cupy

        sync = cupy.cuda.Device().synchronize
    B3, C3 = a["B"][:, None], a["C"][:, None]
    portassm.scan_step(*args, True)
    rows = {
        "checks.native_step_args": lambda: checks.native_step_args(backend, *args, "mamba"),
        "portassm.scan_step": lambda: portassm.scan_step(*args, True),
        "backend.scan_step": lambda: backend.scan_step(
            a["state"], a["x"], a["dt"], a["A"], B3, C3, a["D"], a["z"], a["dt_bias"], True, "mamba"
        ),
    }
    for what, fn in rows.items():
        print(f"{name:6s} {what:26s} {per_call_us(fn, sync):8.1f} us/call")
    if name == "torch":  # the step's direct launch against Triton's own, back to back and by do_bench
        import triton

        from portassm.backends import torch_triton

        for direct in (True, False, True):
            torch_triton.configure(direct_launch=direct)
            fn = rows["backend.scan_step"]
            bench = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
            print(
                f"{name:6s} direct_launch={direct!s:5s}: {per_call_us(fn, sync):8.1f} us/call back to back, "
                f"{bench:6.1f} us by do_bench"
            )
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(500):
        portassm.scan_step(*args, True)
    prof.disable()
    sync()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main(sys.argv[1:] or ["torch", "cupy"])
