// The selective scan in CUDA C: forward, backward by recomputation, chunk combine.
//
// Thread layout (docs/backends/cupy.md says why): a block holds CH_BLOCK = 32 channels
// (b, d) of one batch row; each channel is S_LANES = 4 threads, lane l owning the NPT
// states n = l*NPT .. l*NPT+NPT-1 in registers. Time runs sequentially inside a thread,
// over tiles of TT steps staged in shared memory: u, delta (and z, dout) are read
// coalesced along time, B and C once per block for all its channels (their group).
// A sequence can also be cut into chunks (gridDim.z): a first pass scans each chunk
// from a zero state and keeps its end state and the product of its Abar, a tiny kernel
// chains the chunks, and a second pass rescans each chunk from its true start. That
// fills the GPU when batch * dim alone cannot (batch 1, long sequences).
//
// Memory traffic of the forward: each of u, delta, z read once, out written once, B and
// C read once per block of 32 channels; nothing else. The backward writes the state
// every CKPT_T steps (1/16 of all states) in a forward pass, then walks the tiles
// backwards, recomputing each tile's states from its checkpoint.
//
// Types: T stores u, delta, z, out and the selective B, C (float, double, f16_t,
// bf16_t); W computes (float, or double for double) and stores A, D, delta_bias, the
// time-invariant B, C and every state.
#include "common.cuh"


#define S_LANES 4                      // threads per channel
#define CH_BLOCK 32                    // channels per block
#define THREADS (S_LANES * CH_BLOCK)   // 128
#define FWD_TT 32                      // time steps per shared-memory tile, forward
#define BWD_TT 16                      // time steps per tile, backward (registers hold a tile of states)
#define CKPT_T 16                      // checkpoint stride; chunk lengths are multiples of FWD_TT
// blocks per multiprocessor the register allocation must allow (occupancy: the scan is
// latency-bound, each thread's steps are a dependent chain)
// (overridable with -D, for the benchmark's variants)
#ifndef FWD_MIN_BLOCKS
#define FWD_MIN_BLOCKS 4
#endif
#ifndef BWD_MIN_BLOCKS
#define BWD_MIN_BLOCKS 3
#endif
#ifndef FWD_PREFETCH  // 1: fetch the next tile into registers while this one is scanned
#define FWD_PREFETCH 1
#endif
#ifndef FWD_UNROLL  // time steps unrolled in the forward's scan loop
#define FWD_UNROLL 4
#endif

template <bool V> struct Flag { static constexpr bool value = V; };

// ---- staging through shared memory ----------------------------------------------
// Per-channel rows (u, delta, z, dout): element k of thread tid is channel
// (tid + k*THREADS) / TT, step (tid + k*THREADS) % TT: a warp reads 32 consecutive
// steps of one channel. Loads go to registers first, all of them in flight at once.
template <int TT, int R, typename T>
PA_DEV void fetch_rows(T (&r)[R], const T* __restrict__ M, int b, int d0, int dim, long long seqlen, long long t0, int nt) {
#pragma unroll
    for (int k = 0; k < R; ++k) {
        const int i = threadIdx.x + k * THREADS, cc = i / TT, tt = i % TT, dd = d0 + cc;
        r[k] = T{};
        if (dd < dim && tt < nt) r[k] = M[((size_t)b * dim + dd) * seqlen + t0 + tt];
    }
}

// Selective B or C of the block's groups: tile[(gi*TT + tt)*NP + n] = M[b, g_first+gi, n, t0+tt].
// fetch_bc/put_bc hold up to two groups in registers (the prefetched path); load_bc
// is the plain loop for blocks that span more groups.
template <int TT, int NP, int R, typename T>
PA_DEV void fetch_bc(T (&r)[R], const T* __restrict__ M, int gspan, int g_first, int groups, int b, int dstate,
                     long long seqlen, long long t0, int nt) {
#pragma unroll
    for (int k = 0; k < R; ++k) {
        const int i = threadIdx.x + k * THREADS;
        r[k] = T{};
        if (i < gspan * NP * TT) {
            const int gi = i / (NP * TT), rem = i % (NP * TT), n = rem / TT, tt = rem % TT, g = g_first + gi;
            if (g < groups && n < dstate && tt < nt) r[k] = M[(((size_t)b * groups + g) * dstate + n) * seqlen + t0 + tt];
        }
    }
}
template <int TT, int NP, int R, typename T, typename W>
PA_DEV void put_bc(const T (&r)[R], W* tile, int gspan) {
#pragma unroll
    for (int k = 0; k < R; ++k) {
        const int i = threadIdx.x + k * THREADS;
        if (i < gspan * NP * TT) {
            const int gi = i / (NP * TT), rem = i % (NP * TT), n = rem / TT, tt = rem % TT;
            tile[(gi * TT + tt) * NP + n] = widen(r[k]);
        }
    }
}
template <int TT, int NP, typename T, typename W>
PA_DEV void load_bc(W* tile, const T* __restrict__ M, int gspan, int g_first, int groups, int b, int dstate,
                    long long seqlen, long long t0, int nt) {
#pragma unroll 4
    for (int i = threadIdx.x; i < gspan * NP * TT; i += THREADS) {
        const int gi = i / (NP * TT), rem = i % (NP * TT), n = rem / TT, tt = rem % TT, g = g_first + gi;
        W v = W(0);
        if (g < groups && n < dstate && tt < nt) v = widen(M[(((size_t)b * groups + g) * dstate + n) * seqlen + t0 + tt]);
        tile[(gi * TT + tt) * NP + n] = v;
    }
}
// time-invariant B or C: tile[cc*NP + n] = M[d0+cc, n]
template <int NP, typename W>
PA_DEV void load_invariant(W* tile, const W* __restrict__ M, int d0, int dim, int dstate) {
    for (int i = threadIdx.x; i < CH_BLOCK * NP; i += THREADS) {
        const int cc = i / NP, n = i % NP, dd = d0 + cc;
        tile[i] = (dd < dim && n < dstate) ? M[(size_t)dd * dstate + n] : W(0);
    }
}

// a thread's NPT consecutive states of a B/C tile row, in 16-byte loads
template <int N> PA_DEV void load_vec(const float* p, float (&v)[N]) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int k = 0; k < N / 4; ++k) {
            const float4 q = reinterpret_cast<const float4*>(p)[k];
            v[4 * k] = q.x; v[4 * k + 1] = q.y; v[4 * k + 2] = q.z; v[4 * k + 3] = q.w;
        }
    } else {
#pragma unroll
        for (int k = 0; k < N; ++k) v[k] = p[k];
    }
}
template <int N> PA_DEV void load_vec(const double* p, double (&v)[N]) {
    if constexpr (N % 2 == 0) {
#pragma unroll
        for (int k = 0; k < N / 2; ++k) {
            const double2 q = reinterpret_cast<const double2*>(p)[k];
            v[2 * k] = q.x; v[2 * k + 1] = q.y;
        }
    } else {
#pragma unroll
        for (int k = 0; k < N; ++k) v[k] = p[k];
    }
}

