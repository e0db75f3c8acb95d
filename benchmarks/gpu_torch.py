"""GPU benchmark of the torch backend against the official mamba_ssm CUDA kernel's figures.

Run on the GPU machine (device tool): ``python benchmarks/gpu_torch.py``. Sizes and
options are those of ANCHORS.md's table: delta_softplus, z, D and delta_bias; A real
(dim, dstate); B, C (batch, dstate, seqlen). Times are ``triton.testing.do_bench``
medians on fresh random inputs (never zeros).

Each figure is also given as the fraction of its memory floor achieved: the fewest
bytes the operation must move over 3.0 TB/s (the copy bandwidth measured on the H100
in ANCHORS.md's run). Forward: read u, delta, z and write out (B, C are 1/dim of that).
Forward + backward: the forward's four, then read u, delta, z, dout and write du,
ddelta, dz (B, C, their gradients and the states' checkpoints not counted).
Peak memory of forward + backward is compared with the inputs, outputs and gradients.

Prints a markdown table (before the optional sweep); writes it to ``$OUT/torch_table.md`` when OUT is set.
Options: ``--sizes N,N`` (indices into SIZES), ``--sweep`` (the forward's layouts, prefetch,
warps, register caps and chunking; the backward's blocking, register cap and chunking, at
the first size and at batch 1), ``--quick`` (fewer repetitions), ``--rounds N`` (each size and dtype timed N times
round-robin on fresh inputs; the median of the medians, with their range), ``--graph`` (also the
host's microseconds a call and the forward and forward+backward replayed from a CUDA graph, which
takes the host's pace out of the figure), ``--precompile N`` (compile
every configuration the run will time in N processes first: Triton's disk cache then serves
the timed runs, so compiling stays out of the numbers and off the critical path),
``--only-precompile``, ``--gluon`` (the Gluon forward with 1 and 2 warps a program beside the Triton
one at each size and dtype: forward, then forward+backward through autograd),
``--gluon-variants`` (its warps, tile length, prefetch distance and register cap at each size of
``--sizes``; ``--only a|b`` keeps those whose label contains a or b),
``--bwd`` (forward+backward with the Triton backward and the Gluon one, 2 and 4 warps a program).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import portassm
from portassm.backends import torch_triton

BANDWIDTH = 3.0e12  # bytes/s, the H100's copy bandwidth of ANCHORS.md

SIZES = [(8, 1536, 2048, 16), (4, 5120, 2048, 16), (1, 1536, 16384, 16), (64, 1536, 256, 16)]

#: official mamba_ssm selective_scan_fn on the H100 (ANCHORS.md): (forward ms, forward+backward ms)
OFFICIAL = {
    ((8, 1536, 2048, 16), "float32"): (0.882, 2.946),
    ((8, 1536, 2048, 16), "bfloat16"): (0.451, 2.295),
    ((4, 5120, 2048, 16), "float32"): (1.451, 4.833),
    ((4, 5120, 2048, 16), "bfloat16"): (0.738, 3.764),
    ((1, 1536, 16384, 16), "float32"): (1.005, 3.243),
    ((1, 1536, 16384, 16), "bfloat16"): (0.567, 2.588),
    ((64, 1536, 256, 16), "float32"): (0.692, 3.006),
    ((64, 1536, 256, 16), "bfloat16"): (0.436, 2.570),
}
OFFICIAL_STEP_US = 51.0  # the official Triton selective_state_update, batch 1, dim 1536

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

#: the backend's options as shipped (each sweep variant changes some of them)
DEFAULTS = dict(torch_triton._options)


def inputs(batch, dim, seqlen, dstate, dtype, requires_grad=False, invariant=False):
    """Random inputs in the ranges real models use, as ANCHORS.md's runs (``invariant``: B, C (dim, dstate))."""
    dev = "cuda"
    t = {
        "u": torch.randn(batch, dim, seqlen, device=dev, dtype=dtype),
        "delta": (torch.rand(batch, dim, seqlen, device=dev) * 3.5 - 3.0).to(dtype),
        "A": -(torch.rand(dim, dstate, device=dev) * 2.7 + 0.3),
        "B": torch.randn(batch, dstate, seqlen, device=dev, dtype=dtype),
        "C": torch.randn(batch, dstate, seqlen, device=dev, dtype=dtype),
        "D": torch.randn(dim, device=dev),
        "z": torch.randn(batch, dim, seqlen, device=dev, dtype=dtype),
        "delta_bias": torch.rand(dim, device=dev) - 0.5,
    }
    if invariant:  # a diagnostic: no per-step B, C rows to load
        t["B"], t["C"] = torch.randn(dim, dstate, device=dev), torch.randn(dim, dstate, device=dev)
    if requires_grad:
        for v in t.values():
            v.requires_grad_(True)
    return t


