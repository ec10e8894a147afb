"""SpQR decode products with one weight row per ``mma`` column: the octet layout and its CUDA kernels.

Why a second CUDA layout next to :mod:`kernels.spqr_cuda`: that kernel puts the *weights* in the ``mma.m16n8k16`` A
operand (16 weight rows x 16 columns per tile), so each lane holds weights of two rows and four column pairs and
decodes the scale and zero-point of both rows for every eight weights, three quarters of it redundantly; in bf16 it
also converts every decoded pair. Counted in its SASS, 276 warp instructions per 1,024 weights, and the H200 ran it
latency-bound at 0.67-0.79x bf16 at batch 1 (``benchmarks/results/spqr_speed_breakdown.md``: the loads alone would
be 2.0-2.2x).

Here the *activations* are the A operand (up to 16 rows, the ``m16`` side) and the weights the B operand: a warp
owns 8 weight rows (an *octet*, the ``n8`` side) and steps through the input dimension 64 columns at a time. Lane
``(g, t)`` (``g = lane / 4``, ``t = lane % 4``) owns row ``g`` of the octet and the 16 columns ``16 t .. 16 t + 15``
of the step, exactly one first-level group of 16: it decodes that group's statistics once and its 16 weights into
the B fragments of the step's four ``mma``: the ``mma`` k-slots of lane ``t`` are relabelled to its own columns
(k-slots ``2t, 2t+1`` of mma ``i`` are columns ``4i, 4i+1`` of its slice and ``2t+8, 2t+9`` are ``4i+2, 4i+3``), and
the A fragments read the activations at the same columns, which in row-major order are four consecutive values:
one 8-byte shared-memory load per ``mma`` and activation half.

Both activation dtypes run the ``mma`` in fp16: the activations are gathered by the permutation into shared memory,
each row scaled by a power of two so that its largest magnitude lies in [2^13, 2^14) (exact, and far from the fp16
limits), and the products are rescaled in fp32 at the end. So the weights are decoded in fp16 arithmetic only, with
no conversion: per pair one LOP3 (code into the mantissa of 1024), one HADD2 (minus 1024) and one HFMA2
(``q * s + (-z * s)``); the odd pairs are taken at 16x their code without a shift and use ``s / 16``.

Layout (:func:`octet_layout`, from the packed format; ``group_size`` and ``stats_group_size`` multiples of 16,
``bits`` and ``stats_bits`` at most 4, ``in_features`` at most 65,536):

* ``codes`` int32 ``[octet][step][lane][2]``: word ``h`` holds columns ``8 h .. 8 h + 7`` of the lane's slice,
  column ``c`` at bits ``4 (c / 2) + 16 (c % 2)`` (within the word); a warp reads 256 contiguous bytes per step.
* ``stats`` uint8 ``[octet][step][lane]``: ``scale code | zero code << 4`` of the lane's (row, group).
* ``stats2`` fp16 ``[16-row block][step][t][4]``: scale step, zero step, scale minimum, zero minimum (so that one
  ``fma.f16x2`` decodes both statistics).
* outliers in CSR order: ``oent`` int32 ``column | fp16 correction << 16``, ``optr`` int32 row offsets; and for
  the prefill path ``ov``/``orow``/``oc`` as in ``cuda_layout``.

Bytes per weight: 4 + 0.5 + 0.25 bits, plus 4 bytes per outlier and 4 per row read by the decode kernel.

The decode kernel ``spqr_octet_gemv``: a block of ``W`` warps gathers and scales the activations once, then handles
``W / P`` octets per round, ``P`` warps splitting each octet's steps (each warp keeps ``D`` steps of loads in flight
in registers); at the end of a round each warp stores its fragment sums plus its share of the octet's outliers in
its own shared-memory slot and the block adds the slots and writes the rows. The dequantization kernel ``spqr_octet_dequant`` writes the dense
weight for the prefill path.

The PyTorch reference of the same function is :func:`kernels.spqr.spqr_matmul_reference`.

Example:
    >>> lay = octet_layout(layer.packed_tensors(), **layer.packed_meta())  # doctest: +SKIP
    >>> y = spqr_octet_gemv(x, lay, bias=layer.bias)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from hf_effllm.errors import HfEffllmError

from .cuda_rt import cdiv, compiled, launch, on_device, render, sm_count, smem_limit

__all__ = [
    "MAX_ROWS",
    "octet_layout",
    "octet_source",
    "octet_supported",
    "rows_per_launch",
    "spqr_octet_dequant",
    "spqr_octet_gemv",
]

MAX_ROWS = 16  # activation rows of one launch: the m16 side of the mma
_STATIC_SMEM = 3 * 16 * 4  # the kernel's static shared memory: rmax, rscale, rinv
_SMEM_SET: dict[int, int] = {}  # dynamic shared memory each compiled kernel has opted in to

_SOURCE = r"""
#define W_ {W}                 // warps per block
#define P_ {P}                 // warps per octet (they split its steps); divides W_
#define D_ {D}                 // steps of loads each warp keeps in flight
#define HI {HI}                // activation rows 8..15 present (the a1, a3 registers of the A fragment)
#define ACT_BF16 {BF16}        // activation dtype (in and out); the mma is always fp16
#define IS_BF16 0
//@COMMON