// ---------------------------------------------------------------------------------
// Forward. Modes by the pointers given:
//   out != null: write out; hend: the state at the chunk's end; pend: the product of
//   Abar over the chunk (the chunk pass); ckpt: every CKPT_T-th state; h0: the state
//   at each chunk's start (null: zero).
// Shapes: u, delta, z, out (batch, dim, seqlen); Bsel, Csel (batch, groups, dstate,
// seqlen) or null with Binv, Cinv (dim, dstate); h0 (batch, dim, h0_chunks, dstate);
// hend, pend (batch, dim, gridDim.z, dstate); ckpt (batch, dim, nck, dstate).
// Grid (ceil(dim / CH_BLOCK), batch, chunks), THREADS threads.
// Pipeline per tile: stage the registers fetched during the previous tile into shared
// memory, start fetching the next tile (and this tile's z), scan the tile, write out.
// ---------------------------------------------------------------------------------
template <typename T, typename W, int NPT, int DISC>
__global__ void __launch_bounds__(THREADS, FWD_MIN_BLOCKS) scan_fwd_kernel(
    const T* __restrict__ u, const T* __restrict__ delta, const T* __restrict__ z, T* __restrict__ out,
    const W* __restrict__ A, const T* __restrict__ Bsel, const W* __restrict__ Binv, const T* __restrict__ Csel,
    const W* __restrict__ Cinv, const W* __restrict__ D, const W* __restrict__ delta_bias, int softplus_flag,
    const W* __restrict__ h0, int h0_chunks, W* __restrict__ hend, W* __restrict__ pend, W* __restrict__ ckpt,
    int nck, int dim, int dstate, long long seqlen, int groups, int gspan, long long chunk_len) {
    constexpr int NP = NPT * S_LANES;
    constexpr int TT = FWD_TT;
    constexpr int RS = TT + 1;  // row stride of the per-channel tiles: the pad avoids bank conflicts
    constexpr int EPT = CH_BLOCK * TT / THREADS;
    constexpr int BCR = (2 * NP * TT + THREADS - 1) / THREADS;
    PA_SHARED(smem);
    const bool want_out = out != nullptr;
    W* s_u = reinterpret_cast<W*>(smem);
    W* s_dt = s_u + CH_BLOCK * RS;
    W* s_y = s_dt + CH_BLOCK * RS;  // [lane][channel][t]: each lane's part of y, summed when written out
    W* s_B = s_y + S_LANES * CH_BLOCK * RS;
    W* s_C = s_B + (Bsel ? gspan * TT * NP : CH_BLOCK * NP);

    const int tid = threadIdx.x, c = tid / S_LANES, lane = tid % S_LANES;
    const int d0 = blockIdx.x * CH_BLOCK, d = d0 + c;
    const bool dvalid = d < dim;
    const int b = blockIdx.y, k = blockIdx.z, K = gridDim.z;
    const long long t_begin = (long long)k * chunk_len;
    const long long t_end = t_begin + chunk_len < seqlen ? t_begin + chunk_len : seqlen;
    const int cpg = dim / groups, g_first = d0 / cpg, gi = (dvalid ? d / cpg : g_first) - g_first;
    const bool bc_regs = gspan <= 2;
    const size_t chan = (size_t)b * dim + (dvalid ? d : 0);
    // where this thread's states sit in the B and C tiles, and their stride in time
    const int b_off = (Bsel ? gi * TT * NP : c * NP) + lane * NPT, b_ts = Bsel ? NP : 0;
    const int c_off = (Csel ? gi * TT * NP : c * NP) + lane * NPT, c_ts = Csel ? NP : 0;

    W a_[NPT], a2_[NPT], h[NPT], prod[NPT];
#pragma unroll
    for (int j = 0; j < NPT; ++j) {
        const int n = lane * NPT + j;
        const bool nv = dvalid && n < dstate;
        a_[j] = nv ? A[(size_t)d * dstate + n] : W(0);
        a2_[j] = a_[j] * W(1.4426950408889634);
        h[j] = (nv && h0) ? h0[(chan * h0_chunks + (h0_chunks == 1 ? 0 : k)) * dstate + n] : W(0);
        prod[j] = W(1);
    }
    if (!Bsel) load_invariant<NP>(s_B, Binv, d0, dim, dstate);
    if (!Csel && want_out) load_invariant<NP>(s_C, Cinv, d0, dim, dstate);

    T ru[EPT], rd[EPT], rz[EPT], rb[BCR], rc[BCR];
    if (t_begin < t_end) {
        const int nt = (int)(t_end - t_begin < TT ? t_end - t_begin : TT);
        fetch_rows<TT>(ru, u, b, d0, dim, seqlen, t_begin, nt);
        fetch_rows<TT>(rd, delta, b, d0, dim, seqlen, t_begin, nt);
        if (Bsel && bc_regs) fetch_bc<TT, NP>(rb, Bsel, gspan, g_first, groups, b, dstate, seqlen, t_begin, nt);
        if (Csel && bc_regs && want_out) fetch_bc<TT, NP>(rc, Csel, gspan, g_first, groups, b, dstate, seqlen, t_begin, nt);
    }

    for (long long t0 = t_begin; t0 < t_end; t0 += TT) {
        const int nt = (int)(t_end - t0 < TT ? t_end - t0 : TT);
        if (!FWD_PREFETCH && t0 != t_begin) {
            fetch_rows<TT>(ru, u, b, d0, dim, seqlen, t0, nt);
            fetch_rows<TT>(rd, delta, b, d0, dim, seqlen, t0, nt);
            if (Bsel && bc_regs) fetch_bc<TT, NP>(rb, Bsel, gspan, g_first, groups, b, dstate, seqlen, t0, nt);
            if (Csel && bc_regs && want_out) fetch_bc<TT, NP>(rc, Csel, gspan, g_first, groups, b, dstate, seqlen, t0, nt);
        }
        __syncthreads();  // the previous tile's readers are done
#pragma unroll
        for (int r = 0; r < EPT; ++r) {
            const int i = tid + r * THREADS, cc = i / TT, tt = i % TT, dd = d0 + cc;
            W v = widen(rd[r]);
            if (dd < dim && tt < nt) {
                if (delta_bias) v += delta_bias[dd];
                if (softplus_flag) v = softplus(v);
            }
            s_u[cc * RS + tt] = widen(ru[r]);
            s_dt[cc * RS + tt] = v;
        }
        if (Bsel) {
            if (bc_regs) put_bc<TT, NP>(rb, s_B, gspan);
            else load_bc<TT, NP>(s_B, Bsel, gspan, g_first, groups, b, dstate, seqlen, t0, nt);
        }
        if (Csel && want_out) {
            if (bc_regs) put_bc<TT, NP>(rc, s_C, gspan);
            else load_bc<TT, NP>(s_C, Csel, gspan, g_first, groups, b, dstate, seqlen, t0, nt);
        }
        __syncthreads();
        {  // start the next tile's loads and this tile's z; they land while the tile is scanned
            const long long tn = t0 + TT;
            if (FWD_PREFETCH && tn < t_end) {
                const int ntn = (int)(t_end - tn < TT ? t_end - tn : TT);
                fetch_rows<TT>(ru, u, b, d0, dim, seqlen, tn, ntn);
                fetch_rows<TT>(rd, delta, b, d0, dim, seqlen, tn, ntn);
                if (Bsel && bc_regs) fetch_bc<TT, NP>(rb, Bsel, gspan, g_first, groups, b, dstate, seqlen, tn, ntn);
                if (Csel && bc_regs && want_out) fetch_bc<TT, NP>(rc, Csel, gspan, g_first, groups, b, dstate, seqlen, tn, ntn);
            }
            if (want_out && z) fetch_rows<TT>(rz, z, b, d0, dim, seqlen, t0, nt);
        }

        auto scan_tile = [&](auto with_out, auto with_prod) {
            constexpr bool WO = decltype(with_out)::value, WP = decltype(with_prod)::value;
#pragma unroll FWD_UNROLL
            for (int tt = 0; tt < nt; ++tt) {
                if (ckpt && dvalid && tt % CKPT_T == 0) {
#pragma unroll
                    for (int j = 0; j < NPT; ++j) {
                        const int n = lane * NPT + j;
                        if (n < dstate) ckpt[(chan * nck + (t0 + tt) / CKPT_T) * dstate + n] = h[j];
                    }
                }
                const W dt = s_dt[c * RS + tt], uu = s_u[c * RS + tt];
                W bv[NPT], cv[NPT];
                load_vec<NPT>(s_B + b_off + tt * b_ts, bv);
                if (WO) load_vec<NPT>(s_C + c_off + tt * c_ts, cv);
                W y = W(0);
#pragma unroll
                for (int j = 0; j < NPT; ++j) {
                    W abar, bcoef;
                    discretize<DISC>(dt, a_[j], a2_[j], abar, bcoef);
                    h[j] = abar * h[j] + (bcoef * uu) * bv[j];
                    if (WP) prod[j] *= abar;
                    if (WO) y += cv[j] * h[j];
                }
                if (WO) s_y[(lane * CH_BLOCK + c) * RS + tt] = y;  // no shuffles in the step's chain
            }
        };
        if (want_out) scan_tile(Flag<true>{}, Flag<false>{});
        else if (pend) scan_tile(Flag<false>{}, Flag<true>{});
        else scan_tile(Flag<false>{}, Flag<false>{});

        if (want_out) {
            __syncthreads();
#pragma unroll
            for (int r = 0; r < EPT; ++r) {
                const int i = tid + r * THREADS, cc = i / TT, tt = i % TT, dd = d0 + cc;
                if (dd < dim && tt < nt) {
                    W y = W(0);
#pragma unroll
                    for (int l = 0; l < S_LANES; ++l) y += s_y[(l * CH_BLOCK + cc) * RS + tt];
                    if (D) y += D[dd] * s_u[cc * RS + tt];
                    if (z) y *= silu(widen(rz[r]));
                    out[((size_t)b * dim + dd) * seqlen + t0 + tt] = narrow<T>(y);
                }
            }
        }
    }
    if (dvalid) {
#pragma unroll
        for (int j = 0; j < NPT; ++j) {
            const int n = lane * NPT + j;
            if (n < dstate) {
                const size_t o = (chan * K + k) * dstate + n;
                if (hend) hend[o] = h[j];
                if (pend) pend[o] = prod[j];
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Chain the chunks of a sequence, one thread per (row, state): forwards
// (reverse = 0) start[k] = x, x = P[k]*x + loc[k], from x = init; backwards
// (reverse = 1) the same from the last chunk down, for the adjoint. final = x at the end.
// init, final (rows, dstate); P, loc, start (rows, K, dstate).
// ---------------------------------------------------------------------------------
template <typename W>
__global__ void chunk_combine_kernel(const W* __restrict__ init, const W* __restrict__ P, const W* __restrict__ loc,
                                     W* __restrict__ start, W* __restrict__ final_, long long rows, int K, int dstate,
                                     int reverse) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * dstate) return;
    const long long r = i / dstate;
    const int n = (int)(i % dstate);
    W x = init ? init[i] : W(0);
    for (int kk = 0; kk < K; ++kk) {
        const int k = reverse ? K - 1 - kk : kk;
        const size_t o = ((size_t)r * K + k) * dstate + n;
        start[o] = x;
        x = P[o] * x + loc[o];
    }
    if (final_) final_[i] = x;
}

// ---------------------------------------------------------------------------------
// Backward, tiles of BWD_TT steps from the chunk's end to its start. Per tile and per
// state, the states of the tile are recomputed from the checkpoint into registers, then
// the adjoint g walks back through them. Modes by the pointers given:
//   du == null: the chunk pass, g from g0 (or zero) through the chunk into gout only;
//   else every gradient. g0 (batch, dim, g0_chunks, dstate): the adjoint at each
//   chunk's end (dlast_state, or the combine's result); gout (batch, dim, K, dstate).
// Reductions stay deterministic: per-block partial sums, added up in a fixed order
// by the host (dB_part, dC_part (blocks*gspan, batch, dstate, seqlen); dA_part,
// dBinv_part, dCinv_part (batch, dim, K, dstate); dD_part, dbias_part (batch, dim, K)).
// ---------------------------------------------------------------------------------
template <typename T, typename W, int NPT, int DISC>
__global__ void __launch_bounds__(THREADS, BWD_MIN_BLOCKS) scan_bwd_kernel(
    const T* __restrict__ dout, const T* __restrict__ u, const T* __restrict__ delta, const T* __restrict__ z,
    const W* __restrict__ A, const T* __restrict__ Bsel, const W* __restrict__ Binv, const T* __restrict__ Csel,
    const W* __restrict__ Cinv, const W* __restrict__ D, const W* __restrict__ delta_bias, int softplus_flag,
    const W* __restrict__ ckpt, int nck, const W* __restrict__ g0, int g0_chunks, W* __restrict__ gout,
    T* __restrict__ du, T* __restrict__ ddelta, T* __restrict__ dz, W* __restrict__ dA_part,
    W* __restrict__ dBinv_part, W* __restrict__ dCinv_part, W* __restrict__ dB_part, W* __restrict__ dC_part,
    W* __restrict__ dD_part, W* __restrict__ dbias_part, int dim, int dstate, long long seqlen, int groups, int gspan,
    long long chunk_len) {
    constexpr int NP = NPT * S_LANES;
    constexpr int TT = BWD_TT;
    constexpr int RS = TT + 1;
    constexpr int EPT = CH_BLOCK * TT / THREADS;
    PA_SHARED(smem);
    W* s_u = reinterpret_cast<W*>(smem);
    W* s_dt = s_u + CH_BLOCK * RS;
    W* s_dsp = s_dt + CH_BLOCK * RS;  // softplus' at delta + bias (1 without softplus)
    W* s_dy = s_dsp + CH_BLOCK * RS;  // dout * silu(z)
    W* s_du = s_dy + CH_BLOCK * RS;
    W* s_ddt = s_du + CH_BLOCK * RS;
    W* s_y = s_ddt + CH_BLOCK * RS;
    W* s_red = s_y + CH_BLOCK * RS;  // [B or C][channel][lane][t]: one state's dB, dC terms
    W* s_B = s_red + 2 * CH_BLOCK * S_LANES * TT;
    W* s_C = s_B + (Bsel ? gspan * TT * NP : CH_BLOCK * NP);
    W* s_hck = s_C + (Csel ? gspan * TT * NP : CH_BLOCK * NP);  // [thread][NPT]: the tile's checkpoint

    const int tid = threadIdx.x, c = tid / S_LANES, lane = tid % S_LANES;
    const int d0 = blockIdx.x * CH_BLOCK, d = d0 + c;
    const bool dvalid = d < dim;
    const int b = blockIdx.y, k = blockIdx.z, K = gridDim.z, batch = gridDim.y;
    const long long t_begin = (long long)k * chunk_len;
    const long long t_end = t_begin + chunk_len < seqlen ? t_begin + chunk_len : seqlen;
    const int cpg = dim / groups, g_first = d0 / cpg, gi = (dvalid ? d / cpg : g_first) - g_first;
    const bool full = du != nullptr;
    const size_t chan = (size_t)b * dim + (dvalid ? d : 0);
    const int b_off = (Bsel ? gi * TT * NP : c * NP) + lane * NPT, b_ts = Bsel ? NP : 0;
    const int c_off = (Csel ? gi * TT * NP : c * NP) + lane * NPT, c_ts = Csel ? NP : 0;

    W a_[NPT], a2_[NPT], g[NPT], dA_acc[NPT], dBi_acc[NPT], dCi_acc[NPT];
#pragma unroll
    for (int j = 0; j < NPT; ++j) {
        const int n = lane * NPT + j;
        const bool nv = dvalid && n < dstate;
        a_[j] = nv ? A[(size_t)d * dstate + n] : W(0);
        a2_[j] = a_[j] * W(1.4426950408889634);
        g[j] = (nv && g0) ? g0[(chan * g0_chunks + (g0_chunks == 1 ? 0 : k)) * dstate + n] : W(0);
        dA_acc[j] = dBi_acc[j] = dCi_acc[j] = W(0);
    }
    if (!Bsel && full) load_invariant<NP>(s_B, Binv, d0, dim, dstate);
    if (!Csel) load_invariant<NP>(s_C, Cinv, d0, dim, dstate);
    W dD_acc = W(0), dbias_acc = W(0);

    const int ntiles = (int)((t_end - t_begin + TT - 1) / TT);
    for (int it = ntiles - 1; it >= 0; --it) {
        const long long t0 = t_begin + (long long)it * TT;
        const int nt = (int)(t_end - t0 < TT ? t_end - t0 : TT);
        T ru[EPT], rd[EPT], ro[EPT], rz[EPT];
        fetch_rows<TT>(ru, u, b, d0, dim, seqlen, t0, nt);
        fetch_rows<TT>(rd, delta, b, d0, dim, seqlen, t0, nt);
        fetch_rows<TT>(ro, dout, b, d0, dim, seqlen, t0, nt);
        if (z) fetch_rows<TT>(rz, z, b, d0, dim, seqlen, t0, nt);
        W hck_r[NPT];  // this thread's checkpoint, in flight with the rows
        if (full) {
#pragma unroll
            for (int j = 0; j < NPT; ++j) {
                const int n = lane * NPT + j;
                hck_r[j] = (dvalid && n < dstate) ? ckpt[(chan * nck + t0 / CKPT_T) * dstate + n] : W(0);
            }
        }
        __syncthreads();
        if (full) {
#pragma unroll
            for (int j = 0; j < NPT; ++j) s_hck[tid * NPT + j] = hck_r[j];
        }
#pragma unroll
        for (int r = 0; r < EPT; ++r) {
            const int i = tid + r * THREADS, cc = i / TT, tt = i % TT, dd = d0 + cc;
            W dt = W(0), dsp = W(1), dy = W(0);
            if (dd < dim && tt < nt) {
                W v = widen(rd[r]);
                if (delta_bias) v += delta_bias[dd];
                dt = v;
                if (softplus_flag) {
                    dt = softplus(v);
                    dsp = softplus_grad(v);
                }
                dy = widen(ro[r]);
                if (z) dy *= silu(widen(rz[r]));
            }
            s_u[cc * RS + tt] = widen(ru[r]);
            s_dt[cc * RS + tt] = dt;
            s_dsp[cc * RS + tt] = dsp;
            s_dy[cc * RS + tt] = dy;
        }
        if (Bsel && full) load_bc<TT, NP>(s_B, Bsel, gspan, g_first, groups, b, dstate, seqlen, t0, nt);
        if (Csel) load_bc<TT, NP>(s_C, Csel, gspan, g_first, groups, b, dstate, seqlen, t0, nt);
        __syncthreads();

        if (!full) {  // the chunk pass: only the adjoint's path through the chunk
            for (int tt = nt - 1; tt >= 0; --tt) {
                const W dt = s_dt[c * RS + tt], dy = s_dy[c * RS + tt];
                W cv[NPT];
                load_vec<NPT>(s_C + c_off + tt * c_ts, cv);
#pragma unroll
                for (int j = 0; j < NPT; ++j) {
                    W abar, bcoef;
                    discretize<DISC>(dt, a_[j], a2_[j], abar, bcoef);
                    g[j] = abar * (g[j] + cv[j] * dy);
                }
            }
            continue;
        }

        W acc_du[TT], acc_ddt[TT], acc_y[TT];
#pragma unroll
        for (int tt = 0; tt < TT; ++tt) acc_du[tt] = acc_ddt[tt] = acc_y[tt] = W(0);

        // one state at a time (a run-time loop: unrolling it too multiplies the code by
        // NPT for little gain), its TT states of the tile in registers
#pragma unroll 1
        for (int j = 0; j < NPT; ++j) {
            const W hck = s_hck[tid * NPT + j];
            const W Aj = a_[j], A2j = a2_[j];
            W hs[TT], as[TT], bc[TT];
            W hcur = hck;
#pragma unroll
            for (int tt = 0; tt < TT; ++tt) {
                if (tt < nt) {
                    const W dt = s_dt[c * RS + tt], uu = s_u[c * RS + tt];
                    discretize<DISC>(dt, Aj, A2j, as[tt], bc[tt]);
                    hcur = as[tt] * hcur + bc[tt] * s_B[b_off + tt * b_ts + j] * uu;
                    hs[tt] = hcur;
                    acc_y[tt] += s_C[c_off + tt * c_ts + j] * hcur;
                }
            }
            W gj = g[j], dAj = W(0), dBi = W(0), dCi = W(0);
#pragma unroll
            for (int tt = TT - 1; tt >= 0; --tt) {
                if (tt < nt) {
                    const W dt = s_dt[c * RS + tt], uu = s_u[c * RS + tt], dy = s_dy[c * RS + tt];
                    const W bv = s_B[b_off + tt * b_ts + j];
                    gj += s_C[c_off + tt * c_ts + j] * dy;
                    const W hp = tt > 0 ? hs[tt > 0 ? tt - 1 : 0] : hck;
                    W da_ddt, da_dA, db_ddt, db_dA;
                    discretize_grads<DISC>(dt, Aj, as[tt], da_ddt, da_dA, db_ddt, db_dA);
                    const W dab = gj * hp, dbc = gj * bv * uu;
                    acc_ddt[tt] += dab * da_ddt + dbc * db_ddt;
                    dAj += dab * da_dA + dbc * db_dA;
                    acc_du[tt] += gj * bc[tt] * bv;
                    const W dBv = gj * bc[tt] * uu, dCv = dy * hs[tt];
                    s_red[(c * S_LANES + lane) * TT + tt] = dBv;
                    s_red[((CH_BLOCK + c) * S_LANES + lane) * TT + tt] = dCv;
                    dBi += dBv;
                    dCi += dCv;
                    gj *= as[tt];
                }
            }
            g[j] = gj;
            dA_acc[j] += dAj;
            dBi_acc[j] += dBi;
            dCi_acc[j] += dCi;
            if (Bsel || Csel) {  // sum the channels of each group, in a fixed order
                const int per = gspan * S_LANES * TT;
                const int nB = Bsel ? per : 0, total = nB + (Csel ? per : 0);
                __syncthreads();
                for (int i = tid; i < total; i += THREADS) {
                    const bool isB = i < nB;
                    const int ii = isB ? i : i - nB;
                    const int gg = ii / (S_LANES * TT), rem = ii % (S_LANES * TT), ln = rem / TT, tt = rem % TT;
                    const int nn = ln * NPT + j;
                    if (nn < dstate && tt < nt) {
                        const W* src = s_red + (isB ? 0 : CH_BLOCK * S_LANES * TT) + ln * TT + tt;
                        W sum = W(0);
                        if (gspan == 1) {  // the usual case: every channel of the block in one group
                            const int cmax = dim - d0 < CH_BLOCK ? dim - d0 : CH_BLOCK;
#pragma unroll 8
                            for (int cc = 0; cc < cmax; ++cc) sum += src[cc * S_LANES * TT];
                        } else {
                            for (int cc = 0; cc < CH_BLOCK; ++cc) {
                                const int dd = d0 + cc;
                                if (dd < dim && dd / cpg - g_first == gg) sum += src[cc * S_LANES * TT];
                            }
                        }
                        const size_t o = ((((size_t)blockIdx.x * gspan + gg) * batch + b) * dstate + nn) * seqlen + t0 + tt;
                        (isB ? dB_part : dC_part)[o] = sum;
                    }
                }
                __syncthreads();
            }
        }

#pragma unroll
        for (int tt = 0; tt < TT; ++tt) {
            if (tt < nt) {
                const W du_t = lane_sum<S_LANES>(acc_du[tt]);
                const W ddt_t = lane_sum<S_LANES>(acc_ddt[tt]);
                const W y_t = lane_sum<S_LANES>(acc_y[tt]);
                if (lane == 0) {
                    s_du[c * RS + tt] = du_t;
                    s_ddt[c * RS + tt] = ddt_t;
                    s_y[c * RS + tt] = y_t;
                    dD_acc += s_dy[c * RS + tt] * s_u[c * RS + tt];
                    dbias_acc += ddt_t * s_dsp[c * RS + tt];
                }
            }
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < EPT; ++r) {
            const int i = tid + r * THREADS, cc = i / TT, tt = i % TT, dd = d0 + cc;
            if (dd < dim && tt < nt) {
                const size_t gidx = ((size_t)b * dim + dd) * seqlen + t0 + tt;
                const W dy = s_dy[cc * RS + tt], uu = s_u[cc * RS + tt];
                du[gidx] = narrow<T>(s_du[cc * RS + tt] + (D ? D[dd] * dy : W(0)));
                ddelta[gidx] = narrow<T>(s_ddt[cc * RS + tt] * s_dsp[cc * RS + tt]);
                if (dz) {
                    const W y = s_y[cc * RS + tt] + (D ? D[dd] * uu : W(0));
                    const W zz = widen(rz[r]), go = widen(ro[r]);
                    const W sig = W(1) / (W(1) + fexp(-zz));
                    dz[gidx] = narrow<T>(go * y * sig * (W(1) + zz * (W(1) - sig)));
                }
            }
        }
    }
    if (dvalid) {
#pragma unroll
        for (int j = 0; j < NPT; ++j) {
            const int n = lane * NPT + j;
            if (n < dstate) {
                const size_t o = (chan * K + k) * dstate + n;
                gout[o] = g[j];
                if (full) {
                    dA_part[o] = dA_acc[j];
                    if (dBinv_part) dBinv_part[o] = dBi_acc[j];
                    if (dCinv_part) dCinv_part[o] = dCi_acc[j];
                }
            }
        }
        if (full && lane == 0) {
            if (dD_part) dD_part[chan * K + k] = dD_acc;
            if (dbias_part) dbias_part[chan * K + k] = dbias_acc;
        }
    }
}

// =================================================================================
// One state per lane (the default layout for dstate <= 32, with the forward of two
// states per lane below for dstate <= 16; docs/backends/cupy.md).
//
// A channel (b, d) is NL lanes of a warp (NL = 16 or 32, a power of two >= dstate),
// lane n owning state n; a warp holds 32 / NL channels. Time runs over tiles of TT = NL
// steps:
//   * lane i stages step i of the tile: u_i, delta_i (z_i) loaded coalesced (one tile
//     ahead, LS_PREFETCH), dt_i = softplus(delta_i + bias) once, and (dt_i, dt_i*u_i)
//     written to the warp's slice of shared memory; every lane then reads each step's
//     pair as a broadcast;
//   * the block stages the B and C tiles of its first channel's group in shared memory
//     (LS_BC_SMEM), and lane n reads its rows B[b, g, n, t0 .. t0+TT) and C[b, g, n, ...]
//     there with 16-byte loads; lanes of another group (groups smaller than a block),
//     or every lane with LS_BC_SMEM=0, read them from L1/L2;
//   * the step k: Abar = 2^(dt_k * A_n*log2 e), h = Abar*h + B_k*(dt_k*u_k), p_k = C_k*h,
//     with nothing but the FMA on h's dependency chain;
//   * after the tile, a transposed butterfly sums p over the NL lanes: at offset o each
//     lane keeps half of its remaining partials and receives its partner's half of the
//     others (NL - 1 shuffles per tile), so lane i ends with y of step i and writes it.
// Steps past the end of the sequence are staged as dt = 0, dt*u = 0: Abar = 1 and the
// state does not move, for every discretisation.
// =================================================================================
#ifndef LS_WARPS  // warps per block
#define LS_WARPS 8
#endif
#ifndef LS_MIN_BLOCKS  // blocks per multiprocessor the register allocation must allow (NL = 16, float)
#define LS_MIN_BLOCKS 4
#endif
#ifndef LS_PREFETCH  // 1: each lane loads its step of the next tile (u, delta, z) while this one is scanned
#define LS_PREFETCH 1
#endif
// fewer for 32 lanes (twice the partials per lane) and for double (two registers a value)
#define LS_BLOCKS(NL, W) (LS_MIN_BLOCKS * 16 / (NL) / (int)(sizeof(W) / 4) > 0 ? LS_MIN_BLOCKS * 16 / (NL) / (int)(sizeof(W) / 4) : 1)
#ifndef LS_BC_SMEM  // 1: a block stages the B and C tiles of its first channel's group in shared memory
#define LS_BC_SMEM 1  // once for all its warps (double-buffered, the next tile in flight in registers)
#endif

// the elements of one 16-byte word, widened (the tag argument picks the storage type)
PA_DEV void unpack16(uint4 q, float* v, const float*) {
    v[0] = __uint_as_float(q.x); v[1] = __uint_as_float(q.y); v[2] = __uint_as_float(q.z); v[3] = __uint_as_float(q.w);
}
PA_DEV void unpack16(uint4 q, double* v, const double*) {
    v[0] = __hiloint2double((int)q.y, (int)q.x);
    v[1] = __hiloint2double((int)q.w, (int)q.z);
}
PA_DEV void unpack16(uint4 q, float* v, const bf16_t*) {
    const unsigned int w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
PA_DEV void unpack16(uint4 q, float* v, const f16_t*) {
    const unsigned int w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = widen(f16_t{(unsigned short)(w[i] & 0xffffu)});
        v[2 * i + 1] = widen(f16_t{(unsigned short)(w[i] >> 16)});
    }
}

// TT consecutive values of one row (p at a tile's start), nv of them valid, the rest 0;
// 16-byte loads when vec (the caller checked the alignment) and the tile is whole.
template <int TT, typename T, typename W>
PA_DEV void load_row(W (&v)[TT], const T* __restrict__ p, int nv, bool vec) {
    constexpr int PER = 16 / sizeof(T);
    if (vec && nv == TT && TT % PER == 0) {
        uint4 q[TT / PER > 0 ? TT / PER : 1];
#pragma unroll
        for (int j = 0; j < TT / PER; ++j) q[j] = __ldg(reinterpret_cast<const uint4*>(p) + j);
#pragma unroll
        for (int j = 0; j < TT / PER; ++j) unpack16(q[j], v + j * PER, p);
    } else {
#pragma unroll
        for (int j = 0; j < TT; ++j) v[j] = j < nv ? widen(p[j]) : W(0);
    }
}

// a row of TT values from shared memory (16-byte reads; p 16-byte aligned)
template <int TT> PA_DEV void read_row(float (&v)[TT], const float* p) {
#pragma unroll
    for (int j = 0; j < TT / 4; ++j) {
        const float4 q = reinterpret_cast<const float4*>(p)[j];
        v[4 * j] = q.x; v[4 * j + 1] = q.y; v[4 * j + 2] = q.z; v[4 * j + 3] = q.w;
    }
}
template <int TT> PA_DEV void read_row(double (&v)[TT], const double* p) {
#pragma unroll
    for (int j = 0; j < TT / 2; ++j) {
        const double2 q = reinterpret_cast<const double2*>(p)[j];
        v[2 * j] = q.x; v[2 * j + 1] = q.y;
    }
}
// element r of this thread's share of an (NL states x TT steps) tile of M (the block's
// group's rows, from step t0; nt valid steps), 0 outside
template <int NL, int TT, int R, int NTHREADS, typename T>
PA_DEV void fetch_tile(T (&r)[R], const T* __restrict__ M, int dstate, long long seqlen, long long t0, int nt) {
#pragma unroll
    for (int k = 0; k < R; ++k) {
        const int e = threadIdx.x + k * NTHREADS, nn = e / TT, tt = e % TT;
        r[k] = T{};
        if (e < NL * TT && nn < dstate && tt < nt) r[k] = M[(size_t)nn * seqlen + t0 + tt];
    }
}

// Transposed butterfly: p[k] is this lane's part of step k's sum; returns the sum over
// the NL lanes of step `lane` (lane in [0, NL)). Fixed order: bit-identical on repeats.
template <int O, int NL, typename W>
PA_DEV void butterfly_stage(W (&p)[NL], int lane) {
    const bool hi = (lane & O) != 0;
#pragma unroll
    for (int j = 0; j < O; ++j) {
        const W send = hi ? p[j] : p[j + O];
        const W keep = hi ? p[j + O] : p[j];
        p[j] = keep + __shfl_xor_sync(0xffffffffu, send, O, NL);
    }
    if constexpr (O > 1) butterfly_stage<O / 2, NL>(p, lane);
}
template <int NL, typename W>
PA_DEV W transpose_sum(W (&p)[NL], int lane) {
    butterfly_stage<NL / 2, NL>(p, lane);
    return p[0];
}

// the pair (dt_k, x_k) of step k from the warp's staging slice (16-byte reads of two
// steps for float)
PA_DEV void staged_pair(const float* s, int k, float& a, float& x) {
    const float4 q = reinterpret_cast<const float4*>(s)[k / 2];
    a = (k % 2) ? q.z : q.x;
    x = (k % 2) ? q.w : q.y;
}
PA_DEV void staged_pair(const double* s, int k, double& a, double& x) {
    const double2 q = reinterpret_cast<const double2*>(s)[k];
    a = q.x;
    x = q.y;
}
// the backward's staged step k: (dt_k, u_k, dy_k, dt_k*u_k), one 16-byte read for float
PA_DEV void staged4(const float* s, int k, float& a, float& u, float& y, float& x) {
    const float4 q = reinterpret_cast<const float4*>(s)[k];
    a = q.x; u = q.y; y = q.z; x = q.w;
}
PA_DEV void staged4(const double* s, int k, double& a, double& u, double& y, double& x) {
    a = s[4 * k]; u = s[4 * k + 1]; y = s[4 * k + 2]; x = s[4 * k + 3];
}

// Forward, same arguments and modes as scan_fwd_kernel (out, hend, pend, ckpt, h0),
// vec_bc: the selective B and C rows allow 16-byte loads. Grid (ceil(dim / CPB),
// batch, chunks), LS_WARPS * 32 threads, CPB = LS_WARPS * 32 / NL channels per block.
template <typename T, typename W, int NL, int DISC>
__global__ void __launch_bounds__(LS_WARPS * 32, LS_BLOCKS(NL, W)) scan_fwd_lanes_kernel(
    const T* __restrict__ u, const T* __restrict__ delta, const T* __restrict__ z, T* __restrict__ out,
    const W* __restrict__ A, const T* __restrict__ Bsel, const W* __restrict__ Binv, const T* __restrict__ Csel,
    const W* __restrict__ Cinv, const W* __restrict__ D, const W* __restrict__ delta_bias, int softplus_flag,
    const W* __restrict__ h0, int h0_chunks, W* __restrict__ hend, W* __restrict__ pend, W* __restrict__ ckpt,
    int nck, int dim, int dstate, long long seqlen, int groups, int vec_bc, long long chunk_len) {
    constexpr int TT = NL, CPW = 32 / NL, CPB = CPW * LS_WARPS;
    __shared__ __align__(16) W s_x[LS_WARPS * CPW * TT * 2];  // per channel and step: (dt, dt*u or u)
#if LS_BC_SMEM
    constexpr int NTH = LS_WARPS * 32, RB = TT + 4;  // RB: row stride, 16-byte reads without bank conflicts
    constexpr int BCE = (NL * TT + NTH - 1) / NTH;    // tile elements per thread
    __shared__ __align__(16) W s_bc[2][2][NL * RB];   // [buffer][B or C][state][step]
#endif
    const int warp = threadIdx.x / 32, sub = (threadIdx.x % 32) / NL, n = threadIdx.x % NL;
    const int d = blockIdx.x * CPB + warp * CPW + sub;
    const bool dvalid = d < dim, nvalid = dvalid && n < dstate;
    const int b = blockIdx.y, k = blockIdx.z, K = gridDim.z;
    const long long t_begin = (long long)k * chunk_len;
    const long long t_end = t_begin + chunk_len < seqlen ? t_begin + chunk_len : seqlen;
    const int dd = dvalid ? d : 0, ns = n < dstate ? n : 0;
    const size_t chan = (size_t)b * dim + dd, row = chan * seqlen;
    const int g = dd / (dim / groups);
    const T* brow = Bsel ? Bsel + (((size_t)b * groups + g) * dstate + ns) * seqlen : nullptr;
    const T* crow = Csel ? Csel + (((size_t)b * groups + g) * dstate + ns) * seqlen : nullptr;
    const W An = nvalid ? A[(size_t)d * dstate + n] : W(0), A2 = An * W(1.4426950408889634);
    const W bias = (dvalid && delta_bias) ? delta_bias[d] : W(0), Dd = (dvalid && D) ? D[d] : W(0);
    const W binv = (nvalid && !Bsel) ? Binv[(size_t)d * dstate + n] : W(0);
    const W cinv = (nvalid && !Csel) ? Cinv[(size_t)d * dstate + n] : W(0);
    W h = (nvalid && h0) ? h0[(chan * h0_chunks + (h0_chunks == 1 ? 0 : k)) * dstate + n] : W(0);
    W prod = W(1);
    W* sx = s_x + (warp * CPW + sub) * TT * 2;
    const bool want_out = out != nullptr;
#if LS_BC_SMEM
    const int d_first = (int)blockIdx.x * CPB, g_blk = (d_first < dim ? d_first : dim - 1) / (dim / groups);
    const bool bc_shared = nvalid && g == g_blk;  // this lane reads the block's tiles
    const T* bblk = Bsel ? Bsel + ((size_t)b * groups + g_blk) * dstate * seqlen : nullptr;
    const T* cblk = Csel ? Csel + ((size_t)b * groups + g_blk) * dstate * seqlen : nullptr;
#endif

    auto body = [&](auto with_out, auto with_prod) {
        constexpr bool WO = decltype(with_out)::value, WP = decltype(with_prod)::value;
#if LS_BC_SMEM
        T rbn[BCE], rcn[BCE];  // the next tile's elements of B and C, in flight
        int buf = 0;
        if (t_begin < t_end) {
            const int nt0 = (int)(t_end - t_begin < TT ? t_end - t_begin : TT);
            if (Bsel) fetch_tile<NL, TT, BCE, NTH>(rbn, bblk, dstate, seqlen, t_begin, nt0);
            if (WO && Csel) fetch_tile<NL, TT, BCE, NTH>(rcn, cblk, dstate, seqlen, t_begin, nt0);
        }
#endif
#if LS_PREFETCH
        T nu = T{}, nd = T{}, nz = T{};  // this lane's step of the next tile, in flight
        if (dvalid && t_begin + n < t_end) {
            nu = u[row + t_begin + n];
            nd = delta[row + t_begin + n];
            if (WO && z) nz = z[row + t_begin + n];
        }
#endif
        for (long long t0 = t_begin; t0 < t_end; t0 += TT) {
            const int nt = (int)(t_end - t0 < TT ? t_end - t0 : TT);
            const bool tv = dvalid && n < nt;
#if LS_BC_SMEM
            {  // stage this tile's B, C (fetched during the previous tile), then fetch the next
#pragma unroll
                for (int r = 0; r < BCE; ++r) {
                    const int e = threadIdx.x + r * NTH;
                    if (e < NL * TT) {
                        if (Bsel) s_bc[buf][0][(e / TT) * RB + e % TT] = widen(rbn[r]);
                        if (WO && Csel) s_bc[buf][1][(e / TT) * RB + e % TT] = widen(rcn[r]);
                    }
                }
                __syncthreads();  // (double buffer: the readers of this buffer, two tiles ago, are done)
                const long long tn = t0 + TT;
                if (tn < t_end) {
                    const int ntn = (int)(t_end - tn < TT ? t_end - tn : TT);
                    if (Bsel) fetch_tile<NL, TT, BCE, NTH>(rbn, bblk, dstate, seqlen, tn, ntn);
                    if (WO && Csel) fetch_tile<NL, TT, BCE, NTH>(rcn, cblk, dstate, seqlen, tn, ntn);
                }
            }
#endif
            const long long t = t0 + n;
            W uu = W(0), dt = W(0), zz = W(0);
#if LS_PREFETCH
            if (tv) {
                uu = widen(nu);
                dt = widen(nd) + bias;
                if (WO && z) zz = widen(nz);
            }
            if (dvalid && t + TT < t_end) {
                nu = u[row + t + TT];
                nd = delta[row + t + TT];
                if (WO && z) nz = z[row + t + TT];
            }
#else
            if (tv) {
                uu = widen(u[row + t]);
                dt = widen(delta[row + t]) + bias;
                if (WO && z) zz = widen(z[row + t]);
            }
#endif
            W bv[TT], cv[TT];
#if LS_BC_SMEM
            if (Bsel && bc_shared) read_row<TT>(bv, &s_bc[buf][0][n * RB]);
            else
#endif
            if (Bsel) load_row<TT>(bv, brow + t0, nvalid ? nt : 0, vec_bc != 0);
            else {
#pragma unroll
                for (int j = 0; j < TT; ++j) bv[j] = binv;
            }
            if (WO) {
#if LS_BC_SMEM
                if (Csel && bc_shared) read_row<TT>(cv, &s_bc[buf][1][n * RB]);
                else
#endif
                if (Csel) load_row<TT>(cv, crow + t0, nvalid ? nt : 0, vec_bc != 0);
                else {
#pragma unroll
                    for (int j = 0; j < TT; ++j) cv[j] = cinv;
                }
            }
#if LS_BC_SMEM
            buf ^= 1;
#endif
            if (tv && softplus_flag) dt = softplus(dt);
            __syncwarp();  // the previous tile's readers are done
            sx[2 * n] = dt;
            sx[2 * n + 1] = DISC == DISC_MAMBA ? dt * uu : uu;
            __syncwarp();
            W p[TT];
#pragma unroll
            for (int kk = 0; kk < TT; ++kk) {
                if (kk % CKPT_T == 0 && ckpt && nvalid && kk < nt) ckpt[(chan * nck + (t0 + kk) / CKPT_T) * dstate + n] = h;
                W a, x, abar;
                staged_pair(sx, kk, a, x);
                if (DISC == DISC_MAMBA) {
                    abar = fexp2(a * A2);
                    h = abar * h + bv[kk] * x;
                } else {
                    W bcoef;
                    discretize<DISC>(a, An, A2, abar, bcoef);
                    h = abar * h + (bcoef * x) * bv[kk];
                }
                if (WP) prod *= abar;
                if (WO) p[kk] = cv[kk] * h;
            }
            if (WO) {
                W y = transpose_sum<NL>(p, n);
                if (tv) {
                    y += Dd * uu;
                    if (z) y *= silu(zz);
                    out[row + t] = narrow<T>(y);
                }
            }
        }
    };
    if (want_out) body(Flag<true>{}, Flag<false>{});
    else if (pend) body(Flag<false>{}, Flag<true>{});
    else body(Flag<false>{}, Flag<false>{});

    if (nvalid) {
        const size_t o = (chan * K + k) * dstate + n;
        if (hend) hend[o] = h;
        if (pend) pend[o] = prod;
    }
}

// ---------------------------------------------------------------------------------
// Forward, two states per lane (the default for dstate <= 16 with float32 compute):
// a channel is 8 lanes, lane n owning states n and n + 8, so a warp holds 4 channels
// and a block of LP_WARPS warps 4 * LP_WARPS channels, all in one group when B or C is
// selective (the caller checks). Tiles of 16 steps: lane n stages steps n and n + 8
// (u, delta, z, prefetched one tile ahead), the block stages the group's B and C tiles
// in shared memory (double-buffered, the next tile in flight in registers), and each
// step is, per lane, two exponentials and two multiply-adds on two independent chains;
// y of the tile's 16 steps is the sum of 16 partials over 8 lanes, a transposed
// butterfly of 14 shuffles that leaves steps n and n + 8 in lane n.
// Against one state per lane: half the warps (at the first anchor size 3 072, which fit
// the H100 in one wave at 3 blocks of 8 warps per multiprocessor, where 6 144 warps of
// 32 per multiprocessor took 1.45 waves), half the shuffles, and the per-tile work
// (staging, softplus, addresses) shared by 32 updates instead of 16.
// Same arguments and modes as scan_fwd_kernel; grid (ceil(dim / (4 * LP_WARPS)),
// batch, chunks), LP_WARPS * 32 threads.
// ---------------------------------------------------------------------------------
#ifndef LP_WARPS
#define LP_WARPS 8
#endif
#ifndef LP_MIN_BLOCKS
#define LP_MIN_BLOCKS 3
#endif

// y of 2 * NL steps from NL lanes: p[k] is this lane's part of step k; afterwards p[0]
// holds step `lane` and p[NL] step `lane + NL` (the butterfly on both halves at once)
template <int O, int NL, typename W>
PA_DEV void butterfly_stage2(W (&p)[2 * NL], int lane) {
    const bool hi = (lane & O) != 0;
#pragma unroll
    for (int h = 0; h < 2 * NL; h += NL) {
#pragma unroll
        for (int j = 0; j < O; ++j) {
            const W send = hi ? p[h + j] : p[h + j + O];
            const W keep = hi ? p[h + j + O] : p[h + j];
            p[h + j] = keep + __shfl_xor_sync(0xffffffffu, send, O, NL);
        }
    }
    if constexpr (O > 1) butterfly_stage2<O / 2, NL>(p, lane);
}

// The per-lane setup of the two-states-per-lane kernels: 8 lanes a channel, 4 channels
// a warp, cpb channels a block (grid (ceil(dim / cpb), batch, chunks)); lane n of channel
// d owns states n and n + 8 (v0, v1: whether they exist); its chunk's steps, its row of
// u, delta, z, its block's group's rows of a selective B and C, and its parameters.
template <typename T, typename W> struct PairLane {
    int warp, sub, n, d, b, k, K;
    bool dvalid, v0, v1;
    long long t_begin, t_end;
    size_t chan, row;
    const T* bblk;
    const T* cblk;
    W A0, A1, A20, A21, bias, Dd, binv0, binv1, cinv0, cinv1;
    PA_DEV PairLane(int cpb, const W* __restrict__ A, const T* __restrict__ Bsel, const W* __restrict__ Binv,
                    const T* __restrict__ Csel, const W* __restrict__ Cinv, const W* __restrict__ D,
                    const W* __restrict__ delta_bias, int dim, int dstate, long long seqlen, int groups,
                    long long chunk_len) {
        constexpr int NL = 8, CPW = 4;
        warp = threadIdx.x / 32;
        sub = (threadIdx.x % 32) / NL;
        n = threadIdx.x % NL;
        d = blockIdx.x * cpb + warp * CPW + sub;
        dvalid = d < dim;
        v0 = dvalid && n < dstate;
        v1 = dvalid && n + NL < dstate;
        b = blockIdx.y;
        k = blockIdx.z;
        K = gridDim.z;
        t_begin = (long long)k * chunk_len;
        t_end = t_begin + chunk_len < seqlen ? t_begin + chunk_len : seqlen;
        chan = (size_t)b * dim + (dvalid ? d : 0);
        row = chan * seqlen;
        const int d_first = (int)blockIdx.x * cpb, g_blk = (d_first < dim ? d_first : dim - 1) / (dim / groups);
        bblk = Bsel ? Bsel + ((size_t)b * groups + g_blk) * dstate * seqlen : nullptr;
        cblk = Csel ? Csel + ((size_t)b * groups + g_blk) * dstate * seqlen : nullptr;
        A0 = v0 ? A[(size_t)d * dstate + n] : W(0);
        A1 = v1 ? A[(size_t)d * dstate + n + NL] : W(0);
        A20 = A0 * W(1.4426950408889634);
        A21 = A1 * W(1.4426950408889634);
        bias = (dvalid && delta_bias) ? delta_bias[d] : W(0);
        Dd = (dvalid && D) ? D[d] : W(0);
        binv0 = (v0 && !Bsel) ? Binv[(size_t)d * dstate + n] : W(0);
        binv1 = (v1 && !Bsel) ? Binv[(size_t)d * dstate + n + NL] : W(0);
        cinv0 = (v0 && !Csel) ? Cinv[(size_t)d * dstate + n] : W(0);
        cinv1 = (v1 && !Csel) ? Cinv[(size_t)d * dstate + n + NL] : W(0);
    }
};

template <typename T, typename W, int DISC>
__global__ void __launch_bounds__(LP_WARPS * 32, LP_MIN_BLOCKS) scan_fwd_pair_kernel(
    const T* __restrict__ u, const T* __restrict__ delta, const T* __restrict__ z, T* __restrict__ out,
    const W* __restrict__ A, const T* __restrict__ Bsel, const W* __restrict__ Binv, const T* __restrict__ Csel,
    const W* __restrict__ Cinv, const W* __restrict__ D, const W* __restrict__ delta_bias, int softplus_flag,
    const W* __restrict__ h0, int h0_chunks, W* __restrict__ hend, W* __restrict__ pend, W* __restrict__ ckpt,
    int nck, int dim, int dstate, long long seqlen, int groups, long long chunk_len) {
    constexpr int NL = 8, TT = 16, CPW = 4, CPB = CPW * LP_WARPS, NTH = LP_WARPS * 32, RB = TT + 4;
    constexpr int BCE = (16 * TT + NTH - 1) / NTH;  // tile elements per thread
    __shared__ __align__(16) W s_x[CPB * TT * 2];     // per channel and step: (dt, dt*u or u)
    __shared__ __align__(16) W s_bc[2][2][16 * RB];   // [buffer][B or C][state][step]
    const PairLane<T, W> ln(CPB, A, Bsel, Binv, Csel, Cinv, D, delta_bias, dim, dstate, seqlen, groups, chunk_len);
    const size_t hrow = (ln.chan * h0_chunks + (h0_chunks == 1 ? 0 : ln.k)) * dstate;
    W hA = (ln.v0 && h0) ? h0[hrow + ln.n] : W(0), hB = (ln.v1 && h0) ? h0[hrow + ln.n + NL] : W(0);
    W prodA = W(1), prodB = W(1);
    W* sx = s_x + (ln.warp * CPW + ln.sub) * TT * 2;
    const bool want_out = out != nullptr;

    auto body = [&](auto with_out, auto with_prod, auto both_selective) {
        // SEL: B and C both selective, known at compile time (no per-step selects)
        constexpr bool WO = decltype(with_out)::value, WP = decltype(with_prod)::value;
        constexpr bool SEL = decltype(both_selective)::value;
        T rbn[BCE], rcn[BCE];  // the next tile's elements of B and C, in flight
        T nu0 = T{}, nd0 = T{}, nz0 = T{}, nu1 = T{}, nd1 = T{}, nz1 = T{};  // this lane's two steps of the next tile
        auto fetch = [&](long long tn) {
            const int ntn = (int)(ln.t_end - tn < TT ? ln.t_end - tn : TT);
            if (Bsel) fetch_tile<16, TT, BCE, NTH>(rbn, ln.bblk, dstate, seqlen, tn, ntn);
            if (WO && Csel) fetch_tile<16, TT, BCE, NTH>(rcn, ln.cblk, dstate, seqlen, tn, ntn);
            if (ln.dvalid && ln.n < ntn) {
                nu0 = u[ln.row + tn + ln.n];
                nd0 = delta[ln.row + tn + ln.n];
                if (WO && z) nz0 = z[ln.row + tn + ln.n];
            }
            if (ln.dvalid && ln.n + NL < ntn) {
                nu1 = u[ln.row + tn + ln.n + NL];
                nd1 = delta[ln.row + tn + ln.n + NL];
                if (WO && z) nz1 = z[ln.row + tn + ln.n + NL];
            }
        };
        if (ln.t_begin < ln.t_end) fetch(ln.t_begin);
        int buf = 0;
        for (long long t0 = ln.t_begin; t0 < ln.t_end; t0 += TT) {
            const int nt = (int)(ln.t_end - t0 < TT ? ln.t_end - t0 : TT);
            const bool tv0 = ln.dvalid && ln.n < nt, tv1 = ln.dvalid && ln.n + NL < nt;
#pragma unroll
            for (int r = 0; r < BCE; ++r) {
                const int e = threadIdx.x + r * NTH;
                if (e < 16 * TT) {
                    if (Bsel) s_bc[buf][0][(e / TT) * RB + e % TT] = widen(rbn[r]);
                    if (WO && Csel) s_bc[buf][1][(e / TT) * RB + e % TT] = widen(rcn[r]);
                }
            }
            W u0 = W(0), dt0 = W(0), z0 = W(0), u1 = W(0), dt1 = W(0), z1 = W(0);
            if (tv0) {
                u0 = widen(nu0);
                dt0 = widen(nd0) + ln.bias;
                if (WO && z) z0 = widen(nz0);
            }
            if (tv1) {
                u1 = widen(nu1);
                dt1 = widen(nd1) + ln.bias;
                if (WO && z) z1 = widen(nz1);
            }
            __syncthreads();  // this tile's B, C staged (double buffer: the readers of this buffer, two tiles ago, are done)
            if (t0 + TT < ln.t_end) fetch(t0 + TT);
            if (softplus_flag) {
                if (tv0) dt0 = softplus(dt0);
                if (tv1) dt1 = softplus(dt1);
            }
            __syncwarp();  // the previous tile's readers of sx are done
            sx[2 * ln.n] = dt0;
            sx[2 * ln.n + 1] = DISC == DISC_MAMBA ? dt0 * u0 : u0;
            sx[2 * (ln.n + NL)] = dt1;
            sx[2 * (ln.n + NL) + 1] = DISC == DISC_MAMBA ? dt1 * u1 : u1;
            __syncwarp();
            if (ckpt && t0 % CKPT_T == 0) {
                const size_t o = (ln.chan * nck + t0 / CKPT_T) * dstate;
                if (ln.v0) ckpt[o + ln.n] = hA;
                if (ln.v1) ckpt[o + ln.n + NL] = hB;
            }
            const W* brA = &s_bc[buf][0][ln.n * RB];
            const W* brB = &s_bc[buf][0][(ln.n + NL) * RB];
            const W* crA = &s_bc[buf][1][ln.n * RB];
            const W* crB = &s_bc[buf][1][(ln.n + NL) * RB];
            W p[TT];
#pragma unroll
            for (int q = 0; q < TT / 4; ++q) {
                float4 bqA, bqB, cqA = make_float4(0.f, 0.f, 0.f, 0.f), cqB = cqA;
                if (SEL || Bsel) {
                    bqA = reinterpret_cast<const float4*>(brA)[q];
                    bqB = reinterpret_cast<const float4*>(brB)[q];
                } else {
                    bqA = make_float4(ln.binv0, ln.binv0, ln.binv0, ln.binv0);
                    bqB = make_float4(ln.binv1, ln.binv1, ln.binv1, ln.binv1);
                }
                if (WO) {
                    if (SEL || Csel) {
                        cqA = reinterpret_cast<const float4*>(crA)[q];
                        cqB = reinterpret_cast<const float4*>(crB)[q];
                    } else {
                        cqA = make_float4(ln.cinv0, ln.cinv0, ln.cinv0, ln.cinv0);
                        cqB = make_float4(ln.cinv1, ln.cinv1, ln.cinv1, ln.cinv1);
                    }
                }
                const W bA[4] = {bqA.x, bqA.y, bqA.z, bqA.w}, bB[4] = {bqB.x, bqB.y, bqB.z, bqB.w};
                const W cA[4] = {cqA.x, cqA.y, cqA.z, cqA.w}, cB[4] = {cqB.x, cqB.y, cqB.z, cqB.w};
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int kk = 4 * q + j;
                    W a, x, abarA, abarB;
                    staged_pair(sx, kk, a, x);
                    if (DISC == DISC_MAMBA) {
                        abarA = fexp2(a * ln.A20);
                        abarB = fexp2(a * ln.A21);
                        hA = abarA * hA + bA[j] * x;
                        hB = abarB * hB + bB[j] * x;
                    } else {
                        W bcA, bcB;
                        discretize<DISC>(a, ln.A0, ln.A20, abarA, bcA);
                        discretize<DISC>(a, ln.A1, ln.A21, abarB, bcB);
                        hA = abarA * hA + (bcA * x) * bA[j];
                        hB = abarB * hB + (bcB * x) * bB[j];
                    }
                    if (WP) {
                        prodA *= abarA;
                        prodB *= abarB;
                    }
                    if (WO) p[kk] = cA[j] * hA + cB[j] * hB;
                }
            }
            buf ^= 1;
            if (WO) {
                butterfly_stage2<NL / 2, NL>(p, ln.n);
                if (tv0) {
                    W y = p[0] + ln.Dd * u0;
                    if (z) y *= silu(z0);
                    out[ln.row + t0 + ln.n] = narrow<T>(y);
                }
                if (tv1) {
                    W y = p[NL] + ln.Dd * u1;
                    if (z) y *= silu(z1);
                    out[ln.row + t0 + ln.n + NL] = narrow<T>(y);
                }
            }
        }
    };
    if (want_out && Bsel && Csel) body(Flag<true>{}, Flag<false>{}, Flag<true>{});
    else if (want_out) body(Flag<true>{}, Flag<false>{}, Flag<false>{});
    else if (pend) body(Flag<false>{}, Flag<true>{}, Flag<false>{});
    else body(Flag<false>{}, Flag<false>{}, Flag<false>{});

    const size_t o = (ln.chan * ln.K + ln.k) * dstate;
    if (ln.v0) {
        if (hend) hend[o + ln.n] = hA;
        if (pend) pend[o + ln.n] = prodA;
    }
    if (ln.v1) {
        if (hend) hend[o + ln.n + NL] = hB;
        if (pend) pend[o + ln.n + NL] = prodB;
    }
}

// ---------------------------------------------------------------------------------
// Backward, one state per lane (NL = 16 lanes per channel, tiles of TT = NL steps, from
// the chunk's end to its start); same arguments and modes as scan_bwd_kernel, with
// dB_part, dC_part (blocks, batch, dstate, seqlen): every channel of a block is in one
// group (the caller checks), so a block's partial sum is over its channels alone.
// Per tile, lane n: its states of the tile recomputed from the checkpoint into
// registers (with each step's Abar), the adjoint g walked back through them; the sums
// over states (d dt, du, and y for dz) by the transposed butterfly, the sums over
// channels (dB, dC) by one shuffle between the two channels of a warp and a fixed-order
// sum over the block's warps in shared memory: repeated calls are bit-identical.
// Grid (dim / CPB, batch, chunks), BW_WARPS * 32 threads.
// ---------------------------------------------------------------------------------
#ifndef BW_WARPS
#define BW_WARPS 16
#endif
#ifndef BW_MIN_BLOCKS
#define BW_MIN_BLOCKS 1
#endif
#ifndef BW_BC_SMEM  // 1: the block stages its group's B and C tiles in shared memory once for its
#define BW_BC_SMEM 1  // 32 channels (double-buffered, the next tile in flight in registers)
#endif
#ifndef BW_PREFETCH  // 1: each lane loads its step of the next tile down (u, delta, dout, z) and its
#define BW_PREFETCH 1  // state's checkpoint while this tile is walked
#endif
template <typename T, typename W, int NL, int DISC>
__global__ void __launch_bounds__(BW_WARPS * 32, BW_MIN_BLOCKS) scan_bwd_lanes_kernel(
    const T* __restrict__ dout, const T* __restrict__ u, const T* __restrict__ delta, const T* __restrict__ z,
    const W* __restrict__ A, const T* __restrict__ Bsel, const W* __restrict__ Binv, const T* __restrict__ Csel,
    const W* __restrict__ Cinv, const W* __restrict__ D, const W* __restrict__ delta_bias, int softplus_flag,
    const W* __restrict__ ckpt, int nck, const W* __restrict__ g0, int g0_chunks, W* __restrict__ gout,
    T* __restrict__ du, T* __restrict__ ddelta, T* __restrict__ dz, W* __restrict__ dA_part,
    W* __restrict__ dBinv_part, W* __restrict__ dCinv_part, W* __restrict__ dB_part, W* __restrict__ dC_part,
    W* __restrict__ dD_part, W* __restrict__ dbias_part, int dim, int dstate, long long seqlen, int groups, int vec_bc,
    long long chunk_len) {
    constexpr int TT = NL, CPW = 32 / NL, CPB = CPW * BW_WARPS;
#if BW_BC_SMEM
    constexpr int RR = TT + 1;  // row stride of the dB/dC staging (scalar stores without bank conflicts)
    constexpr int NTH = BW_WARPS * 32, RB = TT + 4, BCE = (NL * TT + NTH - 1) / NTH;
    __shared__ __align__(16) W s_bc[2][2][NL * RB];  // [buffer][B or C][state][step]
#else
    constexpr int RR = TT + 4;  // row stride of the dB/dC staging (16-byte stores without bank conflicts)
#endif
    __shared__ __align__(16) W s_x[BW_WARPS * CPW * TT * 4];  // per channel and step: (dt, u, dy, dt*u)
    __shared__ __align__(16) W s_red[2 * BW_WARPS * NL * RR];  // [B or C][warp][state][step]
    const int warp = threadIdx.x / 32, sub = (threadIdx.x % 32) / NL, n = threadIdx.x % NL;
    const int d = blockIdx.x * CPB + warp * CPW + sub;
    const bool dvalid = d < dim, nvalid = dvalid && n < dstate;
    const int b = blockIdx.y, k = blockIdx.z, K = gridDim.z, batch = gridDim.y;
    const long long t_begin = (long long)k * chunk_len;
    const long long t_end = t_begin + chunk_len < seqlen ? t_begin + chunk_len : seqlen;
    const int dd = dvalid ? d : 0, ns = n < dstate ? n : 0;
    const size_t chan = (size_t)b * dim + dd, row = chan * seqlen;
    const int g_ = dd / (dim / groups);
    const T* brow = Bsel ? Bsel + (((size_t)b * groups + g_) * dstate + ns) * seqlen : nullptr;
    const T* crow = Csel ? Csel + (((size_t)b * groups + g_) * dstate + ns) * seqlen : nullptr;
    const W An = nvalid ? A[(size_t)d * dstate + n] : W(0), A2 = An * W(1.4426950408889634);
    const W bias = (dvalid && delta_bias) ? delta_bias[d] : W(0), Dd = (dvalid && D) ? D[d] : W(0);
    const W binv = (nvalid && !Bsel) ? Binv[(size_t)d * dstate + n] : W(0);
    const W cinv = (nvalid && !Csel) ? Cinv[(size_t)d * dstate + n] : W(0);
    W g = (nvalid && g0) ? g0[(chan * g0_chunks + (g0_chunks == 1 ? 0 : k)) * dstate + n] : W(0);
    W* sx = s_x + (warp * CPW + sub) * TT * 4;
    const bool full = du != nullptr;
    W dA_acc = W(0), dBi_acc = W(0), dCi_acc = W(0), dD_acc = W(0), dbias_acc = W(0);

    const int ntiles = (int)((t_end - t_begin + TT - 1) / TT);
#if BW_BC_SMEM
    const int d_first = (int)blockIdx.x * CPB, g_blk = (d_first < dim ? d_first : dim - 1) / (dim / groups);
    const bool bc_shared = nvalid && g_ == g_blk;
    const T* bblk = Bsel ? Bsel + ((size_t)b * groups + g_blk) * dstate * seqlen : nullptr;
    const T* cblk = Csel ? Csel + ((size_t)b * groups + g_blk) * dstate * seqlen : nullptr;
    T rbn[BCE], rcn[BCE];  // the next tile's elements of B and C, in flight
    int buf = 0;
    if (ntiles > 0) {
        const long long tl = t_begin + (long long)(ntiles - 1) * TT;
        const int ntl = (int)(t_end - tl);
        if (full && Bsel) fetch_tile<NL, TT, BCE, NTH>(rbn, bblk, dstate, seqlen, tl, ntl);
        if (Csel) fetch_tile<NL, TT, BCE, NTH>(rcn, cblk, dstate, seqlen, tl, ntl);
    }
#endif
#if BW_PREFETCH
    T pu = T{}, pd = T{}, po = T{}, pz = T{};  // this lane's step of the next tile down, in flight
    W pck = W(0);
    if (ntiles > 0) {
        const long long tl = t_begin + (long long)(ntiles - 1) * TT;
        if (dvalid && tl + n < t_end) {
            pu = u[row + tl + n];
            pd = delta[row + tl + n];
            po = dout[row + tl + n];
            if (z) pz = z[row + tl + n];
        }
        if (full && nvalid) pck = ckpt[(chan * nck + tl / CKPT_T) * dstate + n];
    }
#endif
    for (int it = ntiles - 1; it >= 0; --it) {
        const long long t0 = t_begin + (long long)it * TT;
        const int nt = (int)(t_end - t0 < TT ? t_end - t0 : TT);
        const bool tv = dvalid && n < nt;
        const long long t = t0 + n;
#if BW_BC_SMEM
        {  // stage this tile's B, C (fetched during the previous tile), then fetch the next one down
#pragma unroll
            for (int r = 0; r < BCE; ++r) {
                const int e = threadIdx.x + r * NTH;
                if (e < NL * TT) {
                    if (full && Bsel) s_bc[buf][0][(e / TT) * RB + e % TT] = widen(rbn[r]);
                    if (Csel) s_bc[buf][1][(e / TT) * RB + e % TT] = widen(rcn[r]);
                }
            }
            __syncthreads();  // (double buffer: the readers of this buffer, two tiles ago, are done)
            if (it > 0) {
                const long long tn = t0 - TT;
                if (full && Bsel) fetch_tile<NL, TT, BCE, NTH>(rbn, bblk, dstate, seqlen, tn, TT);
                if (Csel) fetch_tile<NL, TT, BCE, NTH>(rcn, cblk, dstate, seqlen, tn, TT);
            }
        }
#endif
        // lane n stages step n
        W uu = W(0), v = W(0), go = W(0), zz = W(0);
#if BW_PREFETCH
        if (tv) {
            uu = widen(pu);
            v = widen(pd) + bias;
            go = widen(po);
            if (z) zz = widen(pz);
        }
        const W hck = pck;
        if (it > 0) {  // the tile below is whole
            if (dvalid) {
                pu = u[row + t - TT];
                pd = delta[row + t - TT];
                po = dout[row + t - TT];
                if (z) pz = z[row + t - TT];
            }
            if (full && nvalid) pck = ckpt[(chan * nck + (t0 - TT) / CKPT_T) * dstate + n];
        }
#else
        if (tv) {
            uu = widen(u[row + t]);
            v = widen(delta[row + t]) + bias;
            go = widen(dout[row + t]);
            if (z) zz = widen(z[row + t]);
        }
#endif
        W bv[TT], cv[TT];
        if (full) {
#if BW_BC_SMEM
            if (Bsel && bc_shared) read_row<TT>(bv, &s_bc[buf][0][n * RB]);
            else
#endif
            if (Bsel) load_row<TT>(bv, brow + t0, nvalid ? nt : 0, vec_bc != 0);
            else {
#pragma unroll
                for (int j = 0; j < TT; ++j) bv[j] = binv;
            }
        }
#if BW_BC_SMEM
        if (Csel && bc_shared) read_row<TT>(cv, &s_bc[buf][1][n * RB]);
        else
#endif
        if (Csel) load_row<TT>(cv, crow + t0, nvalid ? nt : 0, vec_bc != 0);
        else {
#pragma unroll
            for (int j = 0; j < TT; ++j) cv[j] = cinv;
        }
#if BW_BC_SMEM
        buf ^= 1;
#endif
#if !BW_PREFETCH
        const W hck = (full && nvalid) ? ckpt[(chan * nck + t0 / CKPT_T) * dstate + n] : W(0);
#endif
        W dt = v, dsp = W(1), sz = W(1), dy = go;
        if (tv) {
            if (softplus_flag) {
                dt = softplus(v);
                dsp = softplus_grad(v);
            }
            if (z) {
                sz = W(1) / (W(1) + fexp(-zz));  // sigmoid(z); silu(z) = z * sz
                dy = go * zz * sz;
            }
        } else {
            dt = W(0);
        }
        __syncwarp();  // the previous tile's readers are done
        sx[4 * n] = dt;
        sx[4 * n + 1] = uu;
        sx[4 * n + 2] = dy;
        sx[4 * n + 3] = dt * uu;
        __syncwarp();

        if (!full) {  // the chunk pass: only the adjoint's path through the chunk
#pragma unroll
            for (int kk = TT - 1; kk >= 0; --kk) {
                W a, u_, y_, x_;
                staged4(sx, kk, a, u_, y_, x_);
                W abar, bcoef;
                discretize<DISC>(a, An, A2, abar, bcoef);
                g = abar * (g + cv[kk] * y_);
            }
            continue;
        }

        // recompute the tile's states and Abar; y (for dz) through the butterfly
        W hs[TT], as[TT];
        {
            W h = hck, py[TT];
#pragma unroll
            for (int kk = 0; kk < TT; ++kk) {
                W a, uk, yk, x;
                staged4(sx, kk, a, uk, yk, x);
                W bcoef;
                discretize<DISC>(a, An, A2, as[kk], bcoef);
                h = DISC == DISC_MAMBA ? as[kk] * h + bv[kk] * x : as[kk] * h + (bcoef * uk) * bv[kk];
                hs[kk] = h;
                if (dz) py[kk] = cv[kk] * h;
            }
            if (dz) {
                const W y = transpose_sum<NL>(py, n) + Dd * uu;
                if (tv) dz[row + t] = narrow<T>(go * y * sz * (W(1) + zz * (W(1) - sz)));
            }
        }
        // the adjoint, backwards through the tile
        W qd[TT], qu[TT], rB[TT], rC[TT];
#if BW_BC_SMEM
        // each step's dB, dC terms go to shared memory as they come (the barrier at the
        // tile's start ordered them after the previous tile's reads): fewer live registers
        W* pb = s_red + (warp * NL + n) * RR;
        W* pc = pb + BW_WARPS * NL * RR;
#endif
#pragma unroll
        for (int kk = TT - 1; kk >= 0; --kk) {
            W a, uk, yk, x;
            staged4(sx, kk, a, uk, yk, x);
            g += cv[kk] * yk;
            const W hp = kk > 0 ? hs[kk > 0 ? kk - 1 : 0] : hck;
            const W dab = g * hp;
            if (DISC == DISC_MAMBA) {
                const W gb = g * bv[kk], dabs = dab * as[kk];
                qd[kk] = dabs * An + gb * uk;
                dA_acc += dabs * a;
                qu[kk] = gb * a;
                rB[kk] = g * x;
            } else {
                W abar, bcoef, da_ddt, da_dA, db_ddt, db_dA;
                discretize<DISC>(a, An, A2, abar, bcoef);
                discretize_grads<DISC>(a, An, as[kk], da_ddt, da_dA, db_ddt, db_dA);
                const W dbc = g * bv[kk] * uk;
                qd[kk] = dab * da_ddt + dbc * db_ddt;
                dA_acc += dab * da_dA + dbc * db_dA;
                qu[kk] = g * bcoef * bv[kk];
                rB[kk] = g * bcoef * uk;
            }
            rC[kk] = yk * hs[kk];
            g *= as[kk];
#if BW_BC_SMEM
            if (!Bsel) dBi_acc += rB[kk];
            if (!Csel) dCi_acc += rC[kk];
            if (CPW == 2 && Bsel && Csel) {  // the warp's two channels: channel 0 keeps the dB sum, 1 the dC sum
                const W send = sub ? rB[kk] : rC[kk], keep = sub ? rC[kk] : rB[kk];
                const W sum = keep + __shfl_xor_sync(0xffffffffu, send, NL);
                (sub ? pc : pb)[kk] = sum;
            } else if (Bsel || Csel) {
                W sb = rB[kk], sc = rC[kk];
                if (CPW == 2) {
                    sb += __shfl_xor_sync(0xffffffffu, sb, NL);
                    sc += __shfl_xor_sync(0xffffffffu, sc, NL);
                }
                if (sub == 0) {
                    pb[kk] = sb;
                    pc[kk] = sc;
                }
            }
#endif
        }
        // sums over the states: lane n gets step n's
        const W ddt_n = transpose_sum<NL>(qd, n);
        const W du_n = transpose_sum<NL>(qu, n);
        if (tv) {
            du[row + t] = narrow<T>(du_n + Dd * dy);
            ddelta[row + t] = narrow<T>(ddt_n * dsp);
            dD_acc += dy * uu;
            dbias_acc += ddt_n * dsp;
        }
#if !BW_BC_SMEM
        if (!Bsel) {
#pragma unroll
            for (int kk = 0; kk < TT; ++kk) dBi_acc += rB[kk];
        }
        if (!Csel) {
#pragma unroll
            for (int kk = 0; kk < TT; ++kk) dCi_acc += rC[kk];
        }
#endif
        if (Bsel || Csel) {  // sums over the block's channels, in a fixed order
#if !BW_BC_SMEM
            if (CPW == 2) {
#pragma unroll
                for (int kk = 0; kk < TT; ++kk) {
                    rB[kk] += __shfl_xor_sync(0xffffffffu, rB[kk], NL);
                    rC[kk] += __shfl_xor_sync(0xffffffffu, rC[kk], NL);
                }
            }
            __syncthreads();  // the previous tile's sums are read
            if (sub == 0) {
                W* pb = s_red + (warp * NL + n) * RR;
                W* pc = pb + BW_WARPS * NL * RR;
#pragma unroll
                for (int kk = 0; kk < TT; ++kk) {
                    pb[kk] = rB[kk];
                    pc[kk] = rC[kk];
                }
            }
#endif
            __syncthreads();
            for (int i = threadIdx.x; i < 2 * NL * TT; i += BW_WARPS * 32) {
                const int isC = i / (NL * TT), nn = (i / TT) % NL, kk = i % TT;
                if (nn < dstate && kk < nt && (isC ? Csel != nullptr : Bsel != nullptr)) {
                    const W* src = s_red + (isC * BW_WARPS * NL + nn) * RR + kk;
                    W sum = W(0);
#pragma unroll
                    for (int w = 0; w < BW_WARPS; ++w) sum += src[w * NL * RR];
                    const size_t o = (((size_t)blockIdx.x * batch + b) * dstate + nn) * seqlen + t0 + kk;
                    (isC ? dC_part : dB_part)[o] = sum;
                }
            }
        }
    }
    if (nvalid) {
        const size_t o = (chan * K + k) * dstate + n;
        gout[o] = g;
        if (full) {
            dA_part[o] = dA_acc;
            if (dBinv_part) dBinv_part[o] = dBi_acc;
            if (dCinv_part) dCinv_part[o] = dCi_acc;
        }
    }
    if (full) {
        dD_acc = lane_sum<NL>(dD_acc);
        dbias_acc = lane_sum<NL>(dbias_acc);
        if (dvalid && n == 0) {
            if (dD_part) dD_part[chan * K + k] = dD_acc;
            if (dbias_part) dbias_part[chan * K + k] = dbias_acc;
        }
    }
}

// ---------------------------------------------------------------------------------
// Backward, two states per lane (8 lanes per channel, lane n owning states n and n + 8;
// dstate <= 16, float32 compute): scan_bwd_lanes_kernel's algorithm (its full pass; the
// chunk pass stays there) in the layout of scan_fwd_pair_kernel. A warp holds 4
// channels, a block of BP_WARPS warps 4 * BP_WARPS channels, all in one group when B or
// C is selective (the caller checks). Tiles of 16 steps from the chunk's end: lane n
// stages steps n and n + 8 (u, delta, dout, z and its two states' checkpoint loaded one
// tile ahead), the block stages the group's B and C tiles in shared memory (double-
// buffered, the next tile in flight in registers). Per tile, each lane recomputes its
// two states over the tile into its own slice of shared memory (in registers they
// would cost 32 more a lane, and a third of the warps), then walks the adjoint back
// through them in two halves of 8 steps, Abar recomputed (one ex2) rather than kept.
// The sums over states (y for dz, d dt, du) of each half are an 8-lane transposed
// butterfly that leaves step n (or n + 8) in lane n; the sums over channels (dB, dC)
// are a transposed butterfly over the warp's 4 channels (the 4 values of a lane and
// step, 3 shuffles) and a fixed-order sum over the block's warps in shared memory:
// repeated calls are bit-identical.
// Against one state per lane: half the warps (one wave at the first anchor size at 3
// blocks of 8 warps per multiprocessor), two independent chains a lane, and the
// per-tile work and the butterflies' shuffles shared by twice the updates.
// Same arguments as scan_bwd_lanes_kernel (vec_bc unused); grid (ceil(dim / (4 *
// BP_WARPS)), batch, chunks), BP_WARPS * 32 threads, BP_WARPS * 16 * 32 float2 of
// dynamic shared memory.
// ---------------------------------------------------------------------------------
#ifndef BP_WARPS
#define BP_WARPS 8
#endif
#ifndef BP_MIN_BLOCKS
#define BP_MIN_BLOCKS 3
#endif

// one state's step of the recomputation: h = Abar h + Bcoef B u
template <int DISC, typename W> PA_DEV void recompute_state(W& h, W a, W uk, W x, W b, W An, W A2) {
    if (DISC == DISC_MAMBA) {
        h = fexp2(a * A2) * h + b * x;
    } else {
        W abar, bcoef;
        discretize<DISC>(a, An, A2, abar, bcoef);
        h = abar * h + (bcoef * uk) * b;
    }
}

// one state's reverse step (DESIGN.md): g enters as the adjoint after step k, leaves as
// the one before it; adds this state's terms of d dt and du to qd, qu (for mamba's
// discretisation only their parts that depend on the state: dt Abar h A and g B, of
// which d dt = sum + u sum' and du = dt sum') and of dA to dA_acc; rB, rC: its terms of
// dB, dC. hp, hk: the state before and after step k.
template <int DISC, typename W>
PA_DEV void adjoint_state(W& g, W hp, W hk, W a, W uk, W yk, W x, W b, W c, W An, W A2, W& qd, W& qu,
                          W& dA_acc, W& rB, W& rC) {
    g += c * yk;
    const W dab = g * hp;
    W abar;
    if (DISC == DISC_MAMBA) {  // qd and qu take dabs * A and g * B; the caller adds u and dt per step
        abar = fexp2(a * A2);
        const W dabs = dab * abar;
        qd += dabs * An;
        dA_acc += dabs * a;
        qu += g * b;
        rB = g * x;
    } else {
        W bcoef, da_ddt, da_dA, db_ddt, db_dA;
        discretize<DISC>(a, An, A2, abar, bcoef);
        discretize_grads<DISC>(a, An, abar, da_ddt, da_dA, db_ddt, db_dA);
        const W dbc = g * b * uk;
        qd += dab * da_ddt + dbc * db_ddt;
        dA_acc += dab * da_dA + dbc * db_dA;
        qu += g * bcoef * b;
        rB = g * bcoef * uk;
    }
    rC = yk * hk;
    g *= abar;
}

// four consecutive steps of one state's row of a staged B or C tile, or the time-invariant value
PA_DEV float4 quad(const float* rowp, float inv, bool sel, int q) {
    return sel ? reinterpret_cast<const float4*>(rowp)[q] : make_float4(inv, inv, inv, inv);
}

// One step of a lane in the two-states-per-lane backward, staged: its u, delta + bias,
// dout and z as loaded (zero past the end of the sequence), then dt (softplus), softplus'
// derivative, sigmoid(z) and dy = dout * silu(z); stage() writes (dt, u, dy, dt*u).
template <typename W> struct BwdStep {
    W u = W(0), v = W(0), go = W(0), zz = W(0), dt = W(0), dsp = W(1), sz = W(1), dy = W(0);
    template <typename T> PA_DEV void load(bool tv, T pu, T pd, T po, T pz, bool has_z, W bias) {
        if (tv) {
            u = widen(pu);
            v = widen(pd) + bias;
            go = widen(po);
            if (has_z) zz = widen(pz);
        }
    }
    PA_DEV void prepare(bool tv, bool has_z, int softplus_flag) {
        dy = go;
        if (tv) {
            dt = v;
            if (softplus_flag) {
                dt = softplus(v);
                dsp = softplus_grad(v);
            }
            if (has_z) {
                sz = W(1) / (W(1) + fexp(-zz));  // silu(z) = z * sz
                dy = go * zz * sz;
            }
        }
    }
    PA_DEV void stage(W* s) const {
        s[0] = dt;
        s[1] = u;
        s[2] = dy;
        s[3] = dt * u;
    }
};

template <typename T, typename W, int DISC>
__global__ void __launch_bounds__(BP_WARPS * 32, BP_MIN_BLOCKS) scan_bwd_pair_kernel(
    const T* __restrict__ dout, const T* __restrict__ u, const T* __restrict__ delta, const T* __restrict__ z,
    const W* __restrict__ A, const T* __restrict__ Bsel, const W* __restrict__ Binv, const T* __restrict__ Csel,
    const W* __restrict__ Cinv, const W* __restrict__ D, const W* __restrict__ delta_bias, int softplus_flag,
    const W* __restrict__ ckpt, int nck, const W* __restrict__ g0, int g0_chunks, W* __restrict__ gout,
    T* __restrict__ du, T* __restrict__ ddelta, T* __restrict__ dz, W* __restrict__ dA_part,
    W* __restrict__ dBinv_part, W* __restrict__ dCinv_part, W* __restrict__ dB_part, W* __restrict__ dC_part,
    W* __restrict__ dD_part, W* __restrict__ dbias_part, int dim, int dstate, long long seqlen, int groups, int vec_bc,
    long long chunk_len) {
    static_assert(sizeof(W) == 4, "the two-states-per-lane backward computes in float32");
    constexpr int NL = 8, TT = 16, CPW = 4, CPB = CPW * BP_WARPS, NTH = BP_WARPS * 32, RB = TT + 4, RR = TT + 1;
    constexpr int BCE = (16 * TT + NTH - 1) / NTH;  // tile elements per thread
    constexpr int CRED = BP_WARPS * 16 * RR + 16;  // the dC half of s_red (+16 words: other banks than dB's)
    __shared__ __align__(16) W s_x[CPB * TT * 4];       // per channel and step: (dt, u, dy, dt*u)
    __shared__ __align__(16) W s_bc[2][2][16 * RB];     // [buffer][B or C][state][step]
    __shared__ __align__(16) W s_red[2 * CRED];         // [B or C][warp][state][step]
    PA_SHARED(s_dyn);                                   // [warp][step][lane]: a lane's two states
    const PairLane<T, W> ln(CPB, A, Bsel, Binv, Csel, Cinv, D, delta_bias, dim, dstate, seqlen, groups, chunk_len);
    const int lane = threadIdx.x % 32, batch = gridDim.y;
    const size_t grow = (ln.chan * g0_chunks + (g0_chunks == 1 ? 0 : ln.k)) * dstate;
    W gA = (ln.v0 && g0) ? g0[grow + ln.n] : W(0), gB = (ln.v1 && g0) ? g0[grow + ln.n + NL] : W(0);
    W* sx = s_x + (ln.warp * CPW + ln.sub) * TT * 4;
    float2* sh = reinterpret_cast<float2*>(s_dyn) + ln.warp * TT * 32 + lane;  // step kk at sh[kk * 32]
    // where this lane's sum over the warp's channels goes: sub 0, 1: dB of states n, n + 8; 2, 3: dC
    W* pred = s_red + (ln.sub >> 1) * CRED + (ln.warp * 16 + ln.n + NL * (ln.sub & 1)) * RR;
    W dA0 = W(0), dA1 = W(0), dBi0 = W(0), dBi1 = W(0), dCi0 = W(0), dCi1 = W(0), dD_acc = W(0), dbias_acc = W(0);

    const int ntiles = (int)((ln.t_end - ln.t_begin + TT - 1) / TT);
    T rbn[BCE], rcn[BCE];  // the next tile's elements of B and C, in flight
    T pu0 = T{}, pd0 = T{}, po0 = T{}, pz0 = T{}, pu1 = T{}, pd1 = T{}, po1 = T{}, pz1 = T{};  // steps n, n + 8
    W pck0 = W(0), pck1 = W(0);
    auto fetch = [&](long long tl) {  // the tile from step tl: B, C, this lane's two steps, its checkpoint
        const int ntl = (int)(ln.t_end - tl < TT ? ln.t_end - tl : TT);
        if (Bsel) fetch_tile<16, TT, BCE, NTH>(rbn, ln.bblk, dstate, seqlen, tl, ntl);
        if (Csel) fetch_tile<16, TT, BCE, NTH>(rcn, ln.cblk, dstate, seqlen, tl, ntl);
        if (ln.dvalid && ln.n < ntl) {
            pu0 = u[ln.row + tl + ln.n];
            pd0 = delta[ln.row + tl + ln.n];
            po0 = dout[ln.row + tl + ln.n];
            if (z) pz0 = z[ln.row + tl + ln.n];
        }
        if (ln.dvalid && ln.n + NL < ntl) {
            pu1 = u[ln.row + tl + ln.n + NL];
            pd1 = delta[ln.row + tl + ln.n + NL];
            po1 = dout[ln.row + tl + ln.n + NL];
            if (z) pz1 = z[ln.row + tl + ln.n + NL];
        }
        const size_t o = (ln.chan * nck + tl / CKPT_T) * dstate;
        if (ln.v0) pck0 = ckpt[o + ln.n];
        if (ln.v1) pck1 = ckpt[o + ln.n + NL];
    };
    if (ntiles > 0) fetch(ln.t_begin + (long long)(ntiles - 1) * TT);
    int buf = 0;
    auto tiles = [&](auto both_selective) {  // B and C both selective, known at compile time
    constexpr bool SEL = decltype(both_selective)::value;
    const bool bs = SEL || Bsel != nullptr, cs = SEL || Csel != nullptr;
    for (int it = ntiles - 1; it >= 0; --it) {
        const long long t0 = ln.t_begin + (long long)it * TT;
        const int nt = (int)(ln.t_end - t0 < TT ? ln.t_end - t0 : TT);
        const bool tv0 = ln.dvalid && ln.n < nt, tv1 = ln.dvalid && ln.n + NL < nt;
#pragma unroll
        for (int r = 0; r < BCE; ++r) {
            const int e = threadIdx.x + r * NTH;
            if (e < 16 * TT) {
                if (Bsel) s_bc[buf][0][(e / TT) * RB + e % TT] = widen(rbn[r]);
                if (Csel) s_bc[buf][1][(e / TT) * RB + e % TT] = widen(rcn[r]);
            }
        }
        // this lane's two steps (n and n + 8): dt (softplus), u, dy = dout * silu(z), and what dz needs
        BwdStep<W> st[2];
        st[0].load(tv0, pu0, pd0, po0, pz0, z != nullptr, ln.bias);
        st[1].load(tv1, pu1, pd1, po1, pz1, z != nullptr, ln.bias);
        const W hck0 = pck0, hck1 = pck1;
        __syncthreads();  // this tile's B, C staged (double buffer: the readers of this buffer, two tiles ago, are done)
        if (it > 0) fetch(t0 - TT);
        st[0].prepare(tv0, z != nullptr, softplus_flag);
        st[1].prepare(tv1, z != nullptr, softplus_flag);
        __syncwarp();  // the previous tile's readers of sx are done
        st[0].stage(sx + 4 * ln.n);
        st[1].stage(sx + 4 * (ln.n + NL));
        __syncwarp();
        const W* brA = &s_bc[buf][0][ln.n * RB];
        const W* brB = &s_bc[buf][0][(ln.n + NL) * RB];
        const W* crA = &s_bc[buf][1][ln.n * RB];
        const W* crB = &s_bc[buf][1][(ln.n + NL) * RB];

        // recompute the tile's states into sh; y (for dz) of each half through the butterfly
        {
            W hA = hck0, hB = hck1;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                W py[8];
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                    const int qq = 2 * half + q;
                    const float4 bqA = quad(brA, ln.binv0, bs, qq), bqB = quad(brB, ln.binv1, bs, qq);
                    const float4 cqA = quad(crA, ln.cinv0, cs, qq), cqB = quad(crB, ln.cinv1, cs, qq);
                    const W bA[4] = {bqA.x, bqA.y, bqA.z, bqA.w}, bB[4] = {bqB.x, bqB.y, bqB.z, bqB.w};
                    const W cA[4] = {cqA.x, cqA.y, cqA.z, cqA.w}, cB[4] = {cqB.x, cqB.y, cqB.z, cqB.w};
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const int kk = 4 * qq + j;
                        W a, uk, yk, x;
                        staged4(sx, kk, a, uk, yk, x);
                        recompute_state<DISC>(hA, a, uk, x, bA[j], ln.A0, ln.A20);
                        recompute_state<DISC>(hB, a, uk, x, bB[j], ln.A1, ln.A21);
                        sh[kk * 32] = make_float2(hA, hB);
                        py[4 * q + j] = cA[j] * hA + cB[j] * hB;
                    }
                }
                if (dz) {
                    const W y = transpose_sum<NL>(py, ln.n);
                    const bool tv = half ? tv1 : tv0;
                    const BwdStep<W>& s = st[half];
                    if (tv) dz[ln.row + t0 + ln.n + NL * half] = narrow<T>(s.go * (y + ln.Dd * s.u) * s.sz * (W(1) + s.zz * (W(1) - s.sz)));
                }
            }
        }
        // the adjoint, backwards through the tile in two halves
        float2 hk = sh[(TT - 1) * 32];
#pragma unroll
        for (int half = 1; half >= 0; --half) {
            W qd[8], qu[8];
#pragma unroll
            for (int q = 1; q >= 0; --q) {
                const int qq = 2 * half + q;
                const float4 bqA = quad(brA, ln.binv0, bs, qq), bqB = quad(brB, ln.binv1, bs, qq);
                const float4 cqA = quad(crA, ln.cinv0, cs, qq), cqB = quad(crB, ln.cinv1, cs, qq);
                const W bA[4] = {bqA.x, bqA.y, bqA.z, bqA.w}, bB[4] = {bqB.x, bqB.y, bqB.z, bqB.w};
                const W cA[4] = {cqA.x, cqA.y, cqA.z, cqA.w}, cB[4] = {cqB.x, cqB.y, cqB.z, cqB.w};
#pragma unroll
                for (int j = 3; j >= 0; --j) {
                    const int kk = 4 * qq + j, i = 4 * q + j;
                    W a, uk, yk, x;
                    staged4(sx, kk, a, uk, yk, x);
                    const float2 hp = kk > 0 ? sh[(kk > 0 ? kk - 1 : 0) * 32] : make_float2(hck0, hck1);
                    W qdi = W(0), qui = W(0), rBA, rBB, rCA, rCB;
                    adjoint_state<DISC>(gA, hp.x, hk.x, a, uk, yk, x, bA[j], cA[j], ln.A0, ln.A20, qdi, qui, dA0, rBA, rCA);
                    adjoint_state<DISC>(gB, hp.y, hk.y, a, uk, yk, x, bB[j], cB[j], ln.A1, ln.A21, qdi, qui, dA1, rBB, rCB);
                    if (DISC == DISC_MAMBA) {  // qd: sum of dabs * A, qu: sum of g * B over the lane's states
                        qd[i] = qdi + uk * qui;
                        qu[i] = a * qui;
                    } else {
                        qd[i] = qdi;
                        qu[i] = qui;
                    }
                    hk = hp;
                    if (!bs) {
                        dBi0 += rBA;
                        dBi1 += rBB;
                    }
                    if (!cs) {
                        dCi0 += rCA;
                        dCi1 += rCB;
                    }
                    if (bs || cs) {  // sum over the warp's 4 channels: sub s keeps value s of (rBA, rBB, rCA, rCB)
                        const bool h2 = (ln.sub & 2) != 0, h1 = (ln.sub & 1) != 0;
                        const W m0 = (h2 ? rCA : rBA) + __shfl_xor_sync(0xffffffffu, h2 ? rBA : rCA, 16);
                        const W m1 = (h2 ? rCB : rBB) + __shfl_xor_sync(0xffffffffu, h2 ? rBB : rCB, 16);
                        pred[kk] = (h1 ? m1 : m0) + __shfl_xor_sync(0xffffffffu, h1 ? m0 : m1, 8);
                    }
                }
            }
            // sums over the states: lane n gets step n + 8 * half
            const W ddt_n = transpose_sum<NL>(qd, ln.n), du_n = transpose_sum<NL>(qu, ln.n);
            const bool tv = half ? tv1 : tv0;
            const BwdStep<W>& s = st[half];
            if (tv) {
                const long long t = t0 + ln.n + NL * half;
                du[ln.row + t] = narrow<T>(du_n + ln.Dd * s.dy);
                ddelta[ln.row + t] = narrow<T>(ddt_n * s.dsp);
                dD_acc += s.dy * s.u;
                dbias_acc += ddt_n * s.dsp;
            }
        }
        if (bs || cs) {  // sums over the block's warps, in a fixed order
            __syncthreads();
            for (int i = threadIdx.x; i < 2 * 16 * TT; i += NTH) {
                const int isC = i / (16 * TT), nn = (i / TT) % 16, kk = i % TT;
                if (nn < dstate && kk < nt && (isC ? cs : bs)) {
                    const W* src = s_red + isC * CRED + nn * RR + kk;
                    W sum = W(0);
#pragma unroll
                    for (int w = 0; w < BP_WARPS; ++w) sum += src[w * 16 * RR];
                    const size_t o = (((size_t)blockIdx.x * batch + ln.b) * dstate + nn) * seqlen + t0 + kk;
                    (isC ? dC_part : dB_part)[o] = sum;
                }
            }
        }
        buf ^= 1;
    }
    };
    if (Bsel && Csel) tiles(Flag<true>{});
    else tiles(Flag<false>{});
    const size_t o = (ln.chan * ln.K + ln.k) * dstate;
    if (ln.v0) {
        gout[o + ln.n] = gA;
        dA_part[o + ln.n] = dA0;
        if (dBinv_part) dBinv_part[o + ln.n] = dBi0;
        if (dCinv_part) dCinv_part[o + ln.n] = dCi0;
    }
    if (ln.v1) {
        gout[o + ln.n + NL] = gB;
        dA_part[o + ln.n + NL] = dA1;
        if (dBinv_part) dBinv_part[o + ln.n + NL] = dBi1;
        if (dCinv_part) dCinv_part[o + ln.n + NL] = dCi1;
    }
    dD_acc = lane_sum<NL>(dD_acc);
    dbias_acc = lane_sum<NL>(dbias_acc);
    if (ln.dvalid && ln.n == 0) {
        if (dD_part) dD_part[ln.chan * ln.K + ln.k] = dD_acc;
        if (dbias_part) dbias_part[ln.chan * ln.K + ln.k] = dbias_acc;
    }
}

