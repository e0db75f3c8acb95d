"""The torch backend: torch.Tensor arrays on any device.

CUDA tensors run the Triton kernels of :mod:`portassm.backends.triton_kernels`, with the
forward and the backward of :mod:`portassm.backends.gluon_kernels` (Gluon: explicit
layouts and shared memory) where they apply (``fwd_kernel="gluon"`` and
``bwd_kernel="gluon"``, the defaults); CPU tensors run a plain-torch loop over time
(differentiable by torch autograd, float64 capable). ``configure(kernels="triton")``
sends CPU tensors to the Triton kernels too, which runs them under ``TRITON_INTERPRET=1``
(set before triton is first imported): that is how CI tests the kernels without a GPU.

Autograd: :func:`scan_fwd` is itself differentiable. On the Triton path it applies
:class:`_ScanFunction`, whose backward runs the Gluon or the Triton backward from the
checkpoints the forward kept (the state every ``CK`` steps, never all states; every 16
steps when the Gluon backward will run).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .. import discretization as disc

NAME = "torch"

__all__ = [
    "NAME",
    "asarray",
    "configure",
    "is_native",
    "namespace",
    "probe",
    "scan_bwd",
    "scan_fwd",
    "scan_step",
    "to_numpy",
]

#: tunables of the Triton path; ``configure`` sets them
_options: dict[str, Any] = {
    "device": None,  # where asarray puts NumPy inputs: default cuda when available
    "kernels": "auto",  # "auto": Triton on CUDA tensors, torch on CPU; "triton"; "torch"
    "steps": 16,  # forward tile length: 16 = dstate/4 lanes a channel; 4 = one channel a thread (16 B a row)
    "warps": 2,  # warps per forward program with steps=4
    "block_d": None,  # channels per forward program (default: 32 with steps=16, 32 per warp with steps=4)
    "prefetch": 16,  # forward: B, C rows this many steps ahead into L1 (u, delta, z twice as far into L2); 0 = off
    "bwd_block_d": 16,  # channels per program of the backward (dstate/4 lanes each)
    "ck": 32,  # checkpoint interval of the backward, in steps
    "min_warps": None,  # forward: below this many warps of channels, cut the sequence in chunks, enough for
    # twice as many warps (default 8 per SM)
    "bwd_min_warps": None,  # backward: below this many warps, chunks enough for as many (default 16 per SM)
    "maxnreg": None,  # register cap of the forward kernel (None: the compiler's choice)
    "fwd_kernel": "gluon",  # "gluon": the Gluon forward (explicit layouts, tiles staged in shared memory)
    # where it applies (CUDA tensors, selective B and C, float32 compute, dstate 4..64); "triton": always
    # the Triton forward
    "gluon_warps": 2,  # warps per program of the Gluon forward (8 channels a warp at dstate 16)
    "gluon_steps": 16,  # tile length of the Gluon forward
    "gluon_maxnreg": None,  # register cap of the Gluon forward (None: the compiler's choice)
    "gluon_cpt": 1,  # channels a lane of the Gluon forward (2: each per-step read of B, C serves two)
    "gluon_bc16": True,  # the Gluon kernels read 16-bit B, C packed in their dtype (False: in float32)
    "gluon_swizzle": True,  # the Gluon kernels' partial sums of a tile go through shared memory swizzled
    # (no bank conflicts; False: unswizzled, 4-way conflicts on the store at dstate 16)
    "gluon_shfl_sum": True,  # the Gluon forward sums a tile's C h over a channel's lanes by shuffles
    # (False: a round trip through shared memory, swizzled as gluon_swizzle says)
    "bwd_maxnreg": None,  # register cap of the backward kernel
    "bwd_kernel": "gluon",  # "gluon": the Gluon backward where it applies (CUDA tensors, mamba's discretisation,
    # selective B and C, float32 compute, dstate 16 after padding); "triton": always the Triton backward
    "gluon_bwd_warps": 4,  # warps per program of the Gluon backward (8 channels a warp; fewer where a group
    # of B, C has fewer channels)
    "gluon_bwd_maxnreg": None,  # register cap of the Gluon backward
    "direct_launch": True,  # on CUDA tensors, launch each compiled kernel through its own launcher,
    # without Triton's argument binding (see ``_launch``); False: every launch through Triton's
}


def probe() -> str | None:
    return None  # torch imported above; CUDA is optional


def configure(**options: Any) -> None:
    """Set backend options (see ``_options``): ``device``, ``kernels`` ("auto", "triton", "torch"),
    ``steps``, ``warps``, ``block_d``, ``prefetch``, ``bwd_block_d``, ``ck``, ``min_warps``,
    ``bwd_min_warps``, ``maxnreg``, ``bwd_maxnreg``, ``fwd_kernel`` ("triton", "gluon"),
    ``gluon_warps``, ``gluon_steps``, ``gluon_maxnreg``, ``gluon_cpt``, ``gluon_bc16``, ``gluon_swizzle``, ``gluon_shfl_sum``, ``bwd_kernel`` ("triton", "gluon"), ``gluon_bwd_warps``,
    ``gluon_bwd_maxnreg``, ``direct_launch``; unknown names are a TypeError."""
    unknown = set(options) - set(_options)
    if unknown:
        raise TypeError(f"unknown torch backend option(s) {', '.join(sorted(unknown))}; known: {', '.join(_options)}")
    if options.get("kernels", "auto") not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {options['kernels']!r}")
    if options.get("gluon_cpt", 1) not in (1, 2):
        raise ValueError(f"gluon_cpt must be 1 or 2, got {options['gluon_cpt']!r}")
    for name in ("fwd_kernel", "bwd_kernel"):
        if options.get(name, "triton") not in ("triton", "gluon"):
            raise ValueError(f"{name} must be 'triton' or 'gluon', got {options[name]!r}")
    _options.update(options)


def namespace() -> Any:
    import array_api_compat.torch as xp

    return xp


def _device() -> torch.device:
    if _options["device"] is not None:
        return torch.device(_options["device"])
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_native(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def asarray(x: Any) -> torch.Tensor:
    """A tensor of ``x`` on the configured device (CUDA arrays of other libraries through DLPack)."""
    if isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "__dlpack__") and type(x).__module__.split(".")[0] != "numpy":
        return torch.from_dlpack(x)
    return torch.as_tensor(x, device=_device())


def to_numpy(x: torch.Tensor) -> Any:
    x = x.detach()
    if x.dtype == torch.bfloat16:
        x = x.float()  # NumPy has no bfloat16
    return x.cpu().numpy()


def _use_triton(x: torch.Tensor) -> bool:
    kernels = _options["kernels"]
    return kernels == "triton" or (kernels == "auto" and x.is_cuda)


def _compute_dtype(*arrays: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(a is not None and a.dtype == torch.float64 for a in arrays) else torch.float32


# ----------------------------------------------------------------------------- plain torch


def _torch_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, method):
    """The scan as a loop of torch ops over time (autograd differentiates it)."""
    ct = _compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    u_, delta_, A_, B_, C_ = (t.to(ct) for t in (u, delta, A, B, C))
    dt = delta_ if delta_bias is None else delta_ + delta_bias.to(ct)[:, None]
    xp = namespace()
    if delta_softplus:
        dt = disc.softplus(xp, dt)
    batch, dim, seqlen = u.shape

    def at(M, t):  # (batch or 1, dim, dstate) at time t
        if M.ndim == 2:
            return M[None]
        return M[:, :, :, t].repeat_interleave(dim // M.shape[1], dim=1)

    h = (
        torch.zeros(batch, dim, A.shape[1], dtype=ct, device=u.device)
        if initial_state is None
        else initial_state.to(ct)
    )
    ys = []
    for t in range(seqlen):
        abar, bcoef = disc.coefficients(xp, dt[:, :, t, None], A_, method)
        h = abar * h + bcoef * at(B_, t) * u_[:, :, t, None]
        ys.append((h * at(C_, t)).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else torch.zeros_like(u_)
    if D is not None:
        y = y + D.to(ct)[:, None] * u_
    if z is not None:
        y = y * torch.nn.functional.silu(z.to(ct))
    return y.to(u.dtype), h


# ----------------------------------------------------------------------------- Triton path


def _kernels():
    from . import triton_kernels  # imported on first use: triton reads TRITON_INTERPRET at import

    return triton_kernels


#: compiled kernels by specialisation, launched without Triton's argument binding (see ``_launch``)
_COMPILED: dict[tuple, Any] = {}


@functools.cache
def _knobs_runtime() -> Any:
    """Triton's run-time knobs (its launch hooks), or None where this Triton has none (before 3.4)."""
    try:
        from triton import knobs
    except ImportError:
        return None
    return getattr(knobs, "runtime", None)


