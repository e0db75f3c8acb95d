"""A matrix product for a few rows, for decoding on the CPU: ``x @ W`` with x (rows, K) small.

Decoding a batch of sequences multiplies a few rows of activations (one per sequence) by
every weight matrix of the model, once a token. The work is reading the weights: at
batch 1 OpenBLAS's matrix-vector product streams them at the memory's rate, but at 2 to
16 rows its GEMM packs the weights into its own panels on every call and streams them at
a quarter of it (about 5 GB/s against 22 on the development machine's core).

Here the weights are packed once, when a model first decodes a batch: W (K, N) becomes
``ceil(N / WIDTH)`` panels of (K, WIDTH), each contiguous. A panel's product with 8 rows
of x keeps 8 vector accumulators of WIDTH float32 lanes in registers, and for each k loads
one vector of the panel, broadcasts the 8 values x[:, k] and adds 8 fused multiply-adds:
the panel is read once, front to back. The panel loop is written as an LLVM intrinsic
(vector types, ``llvm.fmuladd``), because numba's loops over the 8 x WIDTH accumulators
stay scalar; panels run in parallel over numba's threads. float32 only: float64 decoding
keeps the BLAS product.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import numba_kernels as nk

#: rows of x per panel product (8 vector accumulators)
ROWS = 8
#: columns of a panel: one AVX-512 vector of float32, two AVX2 ones
WIDTH = 16


@intrinsic
def _panel_product(typingctx, x, panels, out, p):
    """``out[:, p*WIDTH:(p+1)*WIDTH] = x @ panels[p]`` for the ROWS rows of x (all C-contiguous float32)."""

    def f32(a, ndim):
        return isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == ndim and a.layout == "C"

    if not (f32(x, 2) and f32(panels, 3) and f32(out, 2) and isinstance(p, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        xa, wa, ya = (context.make_array(t)(context, builder, v) for t, v in zip(signature.args[:3], args[:3]))
        panel = context.cast(builder, args[3], signature.args[3], types.int64)
        i64, i32 = ir.IntType(64), ir.IntType(32)
        vty = ir.VectorType(ir.FloatType(), WIDTH)
        fmuladd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty, vty, vty]), f"llvm.fmuladd.v{WIDTH}f32"
        )
        const = lambda v: ir.Constant(i64, v)
        k_len = builder.extract_value(xa.shape, 1)
        n_cols = builder.extract_value(ya.shape, 1)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vty, [0.0] * WIDTH)) for _ in range(ROWS)]
        base = builder.gep(wa.data, [builder.mul(panel, builder.mul(k_len, const(WIDTH)))])
        splat = ir.Constant(ir.VectorType(i32, WIDTH), [0] * WIDTH)
        with cgutils.for_range(builder, k_len) as loop:
            k = loop.index
            w = builder.load(builder.bitcast(builder.gep(base, [builder.mul(k, const(WIDTH))]), vty.as_pointer()), align=4)
            for r in range(ROWS):
                xv = builder.load(builder.gep(xa.data, [builder.add(builder.mul(const(r), k_len), k)]))
                one = builder.insert_element(ir.Constant(vty, ir.Undefined), xv, ir.Constant(i32, 0))
                xb = builder.shuffle_vector(one, one, splat)
                builder.store(builder.call(fmuladd, [xb, w, builder.load(accs[r])]), accs[r])
        col = builder.mul(panel, const(WIDTH))
        for r in range(ROWS):
            dst = builder.gep(ya.data, [builder.add(builder.mul(const(r), n_cols), col)])
            builder.store(builder.load(accs[r]), builder.bitcast(dst, vty.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(x, panels, out, p), codegen


@njit(parallel=True, **nk.JIT)
def _products(x, panels, out):
    for p in prange(panels.shape[0]):
        _panel_product(x, panels, out, p)


class Panels:
    """W (K, N) packed for :func:`matmul`: ``ceil(N / WIDTH)`` contiguous (K, WIDTH) panels, zero-padded."""

    __slots__ = ("n", "panels")

    def __init__(self, w: np.ndarray):
        if w.ndim != 2:
            raise ValueError(f"W must be 2-dimensional (K, N), got shape {w.shape}")
        k, n = w.shape
        count = -(-n // WIDTH)
        padded = np.zeros((k, count * WIDTH), np.float32)
        padded[:, :n] = w
        self.panels = np.ascontiguousarray(padded.reshape(k, count, WIDTH).transpose(1, 0, 2))
        self.n = n

    @property
    def nbytes(self) -> int:
        return self.panels.nbytes


def matmul(x: np.ndarray, w: Panels) -> np.ndarray:
    """``x @ W`` for x (rows, K), any layout (copied as float32 by blocks of ROWS rows), and W
    packed as :class:`Panels`; (rows, N) float32."""
    rows, k = x.shape
    if k != w.panels.shape[1]:
        raise ValueError(f"x has {k} columns but W has {w.panels.shape[1]} rows")
    out = np.empty((rows, w.n), np.float32)
    block = np.zeros((ROWS, k), np.float32)
    part = np.empty((ROWS, w.panels.shape[0] * WIDTH), np.float32)
    for r0 in range(0, rows, ROWS):
        r1 = min(rows, r0 + ROWS)
        block[: r1 - r0] = x[r0:r1]
        block[r1 - r0 :] = 0.0
        _products(block, w.panels, part)
        out[r0:r1] = part[: r1 - r0, : w.n]
    return out
