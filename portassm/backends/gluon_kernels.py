"""The torch backend's forward and backward written in Gluon: Triton's lower-level language with explicit layouts.

The forward of :mod:`portassm.backends.triton_kernels` spends most of its instructions off
the recurrence: each step gathers its column of the (channels, steps) tile from the lanes
that loaded it (a select, two shuffles and two adds per value), reads its B and C rows
from global memory (address arithmetic and an L1 round trip a row), and reduces ``C h``
across the channel's lanes. Here every layout is chosen by hand (``gl.BlockedLayout``) and
the tiles go through shared memory once per tile, so a step is the recurrence alone:

* a channel's dstate states spread over LPC lanes, SPT = 4 a lane (dstate 16: 4 lanes,
  8 channels a warp), as in the Triton kernel;
* per tile (STEPS steps) the program loads u, delta, z coalesced (VEC = STEPS/LPC steps a
  lane), computes softplus, ``dt log2 e`` and ``dt u`` there (each element once), and
  stores the two per-step factors to shared memory; every lane then reads its channel's
  whole row of them back (the channel's LPC lanes hold the same copy), so the step's
  scalars are registers picked at compile time;
* the tile's B and C rows (packed by the wrapper as (batch, groups, seqlen, 2, dstate)
  in float32) are loaded one tile ahead and staged in shared memory; a step reads its
  lane's SPT entries of each with one vector load at a fixed offset;
* ``C h`` is summed only within the lane per step (SPT products); the LPC partial sums of
  every step are reduced once per tile by a transposed butterfly of shuffles
  (``_lane_fold``; or through shared memory, swizzled free of bank conflicts:
  ``_sums_layout``), which leaves each lane with VEC finished outputs in the coalesced
  layout of the store, where D u and the z gate are applied.

A step for 4 states of a lane: 4 multiplies, 4 ``ex2.approx``, 4 multiplies and 4 FMAs
for the state, 4 for ``C h``, 2 shared-memory loads. Softplus and the SiLU gate use the
special-function unit's exp2 and reciprocal with a polynomial log1p (relative error
below 3e-7). One program is one warp by default (8 channels at dstate 16): the tile's
barriers are then within a warp.

Gluon kernels run only on CUDA devices (the interpreter does not run them); the torch
backend selects this forward with ``configure(fwd_kernel="gluon")`` for selective B and C
in float32 compute, and falls back to the Triton forward for the other forms.

The backward (``_scan_bwd_gluon``, below, ``configure(bwd_kernel="gluon")``) has the same
state layout and staging, for mamba's discretisation with selective B and C and dstate 16;
the Triton backward serves the other cases.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

LOG2E = gl.constexpr(1.4426950408889634)


@gluon.constexpr_function
def _sums_layout(BLOCK_D, LPC, STEPS, CPT, SWIZZLE):
    """Shared layout of a tile's partial sums, (BLOCK_D, LPC, STEPS) in float32.

    Each lane stores its row of STEPS partial sums (16-byte vectors: a quarter-warp is LPC
    lanes of a channel times 8 / LPC channels), and each lane reads back VEC = STEPS / LPC
    steps of its channel's LPC rows (a quarter-warp: LPC step groups times 8 / LPC
    channels). Unswizzled, rows STEPS floats apart fall in the same banks: 4-way conflicts
    on the store and 2-way on the read at dstate 16. An XOR swizzle (a linear layout over
    the bits of the word offset) makes both conflict-free: the offset's bits 0, 1 are the
    step within a vector, bits 2.. the step bits that tell a channel's lanes apart on the
    read, each XORed with the lane bit that tells them apart on the store, then channel
    bits up to 3 bank-group bits, then the rest. Unswizzled where the tiles are too short
    for it (VEC < 4) or where ``SWIZZLE`` is off.
    """
    nl, ns, nd = LPC.bit_length() - 1, STEPS.bit_length() - 1, BLOCK_D.bit_length() - 1
    v = (STEPS // LPC).bit_length() - 1
    if not SWIZZLE or v < 2 or v + nl > ns:
        return gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
    c0 = CPT.bit_length() - 1  # a lane's CPT channels are consecutive: lanes differ from channel bit c0
    ch_bits = list(range(c0, nd)) + list(range(c0))
    low = [0, 1] + [v + t for t in range(nl)]
    nch = min(len(ch_bits), 3 - nl)
    bases = [[0, 0, 1 << k] for k in low]
    bases += [[1 << k, 0, 0] for k in ch_bits[:nch]]
    bases += [[0, 0, 1 << k] for k in range(ns) if k not in low]
    bases += [[0, 1 << t, 1 << (v + t)] for t in range(nl)]
    bases += [[1 << k, 0, 0] for k in ch_bits[nch:]]
    return gl.SharedLinearLayout(bases)


@gluon.jit
def _ex2(x, FAST: gl.constexpr):
    """2**x; FAST: the special-function unit's ``ex2.approx`` (flushes subnormal results to zero)."""
    if FAST:
        return gl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1
        )
    else:
        return gl.exp2(x)


@gluon.jit
def _widen(x):
    """A tile read from shared memory in float32: bfloat16 pairs widened by a shift and a mask
    (two instructions a pair, inline PTX), other dtypes converted."""
    if x.dtype == gl.bfloat16:
        return gl.inline_asm_elementwise(
            "shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000;", "=r,=r,r", [x], dtype=gl.float32, is_pure=True, pack=2
        )
    else:
        return x.to(gl.float32)


@gluon.jit
def _rcp(x, FAST: gl.constexpr):
    if FAST:
        return gl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1
        )
    else:
        return 1.0 / x


