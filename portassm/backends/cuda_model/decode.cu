// MambaLM's decoding step on the cupy backend (portassm/backends/cupy_decode.py): one
// token per sequence through the whole model in 4 kernels a layer, plus the embedding
// lookup and the head.
//
//   in_proj_kernel   RMSNorm of the residual stream, x @ in_proj.T, then for the x half
//                    the depthwise conv of the token (its window is the conv state and
//                    the new value), its bias and SiLU; writes xc, z and the new conv state
//   x_proj_kernel    xc @ x_proj.T -> (dt_low, B, C)
//   scan_gate_kernel dt = softplus(dt_low @ dt_proj.T + dt_bias), one step of the
//                    selective scan, y = (C.h + D xc) * silu(z); writes the new ssm state
//   out_proj_kernel  h += y @ out_proj.T (+ bias), in place
//   head_kernel      final RMSNorm and the tied head: logits = norm(h) @ E.T
//
// At batch 1 to 8 a step reads every weight once and does two flops per weight element:
// the products are matrix-vector products bound by memory bandwidth. Each one is a warp
// per output row (or `split` warps per row, each a slice of the row, for matrices of few
// rows), reading the row with 16-byte loads, the batch's input rows staged in shared
// memory, batches above NB in tiles of NB rows. Weights are row-major (out, in), the
// layout of the checkpoints, so a row is contiguous.
//
// No kernel allocates or synchronises with the host, and the state may be updated in
// place (conv_in == conv_out, s_in == s_out: each element is read and then written by the
// same thread), so the sequence of launches can be captured in a CUDA graph.
#include "common.cuh"

#define DECODE_WARPS 8
#define DECODE_THREADS (DECODE_WARPS * 32)

template <typename T> struct Vec16;
template <> struct __align__(16) Vec16<float> { float v[4]; };
template <> struct __align__(16) Vec16<double> { double v[2]; };

PA_DEV float fsqrt(float x) { return sqrtf(x); }
PA_DEV double fsqrt(double x) { return sqrt(x); }

template <typename T> PA_DEV T warp_sum(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Rows j < nb of xs (NB rows of K) = x[j]; rows nb..NB-1 zero. With `vec` (K a multiple of
// the 16-byte vector, x aligned) in 16-byte loads, several in flight per thread: the rows
// are read from L2 by every block, so this copy is a latency chain unless it is wide.
template <typename T, int NB>
PA_DEV void copy_rows(const T* __restrict__ x, int K, int nb, int vec, T* xs) {
    constexpr int V = 16 / sizeof(T);
    if (vec) {
        const int n = NB * K / V, valid = nb * K / V;
        const Vec16<T>* src = reinterpret_cast<const Vec16<T>*>(x);
        Vec16<T>* dst = reinterpret_cast<Vec16<T>*>(xs);
#pragma unroll 4
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            Vec16<T> v;
            if (i < valid) {
                v = src[i];
            } else {
#pragma unroll
                for (int e = 0; e < V; ++e) v.v[e] = T(0);
            }
            dst[i] = v;
        }
    } else {
#pragma unroll 4
        for (int i = threadIdx.x; i < NB * K; i += blockDim.x) xs[i] = i < nb * K ? x[i] : T(0);
    }
}

// Rows j < nb of xs (NB rows of K) = rms_norm(h[j]) * w; rows nb..NB-1 zero. Ends with the
// block synchronised.
template <typename T, int NB>
PA_DEV void norm_rows(const T* __restrict__ h, const T* __restrict__ w, double eps, int K, int nb, int vec, T* xs) {
    copy_rows<T, NB>(h, K, nb, vec, xs);
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int j = warp; j < nb; j += DECODE_WARPS) {
        T* row = xs + j * K;
        T ss = T(0);
        for (int k = lane; k < K; k += 32) ss += row[k] * row[k];
        ss = warp_sum(ss);
        const T scale = T(1) / fsqrt(ss / T(K) + T(eps));
#pragma unroll 4
        for (int k = lane; k < K; k += 32) row[k] = (row[k] * scale) * w[k];
    }
    __syncthreads();
}

