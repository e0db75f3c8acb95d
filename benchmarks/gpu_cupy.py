"""Speed of the CuPy backend on the GPU, against the official kernel's figures (ANCHORS.md).

Run on the GPU machine::

    python benchmarks/gpu_cupy.py            # the table; also written to $OUT/cupy_table.md
    python benchmarks/gpu_cupy.py --variants # also each kernel variant, at every size and dtype

Every row times the default (cupy_cuda.configure(layout=None): the one-state-per-lane
kernels wherever dstate allows) three ways: ``scan`` alone, ``scan`` then ``scan_vjp``
(the backward recomputes its checkpoints), and ``scan_with_vjp`` then its ``vjp`` (the
training path: the forward writes the checkpoints the backward reads). With
``--variants`` each compile-time variant of scan.cu (VARIANTS) and the "split" layout
are timed the same way on the same inputs, and their outputs and gradients compared
with the split layout's (largest relative difference; float32 rounding expected).
The modules of every variant are compiled first, in parallel processes, so that NVRTC
time stays out of the timings and off the clock of the device call.

The sizes and options are ANCHORS.md's: delta_softplus, z, D and delta_bias; A (dim,
dstate) float32; B, C (batch, dstate, seqlen) in the dtype of u; D and delta_bias
float32. Times are medians of CUDA-event timings on fresh random inputs, taken with
the calls queued back to back as triton.testing.do_bench takes them (queued_ms: the
official figures were measured so); the last two columns are the same calls
synchronised one by one (cupyx.profiler.benchmark), which adds the host's time before
the first launch. The memory floor is the bytes that must move over 3.0 TB/s (the copy
bandwidth measured on the H100): forward, u, delta, z, B, C read and out written;
forward + backward, that plus dout, u, delta, z, B, C read and du, ddelta, dz, dB,
dC written by the backward.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

BANDWIDTH = 3.0e12  # bytes/s, ANCHORS.md

# (batch, dim, seqlen, dstate) -> {dtype: (forward ms, forward+backward ms)}, ANCHORS.md (H100)
OFFICIAL = {
    (8, 1536, 2048, 16): {"float32": (0.882, 2.946), "bfloat16": (0.451, 2.295)},
    (4, 5120, 2048, 16): {"float32": (1.451, 4.833), "bfloat16": (0.738, 3.764)},
    (1, 1536, 16384, 16): {"float32": (1.005, 3.243), "bfloat16": (0.567, 2.588)},
    (64, 1536, 256, 16): {"float32": (0.692, 3.006), "bfloat16": (0.436, 2.570)},
}
OFFICIAL_STEP_US = 51.0

# compile-time variants of scan.cu: (label, configure options, preprocessor definitions)
VARIANTS = (
    ("fwd one state per lane (LS_PAIR=0)", {}, ("LS_PAIR=0",)),
    ("fwd two states per lane, 4 warps a block, 6 blocks/SM", {}, ("LP_WARPS=4", "LP_MIN_BLOCKS=6")),
    ("bwd one state per lane (BW_PAIR=0)", {}, ("BW_PAIR=0",)),
    ("fwd two states per lane (FW_QUAD=0)", {}, ("FW_QUAD=0",)),
    ("fwd four states per lane, blocks of 2 warps, 6/SM", {}, ("FQ_WARPS=2", "FQ_MIN_BLOCKS=6")),
    ("fwd four states per lane, blocks of 2 warps, 8/SM (128 registers)", {}, ("FQ_WARPS=2", "FQ_MIN_BLOCKS=8")),
    ("fwd four states per lane, 4/SM (128 registers)", {}, ("FQ_MIN_BLOCKS=4",)),
    ("fwd four states per lane, B and C read by elements (FQ_VEC_BC=0)", {}, ("FQ_VEC_BC=0",)),
    ("fwd four states per lane, the lean loop at 3/SM (FQ_LEAN=1)", {}, ("FQ_LEAN=1",)),
    ("fwd four states per lane, 3/SM at every size (quad_wide=False)", {"quad_wide": False}, ()),
    ("fwd four states per lane, lean at 5/SM at every size (quad_wide=True)", {"quad_wide": True}, ()),
    ("bwd two states per lane (BW_QUAD=0)", {}, ("BW_QUAD=0",)),
    ("bwd four states per lane, 3 blocks/SM (168 registers)", {}, ("BQ_MIN_BLOCKS=3",)),
    ("bwd two states per lane, 2 blocks/SM (128 registers)", {}, ("BP_MIN_BLOCKS=2",)),
)


def floors_ms(batch, dim, seqlen, dstate, itemsize):
    big = batch * dim * seqlen * itemsize
    bc = 2 * batch * dstate * seqlen * itemsize
    fwd = 4 * big + bc
    bwd = 4 * big + bc + 3 * big + bc
    return fwd / BANDWIDTH * 1e3, (fwd + bwd) / BANDWIDTH * 1e3


def make_inputs(cp, batch, dim, seqlen, dstate, dtype, seed):
    """Fresh random inputs in ANCHORS.md's form; 16-bit arrays rounded on the device."""
    rng = cp.random.default_rng(seed)
    f32 = cp.float32

    def cast(a):
        try:
            return a.astype(dtype)
        except Exception:  # noqa: BLE001  (a CuPy without bfloat16 casts: round through torch, in via DLPack)
            import torch

            return cp.from_dlpack(torch.from_dlpack(a).to(getattr(torch, np.dtype(dtype).name)))

    def big(*shape):
        return cast(rng.standard_normal(shape, dtype=f32))

    return {
        "u": big(batch, dim, seqlen),
        "delta": cast(rng.random((batch, dim, seqlen), dtype=f32) * 3.5 - 3.0),
        "A": -(rng.random((dim, dstate), dtype=f32) * 2.7 + 0.3),
        "B": big(batch, dstate, seqlen),
        "C": big(batch, dstate, seqlen),
        "D": rng.standard_normal(dim, dtype=f32),
        "z": big(batch, dim, seqlen),
        "delta_bias": rng.random(dim, dtype=f32) - 0.5,
    }


