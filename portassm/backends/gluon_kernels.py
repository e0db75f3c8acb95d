"""The torch backend's forward written in Gluon: Triton's lower-level language with explicit layouts.

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
  every step are reduced once per tile through shared memory, which leaves each lane with
  VEC finished outputs in the coalesced layout of the store, where D u and the z gate are
  applied.

A step for 4 states of a lane: 4 multiplies, 4 ``ex2.approx``, 4 multiplies and 4 FMAs
for the state, 4 for ``C h``, 2 shared-memory loads. Softplus and the SiLU gate use the
special-function unit's exp2 and reciprocal with a polynomial log1p (relative error
below 3e-7). One program is one warp by default (8 channels at dstate 16): the tile's
barriers are then within a warp.

Gluon kernels run only on CUDA devices (the interpreter does not run them); the torch
backend selects this forward with ``configure(fwd_kernel="gluon")`` for selective B and C
in float32 compute, and falls back to the Triton forward for the other forms.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

LOG2E = gl.constexpr(1.4426950408889634)


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
):
    """One program: BLOCK_D = (32/LPC)·W channels of one batch row over one chunk of the sequence.

    The arguments are those of ``triton_kernels._scan_fwd_kernel`` but for ``bc_ptr``, B and
    C packed as (batch, groups, seqlen, 2, DSTATE) float32, and the layout constants:
    SPT states a lane, LPC lanes a channel, W warps a program; BCT lanes along a packed
    (2·DSTATE) row in the B, C tile load. FAST and PF > 0 (the L2 prefetch hints, PF steps
    ahead) are inline PTX: compiled code only.
    """
    CPW: gl.constexpr = 32 // LPC
    BLOCK_D: gl.constexpr = CPW * W
    VEC: gl.constexpr = STEPS // LPC
    ROW: gl.constexpr = 2 * DSTATE
    # the state: (channel, state), SPT states a lane, LPC lanes a channel
    LS: gl.constexpr = gl.BlockedLayout([1, SPT], [CPW, LPC], [W, 1], [1, 0])
    # loads and stores of (channel, step) tiles: VEC consecutive steps a lane
    LC: gl.constexpr = gl.BlockedLayout([1, VEC], [CPW, LPC], [W, 1], [1, 0])
    # a channel's whole row of a tile in each of its lanes
    LR: gl.constexpr = gl.BlockedLayout([1, STEPS], [CPW, LPC], [W, 1], [1, 0])
    # (channel, lane of the channel, state within the lane): the per-lane partial sums of C h
    L3S: gl.constexpr = gl.BlockedLayout([1, 1, SPT], [CPW, LPC, 1], [W, 1, 1], [2, 1, 0])
    # (channel, lane of the channel, step): a tile's partial sums, each lane its own
    L3Y: gl.constexpr = gl.BlockedLayout([1, 1, STEPS], [CPW, LPC, 1], [W, 1, 1], [2, 1, 0])
    # the same read back so that each lane holds VEC steps of all LPC partial sums
    L3R: gl.constexpr = gl.BlockedLayout([1, LPC, VEC], [CPW, 1, LPC], [W, 1, 1], [2, 1, 0])
    # the packed B, C rows of a tile, (STEPS, 2·DSTATE), 4 a lane
    LG: gl.constexpr = gl.BlockedLayout([1, ROW // BCT], [32 // BCT, BCT], [W, 1], [1, 0])
    # shared memory, unswizzled; a layout of lower rank than its buffer leaves leading buffer axes
    PLAIN2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    PLAIN3: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])

    pid_d = gl.program_id(0)
    b = gl.program_id(1).to(gl.int64)
    c = gl.program_id(2)
    batch = gl.num_programs(1)

    d_s = pid_d * BLOCK_D + gl.arange(0, BLOCK_D, layout=gl.SliceLayout(1, LS))
    n_s = gl.arange(0, DSTATE, layout=gl.SliceLayout(0, LS))
    state_offs = d_s[:, None] * DSTATE + n_s[None, :]
    d_c = pid_d * BLOCK_D + gl.arange(0, BLOCK_D, layout=gl.SliceLayout(1, LC))
    s_c = gl.arange(0, STEPS, layout=gl.SliceLayout(0, LC))
    s_r = gl.arange(0, STEPS, layout=gl.SliceLayout(0, LR))[None, :]
    s_y = gl.expand_dims(gl.expand_dims(gl.arange(0, STEPS, layout=gl.SliceLayout(0, gl.SliceLayout(0, L3Y))), 0), 0)
    r_g = gl.arange(0, STEPS, layout=gl.SliceLayout(1, LG))
    q_g = gl.arange(0, ROW, layout=gl.SliceLayout(0, LG))
    neg_zero = gl.full([BLOCK_D, STEPS], -2147483648, gl.int32, LR).to(gl.float32, bitcast=True)
    true_c = d_c < dim  # all true: a program's channels lie within dim (the wrapper checks)

    A = gl.load(A_ptr + state_offs).to(gl.float32)
    bias = gl.load(bias_ptr + d_c, mask=true_c & (has_bias != 0), other=0.0).to(gl.float32)[:, None]
    Dv = gl.load(D_ptr + d_c, mask=true_c & (has_d != 0), other=0.0).to(gl.float32)[:, None]
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
    bcs = gl.allocate_shared_memory(gl.float32, [2 * STEPS, DSTATE], PLAIN2)  # [2 step + (B or C), n]
    ys = gl.allocate_shared_memory(gl.float32, [BLOCK_D, LPC, STEPS], PLAIN3)

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
        pre = d_cur.to(gl.float32) + bias
        if softplus != 0:
            dt = _softplus(pre, FAST)
        else:
            dt = pre
        dt = gl.where(mask, dt, 0.0)  # a step past the end is a no-op: Abar = 1, no input
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
            B_k = bcs.slice(2 * k, 1).load(LS)
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
                C_k = bcs.slice(2 * k + 1, 1).load(LS)
                part = gl.convert_layout(gl.reshape(C_k * h, [BLOCK_D, LPC, SPT]), L3S, assert_trivial=True)
                y_k = gl.convert_layout(gl.sum(part, axis=2), gl.SliceLayout(2, L3Y), assert_trivial=True)
                ypart = gl.where(s_y == k, y_k[:, :, None], ypart)
        if not STATE_ONLY:
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
