"""Speed of the CuPy backend on the GPU, against the official kernel's figures (ANCHORS.md).

Run on the GPU machine::

    python benchmarks/gpu_cupy.py            # the table; also written to $OUT/cupy_table.md
    python benchmarks/gpu_cupy.py --variants # also each launch layout variant

Every row is timed with the default layouts (cupy_cuda.configure(layout=None): "split"
for scan, "lanes" for scan_vjp), then with "lanes" (one state per lane) and "split"
(4 lanes per channel) everywhere, and the two layouts' outputs and gradients are
compared (largest relative difference; float32 rounding expected).

The sizes and options are ANCHORS.md's: delta_softplus, z, D and delta_bias; A (dim,
dstate) float32; B, C (batch, dstate, seqlen) in the dtype of u; D and delta_bias
float32. Times are medians of CUDA-event timings (cupyx.profiler.benchmark) on fresh
random inputs. The memory floor is the bytes that must move over 3.0 TB/s (the copy
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

# launch-layout variants: (label, configure options, preprocessor definitions of scan.cu)
VARIANTS = (
    ("lanes, no chunking", {"layout": "lanes", "min_threads": 1}, ()),
    ("lanes, chunks of 512 steps", {"layout": "lanes", "chunk": 512}, ()),
    ("lanes, chunks of 2048 steps", {"layout": "lanes", "chunk": 2048}, ()),
    ("lanes fwd 6 blocks/SM (80 registers)", {"layout": "lanes"}, ("LS_MIN_BLOCKS=6",)),
    ("lanes fwd 8 warps a block", {"layout": "lanes"}, ("LS_WARPS=8", "LS_MIN_BLOCKS=4")),
    ("lanes bwd 8 warps a block, 2 blocks/SM", {"layout": "lanes"}, ("BW_WARPS=8", "BW_MIN_BLOCKS=2")),
    ("lanes fwd, B/C tiles in shared memory", {"layout": "lanes"}, ("LS_BC_SMEM=1",)),
    ("lanes fwd, B/C in shared memory, 8 warps", {"layout": "lanes"}, ("LS_BC_SMEM=1", "LS_WARPS=8", "LS_MIN_BLOCKS=4")),
    ("lanes fwd, B/C in shared memory, 6 blocks", {"layout": "lanes"}, ("LS_BC_SMEM=1", "LS_MIN_BLOCKS=6")),
    ("lanes bwd, B/C tiles in shared memory", {"layout": "lanes"}, ("BW_BC_SMEM=1",)),
    ("lanes-bwd layout, bwd B/C in shared memory", {"layout": "lanes-bwd"}, ("BW_BC_SMEM=1",)),
    ("split, no chunking", {"layout": "split", "min_threads": 1}, ()),
    ("split forward passes, lanes backward kernel", {"layout": "lanes-bwd"}, ()),
)
VARIANT_SIZES = ((8, 1536, 2048, 16), (1, 1536, 16384, 16))


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


def layouts_differ(cp, portassm, x, dout):
    """Largest relative difference between the "lanes" and "split" layouts over the
    output, the last state and every gradient (each as max|a-b| / max|b|)."""
    from portassm.backends import cupy_cuda

    results = []
    for layout in ("lanes", "split"):
        cupy_cuda.configure(layout=layout)
        out, last = portassm.scan(**x, delta_softplus=True, return_last_state=True)
        grads = portassm.scan_vjp(dout, **x, delta_softplus=True)
        results.append([a.astype(cp.float32) for a in (out, last, *grads) if a is not None])
    cupy_cuda.configure(layout=None)
    worst = 0.0
    for a, b in zip(*results):
        worst = max(worst, float(cp.abs(a - b).max() / cp.abs(b).max()))
    return worst


def bench_scan(cp, portassm, size, dtype_name, dtype, seed, inputs=None):
    x, dout = inputs or scan_inputs(cp, size, dtype, seed)

    def fwd():
        return portassm.scan(**x, delta_softplus=True)

    def fwd_bwd():
        portassm.scan(**x, delta_softplus=True)
        return portassm.scan_vjp(dout, **x, delta_softplus=True)

    f_ms, _ = median_ms(fwd)
    fb_ms, _ = median_ms(fwd_bwd, n_repeat=15, n_warmup=3)
    return f_ms, fb_ms


def bench_with_vjp(cp, portassm, x, dout):
    """portassm.scan_with_vjp then its vjp (the backward reusing the forward's
    checkpoints), median ms; None where portassm has no scan_with_vjp."""
    if not hasattr(portassm, "scan_with_vjp"):
        return None

    def run():
        _, vjp = portassm.scan_with_vjp(**x, delta_softplus=True)
        return vjp(dout)

    return median_ms(run, n_repeat=15, n_warmup=3)[0]


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
    start, end = cp.cuda.Event(), cp.cuda.Event()
    for fn, label in ((lambda: cupy_cuda.scan_step(*kernel_args), "kernel"),
                      (lambda: portassm.scan_step(state, x, dt, A, B2, C2, D, z, bias, True), "ops")):
        for _ in range(50):
            fn()
        start.record()
        for _ in range(1000):
            fn()
        end.record()
        end.synchronize()
        per = cp.cuda.get_elapsed_time(start, end) / 1000 * 1e3
        print(f"  step {label:6s} back-to-back: {per:.2f} us/step", flush=True)
        if label == "kernel":
            loop_kernel = per
        else:
            loop_ops = per
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
    return direct, via_ops, loop_kernel, loop_ops, graph_us


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
    parser.add_argument("--variants", action="store_true", help="also time the launch-layout variants")
    parser.add_argument("--sizes", default="all", help="'all' or a comma list of indices into the size table")
    args = parser.parse_args()

    import cupy as cp
    import ml_dtypes

    import portassm
    from portassm.backends import cupy_cuda

    portassm.set_backend("cupy")
    dev = cp.cuda.Device()
    print(f"device: {cp.cuda.runtime.getDeviceProperties(dev.id)['name'].decode()}, cupy {cp.__version__}", flush=True)
    dtypes = {"float32": cp.float32, "bfloat16": ml_dtypes.bfloat16}
    sizes = list(OFFICIAL)
    if args.sizes != "all":
        sizes = [sizes[int(i)] for i in args.sizes.split(",")]
    rows = []
    seed = 0
    for size in sizes:
        for name, dtype in dtypes.items():
            seed += 10
            cupy_cuda.configure(chunk=None, min_threads=None, layout=None)
            try:
                inputs = scan_inputs(cp, size, dtype, seed)
                f_ms, fb_ms = bench_scan(cp, portassm, size, name, dtype, seed, inputs)
                cupy_cuda.configure(layout="lanes")
                lf_ms, lfb_ms = bench_scan(cp, portassm, size, name, dtype, seed, inputs)
                cupy_cuda.configure(layout="split")
                of_ms, ofb_ms = bench_scan(cp, portassm, size, name, dtype, seed, inputs)
                cupy_cuda.configure(layout=None)
                diff = layouts_differ(cp, portassm, *inputs)
                wv_ms = bench_with_vjp(cp, portassm, *inputs)
                if wv_ms is not None:
                    print(f"{size} {name}: scan_with_vjp + vjp {wv_ms:.3f} ms "
                          f"({wv_ms / OFFICIAL[size][name][1]:.2f}x official fwd+bwd)", flush=True)
            except Exception as exc:  # noqa: BLE001  (report and go on: one failure must not lose the other rows)
                print(f"{size} {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
                cupy_cuda.configure(layout=None)
                continue
            off_f, off_fb = OFFICIAL[size][name]
            floor_f, floor_fb = floors_ms(*size, np.dtype(dtype).itemsize)
            rows.append((size, name, f_ms, off_f, floor_f, fb_ms, off_fb, floor_fb, lf_ms, lfb_ms, of_ms, ofb_ms, diff))
            print(f"{size} {name}: forward {f_ms:.3f} ms ({f_ms / off_f:.2f}x official; lanes {lf_ms:.3f}, split "
                  f"{of_ms:.3f}), fwd+bwd {fb_ms:.3f} ms ({fb_ms / off_fb:.2f}x; lanes {lfb_ms:.3f}, split "
                  f"{ofb_ms:.3f}), lanes vs split max rel diff {diff:.1e}", flush=True)
            if args.variants and size in VARIANT_SIZES and name == "float32":
                cupy_cuda.configure(layout="split")
                reference = scan_results(cp, portassm, *inputs)
                for label, opts, defines in VARIANTS:
                    cupy_cuda.configure(chunk=None, min_threads=None, layout=None)
                    cupy_cuda.configure(**opts)
                    cupy_cuda._defines = defines
                    try:
                        vf, vfb = bench_scan(cp, portassm, size, name, dtype, seed, inputs)
                        vdiff = variant_differs(cp, portassm, *inputs, reference)
                        print(f"    variant {label:34s}: forward {vf:.3f} ms, fwd+bwd {vfb:.3f} ms, "
                              f"max rel diff to split {vdiff:.1e}", flush=True)
                    except Exception as exc:  # noqa: BLE001
                        print(f"    variant {label}: FAILED {type(exc).__name__}: {exc}", flush=True)
                cupy_cuda._defines = ()
                cupy_cuda.configure(chunk=None, min_threads=None, layout=None)
    step_rows = []
    for name, dtype in dtypes.items():
        seed += 10
        try:
            direct, via_ops, loop_kernel, loop_ops, graph_us = bench_step(cp, portassm, dtype, seed)
        except Exception as exc:  # noqa: BLE001
            print(f"step {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        step_rows.append((name, direct, via_ops, loop_kernel, loop_ops, graph_us))

    lines = [
        (
            "| batch, dim, seqlen, dstate | dtype | forward ms | x official | x floor | fwd+bwd ms | x official "
            "| x floor | lanes fwd ms | lanes fwd+bwd ms | split fwd ms | split fwd+bwd ms | lanes vs split |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, name, f_ms, off_f, floor_f, fb_ms, off_fb, floor_fb, lf_ms, lfb_ms, of_ms, ofb_ms, diff in rows:
        lines.append(
            f"| {', '.join(map(str, size))} | {name} | {f_ms:.3f} | {f_ms / off_f:.2f} | {f_ms / floor_f:.1f} | "
            f"{fb_ms:.3f} | {fb_ms / off_fb:.2f} | {fb_ms / floor_fb:.1f} | {lf_ms:.3f} | {lfb_ms:.3f} | "
            f"{of_ms:.3f} | {ofb_ms:.3f} | {diff:.1e} |"
        )
    lines += [
        "",
        (
            "| decode step, batch 1, dim 1536, dstate 16 | dtype | GPU us (events) | CPU us per call "
            "| back-to-back us/step | in a CUDA graph us/step | official us |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for name, direct, via_ops, loop_kernel, loop_ops, graph_us in step_rows:
        lines.append(f"| backend kernel (cupy_cuda.scan_step) | {name} | {direct[0] * 1e3:.1f} | {direct[1] * 1e3:.1f} | "
                     f"{loop_kernel:.1f} | {graph_us:.1f} | {OFFICIAL_STEP_US:.0f} |")
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