def median_ms(fn, n_repeat=30, n_warmup=5):
    from cupyx.profiler import benchmark

    result = benchmark(fn, n_repeat=n_repeat, n_warmup=n_warmup)
    return float(np.median(result.gpu_times[0])) * 1e3, float(np.median(result.cpu_times)) * 1e3


def scan_inputs(cp, size, dtype, seed):
    batch, dim, seqlen, dstate = size
    x = make_inputs(cp, batch, dim, seqlen, dstate, dtype, seed)
    g = cp.random.default_rng(seed + 1).standard_normal((batch, dim, seqlen), dtype=cp.float32)
    try:
        dout = g.astype(dtype)
    except Exception:  # noqa: BLE001
        import torch

        dout = cp.from_dlpack(torch.from_dlpack(g).to(getattr(torch, np.dtype(dtype).name)))
    return x, dout


def scan_results(cp, portassm, x, dout):
    """The output, last state and gradients as float32 arrays (the current configuration)."""
    out, last = portassm.scan(**x, delta_softplus=True, return_last_state=True)
    grads = portassm.scan_vjp(dout, **x, delta_softplus=True)
    return [a.astype(cp.float32) for a in (out, last, *grads) if a is not None]


def variant_differs(cp, portassm, x, dout, reference):
    worst = 0.0
    for a, b in zip(scan_results(cp, portassm, x, dout), reference):
        worst = max(worst, float(cp.abs(a - b).max() / cp.abs(b).max()))
    return worst


def queued_ms(cp, fn, n_repeat=30, n_warmup=5):
    """Median ms per call with the calls queued back to back, as triton.testing.do_bench
    times them (the official kernel's figures in ANCHORS.md): a CUDA event between
    consecutive calls and one synchronisation at the end, so the host's Python runs
    ahead of the GPU and the figure is the GPU's own time per call."""
    for _ in range(n_warmup):
        fn()
    stream = cp.cuda.get_current_stream()
    stream.synchronize()
    events = [cp.cuda.Event() for _ in range(n_repeat + 1)]
    events[0].record(stream)
    for i in range(n_repeat):
        fn()
        events[i + 1].record(stream)
    events[-1].synchronize()
    return float(np.median([cp.cuda.get_elapsed_time(events[i], events[i + 1]) for i in range(n_repeat)]))