// ---------------------------------------------------------------------------------
// Backward with four states per lane (scan_bwd_quad_kernel): the full pass for mamba's
// discretisation with B and C both selective, float32 compute, dstate <= 16. A channel
// is 4 lanes, lane j owning states 4j .. 4j + 3 (those past dstate carry zeros); 8
// channels a warp, BQ_WARPS warps a block (32 channels of one group of B, C). Tiles of
// 16 steps from the chunk's end; the checkpoints (every CKPT_T = 16 steps) start each
// tile. Per tile:
//   * lane j of a channel loads steps 4j .. 4j + 3 of its u, delta, dout and z (one
//     vector load each, one tile ahead) and stages (dt, dt u, dy, u) of each as one
//     16-byte word a (step, channel): every lane of the channel then reads a step with
//     one broadcast load; the group's B and C rows are staged as [step][B row, C row];
//   * the recomputation from the checkpoint stores each state before its step in the
//     lane's own 16-byte slot of a [step][lane] array in shared memory (read back only by
//     the same lane: no barrier);
//   * the adjoint, last step first, sums over the lane's 4 states (g B for du and d dt,
//     g h Abar A for d dt, C h for dz) and writes them over the slot of the state it has
//     just read; at the tile's end each lane adds its own 4 steps' sums over the channel's
//     4 lanes (the slots are swizzled by step so that these reads meet no bank conflict).
//     dB and dC of a step are summed over the warp's 8 channels by a transposed butterfly
//     (7 shuffles: the lane's 8 values, 4 states of each matrix, become one (matrix,
//     state) summed over the channels), stored per step, and summed over the block's
//     warps in a fixed order once a tile (no atomics: repeats are bit-identical).
// Against two states per lane: half the instructions per state update (the per-step
// loads, the sums over lanes and the per-tile work shared by 4 states), and 16 warps a
// multiprocessor (4 blocks: 128 registers, 53 KiB of shared memory each).
// Arguments as scan_bwd_pair_kernel's (Binv, Cinv, dBinv, dCinv unused); vec: the rows of
// u, delta, dout, z, du, d delta, dz allow 16-byte (float) or 8-byte (16-bit) accesses of
// 4 steps. Dynamic shared memory: BQ_WARPS * 16 * 32 * 16 bytes.
// ---------------------------------------------------------------------------------
#ifndef BQ_WARPS
#define BQ_WARPS 4
#endif
#ifndef BQ_MIN_BLOCKS
#define BQ_MIN_BLOCKS 4
#endif
#define BQ_RS 36  // words a step of the staged B, C tile: 16 of B, 16 of C, 4 of padding
#define BQ_WS 17  // words a lane's row of dB or dC sums: 16 steps and one of padding