def _no_hook(hook: Any) -> bool:
    """Whether a Triton launch hook is unset: None, or an empty chain of hooks (Triton 3.5 and later)."""
    return hook is None or not getattr(hook, "calls", True)


@functools.cache
def _raw_stream() -> Any:
    """``device index -> the current CUDA stream's handle``: torch's raw getter (what Triton's
    own launcher calls), a fraction of ``torch.cuda.current_stream``'s host time."""
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return get if get is not None else (lambda index: torch.cuda.current_stream(index).cuda_stream)


def _spec(v: Any) -> Any:
    """What Triton specialises an argument on, or finer: a tensor's dtype and 16-byte alignment;
    an integer's being 1, a multiple of 16, and its width; any other value (flags, None) itself."""
    if isinstance(v, torch.Tensor):
        return v.dtype, v.data_ptr() % 16 == 0
    if type(v) is int:
        return v == 1, v % 16 == 0, -(2**31) <= v < 2**31, 0 <= v < 2**64
    return type(v), v


def _launch(fn: Any, grid: tuple, *args: Any, **kwargs: Any) -> None:
    """``fn[grid](*args, **kwargs)``, with a thin launch path on CUDA tensors.

    Triton's ``JITFunction.run`` binds and specialises every argument and builds a cache
    key on each launch: for the step's 22 arguments about 10 us of host time more than this
    path on the lent machine's host, paid by each launch of an eager call. Here the
    compiled kernel of each specialisation is kept under a key of everything Triton
    specialises on (``_spec`` of each argument given positionally, the compile-time
    arguments and options given by name, the device) and launched through its own ``run``
    with the arguments in the kernel's order, as Triton 3.3 and later launch it. The first
    call of a specialisation, a call with a launch hook installed (a profiler's), CPU tensors
    (the interpreter) and ``direct_launch=False`` go through Triton.
    """
    lead = args[0]
    key = None
    if lead.is_cuda and _options["direct_launch"]:
        names = getattr(fn, "arg_names", None)
        rest = () if names is None else names[len(args) :]
        if names is not None and all(n in kwargs for n in rest):
            named = tuple(kwargs[n] for n in rest)
            launch_options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in rest))
            key = (fn, lead.device.index, tuple(_spec(a) for a in args), named, launch_options)
            compiled = _COMPILED.get(key)
            runtime = _knobs_runtime()
            if (
                compiled is not None
                and runtime is not None
                and _no_hook(runtime.launch_enter_hook)
                and _no_hook(runtime.launch_exit_hook)
            ):
                g = (*grid, 1, 1)
                compiled.run(
                    g[0], g[1], g[2], _raw_stream()(lead.device.index), compiled.function,
                    compiled.packed_metadata, None, None, None, *args, *named,
                )  # fmt: skip
                return
    compiled = fn[grid](*args, **kwargs)
    if key is not None and all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
        _COMPILED[key] = compiled