def floor_ms(size, dtype, passes):
    batch, dim, seqlen, _ = size
    return passes * batch * dim * seqlen * torch.finfo(dtype).bits // 8 / BANDWIDTH * 1e3


def bench(fn, quick):
    # one call first: do_bench sizes its repetitions from its first calls, which must not
    # include compiling the kernels
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median")


_GRAPH = [False]  # --graph: also host time per call and CUDA-graph replays
_EXTRA: dict = {}


def host_us(fn, no_grad=False, calls=20):
    """Host microseconds a call (median), each call made from an idle GPU: the host's own
    time, with no launch queue to wait on."""
    times = []
    with torch.no_grad() if no_grad else contextlib.nullcontext():
        fn()
        for _ in range(calls):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def graphed(fn, quick, no_grad=False):
    """ms per replay of ``fn`` captured in a CUDA graph (do_bench over replays: one launch each,
    so the host's pace stays out), or None when capture fails (the reason printed)."""
    try:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
        return bench(graph.replay, quick)
    except Exception as exc:  # noqa: BLE001 -- a capture that fails is reported, not hidden
        print(f"CUDA graph capture failed: {type(exc).__name__}: {exc}", flush=True)
        return None


def time_scan(size, dtype_name, quick, with_backward=True, extras=True):
    dtype = DTYPES[dtype_name]
    t = inputs(*size, dtype, invariant=_INVARIANT[0])
    with torch.no_grad():
        fwd = bench(lambda: portassm.scan(**t, delta_softplus=True), quick)
    if not with_backward:
        return fwd, float("nan"), 0, 0
    tg = inputs(*size, dtype, requires_grad=True)
    dout = torch.randn(size[0], size[1], size[2], device="cuda", dtype=dtype)

    def fwd_bwd():
        for v in tg.values():
            v.grad = None
        portassm.scan(**tg, delta_softplus=True).backward(dout)

    both = bench(fwd_bwd, quick)
    if _GRAPH[0] and extras:
        _EXTRA[(size, dtype_name)] = {
            "host_f": host_us(lambda: portassm.scan(**t, delta_softplus=True), no_grad=True),
            "host_b": host_us(fwd_bwd),
            "graph_f": graphed(lambda: portassm.scan(**t, delta_softplus=True), quick, no_grad=True),
            "graph_b": graphed(fwd_bwd, quick),
        }
    # peak memory of one forward + backward: what it allocates on top of its inputs and
    # dout, plus those, against inputs + dout + out + gradients
    t.clear()  # free the forward's inputs
    for v in tg.values():
        v.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    nbytes = lambda x: x.numel() * x.element_size()
    given = sum(nbytes(v) for v in tg.values()) + nbytes(dout)
    peak = torch.cuda.max_memory_allocated() - held + given
    io = given + sum(nbytes(v) for v in tg.values()) + nbytes(dout)  # + gradients + out
    return fwd, both, peak, io