// For each row of W (N rows of K) that this block owns, the dot products with the nb
// staged input rows; epi(row, j, value) receives each, from lane j of the row's first warp.
// `split` (1, 2, 4 or 8) warps share a row, each a contiguous slice of K; their partial
// sums meet in `red` (DECODE_WARPS * NB values of shared memory). `vec`: K is a multiple
// of the 16-byte vector (and the rows are therefore aligned).
template <typename T, int NB, typename Epi>
PA_DEV void tile_gemv(const T* __restrict__ W, int N, int K, const T* xs, int nb, int split, int vec, T* red, Epi epi) {
    constexpr int V = 16 / sizeof(T);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rows_per_block = DECODE_WARPS / split;
    const int part = warp % split, local = warp / split;
    int span = (K + split - 1) / split;
    span = (span + V - 1) / V * V;
    const int k0 = part * span, k1 = min(K, k0 + span);
    for (int base = blockIdx.x * rows_per_block; base < N; base += gridDim.x * rows_per_block) {
        const int row = base + local;
        T acc[NB];
#pragma unroll
        for (int j = 0; j < NB; ++j) acc[j] = T(0);
        if (row < N) {
            const T* w = W + (size_t)row * K;
            if (vec) {
#pragma unroll 4
                for (int k = k0 + lane * V; k < k1; k += 32 * V) {
                    const Vec16<T> wv = *reinterpret_cast<const Vec16<T>*>(w + k);
#pragma unroll
                    for (int j = 0; j < NB; ++j) {
                        const Vec16<T> xv = *reinterpret_cast<const Vec16<T>*>(xs + j * K + k);
#pragma unroll
                        for (int v = 0; v < V; ++v) acc[j] += wv.v[v] * xv.v[v];
                    }
                }
            } else {
                for (int k = k0 + lane; k < k1; k += 32) {
                    const T wk = w[k];
#pragma unroll
                    for (int j = 0; j < NB; ++j) acc[j] += wk * xs[j * K + k];
                }
            }
        }
#pragma unroll
        for (int j = 0; j < NB; ++j) acc[j] = warp_sum(acc[j]);
        if (split > 1) {
            if (lane == 0) {
#pragma unroll
                for (int j = 0; j < NB; ++j) red[warp * NB + j] = acc[j];
            }
            __syncthreads();
            if (part == 0) {
#pragma unroll
                for (int j = 0; j < NB; ++j) {
                    T s = T(0);
                    for (int p = 0; p < split; ++p) s += red[(warp + p) * NB + j];
                    acc[j] = s;
                }
            }
            __syncthreads();
        }
        if (part == 0 && row < N) {
#pragma unroll
            for (int j = 0; j < NB; ++j)
                if (j < nb && lane == j) epi(row, j, acc[j]);
        }
    }
}

// the dynamic shared memory: NB staged input rows of K, then the split warps' partial sums
template <typename T>
PA_DEV T* staged() {
    extern __shared__ __align__(16) unsigned char decode_smem[];
    return reinterpret_cast<T*>(decode_smem);
}

// h[b, :] = E[ids[b], :]
template <typename T>
__global__ void __launch_bounds__(DECODE_THREADS) embed_kernel(
    const long long* __restrict__ ids, const T* __restrict__ E, T* __restrict__ h, int batch, int d_model) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long long)batch * d_model) {
        const int b = (int)(i / d_model), k = (int)(i % d_model);
        h[i] = E[(size_t)ids[b] * d_model + k];
    }
}

// W: in_proj (2 d_inner, d_model); conv_in/out: (batch, d_inner, d_conv - 1); conv_w (d_inner, d_conv);
// xc, z: (batch, d_inner). bias, conv_b may be null.
template <typename T, int NB>
__global__ void __launch_bounds__(DECODE_THREADS) in_proj_kernel(
    const T* __restrict__ h, const T* __restrict__ norm_w, double eps, const T* __restrict__ W,
    const T* __restrict__ bias, const T* conv_in, T* conv_out, const T* __restrict__ conv_w,
    const T* __restrict__ conv_b, T* __restrict__ xc, T* __restrict__ z, int batch, int d_model, int d_inner,
    int d_conv, int split, int vec) {
    T* xs = staged<T>();
    T* red = xs + NB * d_model;
    for (int b0 = 0; b0 < batch; b0 += NB) {
        const int nb = min(NB, batch - b0);
        norm_rows<T, NB>(h + (size_t)b0 * d_model, norm_w, eps, d_model, nb, vec, xs);
        tile_gemv<T, NB>(W, 2 * d_inner, d_model, xs, nb, split, vec, red, [&](int row, int j, T acc) {
            const int b = b0 + j;
            T v = acc;
            if (bias) v += bias[row];
            if (row < d_inner) {
                const int width = d_conv - 1;
                const size_t at = ((size_t)b * d_inner + row) * width;
                const T* cw = conv_w + (size_t)row * d_conv;
                T s = T(0);
                for (int t = 0; t < width; ++t) s += conv_in[at + t] * cw[t];
                s += v * cw[width];
                if (conv_b) s += conv_b[row];
                for (int t = 0; t + 1 < width; ++t) conv_out[at + t] = conv_in[at + t + 1];
                if (width > 0) conv_out[at + width - 1] = v;
                xc[(size_t)b * d_inner + row] = silu(s);
            } else {
                z[(size_t)b * d_inner + row - d_inner] = v;
            }
        });
        __syncthreads();
    }
}