// softplus, log(1 + e^v) = max(v, 0) + log1p(e^-|v|), with log1p(w)/w on [0, 1] a degree-8
// polynomial (relative error below 3e-7), and its derivative sigmoid(v): no division, no call
PA_DEV void softplus_fast(float v, float& sp, float& grad) {
    const float w = fexp2(fabsf(v) * -1.4426950408889634f);
    float p = 0.005244129337370396f;
    p = p * w - 0.029557399451732635f;
    p = p * w + 0.07832293212413788f;
    p = p * w - 0.1367269903421402f;
    p = p * w + 0.1911117285490036f;
    p = p * w - 0.24844548106193542f;
    p = p * w + 0.3331933915615082f;
    p = p * w - 0.49999508261680603f;
    p = p * w + 1.0f;
    sp = fmaxf(v, 0.0f) + w * p;
    const float r = __fdividef(1.0f, 1.0f + w);  // sigmoid(|v|)
    grad = v >= 0.0f ? r : w * r;
}

// 4 consecutive elements of a row as loaded (their bits): one vector load when vec and
// all 4 are valid, else nv (< 4 possibly) scalar loads and zeros
template <typename T> struct Row4;
template <> struct Row4<float> {
    uint4 w;
    PA_DEV void load(const float* p, bool vec, int nv) {
        if (vec && nv >= 4) {
            w = __ldg(reinterpret_cast<const uint4*>(p));
        } else {
            w.x = nv > 0 ? __float_as_uint(p[0]) : 0u;
            w.y = nv > 1 ? __float_as_uint(p[1]) : 0u;
            w.z = nv > 2 ? __float_as_uint(p[2]) : 0u;
            w.w = nv > 3 ? __float_as_uint(p[3]) : 0u;
        }
    }
    PA_DEV float get(int i) const { return __uint_as_float(i == 0 ? w.x : i == 1 ? w.y : i == 2 ? w.z : w.w); }
    static PA_DEV void store(float* p, const float (&v)[4], bool vec, int nv) {
        if (vec && nv >= 4) {
            *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
        } else {
#pragma unroll
            for (int i = 0; i < 4; ++i)
                if (i < nv) p[i] = v[i];
        }
    }
};
template <typename H> struct Row4h {  // bfloat16 or float16
    uint2 w;
    PA_DEV void load(const H* p, bool vec, int nv) {
        if (vec && nv >= 4) {
            w = __ldg(reinterpret_cast<const uint2*>(p));
        } else {
            const unsigned e0 = nv > 0 ? p[0].bits : 0u, e1 = nv > 1 ? p[1].bits : 0u;
            const unsigned e2 = nv > 2 ? p[2].bits : 0u, e3 = nv > 3 ? p[3].bits : 0u;
            w = make_uint2(e0 | (e1 << 16), e2 | (e3 << 16));
        }
    }
    PA_DEV float get(int i) const {
        const unsigned v = i < 2 ? w.x : w.y;
        return widen(H{(unsigned short)((i & 1) ? v >> 16 : v & 0xffffu)});
    }
    static PA_DEV void store(H* p, const float (&v)[4], bool vec, int nv) {
        H e[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) e[i] = narrow<H>(v[i]);
        if (vec && nv >= 4) {
            *reinterpret_cast<uint2*>(p) = make_uint2(e[0].bits | ((unsigned)e[1].bits << 16), e[2].bits | ((unsigned)e[3].bits << 16));
        } else {
#pragma unroll
            for (int i = 0; i < 4; ++i)
                if (i < nv) p[i] = e[i];
        }
    }
};
template <> struct Row4<bf16_t> : Row4h<bf16_t> {};
template <> struct Row4<f16_t> : Row4h<f16_t> {};