def time_step(quick, reps=True):
    """One decode step at batch 1, dim 1536, dstate 16: public API, backend call, CUDA graph of steps."""
    dim, dstate = 1536, 16
    dev = "cuda"
    state = torch.randn(1, dim, dstate, device=dev)
    x, dt, z = (torch.randn(1, dim, device=dev) for _ in range(3))
    A = -(torch.rand(dim, dstate, device=dev) + 0.5)
    B, C = torch.randn(1, 1, dstate, device=dev), torch.randn(1, 1, dstate, device=dev)
    D, bias = torch.randn(dim, device=dev), torch.rand(dim, device=dev)
    if not reps:  # compile only
        portassm.scan_step(state, x, dt, A, B[:, 0], C[:, 0], D, z, bias, True)
        torch_triton.scan_step(state, x, dt, A, B, C, D, z, bias, True, "mamba")
        return None
    public_fn = lambda: portassm.scan_step(state, x, dt, A, B[:, 0], C[:, 0], D, z, bias, True)
    backend_fn = lambda: torch_triton.scan_step(state, x, dt, A, B, C, D, z, bias, True, "mamba")
    public = bench(public_fn, quick) * 1e3
    backend = bench(backend_fn, quick) * 1e3
    # a CUDA graph of 64 steps, each feeding its state to the next
    steps = 64
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            torch_triton.scan_step(state, x, dt, A, B, C, D, z, bias, True, "mamba")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            _, new = torch_triton.scan_step(state, x, dt, A, B, C, D, z, bias, True, "mamba")
            state.copy_(new)
    graphed = bench(graph.replay, quick) * 1e3 / steps
    # host µs a call, back to back (do_bench's events see the host only where its time a call
    # outgrows the cache flush do_bench launches before each call); beside them the host's
    # pace: one ATen elementwise launch, one empty Triton kernel through Triton's launcher
    y = torch.zeros(1, dim, device=dev)
    host = {
        "public": host_back_to_back(public_fn),
        "backend": host_back_to_back(backend_fn),
        "aten": host_back_to_back(lambda: y.add_(1.0)),
        "empty": host_back_to_back(lambda: _empty_kernel[(1,)](y)),
    }
    return public, backend, graphed, host


def host_back_to_back(fn, calls=500):
    """Host microseconds a call over ``calls`` calls back to back (one synchronisation at the end)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


@triton.jit
def _empty_kernel(p):
    pass


#: the sweep: (name, options, size index, dtypes, with forward+backward)
SWEEP = [
    ("default", {}, 0, ("float32", "bfloat16"), True),
    ("prefetch=0", {"prefetch": 0}, 0, ("float32",), False),
    ("prefetch=8", {"prefetch": 8}, 0, ("float32",), False),
    ("block_d=64 (8 warps)", {"block_d": 64}, 0, ("float32",), False),
    ("block_d=16 (2 warps)", {"block_d": 16}, 0, ("float32",), False),
    ("min_warps=16/SM (2 chunks)", {"min_warps": 16 * 132}, 0, ("float32", "bfloat16"), False),
    ("steps=4 (one channel a thread), prefetch=0", {"steps": 4, "prefetch": 0}, 0, ("float32", "bfloat16"), False),
    ("steps=4, prefetch=0, no chunks", {"steps": 4, "prefetch": 0, "min_warps": 1}, 0, ("float32",), False),
    ("bwd_block_d=32", {"bwd_block_d": 32}, 0, ("float32", "bfloat16"), True),
    ("bwd_min_warps=1 (no chunks)", {"bwd_min_warps": 1}, 0, ("float32",), True),
    ("bwd_min_warps=32/SM", {"bwd_min_warps": 32 * 132}, 0, ("float32",), True),
    ("bwd_maxnreg=168", {"bwd_maxnreg": 168}, 0, ("float32",), True),
    ("default", {}, 1, ("float32",), True),
    ("min_warps=16/SM", {"min_warps": 16 * 132}, 2, ("float32",), True),
    ("min_warps=4/SM", {"min_warps": 4 * 132}, 2, ("float32",), True),
    ("steps=4, prefetch=0", {"steps": 4, "prefetch": 0}, 2, ("float32",), False),
    ("diagnostic: B, C time-invariant", {"invariant": True}, 0, ("float32",), False),
]


_INVARIANT = [False]  # the sweep's diagnostic rows: time-invariant B, C

#: the Gluon forward's variants (``--gluon-variants``), first size
GLUON_VARIANTS = [
    ("gluon, 2 warps (default)", {"fwd_kernel": "gluon", "gluon_warps": 2}),
    ("gluon, 4 warps", {"fwd_kernel": "gluon", "gluon_warps": 4}),
    ("gluon, 8 warps", {"fwd_kernel": "gluon", "gluon_warps": 8}),
    ("gluon, 8-step tiles", {"fwd_kernel": "gluon", "gluon_steps": 8}),
    ("gluon, L2 prefetch 64 steps ahead", {"fwd_kernel": "gluon", "prefetch": 32}),
    ("gluon, no prefetch", {"fwd_kernel": "gluon", "prefetch": 0}),
    (
        "gluon, partial sums through shared memory unswizzled",
        {"fwd_kernel": "gluon", "gluon_shfl_sum": False, "gluon_swizzle": False},
    ),
    (
        "gluon, lane sums through shared memory, swizzled (gluon_shfl_sum=False)",
        {"fwd_kernel": "gluon", "gluon_shfl_sum": False},
    ),
    (
        "gluon, lane sums through shared memory, 1 warp",
        {"fwd_kernel": "gluon", "gluon_shfl_sum": False, "gluon_warps": 1},
    ),
    ("gluon, shuffles, 32-step tiles", {"fwd_kernel": "gluon", "gluon_steps": 32}),
    ("gluon, shuffles, 1 warp", {"fwd_kernel": "gluon", "gluon_warps": 1}),
    ("gluon, B and C packed in float32 (gluon_bc16=False)", {"fwd_kernel": "gluon", "gluon_bc16": False}),
    ("gluon, 32-step tiles (forward alone; 16 before the backward)", {"fwd_kernel": "gluon", "gluon_steps": 32}),
    ("gluon, 2 channels a lane (gluon_cpt=2)", {"fwd_kernel": "gluon", "gluon_cpt": 2}),
    ("gluon, 2 channels a lane, 1 warp", {"fwd_kernel": "gluon", "gluon_cpt": 2, "gluon_warps": 1}),
    ("gluon, 2 channels a lane, 4 warps", {"fwd_kernel": "gluon", "gluon_cpt": 2, "gluon_warps": 4}),
    ("gluon, 104 registers (18 warps a multiprocessor)", {"fwd_kernel": "gluon", "gluon_maxnreg": 104}),
    ("gluon, 96 registers (20 warps a multiprocessor)", {"fwd_kernel": "gluon", "gluon_maxnreg": 96}),
]


def _configured(options):
    """The backend options for one job (the defaults, then ``options``; ``invariant``: B, C (dim, dstate))."""
    options = dict(options)
    _INVARIANT[0] = options.pop("invariant", False)
    torch_triton.configure(**{**DEFAULTS, **options})


def _compile_one(job):
    """Run one job once so that its kernels land in Triton's on-disk cache (a worker process)."""
    kind, options, i, dtype_name, both = job
    portassm.set_backend("torch")
    _configured(options)
    if kind == "step":
        time_step(quick=True, reps=False)
        return job
    size = SIZES[i]
    t = inputs(*size, DTYPES[dtype_name], requires_grad=both, invariant=_INVARIANT[0])
    with torch.no_grad():
        portassm.scan(**t, delta_softplus=True)
    if both:
        portassm.scan(**t, delta_softplus=True).sum().backward()
    torch.cuda.synchronize()
    return job