@gluon.jit
def _softplus(x, FAST: gl.constexpr):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|); log1p(w)/w on [0, 1] by a degree-8 polynomial."""
    w = _ex2(gl.abs(x) * (-LOG2E), FAST)
    p = 0.005244129337370396
    p = p * w - 0.029557399451732635
    p = p * w + 0.07832293212413788
    p = p * w - 0.1367269903421402
    p = p * w + 0.1911117285490036
    p = p * w - 0.24844548106193542
    p = p * w + 0.3331933915615082
    p = p * w - 0.49999508261680603
    p = p * w + 1.0
    return gl.maximum(x, 0.0) + w * p


@gluon.jit
def _silu(z, FAST: gl.constexpr):
    return z * _rcp(1.0 + _ex2(z * (-LOG2E), FAST), FAST)


@gluon.jit
def _phi1(x):
    # expm1(x)/x; Kahan's expm1 away from 0, the Taylor series near it
    e = gl.exp(x)
    lg = gl.log(e)
    direct = gl.where(lg == 0.0, 1.0, (e - 1.0) / gl.where(lg == 0.0, 1.0, lg))
    direct = gl.where(e == 0.0, -1.0 / x, direct)
    series = 1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0))))
    return gl.where(gl.abs(x) < 1e-2, series, direct)


@gluon.jit
def _tile_dt(delta, bias, mask, softplus, FAST: gl.constexpr):
    """A tile's delta + bias and its dt (softplus of it where ``softplus``); dt is 0 where ``mask``
    is off: a step past the end is a no-op (Abar = 1, no input)."""
    pre = delta.to(gl.float32) + bias
    if softplus != 0:
        dt = _softplus(pre, FAST)
    else:
        dt = pre
    return pre, gl.where(mask, dt, 0.0)


@gluon.jit
def _prefetch_l2(ptrs, mask):
    addr = ptrs.to(gl.int64, bitcast=True)
    on = mask.to(gl.int32)
    return gl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
        "=r,l,r",
        [addr, on],
        dtype=gl.int32,
        is_pure=False,
        pack=1,
    )


@gluon.jit
def _column(tile, sel, neg_zero, LAYOUT: gl.constexpr):
    """Column of a (BLOCK_D, STEPS) tile held whole by each lane, as (BLOCK_D, 1) in LAYOUT.

    A sum of the column and -0.0 elsewhere: x + (-0.0) is x exactly, so the compiler
    reduces it to a register pick (a float constant -0.0 would lose its sign on the way).
    """
    col = gl.sum(gl.where(sel, tile, neg_zero), axis=1)
    return gl.convert_layout(col, gl.SliceLayout(1, LAYOUT), assert_trivial=True)[:, None]


@gluon.jit
def _program(BLOCK_D: gl.constexpr, DSTATE: gl.constexpr, STEPS: gl.constexpr, ROW: gl.constexpr,
             LS: gl.constexpr, LC: gl.constexpr, LG: gl.constexpr):
    """A program's place (channel block, batch row as int64, chunk, batch) and its index vectors:
    channels and state offsets in LS, channels and steps in LC, rows and columns of a B, C tile in LG."""
    pid_d = gl.program_id(0)
    b = gl.program_id(1).to(gl.int64)
    c = gl.program_id(2)
    d_s = pid_d * BLOCK_D + gl.arange(0, BLOCK_D, layout=gl.SliceLayout(1, LS))
    n_s = gl.arange(0, DSTATE, layout=gl.SliceLayout(0, LS))
    state_offs = d_s[:, None] * DSTATE + n_s[None, :]
    d_c = pid_d * BLOCK_D + gl.arange(0, BLOCK_D, layout=gl.SliceLayout(1, LC))
    s_c = gl.arange(0, STEPS, layout=gl.SliceLayout(0, LC))
    r_g = gl.arange(0, STEPS, layout=gl.SliceLayout(1, LG))
    q_g = gl.arange(0, ROW, layout=gl.SliceLayout(0, LG))
    return pid_d, b, c, gl.num_programs(1), d_s, state_offs, d_c, s_c, r_g, q_g


@gluon.jit
def _channel_params(bias_ptr, D_ptr, d_c, dim, has_bias, has_d):
    """(channels in range, delta_bias, D) of a program's channels ``d_c``, the last two as
    (channels, 1) columns (zero where absent). The mask is all true: a program's channels lie
    within dim (the wrapper checks); it carries the layout of ``d_c``."""
    true_c = d_c < dim
    bias = gl.load(bias_ptr + d_c, mask=true_c & (has_bias != 0), other=0.0).to(gl.float32)[:, None]
    Dv = gl.load(D_ptr + d_c, mask=true_c & (has_d != 0), other=0.0).to(gl.float32)[:, None]
    return true_c, bias, Dv


@gluon.jit
def _steps3(STEPS: gl.constexpr, L3: gl.constexpr):
    """0 .. STEPS-1 along the last axis of a rank-3 layout, shape (1, 1, STEPS)."""
    s = gl.arange(0, STEPS, layout=gl.SliceLayout(0, gl.SliceLayout(0, L3)))
    return gl.expand_dims(gl.expand_dims(s, 0), 0)


@gluon.jit(
    do_not_specialize=[
        "dim",
        "n_ckpt",
        "dim_per_group",
        "groups",
        "has_init",
        "write_ckpt",
        "softplus",
        "has_d",
        "has_z",
        "has_bias",
    ]
)
def _scan_fwd_gluon(
    u_ptr,
    delta_ptr,
    z_ptr,
    out_ptr,
    A_ptr,
    bc_ptr,
    D_ptr,
    bias_ptr,
    h_init_ptr,
    h_final_ptr,
    decay_ptr,
    ckpt_ptr,
    dim,
    seqlen,
    chunk_len,
    n_ckpt,
    dim_per_group,
    groups,
    has_init,
    write_ckpt,
    softplus,
    has_d,
    has_z,
    has_bias,
    DSTATE: gl.constexpr,
    SPT: gl.constexpr,
    LPC: gl.constexpr,
    W: gl.constexpr,
    STEPS: gl.constexpr,
    CK: gl.constexpr,
    MODE: gl.constexpr,
    STATE_ONLY: gl.constexpr,
    PF: gl.constexpr,
    BCT: gl.constexpr,
    FAST: gl.constexpr,
    CPT: gl.constexpr = 1,
    SWIZZLE: gl.constexpr = True,
    SHFL_SUM: gl.constexpr = True,
):
    """One program: BLOCK_D = CPT·(32/LPC)·W channels of one batch row over one chunk of the sequence.

    The arguments are those of ``triton_kernels._scan_fwd_kernel`` but for ``bc_ptr``, B and
    C packed as (batch, groups, seqlen, 2, DSTATE), float32 or both's 16-bit dtype (staged as
    they come, widened as each step reads them: ``_widen``), and the layout constants:
    SPT states a lane, LPC lanes a channel, W warps a program, CPT channels a lane (each
    per-step read of B and C then serves CPT channels); BCT lanes along a packed (2·DSTATE)
    row in the B, C tile load. FAST and PF > 0 (the L2 prefetch hints, PF steps ahead) are
    inline PTX: compiled code only. SWIZZLE: the tile's partial sums of ``C h`` go through
    shared memory without bank conflicts (``_sums_layout``); SHFL_SUM: they are summed over
    a channel's lanes by shuffles instead (``_lane_fold``), with no shared memory.
    """
    CPW: gl.constexpr = CPT * (32 // LPC)
    BLOCK_D: gl.constexpr = CPW * W
    VEC: gl.constexpr = STEPS // LPC
    ROW: gl.constexpr = 2 * DSTATE
    TPC: gl.constexpr = 32 // LPC  # lanes along the channels of a warp
    # the state: (channel, state), SPT states a lane, LPC lanes a channel
    LS: gl.constexpr = gl.BlockedLayout([CPT, SPT], [TPC, LPC], [W, 1], [1, 0])
    # loads and stores of (channel, step) tiles: VEC consecutive steps a lane
    LC: gl.constexpr = gl.BlockedLayout([CPT, VEC], [TPC, LPC], [W, 1], [1, 0])
    # a channel's whole row of a tile in each of its lanes
    LR: gl.constexpr = gl.BlockedLayout([CPT, STEPS], [TPC, LPC], [W, 1], [1, 0])
    # (channel, lane of the channel, state within the lane): the per-lane partial sums of C h
    L3S: gl.constexpr = gl.BlockedLayout([CPT, 1, SPT], [TPC, LPC, 1], [W, 1, 1], [2, 1, 0])
    # (channel, lane of the channel, step): a tile's partial sums, each lane its own
    L3Y: gl.constexpr = gl.BlockedLayout([CPT, 1, STEPS], [TPC, LPC, 1], [W, 1, 1], [2, 1, 0])
    # the same read back so that each lane holds VEC steps of all LPC partial sums
    L3R: gl.constexpr = gl.BlockedLayout([CPT, LPC, VEC], [TPC, 1, LPC], [W, 1, 1], [2, 1, 0])
    # the packed B, C rows of a tile, (STEPS, 2·DSTATE), 4 a lane
    LG: gl.constexpr = gl.BlockedLayout([1, ROW // BCT], [32 // BCT, BCT], [W, 1], [1, 0])
    # shared memory, unswizzled; a layout of lower rank than its buffer leaves leading buffer axes
    PLAIN2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])

    pid_d, b, c, batch, _d_s, state_offs, d_c, s_c, r_g, q_g = _program(BLOCK_D, DSTATE, STEPS, ROW, LS, LC, LG)
    s_r = gl.arange(0, STEPS, layout=gl.SliceLayout(0, LR))[None, :]
    s_y = _steps3(STEPS, L3Y)
    neg_zero = gl.full([BLOCK_D, STEPS], -2147483648, gl.int32, LR).to(gl.float32, bitcast=True)

    A = gl.load(A_ptr + state_offs).to(gl.float32)
    _true_c, bias, Dv = _channel_params(bias_ptr, D_ptr, d_c, dim, has_bias, has_d)
    g = (pid_d * BLOCK_D) // dim_per_group  # a program's channels share one group of B, C
    bc_base = ((b * groups + g) * seqlen) * ROW

    chunk_state = ((c * batch + b) * dim) * DSTATE + state_offs
    h = gl.load(h_init_ptr + chunk_state, mask=(state_offs >= 0) & (has_init != 0), other=0.0).to(gl.float32)
    if STATE_ONLY:
        if MODE == 2:
            prod = gl.full([BLOCK_D, DSTATE], 1.0, gl.float32, LS)
        else:
            dtsum = gl.zeros([BLOCK_D], gl.float32, gl.SliceLayout(1, LC))

    xs = gl.allocate_shared_memory(gl.float32, [2, BLOCK_D, STEPS], PLAIN2)
    bcs = gl.allocate_shared_memory(bc_ptr.dtype.element_ty, [2 * STEPS, DSTATE], PLAIN2)  # [2 step + (B or C), n]
    ys = gl.allocate_shared_memory(gl.float32, [BLOCK_D, LPC, STEPS], _sums_layout(BLOCK_D, LPC, STEPS, CPT, SWIZZLE))

    row1 = (b * dim + d_c) * seqlen
    row = row1[:, None]
    t_start = c * chunk_len
    t_end = gl.minimum(seqlen, t_start + chunk_len)
    if STATE_ONLY:
        use_z = 0
    else:
        use_z = has_z
    tt = t_start + s_c[None, :]
    mask = tt < t_end
    d_next = gl.load(delta_ptr + row + tt, mask=mask, other=0.0)
    u_next = gl.load(u_ptr + row + tt, mask=mask, other=0.0)
    z_next = gl.load(z_ptr + row + tt, mask=mask & (use_z != 0), other=0.0)
    tr = t_start + r_g[:, None]
    bc_next = gl.load(bc_ptr + bc_base + tr * ROW + q_g[None, :], mask=tr < t_end, other=0.0)
    for t0 in range(t_start, t_end, STEPS):
        d_cur, u_cur, z_cur, bc_cur = d_next, u_next, z_next, bc_next
        tt = t0 + s_c[None, :]
        mask = tt < t_end
        tn = tt + STEPS
        mask_n = tn < t_end
        d_next = gl.load(delta_ptr + row + tn, mask=mask_n, other=0.0)
        u_next = gl.load(u_ptr + row + tn, mask=mask_n, other=0.0)
        z_next = gl.load(z_ptr + row + tn, mask=mask_n & (use_z != 0), other=0.0)
        tr = t0 + STEPS + r_g[:, None]
        bc_next = gl.load(bc_ptr + bc_base + tr * ROW + q_g[None, :], mask=tr < t_end, other=0.0)
        if PF > 0:
            ahead = row1 + (t0 + PF)  # one address a channel (its lanes agree)
            rmask = (d_c >= 0) & (t0 + PF < t_end)
            _prefetch_l2(delta_ptr + ahead, rmask)
            _prefetch_l2(u_ptr + ahead, rmask)
            if not STATE_ONLY:
                _prefetch_l2(z_ptr + ahead, rmask & (use_z != 0))
        _pre, dt = _tile_dt(d_cur, bias, mask, softplus, FAST)
        u = u_cur.to(gl.float32)
        if STATE_ONLY and MODE != 2:
            dtsum += gl.sum(dt, axis=1)
        if MODE == 0:
            xs.index(0).store(dt * LOG2E)
            xs.index(1).store(dt * u)
        else:
            xs.index(0).store(dt)
            xs.index(1).store(u)
        bcs.reshape([STEPS, ROW]).store(bc_cur)
        if (write_ckpt != 0) & (t0 % CK == 0):
            ck = ((b * n_ckpt + t0 // CK) * dim) * DSTATE + state_offs
            gl.store(ckpt_ptr + ck, h)
        gl.thread_barrier()
        x1 = xs.index(0).load(LR)
        x2 = xs.index(1).load(LR)
        if not STATE_ONLY:
            ypart = gl.zeros([BLOCK_D, LPC, STEPS], gl.float32, L3Y)
        for k in gl.static_range(STEPS):
            sel = s_r == k
            x1_k = _column(x1, sel, neg_zero, LS)
            x2_k = _column(x2, sel, neg_zero, LS)
            B_k = _widen(bcs.slice(2 * k, 1).load(LS))
            if MODE == 0:
                abar = _ex2(x1_k * A, FAST)  # x1 = dt log2(e)
                h = abar * h + x2_k * B_k
            elif MODE == 1:
                abar = _ex2((x1_k * LOG2E) * A, FAST)
                h = abar * h + ((x1_k * _phi1(x1_k * A)) * x2_k) * B_k
            else:
                x = x1_k * A
                inv = 1.0 / (1.0 - 0.5 * x)
                abar = (1.0 + 0.5 * x) * inv
                h = abar * h + ((x1_k * inv) * x2_k) * B_k
            if STATE_ONLY:
                if MODE == 2:
                    prod = prod * abar
            else:
                C_k = _widen(bcs.slice(2 * k + 1, 1).load(LS))
                part = gl.convert_layout(gl.reshape(C_k * h, [BLOCK_D, LPC, SPT]), L3S, assert_trivial=True)
                y_k = gl.convert_layout(gl.sum(part, axis=2), gl.SliceLayout(2, L3Y), assert_trivial=True)
                ypart = gl.where(s_y == k, y_k[:, :, None], ypart)
        if not STATE_ONLY:
            if SHFL_SUM:
                y = _lane_fold(ypart, CPT, TPC, LPC, W, LC)
                gl.thread_barrier()  # the tile's shared memory is read before the next tile writes it
            else:
                ys.store(ypart)
                gl.thread_barrier()
                y = gl.convert_layout(gl.sum(ys.load(L3R), axis=1), LC, assert_trivial=True)
            y = y + Dv * u
            if has_z != 0:
                y = y * _silu(z_cur.to(gl.float32), FAST)
            gl.store(out_ptr + row + tt, y.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            gl.thread_barrier()  # the tile's shared memory is read before the next tile writes it
    gl.store(h_final_ptr + chunk_state, h)
    if STATE_ONLY:
        if MODE != 2:
            dts = gl.convert_layout(dtsum, gl.SliceLayout(1, LS))[:, None]
            prod = gl.exp2((dts * LOG2E) * A)
        gl.store(decay_ptr + chunk_state, prod)


# --------------------------------------------------------------------------- the backward


@gluon.jit
def _sigmoid(x, FAST: gl.constexpr):
    return _rcp(1.0 + _ex2(x * (-LOG2E), FAST), FAST)


@gluon.jit
def _bfly(x, OFF: gl.constexpr):
    """The value of ``x`` held by lane ``lane ^ OFF`` (a butterfly shuffle over the whole warp)."""
    if OFF == 16:
        return gl.inline_asm_elementwise(
            "shfl.sync.bfly.b32 $0, $1, 16, 0x1f, -1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1
        )
    elif OFF == 8:
        return gl.inline_asm_elementwise(
            "shfl.sync.bfly.b32 $0, $1, 8, 0x1f, -1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1
        )
    elif OFF == 4:
        return gl.inline_asm_elementwise(
            "shfl.sync.bfly.b32 $0, $1, 4, 0x1f, -1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1
        )
    elif OFF == 2:
        return gl.inline_asm_elementwise(
            "shfl.sync.bfly.b32 $0, $1, 2, 0x1f, -1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1
        )
    else:
        gl.static_assert(OFF == 1)
        return gl.inline_asm_elementwise(
            "shfl.sync.bfly.b32 $0, $1, 1, 0x1f, -1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1
        )


@gluon.jit
def _exchange(lo, hi, bit, OFF: gl.constexpr):
    """One level of a transposed butterfly: lanes with ``bit`` keep ``hi`` and send ``lo``, the others
    the reverse; each adds what its partner (lane ^ OFF) sent. Two values in, one sum out."""
    send = gl.where(bit, lo, hi)
    keep = gl.where(bit, hi, lo)
    return keep + _bfly(send, OFF)


@gluon.jit
def _fold(y, OFF: gl.constexpr, CPT: gl.constexpr, TPC: gl.constexpr, LPC: gl.constexpr, W: gl.constexpr):
    """One level of the forward's lane sum: (channels, LPC, N) partial sums, each lane its own N
    steps, to (channels, LPC, N/2): lanes whose lane bit OFF is set keep the upper half of the
    steps and send the lower one to lane ^ OFF, the others the reverse (``_exchange``)."""
    BD: gl.constexpr = y.shape[0]
    N: gl.constexpr = y.shape[2]
    L4: gl.constexpr = gl.BlockedLayout([CPT, 1, 2, N // 2], [TPC, LPC, 1, 1], [W, 1, 1, 1], [3, 2, 1, 0])
    LH: gl.constexpr = gl.BlockedLayout([CPT, 1, N // 2], [TPC, LPC, 1], [W, 1, 1], [2, 1, 0])
    halves = gl.convert_layout(gl.reshape(y, [BD, LPC, 2, N // 2]), L4, assert_trivial=True)
    lo, hi = gl.split(gl.permute(halves, (0, 1, 3, 2)))
    lo = gl.convert_layout(lo, LH, assert_trivial=True)
    hi = gl.convert_layout(hi, LH, assert_trivial=True)
    lane = gl.arange(0, LPC, layout=gl.SliceLayout(0, gl.SliceLayout(2, LH)))[None, :, None]
    return _exchange(lo, hi, (lane & OFF) != 0, OFF)


@gluon.jit
def _lane_fold(ypart, CPT: gl.constexpr, TPC: gl.constexpr, LPC: gl.constexpr, W: gl.constexpr, LC: gl.constexpr):
    """The forward's partial sums of a tile, (channels, LPC, STEPS) with each lane its STEPS,
    summed over a channel's LPC lanes by a transposed butterfly (log2 LPC levels of shuffles,
    the highest lane bit first): each lane ends with its VEC = STEPS / LPC steps of the sums
    in the coalesced layout LC, as the shared-memory round trip leaves them."""
    y = ypart
    if LPC >= 16:
        y = _fold(y, 8, CPT, TPC, LPC, W)
    if LPC >= 8:
        y = _fold(y, 4, CPT, TPC, LPC, W)
    if LPC >= 4:
        y = _fold(y, 2, CPT, TPC, LPC, W)
    if LPC >= 2:
        y = _fold(y, 1, CPT, TPC, LPC, W)
    return gl.convert_layout(gl.reshape(y, [y.shape[0], y.shape[1] * y.shape[2]]), LC, assert_trivial=True)


@gluon.jit
def _halves(x, LAYOUT: gl.constexpr, HALF: gl.constexpr):
    """(rows, 2k) -> its even and odd columns, (rows, k) each in HALF (register renamings only)."""
    rows: gl.constexpr = x.shape[0]
    cols: gl.constexpr = x.shape[1]
    pairs = gl.convert_layout(gl.reshape(x, [rows, cols // 2, 2]), LAYOUT, assert_trivial=True)
    even, odd = gl.split(pairs)
    return gl.convert_layout(even, HALF, assert_trivial=True), gl.convert_layout(odd, HALF, assert_trivial=True)


@gluon.jit
def _lane_sum(x, L3S: gl.constexpr, SLOT: gl.constexpr, LPC: gl.constexpr, SPT: gl.constexpr):
    """A (channels, dstate) tensor summed over the states each lane holds: (channels, LPC) in SLOT."""
    part = gl.convert_layout(gl.reshape(x, [x.shape[0], LPC, SPT]), L3S, assert_trivial=True)
    return gl.convert_layout(gl.sum(part, axis=2), SLOT, assert_trivial=True)


@gluon.jit
def _pick(q, col, i: gl.constexpr, neg_zero, LAYOUT: gl.constexpr):
    """Column ``i`` of a (channels, 4) tensor whose lanes hold their channel's whole row, as (channels, 1)."""
    v = gl.sum(gl.where(col == i, q, neg_zero), axis=1)
    return gl.convert_layout(v, gl.SliceLayout(1, LAYOUT), assert_trivial=True)[:, None]