// The B and C tiles (16 steps) of the four-states-per-lane kernels, loaded in runs of 4
// steps, one vector load a run: run e = threadIdx.x + r NTH is row e / 4 % 16 of B (e < 64)
// or of C (without_c: none), steps 4 (e % 4) .. + 3; staged into a buffer of [step][B row,
// C row] (BQ_RS words a step); rows past dstate and steps past the end are zeros.
template <typename T, int NTH> struct BcRuns {
    static constexpr int R = (128 + NTH - 1) / NTH;
    const T* p[R];
    bool ok[R];
    int n;  // the runs of B and C: 128, or 64 without C
    Row4<T> v[R];
    PA_DEV BcRuns(const T* bblk, const T* cblk, int dstate, long long seqlen, bool with_c) : n(with_c ? 128 : 64) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int e = threadIdx.x + r * NTH, nn = e / 4 % 16;
            ok[r] = e < n && nn < dstate;
            p[r] = (e < 64 ? bblk : cblk) + (size_t)(ok[r] ? nn : 0) * seqlen + 4 * (e % 4);
        }
    }
    // the tile from step tn, of which ntn steps are in the sequence (vec: 4 steps at once)
    PA_DEV void load(long long tn, int ntn, bool vec) {
#pragma unroll
        for (int r = 0; r < R; ++r) v[r].load(p[r] + tn, vec, ok[r] ? ntn - 4 * ((threadIdx.x + r * NTH) % 4) : 0);
    }
    template <typename W> PA_DEV void stage(W* s) const {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int e = threadIdx.x + r * NTH, col = e / 4 % 16 + (e < 64 ? 0 : 16), tt = 4 * (e % 4);
            if (e < n) {
#pragma unroll
                for (int i = 0; i < 4; ++i) s[(tt + i) * BQ_RS + col] = v[r].get(i);
            }
        }
    }
};

