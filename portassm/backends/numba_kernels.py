"""Elementwise building blocks of the numba kernels, written so that LLVM vectorises them.

The scan kernels of :mod:`portassm.backends.numba_cpu` spend their time in one
exponential per (batch, channel, time, state). A call to libm's ``expf`` is a scalar
function call that stops LLVM's loop vectoriser, and numba uses Intel's SVML only when
``icc_rt`` happens to be installed, so float32 brings its own exponential here: a
polynomial of 2**f on [-1/2, 1/2] and the exponent bits set directly (two LLVM
``bitcast`` intrinsics, below). It is within 2e-7 relative of exp (float32 rounding is
6e-8; mean error -2e-8), branch-free, and it vectorises to eight lanes of AVX2 (sixteen of
AVX-512). float64 keeps libm (``math.exp``, ``math.log1p``, ``math.expm1``): its
tolerance (1e-12) leaves no room for approximations.

Every function dispatches on its argument's type (``numba.extending.overload``), so a
kernel is written once and compiles to float32 or float64 code. None is inlined at
numba's level (``inline='never'``, LLVM inlines them): each keeps its own fast-math flags,
so a kernel compiled with ``reassoc`` cannot rewrite ``(x + MAGIC) - MAGIC`` into ``x``.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

#: fast-math flags of every kernel: fused multiply-add, x/y as x*(1/y), no signed zeros.
#: Not ``nnan``/``ninf`` (NaN and inf must propagate as in NumPy), not ``afn``.
FASTMATH = {"contract", "arcp", "nsz"}
#: the same plus reassociation, for kernels whose sums are vectorised (lane reductions)
FASTMATH_REDUCE = FASTMATH | {"reassoc"}
#: options of every compiled function: cached on disk, NumPy's error model (a division
#: by zero gives inf, not an exception: the exception check would stop vectorisation)
JIT = {"cache": True, "error_model": "numpy", "nogil": True}

LOG2E = 1.4426950408889634

_F32 = np.float32
_ONE32, _HALF32, _ZERO32 = _F32(1.0), _F32(0.5), _F32(0.0)
# 1.5 * 2**23 + 127: adding it rounds a float32 to an integer k held in the low mantissa
# bits, already offset by the exponent bias (the bits of t = k + _MAGIC are
# 0x4B400000 + 127 + k, and shifted left by 23 they are those of 2**k)
_MAGIC = _F32(12583039.0)
# exponent range kept: 2**-126 (smallest normal, for anything below; exp's true value
# there is below 1.2e-38) up to 2**128, whose bits are those of inf (the right answer)
_X2_LO, _X2_HI = _F32(-126.0), _F32(128.0)
# 2**f = 1 + f*(E0 + f*(E1 + ...)) on [-1/2, 1/2], degree 5: relative minimax (Lawson's
# reweighted least squares on Chebyshev nodes), relative error 1.9e-7 in float32
# arithmetic, mean error -2e-8 (float32's rounding is 6e-8)
_E0, _E1, _E2 = _F32(0.6931470036506653), _F32(0.24022242426872253), _F32(0.05550733581185341)
_E3, _E4 = _F32(0.009671512991189957), _F32(0.001326472731307149)
_LOG2E32 = _F32(LOG2E)
_SOFTPLUS_THRESHOLD = 20.0  # as mamba_ssm: softplus(x) = x above it


@intrinsic
def _pow2_of_magic(typingctx, t):
    """2**k, for ``t = k + 1.5*2**23 + 127`` in float32: shift the low bits of t into the exponent."""
    if t != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        return builder.bitcast(builder.shl(bits, ir.Constant(i32, 23)), ir.FloatType())

    return types.float32(types.float32), codegen


@njit(fastmath=FASTMATH, **JIT)
def exp2_f32(x):
    """2**x in float32, vectorisable. NaN gives NaN, +inf inf, -inf 2**-126."""
    # the selects (not min/max) let NaN through
    xc = _X2_LO if x < _X2_LO else x  # noqa: FURB136
    xc = _X2_HI if xc > _X2_HI else xc  # noqa: FURB136
    t = xc + _MAGIC
    f = xc - (t - _MAGIC)
    p = _E4
    p = p * f + _E3
    p = p * f + _E2
    p = p * f + _E1
    p = p * f + _E0
    p = p * f + _ONE32
    return p * _pow2_of_magic(t)


def exp_prescaled(x):
    """exp of the number whose multiple by :func:`exp_scale` is ``x`` (see ``scan_fwd``)."""


@overload(exp_prescaled, jit_options=dict(fastmath=FASTMATH, **JIT))
def _exp_prescaled(x):
    if x == types.float32:
        return lambda x: exp2_f32(x)
    return lambda x: math.exp(x)


def exp_scale(x):
    """log2(e) for float32 (whose exponential is a power of 2), 1 for float64."""


@overload(exp_scale, jit_options=dict(fastmath=FASTMATH, **JIT))
def _exp_scale(x):
    if x == types.float32:
        return lambda x: _LOG2E32
    return lambda x: 1.0


def exp(x):
    """e**x: vectorisable in float32, libm in float64."""


@overload(exp, jit_options=dict(fastmath=FASTMATH, **JIT))
def _exp(x):
    if x == types.float32:
        return lambda x: exp2_f32(x * _LOG2E32)
    return lambda x: math.exp(x)


@njit(fastmath=FASTMATH, **JIT)
def _log1p_unit_f32(e):
    """log1p(e) for e in [0, 1]: 2*atanh(s) with s = e/(2+e) in [0, 1/3], no cancellation."""
    s = e / (_F32(2.0) + e)
    s2 = s * s
    p = _F32(1 / 15)
    p = p * s2 + _F32(1 / 13)
    p = p * s2 + _F32(1 / 11)
    p = p * s2 + _F32(1 / 9)
    p = p * s2 + _F32(1 / 7)
    p = p * s2 + _F32(1 / 5)
    p = p * s2 + _F32(1 / 3)
    p = p * s2 + _ONE32
    return _F32(2.0) * s * p


def softplus(x):
    """log1p(exp(x)), and x above 20 (mamba_ssm's threshold)."""


@overload(softplus, jit_options=dict(fastmath=FASTMATH, **JIT))
def _softplus(x):
    if x == types.float32:

        def impl(x):
            # max(x, 0) + log1p(exp(-|x|)): the argument of log1p stays in [0, 1]
            ax = -x if x < _ZERO32 else x
            positive = x if x > _ZERO32 else _ZERO32  # noqa: FURB136 (a select keeps NaN)
            r = positive + _log1p_unit_f32(exp2_f32(-ax * _LOG2E32))
            return x if x > _F32(_SOFTPLUS_THRESHOLD) else r

        return impl
    return lambda x: x if x > _SOFTPLUS_THRESHOLD else math.log1p(math.exp(x))


def sigmoid(x):
    """1/(1 + exp(-x))."""


@overload(sigmoid, jit_options=dict(fastmath=FASTMATH, **JIT))
def _sigmoid(x):
    if x == types.float32:
        return lambda x: _ONE32 / (_ONE32 + exp2_f32(-x * _LOG2E32))
    return lambda x: 1.0 / (1.0 + math.exp(-x))


def softplus_grad(x):
    """d softplus/dx: sigmoid(x), 1 above 20."""


@overload(softplus_grad, jit_options=dict(fastmath=FASTMATH, **JIT))
def _softplus_grad(x):
    if x == types.float32:
        return lambda x: _ONE32 if x > _F32(_SOFTPLUS_THRESHOLD) else _ONE32 / (_ONE32 + exp2_f32(-x * _LOG2E32))
    return lambda x: 1.0 if x > _SOFTPLUS_THRESHOLD else 1.0 / (1.0 + math.exp(-x))


def softplus_and_grad(x):
    """``(softplus(x), softplus'(x))``; float32 shares one exponential between the two."""


@overload(softplus_and_grad, jit_options=dict(fastmath=FASTMATH, **JIT))
def _softplus_and_grad(x):
    if x == types.float32:

        def impl(x):
            # e = exp(-|x|) in [0, 1]: softplus = max(x, 0) + log1p(e), sigmoid(x) = (1 or e) / (1 + e)
            ax = -x if x < _ZERO32 else x
            e = exp2_f32(-ax * _LOG2E32)
            positive = x if x > _ZERO32 else _ZERO32  # noqa: FURB136 (a select keeps NaN)
            r = _ONE32 / (_ONE32 + e)
            sig = r if x >= _ZERO32 else e * r
            big = x > _F32(_SOFTPLUS_THRESHOLD)
            return (x if big else positive + _log1p_unit_f32(e)), (_ONE32 if big else sig)

        return impl
    return lambda x: (
        x if x > _SOFTPLUS_THRESHOLD else math.log1p(math.exp(x)),
        1.0 if x > _SOFTPLUS_THRESHOLD else 1.0 / (1.0 + math.exp(-x)),
    )


# phi1(x) = expm1(x)/x (zero-order hold's Bcoef/dt) and its derivative. float32 uses
# the Taylor series below 1/2 (truncation < 1e-8), where (exp(x) - 1)/x would lose
# digits; float64 follows portassm.discretization exactly (the oracle's formulas).
_PHI_SERIES_F32 = _F32(0.5)
_PHI_SERIES_F64 = 1e-3


def phi1(x, abar):
    """expm1(x)/x, given abar = exp(x)."""


@overload(phi1, jit_options=dict(fastmath=FASTMATH, **JIT))
def _phi1(x, abar):
    if x == types.float32:

        def impl(x, abar):
            s = _F32(1 / 40320)
            s = s * x + _F32(1 / 5040)
            s = s * x + _F32(1 / 720)
            s = s * x + _F32(1 / 120)
            s = s * x + _F32(1 / 24)
            s = s * x + _F32(1 / 6)
            s = s * x + _HALF32
            s = s * x + _ONE32
            small = abs(x) < _PHI_SERIES_F32
            return s if small else (abar - _ONE32) / x

        return impl

    def impl64(x, abar):
        if abs(x) < _PHI_SERIES_F64:
            return 1.0 + x / 2.0 + x * x / 6.0 + x * x * x / 24.0
        return math.expm1(x) / x

    return impl64


def phi1_grad(x, abar):
    """d/dx expm1(x)/x = (x e^x - e^x + 1)/x**2, given abar = exp(x)."""


@overload(phi1_grad, jit_options=dict(fastmath=FASTMATH, **JIT))
def _phi1_grad(x, abar):
    if x == types.float32:

        def impl(x, abar):
            # sum_k x**k / (k! (k + 2))
            s = _F32(1 / 403200)
            s = s * x + _F32(1 / 45360)
            s = s * x + _F32(1 / 5760)
            s = s * x + _F32(1 / 840)
            s = s * x + _F32(1 / 144)
            s = s * x + _F32(1 / 30)
            s = s * x + _F32(1 / 8)
            s = s * x + _F32(1 / 3)
            s = s * x + _HALF32
            small = abs(x) < _PHI_SERIES_F32
            return s if small else (x * abar - (abar - _ONE32)) / (x * x)

        return impl

    def impl64(x, abar):
        if abs(x) < _PHI_SERIES_F64:
            return 0.5 + x / 3 + x * x / 8 + x * x * x / 30
        return (x * math.exp(x) - math.expm1(x)) / (x * x)

    return impl64


def const(like, value):
    """``value`` in the type of ``like``: numba, unlike NumPy 2, widens float32 * 0.5 to float64."""


@overload(const, jit_options=dict(fastmath=FASTMATH, **JIT))
def _const(like, value):
    if like == types.float32:
        return lambda like, value: np.float32(value)
    return lambda like, value: np.float64(value)


# The discretisations, by number (a compile-time constant of each kernel)
MAMBA, ZOH, BILINEAR = 0, 1, 2
METHOD_NUMBER = {"mamba": MAMBA, "zoh": ZOH, "bilinear": BILINEAR}


@njit(fastmath=FASTMATH, **JIT)
def coefficients(method, dt, a, a_scaled):
    """``(Abar, F)`` with Bcoef = dt * F, for one (channel, time, state).

    ``a`` is A[d, n]; ``a_scaled`` is ``a * exp_scale``, the argument ``exp_prescaled``
    wants (saves a multiplication per element in float32).
    """
    one = const(a, 1.0)
    if method == MAMBA:
        return exp_prescaled(dt * a_scaled), one
    x = dt * a
    if method == ZOH:
        abar = exp_prescaled(dt * a_scaled)
        return abar, phi1(x, abar)
    half = const(a, 0.5)
    inv = one / (one - x * half)
    return (one + x * half) * inv, inv


@njit(fastmath=FASTMATH, **JIT)
def coefficient_grads(method, dt, a, abar, f):
    """``(dAbar/ddt, dAbar/dA, dBcoef/ddt, dBcoef/dA)`` given ``(abar, f)`` from :func:`coefficients`."""
    if method == MAMBA:
        return a * abar, dt * abar, const(a, 1.0), const(a, 0.0)
    if method == ZOH:
        return a * abar, dt * abar, abar, dt * dt * phi1_grad(dt * a, abar)
    inv2 = f * f
    return a * inv2, dt * inv2, inv2, dt * dt * inv2 * const(a, 0.5)


# --------------------------------------------------------------------------- 16 states in LLVM vectors
#
# The decoding step updates each channel's ``dstate`` states, contiguous in memory. LLVM's
# loop vectoriser either unrolls a loop of 16 and leaves it scalar, or guards it with
# run-time overlap checks per channel; here the 16 states of a channel are one LLVM
# ``<16 x float>`` value (two AVX2 registers), loaded, updated and stored without a loop.


def _item_pointer(context, builder, signature, args):
    """The LLVM pointer to ``arr[idx]`` of an intrinsic's (array, tuple of integers) arguments
    (no wraparound, no bounds check)."""
    from numba.core import cgutils

    aryty, idxty = signature.args
    ary = context.make_array(aryty)(context, builder, args[0])
    inds = [context.cast(builder, builder.extract_value(args[1], i), t, types.intp) for i, t in enumerate(idxty.types)]
    return cgutils.get_item_pointer(context, builder, aryty, ary, inds, wraparound=False)


@intrinsic
def elem_ptr(typingctx, arr, idx):
    """Pointer to ``arr[idx]`` (``idx`` a tuple of integers, no wraparound, no bounds check)."""
    if not isinstance(arr, types.Array) or not isinstance(idx, types.BaseTuple):
        return None
    return types.CPointer(arr.dtype)(arr, idx), _item_pointer


@intrinsic
def prefetch(typingctx, arr, idx):
    """Asks the CPU to bring the cache line of ``arr[idx]`` into its L2 cache (no wraparound, no bounds check).

    A hint: it loads nothing, faults on nothing, and changes no result. LLVM's
    ``llvm.prefetch`` with locality 2 (x86 ``prefetcht1``), for data read some
    microseconds later.
    """
    if not isinstance(arr, types.Array) or not isinstance(idx, types.BaseTuple):
        return None

    def codegen(context, builder, signature, args):
        p = _item_pointer(context, builder, signature, args)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        name = "llvm.prefetch.p0"
        fn = builder.module.globals.get(name) or ir.Function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), name
        )
        builder.call(fn, [builder.bitcast(p, i8p), ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, idx), codegen


def _splat(builder, value, vty):
    undef = ir.Constant(vty, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(ir.IntType(32), vty.count), [0] * vty.count))