@gluon.jit(do_not_specialize=["dim", "n_ckpt", "dim_per_group", "groups", "has_g_init", "softplus", "has_d", "has_bias"])
def _scan_bwd_gluon(
    dout_ptr,
    u_ptr,
    delta_ptr,
    z_ptr,
    A_ptr,
    bc_ptr,
    D_ptr,
    bias_ptr,
    ckpt_ptr,
    g_init_ptr,
    du_ptr,
    ddelta_ptr,
    dz_ptr,
    dA_ptr,
    dbc_ptr,
    dD_ptr,
    dbias_ptr,
    g_final_ptr,
    decay_ptr,
    dim,
    seqlen,
    chunk_len,
    n_ckpt,
    dim_per_group,
    groups,
    has_g_init,
    softplus,
    has_d,
    has_bias,
    DSTATE: gl.constexpr,
    W: gl.constexpr,
    STEPS: gl.constexpr,
    HAS_Z: gl.constexpr,
    ADJOINT_ONLY: gl.constexpr,
    BCT: gl.constexpr,
    FAST: gl.constexpr,
    SWIZZLE: gl.constexpr = True,
):
    """The backward of mamba's discretisation for selective B and C, dstate 16, float32 compute.

    One program: 8·W channels of one batch row over one chunk, walking it backwards a tile of
    STEPS steps at a time; the checkpoints are the state before every STEPS-th step. The
    arguments are those of ``triton_kernels._scan_bwd_kernel`` but for ``bc_ptr`` (B and C
    packed as in the forward) and ``dbc_ptr``, the per-program sums of dB and dC over its
    channels, (programs along dim, batch, seqlen, 2, DSTATE). Per tile:

    * u, delta, dout, z are loaded one tile ahead, coalesced; dt (softplus), ``dt u`` and the
      gated dout are staged in shared memory as (step, channel) quartets, which every lane
      of the channel reads back with one vector load a step; B and C rows as in the forward;
    * the tile's states are recomputed from its checkpoint, gathered in registers and written
      to shared memory in one store (stored step by step, Gluon's barrier analysis would put
      a barrier before each store), with ``C h`` summed within the lane for dz;
    * the adjoint walks back through the tile: per step the sums over states (``g B`` for du
      and d dt, ``g h Abar A`` for d dt) stay within the lane and are reduced across the
      channel's 4 lanes once a tile, through shared memory; the sums over channels (dB, dC)
      are a transposed butterfly over the warp's 8 channels (3 shuffles: the lane's 8 values,
      4 states of each matrix, become one (matrix, state) summed over the channels), then a
      fixed-order sum over the program's warps once a tile. No atomics: repeated calls agree
      bit for bit.

    ADJOINT_ONLY: the first pass of a chunked backward (the adjoint through each chunk from
    zero, and the product of Abar), as in the Triton kernel.
    """
    SPT: gl.constexpr = 4
    LPC: gl.constexpr = 4
    CPW: gl.constexpr = 8
    gl.static_assert(DSTATE == SPT * LPC)
    BLOCK_D: gl.constexpr = CPW * W
    VEC: gl.constexpr = STEPS // LPC
    ROW: gl.constexpr = 2 * DSTATE
    LS: gl.constexpr = gl.BlockedLayout([1, SPT], [CPW, LPC], [W, 1], [1, 0])
    L8: gl.constexpr = gl.BlockedLayout([1, SPT // 2], [CPW, LPC], [W, 1], [1, 0])
    L1: gl.constexpr = gl.BlockedLayout([1, 1], [CPW, LPC], [W, 1], [1, 0])
    P16: gl.constexpr = gl.BlockedLayout([1, SPT // 2, 2], [CPW, LPC, 1], [W, 1, 1], [2, 1, 0])
    P8: gl.constexpr = gl.BlockedLayout([1, 1, 2], [CPW, LPC, 1], [W, 1, 1], [2, 1, 0])
    LC: gl.constexpr = gl.BlockedLayout([1, VEC], [CPW, LPC], [W, 1], [1, 0])
    LQ: gl.constexpr = gl.BlockedLayout([1, VEC, 2, 2], [CPW, LPC, 1, 1], [W, 1, 1, 1], [3, 2, 1, 0])
    LQ3: gl.constexpr = gl.BlockedLayout([1, VEC, 4], [CPW, LPC, 1], [W, 1, 1], [2, 1, 0])
    LX: gl.constexpr = gl.BlockedLayout([1, 4], [CPW, LPC], [W, 1], [1, 0])
    L3S: gl.constexpr = gl.BlockedLayout([1, 1, SPT], [CPW, LPC, 1], [W, 1, 1], [2, 1, 0])
    L3Y: gl.constexpr = gl.BlockedLayout([1, 1, STEPS], [CPW, LPC, 1], [W, 1, 1], [2, 1, 0])
    L3R: gl.constexpr = gl.BlockedLayout([1, LPC, VEC], [CPW, 1, LPC], [W, 1, 1], [2, 1, 0])
    # the per-warp dB, dC sums of a tile, (warp, channel slot, lane, step), summed over the warps
    LW: gl.constexpr = gl.BlockedLayout([W, 1, 1, VEC], [1, CPW, LPC, 1], [1, 1, 1, W], [3, 2, 1, 0])
    LG: gl.constexpr = gl.BlockedLayout([1, ROW // BCT], [32 // BCT, BCT], [W, 1], [1, 0])
    SLOT: gl.constexpr = gl.SliceLayout(2, L3Y)
    # a tile's states, (channel, state, step): each lane its SPT states of every step
    LH: gl.constexpr = gl.BlockedLayout([1, SPT, STEPS], [CPW, LPC, 1], [W, 1, 1], [2, 1, 0])
    PLAIN2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])

    pid_d, b, c, batch, _d_s, state_offs, d_c, s_c, r_g, q_g = _program(BLOCK_D, DSTATE, STEPS, ROW, LS, LC, LG)
    col_x = gl.arange(0, 4, layout=gl.SliceLayout(0, LX))[None, :]
    s_h = _steps3(STEPS, LH)
    s_y = _steps3(STEPS, L3Y)
    neg_zero = gl.full([BLOCK_D, 4], -2147483648, gl.int32, LX).to(gl.float32, bitcast=True)
    # the channel's place in its warp: bits 2, 1, 0 are lanes 16, 8, 4 apart
    cw = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(1, LS)) % CPW
    bit2 = ((cw & 4) != 0)[:, None]
    bit1 = gl.convert_layout((cw & 2) != 0, gl.SliceLayout(1, L8), assert_trivial=True)[:, None]
    bit0 = gl.convert_layout((cw & 1) != 0, gl.SliceLayout(1, L1), assert_trivial=True)[:, None]

    A2 = gl.load(A_ptr + state_offs).to(gl.float32) * LOG2E
    true_c, bias, Dv = _channel_params(bias_ptr, D_ptr, d_c, dim, has_bias, has_d)
    g_idx = (pid_d * BLOCK_D) // dim_per_group  # a program's channels share one group of B, C
    bc_base = ((b * groups + g_idx) * seqlen) * ROW

    chunk_state = ((c * batch + b) * dim) * DSTATE + state_offs
    if ADJOINT_ONLY:
        g = gl.zeros([BLOCK_D, DSTATE], gl.float32, LS)
        prod = gl.full([BLOCK_D, DSTATE], 1.0, gl.float32, LS)
    else:
        g = gl.load(g_init_ptr + chunk_state, mask=(state_offs >= 0) & (has_g_init != 0), other=0.0).to(gl.float32)
        dA = gl.zeros([BLOCK_D, DSTATE], gl.float32, LS)
        dD = gl.zeros([BLOCK_D], gl.float32, gl.SliceLayout(1, LC))
        dbias = gl.zeros([BLOCK_D], gl.float32, gl.SliceLayout(1, LC))

    xs = gl.allocate_shared_memory(gl.float32, [STEPS, BLOCK_D * 4], PLAIN2)  # [step, channel and quartet]
    xq = xs.reshape([STEPS * BLOCK_D, 4])  # [step and channel, quartet]
    bcs = gl.allocate_shared_memory(bc_ptr.dtype.element_ty, [2 * STEPS, DSTATE], PLAIN2)  # [2 step + (B or C), n]
    if not ADJOINT_ONLY:
        hs = gl.allocate_shared_memory(gl.float32, [STEPS, BLOCK_D * DSTATE], PLAIN2)
        hq = hs.reshape([STEPS * BLOCK_D, DSTATE])
        # the tile's per-lane sums: y (for dz), the two for du and d dt, and the warp sums of dB, dC
        SUMS: gl.constexpr = _sums_layout(BLOCK_D, LPC, STEPS, 1, SWIZZLE)
        ys0 = gl.allocate_shared_memory(gl.float32, [BLOCK_D, LPC, STEPS], SUMS)
        ys1 = gl.allocate_shared_memory(gl.float32, [BLOCK_D, LPC, STEPS], SUMS)
        ys2 = gl.allocate_shared_memory(gl.float32, [BLOCK_D, LPC, STEPS], SUMS)
        ws = gl.allocate_shared_memory(gl.float32, [BLOCK_D, LPC, STEPS], SUMS)

    row1 = (b * dim + d_c) * seqlen
    row = row1[:, None]
    t_start = c * chunk_len
    t_end = gl.minimum(seqlen, t_start + chunk_len)
    n_tiles = gl.cdiv(t_end - t_start, STEPS)
    t_last = t_start + (n_tiles - 1) * STEPS
    tt = t_last + s_c[None, :]
    mask = tt < t_end
    d_next = gl.load(delta_ptr + row + tt, mask=mask, other=0.0)
    g_next = gl.load(dout_ptr + row + tt, mask=mask, other=0.0)
    u_next = gl.load(u_ptr + row + tt, mask=mask, other=0.0)
    if HAS_Z:
        z_next = gl.load(z_ptr + row + tt, mask=mask, other=0.0)
    else:
        z_next = d_next  # not read
    tr = t_last + r_g[:, None]
    bc_next = gl.load(bc_ptr + bc_base + tr * ROW + q_g[None, :], mask=tr < t_end, other=0.0)
    if not ADJOINT_ONLY:
        ck_next = gl.load(ckpt_ptr + ((b * n_ckpt + t_last // STEPS) * dim) * DSTATE + state_offs)
    for jt in range(n_tiles):
        t0 = t_last - jt * STEPS
        d_cur, g_cur, u_cur, z_cur, bc_cur = d_next, g_next, u_next, z_next, bc_next
        tt = t0 + s_c[None, :]
        mask = tt < t_end
        tn = tt - STEPS
        mask_n = (tn >= t_start) & (tn < t_end)
        d_next = gl.load(delta_ptr + row + tn, mask=mask_n, other=0.0)
        g_next = gl.load(dout_ptr + row + tn, mask=mask_n, other=0.0)
        u_next = gl.load(u_ptr + row + tn, mask=mask_n, other=0.0)
        if HAS_Z:
            z_next = gl.load(z_ptr + row + tn, mask=mask_n, other=0.0)
        else:
            z_next = d_next
        tr = t0 - STEPS + r_g[:, None]
        bc_next = gl.load(bc_ptr + bc_base + tr * ROW + q_g[None, :], mask=(tr >= t_start) & (tr < t_end), other=0.0)
        if not ADJOINT_ONLY:
            h = ck_next
            ck_at = gl.maximum(t0 - STEPS, t_start) // STEPS
            ck_next = gl.load(ckpt_ptr + ((b * n_ckpt + ck_at) * dim) * DSTATE + state_offs)

        pre, dt = _tile_dt(d_cur, bias, mask, softplus, FAST)
        dy = g_cur.to(gl.float32)
        u = u_cur.to(gl.float32)
        if HAS_Z:
            zz = z_cur.to(gl.float32)
            sz = _sigmoid(zz, FAST)
            dz_over_y = dy * sz * (1.0 + zz * (1.0 - sz))
            dy = dy * zz * sz
        # per (channel, step): dt, dt u, the gated dout, 0 (join adds a minor axis: [x, y] of
        # join(join(dt, dy), join(dt u, 0)) is word 2 x + y); a lane's VEC steps are 4·VEC consecutive words
        quad = gl.join(gl.join(dt, dy), gl.join(dt * u, gl.zeros_like(dt)))
        quad = gl.convert_layout(quad, LQ, assert_trivial=True)
        quad = gl.convert_layout(gl.reshape(quad, [BLOCK_D, STEPS, 4]), LQ3, assert_trivial=True)
        xs.store(gl.reshape(gl.permute(quad, (1, 0, 2)), [STEPS, BLOCK_D * 4]))
        bcs.reshape([STEPS, ROW]).store(bc_cur)
        gl.thread_barrier()

        if ADJOINT_ONLY:
            for kb in gl.static_range(STEPS - 1, -1, -1):
                q = xq.slice(kb * BLOCK_D, BLOCK_D).load(LX)
                dt_k = _pick(q, col_x, 0, neg_zero, LS)
                dy_k = _pick(q, col_x, 2, neg_zero, LS)
                C_k = _widen(bcs.slice(2 * kb + 1, 1).load(LS))
                abar = _ex2(dt_k * A2, FAST)
                g = abar * (g + C_k * dy_k)
                prod = prod * abar
            gl.thread_barrier()  # the tile's shared memory is read before the next tile writes it
        else:
            # the tile's states from its checkpoint, gathered in registers and stored at once
            # (one barrier): hs[k] holds the state before step k
            states = gl.zeros([BLOCK_D, DSTATE, STEPS], gl.float32, LH)
            if HAS_Z:
                ypart = gl.zeros([BLOCK_D, LPC, STEPS], gl.float32, L3Y)
            for k in gl.static_range(STEPS):
                states = gl.where(s_h == k, gl.convert_layout(h, gl.SliceLayout(2, LH), assert_trivial=True)[:, :, None], states)
                q = xq.slice(k * BLOCK_D, BLOCK_D).load(LX)
                dt_k = _pick(q, col_x, 0, neg_zero, LS)
                bu_k = _pick(q, col_x, 1, neg_zero, LS)
                B_k = _widen(bcs.slice(2 * k, 1).load(LS))
                h = _ex2(dt_k * A2, FAST) * h + bu_k * B_k
                if HAS_Z:
                    C_k = _widen(bcs.slice(2 * k + 1, 1).load(LS))
                    ypart = gl.where(s_y == k, _lane_sum(C_k * h, L3S, SLOT, LPC, SPT)[:, :, None], ypart)
            hs.store(gl.reshape(gl.permute(states, (2, 0, 1)), [STEPS, BLOCK_D * DSTATE]))
            if HAS_Z:
                ys0.store(ypart)
            # the adjoint, last step first; h is the state after step k
            s1part = gl.zeros([BLOCK_D, LPC, STEPS], gl.float32, L3Y)
            s2part = gl.zeros([BLOCK_D, LPC, STEPS], gl.float32, L3Y)
            wpart = gl.zeros([BLOCK_D, LPC, STEPS], gl.float32, L3Y)
            for kb in gl.static_range(STEPS - 1, -1, -1):
                q = xq.slice(kb * BLOCK_D, BLOCK_D).load(LX)
                dt_k = _pick(q, col_x, 0, neg_zero, LS)
                dy_k = _pick(q, col_x, 2, neg_zero, LS)
                bu_k = _pick(q, col_x, 1, neg_zero, LS)
                B_k = _widen(bcs.slice(2 * kb, 1).load(LS))
                C_k = _widen(bcs.slice(2 * kb + 1, 1).load(LS))
                hp = hq.slice(kb * BLOCK_D, BLOCK_D).load(LS)
                hdy = h * dy_k  # dC's terms
                g = g + C_k * dy_k
                gbu = g * bu_k  # dB's terms
                s1part = gl.where(s_y == kb, _lane_sum(g * B_k, L3S, SLOT, LPC, SPT)[:, :, None], s1part)
                abar = _ex2(dt_k * A2, FAST)
                ga = g * hp * abar
                dA += ga * dt_k
                s2part = gl.where(s_y == kb, _lane_sum(ga * A2, L3S, SLOT, LPC, SPT)[:, :, None], s2part)
                g = g * abar
                h = hp
                # dB, dC summed over the warp's channels: each lane ends with one (matrix, state)
                w = _exchange(gbu, hdy, bit2, 16)
                w_even, w_odd = _halves(w, P16, L8)
                w = _exchange(w_even, w_odd, bit1, 8)
                w_even, w_odd = _halves(w, P8, L1)
                w = _exchange(w_even, w_odd, bit0, 4)
                wpart = gl.where(s_y == kb, gl.convert_layout(w, SLOT, assert_trivial=True)[:, :, None], wpart)
            ys1.store(s1part)
            ys2.store(s2part)
            ws.store(wpart)
            gl.thread_barrier()

            # dB, dC rows of the tile: the warps' sums added in a fixed order; lane (c, j) of a warp
            # holds matrix c >> 2 (0: B, 1: C), state 4 j + (c >> 1 & 1) + 2 (c & 1)
            wsum = gl.sum(ws.reshape([W, CPW, LPC, STEPS]).load(LW), axis=0)
            L3W: gl.constexpr = gl.SliceLayout(0, LW)
            cc = gl.arange(0, CPW, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3W)))[:, None, None]
            jj = gl.arange(0, LPC, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3W)))[None, :, None]
            ss = gl.arange(0, STEPS, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3W)))[None, None, :]
            mat = cc >> 2
            nn = 4 * jj + ((cc >> 1) & 1) + 2 * (cc & 1)
            t_w = t0 + ss
            dst = ((pid_d * batch + b) * seqlen + t_w) * ROW + mat * DSTATE + nn
            gl.store(dbc_ptr + dst, wsum, mask=(t_w < t_end) & (mat >= 0) & (nn >= 0))

            s1 = gl.convert_layout(gl.sum(ys1.load(L3R), axis=1), LC, assert_trivial=True)
            s2 = gl.convert_layout(gl.sum(ys2.load(L3R), axis=1), LC, assert_trivial=True)
            du = dt * s1 + Dv * dy
            ddt = s2 * 0.6931471805599453 + u * s1  # s2 was summed with A log2(e)
            if softplus != 0:
                ddt = ddt * _sigmoid(pre, FAST)
            ddt = gl.where(mask, ddt, 0.0)
            dbias += gl.sum(ddt, axis=1)
            dD += gl.sum(gl.where(mask, dy * u, 0.0), axis=1)
            gl.store(du_ptr + row + tt, du.to(du_ptr.dtype.element_ty), mask=mask)
            gl.store(ddelta_ptr + row + tt, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)
            if HAS_Z:
                y = gl.convert_layout(gl.sum(ys0.load(L3R), axis=1), LC, assert_trivial=True)
                dz = dz_over_y * (y + Dv * u)
                gl.store(dz_ptr + row + tt, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    gl.store(g_final_ptr + chunk_state, g)
    if ADJOINT_ONLY:
        gl.store(decay_ptr + chunk_state, prod)
    else:
        gl.store(dA_ptr + chunk_state, dA)
        per_channel = (c * batch + b) * dim + d_c
        gl.store(dD_ptr + per_channel, dD, mask=true_c & (has_d != 0))
        gl.store(dbias_ptr + per_channel, dbias, mask=true_c & (has_bias != 0))
