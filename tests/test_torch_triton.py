"""Tests of the torch backend beyond the cross-backend suite.

Three tiers:

* CPU, plain torch path (always): autograd through ``portassm.scan`` and
  ``mamba_block`` against the float64 oracle.
* The Triton kernels interpreted on CPU (``test_kernels_*``): run only when
  ``TRITON_INTERPRET=1`` was set before triton was imported, i.e. in their own process:
  ``TRITON_INTERPRET=1 python -m pytest tests/test_torch_triton.py -k test_kernels_``.
  ``test_interpreted_kernels`` starts that process, so a plain ``pytest tests`` covers
  them too. Sizes stay small (seqlen <= 64): the interpreter runs each program in NumPy.
* The GPU (marker ``gpu``): agreement in float32/bfloat16/float64, the sequence-chunked
  path, bit-identical repeats, a 2^20-step sequence against numba, peak memory.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import numpy as np
import pytest

import portassm

from .helpers import TOLERANCE, long_scan_arrays, make_case, normalised, oracle_forward, oracle_grads, rel_err

torch = pytest.importorskip("torch")
from portassm.backends import torch_triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()

gpu = pytest.mark.gpu


@pytest.fixture
def torch_backend():
    """The torch backend in force; options restored afterwards."""
    saved = dict(torch_triton._options)
    with portassm.use_backend("torch") as chosen:
        yield chosen
    torch_triton._options.clear()
    torch_triton._options.update(saved)


def _tensors(case, device, dtype=None, requires_grad=False):
    out = {}
    for name, value in case.kwargs().items():
        if isinstance(value, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(value)).to(device)
            if dtype is not None:
                t = t.to(dtype)
            out[name] = t.requires_grad_(requires_grad)
        else:
            out[name] = value
    return out


def _np(t):
    return torch_triton.to_numpy(t).astype(np.float64)


# ---------------------------------------------------------------------------------------
# CPU: autograd on the plain-torch path


@pytest.mark.parametrize("form", ["selective", "grouped", "invariant"])
@pytest.mark.parametrize("method", ["mamba", "zoh", "bilinear"])
def test_autograd_through_scan_matches_oracle_vjp(torch_backend, rng, form, method):
    case = make_case(rng, form=form, discretization=method)
    args = _tensors(case, "cpu", requires_grad=True)
    out, last = portassm.scan(**args, return_last_state=True)
    dout = rng.standard_normal(case.u.shape)
    dlast = rng.standard_normal(case.initial_state.shape)
    (out * torch.from_numpy(dout)).sum().add((last * torch.from_numpy(dlast)).sum()).backward()
    refs = oracle_grads(case, dout, dlast)
    for name, ref in zip(case.ARRAYS, refs):
        got = args[name].grad
        assert got is not None, name
        assert rel_err(_np(got), ref) <= TOLERANCE["float64"], name


def test_mamba_block_trains_with_autograd(torch_backend, rng):
    """Gradients of a block's loss: finite, and the directional derivative matches finite differences."""
    params = portassm.init_block_params(d_model=8, d_state=4, dtype="float64", seed=3)
    # on the CPU, whatever the backend's default device (the GPU machine puts new arrays on CUDA)
    params = {k: torch.as_tensor(v).detach().cpu().clone().requires_grad_(True) for k, v in params.items()}
    x = torch.from_numpy(rng.standard_normal((2, 7, 8)))
    target = torch.from_numpy(rng.standard_normal((2, 7, 8)))

    def loss_of(p):
        return ((portassm.mamba_block(x, p) - target) ** 2).mean()

    loss = loss_of(params)
    loss.backward()
    direction = {k: torch.from_numpy(rng.standard_normal(tuple(v.shape))) for k, v in params.items()}
    analytic = sum(float((params[k].grad * direction[k]).sum()) for k in params)
    eps = 1e-6
    with torch.no_grad():
        plus = loss_of({k: v + eps * direction[k] for k, v in params.items()})
        minus = loss_of({k: v - eps * direction[k] for k, v in params.items()})
    numeric = float(plus - minus) / (2 * eps)
    assert all(torch.isfinite(v.grad).all() for v in params.values())
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric))


def test_asarray_and_to_numpy_round_trip(torch_backend, rng):
    x = rng.standard_normal((2, 3)).astype(np.float32)
    t = torch_triton.asarray(x)
    assert isinstance(t, torch.Tensor) and torch_triton.is_native(t)
    np.testing.assert_array_equal(torch_triton.to_numpy(t), x)
    assert torch_triton.to_numpy(t.to(torch.bfloat16)).dtype == np.float32


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="known"):
        torch_triton.configure(colour="blue")
    with pytest.raises(ValueError, match="bwd_kernel"):
        torch_triton.configure(bwd_kernel="cuda")