// W: x_proj (rank + 2 dstate, d_inner); xc (batch, d_inner) -> xdbl (batch, rank + 2 dstate)
template <typename T, int NB>
__global__ void __launch_bounds__(DECODE_THREADS) x_proj_kernel(
    const T* __restrict__ xc, const T* __restrict__ W, T* __restrict__ xdbl, int batch, int d_inner, int width,
    int split, int vec) {
    T* xs = staged<T>();
    T* red = xs + NB * d_inner;
    for (int b0 = 0; b0 < batch; b0 += NB) {
        const int nb = min(NB, batch - b0);
        copy_rows<T, NB>(xc + (size_t)b0 * d_inner, d_inner, nb, vec, xs);
        __syncthreads();
        tile_gemv<T, NB>(W, width, d_inner, xs, nb, split, vec, red,
                         [&](int row, int j, T acc) { xdbl[(size_t)(b0 + j) * width + row] = acc; });
        __syncthreads();
    }
}

// nl lanes (a power of two, at most 32) per channel (b, c), lane l owning states l, l + nl, ...
// dt_w: dt_proj (d_inner, rank); A = -exp(A_log) (d_inner, dstate); s_in/s_out (batch, d_inner, dstate).
template <typename T>
__global__ void __launch_bounds__(DECODE_THREADS) scan_gate_kernel(
    const T* __restrict__ xdbl, const T* __restrict__ dt_w, const T* __restrict__ dt_b, const T* __restrict__ A,
    const T* __restrict__ Dp, const T* __restrict__ xc, const T* __restrict__ z, const T* s_in, T* s_out,
    T* __restrict__ y, int batch, int d_inner, int rank, int dstate, int nl) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int lane = (int)(i % nl);
    const long long ch = i / nl;
    const bool valid = ch < (long long)batch * d_inner;
    const int b = valid ? (int)(ch / d_inner) : 0, c = valid ? (int)(ch % d_inner) : 0;
    const T* xd = xdbl + (size_t)b * (rank + 2 * dstate);
    T dt = T(0);
    if (valid)
        for (int r = lane; r < rank; r += nl) dt += xd[r] * dt_w[(size_t)c * rank + r];
    for (int o = nl / 2; o > 0; o >>= 1) dt += __shfl_xor_sync(0xffffffffu, dt, o, nl);
    T acc = T(0), xv = T(0);
    if (valid) {
        if (dt_b) dt += dt_b[c];
        dt = softplus(dt);
        xv = xc[ch];
        for (int n = lane; n < dstate; n += nl) {
            const T An = A[(size_t)c * dstate + n];
            const T abar = fexp2(dt * (An * T(1.4426950408889634)));
            const T hn = abar * s_in[ch * dstate + n] + dt * xd[rank + n] * xv;
            s_out[ch * dstate + n] = hn;
            acc += xd[rank + dstate + n] * hn;
        }
    }
    for (int o = nl / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o, nl);
    if (valid && lane == 0) {
        acc += Dp[c] * xv;
        acc *= silu(z[ch]);
        y[ch] = acc;
    }
}

// W: out_proj (d_model, d_inner); h (batch, d_model) += y @ W.T (+ bias)
template <typename T, int NB>
__global__ void __launch_bounds__(DECODE_THREADS) out_proj_kernel(
    const T* __restrict__ y, const T* __restrict__ W, const T* __restrict__ bias, T* __restrict__ h, int batch,
    int d_inner, int d_model, int split, int vec) {
    T* xs = staged<T>();
    T* red = xs + NB * d_inner;
    for (int b0 = 0; b0 < batch; b0 += NB) {
        const int nb = min(NB, batch - b0);
        copy_rows<T, NB>(y + (size_t)b0 * d_inner, d_inner, nb, vec, xs);
        __syncthreads();
        tile_gemv<T, NB>(W, d_model, d_inner, xs, nb, split, vec, red, [&](int row, int j, T acc) {
            const size_t at = (size_t)(b0 + j) * d_model + row;
            h[at] = h[at] + (bias ? acc + bias[row] : acc);
        });
        __syncthreads();
    }
}

// E: (vocab, d_model); logits (batch, vocab) = rms_norm(h) * norm_w @ E.T
template <typename T, int NB>
__global__ void __launch_bounds__(DECODE_THREADS) head_kernel(
    const T* __restrict__ h, const T* __restrict__ norm_w, double eps, const T* __restrict__ E,
    T* __restrict__ logits, int batch, int d_model, int vocab, int split, int vec) {
    T* xs = staged<T>();
    T* red = xs + NB * d_model;
    for (int b0 = 0; b0 < batch; b0 += NB) {
        const int nb = min(NB, batch - b0);
        norm_rows<T, NB>(h + (size_t)b0 * d_model, norm_w, eps, d_model, nb, vec, xs);
        tile_gemv<T, NB>(E, vocab, d_model, xs, nb, split, vec, red,
                         [&](int row, int j, T acc) { logits[(size_t)(b0 + j) * vocab + row] = acc; });
        __syncthreads();
    }
}