// The per-lane setup of the four-states-per-lane kernels: 4 lanes a channel, lane j
// owning states 4j .. 4j + 3, 8 channels a warp, cpb channels a block (grid (dim / cpb,
// batch, chunks); dim is a multiple of cpb, the caller checks); its chunk's steps, its row
// of u, delta, z (... dout, du) from its first step of a tile (4j), its block's group's
// rows of B and C, its channel's parameters and A log2(e) of its states (0 past dstate).
template <typename T, typename W> struct QuadLane {
    int warp, lane, c, j, cb, d, b, k, K;
    long long t_begin, t_end;
    size_t chan, row;
    const T* bblk;
    const T* cblk;
    W bias, Dd, A2[4];
    PA_DEV QuadLane(int cpb, const W* __restrict__ A, const T* __restrict__ Bsel, const T* __restrict__ Csel,
                    const W* __restrict__ D, const W* __restrict__ delta_bias, int dim, int dstate, long long seqlen,
                    int groups, long long chunk_len) {
        warp = threadIdx.x / 32;
        lane = threadIdx.x % 32;
        c = lane / 4;
        j = lane % 4;
        cb = warp * 8 + c;
        d = blockIdx.x * cpb + cb;
        b = blockIdx.y;
        k = blockIdx.z;
        K = gridDim.z;
        t_begin = (long long)k * chunk_len;
        t_end = t_begin + chunk_len < seqlen ? t_begin + chunk_len : seqlen;
        chan = (size_t)b * dim + d;
        row = chan * seqlen + 4 * j;
        const int g_blk = (int)(blockIdx.x * cpb) / (dim / groups);
        bblk = Bsel + ((size_t)b * groups + g_blk) * dstate * seqlen;
        cblk = Csel + ((size_t)b * groups + g_blk) * dstate * seqlen;
        bias = delta_bias ? delta_bias[d] : W(0);
        Dd = D ? D[d] : W(0);
#pragma unroll
        for (int i = 0; i < 4; ++i) A2[i] = 4 * j + i < dstate ? A[(size_t)d * dstate + 4 * j + i] * W(1.4426950408889634) : W(0);
    }
    // the lane's 4 states of row r of a (rows, dstate) array (0 past dstate, or without the array)
    PA_DEV void load4(W (&v)[4], const W* __restrict__ p, size_t r, int dstate) const {
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = (4 * j + i < dstate && p) ? p[r * dstate + 4 * j + i] : W(0);
    }
    PA_DEV void store4(W* __restrict__ p, size_t r, const W (&v)[4], int dstate) const {
#pragma unroll
        for (int i = 0; i < 4; ++i)
            if (4 * j + i < dstate) p[r * dstate + 4 * j + i] = v[i];
    }
};