def precompile(jobs, workers):
    """Compile every kernel configuration of ``jobs`` in parallel processes (they share the disk cache)."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    t0 = time.time()
    failed = 0
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
        futures = [pool.submit(_compile_one, job) for job in jobs]
        for f in futures:
            try:
                f.result()
            except Exception as e:  # noqa: BLE001 - the timed run reports it again
                failed += 1
                print(f"precompile failed: {e!r}"[:300], flush=True)
    print(f"precompiled {len(jobs)} configurations in {time.time() - t0:.0f} s ({failed} failed)", flush=True)


def gluon_variants(only=""):
    """GLUON_VARIANTS whose label contains one of the |-separated parts of ``only`` (all when empty)."""
    parts = [p for p in only.split("|") if p] or [""]
    return [v for v in GLUON_VARIANTS if any(p in v[0] for p in parts)]


def jobs_of(which, sweep, gluon=False, variants=(), bwd=False):
    jobs = [("step", {}, -1, "float32", False)]
    jobs += [("scan", {}, i, d, True) for i in which for d in DTYPES]
    if sweep:
        jobs += [("scan", opts, i, d, both) for _, opts, i, dts, both in SWEEP for d in dts]
    if gluon:
        kernels = ({"fwd_kernel": "triton"}, {"fwd_kernel": "gluon", "gluon_warps": 1})
        kernels += ({"fwd_kernel": "gluon", "gluon_warps": 2},)
        jobs += [("scan", k, i, d, True) for i in which for d in DTYPES for k in kernels]
    jobs += [("scan", opts, i, d, False) for i in which for _, opts in variants for d in DTYPES]
    if bwd:
        jobs += [("scan", k, i, d, True) for i in which for d in DTYPES for _, k in BWD_KERNELS]
    return jobs


def gluon_compare(which, quick, variants, variant_sizes=(0,)):
    """The Triton and the Gluon forward side by side (same run), then fwd+bwd with each forward."""
    kernels = [("triton", {"fwd_kernel": "triton"}), ("gluon, 1 warp", {"fwd_kernel": "gluon", "gluon_warps": 1})]
    kernels += [("gluon, 2 warps", {"fwd_kernel": "gluon", "gluon_warps": 2})]
    rows = [(SIZES[i], d, name, opts, False) for i in which for d in DTYPES for name, opts in kernels]
    rows += [(SIZES[i], d, name, opts, True) for i in which for d in DTYPES for name, opts in kernels]
    if variants:
        rows += [(SIZES[i], d, name, opts, False) for i in variant_sizes for name, opts in variants for d in DTYPES]
    return compare(rows, quick, "forward")


#: the backward kernels that ``--bwd`` times side by side
BWD_KERNELS = [
    ("triton", {"bwd_kernel": "triton"}),
    ("gluon, 2 warps", {"bwd_kernel": "gluon", "gluon_bwd_warps": 2}),
    ("gluon, 4 warps", {"bwd_kernel": "gluon", "gluon_bwd_warps": 4}),
    ("gluon, 2 warps, 168 registers", {"bwd_kernel": "gluon", "gluon_bwd_warps": 2, "gluon_bwd_maxnreg": 168}),
    ("gluon, 2 warps, 128 registers", {"bwd_kernel": "gluon", "gluon_bwd_warps": 2, "gluon_bwd_maxnreg": 128}),
    ("gluon, 4 warps, 128 registers", {"bwd_kernel": "gluon", "gluon_bwd_warps": 4, "gluon_bwd_maxnreg": 128}),
    ("gluon, 4 warps, partial sums unswizzled", {"bwd_kernel": "gluon", "gluon_bwd_warps": 4, "gluon_swizzle": False}),
]


def bwd_compare(which, quick, only=""):
    """Forward+backward through autograd with the Triton and the Gluon backward, same run
    (``only``: those whose label contains one of its |-separated parts)."""
    parts = [p for p in only.split("|") if p] or [""]
    kernels = [(name, opts) for name, opts in BWD_KERNELS if any(p in name for p in parts)]
    rows = [(SIZES[i], d, name, opts, True) for i in which for d in DTYPES for name, opts in kernels]
    return compare(rows, quick, "backward")


def compare(rows, quick, what):
    """Time (size, dtype, name, options, with backward) rows, one table line each."""
    lines = [
        f"| batch, dim, seqlen, dstate | dtype | {what} | fwd ms (vs official) | fwd+bwd ms (vs official) |",
        "|---|---|---|---|---|",
    ]
    t0 = time.time()
    for size, dtype_name, name, opts, both in rows:
        _configured(opts)
        try:
            fwd, both_ms, _, _ = time_scan(size, dtype_name, quick, both)
        except Exception as e:  # noqa: BLE001 - one failing variant must not stop the others
            lines.append(f"| {', '.join(map(str, size))} | {dtype_name} | {name} | failed: {e!r} |"[:400])
            print(lines[-1], flush=True)
            continue
        off_f, off_b = OFFICIAL[(size, dtype_name)]
        b_txt = f"{both_ms:.3f} ({both_ms / off_b:.2f}x)" if not math.isnan(both_ms) else "-"
        lines.append(
            f"| {', '.join(map(str, size))} | {dtype_name} | {name} | {fwd:.3f} ({fwd / off_f:.2f}x) | {b_txt} |"
        )
        print(lines[-1], f"[{time.time() - t0:.0f} s]", flush=True)
    _configured({})
    return lines


def run_sizes(which, quick, rounds=1):
    """Each size and dtype timed ``rounds`` times, round-robin over the sizes, on fresh inputs
    each time: the median of the rounds' medians is reported, with their range."""
    times = {}
    peaks = {}
    for r in range(rounds):
        for i in which:
            size = SIZES[i]
            for dtype_name in ("float32", "bfloat16"):
                t0 = time.time()
                # the graph replays and host times (--graph) once, in the last round
                fwd, both, peak, io = time_scan(size, dtype_name, quick, extras=r == rounds - 1)
                times.setdefault((size, dtype_name), []).append((fwd, both))
                peaks[(size, dtype_name)] = (peak, io)
                off_f, off_b = OFFICIAL[(size, dtype_name)]
                print(
                    f"{'' if rounds == 1 else f'round {r + 1}: '}{size} {dtype_name}: fwd {fwd:.3f} ms "
                    f"({fwd / off_f:.2f}x official), fwd+bwd {both:.3f} ms ({both / off_b:.2f}x), peak "
                    f"{peak / 2**20:.0f} MiB vs io {io / 2**20:.0f} MiB [{time.time() - t0:.0f} s incl. compile]",
                    flush=True,
                )
    rows = []
    for (size, dtype_name), runs in times.items():
        fwds, boths = [f for f, _ in runs], [b for _, b in runs]
        off_f, off_b = OFFICIAL[(size, dtype_name)]
        dtype = DTYPES[dtype_name]
        rows.append(
            {
                "size": size,
                "dtype": dtype_name,
                "fwd": statistics.median(fwds),
                "both": statistics.median(boths),
                "fwd_range": (min(fwds), max(fwds)),
                "both_range": (min(boths), max(boths)),
                "off_f": off_f,
                "off_b": off_b,
                "floor_f": floor_ms(size, dtype, 4),
                "floor_b": floor_ms(size, dtype, 11),
                "peak": peaks[(size, dtype_name)][0],
                "io": peaks[(size, dtype_name)][1],
            }
        )
    return rows