def bench_scan(cp, portassm, x, dout):
    """ms of scan; scan then scan_vjp; scan_with_vjp then its vjp: each queued back to
    back (queued_ms), and each synchronised per call (cupyx.profiler.benchmark, whose
    event pair also holds the host's time before the first launch)."""

    def fwd():
        return portassm.scan(**x, delta_softplus=True)

    def fwd_bwd():
        portassm.scan(**x, delta_softplus=True)
        return portassm.scan_vjp(dout, **x, delta_softplus=True)

    def with_vjp():
        _, vjp = portassm.scan_with_vjp(**x, delta_softplus=True)
        return vjp(dout)

    queued = (queued_ms(cp, fwd), queued_ms(cp, fwd_bwd, 15, 3), queued_ms(cp, with_vjp, 15, 3))
    synced = (median_ms(fwd)[0], median_ms(fwd_bwd, n_repeat=15, n_warmup=3)[0],
              median_ms(with_vjp, n_repeat=15, n_warmup=3)[0])
    return queued, synced


def _compile_one(defines, storage):
    """Compile (or load from CuPy's cache) scan.cu and step.cu for one variant: a worker process."""
    from portassm.backends import cupy_cuda

    cupy_cuda._defines = tuple(defines)
    cupy_cuda._module("scan.cu", storage, "float", 4, 0, 16)
    cupy_cuda._module("step.cu", storage, "float", None, 0)
    return storage, defines


def precompile(define_sets, storages=("float", "bf16_t")):
    """Fill CuPy's kernel cache for every variant in parallel processes (NVRTC is single-threaded)."""
    import concurrent.futures
    import multiprocessing
    import time

    t = time.perf_counter()
    jobs = [(tuple(d), st) for d in dict.fromkeys(define_sets) for st in storages]
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=min(len(jobs), os.cpu_count() or 4), mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        for _ in pool.map(_compile_one, *zip(*jobs)):
            pass
    print(f"compiled {len(jobs)} modules in {time.perf_counter() - t:.1f} s", flush=True)


def bench_step(cp, portassm, dtype, seed, batch=1, dim=1536, dstate=16):
    from portassm.backends import cupy_cuda

    rng = cp.random.default_rng(seed)
    f32 = cp.float32
    state = rng.standard_normal((batch, dim, dstate), dtype=f32)
    x, dt, z = (rng.standard_normal((batch, dim), dtype=f32).astype(dtype) for _ in range(3))
    A = -(rng.random((dim, dstate), dtype=f32) + 0.5)
    B, C = (rng.standard_normal((batch, 1, dstate), dtype=f32).astype(dtype) for _ in range(2))
    # (bfloat16 casts need a CuPy that holds bfloat16; the scan rows round through torch if not)
    D, bias = rng.standard_normal(dim, dtype=f32), rng.standard_normal(dim, dtype=f32)
    kernel_args = (state, x, dt, A, B, C, D, z, bias, True, "mamba")
    direct = median_ms(lambda: cupy_cuda.scan_step(*kernel_args), n_repeat=2000, n_warmup=50)
    B2, C2 = B[:, 0], C[:, 0]
    via_ops = median_ms(
        lambda: portassm.scan_step(state, x, dt, A, B2, C2, D, z, bias, True), n_repeat=2000, n_warmup=50
    )
    # launches back to back: the rate a decode loop sustains (CPU launch cost included)
    y_out, s_out = cp.empty((batch, dim), dtype=x.dtype), cp.empty_like(state)
    s_run = state.copy()  # advanced in place
    loops = {
        "kernel": lambda: cupy_cuda.scan_step(*kernel_args),
        "kernel out=": lambda: cupy_cuda.scan_step(*kernel_args, out=(y_out, s_out)),
        "kernel in place": lambda: cupy_cuda.scan_step(s_run, *kernel_args[1:], out=(y_out, s_run)),
        "ops": lambda: portassm.scan_step(state, x, dt, A, B2, C2, D, z, bias, True),
    }
    start, end = cp.cuda.Event(), cp.cuda.Event()
    per_step = {}
    for label, fn in loops.items():
        for _ in range(50):
            fn()
        start.record()
        for _ in range(1000):
            fn()
        end.record()
        end.synchronize()
        per_step[label] = cp.cuda.get_elapsed_time(start, end) / 1000 * 1e3
        print(f"  step {label:16s} back-to-back: {per_step[label]:.2f} us/step", flush=True)
    loop_kernel, loop_ops = per_step["kernel"], per_step["ops"]
    # the GPU's own time per step: 100 steps captured in a CUDA graph and replayed
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        for _ in range(3):
            cupy_cuda.scan_step(*kernel_args)
        stream.synchronize()
        stream.begin_capture()
        for _ in range(100):
            cupy_cuda.scan_step(*kernel_args)
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        start.record(stream)
        for _ in range(20):
            graph.launch(stream)
        end.record(stream)
        end.synchronize()
    graph_us = cp.cuda.get_elapsed_time(start, end) / 2000 * 1e3
    print(f"  step kernel in a CUDA graph: {graph_us:.2f} us/step", flush=True)
    step_host_parts(cp, cupy_cuda, kernel_args)
    if os.environ.get("PORTASSM_PROFILE_STEP"):  # where the host time of a step goes
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(2000):
            cupy_cuda.scan_step(*kernel_args)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(8)
    return direct, via_ops, loop_kernel, loop_ops, graph_us, per_step["kernel out="], per_step["kernel in place"]