def test_gluon_forward_tiles_meet_the_checkpoints(torch_backend, monkeypatch):
    """32-step tiles for the forward alone; 16 where it keeps checkpoints every 16 steps for the
    Gluon backward (a checkpoint is written at a tile's start); no GPU needed."""
    monkeypatch.setattr(torch_triton, "_n_sm", lambda device: 132)
    cuda, f32 = torch.device("cuda"), torch.float32
    torch_triton.configure(gluon_steps=32)
    try:
        alone = torch_triton._gluon_layout(8, 1536, 2048, 1536, 16, f32, True, True, cuda)
        before_bwd = torch_triton._gluon_layout(8, 1536, 2048, 1536, 16, f32, True, True, cuda, ck=16)
        assert (alone["steps"], alone["gluon"]["STEPS"], alone["ck"]) == (32, 32, 32)
        assert (before_bwd["steps"], before_bwd["gluon"]["STEPS"], before_bwd["ck"]) == (16, 16, 16)
    finally:
        torch_triton.configure(gluon_steps=16)


def _sums_addresses(layout, block_d, lpc, steps):
    """Word offset of each (channel, lane, step) of a (block_d, lpc, steps) shared buffer: the
    unswizzled row-major one for a plain layout, else the XOR of the linear layout's bases."""
    if not hasattr(layout, "offset_bases"):
        return {(ch, l, s): (ch * lpc + l) * steps + s for ch in range(block_d) for l in range(lpc) for s in range(steps)}
    inverse = {}
    for offset in range(block_d * lpc * steps):
        index = [0, 0, 0]
        for bit, basis in enumerate(layout.offset_bases):
            if offset >> bit & 1:
                index = [a ^ b for a, b in zip(index, basis)]
        inverse[tuple(index)] = offset
    return inverse