def _fma(builder, a, b, c):
    """a*b + c, fused, on LLVM float32 vectors (llvmlite's ``fma`` takes scalars only)."""
    name = f"llvm.fma.v{a.type.count}f32"
    fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(a.type, [a.type] * 3), name)
    return builder.call(fn, [a, b, c])


def _vexp2_f32(builder, x):
    """:func:`exp2_f32` on an LLVM float vector: the same operations, in the same order."""
    vty = x.type
    c = lambda v: ir.Constant(vty, [float(v)] * vty.count)
    lo = builder.fcmp_ordered("<", x, c(_X2_LO))
    xc = builder.select(lo, c(_X2_LO), x)
    hi = builder.fcmp_ordered(">", xc, c(_X2_HI))
    xc = builder.select(hi, c(_X2_HI), xc)
    t = builder.fadd(xc, c(_MAGIC))
    f = builder.fsub(xc, builder.fsub(t, c(_MAGIC)))
    p = c(_E4)
    for coef in (_E3, _E2, _E1, _E0, _ONE32):
        p = _fma(builder, p, f, c(coef))
    ity = ir.VectorType(ir.IntType(32), vty.count)
    bits = builder.shl(builder.bitcast(t, ity), ir.Constant(ity, [23] * vty.count))
    return builder.fmul(p, builder.bitcast(bits, vty))