template <typename T, typename W>
__global__ void __launch_bounds__(BQ_WARPS * 32, BQ_MIN_BLOCKS) scan_bwd_quad_kernel(
    const T* __restrict__ dout, const T* __restrict__ u, const T* __restrict__ delta, const T* __restrict__ z,
    const W* __restrict__ A, const T* __restrict__ Bsel, const W* __restrict__ Binv, const T* __restrict__ Csel,
    const W* __restrict__ Cinv, const W* __restrict__ D, const W* __restrict__ delta_bias, int softplus_flag,
    const W* __restrict__ ckpt, int nck, const W* __restrict__ g0, int g0_chunks, W* __restrict__ gout,
    T* __restrict__ du, T* __restrict__ ddelta, T* __restrict__ dz, W* __restrict__ dA_part,
    W* __restrict__ dBinv_part, W* __restrict__ dCinv_part, W* __restrict__ dB_part, W* __restrict__ dC_part,
    W* __restrict__ dD_part, W* __restrict__ dbias_part, int dim, int dstate, long long seqlen, int groups, int vec,
    long long chunk_len) {
    static_assert(sizeof(W) == 4, "the four-states-per-lane backward computes in float32");
    constexpr int TT = 16, CPW = 8, CPB = CPW * BQ_WARPS, NTH = BQ_WARPS * 32, SXS = CPB + 1;
    constexpr int PARTS = 2 * 16 * TT / NTH;  // dB/dC sums per thread
    static_assert(16 * TT % NTH == 0 && 2 * 16 * TT % NTH == 0, "BQ_WARPS must divide 8");
    __shared__ __align__(16) W s_x[TT * SXS * 4];           // [step][channel]: (dt, dt u, dy, u)
    __shared__ __align__(16) W s_bc[TT * BQ_RS];            // [step]: B row, C row
    __shared__ W s_w[BQ_WARPS * 32 * BQ_WS];                // [warp][lane][step]: dB or dC summed over the warp's channels
    PA_SHARED(s_dyn);  // [warp][step][lane ^ step / 4]: the lane's states before each step, then its sums over states
    const QuadLane<T, W> ln(CPB, A, Bsel, Csel, D, delta_bias, dim, dstate, seqlen, groups, chunk_len);
    // (the lane's place from threadIdx here, not from ln: the butterfly's selects stay selects)
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, c = lane / 4, j = lane % 4, cb = ln.cb, b = ln.b, k = ln.k;
    const int batch = gridDim.y;
    const long long t_begin = ln.t_begin, t_end = ln.t_end;
    const size_t chan = ln.chan, row = ln.row;  // this lane's steps: 4j .. 4j + 3 of a tile
    const T *bblk = ln.bblk, *cblk = ln.cblk;
    const W bias = ln.bias, Dd = ln.Dd;
    const W(&A2)[4] = ln.A2;
    W g[4], dA[4] = {W(0), W(0), W(0), W(0)};
    ln.load4(g, g0, chan * g0_chunks + (g0_chunks == 1 ? 0 : k), dstate);
    float4* hw = reinterpret_cast<float4*>(s_dyn) + warp * TT * 32;  // step kk, lane l at hw[kk * 32 + (l ^ kk / 4)]
    const float4* sx4 = reinterpret_cast<const float4*>(s_x) + cb;   // step kk at sx4[kk * SXS]
    const W* bcj = s_bc + 4 * j;  // this lane's states of B at step kk: bcj[kk * BQ_RS], of C 16 words on
    W* wrow = s_w + (warp * 32 + lane) * BQ_WS;
    // the dB, dC sums this thread adds over the warps: (lane of a warp, step) and where they go
    const W* wsrc[PARTS];
    W* wdst[PARTS];
    int wstep[PARTS];
#pragma unroll
    for (int r = 0; r < PARTS; ++r) {
        const int o = threadIdx.x + r * NTH, src = o / TT, cc = src / 4, n = 4 * (src % 4) + ((cc >> 1) & 1) + 2 * (cc & 1);
        wstep[r] = n < dstate ? o % TT : TT;  // TT: a state past dstate, never written
        wsrc[r] = s_w + src * BQ_WS + o % TT;
        wdst[r] = (cc >> 2 ? dC_part : dB_part) + (((size_t)blockIdx.x * batch + b) * dstate + (n < dstate ? n : 0)) * seqlen + o % TT;
    }
    W dD_acc = W(0), dbias_acc = W(0);
    const bool b2 = (c & 4) != 0, b1 = (c & 2) != 0, b0 = (c & 1) != 0, vec_rows = (vec & 1) != 0, vec_bc = (vec & 2) != 0;

    const int ntiles = (int)((t_end - t_begin + TT - 1) / TT);
    BcRuns<T, NTH> bc(bblk, cblk, dstate, seqlen, true);  // the next tile, in flight
    Row4<T> pu, pd, po, pz;
    W pck[4];
    auto fetch = [&](long long tl) {
        const int ntl = (int)(t_end - tl < TT ? t_end - tl : TT), nv = ntl - 4 * j;
        bc.load(tl, ntl, vec_bc);
        pu.load(u + row + tl, vec_rows, nv);
        pd.load(delta + row + tl, vec_rows, nv);
        po.load(dout + row + tl, vec_rows, nv);
        if (z) pz.load(z + row + tl, vec_rows, nv);
        ln.load4(pck, ckpt, chan * nck + tl / CKPT_T, dstate);
    };
    if (ntiles > 0) fetch(t_begin + (long long)(ntiles - 1) * TT);
    for (int it = ntiles - 1; it >= 0; --it) {
        const long long t0 = t_begin + (long long)it * TT;
        const int nt = (int)(t_end - t0 < TT ? t_end - t0 : TT), nv = nt - 4 * j;
        bc.stage(s_bc);
        // this lane's 4 steps: dt (softplus), its derivative, dy = dout * silu(z), and dz / (y + D u)
        W dsp[4], dzy[4], uu[4], dts[4], dys[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const W v = pd.get(i) + bias, go = po.get(i);
            uu[i] = pu.get(i);
            W dt = v, dy = go;
            dsp[i] = W(1);
            dzy[i] = W(0);
            if (softplus_flag) softplus_fast(v, dt, dsp[i]);
            if (z) {
                const W zz = pz.get(i), sz = __fdividef(W(1), W(1) + fexp(-zz));
                dy = go * zz * sz;
                dzy[i] = go * sz * (W(1) + zz * (W(1) - sz));
            }
            if (i >= nv) dt = dy = W(0);  // a step past the end: Abar = 1, no input, no output
            dts[i] = dt;
            dys[i] = dy;
            reinterpret_cast<float4*>(s_x)[(4 * j + i) * SXS + cb] = make_float4(dt, dt * uu[i], dy, uu[i]);
        }
        W h[4] = {pck[0], pck[1], pck[2], pck[3]};
        __syncthreads();  // the tile staged (every read of the previous tile's shared memory is done)
        if (it > 0) fetch(t0 - TT);

        // the tile's states from its checkpoint: slot kk holds the state before step kk
#pragma unroll
        for (int kk = 0; kk < TT; ++kk) {
            const float4 q = sx4[kk * SXS];
            const float4 bq = *reinterpret_cast<const float4*>(bcj + kk * BQ_RS);
            hw[kk * 32 + (lane ^ (kk / 4))] = make_float4(h[0], h[1], h[2], h[3]);
            h[0] = fexp2(q.x * A2[0]) * h[0] + q.y * bq.x;
            h[1] = fexp2(q.x * A2[1]) * h[1] + q.y * bq.y;
            h[2] = fexp2(q.x * A2[2]) * h[2] + q.y * bq.z;
            h[3] = fexp2(q.x * A2[3]) * h[3] + q.y * bq.w;
        }
        // the adjoint, last step first; h is the state after step kb
#pragma unroll
        for (int kb = TT - 1; kb >= 0; --kb) {
            const float4 q = sx4[kb * SXS];  // (dt, dt u, dy, u)
            const float4 bq = *reinterpret_cast<const float4*>(bcj + kb * BQ_RS);
            const float4 cq = *reinterpret_cast<const float4*>(bcj + kb * BQ_RS + 16);
            float4* slot = hw + kb * 32 + (lane ^ (kb / 4));
            const float4 hq = *slot;
            const W bv[4] = {bq.x, bq.y, bq.z, bq.w}, cv[4] = {cq.x, cq.y, cq.z, cq.w}, hp[4] = {hq.x, hq.y, hq.z, hq.w};
            W rB[4], rC[4], s1 = W(0), s2 = W(0), y = W(0);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                y += cv[i] * h[i];
                rC[i] = h[i] * q.z;  // dC's term
                g[i] += cv[i] * q.z;
                rB[i] = g[i] * q.y;  // dB's term
                s1 += g[i] * bv[i];
                const W abar = fexp2(q.x * A2[i]);
                const W ga = g[i] * hp[i] * abar;
                dA[i] += ga * q.x;
                s2 += ga * A2[i];
                g[i] *= abar;
                h[i] = hp[i];
            }
            *slot = make_float4(s1, s2, y, W(0));  // the lane's sums over its states, over the state just read
            // dB, dC summed over the warp's 8 channels: lane (c, j) ends with matrix c >> 2
            // (0: B, 1: C), state 4 j + (c >> 1 & 1) + 2 (c & 1)
            W m[4], m2[2];
#pragma unroll
            for (int i = 0; i < 4; ++i) m[i] = (b2 ? rC[i] : rB[i]) + __shfl_xor_sync(0xffffffffu, b2 ? rB[i] : rC[i], 16);
#pragma unroll
            for (int p = 0; p < 2; ++p)
                m2[p] = (b1 ? m[2 * p + 1] : m[2 * p]) + __shfl_xor_sync(0xffffffffu, b1 ? m[2 * p] : m[2 * p + 1], 8);
            wrow[kb] = (b0 ? m2[1] : m2[0]) + __shfl_xor_sync(0xffffffffu, b0 ? m2[0] : m2[1], 4);
        }
        __syncthreads();  // every warp's dB, dC sums and every lane's sums over states written
        // dB, dC rows of the tile: the warps' sums added in a fixed order
#pragma unroll
        for (int r = 0; r < PARTS; ++r) {
            if (wstep[r] < nt) {
                W sum = W(0);
#pragma unroll
                for (int w = 0; w < BQ_WARPS; ++w) sum += wsrc[r][w * 32 * BQ_WS];
                wdst[r][t0] = sum;
            }
        }
        // this lane's 4 steps: the sums over the channel's 4 lanes, du, d delta, dz, and dD, d delta_bias
        W vdu[4], vdd[4], vdz[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float4* at = hw + (4 * j + i) * 32;  // step 4j + i: the channel's lanes 4c + l at slots (4c + l) ^ j
            float4 sum = at[(4 * c) ^ j];
#pragma unroll
            for (int l = 1; l < 4; ++l) {
                const float4 v = at[(4 * c + l) ^ j];
                sum.x += v.x; sum.y += v.y; sum.z += v.z;
            }
            const W ddt = (sum.y * W(0.6931471805599453) + uu[i] * sum.x) * dsp[i];  // s2 was summed with A log2(e)
            vdu[i] = dts[i] * sum.x + Dd * dys[i];
            vdd[i] = ddt;
            vdz[i] = dzy[i] * (sum.z + Dd * uu[i]);
            if (i < nv) {
                dD_acc += dys[i] * uu[i];
                dbias_acc += ddt;
            }
        }
        Row4<T>::store(du + row + t0, vdu, vec_rows, nv);
        Row4<T>::store(ddelta + row + t0, vdd, vec_rows, nv);
        if (z) Row4<T>::store(dz + row + t0, vdz, vec_rows, nv);
    }
    ln.store4(gout, chan * ln.K + k, g, dstate);
    ln.store4(dA_part, chan * ln.K + k, dA, dstate);
    dD_acc = lane_sum<4>(dD_acc);
    dbias_acc = lane_sum<4>(dbias_acc);
    if (j == 0) {
        if (dD_part) dD_part[chan * ln.K + k] = dD_acc;
        if (dbias_part) dbias_part[chan * ln.K + k] = dbias_acc;
    }
}