def _excess_wavefronts(addr, block_d, lpc, steps, cpt, warps):
    """Wavefronts beyond one a quarter-warp of the 16-byte accesses of the Gluon forward's partial
    sums: the store (each lane its row of steps) and the read back (each lane VEC steps of its
    channel's lpc rows), lanes numbered as the kernels' blocked layouts number them."""
    tpc, vec = 32 // lpc, steps // lpc
    excess = 0
    for w in range(warps):
        for c in range(cpt):
            accesses = []
            for j in range(steps // 4):  # the store: lane (channel slot, l) writes steps 4j .. 4j + 3
                accesses.append([((w * tpc + t // lpc) * cpt + c, t % lpc, 4 * j) for t in range(32)])
            for i in range(lpc):  # the read: lane (channel slot, j) reads row i, steps j vec + 4 v ..
                for v in range(vec // 4):
                    accesses.append([((w * tpc + t // lpc) * cpt + c, i, (t % lpc) * vec + 4 * v) for t in range(32)])
            for lanes in accesses:
                for q in range(4):
                    starts = [addr[e] for e in lanes[8 * q : 8 * q + 8]]
                    assert all(a % 4 == 0 for a in starts) and all(
                        addr[(ch, l, s + k)] == addr[(ch, l, s)] + k for ch, l, s in lanes for k in range(4)
                    )
                    groups = collections.Counter((a // 4) % 8 for a in set(starts))
                    excess += max(groups.values()) - 1
    return excess


@pytest.mark.parametrize("dstate,warps,steps,cpt", [(16, 2, 16, 1), (16, 1, 32, 1), (8, 2, 16, 1), (16, 2, 16, 2),
                                                    (32, 1, 32, 1), (64, 1, 64, 1), (4, 2, 16, 1)])
def test_gluon_partial_sums_layout_is_conflict_free(dstate, warps, steps, cpt):
    """The swizzled shared layout of the Gluon kernels' partial sums (``_sums_layout``) is a
    bijection whose store and read back are free of bank conflicts, where the unswizzled one
    is not (dstate 16: 4-way stores, 2-way reads); no GPU needed."""
    pytest.importorskip("triton.experimental.gluon")
    from portassm.backends import gluon_kernels

    lpc = dstate // 4
    block_d = cpt * (32 // lpc) * warps
    layout = gluon_kernels._sums_layout(block_d, lpc, steps, cpt, True)
    addr = _sums_addresses(layout, block_d, lpc, steps)
    assert sorted(addr.values()) == list(range(block_d * lpc * steps))
    assert _excess_wavefronts(addr, block_d, lpc, steps, cpt, warps) == 0
    plain = _sums_addresses(gluon_kernels._sums_layout(block_d, lpc, steps, cpt, False), block_d, lpc, steps)
    if lpc > 1:
        assert _excess_wavefronts(plain, block_d, lpc, steps, cpt, warps) > 0


def test_gluon_backward_selection(torch_backend, monkeypatch):
    """Where the Gluon backward applies, and its programs: 4 warps (32 channels), halved while a
    group of B, C has fewer channels; the Triton backward everywhere else (no GPU needed)."""
    monkeypatch.setattr(torch_triton, "_n_sm", lambda device: 132)
    cuda, f32 = torch.device("cuda"), torch.float32

    def layout(dim_per_group=1536, dstate=16, ct=f32, vary=(True, True), method="mamba", device=cuda):
        return torch_triton._gluon_bwd_layout(8, 1536, 2048, dim_per_group, dstate, ct, *vary, method, device)

    lay = layout()
    assert (lay["warps"], lay["block_d"], lay["d_blocks"], lay["ck"], lay["chunks"]) == (4, 32, 48, 16, 2)
    assert [layout(dim_per_group=n)["warps"] for n in (32, 16, 8)] == [4, 2, 1]
    assert layout(dim_per_group=4) is None
    for kw in ({"dstate": 32}, {"ct": torch.float64}, {"vary": (True, False)}, {"method": "zoh"}):
        assert layout(**kw) is None, kw
    assert layout(device=torch.device("cpu")) is None  # Gluon kernels run compiled only
    torch_triton.configure(bwd_kernel="triton")
    assert layout() is None
    torch_triton.configure(bwd_kernel="gluon", gluon_bwd_warps=2, bwd_min_warps=1)
    assert (layout()["warps"], layout()["chunks"]) == (2, 1)


# ---------------------------------------------------------------------------------------
# the Triton kernels under the interpreter (CPU tensors)


def test_interpreted_kernels():
    """Run the ``test_kernels_*`` tests in a process where TRITON_INTERPRET=1 precedes triton's import."""
    if INTERPRETED:
        pytest.skip("already interpreting: the interpret tests run in this process")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_kernels_", __file__]
    result = subprocess.run(
        cmd, env=env, capture_output=True, text=True, check=False, cwd=os.path.dirname(os.path.dirname(__file__))
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def _kernel_case(rng, form, method, options, dtype, seqlen=37):
    return make_case(
        rng, batch=2, dim=8, seqlen=seqlen, dstate=4, form=form, groups=2, options=options, discretization=method
    ).astype(dtype)


def _check_kernels(case, dtype, rng):
    kw = normalised(case)
    T = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))
    args = [T(kw[n]) for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    init = T(kw["initial_state"])
    out, last = torch_triton.scan_fwd(*args, kw["delta_softplus"], init, case.discretization)
    ref_out, ref_last = oracle_forward(case)
    tol = TOLERANCE[dtype]
    assert rel_err(_np(out), ref_out) <= tol
    assert rel_err(_np(last), ref_last) <= tol
    dout = rng.standard_normal(case.u.shape).astype(dtype)
    dlast = rng.standard_normal(ref_last.shape).astype(dtype)
    grads = torch_triton.scan_bwd(T(dout), T(dlast), *args, kw["delta_softplus"], init, case.discretization)
    refs = oracle_grads(case, dout, dlast)
    for name, got, ref in zip(case.ARRAYS, grads, refs):
        if ref is None:
            assert got is None, name
            continue
        got = _np(got)
        if name in ("B", "C") and got.ndim == 4 and ref.ndim == 3:
            got = got[:, 0]
        assert rel_err(got, ref) <= tol, f"d{name}: {rel_err(got, ref):.2e}"


@pytest.mark.skipif(
    not INTERPRETED, reason="needs TRITON_INTERPRET=1 before triton's import (see test_interpreted_kernels)"
)
@pytest.mark.parametrize(
    "form,method,options,dtype,ck",
    [
        ("selective", "mamba", True, "float64", 16),
        ("selective", "mamba", False, "float32", 8),
        ("grouped", "zoh", True, "float64", 8),
        ("invariant", "bilinear", True, "float64", 16),
        ("grouped", "bilinear", False, "float64", 8),
        ("invariant", "zoh", False, "float32", 8),
    ],
)
def test_kernels_forward_backward(torch_backend, rng, form, method, options, dtype, ck):
    # whole sequences; ck=16: 16-step tiles, ck=8: 4-step tiles (a checkpoint starts a tile)
    torch_triton.configure(kernels="triton", ck=ck, min_warps=1, bwd_min_warps=1)
    _check_kernels(_kernel_case(rng, form, method, options, dtype), dtype, rng)


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 before triton's import")
@pytest.mark.parametrize("form,steps", [("grouped", 16), ("invariant", 4)])
def test_kernels_odd_dstate(torch_backend, rng, form, steps):
    """dstate 3: the wrapper pads the states to a power of two (the kernels' tiles); both forward tile lengths."""
    torch_triton.configure(kernels="triton", ck=16, min_warps=1, bwd_min_warps=1, steps=steps)
    case = make_case(rng, batch=2, dim=8, seqlen=21, dstate=3, form=form, groups=2)
    _check_kernels(case, "float64", rng)


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 before triton's import")
@pytest.mark.parametrize("form,method", [("selective", "mamba"), ("grouped", "zoh")])
def test_kernels_sequence_chunks(torch_backend, rng, form, method):
    """The chunked path (scan chunks in parallel, combine, rescan; the adjoint likewise)."""
    torch_triton.configure(kernels="triton", ck=4, min_warps=1000, bwd_min_warps=1000)
    case = _kernel_case(rng, form, method, True, "float64", seqlen=61)
    assert torch_triton._layout(2, 8, 61, 4, torch.device("cpu"))["chunks"] > 1
    _check_kernels(case, "float64", rng)


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 before triton's import")
@pytest.mark.parametrize("form", ["grouped", "invariant"])
@pytest.mark.parametrize("method", ["mamba", "zoh", "bilinear"])
def test_kernels_step(torch_backend, rng, form, method):
    torch_triton.configure(kernels="triton")
    case = make_case(rng, batch=3, dim=8, seqlen=1, dstate=4, form=form, groups=2, discretization=method)
    ref_out, ref_last = oracle_forward(case)
    batch = case.u.shape[0]

    def one(M):  # step forms: (batch, dim) for x, dt, z; (batch, groups, dstate) for B, C
        if M.ndim == 2:  # a time-invariant (dim, dstate) B steps as (batch, groups=dim, dstate)
            return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(M, (batch, *M.shape))))
        return torch.from_numpy(np.ascontiguousarray(M[..., 0]))

    state = torch.from_numpy(case.initial_state)
    before = state.clone()
    y, new = portassm.scan_step(
        state,
        one(case.u),
        one(case.delta),
        torch.from_numpy(case.A),
        one(case.B),
        one(case.C),
        torch.from_numpy(case.D),
        one(case.z),
        torch.from_numpy(case.delta_bias),
        True,
        discretization=method,
    )
    assert torch.equal(state, before)
    assert rel_err(_np(y), ref_out[..., 0]) <= TOLERANCE["float64"]
    assert rel_err(_np(new), ref_last) <= TOLERANCE["float64"]


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 before triton's import")
def test_kernels_autograd(torch_backend, rng):
    """scan_fwd applies the autograd Function on the Triton path: .backward() runs the Triton backward."""
    torch_triton.configure(kernels="triton", ck=8, min_warps=1, bwd_min_warps=1)
    case = _kernel_case(rng, "selective", "mamba", True, "float64", seqlen=20)
    args = _tensors(case, "cpu", requires_grad=True)
    out = portassm.scan(**args)
    assert out.grad_fn is not None and "ScanFunction" in type(out.grad_fn).__name__
    dout = rng.standard_normal(case.u.shape)
    out.backward(torch.from_numpy(dout))
    refs = oracle_grads(case, dout, None)
    for name, ref in zip(case.ARRAYS, refs):
        assert rel_err(_np(args[name].grad), ref) <= TOLERANCE["float64"], name


# ---------------------------------------------------------------------------------------
# on the GPU

needs_cuda = pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs a CUDA device")


@gpu
@needs_cuda
@pytest.mark.parametrize("form,method", [("selective", "mamba"), ("grouped", "zoh"), ("invariant", "bilinear")])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpu_agreement(torch_backend, rng, form, method, dtype):
    """Forward, last state and every gradient through autograd, whole sequences and chunked.

    One test per compiled kernel set: the whole and chunked paths share their main kernels
    (the options and the initial state are run-time flags), and one case per form and
    method covers every compile-time flag of the forward and backward.
    """
    case = make_case(rng, batch=2, dim=96, seqlen=300, dstate=16, form=form, groups=3, discretization=method)
    for fwd_kernel in ("triton", "gluon"):  # the Gluon forward serves float32 selective B, C only
        for min_warps in (1, 10**6):  # whole sequences, then chunks scanned in parallel
            torch_triton.configure(min_warps=min_warps, bwd_min_warps=min_warps, fwd_kernel=fwd_kernel)
            _check_cuda(case.astype(dtype), dtype, rng)


@gpu
@needs_cuda
def test_gpu_forward_variants(torch_backend, rng):
    """The Triton forward's other layouts and switches against the oracle (forward and last state, float32).

    No prefetch; 4-step tiles (one channel a thread) with one, two and four warps a
    program, without prefetch, with a register cap; each with and without options
    (run-time flags), whole and chunked.
    """
    variants = [
        {"prefetch": 0},
        {"steps": 4},
        {"steps": 4, "prefetch": 0, "warps": 1},
        {"steps": 4, "warps": 4, "maxnreg": 128},
    ]
    cases = [
        make_case(rng, batch=2, dim=128, seqlen=300, dstate=16, options=opts, softplus=opts).astype("float32")
        for opts in (True, False)
    ]
    for variant in variants:
        for min_warps in (1, 10**6):
            torch_triton.configure(min_warps=min_warps, fwd_kernel="triton", **variant)
            for case in cases:
                kw = _tensors(case, "cuda")
                out, last = portassm.scan(**kw, return_last_state=True)
                ref_out, ref_last = oracle_forward(case)
                assert rel_err(_np(out), ref_out) <= TOLERANCE["float32"], (variant, min_warps)
                assert rel_err(_np(last), ref_last) <= TOLERANCE["float32"], (variant, min_warps)


@gpu
@needs_cuda
@pytest.mark.parametrize("method", ["mamba", "zoh", "bilinear"])
def test_gpu_gluon_forward(torch_backend, rng, method):
    """The Gluon forward (``fwd_kernel="gluon"``) against the oracle, whole and chunked.

    Forward, last state and, through the checkpoints it keeps, every gradient of the Triton
    backward (grouped B, C, float32); then the forward alone with and without options and
    softplus, at dstate 3 (padded to 4), 4, 8, 32 and 64, with 2 warps a program and 8-step
    tiles; an initial state; 16-bit inputs. The lane sums by shuffles (the default) and
    through shared memory, swizzled and not.
    """
    torch_triton.configure(fwd_kernel="gluon")
    grouped = make_case(rng, batch=2, dim=96, seqlen=300, dstate=16, form="grouped", groups=3, discretization=method)
    forward_cases = [
        (make_case(rng, batch=2, dim=64, seqlen=150, dstate=n, discretization=method, options=o, softplus=o), cfg)
        for n, o, cfg in [
            (16, False, {}),
            (3, True, {}),
            (4, True, {}),
            (8, False, {}),
            (32, True, {}),
            (64, True, {}),
            (16, True, {"gluon_warps": 2}),
            (16, True, {"gluon_steps": 8}),
            (16, True, {"gluon_steps": 32}),
            (16, True, {"gluon_cpt": 2}),
            (8, False, {"gluon_cpt": 2, "gluon_warps": 2}),
            (16, True, {"gluon_swizzle": False, "gluon_shfl_sum": False}),
            (8, True, {"gluon_swizzle": False, "gluon_shfl_sum": False, "gluon_warps": 2}),
            (16, True, {"gluon_shfl_sum": False}),
            (16, False, {"gluon_shfl_sum": False, "gluon_steps": 32, "gluon_warps": 2}),
            (4, True, {"gluon_shfl_sum": False}),
            (8, True, {"gluon_shfl_sum": False, "gluon_cpt": 2, "gluon_warps": 2}),
            (64, True, {"gluon_shfl_sum": False}),
        ]
    ]
    for min_warps in (1, 10**6):  # whole sequences, then chunks scanned in parallel
        torch_triton.configure(min_warps=min_warps, bwd_min_warps=min_warps, gluon_warps=1, gluon_steps=16)
        _check_cuda(grouped.astype("float32"), "float32", rng)
        for case, cfg in forward_cases:
            torch_triton.configure(**{"gluon_warps": 1, "gluon_steps": 16, "gluon_cpt": 1, "gluon_swizzle": True,
                                      "gluon_shfl_sum": True, **cfg})
            case = case.astype("float32")
            kw = _tensors(case, "cuda")
            out, last = portassm.scan(**kw, return_last_state=True)
            ref_out, ref_last = oracle_forward(case)
            where = (case.A.shape, cfg, min_warps)
            assert rel_err(_np(out), ref_out) <= TOLERANCE["float32"], where
            assert rel_err(_np(last), ref_last) <= TOLERANCE["float32"], where
    for cpt, dtype, shfl in ((1, torch.bfloat16, True), (1, torch.float16, True), (2, torch.bfloat16, True),
                             (1, torch.bfloat16, False)):
        torch_triton.configure(gluon_warps=1, gluon_steps=16, gluon_cpt=cpt, gluon_shfl_sum=shfl)
        case = make_case(rng, batch=2, dim=64, seqlen=200, dstate=16, discretization=method)
        args = _tensors(case, "cuda", dtype=dtype)
        rounded = case.astype(np.float64)
        for name, t in args.items():
            if isinstance(t, torch.Tensor):
                setattr(rounded, name, t.double().cpu().numpy())
        out, last = portassm.scan(**args, return_last_state=True)
        assert out.dtype == dtype
        ref_out, ref_last = oracle_forward(rounded)
        assert rel_err(_np(out), ref_out) <= TOLERANCE["bfloat16"], dtype
        assert rel_err(_np(last), ref_last) <= 1e-5, dtype


@gpu
@needs_cuda
def test_gpu_gluon_backward(torch_backend, rng, monkeypatch):
    """The Gluon backward (``bwd_kernel="gluon"``, the default where it applies) against the oracle.

    Every gradient through autograd, whole sequences and chunks scanned in parallel (the
    chunked first pass is the Gluon kernel's adjoint-only mode): all options and softplus,
    none of them, grouped B and C, dstate 13 (padded to 16), a sequence that is not a
    multiple of the tile, programs of 4, 2 and 1 warps; then 16-bit inputs against the
    Triton backward on the same inputs. A counter checks that the Gluon backward ran.
    """
    calls = []
    real = torch_triton._gluon_bwd
    monkeypatch.setattr(torch_triton, "_gluon_bwd", lambda *a: calls.append(1) or real(*a))
    cases = [
        (make_case(rng, batch=2, dim=64, seqlen=300, dstate=16), {}),
        (make_case(rng, batch=2, dim=64, seqlen=77, dstate=16, options=False, softplus=False), {}),
        (make_case(rng, batch=2, dim=96, seqlen=250, dstate=16, form="grouped", groups=3), {}),
        (make_case(rng, batch=1, dim=32, seqlen=200, dstate=13), {}),
        (make_case(rng, batch=2, dim=64, seqlen=160, dstate=16), {"gluon_bwd_warps": 2}),
        (make_case(rng, batch=2, dim=64, seqlen=160, dstate=16), {"gluon_swizzle": False}),
        # 16 and 8 channels a group: programs of 2 warps, then 1
        (make_case(rng, batch=2, dim=48, seqlen=170, dstate=16, form="grouped", groups=3), {}),
        (make_case(rng, batch=1, dim=24, seqlen=150, dstate=16, form="grouped", groups=3), {}),
    ]
    defaults = dict(torch_triton._options)
    for min_warps in (1, 10**6):  # whole sequences, then chunks
        for case, cfg in cases:
            torch_triton.configure(**{**defaults, "bwd_min_warps": min_warps, **cfg})
            before = len(calls)
            _check_cuda(case.astype("float32"), "float32", rng)
            assert len(calls) == before + 1, (case.A.shape, cfg)
    torch_triton.configure(**defaults)
    case = make_case(rng, batch=2, dim=64, seqlen=200, dstate=16)
    for dtype in (torch.bfloat16, torch.float16):
        grads = {}
        for kernel in ("gluon", "triton"):
            torch_triton.configure(bwd_kernel=kernel)
            args = _tensors(case, "cuda", dtype=dtype, requires_grad=True)
            out = portassm.scan(**args)
            out.backward(torch.ones_like(out))
            grads[kernel] = [args[n].grad.double().cpu().numpy() for n in case.ARRAYS if args.get(n) is not None]
        for got, ref in zip(grads["gluon"], grads["triton"]):
            assert rel_err(got, ref) <= 1e-2, dtype


def _check_cuda(case, dtype, rng):
    args = _tensors(case, "cuda", requires_grad=True)
    out, last = portassm.scan(**args, return_last_state=True)
    ref_out, ref_last = oracle_forward(case)
    tol = TOLERANCE[dtype]
    assert rel_err(_np(out), ref_out) <= tol
    assert rel_err(_np(last), ref_last) <= tol
    dout = rng.standard_normal(case.u.shape).astype(dtype)
    dlast = rng.standard_normal(ref_last.shape).astype(dtype)
    torch.autograd.backward([out, last], [torch.from_numpy(dout).cuda(), torch.from_numpy(dlast).cuda()])
    refs = oracle_grads(case, dout, dlast)
    for name, ref in zip(case.ARRAYS, refs):
        if args.get(name) is None:  # an option left out
            assert ref is None, name
            continue
        assert rel_err(_np(args[name].grad), ref) <= tol, f"d{name}: {rel_err(_np(args[name].grad), ref):.2e}"


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_16bit(torch_backend, rng, dtype):
    """16-bit inputs compute in float32: compare with the oracle on the rounded inputs."""
    case = make_case(rng, batch=2, dim=64, seqlen=200, dstate=16)
    args = _tensors(case, "cuda", dtype=dtype)
    rounded = case.astype(np.float64)
    for name, t in args.items():
        if isinstance(t, torch.Tensor):
            setattr(rounded, name, t.double().cpu().numpy())
    ref_out, ref_last = oracle_forward(rounded)
    for fwd_kernel in ("triton", "gluon"):
        torch_triton.configure(fwd_kernel=fwd_kernel)
        out, last = portassm.scan(**args, return_last_state=True)
        assert out.dtype == dtype and last.dtype == torch.float32
        assert rel_err(_np(out), ref_out) <= TOLERANCE["bfloat16"], fwd_kernel
        assert rel_err(_np(last), ref_last) <= 1e-5, fwd_kernel


@gpu
@needs_cuda
@pytest.mark.parametrize("groups", [1, 2])
def test_gpu_step_matches_scan(torch_backend, rng, groups):
    case = make_case(rng, batch=3, dim=64, seqlen=1, dstate=16, form="grouped", groups=groups).astype("float32")
    ref_out, ref_last = oracle_forward(case)
    one = lambda M: torch.from_numpy(M[..., 0]).cuda()
    full = lambda M: torch.from_numpy(M).cuda()
    state = full(case.initial_state)
    y, new = portassm.scan_step(
        state,
        one(case.u),
        one(case.delta),
        full(case.A),
        one(case.B),
        one(case.C),
        full(case.D),
        one(case.z),
        full(case.delta_bias),
        True,
    )
    assert rel_err(_np(y), ref_out[..., 0]) <= 1e-5
    assert rel_err(_np(new), ref_last) <= 1e-5


@gpu
@needs_cuda
def test_gpu_step_direct_launch(torch_backend, rng):
    """Repeated steps take the direct launch of the compiled kernel: same results as Triton's launch.

    Options switched between calls (D, z, bias absent), an input not 16-byte aligned (a view
    one element in): each is its own specialisation, compiled through Triton once, then
    launched directly; every call agrees with the float64 NumPy step, repeats bit for bit.
    """
    batch, dim, dstate = 2, 1536, 16
    host = {
        "state": rng.standard_normal((batch, dim, dstate)), "x": rng.standard_normal((batch, dim)),
        "dt": rng.standard_normal((batch, dim)), "A": -np.exp(rng.standard_normal((dim, dstate))),
        "B": rng.standard_normal((batch, dstate)), "C": rng.standard_normal((batch, dstate)),
        "D": rng.standard_normal(dim), "z": rng.standard_normal((batch, dim)), "dt_bias": rng.random(dim),
    }
    dev = {k: torch.from_numpy(v.astype(np.float32)).cuda() for k, v in host.items()}
    buffer = torch.empty(batch * dim + 1, device="cuda")
    misaligned_x = buffer[1:].view(batch, dim)  # 4 bytes past a 16-byte boundary
    misaligned_x.copy_(dev["x"])
    assert misaligned_x.data_ptr() % 16 != 0
    names = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    step_kernel = torch_triton._kernels()._scan_step_kernel
    for key in [k for k in torch_triton._COMPILED if k[0] is step_kernel]:
        del torch_triton._COMPILED[key]
    for drop, x_view in [((), None), (("D", "z"), None), (("dt_bias",), None), ((), misaligned_x), ((), None)]:
        ref_args = [None if k in drop else host[k] for k in names]
        with portassm.use_backend("numpy"):
            ref_y, ref_state = portassm.scan_step(*ref_args, True)
        args = [None if k in drop else dev[k] for k in names]
        if x_view is not None:
            args[1] = x_view
        first = None
        for _ in range(3):
            y, new_state = portassm.scan_step(*args, True)
            got = (_np(y).copy(), _np(new_state).copy())
            assert rel_err(got[0], ref_y) <= 1e-5 and rel_err(got[1], ref_state) <= 1e-5, drop
            if first is None:
                first = got
            else:
                assert np.array_equal(got[0], first[0]) and np.array_equal(got[1], first[1]), drop
    # the last case reused the first's kernel
    assert sum(1 for k in torch_triton._COMPILED if k[0] is step_kernel) == 4


@gpu
@needs_cuda
def test_gpu_repeats_are_bit_identical(torch_backend, rng):
    """Whole and chunked: no atomics, fixed reduction orders (the kernels of test_gpu_agreement's first case)."""
    case = make_case(rng, batch=3, dim=96, seqlen=700, dstate=16, form="selective").astype("float32")
    dout = torch.from_numpy(rng.standard_normal(case.u.shape).astype(np.float32)).cuda()

    def run():
        args = _tensors(case, "cuda", requires_grad=True)
        out, last = portassm.scan(**args, return_last_state=True)
        out.backward(dout)
        return [out.detach(), last.detach()] + [args[n].grad for n in case.ARRAYS]

    for fwd_kernel, min_warps in [(k, m) for k in ("triton", "gluon") for m in (1, 10**6)]:
        torch_triton.configure(min_warps=min_warps, bwd_min_warps=min_warps, fwd_kernel=fwd_kernel)
        first = run()
        for _ in range(2):
            assert all(torch.equal(a, b) for a, b in zip(first, run()))


@gpu
@needs_cuda
def test_gpu_direct_launch_matches_triton_launch(torch_backend, rng):
    """Every kernel launched through ``_launch``'s direct path gives, bit for bit, what Triton's
    own launch gives: both forwards and both backwards, whole and chunked (the chunk-combining
    kernel), with u 4 bytes past a 16-byte boundary (its own specialisation) and aligned."""
    case = make_case(rng, batch=2, dim=64, seqlen=300, dstate=16, form="selective").astype("float32")
    dout = torch.from_numpy(rng.standard_normal(case.u.shape).astype(np.float32)).cuda()

    def run(misaligned):
        args = _tensors(case, "cuda")
        if misaligned:
            buffer = torch.empty(args["u"].numel() + 1, device="cuda")
            u = buffer[1:].view(args["u"].shape)
            u.copy_(args["u"])
            assert u.data_ptr() % 16 != 0
            args["u"] = u
        for name in case.ARRAYS:
            if args.get(name) is not None:
                args[name].requires_grad_(True)
        out, last = portassm.scan(**args, return_last_state=True)
        out.backward(dout)
        return [out.detach(), last.detach()] + [args[n].grad for n in case.ARRAYS if args.get(n) is not None]

    torch_triton._COMPILED.clear()
    for kernel, min_warps in [(k, m) for k in ("triton", "gluon") for m in (1, 10**6)]:
        for misaligned in (False, True):
            torch_triton.configure(
                min_warps=min_warps, bwd_min_warps=min_warps, fwd_kernel=kernel, bwd_kernel=kernel, direct_launch=False
            )
            through_triton = run(misaligned)
            torch_triton.configure(direct_launch=True)
            for _ in range(2):  # the first call compiles (or finds) and keeps; the second launches directly
                got = run(misaligned)
                assert all(torch.equal(a, b) for a, b in zip(through_triton, got)), (kernel, min_warps, misaligned)
    launched = {k[0] for k in torch_triton._COMPILED}
    kernels = torch_triton._kernels()
    from portassm.backends import gluon_kernels

    for kernel in (
        kernels._scan_fwd_kernel, kernels._scan_bwd_kernel, kernels._chunk_combine_kernel,
        gluon_kernels._scan_fwd_gluon, gluon_kernels._scan_bwd_gluon,
    ):  # fmt: skip
        assert kernel in launched, kernel


@gpu
@needs_cuda
@pytest.mark.slow
def test_gpu_long_sequence_agrees_with_numba(torch_backend, rng):
    reason = portassm.available_backends()["numba"]
    if reason is not None:
        pytest.skip(f"backend 'numba' unavailable: {reason}")
    arrays = long_scan_arrays(rng, 1, 256, 2**20, 16)
    dout = rng.standard_normal(arrays["u"].shape, dtype=np.float32)
    args = {k: torch.from_numpy(v).cuda().requires_grad_(True) for k, v in arrays.items()}
    out, last = portassm.scan(**args, delta_softplus=True, return_last_state=True)
    out.backward(torch.from_numpy(dout).cuda())
    with portassm.use_backend("numba"):
        ref_out, ref_last = portassm.scan(**arrays, delta_softplus=True, return_last_state=True)
        ref_grads = portassm.scan_vjp(dout, **arrays, delta_softplus=True)
        exact = portassm.scan_vjp(dout.astype(np.float64), **{k: v.astype(np.float64) for k, v in arrays.items()},
                                  delta_softplus=True)
    assert rel_err(_np(out), ref_out) <= TOLERANCE["float32"]
    assert rel_err(_np(last), ref_last) <= TOLERANCE["float32"]
    for name, ref, ref64 in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), ref_grads, exact):
        err = rel_err(_np(args[name].grad), np.asarray(ref))
        if name in ("A", "D", "delta_bias"):
            # sums over all 2^20 steps, where float32 summation order shows: held to float64
            # (numba's), within twice the float32 tolerance
            err = rel_err(_np(args[name].grad), np.asarray(ref64))
            assert err <= 2 * TOLERANCE["float32"], f"d{name}: {err:.2e} from float64"
        else:
            # float32 against float32: both round, so allow twice the float32 tolerance per side
            assert err <= 2 * TOLERANCE["float32"], f"d{name}: {err:.2e}"


@gpu
@needs_cuda
def test_gpu_peak_memory_of_forward_backward(torch_backend, rng):
    """Peak memory of scan + backward stays within inputs + outputs + gradients + checkpoints and partials."""
    batch, dim, seqlen, dstate = 4, 1536, 2048, 16
    arrays = long_scan_arrays(rng, batch, dim, seqlen, dstate)
    args = {k: torch.from_numpy(v).cuda().requires_grad_(True) for k, v in arrays.items()}
    dout = torch.randn(batch, dim, seqlen, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = portassm.scan(**args, delta_softplus=True)
    out.backward(dout)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = sum(a.numel() * 4 for a in args.values())
    lay = torch_triton._bwd_layout(batch, dim, seqlen, dim, torch.device("cuda"), dstate)
    ckpt = batch * dim * dstate * (-(-seqlen // lay["ck"])) * 4
    partials = 2 * lay["d_blocks"] * batch * seqlen * dstate * 4  # dB, dC per channel block
    allowed = out.numel() * 4 + grads + ckpt + partials + (64 << 20)  # + transposed B/C, scratch, small
    assert extra <= allowed, f"{extra / 2**20:.0f} MiB > {allowed / 2**20:.0f} MiB"
