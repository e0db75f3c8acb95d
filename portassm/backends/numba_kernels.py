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