#define O_ (W_ / P_)           // octets per round
#define MAGIC 0x64006400u      // 1024.0 in both halves: a code in the low mantissa bits gives 1024 + code
#define NEG_MAGIC 0xE400E400u  // -1024.0 in both halves
#define ONE2 0x3C003C00u
#define SIXTEENTH2 0x2C002C00u // 1/16 in both halves

__device__ __forceinline__ u32 hadd2(u32 a, u32 b) {
    u32 d;
    asm("add.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
    u32 d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

__device__ __forceinline__ u16 half_from_f(float f) {
    u16 v;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
    return v;
}

__device__ __forceinline__ uint2 ld_stream2(const void* p) {  // read once: do not keep in L1
    uint2 v;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

__device__ __forceinline__ u32 ld_stream_u8(const u8* p) {
    u32 v;
    asm volatile("ld.global.nc.L1::no_allocate.u8 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

// (w & mask) | MAGIC in one LOP3 (both constants as immediates: the compiler otherwise splits it in two)
#define LOP_MAGIC(D, W, MASK) asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(D) : "r"(W), "n"(MASK), "n"(MAGIC))

// the B fragments of the four mma of one step: b[i][0] = columns (4i, 4i+1), b[i][1] = (4i+2, 4i+3) of the lane's
// slice, decoded from code words cw (columns 0-7, 8-15), statistics byte sb and second-level pair s2
__device__ __forceinline__ void decode_step(u32 (*b)[2], uint2 cw, u32 sb, uint2 s2) {
    u32 v;
    LOP_MAGIC(v, sb * 4097u, 0x000F000Fu);                      // {1024 + scale code, 1024 + zero code}
    const u32 sz = hfma2(hadd2(v, NEG_MAGIC), s2.x, s2.y);       // {s, z} = code * step + minimum
    const u32 ss = prmt(sz, 0, 0x1010), zz = prmt(sz, 0, 0x3232);
    const u32 cc = hfma2(zz, ss ^ 0x80008000u, 0u);             // {-z s, -z s}
    const u32 ss16 = hmul2(ss, SIXTEENTH2);                     // exact: a power of two
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const u32 w = h ? cw.y : cw.x, w8 = w >> 8;
        u32 e0, e1, e2, e3;
        LOP_MAGIC(e0, w, 0x000F000Fu);   // columns 8h + 0, 1
        LOP_MAGIC(e1, w, 0x00F000F0u);   // 8h + 2, 3 (16 q)
        LOP_MAGIC(e2, w8, 0x000F000Fu);  // 8h + 4, 5
        LOP_MAGIC(e3, w8, 0x00F000F0u);  // 8h + 6, 7 (16 q)
        b[2 * h][0] = hfma2(hadd2(e0, NEG_MAGIC), ss, cc);
        b[2 * h][1] = hfma2(hadd2(e1, NEG_MAGIC), ss16, cc);
        b[2 * h + 1][0] = hfma2(hadd2(e2, NEG_MAGIC), ss, cc);
        b[2 * h + 1][1] = hfma2(hadd2(e3, NEG_MAGIC), ss16, cc);
    }
}

__device__ __forceinline__ void mma_f16(float* c, uint4 a, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

// the activations in shared memory: row pair p (rows p and p + 8) holds, per step s, mma q and lane column t, the
// A fragment {x[p][c, c+1], x[p+8][c, c+1], x[p][c+2, c+3], x[p+8][c+2, c+3]} (c = 64 s + 16 t + 4 q) as 16
// bytes at (s * 16 + q * 4 + t) * 16: the four lanes t of a row read 64 contiguous bytes. Row pairs are
// RSB = 4 KP + 64 bytes apart (conflict-free for two pairs per quarter-warp). Half index of (row m, column c):
__device__ __forceinline__ int xs_index(int m, int c, int RSB) {
    const int s = c >> 6, t = (c >> 4) & 3, q = (c >> 2) & 3, e = (c >> 1) & 1;
    return (m & 7) * (RSB >> 1) + ((s * 16 + q * 4 + t) * 4 + e * 2 + (m >> 3)) * 2 + (c & 1);
}

// the outliers of weight row `row` (CSR [o0, o1)) that lane c (of 4 per row) of warp part `part` takes: the row's
// list split into P_ contiguous chunks, a lane's entries 4 apart in its warp's chunk
#define OUT_RANGE(o0, o1, part, c, first, last)                                                    \
    const int len_ = (o1) - (o0);                                                                  \
    const int first = (o0) + (int)(((long long)len_ * (part)) / P_) + (c);                         \
    const int last = (o0) + (int)(((long long)len_ * ((part) + 1)) / P_);

// y (M, N) = x (M, K) W^T (+ bias), M <= 16. Block: W_ warps; the activations in shared memory as above (gathered by
// perm, row m scaled by 2^e[m]); round r handles octets (blockIdx.x + r gridDim.x) O_ + slot, warp w = slot P_ +
// part taking steps part, part + P_, ... of its octet (NS per round for every warp, the ones past KS empty, so all
// warps reach the round's barriers together). Lanes whose activation rows are absent read row pair 0: their
// fragment rows of C are never written. At the end of a round each warp stores its fragment sums plus its share of
// the octet's outliers in its own slot of red (no shared-memory atomics: fp32 ones are compare-and-swap loops on
// sm_90) and the block adds the P_ slots of each octet.
extern "C" __global__ void __launch_bounds__(W_ * 32) spqr_octet_gemv(
    const u16* __restrict__ x, const int* __restrict__ perm, const uint2* __restrict__ codes,
    const u8* __restrict__ stats, const uint2* __restrict__ stats2, const u32* __restrict__ oent,
    const int* __restrict__ optr, const u16* __restrict__ bias, u16* __restrict__ y, int M, int N, int K, int KS,
    int NO, int sx, int sy) {
    extern __shared__ __align__(16) char smem[];
    const int KP = KS * 64, RSB = KP * 4 + 64, PR = M < 8 ? M : 8;
    u16* xs = (u16*)smem;                                        // PR row pairs of RSB bytes
    float* red = (float*)(smem + PR * RSB);                      // [W_][8][M]
    __shared__ float rmax[16];
    __shared__ float rscale[16];
    __shared__ float rinv[16];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int slot = warp / P_, part = warp % P_;
    const int NS = (KS + P_ - 1) / P_;                           // steps per warp and round
    const int groups = (NO + O_ - 1) / O_;
    const int rounds = (groups - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x;
    const int total = rounds * NS;
    const int ostride = (int)gridDim.x * O_;                     // octets from one round to the next
    const int orow = lane & 7, oc = lane >> 3;                   // outliers: weight row of the octet, lane of 4

    // the load stream runs D_ steps ahead of the compute stream; the first D_ go out before the gather
    uint2 bcw[D_], bs2[D_];
    u32 bsb[D_];
    int l_i = 0, l_j = 0, l_oct = (int)blockIdx.x * O_ + slot, l_s = part;
    const uint2* l_cp;
    const u8* l_sp;
    const uint2* l_s2p;
#define LPTR()                                                                                     \
    {                                                                                              \
        const long long it_ = (long long)l_oct * KS + l_s;                                         \
        l_cp = codes + it_ * 32 + lane;                                                            \
        l_sp = stats + it_ * 32 + lane;                                                            \
        l_s2p = stats2 + ((long long)(l_oct >> 1) * KS + l_s) * 4 + t;                             \
    }
    LPTR();
#define LOAD(U)                                                                                    \
    {                                                                                              \
        if (l_i < total && l_oct < NO && l_s < KS) {                                               \
            bcw[U] = ld_stream2(l_cp);                                                             \
            bsb[U] = ld_stream_u8(l_sp);                                                           \
            bs2[U] = *l_s2p;                                                                       \
        }                                                                                          \
        ++l_i;                                                                                     \
        l_s += P_;                                                                                 \
        l_cp += P_ * 32;                                                                           \
        l_sp += P_ * 32;                                                                           \
        l_s2p += P_ * 4;                                                                           \
        if (++l_j == NS) {                                                                         \
            l_j = 0;                                                                               \
            l_s = part;                                                                            \
            l_oct += ostride;                                                                      \
            LPTR();                                                                                \
        }                                                                                          \
    }
#pragma unroll
    for (int u = 0; u < D_; ++u) LOAD(u);
    // this round's outlier range and first two entries of this lane, loaded a round ahead
    int o_next0 = 0, o_next1 = 0;
    u32 e_next[2] = {0u, 0u};
    float b_next = 0.f;  // the bias of this thread's first output of the round
#define OUT_PREFETCH(OCT)                                                                          \
    {                                                                                              \
        const int row_ = (OCT) * 8 + orow;                                                         \
        o_next0 = o_next1 = 0;                                                                     \
        if ((OCT) < NO && row_ < N) {                                                              \
            o_next0 = optr[row_];                                                                  \
            o_next1 = optr[row_ + 1];                                                              \
            OUT_RANGE(o_next0, o_next1, part, oc, f_, l_)                                          \
            if (f_ < l_) e_next[0] = oent[f_];                                                     \
            if (f_ + 4 < l_) e_next[1] = oent[f_ + 4];                                             \
        }                                                                                          \
        const int brow_ = ((OCT) - slot) * 8 + ((int)threadIdx.x % (8 * M)) / M +                  \
                          ((int)threadIdx.x / (8 * M)) * 8;                                        \
        b_next = 0.f;                                                                              \
        if (bias && (int)threadIdx.x < O_ * 8 * M && brow_ < N) b_next = act_f(bias[brow_]);      \
    }
    OUT_PREFETCH((int)blockIdx.x * O_ + slot);

    if (threadIdx.x < 16) rmax[threadIdx.x] = 0.f;
    __syncthreads();
    for (int m = 0; m < M; ++m) {
        float mx = 0.f;
        for (int k = threadIdx.x; k < KP; k += W_ * 32) {
            u16 v = 0;
            if (k < K) v = x[(long long)m * sx + (perm ? perm[k] : k)];
            xs[xs_index(m, k, RSB)] = v;
            mx = fmaxf(mx, fabsf(act_f(v)));
        }
#pragma unroll
        for (int off = 16; off; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        if (lane == 0) atomicMax((int*)&rmax[m], __float_as_int(mx));  // non-negative: int order is float order
    }
    __syncthreads();
    if (threadIdx.x < M) {  // row m scaled by 2^e so that its largest magnitude lies in [2^13, 2^14)
        const float mx = rmax[threadIdx.x];
        int e = 0;
        if (mx > 0.f && mx <= 3.0e38f) {
            int ex;
            frexpf(mx, &ex);
            e = min(max(14 - ex, -120), 120);
        }
        rscale[threadIdx.x] = ldexpf(1.f, e);
        rinv[threadIdx.x] = ldexpf(1.f, -e);
    }
    __syncthreads();
    for (int m = 0; m < M; ++m) {
        const float sc = rscale[m];
        for (int k = threadIdx.x; k < KP; k += W_ * 32) {
            const int ix = xs_index(m, k, RSB);
            xs[ix] = half_from_f(act_f(xs[ix]) * sc);
        }
    }
    __syncthreads();

    const char* xlane = smem + (g < PR ? g : 0) * RSB + t * 16;
    float* wred = red + warp * 8 * M;  // this warp's slot: [8 weight rows][M]
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    int c_j = 0, c_oct = (int)blockIdx.x * O_ + slot, c_s = part;
    for (int i0 = 0; i0 < total; i0 += D_) {
#pragma unroll
        for (int u = 0; u < D_; ++u) {
            if (i0 + u >= total) break;  // block-uniform
            if (c_oct < NO && c_s < KS) {
                u32 b[4][2];
                decode_step(b, bcw[u], bsb[u], bs2[u]);
                const uint4* xp = (const uint4*)(xlane + c_s * 256);
#pragma unroll
                for (int q = 0; q < 4; ++q) mma_f16(acc, xp[q * 4], b[q][0], b[q][1]);
            }
            LOAD(u);
            if (c_j != NS - 1) {
                ++c_j;
                c_s += P_;
                continue;
            }
            // the round's last step. C fragment: c0 = (activation row g, weight row 2t), c1 = (g, 2t + 1), c2/c3
            // the same for activation row g + 8
            if (g < M) {
                wred[(2 * t) * M + g] = acc[0];
                wred[(2 * t + 1) * M + g] = acc[1];
            }
            if (g + 8 < M) {
                wred[(2 * t) * M + g + 8] = acc[2];
                wred[(2 * t + 1) * M + g + 8] = acc[3];
            }
            acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
            // outliers of row orow: below 4 activation rows the 4 lanes of a row split its entries, from 4 rows up
            // they split the activation rows (lane oc takes m = oc, oc + 4, ...)
            const int o0 = o_next0, o1 = o_next1;
            const u32 e0 = e_next[0], e1 = e_next[1];
            const float bfirst = b_next;
            OUT_PREFETCH(c_oct + ostride);
            __syncwarp();
            if (c_oct < NO) {
                if (M < 4) {
                    float os[3] = {0.f, 0.f, 0.f};
                    OUT_RANGE(o0, o1, part, oc, f, l)
                    for (int o = f; o < l; o += 4) {
                        const u32 ent = o == f ? e0 : o == f + 4 ? e1 : oent[o];
                        const int col = ent & 0xFFFFu;
                        const float v = half_f((u16)(ent >> 16));
#pragma unroll
                        for (int m = 0; m < 3; ++m)
                            if (m < M) os[m] = fmaf(v, half_f(xs[xs_index(m, col, RSB)]), os[m]);
                    }
#pragma unroll
                    for (int m = 0; m < 3; ++m) {
                        os[m] += __shfl_xor_sync(0xffffffffu, os[m], 8);
                        os[m] += __shfl_xor_sync(0xffffffffu, os[m], 16);
                        if (m < M && oc == 0) wred[orow * M + m] += os[m];
                    }
                } else {
                    float os[4] = {0.f, 0.f, 0.f, 0.f};
                    OUT_RANGE(o0, o1, part, 0, f, l)
                    for (int o = f; o < l; ++o) {
                        const u32 ent = oent[o];
                        const int col = ent & 0xFFFFu;
                        const float v = half_f((u16)(ent >> 16));
#pragma unroll
                        for (int mi = 0; mi < 4; ++mi) {
                            const int m = oc + 4 * mi;
                            if (m < M) os[mi] = fmaf(v, half_f(xs[xs_index(m, col, RSB)]), os[mi]);
                        }
                    }
#pragma unroll
                    for (int mi = 0; mi < 4; ++mi)
                        if (oc + 4 * mi < M) wred[orow * M + oc + 4 * mi] += os[mi];
                }
            }
            __syncthreads();
            const int base = (c_oct - slot) * 8;  // first weight row of the round
            for (int e = threadIdx.x; e < O_ * 8 * M; e += W_ * 32) {
                const int sl = e / (8 * M), rem = e % (8 * M);
                const int row = base + sl * 8 + rem / M, m = rem % M;
                if (row < N) {
                    float val = 0.f;
                    for (int p = 0; p < P_; ++p) val += red[(sl * P_ + p) * 8 * M + rem];
                    val *= rinv[m];
                    if (bias) val += e == (int)threadIdx.x ? bfirst : act_f(bias[row]);
                    y[(long long)m * sy + row] = act_from_f(val);
                }
            }
            __syncthreads();
            c_j = 0;
            c_s = part;
            c_oct += ostride;
        }
    }
}

// the dense weight (N, K) in stored column order and the activation dtype, outliers not added: one warp per step
extern "C" __global__ void spqr_octet_dequant(const uint2* __restrict__ codes, const u8* __restrict__ stats,
                                              const uint2* __restrict__ stats2, u32* __restrict__ out, int N,
                                              int K, int KS, int NO) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const long long it = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (it >= (long long)NO * KS) return;
    const int oct = (int)(it / KS), s = (int)(it % KS);
    u32 b[4][2];
    decode_step(b, codes[it * 32 + lane], stats[it * 32 + lane], stats2[((long long)(oct >> 1) * KS + s) * 4 + t]);
    const int row = oct * 8 + g, col0 = s * 64 + 16 * t;
    if (row >= N) return;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int col = col0 + 4 * q + 2 * h;
            const u32 v = to_act2(b[q][h]);
            if (col < K) out[((long long)row * K + col) >> 1] = v;  // K is even: a pair never straddles the end
        }
    }
}
"""


def octet_source(*, warps: int, per_octet: int, depth: int, hi: bool, bf16: bool) -> str:
    """The CUDA source of both kernels: ``warps`` per block, ``per_octet`` warps splitting each octet's steps
    (divides ``warps``), ``depth`` steps of loads in flight per warp, ``hi`` (activation rows 8-15 present) and the
    activation dtype."""
    return render(_SOURCE, W=warps, P=per_octet, D=depth, HI=hi, BF16=bf16)


def octet_supported(
    *, in_features: int, bits: int, group_size: int, stats_bits: int, stats_group_size: int, **_: Any
) -> str | None:
    """None when :func:`octet_layout` takes this format, else the reason it does not."""
    if bits > 4:
        return f"bits={bits}; the octet kernels take at most 4 (4-bit code lanes)"
    if stats_bits > 4:
        return f"stats_bits={stats_bits}; the octet kernels take at most 4"
    if group_size % 16 or stats_group_size % 16:
        return (
            f"group_size={group_size}, stats_group_size={stats_group_size}; the octet kernels need multiples of 16 "
            f"(one 16-column slice per lane and step)"
        )
    if in_features % 2:
        return f"in_features={in_features} is odd; the octet kernels take an even number"
    if in_features > 65536:
        return f"in_features={in_features}; the octet kernels take at most 65536 (16-bit outlier columns)"
    return None


def octet_layout(
    tensors: dict[str, torch.Tensor],
    *,
    in_features: int,
    bits: int,
    group_size: int,
    stats_bits: int,
    stats_group_size: int,
    **_: Any,
) -> dict[str, Any]:
    """Re-lay a layer's packed tensors out for the octet kernels (see the module docstring for the layout).

    Works on any device (the tests check it on the CPU against the format's own dequantization)."""
    from .spqr import outlier_index, unpack_codes  # kernels.spqr imports this module
    from .spqr_cuda import _recenter_outliers

    reason = octet_supported(
        in_features=in_features,
        bits=bits,
        group_size=group_size,
        stats_bits=stats_bits,
        stats_group_size=stats_group_size,
    )
    if reason is not None:
        raise HfEffllmError(f"the SpQR octet layout does not take this format: {reason}.")
    dev = tensors["qweight"].device
    ptr = tensors["outlier_row_ptr"]
    n = ptr.shape[0] - 1
    k = in_features
    g = cdiv(k, group_size)
    no, ks = cdiv(n, 8), cdiv(k, 64)
    no16 = cdiv(n, 16)
    np_, kp = no16 * 16, ks * 64
    codes, sc, zc = unpack_codes(tensors, n, k, g, bits, stats_bits)
    orow, cols, _ = outlier_index(tensors)
    codes, ov = _recenter_outliers(
        codes, sc, zc, tensors["stats2"], orow, cols, tensors["outlier_values"], bits, group_size, stats_group_size
    )
    c = torch.zeros(np_, kp, dtype=torch.int64, device=dev)
    c[:n, :k] = codes
    # (octet, g, step, t, word h, pair, odd) -> (octet, step, g, t, h, pair, odd); column 16 t + 8 h + 2 pair + odd
    c = c.reshape(no16 * 2, 8, ks, 4, 2, 4, 2).permute(0, 2, 1, 3, 4, 5, 6)[:no]
    shifts = 4 * torch.arange(4, device=dev)[:, None] + 16 * torch.arange(2, device=dev)[None, :]
    words = (c << shifts).sum((-1, -2))  # octet, step, g, t, h
    codes_l = ((words + 2**31) % 2**32 - 2**31).to(torch.int32).contiguous()
    # statistics per (row, 16-column slice): the group of slice j is 16 j // group_size
    scol = torch.arange(ks * 4, device=dev) * 16
    grp = (scol // group_size).clamp_max(g - 1)
    valid = scol < k
    byte = torch.zeros(np_, ks * 4, dtype=torch.int64, device=dev)
    byte[:n] = ((sc | (zc << 4)).to(torch.int64)[:, grp]) * valid
    stats_l = byte.reshape(no16 * 2, 8, ks, 4).permute(0, 2, 1, 3)[:no].to(torch.uint8).contiguous()
    s2 = tensors["stats2"]  # (out2, G, 4) fp16: scale step, scale minimum, zero step, zero minimum
    rows2 = (torch.arange(no16, device=dev) * 16 // stats_group_size).clamp_max(s2.shape[0] - 1)
    st2 = s2[rows2][:, grp][..., [0, 2, 1, 3]] * valid[None, :, None]  # (16-row block, slice, 4)
    stats2_l = st2.reshape(no16, ks, 4, 4).to(torch.float16).contiguous()
    ov_bits = ov.view(torch.int16).to(torch.int64) & 0xFFFF
    ent = cols | (ov_bits << 16)
    perm = tensors.get("perm")
    layout: dict[str, Any] = {
        "codes": codes_l.reshape(-1),
        "stats": stats_l.reshape(-1),
        "stats2": stats2_l.reshape(-1),
        "n": n,
        "k": k,
        "ks": ks,
        "no": no,
        "oent": ((ent + 2**31) % 2**32 - 2**31).to(torch.int32),
        "optr": ptr.to(torch.int32),
        "ov": ov,
        "oc": cols.to(torch.int32),
        "orow": orow.to(torch.int32),
    }
    if perm is not None:
        layout["perm"] = perm.to(torch.int32)
        layout["perm_long"] = perm.long()
        layout["perm_inv"] = torch.argsort(layout["perm_long"])  # stored column of each original column
    return layout


def smem_bytes(rows: int, steps: int, warps: int, per_octet: int) -> int:
    """Dynamic shared memory of a ``spqr_octet_gemv`` block: the activations (``min(rows, 8)`` row pairs of
    ``256 steps + 64`` bytes: each row pair holds two rows' A fragments) and the round's sums (``warps /
    per_octet`` octets x 8 x ``rows`` fp32 for each of their ``per_octet`` warps)."""
    return min(rows, 8) * (steps * 256 + 64) + warps * 8 * rows * 4


def rows_per_launch(k: int, device: torch.device, warps: int = 16, per_octet: int = 16) -> int:
    """The most activation rows (<= 16) whose shared memory fits one block on ``device``."""
    return _rows_per_launch(cdiv(k, 64), smem_limit(device) - _STATIC_SMEM, warps, per_octet)


@functools.cache
def _rows_per_launch(steps: int, limit: int, warps: int, per_octet: int) -> int:  # asked on every decode call
    for rows in range(MAX_ROWS, 0, -1):
        if smem_bytes(rows, steps, warps, per_octet) <= limit:
            return rows
    return 0


def default_launch(rows: int, octets: int, steps: int, device: torch.device) -> tuple[int, int, int, int]:
    """``(warps, per_octet, depth, blocks per SM)`` of :func:`spqr_octet_gemv`: 16 warps, 4 per octet, 4 steps in
    flight, one block per SM, the fastest launch of the H200 sweep at 1, 4 and 16 rows on 7 of the 9 shapes of
    ``benchmarks/results/spqr_speed_octet.md``."""
    return 16, 4, 4, 1


def _check(x: torch.Tensor, layout: dict[str, Any]) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise HfEffllmError(f"x.dtype={x.dtype} is not supported by the SpQR octet kernels; use float16 or bfloat16.")
    if x.shape[-1] != layout["k"]:
        raise HfEffllmError(f"x has {x.shape[-1]} features in its last dimension; this layer expects {layout['k']}.")
    if layout["codes"].device != x.device:
        raise HfEffllmError(
            f"the octet layout is on {layout['codes'].device} but x is on {x.device}; rebuild it with octet_layout()."
        )


def spqr_octet_gemv(
    x: torch.Tensor,
    layout: dict[str, Any],
    *,
    bias: torch.Tensor | None = None,
    warps: int | None = None,
    per_octet: int | None = None,
    depth: int | None = None,
    blocks_per_sm: int | None = None,
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for at most 16 rows of activations (the decode path), W in :func:`octet_layout`.

    Args:
        x: (..., in_features) float16 or bfloat16 on the layout's GPU, at most 16 rows in total (one launch per
            :func:`rows_per_launch` rows: their activations must fit one block's shared memory).
        layout: the layer's :func:`octet_layout`.
        bias: optional (out_features,) bias (cast to ``x.dtype``).
        warps: warps per block (1-32).
        per_octet: warps splitting each octet's steps (divides ``warps``).
        depth: steps of loads each warp keeps in flight (1-8).
        blocks_per_sm: resident blocks per SM the grid is sized for.
        (``None``: :func:`default_launch`.)

    Returns:
        (..., out_features) in ``x.dtype``.
    """
    _check(x, layout)
    n, k, ks, no = layout["n"], layout["k"], layout["ks"], layout["no"]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > MAX_ROWS:
        raise HfEffllmError(f"x has {m} rows; spqr_octet_gemv takes at most {MAX_ROWS}.")
    w0, p0, d0, b0 = default_launch(m, no, ks, x.device)
    warps = w0 if warps is None else warps
    per_octet = p0 if per_octet is None else per_octet
    depth = d0 if depth is None else depth
    blocks_per_sm = b0 if blocks_per_sm is None else blocks_per_sm
    if not 1 <= warps <= 32:
        raise HfEffllmError(f"warps={warps} is out of range; use 1 to 32.")
    if per_octet < 1 or warps % per_octet:
        raise HfEffllmError(f"per_octet={per_octet} must divide warps={warps}.")
    if not 1 <= depth <= 8:
        raise HfEffllmError(f"depth={depth} is out of range; use 1 to 8.")
    if blocks_per_sm < 1:
        raise HfEffllmError(f"blocks_per_sm={blocks_per_sm} must be >= 1.")
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    if bias is not None:
        if bias.shape != (n,):
            raise HfEffllmError(f"bias has shape {tuple(bias.shape)}; expected ({n},).")
        bias = bias.to(x.dtype).contiguous()
    per_launch = rows_per_launch(k, x.device, warps, per_octet)
    if per_launch == 0:
        raise HfEffllmError(
            f"one activation row of {k} features does not fit one block's shared memory on this GPU; use the Triton "
            f"kernels (variant='v2')."
        )
    bf16 = x.dtype == torch.bfloat16
    groups = cdiv(no, warps // per_octet)
    grid = min(groups, blocks_per_sm * sm_count(x.device))
    with on_device(x.device):
        for m0 in range(0, m, per_launch):  # rows beyond one block's shared memory: one launch per slice
            mc = min(per_launch, m - m0)
            smem = smem_bytes(mc, ks, warps, per_octet)
            hi = mc > 8
            key = ("spqr_octet", warps, per_octet, depth, hi, bf16)

            def source(hi: bool = hi) -> str:
                return octet_source(warps=warps, per_octet=per_octet, depth=depth, hi=hi, bf16=bf16)

            gemv = compiled(key, x.device, source, "spqr_octet_gemv")
            need = max(smem, 48 * 1024) if smem + _STATIC_SMEM > 48 * 1024 else 0
            if need > _SMEM_SET.get(id(gemv), 0):
                gemv.set_shared_memory_config(need)
                _SMEM_SET[id(gemv)] = need
            launch(
                gemv, (grid, 1, 1), warps * 32, smem,
                [x2[m0:], layout.get("perm"), layout["codes"], layout["stats"], layout["stats2"], layout["oent"],
                 layout["optr"], bias, y[m0:]],
                [mc, n, k, ks, no, x2.stride(0), y.stride(0)],
            )  # fmt: skip
    return y.reshape(*lead, n)


def spqr_octet_dequant(layout: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """The dense weight (out, in) in stored column order and ``dtype`` (float16 or bfloat16), outliers added."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise HfEffllmError(f"dtype={dtype} is not supported by the SpQR octet kernels; use float16 or bfloat16.")
    n, k, ks, no = layout["n"], layout["k"], layout["ks"], layout["no"]
    dev = layout["codes"].device
    w = torch.empty(n, k, device=dev, dtype=dtype)
    if n == 0 or k == 0:
        return w
    bf16 = dtype == torch.bfloat16
    key = ("spqr_octet", 1, 1, 1, False, bf16)

    def source() -> str:
        return octet_source(warps=1, per_octet=1, depth=1, hi=False, bf16=bf16)

    with on_device(dev):
        kern = compiled(key, dev, source, "spqr_octet_dequant")
        per_block = 8
        launch(
            kern, (cdiv(no * ks, per_block), 1, 1), per_block * 32, 0,
            [layout["codes"], layout["stats"], layout["stats2"], w], [n, k, ks, no],
        )  # fmt: skip
    if layout["ov"].numel():
        w.index_put_((layout["orow"], layout["oc"]), layout["ov"].to(dtype), accumulate=True)
    return w
