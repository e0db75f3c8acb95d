"""Tests of the CuPy backend beyond the cross-backend suite.

On any machine: every CUDA source compiles with NVRTC for sm_90 (no GPU needed, only
the NVRTC library: ``pip install nvidia-cuda-nvrtc-cu12``), and the kernels' limits
are ValueErrors. On a GPU (marker ``gpu``): repeated calls are bit-identical, a
sequence of 2^20 steps agrees with the numba backend, torch CUDA tensors come in
through DLPack without a copy (bfloat16 included), and every kernel runs on CuPy's
current stream (checked by capturing the calls into a CUDA graph on a new stream,
which fails if any launch goes elsewhere).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

import numpy as np
import pytest

import portassm
from portassm.backends import cupy_cuda

from .helpers import TOLERANCE, long_scan_arrays, make_case, oracle_forward, oracle_grads, rel_err

# ---------------------------------------------------------------------------------------
# NVRTC on the CPU


def _nvrtc_candidates() -> list[str]:
    found = []
    for entry in sys.path:  # the nvidia-cuda-nvrtc-cu12 / -cu13 wheels
        found += sorted(glob.glob(os.path.join(entry, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")))
        found += sorted(glob.glob(os.path.join(entry, "nvidia", "cu13", "lib", "libnvrtc.so*")))
    for root in filter(None, (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda")):
        found += sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*")))
    name = ctypes.util.find_library("nvrtc")
    if name:
        found.append(name)
    return [f for f in found if "builtins" not in f and ".alt." not in f]


class _NVRTC:
    """The few NVRTC calls a compile check needs, through ctypes."""

    def __init__(self):
        errors = []
        for path in _nvrtc_candidates():
            try:
                self.lib = ctypes.CDLL(path)
                self.path = path
                break
            except OSError as exc:
                errors.append(f"{path}: {exc}")
        else:
            raise OSError("libnvrtc not found (pip install nvidia-cuda-nvrtc-cu12)" + "; ".join(errors))
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
        self.version = (major.value, minor.value)

    def _check(self, status: int) -> None:
        if status != 0:
            raise RuntimeError(self.lib.nvrtcGetErrorString(status).decode())

    def compile(self, source: str, name: str, expressions: list[str], options: list[str]) -> tuple[bool, str]:
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None))
        try:
            for expr in expressions:
                self._check(self.lib.nvrtcAddNameExpression(prog, expr.encode()))
            opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            status = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)))
            log = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetProgramLog(prog, log))
            return status == 0, log.value.decode(errors="replace")
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.fixture(scope="module")
def nvrtc() -> _NVRTC:
    try:
        return _NVRTC()
    except (OSError, RuntimeError, AttributeError) as exc:
        pytest.skip(f"NVRTC cannot be loaded here: {exc}")


# each storage type, each states-per-thread variant, each lanes-per-channel variant
# (None: dstate > 32, the split layout alone) and each discretisation at least once
_COMPILED = [
    ("scan.cu", "float", "float", 4, 0, 16), ("scan.cu", "double", "double", 4, 1, 16),
    ("scan.cu", "bf16_t", "float", 4, 0, 16), ("scan.cu", "f16_t", "float", 4, 2, 16),
    ("scan.cu", "float", "float", 8, 1, 32), ("scan.cu", "bf16_t", "float", 8, 0, 32),
    ("scan.cu", "bf16_t", "float", 16, 2, None), ("scan.cu", "float", "float", 4, 1, 16),
    ("scan.cu", "f16_t", "float", 4, 0, 16),
    ("step.cu", "float", "float", None, 0, None), ("step.cu", "double", "double", None, 1, None),
    ("step.cu", "bf16_t", "float", None, 2, None), ("step.cu", "f16_t", "float", None, 0, None),
]


def test_every_source_is_compiled_here():
    assert {c[0] for c in _COMPILED} == set(cupy_cuda.kernel_sources())


@pytest.mark.parametrize("source, storage, compute, npt, disc, nl", _COMPILED, ids=lambda v: str(v))
def test_kernels_compile_with_nvrtc_for_sm90(nvrtc, source, storage, compute, npt, disc, nl):
    text = cupy_cuda.kernel_sources()[source]
    names = cupy_cuda.kernel_names(source, storage, compute, npt, disc, nl)
    ok, log = nvrtc.compile(text, source, names, [*cupy_cuda.NVRTC_OPTIONS, "--gpu-architecture=compute_90"])
    assert ok, f"{source} {names} does not compile with NVRTC {nvrtc.version}:\n{log}"
    assert "warning" not in log.lower(), log


@pytest.mark.parametrize("defines", [
    ("LS_BC_SMEM=0", "BW_BC_SMEM=0"), ("LS_PREFETCH=0", "BW_PREFETCH=0"), ("LS_WARPS=4", "LS_MIN_BLOCKS=8"),
    ("BW_WARPS=8", "BW_MIN_BLOCKS=2"), ("LP_WARPS=4", "LP_MIN_BLOCKS=6"), ("BP_MIN_BLOCKS=2",),
    ("BP_WARPS=4", "BP_MIN_BLOCKS=6"), ("FQ_WARPS=2", "FQ_MIN_BLOCKS=8", "BQ_MIN_BLOCKS=3"),
    ("FQ_LEAN=1", "FQ_MIN_BLOCKS=5", "FQ_VEC_BC=0"), ("FQ_WARPS=8", "FQ_MIN_BLOCKS=2"),
])
def test_benchmark_variants_compile(nvrtc, defines):
    """The benchmark's compile-time variants of the lanes kernels (B/C rows read from
    L1/L2 instead of shared memory, no register prefetch, other block shapes)."""
    kinds = ("lanes", "pair", "quad")
    names = [n for n in cupy_cuda.kernel_names("scan.cu", "bf16_t", "float", 4, 0, 16) if any(k in n for k in kinds)]
    assert len(names) == 7
    options = [*cupy_cuda.NVRTC_OPTIONS, "--gpu-architecture=compute_90", *(f"-D{d}" for d in defines)]
    ok, log = nvrtc.compile(cupy_cuda.kernel_sources()["scan.cu"], "scan.cu", names, options)
    assert ok, log
    assert "warning" not in log.lower(), log


def test_quad_wide_option_is_checked():
    with pytest.raises(ValueError, match="quad_wide must be True, False or None"):
        cupy_cuda.configure(quad_wide=1)
    with pytest.raises(TypeError, match="known: chunk, min_threads, layout, quad_wide"):
        cupy_cuda.configure(wide=True)
    cupy_cuda.configure(quad_wide=True)
    try:
        assert cupy_cuda._options["quad_wide"] is True
    finally:
        cupy_cuda.configure(quad_wide=None)


def test_dstate_limit_is_a_value_error_naming_the_limit():
    assert cupy_cuda._states_per_thread(cupy_cuda.MAX_DSTATE) == cupy_cuda.STATES_PER_THREAD[-1]
    with pytest.raises(ValueError, match=rf"at most dstate = {cupy_cuda.MAX_DSTATE}.*numba or torch"):
        cupy_cuda._states_per_thread(cupy_cuda.MAX_DSTATE + 1)


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="chunk, min_threads"):
        cupy_cuda.configure(chunk_size=64)


def test_unknown_layout_is_a_value_error():
    with pytest.raises(ValueError, match="lanes"):
        cupy_cuda.configure(layout="rows")


# ---------------------------------------------------------------------------------------
# on the GPU

gpu = pytest.mark.gpu


@pytest.fixture
def cupy_backend():
    reason = portassm.available_backends()["cupy"]
    if reason is not None:
        pytest.skip(f"backend 'cupy' unavailable here: {reason}")
    with portassm.use_backend("cupy") as chosen:
        yield chosen
    cupy_cuda.configure(chunk=None, min_threads=None, layout=None, quad_wide=None)
    cupy_cuda._defines = ()


@gpu
@pytest.mark.parametrize("chunk", [None, 64], ids=["whole", "chunked"])
@pytest.mark.parametrize("dim", [100, 64], ids=["two states a lane", "four states a lane"])
def test_repeated_calls_are_bit_identical(cupy_backend, rng, chunk, dim):
    cp = cupy_cuda._cupy()
    cupy_cuda.configure(chunk=chunk)
    case = make_case(rng, batch=3, dim=dim, seqlen=300, dstate=16, form="grouped", groups=2).astype("float32")
    args = case.kwargs(cp.asarray)
    dout = cp.asarray(rng.standard_normal(case.u.shape).astype(np.float32))
    first = portassm.scan(**args, return_last_state=True)
    grads = portassm.scan_vjp(dout, **args)
    for _ in range(3):
        again = portassm.scan(**args, return_last_state=True)
        assert all(bool(cp.array_equal(a, b)) for a, b in zip(first, again))
        again_grads = portassm.scan_vjp(dout, **args)
        for a, b in zip(grads, again_grads):
            assert bool(cp.array_equal(a, b))


@gpu
@pytest.mark.parametrize("layout", ["lanes", "lanes, one state per lane", "split", "lanes-bwd"])
@pytest.mark.parametrize("chunk", [None, 64], ids=["whole", "chunked"])
@pytest.mark.parametrize("dstate, form", [(16, "grouped"), (24, "selective"), (16, "invariant"), (5, "selective")])
def test_each_layout_agrees_with_the_oracle(cupy_backend, rng, layout, chunk, dstate, form):
    """Every thread layout, whatever the default picks for scan and scan_vjp: forward,
    last state and every gradient against the float64 oracle (float32 inputs). "lanes"
    runs the two-states-per-lane kernels where they apply; "lanes, one state per lane"
    the one-state-per-lane kernels only (the compile-time switches LS_PAIR=0, BW_PAIR=0)."""
    cp = cupy_cuda._cupy()
    if layout == "lanes, one state per lane":
        layout = "lanes"
        cupy_cuda._defines = ("LS_PAIR=0", "BW_PAIR=0")
    cupy_cuda.configure(layout=layout, chunk=chunk)
    case = make_case(rng, batch=2, dim=64, seqlen=150, dstate=dstate, form=form, groups=2).astype("float32")
    args = case.kwargs(cp.asarray)
    out, last = portassm.scan(**args, return_last_state=True)
    ref_out, ref_last = oracle_forward(case)
    assert rel_err(cp.asnumpy(out), ref_out) <= TOLERANCE["float32"]
    assert rel_err(cp.asnumpy(last), ref_last) <= TOLERANCE["float32"]
    dout = rng.standard_normal(case.u.shape).astype(np.float32)
    grads = portassm.scan_vjp(cp.asarray(dout), **args)
    refs = oracle_grads(case, dout, None)
    for name, got, ref in zip(case.ARRAYS, grads, refs):
        if ref is not None:
            assert rel_err(cp.asnumpy(got), ref) <= TOLERANCE["float32"], name


@gpu
@pytest.mark.parametrize("chunk", [None, 64], ids=["whole", "chunked"])
def test_residuals_spare_the_recomputation(cupy_backend, rng, chunk):
    """scan_fwd(save_checkpoints=True) gives the same output, and scan_bwd with its
    checkpoints the gradients of scan_bwd without them; residuals of another problem are
    a ValueError."""
    cp = cupy_cuda._cupy()
    cupy_cuda.configure(chunk=chunk)
    case = make_case(rng, batch=2, dim=64, seqlen=150, dstate=16, form="grouped", groups=2).astype("float32")
    args = [cp.asarray(getattr(case, name)) for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    h0 = cp.asarray(case.initial_state)
    out, last, res = cupy_cuda.scan_fwd(*args, True, h0, "mamba", save_checkpoints=True)
    out2, last2 = cupy_cuda.scan_fwd(*args, True, h0, "mamba")
    assert bool(cp.array_equal(out, out2)) and bool(cp.array_equal(last, last2))
    dout = cp.asarray(rng.standard_normal(case.u.shape).astype(np.float32))
    dlast = cp.asarray(rng.standard_normal(case.initial_state.shape).astype(np.float32))
    reused = cupy_cuda.scan_bwd(dout, dlast, *args, True, h0, "mamba", residuals=res)
    recomputed = cupy_cuda.scan_bwd(dout, dlast, *args, True, h0, "mamba")
    for a, b in zip(reused, recomputed):
        assert rel_err(cp.asnumpy(a), cp.asnumpy(b).astype(np.float64)) <= 1e-5
    shorter = [a[..., :100] if a.ndim >= 3 else a for a in args]
    with pytest.raises(ValueError, match="residuals"):
        cupy_cuda.scan_bwd(dout[..., :100], dlast, *shorter, True, h0, "mamba", residuals=res)


@gpu
@pytest.mark.parametrize("chunk", [None, 64], ids=["whole", "chunked"])
def test_scan_with_vjp_agrees_with_the_oracle(cupy_backend, rng, chunk):
    """The public path that hands the forward's checkpoints to the backward."""
    cp = cupy_cuda._cupy()
    cupy_cuda.configure(chunk=chunk)
    case = make_case(rng, batch=2, dim=64, seqlen=150, dstate=16, form="grouped", groups=2).astype("float32")
    out, last, vjp = portassm.scan_with_vjp(**case.kwargs(cp.asarray), return_last_state=True)
    ref_out, ref_last = oracle_forward(case)
    assert rel_err(cp.asnumpy(out), ref_out) <= TOLERANCE["float32"]
    assert rel_err(cp.asnumpy(last), ref_last) <= TOLERANCE["float32"]
    dout = rng.standard_normal(case.u.shape).astype(np.float32)
    dlast = rng.standard_normal(case.initial_state.shape).astype(np.float32)
    grads = vjp(cp.asarray(dout), cp.asarray(dlast))
    refs = oracle_grads(case, dout, dlast)
    for name, got, ref in zip(case.ARRAYS, grads, refs):
        if ref is not None:
            assert rel_err(cp.asnumpy(got), ref) <= TOLERANCE["float32"], name