def step_host_parts(cp, cupy_cuda, kernel_args, n=3000):
    """Host microseconds of the pieces of one decoding-step call (perf_counter over n
    calls each; the GPU work queues behind): where the Python path's time goes."""
    import time

    state, x = kernel_args[0], kernel_args[1]
    batch, dim = x.shape
    dstate = state.shape[2]

    def per_call(fn):
        for _ in range(50):
            fn()
        cp.cuda.get_current_stream().synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = (time.perf_counter() - t) / n * 1e6
        cp.cuda.get_current_stream().synchronize()
        return dt

    f32 = np.dtype(np.float32)
    parts = {
        "whole scan_step": lambda: cupy_cuda.scan_step(*kernel_args),
        "cupy.empty (one output)": lambda: cp.empty((batch, dim, dstate), dtype=f32),
        "cupy.cuda.alloc": lambda: cp.cuda.alloc(batch * dim * dstate * 4 + 256 + batch * dim * 4),
        "cupy.ndarray on a pointer": lambda: cp.ndarray((batch, dim), f32, state.data),
        "get_current_stream().ptr": lambda: cp.cuda.get_current_stream().ptr,
        "the key (14 attributes)": lambda: (
            x.dtype, state.dtype, x.dtype, x.dtype, x.dtype, x.dtype, 3, 3, f32, f32, f32, "mamba", dstate, 0
        ),
    }
    _values, pointers = cupy_cuda._param_buffer()
    plan = next(p for p in cupy_cuda._step_plans.values() if p.T == x.dtype)  # the one just packed
    stream = cp.cuda.get_current_stream().ptr
    driver = cupy_cuda._driver()
    blocks = (batch * dim * plan.nl + 127) // 128
    parts["driver launchKernel (parameters as last packed)"] = lambda: driver.launchKernel(
        plan.function, blocks, 1, 1, 128, 1, 1, 0, stream, pointers, 0
    )
    for label, fn in parts.items():
        print(f"  step host part {label:48s}: {per_call(fn):6.2f} us", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", action="store_true", help="also time the compile-time variants")
    parser.add_argument("--only", default="", help="with --variants: only the variants whose label contains this (several: a|b)")
    parser.add_argument("--sizes", default="all", help="'all' or a comma list of indices into the size table")
    parser.add_argument("--no-step", action="store_true", help="leave out the decoding step")
    args = parser.parse_args()

    import cupy as cp
    import ml_dtypes

    import portassm
    from portassm.backends import cupy_cuda

    only = args.only.split("|")
    variants = (("default", {}, ()), *(v for v in VARIANTS if args.variants and any(o in v[0] for o in only)))
    precompile([d for _, _, d in variants])
    portassm.set_backend("cupy")
    dev = cp.cuda.Device()
    print(f"device: {cp.cuda.runtime.getDeviceProperties(dev.id)['name'].decode()}, cupy {cp.__version__}", flush=True)
    dtypes = {"float32": cp.float32, "bfloat16": ml_dtypes.bfloat16}
    sizes = list(OFFICIAL)
    if args.sizes != "all":
        sizes = [sizes[int(i)] for i in args.sizes.split(",")]
    rows = []  # (size, dtype, variant label, fwd, fwd+scan_vjp, scan_with_vjp, diff)
    seed = 0
    for size in sizes:
        for name, dtype in dtypes.items():
            seed += 10
            inputs = scan_inputs(cp, size, dtype, seed)
            cupy_cuda.configure(chunk=None, min_threads=None, layout="split")
            cupy_cuda._defines = ()
            reference = scan_results(cp, portassm, *inputs) if args.variants else None
            for label, opts, defines in variants:
                cupy_cuda.configure(chunk=None, min_threads=None, layout=None, quad_wide=None)
                cupy_cuda.configure(**opts)
                cupy_cuda._defines = defines
                try:
                    (f_ms, fb_ms, wv_ms), (fs_ms, _fbs_ms, wvs_ms) = bench_scan(cp, portassm, *inputs)
                    diff = variant_differs(cp, portassm, *inputs, reference) if reference is not None else float("nan")
                except Exception as exc:  # noqa: BLE001  (report and go on: one failure must not lose the other rows)
                    print(f"{size} {name} {label}: FAILED {type(exc).__name__}: {exc}", flush=True)
                    continue
                finally:
                    cupy_cuda._defines = ()
                    cupy_cuda.configure(chunk=None, min_threads=None, layout=None, quad_wide=None)
                off_f, off_fb = OFFICIAL[size][name]
                rows.append((size, name, label, f_ms, fb_ms, wv_ms, diff, fs_ms, wvs_ms))
                print(f"{size} {name} {label:52s}: fwd {f_ms:.3f} ms ({f_ms / off_f:.2f}x), scan+scan_vjp {fb_ms:.3f} "
                      f"({fb_ms / off_fb:.2f}x), scan_with_vjp+vjp {wv_ms:.3f} ({wv_ms / off_fb:.2f}x), "
                      f"max rel diff to split {diff:.1e}; synchronised per call: fwd {fs_ms:.3f}, "
                      f"scan_with_vjp+vjp {wvs_ms:.3f}", flush=True)
            del inputs
    step_rows = []
    for name, dtype in dtypes.items() if not args.no_step else ():
        seed += 10
        try:
            step_rows.append((name, *bench_step(cp, portassm, dtype, seed)))
        except Exception as exc:  # noqa: BLE001
            print(f"step {name}: FAILED {type(exc).__name__}: {exc}", flush=True)

    lines = [
        (
            "| batch, dim, seqlen, dstate | dtype | variant | fwd ms | x official | x floor | scan + scan_vjp ms "
            "| x official | scan_with_vjp + vjp ms | x official | x floor | vs split | fwd, synced | with_vjp, synced |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, name, label, f_ms, fb_ms, wv_ms, diff, fs_ms, wvs_ms in rows:
        off_f, off_fb = OFFICIAL[size][name]
        floor_f, floor_fb = floors_ms(*size, 4 if name == "float32" else 2)
        lines.append(
            f"| {', '.join(map(str, size))} | {name} | {label} | {f_ms:.3f} | {f_ms / off_f:.2f} | {f_ms / floor_f:.1f} "
            f"| {fb_ms:.3f} | {fb_ms / off_fb:.2f} | {wv_ms:.3f} | {wv_ms / off_fb:.2f} | {wv_ms / floor_fb:.1f} "
            f"| {diff:.1e} | {fs_ms:.3f} | {wvs_ms:.3f} |"
        )
    lines += [
        "",
        (
            "| decode step, batch 1, dim 1536, dstate 16 | dtype | GPU us (events) | CPU us per call "
            "| back-to-back us/step | in a CUDA graph us/step | official us |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for name, direct, via_ops, loop_kernel, loop_ops, graph_us, loop_out, loop_inplace in step_rows:
        lines.append(f"| backend kernel (cupy_cuda.scan_step) | {name} | {direct[0] * 1e3:.1f} | {direct[1] * 1e3:.1f} | "
                     f"{loop_kernel:.1f} | {graph_us:.1f} | {OFFICIAL_STEP_US:.0f} |")
        lines.append(f"| backend, out= given | {name} | | | {loop_out:.1f} | | {OFFICIAL_STEP_US:.0f} |")
        lines.append(f"| backend, state advanced in place | {name} | | | {loop_inplace:.1f} | | {OFFICIAL_STEP_US:.0f} |")
        lines.append(f"| public portassm.scan_step (checks included) | {name} | {via_ops[0] * 1e3:.1f} | "
                     f"{via_ops[1] * 1e3:.1f} | {loop_ops:.1f} | | {OFFICIAL_STEP_US:.0f} |")
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "cupy_table.md"), "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
