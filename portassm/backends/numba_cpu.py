"""The numba backend: fused selective-scan kernels for the CPU, compiled by numba.

Arrays are NumPy arrays (the helpers of :mod:`portassm.backends._host`); the kernels are
``@njit(parallel=True, cache=True)`` functions, one per discretisation (a compile-time
constant), each specialised by numba to float32 or float64 and to the form of B and C.

How the forward pass is laid out
--------------------------------
One (batch, channel) row is a sequential recurrence over time, so the parallelism is
across channels: a *block* of ``LANES`` = 16 adjacent channels of one batch row is one
``prange`` job, and inside it the innermost loop runs over the 16 channels, which LLVM
turns into two AVX2 vectors (one AVX-512 vector). Vectorising across channels rather
than across ``dstate`` means:

* no horizontal sums: ``y = sum_n C h`` accumulates lane-wise, one vector per state;
* the per-(channel, time) work (softplus, Δu, D u, the gate) is vectorised too;
* B[b, g, n, t] and C[b, g, n, t] are one scalar per block and (n, t), broadcast to the
  lanes (a block never straddles two groups: blocks are cut inside groups).

A block walks the sequence in chunks of ``CHUNK`` steps: it first computes Δ, Δu and
D u of the chunk for its 16 channels into small scratch arrays (read row-wise from u and
delta, which are contiguous along time), then runs the recurrence over the chunk with h
in a (dstate, 16) scratch array that stays in L1, then applies the gate and writes out.
Nothing of size (batch, dim, seqlen, dstate) exists at any point: the memory traffic is
reading u, delta, z, B, C once and writing out once.

Time indices that are not a ``range`` variable are cast to ``uint64``: numba wraps a
negative signed index around (``i + n`` when ``i < 0``), a select that keeps LLVM from
seeing consecutive addresses, so a loop over ``u[b, d, t0 + tt]`` ran scalar (4x slower
than with ``u[b, d, uint64(t0 + tt)]``, which numba knows cannot be negative).

The exponential per (b, d, t, n) dominates. float32 uses the vectorisable power-of-two
polynomial of :mod:`portassm.backends.numba_kernels` with A pre-multiplied by log2(e);
float64 calls libm.

The backward pass
-----------------
The paper's recomputation, per block: pass 1 runs the recurrence over the whole
sequence and keeps only the state at the start of every chunk of ``CHUNK`` steps
(``(seqlen/CHUNK, dstate, 16)`` per block, released with it: O(batch·dim·dstate·seqlen/CHUNK)
in all); pass 2 walks the chunks backwards, recomputes the states of one chunk from its
checkpoint (and y, needed for the gate's gradient), then runs the adjoint recurrence
through it in reverse time. B's and C's gradients are sums over the channels of a group:
each lane's share is reduced over the lanes and added into a per-thread partial
(``numba.get_thread_id``), summed over threads by the wrapper: no atomics, no races.

The recurrences read every state of a step of a selective B and C at once, so the
backward gets them time-major, (batch, groups, seqlen, dstate), one or two cache lines
a step (its partial sums of dB and dC are time-major too). For mamba's discretisation
with dstate a multiple of 8, each chunk's per-lane rows (Δ, Δu, dy) are turned into
per-step lane vectors, and the adjoint's per-step outputs back into rows, by 16 x 16
tile transposes, not one scalar at a time. The inputs of the chunk walked next are
prefetched into L2 while the recompute runs: walked backwards in short pieces of many
rows, they are streams the hardware prefetchers do not follow.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
from numba import njit, prange, uint64

from . import numba_kernels as nk
from ._host import asarray, is_native, namespace, to_numpy

NAME = "numba"

__all__ = [
    "NAME", "probe", "configure", "describe", "namespace", "asarray", "to_numpy", "is_native",
    "scan_fwd", "scan_bwd", "scan_step", "causal_conv1d", "causal_conv1d_step", "SUPPORTS_RESIDUALS", "Checkpoints",
]

#: ``scan_fwd(..., save_checkpoints=True)`` returns :class:`Checkpoints`, which ``scan_bwd`` accepts
SUPPORTS_RESIDUALS = True

#: channels per block: the vector width of the innermost loops (2 x 8 float32 lanes of AVX2)
LANES = 16
#: time steps per chunk: the forward's scratch (Δ, Δu, y: CHUNK x LANES each) and the
#: backward's checkpoint interval (its chunk buffers, 2 x (CHUNK+1) x dstate x LANES, sit in L2)
CHUNK = 64

_options: dict[str, Any] = {"threads": None}


def probe() -> str | None:
    return None  # numba imported above; every CPU numba supports can run these kernels


def configure(**options: Any) -> None:
    """Backend options: ``threads``, the number of threads of the parallel kernels.

    None (the default) leaves numba's own default, which follows ``NUMBA_NUM_THREADS``
    (all cores when unset). At most ``numba.config.NUMBA_NUM_THREADS``.
    """
    unknown = set(options) - set(_options)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))} for the numba backend; known: threads")
    threads = options.get("threads")
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        limit = numba.config.NUMBA_NUM_THREADS
        if threads > limit:
            raise ValueError(
                f"threads={threads} is more than numba's pool of {limit} (set NUMBA_NUM_THREADS before starting Python)"
            )
    _options["threads"] = threads
    _apply_threads()


def _apply_threads() -> None:
    # numba's thread count is per calling thread: set it on the thread that calls the kernel
    wanted = _options["threads"]
    if wanted is not None and numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)


def describe() -> str:
    """numba's version, threads and the CPU it compiles for (for ``python -m portassm info``)."""
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    simd = "AVX-512" if features.get("avx512f") else "AVX2" if features.get("avx2") else "SSE"
    return f"numba {numba.__version__}, {numba.get_num_threads()} threads, {llvm.get_host_cpu_name()} {simd}"


def _compute_dtype(*arrays: np.ndarray | None) -> type:
    return np.float64 if any(a is not None and a.dtype == np.float64 for a in arrays) else np.float32


def _prepare(ct: type, *arrays: np.ndarray | None) -> list[np.ndarray | None]:
    """C-contiguous arrays of the compute dtype: one compiled layout per kernel, and rows contiguous in time."""
    return [None if a is None else np.ascontiguousarray(a, dtype=ct) for a in arrays]