@gpu
@pytest.mark.parametrize("wide", [None, True], ids=["auto", "wide"])
@pytest.mark.parametrize("chunk", [None, 64], ids=["whole", "chunked"])
@pytest.mark.parametrize(
    "dstate, seqlen, options, softplus, form",
    [(16, 1000, True, True, "grouped"), (13, 7, True, False, "selective"), (4, 150, False, True, "selective"),
     (16, 33, False, False, "grouped")],
)
def test_quad_kernels_agree_with_the_oracle(cupy_backend, rng, wide, chunk, dstate, seqlen, options, softplus, form):
    """The four-states-per-lane forward and backward (mamba, B and C selective): the output, the
    last state and every gradient against the float64 oracle with and without the options,
    softplus, a last-state gradient and chunks, dstate 16, 13 and 4 (states past dstate carry
    zeros), odd lengths (partial tiles, scalar loads), both forward instances (this small grid
    picks the one at 3 blocks a multiprocessor; "wide" forces the lean one); they must be the
    kernels that ran."""
    cp = cupy_cuda._cupy()
    cupy_cuda.configure(chunk=chunk, quad_wide=wide)
    case = make_case(rng, batch=2, dim=64, seqlen=seqlen, dstate=dstate, form=form, groups=2, options=options,
                     softplus=softplus).astype("float32")
    args = case.kwargs(cp.asarray)
    kernel_args = {k: args[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")}
    for name in ("B", "C"):  # the backend's form: (batch, groups, dstate, seqlen)
        kernel_args[name] = kernel_args[name][:, None] if kernel_args[name].ndim == 3 else kernel_args[name]
    probe = cupy_cuda._Scan(*kernel_args.values(), "mamba")
    assert probe.quad and probe.bw_quad and probe.part_cpb == 32
    out, last = portassm.scan(**args, return_last_state=True)
    ref_out, ref_last = oracle_forward(case)
    assert rel_err(cp.asnumpy(out), ref_out) <= TOLERANCE["float32"]
    assert rel_err(cp.asnumpy(last), ref_last) <= TOLERANCE["float32"]
    dout = rng.standard_normal(case.u.shape).astype(np.float32)
    dlast = rng.standard_normal((2, 64, dstate)).astype(np.float32)
    for residuals in (False, True):
        if residuals:
            _, vjp = portassm.scan_with_vjp(**args)
            grads = vjp(cp.asarray(dout), cp.asarray(dlast))
        else:
            grads = portassm.scan_vjp(cp.asarray(dout), **args, dlast_state=cp.asarray(dlast))
        refs = oracle_grads(case, dout, dlast)
        for name, got, ref in zip(case.ARRAYS, grads, refs):
            if ref is not None:
                assert rel_err(cp.asnumpy(got), ref) <= TOLERANCE["float32"], (name, residuals)


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quad_kernels_match_the_pair_kernels(cupy_backend, rng, dtype):
    """Four states per lane against two (FW_QUAD=0, BW_QUAD=0) on the same inputs, float32 and bfloat16
    u, delta, z, B, C (torch CUDA tensors through DLPack): the same gradients up to float32
    rounding (and one bfloat16 rounding of the gradients of those five)."""
    torch = _torch_cuda()
    case = make_case(rng, batch=2, dim=128, seqlen=300, dstate=16, form="grouped", groups=4)
    big = {"u", "delta", "z", "B", "C"}
    tensors = {
        name: torch.from_numpy(a).cuda().to(getattr(torch, dtype) if name in big else torch.float32)
        for name, a in case.arrays().items()
    }
    dout = torch.randn(case.u.shape, device="cuda").to(getattr(torch, dtype))
    try:
        quad = (*portassm.scan(**tensors, delta_softplus=True, return_last_state=True),
                *portassm.scan_vjp(dout, **tensors, delta_softplus=True))
    except TypeError as exc:
        assert dtype == "bfloat16" and "bfloat16" in str(exc)
        pytest.skip(f"CuPy cannot hold bfloat16 here: {exc}")
    cupy_cuda._defines = ("FW_QUAD=0", "BW_QUAD=0")
    pair = (*portassm.scan(**tensors, delta_softplus=True, return_last_state=True),
            *portassm.scan_vjp(dout, **tensors, delta_softplus=True))
    for name, a, b in zip(("out", "last_state", *case.ARRAYS), quad, pair):
        a64 = torch.from_dlpack(a).double().cpu().numpy()
        b64 = torch.from_dlpack(b).double().cpu().numpy()
        limit = 1e-2 if dtype == "bfloat16" and name in {"out", *big} else 1e-5  # bfloat16 results: one rounding each
        assert rel_err(a64, b64) <= limit, name


@gpu
def test_dstate_limit_on_the_device(cupy_backend, rng):
    case = make_case(rng, dstate=cupy_cuda.MAX_DSTATE + 1)
    with pytest.raises(ValueError, match="numba or torch"):
        portassm.scan(**case.kwargs(cupy_backend.asarray))


@gpu
def test_long_sequence_agrees_with_numba(cupy_backend, rng):
    reason = portassm.available_backends()["numba"]
    if reason is not None:
        pytest.skip(f"backend 'numba' unavailable: {reason}")
    batch, dim, seqlen, dstate = 1, 256, 2**20, 16
    arrays = long_scan_arrays(rng, batch, dim, seqlen, dstate)
    out, last = portassm.scan(**arrays, delta_softplus=True, return_last_state=True)
    with portassm.use_backend("numba"):
        ref_out, ref_last = portassm.scan(**arrays, delta_softplus=True, return_last_state=True)
    assert rel_err(cupy_backend.to_numpy(out), ref_out) <= TOLERANCE["float32"]
    assert rel_err(cupy_backend.to_numpy(last), ref_last) <= TOLERANCE["float32"]


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    return torch


@gpu
def test_torch_tensors_come_in_without_a_copy(cupy_backend, rng):
    torch = _torch_cuda()
    t = torch.randn(2, 6, 9, device="cuda")
    x = cupy_backend.asarray(t)
    assert x.data.ptr == t.data_ptr()
    case = make_case(rng).astype("float32")
    out, last = portassm.scan(**case.kwargs(lambda a: torch.from_numpy(a).cuda()), return_last_state=True)
    assert cupy_backend.is_native(out)
    ref_out, ref_last = oracle_forward(case)
    assert rel_err(cupy_backend.to_numpy(out), ref_out) <= TOLERANCE["float32"]
    assert rel_err(cupy_backend.to_numpy(last), ref_last) <= TOLERANCE["float32"]


@gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", ["mamba", "zoh", "bilinear"])
def test_16bit_through_torch(cupy_backend, rng, dtype, method):
    """16-bit u, delta, z, B, C as torch CUDA tensors (float32 A, D, bias, state, as in
    Mamba), fed through DLPack; compared with the float64 oracle on the rounded values."""
    torch = _torch_cuda()
    tdtype = getattr(torch, dtype)
    case = make_case(rng, batch=2, dim=64, seqlen=50, dstate=16, discretization=method)
    big = {"u", "delta", "z", "B", "C"}

    def to_torch(name, a):
        t = torch.from_numpy(a).cuda()
        return t.to(tdtype) if name in big else t.float()

    tensors = {name: to_torch(name, a) for name, a in case.arrays().items()}
    for name, t in tensors.items():  # the case as rounded
        setattr(case, name, t.double().cpu().numpy())
    dout_t = torch.randn(case.u.shape, device="cuda").to(tdtype)
    try:
        out, last = portassm.scan(
            **tensors, delta_softplus=True, discretization=method, return_last_state=True
        )
    except TypeError as exc:  # CuPy without bfloat16: the message must say so and what to do
        assert dtype == "bfloat16" and "bfloat16" in str(exc) and "set_backend('torch')" in str(exc)
        pytest.skip(f"CuPy cannot hold bfloat16 here: {exc}")
    assert str(out.dtype) == dtype
    out_t = torch.from_dlpack(out)
    assert out_t.dtype == tdtype
    ref_out, ref_last = oracle_forward(case)
    assert rel_err(out_t.double().cpu().numpy(), ref_out) <= TOLERANCE[dtype]
    assert rel_err(cupy_backend.to_numpy(last), ref_last) <= TOLERANCE[dtype]
    grads = portassm.scan_vjp(dout_t, **tensors, delta_softplus=True, discretization=method)
    refs = oracle_grads(case, dout_t.double().cpu().numpy(), None)
    for name, got, ref in zip(case.ARRAYS, grads, refs):
        got_t = torch.from_dlpack(got)
        assert got_t.dtype == tensors[name].dtype, name
        assert rel_err(got_t.double().cpu().numpy(), ref) <= TOLERANCE[dtype], name


@gpu
@pytest.mark.parametrize("chunk", [None, 64], ids=["whole", "chunked"])
def test_kernels_run_on_the_current_stream(cupy_backend, rng, chunk):
    """Capture scan and scan_vjp on a new stream: a launch on any other stream breaks
    the capture; the graph's replay must then give the direct results."""
    cp = cupy_cuda._cupy()
    cupy_cuda.configure(chunk=chunk)
    case = make_case(rng, batch=2, dim=64, seqlen=200, dstate=16).astype("float32")
    args = case.kwargs(cp.asarray)
    dout = cp.asarray(rng.standard_normal(case.u.shape).astype(np.float32))
    # the inputs were copied on the legacy default stream, which a non-blocking stream does
    # not wait for: the copies must have landed before that stream reads them
    cp.cuda.Device().synchronize()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        direct = portassm.scan(**args, return_last_state=True)  # warms the memory pool and the kernels
        direct_grads = portassm.scan_vjp(dout, **args)
        stream.synchronize()
        stream.begin_capture()
        captured = portassm.scan(**args, return_last_state=True)
        captured_grads = portassm.scan_vjp(dout, **args)
        graph = stream.end_capture()
        for a in (*captured, *captured_grads):
            if a is not None:
                a.fill(np.nan)
        graph.launch(stream)
        stream.synchronize()
    for a, b in zip((*direct, *direct_grads), (*captured, *captured_grads)):
        if a is not None:
            assert bool(cp.array_equal(a, b))


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_step_writes_into_out_and_in_place(cupy_backend, rng, dtype):
    """scan_step(..., out=(y, new_state)) gives the results of the allocating call, also
    with new_state the state itself (advanced in place); a wrong out is a ValueError."""
    cp = cupy_cuda._cupy()
    batch, dim, dstate = 3, 40, 16
    f = lambda *shape: cp.asarray(rng.standard_normal(shape), dtype=dtype)
    state, x, dt, z = f(batch, dim, dstate), f(batch, dim), f(batch, dim), f(batch, dim)
    A = -cp.abs(f(dim, dstate)) - 0.3
    B, C, D, bias = f(batch, 1, dstate), f(batch, 1, dstate), f(dim), f(dim)
    args = (x, dt, A, B, C, D, z, bias, True, "mamba")
    y_ref, s_ref = cupy_cuda.scan_step(state, *args)
    y, s = cp.full((batch, dim), cp.nan, dtype=dtype), cp.full((batch, dim, dstate), cp.nan, dtype=dtype)
    got = cupy_cuda.scan_step(state, *args, out=(y, s))
    assert got[0] is y and got[1] is s
    assert bool(cp.array_equal(y, y_ref)) and bool(cp.array_equal(s, s_ref))
    running = state.copy()
    y2, s2 = cupy_cuda.scan_step(running, *args, out=(cp.empty_like(y), running))
    assert s2 is running
    assert bool(cp.array_equal(y2, y_ref)) and bool(cp.array_equal(running, s_ref))
    with pytest.raises(ValueError, match="out must be"):
        cupy_cuda.scan_step(state, *args, out=(y[:, :-1], s))
    with pytest.raises(ValueError, match="out must be"):
        cupy_cuda.scan_step(state, *args, out=(y, s.astype(cp.float16)))
