"""Triton kernels of the torch backend: the fused selective scan, its backward and one step.

Memory traffic first. The forward reads u, delta, z (batch, dim, seqlen) and writes
out once; B and C are (batch, groups, seqlen, dstate) here (the wrapper transposes them,
a pass over 1/dim of the bytes) so that one time step of them is one contiguous row.
Nothing of shape (batch, dim, seqlen, dstate) touches device memory: every program keeps
the states of its BLOCK_D channels in registers and walks the sequence in tiles of STEPS
time steps, loaded as (BLOCK_D, STEPS) blocks one tile ahead. The compiler lays every
tensor of the loop out alike: with STEPS = 4 a thread holds one channel's 16-byte tile row
and all its dstate states; with STEPS = 16 a row spreads over 4 lanes (16 bytes each) and
so do the channel's states (dstate/4 lanes, 4 states a lane for dstate 16).

Inside a tile each step picks its column out of the tile registers (a sum over a one-hot
mask along STEPS: a register read when STEPS is in-thread, two shuffles otherwise),
updates the dstate states and reduces ``sum_n C h``.

Sequences may be cut into chunks scanned in parallel (grid axis 2), so that batch-1
long sequences fill the GPU. A chunk's effect on the state is affine,
``h_end = P * h_start + S`` with P the product of Abar over the chunk: a first pass
computes (P, S) per chunk from a zero state, ``_chunk_combine_kernel`` chains them, and a
second pass rescans every chunk from its true starting state. The backward does the same
for the adjoint, which runs backwards in time.

The backward recomputes states: the forward (when a gradient is wanted) stores the state
every CK steps, the backward rescans each CK-step block from its checkpoint into a small
program-private scratch (BLOCK_D x CK x dstate, hot in L2), then walks the block backwards.
Sums over channels (dB, dC of a shared B, C) are written per channel block and summed by
the wrapper in a fixed order, never with atomics, so repeated calls agree bit for bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: discretisation codes passed as the MODE constexpr
MODES = {"mamba": 0, "zoh": 1, "bilinear": 2}

LOG2E = tl.constexpr(1.4426950408889634)
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)


@triton.jit
def _log1p(w):
    # Goldberg's trick: exact to a few ulp without libdevice (not in the interpreter)
    v = 1.0 + w
    return tl.where(v == 1.0, w, tl.log(v) * (w / (v - 1.0)))


@triton.jit
def _softplus(x):
    return tl.where(x > SOFTPLUS_THRESHOLD, x, _log1p(tl.exp(tl.minimum(x, SOFTPLUS_THRESHOLD))))


@triton.jit
def _softplus_grad(x):
    return tl.where(x > SOFTPLUS_THRESHOLD, 1.0, 1.0 / (1.0 + tl.exp(-x)))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _phi1(x):
    # expm1(x)/x; Kahan's expm1 away from 0, the Taylor series near it
    e = tl.exp(x)
    lg = tl.log(e)
    direct = tl.where(lg == 0.0, 1.0, (e - 1.0) / tl.where(lg == 0.0, 1.0, lg))
    direct = tl.where(e == 0.0, -1.0 / x, direct)  # exp underflowed: expm1(x) = -1
    series = 1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0))))
    return tl.where(tl.abs(x) < 1e-2, series, direct)


@triton.jit
def _phi1_grad(x):
    # d/dx expm1(x)/x = (x e^x - e^x + 1)/x^2; series sum_k (k-1) x^(k-2)/k! near 0
    safe = tl.where(tl.abs(x) < 1e-1, 1.0, x)
    direct = (safe * tl.exp(safe) - safe * _phi1(safe)) / (safe * safe)
    series = 0.5 + x * (
        1.0 / 3.0
        + x
        * (
            1.0 / 8.0
            + x
            * (
                1.0 / 30.0
                + x
                * (
                    1.0 / 144.0
                    + x
                    * (
                        1.0 / 840.0
                        + x * (1.0 / 5760.0 + x * (1.0 / 45360.0 + x * (1.0 / 403200.0 + x * (1.0 / 3991680.0))))
                    )
                )
            )
        )
    )
    return tl.where(tl.abs(x) < 1e-1, series, direct)


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    """2**x; FAST: the bare special-function-unit instruction (flushes subnormals to zero),
    without the subnormal scaling that ``tl.exp2`` wraps around it."""
    if FAST:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp2(x)


@triton.jit
def _prefetch(ptrs, mask, LEVEL: tl.constexpr):
    """Ask the cache (LEVEL 1: L1, 2: L2) for the lines holding ``ptrs`` where ``mask``; a hint only."""
    addr = ptrs.to(tl.int64, bitcast=True)
    on = mask.to(tl.int32)
    if LEVEL == 1:
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L1 [$1]; mov.b32 $0, 0; }",
            "=r,l,r",
            [addr, on],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
            "=r,l,r",
            [addr, on],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


@triton.jit
def _coefficients(dt, A, MODE: tl.constexpr, FAST: tl.constexpr = False):
    """(Abar, Bcoef) of (BLOCK_D, 1) steps and (BLOCK_D, DSTATE) eigenvalues.

    Abar is exp2((dt log2 e) A): one multiply per state and the MUFU exp2. mamba's Bcoef
    stays (BLOCK_D, 1), saving a register per state.
    """
    if MODE == 0:
        abar = _exp2((dt * LOG2E) * A, FAST)
        bcoef = dt
    elif MODE == 1:
        abar = _exp2((dt * LOG2E) * A, FAST)
        bcoef = dt * _phi1(dt * A)
    else:
        x = dt * A
        inv = 1.0 / (1.0 - 0.5 * x)
        abar = (1.0 + 0.5 * x) * inv
        bcoef = dt * inv
    return abar, bcoef


@triton.jit
def _advance(h, dt_k, u_k, B_k, A, MODE: tl.constexpr, FAST: tl.constexpr):
    """One step of the recurrence for (BLOCK_D, DSTATE) states."""
    abar, bcoef = _coefficients(dt_k, A, MODE, FAST)
    return abar * h + (bcoef * u_k) * B_k


@triton.jit
def _add_eight(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4, a5 + b5, a6 + b6, a7 + b7


@triton.jit
def _column(tile, sel):
    """Column of a (BLOCK_D, STEPS) tile under a one-hot (1, STEPS) mask, as (BLOCK_D, 1)."""
    return tl.sum(tl.where(sel, tile, -0.0), axis=1, keep_dims=True)


@triton.jit
def _dt_tile(delta_ptr, bias, offs, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CDT: tl.constexpr):
    """Delta after bias and softplus for a tile, and its pre-softplus value; 0 where masked (a no-op step)."""
    pre = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(CDT)
    if HAS_BIAS:
        pre = pre + bias
    dt = pre
    if SOFTPLUS:
        dt = _softplus(pre)
    return tl.where(mask, dt, 0.0), pre


@triton.jit
def _on(mask, flag):
    """``mask`` where the run-time scalar ``flag`` is set (written elementwise for the interpreter)."""
    return mask & ((mask.to(tl.int32) * 0 + flag) != 0)


@triton.jit
def _bc_step(M_ptr, base, t, offs_n, M_fixed, VARY: tl.constexpr, CDT: tl.constexpr):
    """B or C at step t: (1, DSTATE) (selective: one contiguous row of the program's group), or the fixed matrix.

    t is clamped by the caller to a valid step (a step past the end has dt = 0 and u = 0,
    so its row is unused), so the load needs no mask.
    """
    if VARY:
        return tl.load(M_ptr + base + t * offs_n.shape[0] + offs_n).to(CDT)[None, :]
    else:
        return M_fixed


@triton.jit(
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
def _scan_fwd_kernel(
    u_ptr,
    delta_ptr,
    z_ptr,
    out_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
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
    DSTATE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STEPS: tl.constexpr,
    CK: tl.constexpr,
    MODE: tl.constexpr,
    B_VARY: tl.constexpr,
    C_VARY: tl.constexpr,
    STATE_ONLY: tl.constexpr,
    CDT: tl.constexpr,
    PF: tl.constexpr,
    FAST: tl.constexpr,
):
    """One program: BLOCK_D channels of one batch row over one chunk of the sequence.

    The options (softplus, D, z, delta_bias, initial state, checkpoints) are run-time flags:
    each costs a uniform branch or a multiply per tile, and one compiled kernel serves them all.
    STATE_ONLY: first pass of the chunked scan, writes only the chunk's final state from
    a zero start (h_final) and the product of Abar over the chunk (decay).
    Otherwise writes out, the final state of the chunk and, with write_ckpt, the state
    before every CK-th step into ckpt (batch, n_ckpt, dim, DSTATE).
    PF > 0: prefetch B, C rows PF steps ahead into L1 and the rows of u, delta, z 2*PF
    steps ahead into L2 (hints; compiled code only, the interpreter has no inline assembly).
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, DSTATE)
    offs_s = tl.arange(0, STEPS)
    dmask = offs_d < dim
    dmask2 = dmask[:, None]
    state_offs = offs_d[:, None] * DSTATE + offs_n[None, :]
    batch = tl.num_programs(1)

    A = tl.load(A_ptr + state_offs, mask=dmask2, other=0.0).to(CDT)
    bias = tl.load(bias_ptr + offs_d, mask=_on(dmask, has_bias), other=0.0).to(CDT)[:, None]
    Dv = tl.load(D_ptr + offs_d, mask=_on(dmask, has_d), other=0.0).to(CDT)[:, None]
    g = (pid_d * BLOCK_D) // dim_per_group  # a program's channels share one group of B, C
    bc_base = ((b * groups + g) * seqlen) * DSTATE
    Bm = 0.0
    if not B_VARY:
        Bm = tl.load(B_ptr + state_offs, mask=dmask2, other=0.0).to(CDT)
    Cm = 0.0
    if not C_VARY:
        Cm = tl.load(C_ptr + state_offs, mask=dmask2, other=0.0).to(CDT)

    chunk_state = ((c * batch + b) * dim) * DSTATE + state_offs
    h = tl.load(h_init_ptr + chunk_state, mask=_on(dmask2, has_init), other=0.0).to(CDT)
    if STATE_ONLY:
        if MODE == 2:
            prod = tl.full((BLOCK_D, DSTATE), 1.0, CDT)
        else:  # prod of exp(dt A) = exp(A sum dt): the decay from the summed steps
            dtsum = tl.zeros((BLOCK_D, 1), CDT)

    row = (b * dim + offs_d)[:, None] * seqlen
    t_start = c * chunk_len
    t_end = tl.minimum(seqlen, t_start + chunk_len)
    if STATE_ONLY:
        use_z = 0
    else:
        use_z = has_z
    # the next tile is loaded while this one is scanned; its softplus waits until its turn
    tt = t_start + offs_s[None, :]
    mask = dmask2 & (tt < t_end)
    d_next = tl.load(delta_ptr + row + tt, mask=mask, other=0.0)
    u_next = tl.load(u_ptr + row + tt, mask=mask, other=0.0)
    z_next = tl.load(z_ptr + row + tt, mask=_on(mask, use_z), other=0.0)
    for t0 in range(t_start, t_end, STEPS):
        d_cur, u_cur, z_cur = d_next, u_next, z_next
        tt = t0 + offs_s[None, :]
        mask = dmask2 & (tt < t_end)
        tn = tt + STEPS
        mask_n = dmask2 & (tn < t_end)
        d_next = tl.load(delta_ptr + row + tn, mask=mask_n, other=0.0)
        u_next = tl.load(u_ptr + row + tn, mask=mask_n, other=0.0)
        z_next = tl.load(z_ptr + row + tn, mask=_on(mask_n, use_z), other=0.0)
        if PF > 0:
            ahead = t0 + 2 * PF
            rmask = dmask2 & (ahead < t_end)
            _prefetch(delta_ptr + row + ahead, rmask, 2)
            _prefetch(u_ptr + row + ahead, rmask, 2)
            if not STATE_ONLY:
                _prefetch(z_ptr + row + ahead, _on(rmask, use_z), 2)
            # thread d asks for row t0 + PF + d % STEPS of the group: the tile PF steps on
            t_pf = t0 + PF + (offs_d % STEPS)[:, None]
            pmask = dmask2 & (t_pf < t_end)
            if B_VARY:
                _prefetch(B_ptr + bc_base + t_pf * DSTATE, pmask, 1)
            if C_VARY and not STATE_ONLY:
                _prefetch(C_ptr + bc_base + t_pf * DSTATE, pmask, 1)
        pre = d_cur.to(CDT) + bias
        if softplus != 0:
            dt = _softplus(pre)
        else:
            dt = pre
        dt = tl.where(mask, dt, 0.0)  # a step past the end is a no-op: Abar = 1, no input
        u = u_cur.to(CDT)
        if (write_ckpt != 0) & (t0 % CK == 0):
            ck = ((b * n_ckpt + t0 // CK) * dim) * DSTATE + state_offs
            tl.store(ckpt_ptr + ck, h, mask=dmask2)
        if STATE_ONLY:
            if MODE != 2:
                dtsum += tl.sum(dt, axis=1, keep_dims=True)
        else:
            y = tl.zeros((BLOCK_D, STEPS), CDT)
        for k in tl.static_range(STEPS):
            sel = offs_s[None, :] == k
            dt_k = _column(dt, sel)
            u_k = _column(u, sel)
            t = tl.minimum(t0 + k, t_end - 1)
            B_k = _bc_step(B_ptr, bc_base, t, offs_n, Bm, B_VARY, CDT)
            abar, bcoef = _coefficients(dt_k, A, MODE, FAST)
            h = abar * h + (bcoef * u_k) * B_k
            if STATE_ONLY:
                if MODE == 2:
                    prod = prod * abar
            else:
                C_k = _bc_step(C_ptr, bc_base, t, offs_n, Cm, C_VARY, CDT)
                y_k = tl.sum(C_k * h, axis=1, keep_dims=True)
                y = tl.where(sel, y_k, y)
        if not STATE_ONLY:
            y = y + Dv * u
            if has_z != 0:
                zz = z_cur.to(CDT)
                y = y * zz * _sigmoid(zz)
            tl.store(out_ptr + row + tt, y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(h_final_ptr + chunk_state, h, mask=dmask2)
    if STATE_ONLY:
        if MODE != 2:
            prod = tl.exp2((dtsum * LOG2E) * A)
        tl.store(decay_ptr + chunk_state, prod, mask=dmask2)


@triton.jit
def _chunk_combine_kernel(
    h_init_ptr,
    S_ptr,
    P_ptr,
    first_ptr,
    dim,
    n_chunks,
    DSTATE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_FIRST: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """Chain the affine chunk maps ``h_out = P h_in + S`` along the chunks.

    Writes ``h_init[c]``, the state entering chunk c (from chunk c-1; in REVERSE, the
    adjoint entering chunk c from chunk c+1), for every chunk; (n_chunks, batch, dim, DSTATE).
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    batch = tl.num_programs(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, DSTATE)
    m = (offs_d < dim)[:, None]
    state_offs = offs_d[:, None] * DSTATE + offs_n[None, :]
    if HAS_FIRST:
        h = tl.load(first_ptr + b * dim * DSTATE + state_offs, mask=m, other=0.0)
    else:
        h = tl.zeros((BLOCK_D, DSTATE), tl.float32).to(h_init_ptr.dtype.element_ty)
    for i in range(n_chunks):
        c = i
        if REVERSE:
            c = n_chunks - 1 - i
        at = ((c * batch + b) * dim) * DSTATE + state_offs
        tl.store(h_init_ptr + at, h, mask=m)
        h = tl.load(P_ptr + at, mask=m, other=0.0) * h + tl.load(S_ptr + at, mask=m, other=0.0)


@triton.jit(do_not_specialize=["dim", "n_ckpt", "dim_per_group", "groups", "has_g_init"])
def _scan_bwd_kernel(
    dout_ptr,
    u_ptr,
    delta_ptr,
    z_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    bias_ptr,
    ckpt_ptr,
    g_init_ptr,
    scratch_ptr,
    du_ptr,
    ddelta_ptr,
    dz_ptr,
    dA_ptr,
    dB_ptr,
    dC_ptr,
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
    DSTATE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STEPS: tl.constexpr,
    CK: tl.constexpr,
    MODE: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    B_VARY: tl.constexpr,
    C_VARY: tl.constexpr,
    ADJOINT_ONLY: tl.constexpr,
    CDT: tl.constexpr,
    FAST: tl.constexpr,
):
    """One program: BLOCK_D channels of one batch row over one chunk, backwards in time.

    ADJOINT_ONLY: first pass of the chunked backward: runs only ``g = Abar (g + C dy)``
    from zero and writes the adjoint leaving the chunk (g_final) and the product of Abar
    (decay). Otherwise: for each CK block, last first, rescan its states from ckpt into
    scratch, then walk it backwards accumulating every gradient. Per-time outputs
    (du, ddelta, dz) are written directly; dB, dC of selective B, C per channel block as
    (n_dblocks, batch, seqlen, DSTATE); dA, time-invariant dB/dC, dD, dbias per
    (chunk, batch) row; g_final is the adjoint leaving the chunk at its start.
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2)
    batch = tl.num_programs(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, DSTATE)
    offs_s = tl.arange(0, STEPS)
    dmask = offs_d < dim
    dmask2 = dmask[:, None]
    state_offs = offs_d[:, None] * DSTATE + offs_n[None, :]

    A = tl.load(A_ptr + state_offs, mask=dmask2, other=0.0).to(CDT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=dmask, other=0.0).to(CDT)[:, None]
    else:
        bias = 0.0
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=dmask, other=0.0).to(CDT)[:, None]
    g_idx = (pid_d * BLOCK_D) // dim_per_group
    bc_base = ((b * groups + g_idx) * seqlen) * DSTATE
    Bm = 0.0
    if not B_VARY:
        Bm = tl.load(B_ptr + state_offs, mask=dmask2, other=0.0).to(CDT)
        dBm = tl.zeros((BLOCK_D, DSTATE), CDT)
    Cm = 0.0
    if not C_VARY:
        Cm = tl.load(C_ptr + state_offs, mask=dmask2, other=0.0).to(CDT)
        dCm = tl.zeros((BLOCK_D, DSTATE), CDT)
    chunk_state = ((c * batch + b) * dim) * DSTATE + state_offs
    if ADJOINT_ONLY:
        g = tl.zeros((BLOCK_D, DSTATE), CDT)
    else:
        g = tl.load(g_init_ptr + chunk_state, mask=_on(dmask2, has_g_init), other=0.0).to(CDT)
    if ADJOINT_ONLY:
        prod = tl.full((BLOCK_D, DSTATE), 1.0, CDT)
    dA = tl.zeros((BLOCK_D, DSTATE), CDT)
    dD = tl.zeros((BLOCK_D, 1), CDT)
    dbias = tl.zeros((BLOCK_D, 1), CDT)

    row = (b * dim + offs_d)[:, None] * seqlen
    # this program's scratch: the state entering each SUB steps of a CK block
    SUB: tl.constexpr = 4  # states of a sub-tile, unrolled by hand below
    tl.static_assert(STEPS % SUB == 0)
    tl.static_assert(CK % STEPS == 0)
    SCRATCH_TILE: tl.constexpr = BLOCK_D * DSTATE
    pid_lin = (c * batch + b) * tl.num_programs(0) + pid_d
    # [sub-tile][d][n]: stored and loaded in the same layout, so each thread reads back its own
    scratch = (
        scratch_ptr
        + pid_lin.to(tl.int64) * ((CK // SUB) * SCRATCH_TILE)
        + tl.arange(0, BLOCK_D)[:, None] * DSTATE
        + offs_n[None, :]
    )
    dpart = (pid_d * batch + b) * seqlen * DSTATE  # per channel block partials of dB, dC
    sel_rows = offs_s[:, None]

    t_start = c * chunk_len
    t_end = tl.minimum(seqlen, t_start + chunk_len)
    n_blocks = tl.cdiv(t_end - t_start, CK)
    for jb in range(n_blocks):
        blk = t_start + (n_blocks - 1 - jb) * CK
        blk_end = tl.minimum(t_end, blk + CK)
        if not ADJOINT_ONLY:
            # rescan the block from its checkpoint, keeping the state entering each SUB steps
            ck = ((b * n_ckpt + blk // CK) * dim) * DSTATE + state_offs
            h = tl.load(ckpt_ptr + ck, mask=dmask2, other=0.0).to(CDT)
            for t0 in range(blk, blk_end, STEPS):
                tt = t0 + offs_s[None, :]
                mask = dmask2 & (tt < blk_end)
                offs = row + tt
                dt, _ = _dt_tile(delta_ptr, bias, offs, mask, HAS_BIAS, SOFTPLUS, CDT)
                u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(CDT)
                for k in tl.static_range(STEPS):
                    if k % SUB == 0:
                        tl.store(scratch + ((t0 - blk + k) // SUB) * SCRATCH_TILE, h)
                    sel = offs_s[None, :] == k
                    B_k = _bc_step(B_ptr, bc_base, tl.minimum(t0 + k, blk_end - 1), offs_n, Bm, B_VARY, CDT)
                    h = _advance(h, _column(dt, sel), _column(u, sel), B_k, A, MODE, FAST)
            tl.debug_barrier()
        # walk the block backwards a tile at a time, each tile SUB steps at a time: the SUB
        # states of a sub-tile are recomputed into registers from its entering state
        n_tiles = tl.cdiv(blk_end - blk, STEPS)
        for jt in range(n_tiles):
            t0 = blk + (n_tiles - 1 - jt) * STEPS
            tt = t0 + offs_s[None, :]
            mask = dmask2 & (tt < blk_end)
            offs = row + tt
            dt, pre = _dt_tile(delta_ptr, bias, offs, mask, HAS_BIAS, SOFTPLUS, CDT)
            dy = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(CDT)
            if HAS_Z:
                zz = tl.load(z_ptr + offs, mask=mask, other=0.0).to(CDT)
                sz = _sigmoid(zz)
                dz_over_y = dy * sz * (1.0 + zz * (1.0 - sz))
                dy = dy * zz * sz
            if SOFTPLUS:
                dsoftplus = _softplus_grad(pre)
            if not ADJOINT_ONLY:
                u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(CDT)
                du = tl.zeros((BLOCK_D, STEPS), CDT)
                ddt = tl.zeros((BLOCK_D, STEPS), CDT)
                if HAS_Z:
                    y = tl.zeros((BLOCK_D, STEPS), CDT)
                # this tile's rows of dB, dC summed over the program's channels, stored once
                dB_t = tl.zeros((STEPS, DSTATE), CDT)
                dC_t = tl.zeros((STEPS, DSTATE), CDT)
            for qq in tl.static_range(STEPS // SUB):
                q0 = (STEPS // SUB - 1 - qq) * SUB  # first step of the sub-tile within the tile
                if not ADJOINT_ONLY:
                    s0 = tl.load(scratch + ((t0 - blk + q0) // SUB) * SCRATCH_TILE)
                    sel0 = offs_s[None, :] == q0
                    sel1 = offs_s[None, :] == q0 + 1
                    sel2 = offs_s[None, :] == q0 + 2
                    s1 = _advance(
                        s0,
                        _column(dt, sel0),
                        _column(u, sel0),
                        _bc_step(B_ptr, bc_base, tl.minimum(t0 + q0, blk_end - 1), offs_n, Bm, B_VARY, CDT),
                        A,
                        MODE,
                        FAST,
                    )
                    s2 = _advance(
                        s1,
                        _column(dt, sel1),
                        _column(u, sel1),
                        _bc_step(B_ptr, bc_base, tl.minimum(t0 + q0 + 1, blk_end - 1), offs_n, Bm, B_VARY, CDT),
                        A,
                        MODE,
                        FAST,
                    )
                    s3 = _advance(
                        s2,
                        _column(dt, sel2),
                        _column(u, sel2),
                        _bc_step(B_ptr, bc_base, tl.minimum(t0 + q0 + 2, blk_end - 1), offs_n, Bm, B_VARY, CDT),
                        A,
                        MODE,
                        FAST,
                    )
                for kk in tl.static_range(SUB):
                    k = q0 + SUB - 1 - kk
                    sel = offs_s[None, :] == k
                    t = t0 + k
                    dt_k = _column(dt, sel)
                    dy_k = _column(dy, sel)
                    C_k = _bc_step(C_ptr, bc_base, tl.minimum(t, blk_end - 1), offs_n, Cm, C_VARY, CDT)
                    abar, bcoef = _coefficients(dt_k, A, MODE, FAST)
                    if ADJOINT_ONLY:
                        g = abar * (g + C_k * dy_k)
                        prod = prod * abar
                    else:
                        if kk == 3:
                            h_prev = s0
                        elif kk == 2:
                            h_prev = s1
                        elif kk == 1:
                            h_prev = s2
                        else:
                            h_prev = s3
                        u_k = _column(u, sel)
                        B_k = _bc_step(B_ptr, bc_base, tl.minimum(t, blk_end - 1), offs_n, Bm, B_VARY, CDT)
                        bu = bcoef * u_k
                        h = abar * h_prev + bu * B_k
                        if HAS_Z:
                            y = tl.where(sel, tl.sum(C_k * h, axis=1, keep_dims=True), y)
                        hdy = h * dy_k
                        g = g + C_k * dy_k
                        gbu = g * bu
                        if B_VARY and C_VARY:  # summed over the channels once per sub-tile, below
                            if kk == 0:
                                hd3, gb3 = hdy, gbu
                            elif kk == 1:
                                hd2, gb2 = hdy, gbu
                            elif kk == 2:
                                hd1, gb1 = hdy, gbu
                            else:
                                hd0, gb0 = hdy, gbu
                        else:
                            if C_VARY:
                                dC_t = tl.where(sel_rows == k, tl.sum(hdy, axis=0, keep_dims=True), dC_t)
                            else:
                                dCm += hdy
                            if B_VARY:
                                dB_t = tl.where(sel_rows == k, tl.sum(gbu, axis=0, keep_dims=True), dB_t)
                            else:
                                dBm += gbu
                        du = tl.where(sel, tl.sum(g * bcoef * B_k, axis=1, keep_dims=True), du)
                        da = g * h_prev
                        dbc = g * B_k * u_k
                        x = dt_k * A
                        if MODE == 0:
                            ddt_k = tl.sum(da * A * abar + dbc, axis=1, keep_dims=True)
                            dA += da * dt_k * abar
                        elif MODE == 1:
                            ddt_k = tl.sum(da * A * abar + dbc * abar, axis=1, keep_dims=True)
                            dA += da * dt_k * abar + dbc * (dt_k * dt_k) * _phi1_grad(x)
                        else:
                            inv = 1.0 / (1.0 - 0.5 * x)
                            inv2 = inv * inv
                            ddt_k = tl.sum(da * A * inv2 + dbc * inv2, axis=1, keep_dims=True)
                            dA += da * dt_k * inv2 + dbc * (dt_k * dt_k * 0.5) * inv2
                        ddt = tl.where(sel, ddt_k, ddt)
                        g = abar * g
                if (not ADJOINT_ONLY) and B_VARY and C_VARY:
                    # the sub-tile's dC, dB rows: one reduction over the channels (one barrier
                    # pair across the warps) for its SUB steps and both matrices
                    c0, c1, c2, c3, b0, b1, b2, b3 = tl.reduce(
                        (hd0, hd1, hd2, hd3, gb0, gb1, gb2, gb3), 0, _add_eight, keep_dims=True
                    )
                    dC_t = tl.where(sel_rows == q0, c0, dC_t)
                    dC_t = tl.where(sel_rows == q0 + 1, c1, dC_t)
                    dC_t = tl.where(sel_rows == q0 + 2, c2, dC_t)
                    dC_t = tl.where(sel_rows == q0 + 3, c3, dC_t)
                    dB_t = tl.where(sel_rows == q0, b0, dB_t)
                    dB_t = tl.where(sel_rows == q0 + 1, b1, dB_t)
                    dB_t = tl.where(sel_rows == q0 + 2, b2, dB_t)
                    dB_t = tl.where(sel_rows == q0 + 3, b3, dB_t)
            if not ADJOINT_ONLY:
                rows_at = dpart + (t0 + sel_rows) * DSTATE + offs_n[None, :]
                rows_mask = (t0 + sel_rows) < blk_end
                if B_VARY:
                    tl.store(dB_ptr + rows_at, dB_t, mask=rows_mask)
                if C_VARY:
                    tl.store(dC_ptr + rows_at, dC_t, mask=rows_mask)
                if HAS_Z:
                    if HAS_D:
                        y = y + Dv * u
                    dz = dz_over_y * y
                    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
                if HAS_D:
                    du = du + Dv * dy
                    dD += tl.sum(tl.where(mask, dy * u, 0.0), axis=1, keep_dims=True)
                tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)
                if SOFTPLUS:
                    ddt = ddt * dsoftplus
                ddt = tl.where(mask, ddt, 0.0)
                if HAS_BIAS:
                    dbias += tl.sum(ddt, axis=1, keep_dims=True)
                tl.store(ddelta_ptr + offs, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)
        if not ADJOINT_ONLY:
            tl.debug_barrier()
    tl.store(g_final_ptr + chunk_state, g, mask=dmask2)
    if ADJOINT_ONLY:
        tl.store(decay_ptr + chunk_state, prod, mask=dmask2)
    else:
        # per (chunk, batch) partial sums over time, reduced by the wrapper
        tl.store(dA_ptr + chunk_state, dA, mask=dmask2)
        if not B_VARY:
            tl.store(dB_ptr + chunk_state, dBm, mask=dmask2)
        if not C_VARY:
            tl.store(dC_ptr + chunk_state, dCm, mask=dmask2)
        per_channel = (c * batch + b) * dim + offs_d[:, None]
        if HAS_D:
            tl.store(dD_ptr + per_channel, dD, mask=dmask2)
        if HAS_BIAS:
            tl.store(dbias_ptr + per_channel, dbias, mask=dmask2)


@triton.jit
def _scan_step_kernel(
    state_ptr,
    x_ptr,
    dt_ptr,
    z_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    bias_ptr,
    y_ptr,
    new_state_ptr,
    dim,
    dim_per_group,
    groups,
    DSTATE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MODE: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    B_VARY: tl.constexpr,
    C_VARY: tl.constexpr,
    CDT: tl.constexpr,
):
    """One token for BLOCK_D channels of one batch row: reads the state, writes y and the new state."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, DSTATE)
    dmask = offs_d < dim
    m = dmask[:, None]
    state_offs = offs_d[:, None] * DSTATE + offs_n[None, :]
    srow = b * dim * DSTATE + state_offs
    A = tl.load(A_ptr + state_offs, mask=m, other=0.0).to(CDT)
    h = tl.load(state_ptr + srow, mask=m, other=0.0).to(CDT)
    x = tl.load(x_ptr + b * dim + offs_d, mask=dmask, other=0.0).to(CDT)[:, None]
    dt = tl.load(dt_ptr + b * dim + offs_d, mask=dmask, other=0.0).to(CDT)[:, None]
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=dmask, other=0.0).to(CDT)[:, None]
    if SOFTPLUS:
        dt = _softplus(dt)
    g = (pid_d * BLOCK_D) // dim_per_group
    if B_VARY:
        Bk = tl.load(B_ptr + (b * groups + g) * DSTATE + offs_n).to(CDT)[None, :]
    else:
        Bk = tl.load(B_ptr + state_offs, mask=m, other=0.0).to(CDT)
    if C_VARY:
        Ck = tl.load(C_ptr + (b * groups + g) * DSTATE + offs_n).to(CDT)[None, :]
    else:
        Ck = tl.load(C_ptr + state_offs, mask=m, other=0.0).to(CDT)
    abar, bcoef = _coefficients(dt, A, MODE)
    h = abar * h + (bcoef * x) * Bk
    y = tl.sum(Ck * h, axis=1, keep_dims=True)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=dmask, other=0.0).to(CDT)[:, None] * x
    if HAS_Z:
        zz = tl.load(z_ptr + b * dim + offs_d, mask=dmask, other=0.0).to(CDT)[:, None]
        y = y * zz * _sigmoid(zz)
    tl.store(y_ptr + b * dim + offs_d[:, None], y.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(new_state_ptr + srow, h.to(new_state_ptr.dtype.element_ty), mask=m)