def _cdt(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _bc_form(M: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(batch, groups, dstate, seqlen) -> (batch, groups, seqlen, dstate) contiguous; (dim, dstate) as is."""
    if M.ndim == 2:
        return M.contiguous(), False
    return M.transpose(-1, -2).contiguous(), True


def _n_sm(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _chunking(programs: int, warps: int, seqlen: int, ck: int, threshold: int, target: int) -> tuple[int, int]:
    """(chunks, chunk_len): with fewer than ``threshold`` warps of channels, cut the sequence
    into enough chunks for ``target`` warps (at least 4 checkpoint intervals a chunk; a
    chunk starts on a checkpoint)."""
    chunks = 1
    if programs * warps < threshold and seqlen > 8 * ck:
        chunks = min(_cdiv(target, programs * warps), _cdiv(seqlen, 4 * ck))
    chunk_len = _cdiv(_cdiv(seqlen, chunks), ck) * ck
    return _cdiv(seqlen, chunk_len), chunk_len


def _layout(
    batch: int, dim: int, seqlen: int, dim_per_group: int, device: torch.device, dstate: int = 16, ck: int | None = None
) -> dict[str, int]:
    """The forward's blocking and sequence chunks for one problem.

    ``steps=4``: a (BLOCK_D, 4) tile is one 16-byte vector a thread, so the compiler gives
    each thread one channel and its dstate states (32 channels a warp). ``steps=16``: 16
    bytes a lane cover 4 steps, 4 lanes a row, and the states of a channel spread over
    dstate/4 lanes. A program's channels share one group of B, C. ``ck``: the checkpoint
    interval (default: the ``ck`` option).
    """
    ck = ck or _options["ck"]
    steps = _options["steps"]
    if steps not in (4, 16):
        raise ValueError(f"steps must be 4 or 16, got {steps}")
    if ck % 4:
        raise ValueError(f"the checkpoint interval ck must be a multiple of 4, got {ck}")
    if ck % steps:
        steps = 4  # a checkpoint is stored at the start of a tile
    block_d = _options["block_d"] or (32 * _options["warps"] if steps == 4 else 32)
    while block_d > 1 and dim_per_group % block_d:
        block_d //= 2  # a program's channels share one group of B and C
    lanes = 1 if steps == 4 else min(32, max(1, dstate // 4))
    warps = max(1, min(8, block_d * lanes // 32))
    d_blocks = _cdiv(dim, block_d)
    threshold = _options["min_warps"] or 8 * _n_sm(device)
    chunks, chunk_len = _chunking(batch * d_blocks, warps, seqlen, ck, threshold, 2 * threshold)
    return {
        "block_d": block_d,
        "warps": warps,
        "ck": ck,
        "steps": steps,
        "d_blocks": d_blocks,
        "chunks": chunks,
        "chunk_len": chunk_len,
    }


def _bwd_layout(batch: int, dim: int, seqlen: int, dim_per_group: int, device: torch.device, dstate: int):
    """The backward's blocking (16-step tiles, dstate/4 lanes a channel; a program within one group) and chunks."""
    block_d, warps = _blocking(_options["bwd_block_d"], dim_per_group, dstate)
    d_blocks = _cdiv(dim, block_d)
    ck = _options["ck"]
    threshold = _options["bwd_min_warps"] or 16 * _n_sm(device)
    chunks, chunk_len = _chunking(batch * d_blocks, warps, seqlen, ck, threshold, threshold)
    return {
        "block_d": block_d,
        "warps": warps,
        "ck": ck,
        "steps": 16 if ck % 16 == 0 else 4,  # the backward's sub-tiles are 4 steps
        "d_blocks": d_blocks,
        "chunks": chunks,
        "chunk_len": chunk_len,
    }


def _blocking(block_d: int, dim_per_group: int, dstate: int) -> tuple[int, int]:
    """Channels per program (a power of two dividing the channels of a group) and its warps."""
    while block_d > 1 and dim_per_group % block_d:
        block_d //= 2  # a program's channels must share one group of B and C
    lanes = min(32, max(1, dstate // 4))
    return block_d, max(1, min(8, block_d * lanes // 32))


def _chain_chunks(k, S, P, first, ct, lay, batch, dim, chunks, dstate, reverse):
    """The state entering every chunk (the adjoint with ``reverse``), (chunks, batch, dim, dstate).

    ``S`` and ``P`` are each chunk's affine map ``h_out = P h_in + S`` from the first pass;
    ``first`` is the state entering the sequence (the adjoint leaving it), or None for zeros.
    """
    entering = torch.empty_like(S)
    _launch(
        k._chunk_combine_kernel,
        (lay["d_blocks"], batch),
        entering,
        S,
        P,
        first.to(ct).contiguous() if first is not None else S,
        dim,
        chunks,
        DSTATE=dstate,
        BLOCK_D=lay["block_d"],
        HAS_FIRST=first is not None,
        REVERSE=reverse,
        num_warps=lay["warps"],
    )
    return entering


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _flags(D, z, delta_bias, softplus, method, B_vary, C_vary, ct):
    return {
        "MODE": _kernels().MODES[method],
        "SOFTPLUS": bool(softplus),
        "HAS_D": D is not None,
        "HAS_Z": z is not None,
        "HAS_BIAS": delta_bias is not None,
        "B_VARY": B_vary,
        "C_VARY": C_vary,
        "CDT": _cdt(ct),
    }


def _dummy(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(1, dtype=dtype or x.dtype, device=x.device)


def _fwd_flags(method, B_vary, C_vary, ct, on_gpu):
    """The forward's compile-time flags; the options (D, z, bias, softplus, states) are run-time."""
    return {
        "MODE": _kernels().MODES[method],
        "B_VARY": B_vary,
        "C_VARY": C_vary,
        "CDT": _cdt(ct),
        # inline assembly (prefetch hints, the bare exp2) only where compiled for a GPU
        "PF": _options["prefetch"] if on_gpu else 0,
        "FAST": on_gpu and ct == torch.float32,
    }


def _gluon_layout(batch, dim, seqlen, dim_per_group, dstate, ct, B_vary, C_vary, device, ck=None):
    """The Gluon forward's blocking and chunks, or None where it does not apply (the Triton forward runs).

    It serves selective B and C (packed together in float32) with float32 compute and a
    power-of-two dstate of 4 to 64: SPT = 4 states a lane, dstate/4 lanes a channel,
    32·4/dstate channels a warp; a program's channels lie within one group.
    """
    if _options["fwd_kernel"] != "gluon" or device.type != "cuda":
        return None  # Gluon kernels run compiled only (the interpreter does not run them)
    if not (B_vary and C_vary) or ct != torch.float32:
        return None
    if dstate not in (4, 8, 16, 32, 64):
        return None
    spt = 4
    lpc = dstate // spt
    warps, cpt = _options["gluon_warps"], _options["gluon_cpt"]
    block_d = cpt * (32 // lpc) * warps
    steps, ck = _options["gluon_steps"], ck or _options["ck"]
    if ck % steps and steps % ck == 0:
        steps = ck  # checkpoints (for the Gluon backward, every 16 steps) at tile starts: shorter tiles
    if dim_per_group % block_d or steps % lpc or ck % steps or steps & (steps - 1):
        return None
    threshold = _options["min_warps"] or 8 * _n_sm(device)
    chunks, chunk_len = _chunking(batch * (dim // block_d), warps, seqlen, ck, threshold, 2 * threshold)
    return {
        "block_d": block_d,
        "warps": warps,
        "ck": ck,
        "steps": steps,
        "d_blocks": dim // block_d,
        "chunks": chunks,
        "chunk_len": chunk_len,
        "gluon": {"SPT": spt, "LPC": lpc, "W": warps, "STEPS": steps, "BCT": min(32, 2 * dstate // 4), "CPT": cpt,
                  "SWIZZLE": bool(_options["gluon_swizzle"]), "SHFL_SUM": bool(_options["gluon_shfl_sum"])},
    }


#: the Gluon backward's tile, which is also its checkpoint interval
GLUON_BWD_STEPS = 16


def _gluon_bwd_layout(batch, dim, seqlen, dim_per_group, dstate, ct, B_vary, C_vary, method, device):
    """The Gluon backward's blocking and chunks, or None where it does not apply (the Triton backward runs).

    It serves mamba's discretisation with selective B and C, float32 compute and dstate 16
    (after padding): 4 lanes a channel, 8 channels a warp, ``gluon_bwd_warps`` warps a program
    (halved until a program's channels lie within one group, down to one warp); its
    checkpoints are the state before every 16th step.
    """
    if _options["bwd_kernel"] != "gluon" or device.type != "cuda":
        return None  # Gluon kernels run compiled only
    if not (B_vary and C_vary) or ct != torch.float32 or dstate != 16 or method != "mamba":
        return None
    warps = _options["gluon_bwd_warps"]
    while warps > 1 and dim_per_group % (8 * warps):
        warps //= 2  # a program's channels must share one group of B and C
    block_d = 8 * warps
    if dim_per_group % block_d:
        return None
    ck = GLUON_BWD_STEPS
    threshold = _options["bwd_min_warps"] or 16 * _n_sm(device)
    chunks, chunk_len = _chunking(batch * (dim // block_d), warps, seqlen, ck, threshold, threshold)
    return {
        "block_d": block_d,
        "warps": warps,
        "ck": ck,
        "steps": ck,
        "d_blocks": dim // block_d,
        "chunks": chunks,
        "chunk_len": chunk_len,
    }


def _bc_packed(B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """(batch, groups, dstate, seqlen) B and C -> (batch, groups, seqlen, 2, dstate), one row a step:
    in their own 16-bit dtype where both share one (the Gluon kernels widen them as they read
    them: half the shared-memory traffic of their per-step rows, which bounds the forward),
    else float32."""
    batch, groups, dstate, seqlen = B.shape
    half = _options["gluon_bc16"] and B.dtype == C.dtype and B.dtype in (torch.bfloat16, torch.float16)
    dtype = B.dtype if half else torch.float32
    bc = torch.empty(batch, groups, seqlen, 2, dstate, dtype=dtype, device=B.device)
    bc[:, :, :, 0, :].copy_(B.transpose(-1, -2))
    bc[:, :, :, 1, :].copy_(C.transpose(-1, -2))
    return bc


def _triton_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, method, keep_ckpt):
    """Returns out, last_state and, with keep_ckpt, what the backward needs (checkpoints, layout)."""
    k = _kernels()
    ct = _compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    u, delta = u.contiguous(), delta.contiguous()
    z = None if z is None else z.contiguous()
    A = A.contiguous()
    B_vary, C_vary = B.ndim == 4, C.ndim == 4
    groups = B.shape[1] if B_vary else (C.shape[1] if C_vary else 1)
    # with the Gluon backward to follow, checkpoints every GLUON_BWD_STEPS steps
    gbwd = keep_ckpt and _gluon_bwd_layout(
        batch, dim, seqlen, dim // groups, dstate, ct, B_vary, C_vary, method, u.device
    ) is not None
    ck = GLUON_BWD_STEPS if gbwd else None
    lay = _gluon_layout(batch, dim, seqlen, dim // groups, dstate, ct, B_vary, C_vary, u.device, ck)
    if lay is None:
        lay = _layout(batch, dim, seqlen, dim // groups, u.device, dstate, ck)
    gluon = lay.get("gluon")
    Bt = Ct = packed = None
    if gluon is None or (keep_ckpt and not gbwd):  # the Triton kernels read B, C as (batch, groups, seqlen, dstate)
        Bt, _ = _bc_form(B)
        Ct, _ = _bc_form(C)
    if gluon is not None or gbwd:  # the Gluon kernels read them packed
        packed = _bc_packed(B, C)
    chunks, chunk_len = lay["chunks"], lay["chunk_len"]
    n_ckpt = _cdiv(seqlen, lay["ck"])
    out = torch.empty_like(u)
    h_final = torch.empty(chunks, batch, dim, dstate, dtype=ct, device=u.device)
    ckpt = torch.empty(batch, n_ckpt, dim, dstate, dtype=ct, device=u.device) if keep_ckpt else _dummy(u, ct)
    grid = (lay["d_blocks"], batch, chunks)
    if gluon is None:
        kernel = k._scan_fwd_kernel
        common = dict(
            DSTATE=dstate,
            BLOCK_D=lay["block_d"],
            STEPS=lay["steps"],
            CK=lay["ck"],
            num_warps=lay["warps"],
            **_fwd_flags(method, B_vary, C_vary, ct, u.is_cuda),
        )
        if _options["maxnreg"] and u.is_cuda:
            common["maxnreg"] = _options["maxnreg"]
        bc = (Bt, Ct)
    else:
        from . import gluon_kernels  # imported on first use, like the Triton kernels

        kernel = gluon_kernels._scan_fwd_gluon
        common = dict(
            DSTATE=dstate,
            CK=lay["ck"],
            MODE=k.MODES[method],
            # inline assembly (prefetch hints, the bare exp2) only where compiled for a GPU
            PF=2 * _options["prefetch"] if u.is_cuda else 0,
            FAST=u.is_cuda,
            num_warps=lay["warps"],
            **gluon,
        )
        if _options["gluon_maxnreg"]:
            common["maxnreg"] = _options["gluon_maxnreg"]
        bc = (packed,)
    pointers = (
        u,
        delta,
        z if z is not None else u,
        out,
        A,
        *bc,
        D if D is not None else A,
        delta_bias if delta_bias is not None else A,
    )
    sizes = (dim, seqlen, chunk_len, n_ckpt, dim // groups, groups)
    options = (int(bool(softplus)), int(D is not None), int(z is not None), int(delta_bias is not None))
    if chunks > 1:
        S = torch.empty_like(h_final)
        P = torch.empty_like(h_final)
        _launch(kernel, grid, *pointers, S, S, P, ckpt, *sizes, 0, 0, *options, STATE_ONLY=True, **common)
        h_init = _chain_chunks(k, S, P, initial_state, ct, lay, batch, dim, chunks, dstate, reverse=False)
        has_init = True
    else:
        h_init = initial_state.to(ct).contiguous() if initial_state is not None else h_final
        has_init = initial_state is not None
    _launch(
        kernel,
        grid,
        *pointers,
        h_init,
        h_final,
        h_final,
        ckpt,
        *sizes,
        int(has_init),
        int(keep_ckpt),
        *options,
        STATE_ONLY=False,
        **common,
    )
    saved = None
    if keep_ckpt:
        saved = {"ckpt": ckpt, "layout": lay, "Bt": Bt, "Ct": Ct, "groups": groups, "packed": packed if gbwd else None}
    return out, h_final[-1], saved


def _group_sum(part: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-program partial sums (programs along dim, ...) summed over each group's programs, in a
    fixed order: (groups, ...)."""
    return part.view(groups, part.shape[0] // groups, *part.shape[1:]).sum(1)


def _bc_from_rows(rows: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """A selective B or C gradient from its (groups, batch, seqlen, dstate) rows: (batch, groups, dstate, seqlen)."""
    return rows.permute(1, 0, 3, 2).to(M.dtype).contiguous()


def _like(grad: torch.Tensor, arg: torch.Tensor | None) -> torch.Tensor | None:
    """``grad`` in the dtype of its argument, or None for an absent argument."""
    return None if arg is None else grad.to(arg.dtype)


def _chunk_adjoints(launch, k, lay, dlast_state, ct, batch, dim, dstate, per_state, dummy):
    """(the adjoint leaving each chunk, given): with several chunks, a first pass of the backward
    (``launch(..., adjoint_only=True)``: each chunk's adjoint from zero and its decay) chained
    from ``dlast_state``; with one, ``dlast_state`` itself."""
    if lay["chunks"] > 1:
        S, P = per_state(), per_state()
        launch(dummy, S, P, False, adjoint_only=True)
        return _chain_chunks(k, S, P, dlast_state, ct, lay, batch, dim, lay["chunks"], dstate, reverse=True), True
    if dlast_state is None:
        return dummy, False
    return dlast_state.to(ct).contiguous(), True


def _triton_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, method, saved):
    k = _kernels()
    ct = _compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    if saved.get("packed") is not None:
        return _gluon_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, method, saved)
    ckpt, Bt, Ct, groups = saved["ckpt"], saved["Bt"], saved["Ct"], saved["groups"]
    # the backward blocks channels and cuts the sequence its own way (checkpoints are global)
    lay = _bwd_layout(batch, dim, seqlen, dim // groups, u.device, dstate)
    if lay["ck"] != saved["layout"]["ck"]:
        raise ValueError("the checkpoint interval ck changed between the forward and the backward")
    B_vary, C_vary = B.ndim == 4, C.ndim == 4
    chunks, chunk_len, d_blocks = lay["chunks"], lay["chunk_len"], lay["d_blocks"]
    u, delta, dout = u.contiguous(), delta.contiguous(), dout.contiguous()
    z = None if z is None else z.contiguous()
    dev = u.device
    du = torch.empty_like(u)
    ddelta = torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    per_state = lambda: torch.empty(chunks, batch, dim, dstate, dtype=ct, device=dev)
    dA = per_state()
    dB = torch.empty(d_blocks, batch, seqlen, dstate, dtype=ct, device=dev) if B_vary else per_state()
    dC = torch.empty(d_blocks, batch, seqlen, dstate, dtype=ct, device=dev) if C_vary else per_state()
    dD = torch.empty(chunks, batch, dim, dtype=ct, device=dev) if D is not None else None
    dbias = torch.empty(chunks, batch, dim, dtype=ct, device=dev) if delta_bias is not None else None
    g_final = per_state()
    programs = d_blocks * batch * chunks
    scratch = torch.empty(programs, lay["ck"] // 4, lay["block_d"], dstate, dtype=ct, device=dev)
    flags = _flags(D, z, delta_bias, softplus, method, B_vary, C_vary, ct)
    grid = (d_blocks, batch, chunks)
    common = dict(
        DSTATE=dstate, BLOCK_D=lay["block_d"], STEPS=lay["steps"], CK=lay["ck"], num_warps=lay["warps"], **flags
    )
    common["FAST"] = u.is_cuda and ct == torch.float32  # the bare exp2 (inline assembly: compiled code only)
    if _options["bwd_maxnreg"] and u.is_cuda:
        common["maxnreg"] = _options["bwd_maxnreg"]
    inputs = (
        dout,
        u,
        delta,
        z if z is not None else u,
        A.contiguous(),
        Bt,
        Ct,
        D if D is not None else A,
        delta_bias if delta_bias is not None else A,
    )
    sizes = (dim, seqlen, chunk_len, ckpt.shape[1] if ckpt.ndim == 4 else 1, dim // groups, groups)
    dummy = _dummy(u, ct)

    def launch(g_in, g_out, decay, has_g_in, adjoint_only):
        _launch(
            k._scan_bwd_kernel,
            grid,
            *inputs,
            ckpt,
            g_in,
            scratch,
            du,
            ddelta,
            dz if dz is not None else du,
            dA,
            dB,
            dC,
            dD if dD is not None else dummy,
            dbias if dbias is not None else dummy,
            g_out,
            decay,
            *sizes,
            int(has_g_in),
            ADJOINT_ONLY=adjoint_only,
            **common,
        )

    g_init, has_g = _chunk_adjoints(launch, k, lay, dlast_state, ct, batch, dim, dstate, per_state, dummy)
    launch(g_init, g_final, dummy, has_g, adjoint_only=False)

    def bc_grad(part, vary, M):
        if not vary:
            return part.sum(dim=(0, 1)).to(M.dtype)
        return _bc_from_rows(_group_sum(part, groups), M)

    return (
        du,
        ddelta,
        dA.sum(dim=(0, 1)).to(A.dtype),
        bc_grad(dB, B_vary, B),
        bc_grad(dC, C_vary, C),
        None if D is None else dD.sum(dim=(0, 1)).to(D.dtype),
        dz,
        None if delta_bias is None else dbias.sum(dim=(0, 1)).to(delta_bias.dtype),
        _like(g_final[0], initial_state),
    )


def _gluon_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, method, saved):
    """The backward through the Gluon kernel (see ``gluon_kernels._scan_bwd_gluon``), from the
    forward's checkpoints (every GLUON_BWD_STEPS steps) and its packed B, C."""
    from . import gluon_kernels

    k = _kernels()
    ct = torch.float32
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    ckpt, packed, groups = saved["ckpt"], saved["packed"], saved["groups"]
    lay = _gluon_bwd_layout(batch, dim, seqlen, dim // groups, dstate, ct, True, True, method, u.device)
    if lay is None or saved["layout"]["ck"] != lay["ck"]:
        raise ValueError("the backward's options changed between the forward and the backward")
    chunks, chunk_len, d_blocks = lay["chunks"], lay["chunk_len"], lay["d_blocks"]
    u, delta, dout = u.contiguous(), delta.contiguous(), dout.contiguous()
    z = None if z is None else z.contiguous()
    dev = u.device
    du = torch.empty_like(u)
    ddelta = torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    per_state = lambda: torch.empty(chunks, batch, dim, dstate, dtype=ct, device=dev)
    dA = per_state()
    dbc = torch.empty(d_blocks, batch, seqlen, 2, dstate, dtype=ct, device=dev)
    per_channel = torch.empty(2, chunks, batch, dim, dtype=ct, device=dev)  # dD, dbias
    g_final = per_state()
    dummy = _dummy(u, ct)
    common = {
        "DSTATE": dstate, "W": lay["warps"], "STEPS": lay["steps"], "HAS_Z": z is not None, "BCT": 8, "FAST": True,
        "SWIZZLE": bool(_options["gluon_swizzle"]), "num_warps": lay["warps"],
    }
    if _options["gluon_bwd_maxnreg"]:
        common["maxnreg"] = _options["gluon_bwd_maxnreg"]
    inputs = (
        dout,
        u,
        delta,
        z if z is not None else u,
        A.contiguous(),
        packed,
        D if D is not None else A,
        delta_bias if delta_bias is not None else A,
        ckpt,
    )
    sizes = (dim, seqlen, chunk_len, ckpt.shape[1], dim // groups, groups)
    flags = (int(bool(softplus)), int(D is not None), int(delta_bias is not None))
    grid = (d_blocks, batch, chunks)

    def launch(g_in, g_out, decay, has_g_in, adjoint_only):
        _launch(
            gluon_kernels._scan_bwd_gluon,
            grid,
            *inputs,
            g_in,
            du,
            ddelta,
            dz if dz is not None else du,
            dA,
            dbc,
            per_channel[0],
            per_channel[1],
            g_out,
            decay,
            *sizes,
            int(has_g_in),
            *flags,
            ADJOINT_ONLY=adjoint_only,
            **common,
        )

    g_init, has_g = _chunk_adjoints(launch, k, lay, dlast_state, ct, batch, dim, dstate, per_state, dummy)
    launch(g_init, g_final, dummy, has_g, adjoint_only=False)

    per_group = _group_sum(dbc, groups)  # (groups, batch, seqlen, 2, dstate)
    return (
        du,
        ddelta,
        dA.sum(dim=(0, 1)).to(A.dtype),
        _bc_from_rows(per_group[..., 0, :], B),
        _bc_from_rows(per_group[..., 1, :], C),
        None if D is None else per_channel[0].sum(dim=(0, 1)).to(D.dtype),
        dz,
        None if delta_bias is None else per_channel[1].sum(dim=(0, 1)).to(delta_bias.dtype),
        _like(g_final[0], initial_state),
    )


class _ScanFunction(torch.autograd.Function):
    """The Triton scan as an autograd node: forward keeps checkpoints, backward runs the Gluon or the Triton backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, method):
        out, last, saved = _triton_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, method, True)
        # an output's unused gradient stays None (no zeros filled): the backward reads an absent
        # dlast as zeros, an absent dout as zeros
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            u, delta, A, B, C, D, z, delta_bias, initial_state, saved["ckpt"], saved["Bt"], saved["Ct"], saved["packed"]
        )
        ctx.layout, ctx.groups, ctx.softplus, ctx.method = saved["layout"], saved["groups"], softplus, method
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt, Bt, Ct, packed = ctx.saved_tensors
        saved = {"ckpt": ckpt, "layout": ctx.layout, "Bt": Bt, "Ct": Ct, "groups": ctx.groups, "packed": packed}
        if dout is None:
            dout = torch.zeros_like(u)
        grads = _triton_bwd(
            dout, dlast, u, delta, A, B, C, D, z, delta_bias, ctx.softplus, initial_state, ctx.method, saved
        )
        return (*grads, None, None)


def _pad_states(dstate: int, A, B, C, state, time_axis: bool):
    """Pad dstate to a power of two (the kernels' tiles): zero A, B, C and state rows stay zero.

    ``time_axis``: B, C carry a trailing time axis (the scan's forms) rather than none (the step's).
    """
    extra = (1 << (dstate - 1).bit_length()) - dstate
    if extra == 0:
        return A, B, C, state
    pad = torch.nn.functional.pad

    def bc(M):
        return pad(M, (0, 0, 0, extra)) if (M.ndim == 4 and time_axis) else pad(M, (0, extra))

    return pad(A, (0, extra)), bc(B), bc(C), None if state is None else pad(state, (0, extra))


def scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, discretization):
    """The selective scan on tensors; differentiable (see :mod:`portassm.backends` for the argument forms)."""
    if not _use_triton(u):
        return _torch_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, discretization)
    dstate = A.shape[1]
    A, B, C, initial_state = _pad_states(dstate, A, B, C, initial_state, True)  # differentiable
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args):
        out, last = _ScanFunction.apply(*args, bool(delta_softplus), discretization)
    else:
        out, last, _ = _triton_fwd(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, discretization, False
        )
    return out, (last if last.shape[-1] == dstate else last[..., :dstate].contiguous())


def scan_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, discretization):
    """Gradients ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state)`` (None for absent arguments)."""
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if _use_triton(u):
        dstate = A.shape[1]
        padded = _pad_states(dstate, A, B, C, initial_state, True)
        if padded[0] is not A:  # pad, then cut each state-sized gradient back to dstate
            extra = padded[0].shape[1] - dstate
            dlast = None if dlast_state is None else torch.nn.functional.pad(dlast_state, (0, extra))
            grads = list(
                scan_bwd(
                    dout,
                    dlast,
                    u,
                    delta,
                    padded[0],
                    padded[1],
                    padded[2],
                    D,
                    z,
                    delta_bias,
                    delta_softplus,
                    padded[3],
                    discretization,
                )
            )
            grads[2] = grads[2][:, :dstate].contiguous()
            for i in (3, 4):
                g = grads[i]
                grads[i] = (g[:, :, :dstate] if g.ndim == 4 else g[:, :dstate]).contiguous()
            if grads[8] is not None:
                grads[8] = grads[8][..., :dstate].contiguous()
            return tuple(grads)
        with torch.no_grad():
            _, _, saved = _triton_fwd(
                u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, discretization, True
            )
            return _triton_bwd(
                dout,
                dlast_state,
                u,
                delta,
                A,
                B,
                C,
                D,
                z,
                delta_bias,
                delta_softplus,
                initial_state,
                discretization,
                saved,
            )
    leaves = [None if a is None else a.detach().requires_grad_(True) for a in args]
    with torch.enable_grad():
        out, last = _torch_scan(*leaves[:8], delta_softplus, leaves[8], discretization)
        wanted = [a for a in leaves if a is not None]
        outputs, cotangents = [out], [dout]
        if dlast_state is not None:
            outputs.append(last)
            cotangents.append(dlast_state.to(last.dtype))
        grads = iter(torch.autograd.grad(outputs, wanted, cotangents, allow_unused=True))
    result = []
    for a in leaves:
        if a is None:
            result.append(None)
            continue
        g = next(grads)
        result.append(torch.zeros_like(a) if g is None else g.detach())
    return tuple(result)


def scan_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, discretization):
    """One token: ``(y, new_state)``; the state given is not modified."""
    if not _use_triton(x):
        as_seq = lambda M: M if M.ndim == 2 else M[..., None]
        out, new = _torch_scan(
            x[..., None],
            dt[..., None],
            A,
            as_seq(B),
            as_seq(C),
            D,
            None if z is None else z[..., None],
            dt_bias,
            dt_softplus,
            state,
            discretization,
        )
        return out[..., 0], new.to(state.dtype)
    dstate = A.shape[1]
    A, B, C, padded = _pad_states(dstate, A, B, C, state, False)
    y, new_state = _triton_step(padded, x, dt, A, B, C, D, z, dt_bias, dt_softplus, discretization)
    return y, (new_state if padded is state else new_state[..., :dstate].contiguous())


def _triton_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, discretization):
    """One token through ``_scan_step_kernel``; the launch path is kept thin for decoding.

    Decoding launches this kernel once a token and layer, and Triton's launcher costs more
    host time than the kernel's 5 us on the GPU: on CUDA tensors it is launched through
    ``_launch``'s direct path, and the wrapper does not re-validate its arguments.
    """
    batch, dim = x.shape
    B_vary, C_vary = B.ndim == 3, C.ndim == 3
    groups = B.shape[1] if B_vary else (C.shape[1] if C_vary else 1)
    block_d = 32
    while block_d > 1 and (dim // groups) % block_d:
        block_d //= 2
    state, x, dt, A, B, C = (t.contiguous() for t in (state, x, dt, A, B, C))
    y = torch.empty_like(x)
    new_state = torch.empty_like(state)
    ct = _compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    flags = _flags(D, z, dt_bias, dt_softplus, discretization, B_vary, C_vary, ct)
    ptrs = (state, x, dt, x if z is None else z.contiguous(), A, B, C, A if D is None else D,
            A if dt_bias is None else dt_bias, y, new_state)
    ints = (dim, dim // groups, groups)
    grid = (_cdiv(dim, block_d), batch)
    _launch(_kernels()._scan_step_kernel, grid, *ptrs, *ints, DSTATE=A.shape[1], BLOCK_D=block_d, num_warps=1, **flags)
    return y, new_state