def sweep(quick):
    """Each SWEEP variant: forward (and forward+backward where marked), chunks of forward and backward."""
    lines = []
    for name, options, i, dtypes, both in SWEEP:
        size = SIZES[i]
        _configured(options)
        lay = torch_triton._layout(size[0], size[1], size[2], size[1], torch.device("cuda"), size[3])
        blay = torch_triton._bwd_layout(size[0], size[1], size[2], size[1], torch.device("cuda"), size[3])
        for dtype_name in dtypes:
            try:
                fwd, both_ms, _, _ = time_scan(size, dtype_name, quick, both)
            except Exception as e:  # noqa: BLE001 - one failing variant must not stop the others
                lines.append(f"| {name} | {size} {dtype_name} | failed: {e!r} |"[:400])
                print(lines[-1], flush=True)
                continue
            off_f, off_b = OFFICIAL[(size, dtype_name)]
            b_txt = f"{both_ms:.3f} ({both_ms / off_b:.2f}x)" if both else "-"
            lines.append(
                f"| {name} | {', '.join(map(str, size))} {dtype_name} | {lay['chunks']} / {blay['chunks']} "
                f"| {fwd:.3f} ({fwd / off_f:.2f}x) | {b_txt} |"
            )
            print(lines[-1], flush=True)
    _configured({})
    return [
        "| variant | size, dtype | chunks fwd / bwd | forward ms (vs official) | fwd+bwd ms (vs official) |",
        "|---|---|---|---|---|",
        *lines,
    ]


