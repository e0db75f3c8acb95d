"""Where a scan call's host time goes on CUDA tensors (torch backend): forward, forward+backward.

Host microseconds per call over calls back to back (``time.perf_counter``, the GPU's queue
left to run), then a cProfile of each, sorted by own time; the two launch paths
(``direct_launch`` False, True) A/B in one process; first the host's pace (a torch
``add_``) and any synchronisation one call makes (torch's sync debug mode warns of it).

    python3 benchmarks/scan_host.py [batch dim seqlen dstate] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

import torch

import portassm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_torch import host_back_to_back, host_us, inputs

ALLOCATOR_EVENTS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("size", nargs="*", type=int, default=[8, 1536, 2048, 16])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--torch-profile", action="store_true", help="torch's profiler over 10 forward+backward calls instead"
    )
    args = parser.parse_args()
    batch, dim, seqlen, _ = args.size
    dtype = getattr(torch, args.dtype)
    portassm.set_backend("torch")
    dev = "cuda"

    t, tg = inputs(*args.size, dtype), inputs(*args.size, dtype, requires_grad=True)
    dout = torch.randn(batch, dim, seqlen, device=dev, dtype=dtype)

    def fwd():
        with torch.no_grad():
            portassm.scan(**t, delta_softplus=True)

    def fwd_bwd():
        for v in tg.values():
            v.grad = None
        portassm.scan(**tg, delta_softplus=True).backward(dout)

    # the host's pace for scale: one small torch launch
    y = torch.zeros(1, 1536, device=dev)
    print(f"host's pace: {host_back_to_back(lambda: y.add_(1.0)):.1f} µs of host time a torch add_", flush=True)
    # a call that waits on the GPU (a synchronising copy or item) would show here as a warning
    torch.cuda.set_sync_debug_mode("warn")
    fwd()
    fwd_bwd()
    torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    from portassm.backends import torch_triton

    for direct in (False, True, False, True):  # the launch paths A/B in one process
        torch_triton.configure(direct_launch=direct)
        print(
            f"direct_launch={direct!s:5s}: host µs a call from an idle GPU (median of 20): "
            f"forward {host_us(fwd):.0f}, forward+backward {host_us(fwd_bwd):.0f}",
            flush=True,
        )
    split = []  # forward with autograd, then backward, from an idle GPU
    for _ in range(20):
        for v in tg.values():
            v.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = portassm.scan(**tg, delta_softplus=True)
        t1 = time.perf_counter()
        out.backward(dout)
        t2 = time.perf_counter()
        split.append(((t1 - t0) * 1e6, (t2 - t1) * 1e6))
        del out
    torch.cuda.synchronize()
    print(
        f"host time from an idle GPU: forward with autograd {statistics.median(a for a, _ in split):.0f} µs, "
        f"backward {statistics.median(b for _, b in split):.0f} µs",
        flush=True,
    )
    if args.torch_profile:  # torch's profiler: host time of each op and autograd node
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                fwd_bwd()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top), flush=True)
        return
    for name, fn in (("forward", fwd), ("forward+backward", fwd_bwd)):
        calls = 20
        before = torch.cuda.memory_stats()
        host = host_back_to_back(fn, calls=calls)
        after = torch.cuda.memory_stats()
        alone = host_us(fn, calls=calls)  # each call from an idle GPU: no queue to wait on
        print(f"{name}: {alone:.0f} µs of host time a call from an idle GPU (median of {calls})")
        # the caching allocator going back to the driver (cudaMalloc / cudaFree, which waits
        # for the device) shows as device allocations, frees or retries during the calls
        moved = {k: after.get(k, 0) - before.get(k, 0) for k in ALLOCATOR_EVENTS}
        print(
            f"{name}: {host:.0f} µs of host time a call back to back; allocator over {calls} calls: {moved}", flush=True
        )
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