def _hsum(builder, v):
    """The sum of a vector's elements, as a tree of halves."""
    i32 = ir.IntType(32)
    n = v.type.count
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, n), list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(i32, 0))


@intrinsic
def _mamba_states16_f32(typingctx, ps, pa, pb, pc, pn, scale, dtv, du):
    """16 states of one channel, mamba's discretisation: ``pn[k] = exp(dtv A[k]) ps[k] + du B[k]``; returns Σ C[k] pn[k].

    ``ps, pa, pb, pc, pn``: pointers to 16 consecutive float32 of the state, A, B, C and
    the new state; ``scale`` is :func:`exp_scale` (A times it is exp2's argument per unit Δ).
    """
    ptr = types.CPointer(types.float32)
    sig = types.float32(ptr, ptr, ptr, ptr, ptr, types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        ps, pa, pb, pc, pn, scale, dtv, du = args
        vty = ir.VectorType(ir.FloatType(), 16)
        load = lambda p: builder.load(builder.bitcast(p, vty.as_pointer()), align=4)
        a_scaled = builder.fmul(load(pa), _splat(builder, scale, vty))
        abar = _vexp2_f32(builder, builder.fmul(_splat(builder, dtv, vty), a_scaled))
        h = _fma(builder, abar, load(ps), builder.fmul(_splat(builder, du, vty), load(pb)))
        builder.store(h, builder.bitcast(pn, vty.as_pointer()), align=4)
        return _hsum(builder, builder.fmul(load(pc), h))

    return sig, codegen


def mamba_states16(state, A, B, C, new_state, b, d, gb, gc, n0, dtv, du, scale):
    """Σ_k C h for the states n0 .. n0+15 of channel d, storing h into new_state (mamba's discretisation)."""


def _row_ptr(M, b, g, d, n0):
    """Pointer to state n0 of a B or C row: ``M[b, g, n0]`` (selective) or ``M[d, n0]`` (time-invariant)."""


@overload(_row_ptr, jit_options=dict(fastmath=FASTMATH, **JIT))
def _row_ptr_impl(M, b, g, d, n0):
    if M.ndim == 3:
        return lambda M, b, g, d, n0: elem_ptr(M, (b, g, n0))
    return lambda M, b, g, d, n0: elem_ptr(M, (d, n0))


@overload(mamba_states16, jit_options=dict(fastmath=FASTMATH, **JIT))
def _mamba_states16(state, A, B, C, new_state, b, d, gb, gc, n0, dtv, du, scale):
    if all(M.dtype == types.float32 for M in (state, A, B, C, new_state)):

        def impl(state, A, B, C, new_state, b, d, gb, gc, n0, dtv, du, scale):
            return _mamba_states16_f32(
                elem_ptr(state, (b, d, n0)), elem_ptr(A, (d, n0)), _row_ptr(B, b, gb, d, n0), _row_ptr(C, b, gc, d, n0),
                elem_ptr(new_state, (b, d, n0)), scale, dtv, du,
            )

        return impl

    def impl64(state, A, B, C, new_state, b, d, gb, gc, n0, dtv, du, scale):
        acc = const(dtv, 0.0)
        for k in range(16):
            n = n0 + k
            bv = B[b, gb, n] if B.ndim == 3 else B[d, n]
            cv = C[b, gc, n] if C.ndim == 3 else C[d, n]
            hv = exp_prescaled(dtv * (A[d, n] * scale)) * state[b, d, n] + du * bv
            new_state[b, d, n] = hv
            acc += cv * hv
        return acc

    return impl64


def _in_lane_pair_sum(builder, x, y):
    """``[x0+x1, x2+x3, y0+y1, y2+y3, x4+x5, x6+x7, y4+y5, y6+y7]`` of two 8-float vectors (AVX's ``vhaddps``)."""
    i32v = ir.VectorType(ir.IntType(32), 8)
    even = builder.shuffle_vector(x, y, ir.Constant(i32v, [0, 2, 8, 10, 4, 6, 12, 14]))
    odd = builder.shuffle_vector(x, y, ir.Constant(i32v, [1, 3, 9, 11, 5, 7, 13, 15]))
    return builder.fadd(even, odd)


def _emit_8x16_f32(builder, ps, pa, pb, pc, pn, sb, sc, scale, pdt, pdu, pdx, pgate, py):
    """8 channels of 16 states each, mamba's discretisation, and their outputs.

    For channel i < 8: ``h = exp(dt[i] A[i]) s[i] + du[i] B[i]`` (16 states, stored at
    ``pn + 16 i``) and ``y[i] = (Σ C[i] h + dx[i]) gate[i]``. ``ps, pa, pn`` point to 8 x 16
    consecutive floats (the rows of 8 adjacent channels), ``pb``/``pc`` to B/C rows
    ``sb``/``sc`` floats apart (0: one row shared by the 8 channels), ``pdt, pdu, pdx,
    pgate, py`` to 8 consecutive floats each. The 8 sums over states are one
    transposed reduction (6 pairwise in-lane sums and one cross-lane add) instead of 8
    horizontal ones.
    """
    f32 = ir.FloatType()
    i32 = ir.IntType(32)
    v16, v8 = ir.VectorType(f32, 16), ir.VectorType(f32, 8)
    intp = sb.type

    def at(p, offset, vty):
        q = builder.gep(p, [offset if isinstance(offset, ir.Value) else ir.Constant(intp, offset)])
        return builder.bitcast(q, vty.as_pointer())

    dts = builder.fmul(builder.load(at(pdt, 0, v8), align=4), _splat(builder, scale, v8))
    dus = builder.load(at(pdu, 0, v8), align=4)
    halves = []
    for i in range(8):
        lane = lambda v: builder.shuffle_vector(v, ir.Constant(v8, ir.Undefined), ir.Constant(ir.VectorType(i32, 16), [i] * 16))  # noqa: B023
        bi = builder.mul(sb, ir.Constant(intp, i))
        ci = builder.mul(sc, ir.Constant(intp, i))
        abar = _vexp2_f32(builder, builder.fmul(lane(dts), builder.load(at(pa, 16 * i, v16), align=4)))
        h = _fma(builder, abar, builder.load(at(ps, 16 * i, v16), align=4),
                 builder.fmul(lane(dus), builder.load(at(pb, bi, v16), align=4)))
        builder.store(h, at(pn, 16 * i, v16), align=4)
        p = builder.fmul(builder.load(at(pc, ci, v16), align=4), h)
        lo = builder.shuffle_vector(p, p, ir.Constant(ir.VectorType(i32, 8), list(range(8))))
        hi = builder.shuffle_vector(p, p, ir.Constant(ir.VectorType(i32, 8), list(range(8, 16))))
        halves.append(builder.fadd(lo, hi))
    h01 = _in_lane_pair_sum(builder, halves[0], halves[1])
    h23 = _in_lane_pair_sum(builder, halves[2], halves[3])
    h45 = _in_lane_pair_sum(builder, halves[4], halves[5])
    h67 = _in_lane_pair_sum(builder, halves[6], halves[7])
    q0 = _in_lane_pair_sum(builder, h01, h23)  # [c0 c1 c2 c3 | c0 c1 c2 c3], lower and upper halves of the states
    q1 = _in_lane_pair_sum(builder, h45, h67)
    i32v = ir.VectorType(i32, 8)
    sums = builder.fadd(
        builder.shuffle_vector(q0, q1, ir.Constant(i32v, [0, 1, 2, 3, 8, 9, 10, 11])),
        builder.shuffle_vector(q0, q1, ir.Constant(i32v, [4, 5, 6, 7, 12, 13, 14, 15])),
    )
    sums = builder.fadd(sums, builder.load(at(pdx, 0, v8), align=4))
    builder.store(builder.fmul(sums, builder.load(at(pgate, 0, v8), align=4)), at(py, 0, v8), align=4)


def _array_ptr(context, builder, aryty, aryval, indices):
    """LLVM pointer to ``ary[indices]`` (LLVM ``intp`` values; no wraparound, no bounds check)."""
    from numba.core import cgutils

    ary = context.make_array(aryty)(context, builder, aryval)
    return cgutils.get_item_pointer(context, builder, aryty, ary, indices, wraparound=False)


def _intp_args(context, builder, signature, args, first):
    """The arguments from position ``first`` on, cast to ``intp``."""
    return [context.cast(builder, v, t, types.intp) for v, t in zip(args[first:], signature.args[first:])]


def _channels8_loops(state, A, B, C, new_state, work, y, b, d0, gb, gc, scale):
    for d in range(d0, d0 + 8):
        y[b, d] = (mamba_states16(state, A, B, C, new_state, b, d, gb, gc, 0, work[0, b, d], work[1, b, d], scale)
                   + work[2, b, d]) * work[3, b, d]


@intrinsic
def mamba_channels8(typingctx, state, A, B, C, new_state, work, y, b, d0, gb, gc, scale):
    """Channels d0 .. d0+7 of a decoding step with dstate 16, mamba's discretisation.

    ``work[0..3, b, d]`` hold Δ, Δx, D x and the gate of each channel; writes the new
    states and ``y[b, d0:d0+8]``. B and C rows: ``B[b, gb]`` shared (selective) or ``B[d]``.
    An intrinsic rather than a function: its vector code is emitted into the calling
    kernel (a separate function, cached apart, stays a call that LLVM cannot inline).
    float64 compiles the same as numba loops.
    """
    sig = types.void(state, A, B, C, new_state, work, y, b, d0, gb, gc, scale)
    vector = all(M.dtype == types.float32 for M in (state, A, B, C, new_state, work, y))

    def codegen(context, builder, signature, args):
        if not vector:
            return context.compile_internal(builder, _channels8_loops, signature, args)
        b_, d0_, gb_, gc_ = _intp_args(context, builder, signature, args[:11], 7)
        tys = signature.args
        intp = context.get_value_type(types.intp)
        zero = ir.Constant(intp, 0)
        ptr = lambda i, idx: _array_ptr(context, builder, tys[i], args[i], idx)
        pb = ptr(2, [b_, gb_, zero] if tys[2].ndim == 3 else [d0_, zero])
        pc = ptr(3, [b_, gc_, zero] if tys[3].ndim == 3 else [d0_, zero])
        rows = [ptr(5, [ir.Constant(intp, r), b_, d0_]) for r in range(4)]
        _emit_8x16_f32(
            builder, ptr(0, [b_, d0_, zero]), ptr(1, [d0_, zero]), pb, pc, ptr(4, [b_, d0_, zero]),
            ir.Constant(intp, 0 if tys[2].ndim == 3 else 16), ir.Constant(intp, 0 if tys[3].ndim == 3 else 16),
            args[11], *rows, ptr(6, [b_, d0_]),
        )
        return context.get_dummy_value()

    return sig, codegen


# --------------------------------------------------------------------------- one step of the backward's adjoint


def _lane_sums8(builder, rows):
    """The sums of 8 vectors of 16 floats, as one vector of 8 (a transposed reduction)."""
    i32 = ir.IntType(32)
    halves = []
    for p in rows:
        lo = builder.shuffle_vector(p, p, ir.Constant(ir.VectorType(i32, 8), list(range(8))))
        hi = builder.shuffle_vector(p, p, ir.Constant(ir.VectorType(i32, 8), list(range(8, 16))))
        halves.append(builder.fadd(lo, hi))
    h01 = _in_lane_pair_sum(builder, halves[0], halves[1])
    h23 = _in_lane_pair_sum(builder, halves[2], halves[3])
    h45 = _in_lane_pair_sum(builder, halves[4], halves[5])
    h67 = _in_lane_pair_sum(builder, halves[6], halves[7])
    q0 = _in_lane_pair_sum(builder, h01, h23)
    q1 = _in_lane_pair_sum(builder, h45, h67)
    i32v = ir.VectorType(i32, 8)
    return builder.fadd(
        builder.shuffle_vector(q0, q1, ir.Constant(i32v, [0, 1, 2, 3, 8, 9, 10, 11])),
        builder.shuffle_vector(q0, q1, ir.Constant(i32v, [4, 5, 6, 7, 12, 13, 14, 15])),
    )


def _emit_adjoint_f32(builder, selective_b, selective_c, pg, pab, phs, phn, pa, pdA, pB, sB, pC, sC, pdt, pdul, pdy,
                      ps1, ps2, pdb, pdc, py, dstate):
    """Emits one reverse step of mamba's adjoint over 16 lanes (channels), float32.

    Per state n (rows of 16 lanes, ``n * 16`` floats from each row pointer):
    ``gv = g + C_n dy``, ``g = Abar gv``, ``q = g h_prev``, ``s1 += gv B_n``,
    ``s2 += q A``, ``dA += q Δ``, ``db = gv Δu``; and from the state after the step,
    h (``phn``; ``phs``: h_prev): ``y += C_n h`` (stored at ``py``) and ``dc = h dy``.
    A selective B_n or C_n is one float (``pB + n sB``), broadcast to the lanes; a
    time-invariant one a row of 16 lanes. A selective dB (dC) adds Σ_lanes db (dc) for
    every n to ``pdb[n]`` (``pdc[n]``; 8 states at a time, one transposed reduction); a
    time-invariant one adds db (dc) into the rows at ``pdb`` (``pdc``).
    ``dstate`` must be a multiple of 8.
    """
    from numba.core import cgutils

    f32 = ir.FloatType()
    v16, v8 = ir.VectorType(f32, 16), ir.VectorType(f32, 8)
    intp = sB.type

    def vptr(p, offset, vty=v16):
        return builder.bitcast(builder.gep(p, [offset]), vty.as_pointer())

    def vload(p, offset):
        return builder.load(vptr(p, offset), align=4)

    def vstore(v, p, offset):
        builder.store(v, vptr(p, offset), align=4)

    zero = ir.Constant(intp, 0)
    dt, dul, dy = vload(pdt, zero), vload(pdul, zero), vload(pdy, zero)
    s1p = cgutils.alloca_once_value(builder, ir.Constant(v16, [0.0] * 16))
    s2p = cgutils.alloca_once_value(builder, ir.Constant(v16, [0.0] * 16))
    yp = cgutils.alloca_once_value(builder, ir.Constant(v16, [0.0] * 16))
    with cgutils.for_range_slice(builder, zero, dstate, ir.Constant(intp, 8), intp) as (n0, _):
        s1, s2, y = builder.load(s1p), builder.load(s2p), builder.load(yp)
        dbs, dcs = [], []
        for k in range(8):
            n = builder.add(n0, ir.Constant(intp, k))
            off = builder.mul(n, ir.Constant(intp, 16))
            if selective_c:
                cn = _splat(builder, builder.load(builder.gep(pC, [builder.mul(n, sC)])), v16)
            else:
                cn = vload(pC, off)
            if selective_b:
                bn = _splat(builder, builder.load(builder.gep(pB, [builder.mul(n, sB)])), v16)
            else:
                bn = vload(pB, off)
            gv = _fma(builder, cn, dy, vload(pg, off))
            abar, hp = vload(pab, off), vload(phs, off)
            gn = builder.fmul(abar, gv)
            vstore(gn, pg, off)
            q = builder.fmul(gn, hp)
            h = vload(phn, off)
            y = _fma(builder, cn, h, y)
            dc = builder.fmul(h, dy)
            if selective_c:
                dcs.append(dc)
            else:
                vstore(builder.fadd(vload(pdc, off), dc), pdc, off)
            s1 = _fma(builder, gv, bn, s1)
            s2 = _fma(builder, q, vload(pa, off), s2)
            vstore(_fma(builder, q, dt, vload(pdA, off)), pdA, off)
            db = builder.fmul(gv, dul)
            if selective_b:
                dbs.append(db)
            else:
                vstore(builder.fadd(vload(pdb, off), db), pdb, off)
        if selective_b:
            builder.store(builder.fadd(builder.load(vptr(pdb, n0, v8), align=4), _lane_sums8(builder, dbs)),
                          vptr(pdb, n0, v8), align=4)
        if selective_c:
            builder.store(builder.fadd(builder.load(vptr(pdc, n0, v8), align=4), _lane_sums8(builder, dcs)),
                          vptr(pdc, n0, v8), align=4)
        builder.store(s1, s1p)
        builder.store(s2, s2p)
        builder.store(y, yp)
    vstore(builder.load(s1p), ps1, zero)
    vstore(builder.load(s2p), ps2, zero)
    vstore(builder.load(yp), py, zero)


def _adjoint_loops(g, abars, hs, a_, dAl, B, C, bl, cl, dtl, dul, dyl, s1, s2, yl, dB_part, dBl, dC_part, dCl, ts, tt,
                   tid, b, gb, gc, t):
    lanes = g.shape[2]
    zero = const(g[0, 0, 0], 0.0)
    for j in range(lanes):
        s1[ts, tt, j] = zero
        s2[ts, tt, j] = zero
        yl[ts, tt, j] = zero
    for n in range(g.shape[1]):
        bn = B[b, gb, t, n] if B.ndim == 4 else B[0, 0]
        cn = C[b, gc, t, n] if C.ndim == 4 else C[0, 0]
        sum_b = zero
        sum_c = zero
        for j in range(lanes):
            bv = bn if B.ndim == 4 else bl[ts, n, j]
            cv = cn if C.ndim == 4 else cl[ts, n, j]
            gv = g[ts, n, j] + cv * dyl[ts, tt, j]
            abar, hp = abars[ts, tt, n, j], hs[ts, tt, n, j]
            gn = abar * gv
            g[ts, n, j] = gn
            q = gn * hp
            h = hs[ts, tt + 1, n, j]
            yl[ts, tt, j] += cv * h
            dc = h * dyl[ts, tt, j]
            if C.ndim == 4:
                sum_c += dc
            else:
                dCl[ts, n, j] += dc
            s1[ts, tt, j] += gv * bv
            s2[ts, tt, j] += q * a_[ts, n, j]
            dAl[ts, n, j] += q * dtl[ts, tt, j]
            db = gv * dul[ts, tt, j]
            if B.ndim == 4:
                sum_b += db
            else:
                dBl[ts, n, j] += db
        if B.ndim == 4:
            dB_part[tid, b, gb, t, n] += sum_b
        if C.ndim == 4:
            dC_part[tid, b, gc, t, n] += sum_c


@intrinsic
def mamba_adjoint_step(typingctx, g, abars, hs, a_, dAl, B, C, bl, cl, dtl, dul, dyl, s1, s2, yl, dB_part, dBl,
                       dC_part, dCl, ts, tt, tid, b, gb, gc, t):
    """One reverse step ``tt`` (time ``t``) of mamba's adjoint for the 16 lanes of thread slot ``ts`` (see ``scan_bwd``).

    The lane vectors of the step are time-major rows ``[ts, tt]`` of (slots, CHUNK, 16)
    arrays: it reads Δ (``dtl``), Δu (``dul``) and dy (``dyl``) there, and writes there
    s1 = Σ_n gv B, s2 = Σ_n q A and the output before D and the gate, y = Σ_n C h
    (``yl``; h: the state after the step, ``hs[ts, tt + 1]``, the recompute's next row).
    It updates g and dA, and adds dB and dC: a selective B, time-major
    ``B[b, gb, t, n]``, gets Σ_lanes db added to ``dB_part[tid, b, gb, t, n]`` (the
    thread's partial sum); a time-invariant one gets db added to ``dBl[ts, n]`` (per
    lane); the same for C and dC.
    float32 with dstate a multiple of 8 (the caller's condition) is emitted into the
    calling kernel as LLVM vector code; float64 compiles the same as numba loops.
    """
    sig = types.void(g, abars, hs, a_, dAl, B, C, bl, cl, dtl, dul, dyl, s1, s2, yl, dB_part, dBl, dC_part, dCl, ts, tt,
                     tid, b, gb, gc, t)
    vector = g.dtype == types.float32

    def codegen(context, builder, signature, args):
        from numba.core import cgutils

        if not vector:
            return context.compile_internal(builder, _adjoint_loops, signature, args)
        tys = signature.args
        ts_, tt_, tid_, b_, gb_, gc_, t_ = _intp_args(context, builder, signature, args, 19)
        intp = context.get_value_type(types.intp)
        zero = ir.Constant(intp, 0)
        ptr = lambda i, idx: _array_ptr(context, builder, tys[i], args[i], idx)

        selective_b, selective_c = tys[5].ndim == 4, tys[6].ndim == 4
        one = ir.Constant(intp, 1)
        pB, sB = (ptr(5, [b_, gb_, t_, zero]), one) if selective_b else (ptr(7, [ts_, zero, zero]), zero)
        pC, sC = (ptr(6, [b_, gc_, t_, zero]), one) if selective_c else (ptr(8, [ts_, zero, zero]), zero)
        pdb = ptr(15, [tid_, b_, gb_, t_, zero]) if selective_b else ptr(16, [ts_, zero, zero])
        pdc = ptr(17, [tid_, b_, gc_, t_, zero]) if selective_c else ptr(18, [ts_, zero, zero])
        dstate = cgutils.unpack_tuple(builder, context.make_array(tys[0])(context, builder, args[0]).shape)[1]
        _emit_adjoint_f32(
            builder, selective_b, selective_c, ptr(0, [ts_, zero, zero]), ptr(1, [ts_, tt_, zero, zero]),
            ptr(2, [ts_, tt_, zero, zero]), ptr(2, [ts_, builder.add(tt_, ir.Constant(intp, 1)), zero, zero]),
            ptr(3, [ts_, zero, zero]), ptr(4, [ts_, zero, zero]), pB, sB, pC, sC,
            ptr(9, [ts_, tt_, zero]), ptr(10, [ts_, tt_, zero]), ptr(11, [ts_, tt_, zero]), ptr(12, [ts_, tt_, zero]),
            ptr(13, [ts_, tt_, zero]), pdb, pdc, ptr(14, [ts_, tt_, zero]), dstate,
        )
        return context.get_dummy_value()

    return sig, codegen


# --------------------------------------------------------------------------- 16 x 16 transposes of scratch


def _transpose16_loops(src, dst, ts, r0, c0):
    for r in range(16):
        for c in range(16):
            dst[ts, c0 + c, r0 + r] = src[ts, r0 + r, c0 + c]


@intrinsic
def transpose16(typingctx, src, dst, ts, r0, c0):
    """``dst[ts, c0 + c, r0 + r] = src[ts, r0 + r, c0 + c]`` for r, c < 16: a 16 x 16 tile, transposed.

    It turns a chunk's per-lane rows (contiguous in time, what the elementwise passes
    write) into per-step lane vectors (contiguous in lanes, what the recurrence reads),
    and back: 16 vector loads, 4 x 16 two-vector shuffles, 16 vector stores, where
    moving the 256 values one at a time costs 512 scalar operations and, when a vector
    load follows the scalar stores of its lanes, a failed store-to-load forward. Each
    shuffle stage swaps the off-diagonal b x b blocks of every 2b x 2b block (b = 8,
    4, 2, 1). float32 is emitted as LLVM vector code; float64 compiles as loops.
    """
    sig = types.void(src, dst, ts, r0, c0)
    vector = src.dtype == types.float32 and dst.dtype == types.float32

    def codegen(context, builder, signature, args):
        if not vector:
            return context.compile_internal(builder, _transpose16_loops, signature, args)
        tys = signature.args
        ts_, r0_, c0_ = _intp_args(context, builder, signature, args, 2)
        intp = context.get_value_type(types.intp)
        v16 = ir.VectorType(ir.FloatType(), 16)
        i32v = ir.VectorType(ir.IntType(32), 16)

        def row(i, first, second):
            p = _array_ptr(context, builder, tys[i], args[i], [ts_, first, second])
            return builder.bitcast(p, v16.as_pointer())

        rows = [builder.load(row(0, builder.add(r0_, ir.Constant(intp, r)), c0_), align=4) for r in range(16)]
        for b in (8, 4, 2, 1):
            low = ir.Constant(i32v, [j if j & b == 0 else 16 + j - b for j in range(16)])
            high = ir.Constant(i32v, [j + b if j & b == 0 else 16 + j for j in range(16)])
            for i in range(16):
                if i & b == 0:
                    x, y = rows[i], rows[i + b]
                    rows[i] = builder.shuffle_vector(x, y, low)
                    rows[i + b] = builder.shuffle_vector(x, y, high)
        for c in range(16):
            builder.store(rows[c], row(1, builder.add(c0_, ir.Constant(intp, c)), r0_), align=4)
        return context.get_dummy_value()

    return sig, codegen