def table(rows, step):
    out = [
        (
            f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
            "do_bench medians; ratio = ours / official mamba_ssm (ANCHORS.md); floor = bytes / 3.0 TB/s."
        ),
        "",
        (
            "| batch, dim, seqlen, dstate | dtype | fwd ms | vs official | of floor | fwd+bwd ms | vs official | of floor "
            "| peak fwd+bwd / (in+out+grads) |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    spread = lambda lo_hi: "" if lo_hi[0] == lo_hi[1] else f" ({lo_hi[0]:.3f}–{lo_hi[1]:.3f})"
    for r in rows:
        out.append(
            f"| {', '.join(map(str, r['size']))} | {r['dtype']} | {r['fwd']:.3f}{spread(r['fwd_range'])} "
            f"| {r['fwd'] / r['off_f']:.2f}x | {r['floor_f'] / r['fwd']:.0%} | {r['both']:.3f}{spread(r['both_range'])} "
            f"| {r['both'] / r['off_b']:.2f}x | {r['floor_b'] / r['both']:.0%} | {r['peak'] / 2**20:.0f} / {r['io'] / 2**20:.0f} MiB |"
        )
    if _EXTRA:
        fmt = lambda v: "capture failed" if v is None else f"{v:.3f}"
        out += [
            "",
            (
                "| batch, dim, seqlen, dstate | dtype | fwd in a CUDA graph ms | fwd+bwd in a CUDA graph ms "
                "| vs official | host µs a call: fwd / fwd+bwd |"
            ),
            "|---|---|---|---|---|---|",
        ]
        for (size, dtype_name), e in _EXTRA.items():
            ratio = "" if e["graph_b"] is None else f"{e['graph_b'] / OFFICIAL[(size, dtype_name)][1]:.2f}x"
            out.append(
                f"| {', '.join(map(str, size))} | {dtype_name} | {fmt(e['graph_f'])} | {fmt(e['graph_b'])} | {ratio} "
                f"| {e['host_f']:.0f} / {e['host_b']:.0f} |"
            )
    if any(r["fwd_range"][0] != r["fwd_range"][1] for r in rows):
        out += ["", "Each time is the median of the rounds' do_bench medians (their range in brackets)."]
    if step is not None:
        public, backend, graphed, host = step
        out += [
            "",
            "| decode step, batch 1, dim 1536, dstate 16 | µs (do_bench) | vs official 51 µs | host µs a call |",
            "|---|---|---|---|",
            (
                f"| portassm.scan_step (checks + launch) | {public:.1f} | {public / OFFICIAL_STEP_US:.2f}x "
                f"| {host['public']:.1f} |"
            ),
            (
                f"| backend scan_step (launch only) | {backend:.1f} | {backend / OFFICIAL_STEP_US:.2f}x "
                f"| {host['backend']:.1f} |"
            ),
            f"| CUDA graph of 64 steps, per step | {graphed:.1f} | {graphed / OFFICIAL_STEP_US:.2f}x | |",
            f"| the host's pace: one torch elementwise launch (`y.add_(1)`) | | | {host['aten']:.1f} |",
            f"| the host's pace: an empty Triton kernel through Triton's launcher | | | {host['empty']:.1f} |",
        ]
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,1,2,3")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-step", action="store_true")
    parser.add_argument(
        "--graph", action="store_true", help="also host µs a call and CUDA-graph replays of fwd, fwd+bwd"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="time each size this many times, round-robin; report the median"
    )
    parser.add_argument("--precompile", type=int, default=0, metavar="N", help="compile in N processes first")
    parser.add_argument("--only-precompile", action="store_true")
    parser.add_argument("--gluon", action="store_true", help="only the Gluon forward beside the Triton one")
    parser.add_argument("--gluon-variants", action="store_true", help="the Gluon forward's variants at each size asked")
    parser.add_argument(
        "--only", default="", help="with --gluon-variants or --bwd: only those whose label contains this (several: a|b)"
    )
    parser.add_argument("--bwd", action="store_true", help="only the Gluon backward beside the Triton one")
    args = parser.parse_args()
    which = [int(i) for i in args.sizes.split(",") if i]
    variants = gluon_variants(args.only) if args.gluon_variants else []
    if args.precompile:
        gl_jobs = args.gluon or args.gluon_variants or args.bwd
        jobs = jobs_of(which, args.sweep, args.gluon, variants, args.bwd)
        if gl_jobs:  # the Gluon comparison times no decode step and no default fwd+bwd
            jobs = [j for j in jobs if j[0] == "scan"]
        precompile(jobs, args.precompile)
    if args.only_precompile:
        return
    portassm.set_backend("torch")
    if args.bwd or args.gluon or args.gluon_variants:
        if args.bwd:
            lines, name = bwd_compare(which, args.quick, args.only), "torch_bwd.md"
        else:
            lines, name = gluon_compare(which if args.gluon else [], args.quick, variants, which), "torch_gluon.md"
        print()
        print("\n".join(lines), flush=True)
        write("\n".join(lines), name)
        return
    _GRAPH[0] = args.graph
    step = None if args.no_step else time_step(args.quick)
    if step:
        print(
            f"step: public {step[0]:.1f} µs, backend {step[1]:.1f} µs, graph {step[2]:.1f} µs (do_bench); host µs a "
            f"call: public {step[3]['public']:.1f}, backend {step[3]['backend']:.1f}, torch add_ "
            f"{step[3]['aten']:.1f}, empty Triton kernel {step[3]['empty']:.1f}",
            flush=True,
        )
    rows = run_sizes(which, args.quick, args.rounds)
    text = table(rows, step)
    print()
    print(text, flush=True)
    write(text)
    if args.sweep:
        text += "\n\n" + "\n".join(sweep(args.quick))
        write(text)
        print()
        print(text.split("\n\n")[-1], flush=True)


def write(text, name="torch_table.md"):
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], name), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