// ---------------------------------------------------------------------------------
// Forward with four states per lane (scan_fwd_quad_kernel): mamba's discretisation with B
// and C both selective, float32 compute, dstate <= 16; the modes of scan_fwd_pair_kernel
// (out, hend, pend, ckpt, h0). A channel is 4 lanes, lane j owning states 4j .. 4j + 3; 8
// channels a warp, FQ_WARPS warps a block (channels of one group of B, C). Tiles of 16
// steps: lane j loads steps 4j .. 4j + 3 of its u, delta, z (one vector load each, one
// tile ahead), computes dt (softplus) and dt u there and stages them in its channel's row
// of shared memory; every lane of the channel then holds the whole row of the tile in
// registers (8 16-byte reads), so a step's dt and dt u are registers picked at compile
// time. B and C rows are loaded in runs of 4 steps (one vector load a thread and tile at 4
// warps), staged once for the block as [step][B row, C row] (double buffered) and read as
// one 16-byte word a lane and step. vec: bit 0, the rows of u, delta, z, out may be read 4
// steps at once; bit 1, those of B and C. A step of a lane: 4 multiplies,
// 4 ex2, 4 multiply-adds for the states, 4 for its part of C h; the 4 parts of each step
// are added over the channel's lanes once a tile through shared memory, leaving each lane
// its own 4 steps, where D u and the gate are applied.
// Two instances: WIDE = 0 as above at FQ_MIN_BLOCKS blocks a multiprocessor; WIDE = 1 the
// lean loop (LEAN: the row read a pair of steps at a time, y's parts written every 4 steps;
// 96 registers) at FQ_WIDE_BLOCKS, for grids larger than one wave of the first (the host
// chooses; the kernel is bound by shared-memory wavefronts, so fewer waves is what pays).
// Against two states per lane: about half the instructions per state update, and half
// the warps (8 channels a warp instead of 4). Blocks of 4 warps (32 channels) at 3 a
// multiprocessor (168 registers, no spills) measured faster than blocks of 2 warps at 6
// or 8 (docs/backends/cupy.md): the staging of B and C is shared by more channels.
// ---------------------------------------------------------------------------------
#ifndef FQ_WARPS
#define FQ_WARPS 4
#endif
#ifndef FQ_MIN_BLOCKS
#define FQ_MIN_BLOCKS 3
#endif
#ifndef FQ_WIDE_BLOCKS
#define FQ_WIDE_BLOCKS 5  // blocks a multiprocessor of the lean instance (WIDE), for grids over a wave of FQ_MIN_BLOCKS
#endif
#ifndef FQ_LEAN
#define FQ_LEAN 0  // 1: the lean loop (see LEAN) at FQ_MIN_BLOCKS too
#endif
#ifndef FQ_VEC_BC
#define FQ_VEC_BC 1  // 0: B and C read one element at a time even where 4 steps at once may be
#endif
#define FQ_XS 36  // words a channel's row of staged (dt, dt u) pairs: 16 steps, and 4 of padding

// the 16 per-step values p of a lane as a row of 4 16-byte words at q
PA_DEV void put_row16(float* q, const float (&p)[16]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) reinterpret_cast<float4*>(q)[i] = make_float4(p[4 * i], p[4 * i + 1], p[4 * i + 2], p[4 * i + 3]);
}
// steps 4j .. 4j + 3 of a channel's 4 rows of per-step values (rows 20 words apart from q), summed
PA_DEV float4 sum_rows4(const float* q, int j) {
    float4 s = reinterpret_cast<const float4*>(q)[j];
#pragma unroll
    for (int r = 1; r < 4; ++r) {
        const float4 v = reinterpret_cast<const float4*>(q + r * 20)[j];
        s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
    }
    return s;
}
PA_DEV float at4(const float4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

template <typename T, typename W, int WIDE>
__global__ void __launch_bounds__(FQ_WARPS * 32, WIDE ? FQ_WIDE_BLOCKS : FQ_MIN_BLOCKS) scan_fwd_quad_kernel(
    const T* __restrict__ u, const T* __restrict__ delta, const T* __restrict__ z, T* __restrict__ out,
    const W* __restrict__ A, const T* __restrict__ Bsel, const W* __restrict__ Binv, const T* __restrict__ Csel,
    const W* __restrict__ Cinv, const W* __restrict__ D, const W* __restrict__ delta_bias, int softplus_flag,
    const W* __restrict__ h0, int h0_chunks, W* __restrict__ hend, W* __restrict__ pend, W* __restrict__ ckpt,
    int nck, int dim, int dstate, long long seqlen, int groups, int vec, long long chunk_len) {
    static_assert(sizeof(W) == 4, "the four-states-per-lane forward computes in float32");
    constexpr bool LEAN = FQ_LEAN || WIDE;
    constexpr int TT = 16, CPW = 8, CPB = CPW * FQ_WARPS, NTH = FQ_WARPS * 32;
    __shared__ __align__(16) W s_x[CPB * FQ_XS];           // [channel][step]: (dt, dt u)
    __shared__ __align__(16) W s_bc[2][TT * BQ_RS];        // [buffer][step]: B row, C row
    __shared__ __align__(16) W s_y[FQ_WARPS * 32 * 20];    // [warp][lane][step]: the lane's part of y
    const QuadLane<T, W> ln(CPB, A, Bsel, Csel, D, delta_bias, dim, dstate, seqlen, groups, chunk_len);
    const int warp = ln.warp, lane = ln.lane, c = ln.c, j = ln.j, cb = ln.cb, k = ln.k;
    const long long t_begin = ln.t_begin, t_end = ln.t_end;
    const size_t chan = ln.chan, row = ln.row;  // this lane's steps: 4j .. 4j + 3 of a tile
    const T *bblk = ln.bblk, *cblk = ln.cblk;
    const W bias = ln.bias, Dd = ln.Dd;
    const W(&A2)[4] = ln.A2;
    W h[4], prod[4] = {W(1), W(1), W(1), W(1)};
    ln.load4(h, h0, chan * h0_chunks + (h0_chunks == 1 ? 0 : k), dstate);
    W* xrow = s_x + cb * FQ_XS;
    W* yrow = s_y + (warp * 32 + lane) * 20;
    const bool vec_rows = (vec & 1) != 0, vec_bc = FQ_VEC_BC && (vec & 2) != 0;  // 4 steps of the rows / of B, C at once

    auto body = [&](auto with_out, auto with_prod) {
        constexpr bool WO = decltype(with_out)::value, WP = decltype(with_prod)::value;
        BcRuns<T, NTH> bc(bblk, cblk, dstate, seqlen, WO);  // the next tile of B, C, in flight
        Row4<T> pu, pd, pz;                                   // and of the channel's rows
        auto fetch = [&](long long tn) {
            const int ntn = (int)(t_end - tn < TT ? t_end - tn : TT), nv = ntn - 4 * j;
            bc.load(tn, ntn, vec_bc);
            pu.load(u + row + tn, vec_rows, nv);
            pd.load(delta + row + tn, vec_rows, nv);
            if (WO && z) pz.load(z + row + tn, vec_rows, nv);
        };
        if (t_begin < t_end) fetch(t_begin);
        int buf = 0;
        for (long long t0 = t_begin; t0 < t_end; t0 += TT) {
            const int nt = (int)(t_end - t0 < TT ? t_end - t0 : TT), nv = nt - 4 * j;
            bc.stage(s_bc[buf]);
            W uu[4], dts[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const W v = pd.get(i) + bias;
                uu[i] = pu.get(i);
                W dt = v, unused;
                if (softplus_flag) softplus_fast(v, dt, unused);
                dts[i] = i < nv ? dt : W(0);  // a step past the end: Abar = 1, no input
            }
            Row4<T> zc = pz;
            __syncthreads();  // this tile's B, C staged (double buffer: the readers of this buffer, two tiles ago, are done)
            if (t0 + TT < t_end) fetch(t0 + TT);
            __syncwarp();  // the previous tile's readers of the channel's row and of the y parts are done
            reinterpret_cast<float4*>(xrow)[2 * j] = make_float4(dts[0], dts[0] * uu[0], dts[1], dts[1] * uu[1]);
            reinterpret_cast<float4*>(xrow)[2 * j + 1] = make_float4(dts[2], dts[2] * uu[2], dts[3], dts[3] * uu[3]);
            if (ckpt && t0 % CKPT_T == 0) ln.store4(ckpt, chan * nck + t0 / CKPT_T, h, dstate);
            __syncwarp();
            const W* bcj = s_bc[buf] + 4 * j;
            // the channel's (dt, dt u) of the tile, steps 2m, 2m + 1 in xr[m], and y's parts of
            // the lane, held whole in registers; LEAN: registers for 2 steps of the row (xq, read
            // as they come) and 4 of y (yq, written every 4 steps): fewer registers, more blocks
            float4 xr[LEAN ? 1 : TT / 2], xq, yq;
            W yp[LEAN ? 1 : TT];
            (void)yq, (void)yp;  // (unused without the output)
            if constexpr (!LEAN) {
#pragma unroll
                for (int m = 0; m < TT / 2; ++m) xr[m] = reinterpret_cast<const float4*>(xrow)[m];
            }
#pragma unroll
            for (int kk = 0; kk < TT; ++kk) {
                if (LEAN && !(kk & 1)) xq = reinterpret_cast<const float4*>(xrow)[kk / 2];
                const float4& xk = LEAN ? xq : xr[kk / 2];
                const W a = (kk & 1) ? xk.z : xk.x, x = (kk & 1) ? xk.w : xk.y;
                const float4 bq = *reinterpret_cast<const float4*>(bcj + kk * BQ_RS);
                const W bv[4] = {bq.x, bq.y, bq.z, bq.w};
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const W abar = fexp2(a * A2[i]);
                    h[i] = abar * h[i] + x * bv[i];
                    if (WP) prod[i] *= abar;
                }
                if (WO) {
                    const float4 cq = *reinterpret_cast<const float4*>(bcj + kk * BQ_RS + 16);
                    const W yk = cq.x * h[0] + cq.y * h[1] + cq.z * h[2] + cq.w * h[3];
                    if constexpr (LEAN) {
                        (kk % 4 == 0 ? yq.x : kk % 4 == 1 ? yq.y : kk % 4 == 2 ? yq.z : yq.w) = yk;
                        if (kk % 4 == 3) reinterpret_cast<float4*>(yrow)[kk / 4] = yq;
                    } else {
                        yp[kk] = yk;
                    }
                }
            }
            buf ^= 1;
            if (WO) {  // y of this lane's 4 steps: the channel's 4 parts added, D u, the gate
                if constexpr (!LEAN) put_row16(yrow, yp);
                __syncwarp();
                const float4 ys = sum_rows4(s_y + (warp * 32 + 4 * c) * 20, j);
                W yv[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    yv[i] = at4(ys, i) + Dd * uu[i];
                    if (z) {
                        const W zz = zc.get(i);
                        yv[i] *= zz * __fdividef(W(1), W(1) + fexp2(zz * W(-1.4426950408889634)));
                    }
                }
                Row4<T>::store(out + row + t0, yv, vec_rows, nv);
            }
        }
    };
    if (out) body(Flag<true>{}, Flag<false>{});
    else if (pend) body(Flag<false>{}, Flag<true>{});
    else body(Flag<false>{}, Flag<false>{});

    if (hend) ln.store4(hend, chan * ln.K + k, h, dstate);
    if (pend) ln.store4(pend, chan * ln.K + k, prod, dstate);
}