def _per_channel(x: np.ndarray | None, dim: int, ct: type) -> np.ndarray:
    """D or delta_bias, zeros when absent (the kernels always get an array: fewer specialisations)."""
    return np.zeros(dim, ct) if x is None else x


def _blocking(dim: int, *BC: np.ndarray) -> tuple[int, int, int, int]:
    """``(segment, sub_blocks, B_group_width, C_group_width)``: blocks are cut inside every group of B and C."""
    widths = [dim if M.ndim == 2 else dim // M.shape[1] for M in BC]
    segment = math.gcd(*widths)
    return segment, -(-segment // LANES), widths[0], widths[1]


def _dummy_like(ct: type) -> np.ndarray:
    return np.zeros((1, 1, 1), ct)


# --------------------------------------------------------------------------- blocks of channels


@njit(fastmath=nk.FASTMATH, **nk.JIT)
def _block(job, nseg, nsub, segment, wb, wc):
    """``(b, d0, nl, gb, gc)`` of a prange job: batch row, first channel, live lanes, groups of B and C.

    Lanes at and past ``nl`` repeat channel ``d0 + nl - 1`` (their results are dropped).
    """
    b = job // (nseg * nsub)
    s = job % (nseg * nsub) // nsub
    d0 = s * segment + job % nsub * LANES
    return b, d0, min(LANES, (s + 1) * segment - d0), d0 // wb, d0 // wc


@njit(fastmath=nk.FASTMATH, **nk.JIT)
def _load_block(A, B, C, h0, b, d0, nl, tid, a_, as_, bl, cl, h):
    """Per-lane copies, ``[tid]`` (dstate, LANES): A, A times ``exp_scale``, time-invariant B and C, the initial state."""
    scale = nk.exp_scale(A[0, 0])
    for j in range(LANES):
        d = d0 + min(j, nl - 1)
        for n in range(A.shape[1]):
            a_[tid, n, j] = A[d, n]
            as_[tid, n, j] = A[d, n] * scale
            h[tid, n, j] = h0[b, d, n]
            if B.ndim == 2:
                bl[tid, n, j] = B[d, n]
            if C.ndim == 2:
                cl[tid, n, j] = C[d, n]


# --------------------------------------------------------------------------- forward


def _make_scan_fwd(method: int):
    # Scratch arrays are allocated once, one slice per thread (``[tid]``), outside the
    # prange and indexed without views: numba's alias analysis then finds nothing
    # aliased and marks the arrays of the loop body ``noalias``, so LLVM vectorises the
    # lane loops without runtime overlap checks. Lane loops whose body holds an
    # exponential run to the constant LANES (two 8-lane vectors, no remainder); loops
    # with a short body run to ``lanes`` (= LANES, a run-time value): LLVM fully unrolls
    # a short body of constant trip count 16 before its loop vectoriser sees it, and the
    # unrolled code stayed scalar (the backward's adjoint: 3.5x slower).
    @njit(parallel=True, fastmath=nk.FASTMATH, **nk.JIT)
    def scan_fwd_kernel(
        u, delta, A, B, C, D, z, bias, h0, softplus, has_z, segment, nsub, wb, wc, lanes, out, last, save, ckpt, nth,
    ):
        batch, dim, seqlen = u.shape
        dstate = A.shape[1]
        nseg = dim // segment
        dt_ = u.dtype
        # nth (_scratch_slots): thread i uses slot 2 i, no cache line shared between threads
        a_ = np.empty((nth, dstate, LANES), dt_)
        as_ = np.empty((nth, dstate, LANES), dt_)
        bl = np.empty((nth, dstate, LANES), dt_)  # time-invariant B and C, per lane
        cl = np.empty((nth, dstate, LANES), dt_)
        h = np.empty((nth, dstate, LANES), dt_)
        # Δ, Δu and y of a chunk, one row per lane (contiguous in time: the elementwise
        # passes vectorise along time); lane vectors of one step
        dts = np.empty((nth, LANES, CHUNK), dt_)
        dus = np.empty((nth, LANES, CHUNK), dt_)
        ys = np.empty((nth, LANES, CHUNK), dt_)
        dtl = np.empty((nth, LANES), dt_)
        dul = np.empty((nth, LANES), dt_)
        yl = np.empty((nth, LANES), dt_)
        zero = nk.const(A[0, 0], 0.0)
        for job in prange(batch * nseg * nsub):
            tid = numba.get_thread_id()
            ts = 2 * tid
            b, d0, nl, gb, gc = _block(job, nseg, nsub, segment, wb, wc)
            _load_block(A, B, C, h0, b, d0, nl, ts, a_, as_, bl, cl, h)
            for t0 in range(0, seqlen, CHUNK):
                tn = min(CHUNK, seqlen - t0)
                if save:  # the state at the start of the chunk, for the backward
                    for n in range(dstate):
                        for j in range(lanes):
                            ckpt[job, t0 // CHUNK, n, j] = h[ts, n, j]
                for j in range(LANES):
                    d = d0 + min(j, nl - 1)
                    bd = bias[d]
                    Dd = D[d]
                    for tt in range(tn):
                        uu = u[b, d, uint64(t0 + tt)]
                        x = delta[b, d, uint64(t0 + tt)] + bd
                        sp = nk.softplus(x)
                        dtv = sp if softplus else x  # a select: the loop stays branch-free
                        dts[ts, j, tt] = dtv
                        dus[ts, j, tt] = dtv * uu
                for tt in range(tn):
                    t = uint64(t0 + tt)
                    for j in range(lanes):
                        dtl[ts, j] = dts[ts, j, tt]
                        dul[ts, j] = dus[ts, j, tt]
                        yl[ts, j] = zero
                    for n in range(dstate):
                        bn = B[b, gb, n, t] if B.ndim == 4 else B[0, 0]
                        cn = C[b, gc, n, t] if C.ndim == 4 else C[0, 0]
                        for j in range(LANES):
                            abar, f = nk.coefficients(method, dtl[ts, j], a_[ts, n, j], as_[ts, n, j])
                            bv = bn if B.ndim == 4 else bl[ts, n, j]
                            cv = cn if C.ndim == 4 else cl[ts, n, j]
                            hv = abar * h[ts, n, j] + dul[ts, j] * f * bv
                            h[ts, n, j] = hv
                            yl[ts, j] += cv * hv
                    for j in range(lanes):
                        ys[ts, j, tt] = yl[ts, j]
                for j in range(nl):
                    d = d0 + j
                    Dd = D[d]
                    if has_z:
                        for tt in range(tn):
                            zz = z[b, d, uint64(t0 + tt)]
                            yv = ys[ts, j, tt] + Dd * u[b, d, uint64(t0 + tt)]
                            out[b, d, uint64(t0 + tt)] = yv * zz * nk.sigmoid(zz)
                    else:
                        for tt in range(tn):
                            out[b, d, uint64(t0 + tt)] = ys[ts, j, tt] + Dd * u[b, d, uint64(t0 + tt)]
            for j in range(nl):
                for n in range(dstate):
                    last[b, d0 + j, n] = h[ts, n, j]

    return scan_fwd_kernel


_SCAN_FWD = {number: _make_scan_fwd(number) for number in (nk.MAMBA, nk.ZOH, nk.BILINEAR)}


class Checkpoints:
    """What ``scan_fwd(..., save_checkpoints=True)`` keeps for ``scan_bwd``: the states at chunk starts.

    ``states`` is (blocks, chunks, dstate, LANES): for every block of ``LANES`` channels
    (the prange jobs, in order), the state before each chunk of ``CHUNK`` steps,
    ``ceil(seqlen / CHUNK)`` of them (the first is the initial state). That is
    ``batch * dim * dstate * ceil(seqlen / CHUNK)`` numbers, plus the spare lanes of
    blocks narrower than ``LANES``.
    """

    __slots__ = ("states",)

    def __init__(self, states: np.ndarray):
        self.states = states

    @property
    def nbytes(self) -> int:
        return self.states.nbytes


def _scratch_slots() -> int:
    """Per-thread scratch rows of the scan kernels: two for each thread of numba's pool.

    ``numba.get_thread_id()`` is below the pool's size, ``numba.config.NUMBA_NUM_THREADS``
    of this process. It is passed at run time: read inside a kernel, it would be a
    compile-time constant, and a kernel cached by a process with a smaller pool would
    index past its scratch arrays.
    """
    return 2 * numba.config.NUMBA_NUM_THREADS


def _checkpoint_shape(batch: int, dim: int, seqlen: int, dstate: int, segment: int, nsub: int) -> tuple[int, ...]:
    return batch * (dim // segment) * nsub, -(-seqlen // CHUNK), dstate, LANES


def scan_fwd(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, discretization, *, save_checkpoints=False
):
    """The fused selective scan; arguments and results as in :mod:`portassm.backends`.

    Returns
    -------
    out : (batch, dim, seqlen), u's dtype
    last_state : (batch, dim, dstate), float32 (float64 when an input is float64)
    residuals : :class:`Checkpoints`, only with ``save_checkpoints``
    """
    ct = _compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    u_, delta_, A_, B_, C_, D_, z_, bias_, h0 = _prepare(ct, u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, seqlen = u_.shape
    dstate = A_.shape[1]
    if h0 is None:
        h0 = np.zeros((batch, dim, dstate), ct)
    segment, nsub, wb, wc = _blocking(dim, B_, C_)
    out = np.empty((batch, dim, seqlen), ct)
    last = np.empty((batch, dim, dstate), ct)
    ckpt = (np.empty(_checkpoint_shape(batch, dim, seqlen, dstate, segment, nsub), ct) if save_checkpoints
            else np.empty((1, 1, 1, 1), ct))
    _apply_threads()
    _SCAN_FWD[nk.METHOD_NUMBER[discretization]](
        u_, delta_, A_, B_, C_, _per_channel(D_, dim, ct), _dummy_like(ct) if z_ is None else z_,
        _per_channel(bias_, dim, ct), h0, bool(delta_softplus), z_ is not None, segment, nsub, wb, wc, LANES, out, last,
        bool(save_checkpoints), ckpt, _scratch_slots(),
    )
    out = out.astype(u.dtype, copy=False)
    return (out, last, Checkpoints(ckpt)) if save_checkpoints else (out, last)


# --------------------------------------------------------------------------- backward


def _make_scan_bwd(method: int):
    # reassociation lets LLVM vectorise the sums over lanes and over time; the
    # elementwise helpers keep their own flags (they are inlined by LLVM, not numba)
    @njit(parallel=True, fastmath=nk.FASTMATH_REDUCE, **nk.JIT)
    def scan_bwd_kernel(
        dout, dlast, u, delta, A, B, C, D, z, bias, h0, softplus, has_z, segment, nsub, wb, wc, lanes, have_ckpt, ckpt,
        du, ddelta, dA_b, dB_part, dC_part, dD_b, dz, dh0, nth,
    ):
        batch, dim, seqlen = u.shape
        dstate = A.shape[1]
        nseg = dim // segment
        nchunks = (seqlen + CHUNK - 1) // CHUNK
        dt_ = u.dtype
        # nth (_scratch_slots): thread i uses slot 2 i, no cache line shared between threads
        a_ = np.empty((nth, dstate, LANES), dt_)
        as_ = np.empty((nth, dstate, LANES), dt_)
        bl = np.empty((nth, dstate, LANES), dt_)
        cl = np.empty((nth, dstate, LANES), dt_)
        h = np.empty((nth, dstate, LANES), dt_)
        g = np.empty((nth, dstate, LANES), dt_)
        dAl = np.zeros((nth, dstate, LANES), dt_)
        dBl = np.zeros((nth, dstate, LANES), dt_)  # time-invariant B and C: per-lane sums over time
        dCl = np.zeros((nth, dstate, LANES), dt_)
        # the sums over the whole sequence (dA, dD; dB, dC when time-invariant) are kept per
        # chunk in the compute dtype and added across chunks in float64: a float32 sum over
        # a million steps would lose ~1e-5 (dA over 2^20 steps: 1.9e-5 from float64)
        tot = np.zeros((nth, 3, dstate, LANES), np.float64)
        totD = np.zeros((nth, LANES), np.float64)
        hs = np.empty((nth, CHUNK + 1, dstate, LANES), dt_)  # the state before step tt of the chunk
        abars = np.empty((nth, CHUNK, dstate, LANES), dt_)
        dBc = np.empty((nth, CHUNK, dstate), dt_)  # this block's share of dB, dC over the chunk
        dCc = np.empty((nth, CHUNK, dstate), dt_)
        # per (channel, time) values of a chunk, one row per lane (contiguous in time)
        dts = np.empty((nth, LANES, CHUNK), dt_)
        dus = np.empty((nth, LANES, CHUNK), dt_)
        us = np.empty((nth, LANES, CHUNK), dt_)
        sps = np.empty((nth, LANES, CHUNK), dt_)  # softplus' (1 without softplus)
        ys = np.empty((nth, LANES, CHUNK), dt_)
        dys = np.empty((nth, LANES, CHUNK), dt_)
        gzs = np.empty((nth, LANES, CHUNK), dt_)  # dz / y: dout times the derivative of z sigmoid(z)
        dua = np.empty((nth, LANES, CHUNK), dt_)
        ddt = np.empty((nth, LANES, CHUNK), dt_)
        s1s = np.empty((nth, LANES, CHUNK), dt_)  # ``fused``: s1 and s2 of every step, back in rows
        s2s = np.empty((nth, LANES, CHUNK), dt_)
        # ``fused``: Δ, Δu, dy in, s1, s2, y out of the adjoint as per-step lane vectors (time-major)
        dtT = np.empty((nth, CHUNK, LANES), dt_)
        dulT = np.empty((nth, CHUNK, LANES), dt_)
        dyT = np.empty((nth, CHUNK, LANES), dt_)
        s1T = np.empty((nth, CHUNK, LANES), dt_)
        s2T = np.empty((nth, CHUNK, LANES), dt_)
        yT = np.empty((nth, CHUNK, LANES), dt_)
        # the same at one step, as lane vectors (the general path)
        dtl = np.empty((nth, LANES), dt_)
        dul = np.empty((nth, LANES), dt_)
        ul = np.empty((nth, LANES), dt_)
        yl = np.empty((nth, LANES), dt_)
        dyl = np.empty((nth, LANES), dt_)
        s1 = np.empty((nth, LANES), dt_)
        s2 = np.empty((nth, LANES), dt_)
        dDl = np.zeros((nth, LANES), dt_)
        # mamba's adjoint in LLVM vectors, states 8 at a time; it also makes y and dC from the
        # state after each step (the recompute's next row), so the recompute only stores states
        fused = method == nk.MAMBA and dstate % 8 == 0
        for job in prange(batch * nseg * nsub):
            tid = numba.get_thread_id()
            ts = 2 * tid
            b, d0, nl, gb, gc = _block(job, nseg, nsub, segment, wb, wc)
            zero = nk.const(A[0, 0], 0.0)
            one = nk.const(A[0, 0], 1.0)
            _load_block(A, B, C, h0, b, d0, nl, ts, a_, as_, bl, cl, h)
            for j in range(LANES):
                totD[ts, j] = 0.0
                for n in range(dstate):
                    tot[ts, 0, n, j] = 0.0
                    tot[ts, 1, n, j] = 0.0
                    tot[ts, 2, n, j] = 0.0
                    # spare lanes get no cotangent, so they add nothing to shared sums
                    g[ts, n, j] = dlast[b, d0 + j, n] if j < nl else zero

            if not have_ckpt:  # pass 1: the state at the start of every chunk
                for c in range(nchunks):
                    t0 = c * CHUNK
                    tn = min(CHUNK, seqlen - t0)
                    for n in range(dstate):
                        for j in range(lanes):
                            ckpt[job, c, n, j] = h[ts, n, j]
                    for j in range(LANES):
                        d = d0 + min(j, nl - 1)
                        bd = bias[d]
                        for tt in range(tn):
                            x = delta[b, d, uint64(t0 + tt)] + bd
                            dtv = nk.softplus(x) if softplus else x
                            dts[ts, j, tt] = dtv
                            dus[ts, j, tt] = dtv * u[b, d, uint64(t0 + tt)]
                    for tt in range(tn):
                        t = uint64(t0 + tt)
                        for j in range(LANES):
                            dtl[ts, j] = dts[ts, j, tt]
                            dul[ts, j] = dus[ts, j, tt]
                        for n in range(dstate):
                            bn = B[b, gb, t, n] if B.ndim == 4 else B[0, 0]
                            for j in range(LANES):
                                abar, f = nk.coefficients(method, dtl[ts, j], a_[ts, n, j], as_[ts, n, j])
                                bv = bn if B.ndim == 4 else bl[ts, n, j]
                                h[ts, n, j] = abar * h[ts, n, j] + dul[ts, j] * f * bv

            # pass 2: chunks in reverse; recompute each chunk's states, then the adjoint
            for c in range(nchunks - 1, -1, -1):
                t0 = c * CHUNK
                tn = min(CHUNK, seqlen - t0)
                for j in range(LANES):  # this chunk's sums, added to tot at its end
                    dDl[ts, j] = zero
                    for n in range(dstate):
                        dAl[ts, n, j] = zero
                        dBl[ts, n, j] = zero
                        dCl[ts, n, j] = zero
                # elementwise: Δ, softplus', Δu, D u, the gate's cotangents, dD
                # (branch-free loop bodies: softplus is a select, the gate its own loop)
                for j in range(LANES):
                    d = d0 + min(j, nl - 1)
                    bd = bias[d]
                    Dd = D[d]
                    live = one if j < nl else zero  # padded lanes: no cotangent
                    if has_z:
                        for tt in range(tn):
                            zz = z[b, d, uint64(t0 + tt)]
                            go = dout[b, d, uint64(t0 + tt)] * live
                            sig = nk.sigmoid(zz)
                            gzs[ts, j, tt] = go * sig * (one + zz * (one - sig))
                            dys[ts, j, tt] = go * zz * sig
                    else:
                        for tt in range(tn):
                            dys[ts, j, tt] = dout[b, d, uint64(t0 + tt)] * live
                    acc = zero
                    for tt in range(tn):
                        uu = u[b, d, uint64(t0 + tt)]
                        x = delta[b, d, uint64(t0 + tt)] + bd
                        sp, sg = nk.softplus_and_grad(x)
                        dtv = sp if softplus else x
                        dts[ts, j, tt] = dtv
                        sps[ts, j, tt] = sg if softplus else one
                        dus[ts, j, tt] = dtv * uu
                        us[ts, j, tt] = uu
                        dy = dys[ts, j, tt]
                        acc += dy * uu
                        dua[ts, j, tt] = Dd * dy
                    dDl[ts, j] += acc
                # the rows of the chunk walked next (the one before; after the first, the
                # last chunk of the next block) into L2, one lane a step of the recompute:
                # walked backwards in 64-step pieces of 16 rows each, they are streams the
                # hardware prefetchers do not follow, and all 320 lines at once stalled
                pj = job if c > 0 else job + 1
                pb, pd0, pnl, pt0, ptn = b, d0, 0, t0, tn
                if pj < batch * nseg * nsub:
                    pb, pd0, pnl, _, _ = _block(pj, nseg, nsub, segment, wb, wc)
                    pt0 = (c - 1 if c > 0 else nchunks - 1) * CHUNK
                    ptn = min(CHUNK, seqlen - pt0)
                for n in range(dstate):
                    for j in range(lanes):
                        h[ts, n, j] = ckpt[job, c, n, j]
                if fused:
                    # Δ, Δu and dy of the chunk as per-step lane vectors (time-major rows)
                    for k in range(0, tn, 16):
                        nk.transpose16(dts, dtT, ts, 0, k)
                        nk.transpose16(dus, dulT, ts, 0, k)
                        nk.transpose16(dys, dyT, ts, 0, k)
                # recompute the chunk's states from its checkpoint: the state before each step
                # and Abar. ``fused``: the adjoint makes y and dC from the state after it;
                # otherwise y and dC (which needs no adjoint) are made here
                for tt in range(tn):
                    t = uint64(t0 + tt)
                    if tt < pnl:
                        for k in range(0, ptn + 15, 16):
                            pt = uint64(pt0 + min(k, ptn - 1))
                            nk.prefetch(u, (pb, pd0 + tt, pt))
                            nk.prefetch(delta, (pb, pd0 + tt, pt))
                            nk.prefetch(dout, (pb, pd0 + tt, pt))
                            if has_z:
                                nk.prefetch(z, (pb, pd0 + tt, pt))
                    if fused:
                        for n in range(dstate):
                            bn = B[b, gb, t, n] if B.ndim == 4 else B[0, 0]
                            for j in range(LANES):
                                abar, f = nk.coefficients(method, dtT[ts, tt, j], a_[ts, n, j], as_[ts, n, j])
                                bv = bn if B.ndim == 4 else bl[ts, n, j]
                                hp = h[ts, n, j]
                                hs[ts, tt, n, j] = hp
                                abars[ts, tt, n, j] = abar
                                h[ts, n, j] = abar * hp + dulT[ts, tt, j] * f * bv
                    else:
                        for j in range(LANES):
                            dtl[ts, j] = dts[ts, j, tt]
                            dul[ts, j] = dus[ts, j, tt]
                            yl[ts, j] = zero  # D u is added where y is used (dz)
                            dyl[ts, j] = dys[ts, j, tt]
                        for n in range(dstate):
                            bn = B[b, gb, t, n] if B.ndim == 4 else B[0, 0]
                            cn = C[b, gc, t, n] if C.ndim == 4 else C[0, 0]
                            sum_c = zero
                            for j in range(LANES):
                                abar, f = nk.coefficients(method, dtl[ts, j], a_[ts, n, j], as_[ts, n, j])
                                bv = bn if B.ndim == 4 else bl[ts, n, j]
                                cv = cn if C.ndim == 4 else cl[ts, n, j]
                                hp = h[ts, n, j]
                                hs[ts, tt, n, j] = hp
                                abars[ts, tt, n, j] = abar
                                hv = abar * hp + dul[ts, j] * f * bv
                                h[ts, n, j] = hv
                                yl[ts, j] += cv * hv
                                if C.ndim == 4:
                                    sum_c += hv * dyl[ts, j]
                                else:
                                    dCl[ts, n, j] += hv * dyl[ts, j]
                            dCc[ts, tt, n] = sum_c
                        for j in range(LANES):
                            ys[ts, j, tt] = yl[ts, j]
                if fused:
                    for n in range(dstate):  # the state after the last step, for the adjoint
                        for j in range(lanes):
                            hs[ts, tn, n, j] = h[ts, n, j]
                    # the adjoint in reverse time (nk.mamba_adjoint_step): s1 = Σ_n gv B,
                    # s2 = Σ_n q A and y per step, time-major, then back to rows
                    for rt in range(tn):
                        tt = uint64(tn - 1 - rt)  # reverse time; unsigned: see the module docstring
                        t = uint64(t0 + tn - 1 - rt)
                        nk.mamba_adjoint_step(g, abars, hs, a_, dAl, B, C, bl, cl, dtT, dulT, dyT, s1T, s2T, yT,
                                              dB_part, dBl, dC_part, dCl, ts, tt, tid, b, gb, gc, t)
                    for k in range(0, tn, 16):
                        nk.transpose16(s1T, s1s, ts, k, 0)
                        nk.transpose16(s2T, s2s, ts, k, 0)
                        nk.transpose16(yT, ys, ts, k, 0)
                    # du = D dy + Δ s1, dΔ (before softplus') = s2 + u s1
                    for j in range(lanes):
                        for tt in range(tn):
                            s1v = s1s[ts, j, tt]
                            dua[ts, j, tt] += dts[ts, j, tt] * s1v
                            ddt[ts, j, tt] = s2s[ts, j, tt] + us[ts, j, tt] * s1v
                else:
                    # the adjoint, in reverse time. g is dL/dh after step tt; gv adds C dy.
                    # mamba (Abar = exp(Δ A), Bcoef = Δ): with q = Abar gv h_prev,
                    #   dΔ = Σ_n q A + u Σ_n gv B,  du += Δ Σ_n gv B,  dA += q Δ,  dB = Σ_lanes gv Δ u
                    # the others through the discretisation's partial derivatives (coefficient_grads)
                    for rt in range(tn):
                        tt = uint64(tn - 1 - rt)  # reverse time; unsigned: see the module docstring
                        t = uint64(t0 + tn - 1 - rt)
                        for j in range(LANES):
                            dtl[ts, j] = dts[ts, j, tt]
                            ul[ts, j] = us[ts, j, tt]
                            dyl[ts, j] = dys[ts, j, tt]
                            s1[ts, j] = zero
                            s2[ts, j] = zero
                        for n in range(dstate):
                            bn = B[b, gb, t, n] if B.ndim == 4 else B[0, 0]
                            cn = C[b, gc, t, n] if C.ndim == 4 else C[0, 0]
                            sum_b = zero
                            for j in range(lanes):
                                dtv = dtl[ts, j]
                                an = a_[ts, n, j]
                                bv = bn if B.ndim == 4 else bl[ts, n, j]
                                cv = cn if C.ndim == 4 else cl[ts, n, j]
                                gv = g[ts, n, j] + cv * dyl[ts, j]
                                abar = abars[ts, tt, n, j]
                                gn = abar * gv
                                g[ts, n, j] = gn
                                if method == nk.MAMBA:
                                    q = gn * hs[ts, tt, n, j]
                                    s1[ts, j] += gv * bv
                                    s2[ts, j] += q * an
                                    dAl[ts, n, j] += q * dtv
                                    db = gv * dtv * ul[ts, j]
                                else:
                                    f = nk.coefficients(method, dtv, an, as_[ts, n, j])[1]
                                    pa_dt, pa_da, pb_dt, pb_da = nk.coefficient_grads(method, dtv, an, abar, f)
                                    dab = gv * hs[ts, tt, n, j]
                                    dbc = gv * ul[ts, j] * bv
                                    bcoef = dtv * f
                                    s1[ts, j] += gv * bcoef * bv
                                    s2[ts, j] += dab * pa_dt + dbc * pb_dt
                                    dAl[ts, n, j] += dab * pa_da + dbc * pb_da
                                    db = gv * ul[ts, j] * bcoef
                                if B.ndim == 4:
                                    sum_b += db
                                else:
                                    dBl[ts, n, j] += db
                            dBc[ts, tt, n] = sum_b
                        for j in range(LANES):
                            if method == nk.MAMBA:
                                dua[ts, j, tt] += dtl[ts, j] * s1[ts, j]
                                ddt[ts, j, tt] = s2[ts, j] + ul[ts, j] * s1[ts, j]
                            else:
                                dua[ts, j, tt] += s1[ts, j]
                                ddt[ts, j, tt] = s2[ts, j]
                if has_z:
                    for j in range(nl):
                        Dd = D[d0 + j]
                        for tt in range(tn):
                            dz[b, d0 + j, uint64(t0 + tt)] = gzs[ts, j, tt] * (ys[ts, j, tt] + Dd * us[ts, j, tt])
                if B.ndim == 4 and not fused:
                    for tt in range(tn):
                        for n in range(dstate):
                            dB_part[tid, b, gb, uint64(t0 + tt), n] += dBc[ts, tt, n]
                if C.ndim == 4 and not fused:
                    for tt in range(tn):
                        for n in range(dstate):
                            dC_part[tid, b, gc, uint64(t0 + tt), n] += dCc[ts, tt, n]
                for j in range(nl):
                    d = d0 + j
                    for tt in range(tn):
                        du[b, d, uint64(t0 + tt)] = dua[ts, j, tt]
                        ddelta[b, d, uint64(t0 + tt)] = ddt[ts, j, tt] * sps[ts, j, tt]
                for j in range(LANES):
                    totD[ts, j] += dDl[ts, j]
                    for n in range(dstate):
                        tot[ts, 0, n, j] += dAl[ts, n, j]
                        tot[ts, 1, n, j] += dBl[ts, n, j]
                        tot[ts, 2, n, j] += dCl[ts, n, j]
            for j in range(nl):
                d = d0 + j
                dD_b[b, d] = totD[ts, j]
                for n in range(dstate):
                    dA_b[b, d, n] = tot[ts, 0, n, j]
                    dh0[b, d, n] = g[ts, n, j]
                    if B.ndim == 2:
                        dB_part[0, b, d, n] = tot[ts, 1, n, j]
                    if C.ndim == 2:
                        dC_part[0, b, d, n] = tot[ts, 2, n, j]

    return scan_bwd_kernel


_SCAN_BWD = {number: _make_scan_bwd(number) for number in (nk.MAMBA, nk.ZOH, nk.BILINEAR)}


def _time_major(M: np.ndarray) -> np.ndarray:
    """A selective B or C as (batch, groups, seqlen, dstate): the backward reads all states of a step at once.

    In the API's layout (batch, groups, dstate, seqlen) the dstate values of one step lie
    seqlen floats apart, on as many cache lines, which map to the same set of the L1 cache
    when seqlen is a multiple of 1024; time-major they are one or two lines. A
    time-invariant (dim, dstate) one is returned as it is.
    """
    return np.ascontiguousarray(np.swapaxes(M, 2, 3)) if M.ndim == 4 else M


def _shared_grad_buffer(M: np.ndarray, batch: int, dim: int, ct: type) -> np.ndarray:
    """Per-thread partial sums for a selective B or C gradient, time-major as :func:`_time_major`;
    per-(batch, channel) ones when time-invariant."""
    if M.ndim == 4:
        batch_, groups, dstate, seqlen = M.shape
        return np.zeros((numba.config.NUMBA_NUM_THREADS, batch_, groups, seqlen, dstate), ct)
    return np.empty((1, batch, dim, M.shape[1]), ct)


def _shared_grad(part: np.ndarray, M: np.ndarray) -> np.ndarray:
    """The gradient of B or C in M's layout from the partial sums of :func:`_shared_grad_buffer`."""
    if M.ndim == 4:
        return np.ascontiguousarray(np.swapaxes(part.sum(axis=0), 2, 3))
    return part[0].sum(axis=0)


def scan_bwd(
    dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, discretization, *,
    residuals=None,
):
    """Gradients ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state)``.

    ``residuals``: the :class:`Checkpoints` of ``scan_fwd(..., save_checkpoints=True)``
    on the same arguments; None recomputes them (one more pass over the sequence).
    Each gradient has its argument's shape and dtype; None where the argument was None.
    """
    ct = _compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dout_, dlast, u_, delta_, A_, B_, C_, D_, z_, bias_, h0 = _prepare(
        ct, dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state
    )
    batch, dim, seqlen = u_.shape
    dstate = A_.shape[1]
    if h0 is None:
        h0 = np.zeros((batch, dim, dstate), ct)
    if dlast is None:
        dlast = np.zeros((batch, dim, dstate), ct)
    segment, nsub, wb, wc = _blocking(dim, B_, C_)
    shape = _checkpoint_shape(batch, dim, seqlen, dstate, segment, nsub)
    if residuals is None:
        ckpt = np.empty(shape, ct)
    else:
        ckpt = residuals.states
        if ckpt.shape != shape or ckpt.dtype != ct:
            raise ValueError(
                f"residuals of shape {ckpt.shape} and dtype {ckpt.dtype} do not belong to this problem "
                f"(expected {shape}, {np.dtype(ct)}): pass those of scan_fwd on the same arguments"
            )
    du = np.empty((batch, dim, seqlen), ct)
    ddelta = np.empty((batch, dim, seqlen), ct)
    dA_b = np.empty((batch, dim, dstate), ct)
    dB_part = _shared_grad_buffer(B_, batch, dim, ct)
    dC_part = _shared_grad_buffer(C_, batch, dim, ct)
    dD_b = np.empty((batch, dim), ct)
    dz = np.empty((batch, dim, seqlen), ct) if z_ is not None else _dummy_like(ct)
    dh0 = np.empty((batch, dim, dstate), ct)
    _apply_threads()
    _SCAN_BWD[nk.METHOD_NUMBER[discretization]](
        dout_, dlast, u_, delta_, A_, _time_major(B_), _time_major(C_), _per_channel(D_, dim, ct),
        _dummy_like(ct) if z_ is None else z_, _per_channel(bias_, dim, ct), h0, bool(delta_softplus), z_ is not None, segment, nsub, wb, wc, LANES,
        residuals is not None, ckpt, du, ddelta, dA_b, dB_part, dC_part, dD_b, dz, dh0, _scratch_slots(),
    )
    dB = _shared_grad(dB_part, B_)
    dC = _shared_grad(dC_part, C_)
    like = lambda grad, arg: None if arg is None else grad.astype(arg.dtype, copy=False)
    return (
        like(du, u), like(ddelta, delta), like(dA_b.sum(axis=0), A), like(dB, B), like(dC, C),
        like(dD_b.sum(axis=0), D), like(dz, z), like(ddelta.sum(axis=(0, 2)), delta_bias), like(dh0, initial_state),
    )


# --------------------------------------------------------------------------- one decoding step


#: channels per prange job of the decoding step
STEP_BLOCK = 64
#: a decoding step with fewer state updates (batch * dim * dstate) than this runs on
#: one thread (a serial kernel): at batch 1, dim 1536 it takes tens of microseconds, and
#: waking a second thread that another process holds cost 10 ms a step on the loaded VM
STEP_PARALLEL_MIN = 1 << 20


def _make_scan_step(method: int, parallel: bool):
    # One token is ~25k state updates at dim 1536: a few microseconds, so what costs is
    # per-channel overhead. The per-channel values (Δ, Δx, D x, the gate) are computed
    # first, vectorised across channels. Then the states: mamba with dstate 16 runs 8
    # channels at a time in LLVM vectors (nk.mamba_channels8: one transposed reduction
    # for their 8 outputs); other channels run their states in groups of 16 (one
    # <16 x float> for mamba, else a loop of constant trip count 16, two 8-lane vectors).
    # ``parallel``: a prange over blocks of STEP_BLOCK channels; otherwise one block per
    # batch row, serial (the wrapper's choice below STEP_PARALLEL_MIN: numba's thread
    # functions cost 2 us a call, and inside a kernel they would stop its caching).
    # ``parallel`` is read in the body, so it is in the closure that keys the disk cache.
    # No ``reassoc``: it would reach the exp2 that mamba_channels8 emits into this kernel
    # and fold its rounding (x + 1.5 2**23) - 1.5 2**23 away.
    @njit(parallel=parallel, fastmath=nk.FASTMATH, **nk.JIT)
    def scan_step_kernel(state, x, dt, A, B, C, D, z, bias, softplus, has_z, wb, wc, y, new_state):
        batch, dim = x.shape
        dstate = A.shape[1]
        scale = nk.exp_scale(A[0, 0])
        one = nk.const(A[0, 0], 1.0)
        work = np.empty((4, batch, dim), x.dtype)  # Δ, Δx, D x, gate
        for b in range(batch):
            for d in range(dim):
                v = dt[b, d] + bias[d]
                sp = nk.softplus(v)
                dtv = sp if softplus else v
                work[0, b, d] = dtv
                work[1, b, d] = dtv * x[b, d]
                work[2, b, d] = D[d] * x[b, d]
            if has_z:
                for d in range(dim):
                    zz = z[b, d]
                    work[3, b, d] = zz * nk.sigmoid(zz)
            else:
                for d in range(dim):
                    work[3, b, d] = one
        block = STEP_BLOCK if parallel else dim
        nblk = (dim + block - 1) // block
        # dstate 16 (mamba's): 8 channels at a time in LLVM vectors, when 8 channels never straddle a group
        by8 = method == nk.MAMBA and dstate == 16 and (B.ndim == 2 or wb % 8 == 0) and (C.ndim == 2 or wc % 8 == 0)
        for job in prange(batch * nblk):
            b = job // nblk
            d0 = job % nblk * block
            d1 = min(d0 + block, dim)
            if by8:
                gb = d0 // wb
                gc = d0 // wc
                while d0 + 8 <= d1:
                    if d0 == (gb + 1) * wb:  # 8 divides the group widths: d0 meets every boundary
                        gb += 1
                    if d0 == (gc + 1) * wc:
                        gc += 1
                    nk.mamba_channels8(state, A, B, C, new_state, work, y, b, d0, gb, gc, scale)
                    d0 += 8
            gb = d0 // wb  # groups of B and C, advanced at their boundaries (no division a channel)
            gc = d0 // wc
            for d in range(d0, d1):
                if d == (gb + 1) * wb:
                    gb += 1
                if d == (gc + 1) * wc:
                    gc += 1
                dtv = work[0, b, d]
                du = work[1, b, d]
                acc = work[2, b, d]
                n0 = 0
                if method == nk.MAMBA:
                    while n0 + 16 <= dstate:
                        acc += nk.mamba_states16(state, A, B, C, new_state, b, d, gb, gc, n0, dtv, du, scale)
                        n0 += 16
                while n0 + 16 <= dstate:
                    for k in range(16):
                        n = n0 + k
                        abar, f = nk.coefficients(method, dtv, A[d, n], A[d, n] * scale)
                        bv = B[b, gb, n] if B.ndim == 3 else B[d, n]
                        cv = C[b, gc, n] if C.ndim == 3 else C[d, n]
                        hv = abar * state[b, d, n] + du * f * bv
                        new_state[b, d, n] = hv
                        acc += cv * hv
                    n0 += 16
                for n in range(n0, dstate):
                    abar, f = nk.coefficients(method, dtv, A[d, n], A[d, n] * scale)
                    bv = B[b, gb, n] if B.ndim == 3 else B[d, n]
                    cv = C[b, gc, n] if C.ndim == 3 else C[d, n]
                    hv = abar * state[b, d, n] + du * f * bv
                    new_state[b, d, n] = hv
                    acc += cv * hv
                y[b, d] = acc * work[3, b, d]

    return scan_step_kernel


_SCAN_STEP = {number: _make_scan_step(number, True) for number in (nk.MAMBA, nk.ZOH, nk.BILINEAR)}
_SCAN_STEP_SERIAL = {number: _make_scan_step(number, False) for number in (nk.MAMBA, nk.ZOH, nk.BILINEAR)}


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_STEP_METHOD = {name: (_SCAN_STEP_SERIAL[number], _SCAN_STEP[number]) for name, number in nk.METHOD_NUMBER.items()}
_ZEROS: dict[tuple[int, np.dtype], np.ndarray] = {}  # D and dt_bias when absent, per (dim, dtype): read-only


def _zeros(dim: int, ct: np.dtype) -> np.ndarray:
    zeros = _ZEROS.get((dim, ct))
    if zeros is None:
        zeros = _ZEROS[(dim, ct)] = np.zeros(dim, ct)
        zeros.flags.writeable = False
    return zeros


def scan_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, discretization):
    """One token: ``(y, new_state)``; y has x's dtype, new_state the state's. ``state`` is not modified.

    The fast path (every array already C-contiguous float32, or every one float64: the
    usual case when decoding) converts nothing; the wrapper costs about 2 us of Python.
    """
    arrays = (state, x, dt, A, B, C, D, z, dt_bias)
    n32 = n64 = 0
    contiguous = True
    for a in arrays:
        if a is not None:
            kind = a.dtype
            if kind is _F32:
                n32 += 1
            elif kind is _F64:
                n64 += 1
            else:
                contiguous = False  # another dtype: converted below
            contiguous = contiguous and a.flags.c_contiguous
    ct = _F64 if n64 else _F32
    if not contiguous or (n32 and n64):
        ct = _compute_dtype(*arrays)
        arrays = _prepare(ct, *arrays)
        ct = np.dtype(ct)
    state_, x_, dt_, A_, B_, C_, D_, z_, bias_ = arrays
    batch, dim = x_.shape
    y = np.empty((batch, dim), ct)
    new_state = np.empty(state_.shape, ct)
    wb = dim if B_.ndim == 2 else dim // B_.shape[1]
    wc = dim if C_.ndim == 2 else dim // C_.shape[1]
    serial = batch * dim * state_.shape[2] < STEP_PARALLEL_MIN
    if not serial:
        _apply_threads()
    _STEP_METHOD[discretization][0 if serial else 1](
        state_, x_, dt_, A_, B_, C_, _zeros(dim, ct) if D_ is None else D_, x_ if z_ is None else z_,
        _zeros(dim, ct) if bias_ is None else bias_, bool(dt_softplus), z_ is not None, wb, wc, y, new_state,
    )
    if x.dtype is not ct:
        y = y.astype(x.dtype)
    if state.dtype is not ct:
        new_state = new_state.astype(state.dtype)
    return y, new_state


# --------------------------------------------------------------------------- causal depthwise convolution


@njit(parallel=True, fastmath=nk.FASTMATH, **nk.JIT)
def _causal_conv1d_kernel(padded, weight, bias, silu, out):
    batch, dim, seqlen = out.shape
    width = weight.shape[1]
    for job in prange(batch * dim):
        b = job // dim
        d = job % dim
        for t in range(seqlen):
            acc = bias[d]
            for k in range(width):
                acc += weight[d, k] * padded[b, d, t + k]
            out[b, d, t] = acc * nk.sigmoid(acc) if silu else acc


def causal_conv1d(x, weight, bias, activation, initial_state):
    """Depthwise causal convolution: ``(out, final_state)``, final_state the last width - 1 inputs.

    out has the dtype NumPy gives x, weight and bias together; final_state x's dtype.
    """
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    ct = np.result_type(x, weight, *(a for a in (bias,) if a is not None))
    ct = ct if ct in (np.float32, np.float64) else np.dtype(np.float32)
    if initial_state is None:
        initial_state = np.zeros((batch, dim, width - 1), x.dtype)
    padded = np.concatenate([initial_state.astype(x.dtype, copy=False), x], axis=-1)
    out = np.empty((batch, dim, seqlen), ct)
    _apply_threads()
    _causal_conv1d_kernel(
        np.ascontiguousarray(padded, dtype=ct), np.ascontiguousarray(weight, dtype=ct),
        np.zeros(dim, ct) if bias is None else np.ascontiguousarray(bias, dtype=ct), activation is not None, out,
    )
    return out.astype(np.result_type(x, weight, *(a for a in (bias,) if a is not None)), copy=False), padded[..., seqlen:]


def causal_conv1d_step(x, conv_state, weight, bias, activation):
    """One token of :func:`causal_conv1d`: ``(out, new_state)``; the state is not modified."""
    out, _ = causal_conv1d(x[:, :, None], weight, bias, activation, conv_state)
    window = np.concatenate([conv_state.astype(x.dtype, copy=False), x[:, :, None]], axis=-1)
    return out[:, :, 0], window[..., 1:]
