"""SpQR matrix-vector / small matrix products as CUDA kernels compiled at run time: ``variant="cuda"``.

Why a CUDA kernel next to the Triton ones (``kernels.spqr``): the Triton decode path needs three launches (prologue,
split-K kernel with fp32 atomics, cast) and Triton's launcher costs tens of microseconds of host time each, so in
eager decoding (how ``generate`` runs) a batch-1 product took 77-92 us against 19-35 us for bf16. Here one launch
at batch 1 (a prep launch is added only when the activations are too large for shared memory) goes through the
cached ``cuLaunchKernel`` binding of :mod:`kernels.cuda_rt`: 23-50 us eager on the H200. On the GPU timeline
alone (CUDA graphs) it is not faster than the Triton kernel; see ``benchmarks/results/spqr_speed.md`` and the
README for the measured figures and what limits them.

Kernel layout (:func:`cuda_layout`, built once per device from the packed format; tiles of 16 rows x 16 columns,
one first-level group and one second-level block each, so the format must have ``group_size`` and
``stats_group_size`` multiples of 16, ``bits <= 4`` and ``stats_bits <= 4``):

* ``codes`` int32 ``[row tile][chunk of 64 columns][lane][4]``: word ``j`` of lane ``l = 4 g + t`` holds the eight
  codes of tile ``j`` that the ``mma.m16n8k16`` A fragment gives thread ``l``: register ``i`` (0..3) pairs rows
  ``g + 8 (i & 1)``, columns ``2 t + 8 (i >> 1) + h`` (h = 0, 1) at bits ``4 i + 16 h``. One 16-byte copy per lane
  and chunk; a warp reads 512 contiguous bytes.
* ``stats`` int32 ``[row tile][chunk][g][2]``: byte ``j`` of word 0 (1) is ``scale code | zero code << 4`` of row
  ``g`` (``g + 8``) in tile ``j``.
* ``stats2`` fp16 ``[row tile][chunk][tile j][4]``: scale step, scale minimum, zero step, zero minimum.
* outliers in CSR, their codes re-centred (:func:`_recenter_outliers`).

Per tile a thread decodes, in fp16 arithmetic for both activation dtypes: the scale and zero-point of its two rows
(codes put into the mantissa of 1024.0 with one LOP3, the magic number subtracted, three half2 FMAs) and its eight
weights (one LOP3 and two half2 FMAs per pair: ``w = (q - 1024) * s + (-z * s)``), converted to bf16 pairs for
bf16 activations (bf16 arithmetic on the zero-point cost 1-2% relative error), then one ``mma`` per 8 activation
rows. Bytes per weight: 4 (codes) + 0.5 (statistics codes) + 0.25 (second-level statistics) bits, plus 14 bytes
per outlier in device memory (10 read per call).

The main kernel ``spqr_cuda_gemv`` is persistent: a block owns every ``gridDim``-th row tile, its warps split each
tile's chunks and stream them through per-warp rings of shared-memory stages (``cp.async``, ``stages - 1`` chunks
ahead). Before the stream it gathers the activations by the permutation into shared memory in B-fragment order
(or, when they do not fit, ``spqr_cuda_prep`` writes them in that order and they travel with each chunk) and sums
the outliers of all its tiles (a segmented warp scan over the row-sorted CSR). A tile's epilogue adds the warps'
partial sums, the outlier sums and the bias and writes ``y`` in the activation dtype.

The PyTorch reference of the same function is :func:`kernels.spqr.spqr_matmul_reference`.

Example:
    >>> lay = cuda_layout(layer.packed_tensors(), **layer.packed_meta())  # doctest: +SKIP
    >>> y = spqr_gemv_cuda(x, lay, bias=layer.bias)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from hf_effllm.errors import HfEffllmError
from hf_effllm.quant.spqr.format import dequantize_stats

from .cuda_rt import available, cdiv, compiled, launch, on_device, render, sm_count, smem_limit

__all__ = [
    "MAX_ROWS",
    "cuda_layout",
    "cuda_source",
    "dequantize_launch",
    "layout_supported",
    "spqr_dequantize_cuda",
    "spqr_gemv_cuda",
]

MAX_ROWS = 16  # activation rows of one call (two n8 blocks of the mma)
_PREP_THREADS = 128
_SMEM_SET: dict[int, int] = {}  # dynamic shared memory each compiled kernel has opted in to
XS_MAX_BYTES = 64 * 1024  # activations gathered into shared memory by the main kernel up to this size (no prep)
# Phases of the main kernel left out, for the time breakdown of benchmarks/spqr_speed.py --breakdown only (the
# results are then wrong): "gather" (activations into shared memory), "outliers", "mma" (decode + tensor cores).
_SKIP: frozenset[str] = frozenset()

_SOURCE = r"""
{SKIP}
#define W_ {W}
#define S_ {S}
#define NB {NB}
#define IS_BF16 {BF16}
#define ACT_BF16 IS_BF16
#define XS {XS}
#define RAW {RAW}
//@COMMON

// the weights are decoded in fp16 arithmetic for both activation dtypes (bf16 arithmetic on the zero-point costs
// 1-2% relative error), then converted to bf16 pairs for bf16 activations
#define MAGIC 0x64006400u      // 1024.0 in both halves: a code in the low mantissa bits gives 1024 + code
#define NEG_MAGIC 0xE400E400u
#define ONE2 0x3C003C00u
#if IS_BF16                    // RAW: the codes enter the mma as magic + code, exact in the activation dtype
#define RAW_MAGIC 0x43004300u
#define RAW_MAGIC_F 128.f
#else
#define RAW_MAGIC 0x64006400u
#define RAW_MAGIC_F 1024.f
#endif
#define OU 4                   // warp-steps of outlier loads issued before the first is used
#define GB 8                   // activation pairs per thread gathered at a time (XS)
#define STAGE_FIXED 608        // bytes of a stage before the activations: codes 512, statistics 64, second level 32

__device__ __forceinline__ uint4 ld_stream(const u32* p) {  // read once: do not keep in L1
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}



// the A fragment of tile j (code word w, statistics words sx/sy of rows g/g+8, second-level words s2a, s2b)
__device__ __forceinline__ void dequant_tile(u32* a, u32 w, u32 sx, u32 sy, u32 s2a, u32 s2b, int j) {
    const u32 p = prmt(sx, sy, (u32)(j | (j << 4) | ((j + 4) << 8) | ((j + 4) << 12)));
    const u32 sc = hfma2((p & 0x000F000Fu) | MAGIC, ONE2, NEG_MAGIC);          // {scale code g, scale code g+8}
    const u32 zc = hfma2(((p >> 4) & 0x000F000Fu) | MAGIC, ONE2, NEG_MAGIC);   // zero codes
    const u32 s = hfma2(sc, prmt(s2a, 0, 0x1010), prmt(s2a, 0, 0x3232));      // step * code + minimum
    const u32 z = hfma2(zc, prmt(s2b, 0, 0x1010), prmt(s2b, 0, 0x3232));
    const u32 c = hfma2(z, s ^ 0x80008000u, 0u);                                 // -z * s
    const u32 s0 = prmt(s, 0, 0x1010), s1 = prmt(s, 0, 0x3232);
    const u32 c0 = prmt(c, 0, 0x1010), c1 = prmt(c, 0, 0x3232);
    a[0] = to_act2(hfma2(hfma2((w & 0x000F000Fu) | MAGIC, ONE2, NEG_MAGIC), s0, c0));
    a[1] = to_act2(hfma2(hfma2(((w >> 4) & 0x000F000Fu) | MAGIC, ONE2, NEG_MAGIC), s1, c1));
    a[2] = to_act2(hfma2(hfma2(((w >> 8) & 0x000F000Fu) | MAGIC, ONE2, NEG_MAGIC), s0, c0));
    a[3] = to_act2(hfma2(hfma2(((w >> 12) & 0x000F000Fu) | MAGIC, ONE2, NEG_MAGIC), s1, c1));
}

// RAW: fp32 scale and (magic + zero-point) of rows g and g + 8 in tile j, decoded like the reference (fp16
// second-level statistics times the codes, in fp32)
// RAW: the chunk's 64 (row, tile) statistics decoded once per warp (two per lane, not once per lane of the four
// that share a fragment row) into the warp's 16 x 4 table of (scale, magic + zero-point)
__device__ __forceinline__ void decode_stats(const char* st, float2* tab, int lane) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int p = lane + 32 * h, r = p & 15, j = p >> 4;
        const u32 b = (((const u32*)(st + 512))[(r & 7) * 2 + (r >> 3)] >> (8 * j)) & 0xFFu;
        const uint2 s2 = *(const uint2*)(st + 576 + j * 8);
        const float sst = half_f((u16)(s2.x & 0xFFFFu)), smn = half_f((u16)(s2.x >> 16));
        const float zst = half_f((u16)(s2.y & 0xFFFFu)), zmn = half_f((u16)(s2.y >> 16)) + RAW_MAGIC_F;
        // a code c as a float: 2^23 + c has c in its mantissa, so the subtraction is exact (no int-to-float)
        tab[r * 4 + j] = make_float2(fmaf(sst, __uint_as_float(0x4B000000u | (b & 15u)) - 8388608.f, smn),
                                     fmaf(zst, __uint_as_float(0x4B000000u | (b >> 4)) - 8388608.f, zmn));
    }
}

// activations (M, K) -> B-fragment order [row][chunk][t][tile j][4 values], gathered by perm, zero past K; with
// xsum (RAW) also the sum of each row's 16 activations of every tile, [row][chunk][tile j] (the 4 threads t of a
// (row, chunk) are consecutive lanes, so the block size is a multiple of 4 and no lane leaves before the shuffles)
extern "C" __global__ void spqr_cuda_prep(const u16* __restrict__ x, const int* __restrict__ perm,
                                          u32* __restrict__ xs, float* __restrict__ xsum, int M, int K, int KC,
                                          int sx) {
    const int id = blockIdx.x * blockDim.x + threadIdx.x;
    const bool valid = id < M * KC * 4;
    const int b = id / (KC * 4), kc = (id / 4) % KC, t = id % 4;
    u32 v[8];
    float part[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        part[j] = 0.f;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int k = kc * 64 + 16 * j + 2 * t + (e & 1) + 8 * (e >> 1);
            u32 h = 0;
            if (valid && k < K) h = x[(long long)b * sx + (perm ? perm[k] : k)];
            part[j] += act_f((u16)h);
            if (e & 1) v[2 * j + (e >> 1)] |= h << 16; else v[2 * j + (e >> 1)] = h;
        }
    }
    if (xsum) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            part[j] += __shfl_xor_sync(0xffffffffu, part[j], 1);
            part[j] += __shfl_xor_sync(0xffffffffu, part[j], 2);
        }
        if (valid && t == 0) *(float4*)(xsum + (long long)(id / 4) * 4) = make_float4(part[0], part[1], part[2], part[3]);
    }
    if (!valid) return;
    uint4* dst = (uint4*)(xs + (long long)id * 8);
    dst[0] = make_uint4(v[0], v[1], v[2], v[3]);
    dst[1] = make_uint4(v[4], v[5], v[6], v[7]);
}

// one chunk (64 columns of a row tile) -> the warp's stage: codes, statistics, second level, and without XS the
// activation fragments of the M rows (and with RAW their tile sums)
__device__ __forceinline__ void issue(char* st, const u32* codes, const u32* stats, const u32* stats2,
                                      const u32* xs, const float* xsum, long long item, int kc, int KC, int M,
                                      int lane) {
    const int pieces = 38 + (XS ? 0 : (RAW ? 9 : 8) * M);
    for (int p = lane; p < pieces; p += 32) {
        const void* src;
        if (p < 32) src = codes + item * 128 + p * 4;
        else if (p < 36) src = stats + item * 16 + (p - 32) * 4;
        else if (p < 38) src = stats2 + item * 8 + (p - 36) * 4;
        else if (p < 38 + 8 * M) {
            const int q = p - 38;  // activation row q / 8, thread t = (q % 8) / 2, half q % 2
            src = xs + (((long long)(q >> 3) * KC + kc) * 4 + ((q & 7) >> 1)) * 8 + (q & 1) * 4;
        } else {
            src = xsum + ((long long)(p - 38 - 8 * M) * KC + kc) * 4;  // RAW: row p - 38 - 8M's tile sums
        }
        cp_async16(st + p * 16, src, 16);
    }
}

// half index of stored column k of activation row b in the B-fragment order [row][chunk][t][tile j][4 values]
__device__ __forceinline__ int frag_pos(int b, int k, int KC) {
    const int kk = k & 63, kt = kk & 15;
    return ((b * KC + (k >> 6)) * 4 + ((kt & 7) >> 1)) * 16 + (kk >> 4) * 4 + (kt & 1) + 2 * (kt >> 3);
}

// y = x W^T (+ bias, + outliers). Persistent: block b owns row tiles b, b + gridDim.x, ... (at most TMAX); its warp
// w the chunks w, w + W_, ... of each (CPT per tile, the same for every warp: chunks past KC are skipped), streamed
// through a ring of S_ stages in shared memory by cp.async, S_ - 1 chunks ahead of the one being computed.
// Before the stream: XS (few activation rows) gathers x by the permutation into shared memory in B-fragment order,
// else the fragments come with each chunk (written by spqr_cuda_prep); then the outliers of all the block's tiles
// are summed into shared memory (a segmented warp scan over the row-sorted CSR, one atomic per row and warp), while
// the first chunks are in flight. The epilogue of a tile is then a reduction over the warps plus that sum and bias.
extern "C" __global__ void __launch_bounds__(W_ * 32) spqr_cuda_gemv(
    const u32* __restrict__ xs, const u32* __restrict__ codes, const u32* __restrict__ stats,
    const u32* __restrict__ stats2, const u16* __restrict__ ov, const int* __restrict__ oc,
    const int* __restrict__ orow, const int* __restrict__ optr, const u16* __restrict__ x,
    const int* __restrict__ perm, const u16* __restrict__ bias, const float* __restrict__ xsum,
    u16* __restrict__ y, int M, int N, int NT, int K, int KC, int TMAX, int sx, int sy) {
    extern __shared__ __align__(16) char smem[];
    __shared__ float red[W_][16][8 * NB];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int stage_bytes = STAGE_FIXED + (XS ? 0 : (RAW ? 144 : 128) * M);
    char* ring = smem + warp * S_ * stage_bytes;
    float* osum = (float*)(smem + W_ * S_ * stage_bytes + (RAW ? W_ * 512 : 0));  // [TMAX][16][M]
#if RAW
    float2* stab = (float2*)(smem + W_ * S_ * stage_bytes) + warp * 64;  // the warp's decoded statistics
#endif
#if XS
    u16* xsm = (u16*)(osum + TMAX * 16 * M);                      // [M][KC][4][16] halves
#if RAW
    float* xss = (float*)(xsm + M * KC * 64);                     // [M][KC][4] tile sums
#endif
#endif
    const int CPT = (KC + W_ - 1) / W_;
    const int my_tiles = (NT - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x;
    const int total = my_tiles * CPT;
    bool xin[NB];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) xin[nb] = g + 8 * nb < M;

#define ISSUE(I)                                                                                   \
    {                                                                                              \
        const int i_ = (I);                                                                        \
        if (i_ < total) {                                                                          \
            const int kc_ = warp + (i_ % CPT) * W_;                                                \
            const int tile_ = blockIdx.x + (i_ / CPT) * gridDim.x;                                 \
            if (kc_ < KC)                                                                          \
                issue(ring + (i_ % S_) * stage_bytes, codes, stats, stats2, xs, xsum,              \
                      (long long)tile_ * KC + kc_, kc_, KC, M, lane);                              \
        }                                                                                          \
        cp_async_commit();                                                                         \
    }
#pragma unroll
    for (int i = 0; i < S_ - 1; ++i) ISSUE(i);

    for (int e = threadIdx.x; e < my_tiles * 16 * M; e += W_ * 32) osum[e] = 0.f;
#if XS && !defined(SKIP_GATHER)
    // pairs of halves (row, chunk, t, j, pair), GB per thread at a time: all permutation loads, then all gathers
    for (int e0 = threadIdx.x; e0 < M * KC * 32; e0 += GB * W_ * 32) {
        int src[GB][2];
#pragma unroll
        for (int u = 0; u < GB; ++u) {
            const int e = e0 + u * W_ * 32;
            const int pr = e & 1, j = (e >> 1) & 3, tt = (e >> 3) & 3, kc = (e >> 5) % KC;
            const int k = kc * 64 + 16 * j + 2 * tt + 8 * pr;
            src[u][0] = (e < M * KC * 32 && k < K) ? (perm ? perm[k] : k) : -1;
            src[u][1] = (e < M * KC * 32 && k + 1 < K) ? (perm ? perm[k + 1] : k + 1) : -1;
        }
#pragma unroll
        for (int u = 0; u < GB; ++u) {
            const int e = e0 + u * W_ * 32;
            if (e < M * KC * 32) {
                const long long xrow = (long long)(e / (KC * 32)) * sx;
                u32 v = src[u][0] >= 0 ? (u32)x[xrow + src[u][0]] : 0u;
                if (src[u][1] >= 0) v |= (u32)x[xrow + src[u][1]] << 16;
                ((u32*)xsm)[e] = v;
            }
        }
    }
#if RAW
    __syncthreads();
    for (int e = threadIdx.x; e < M * KC * 4; e += W_ * 32) {  // (row, chunk, tile j): 16 values at t*16 + j*4 + v
        const int j = e & 3, rc = e >> 2;
        float sum = 0.f;
#pragma unroll
        for (int tt = 0; tt < 4; ++tt) {
            const uint2 h = *(const uint2*)(xsm + (rc * 4 + tt) * 16 + j * 4);
            sum += act_f((u16)h.x) + act_f((u16)(h.x >> 16)) + act_f((u16)h.y) + act_f((u16)(h.y >> 16));
        }
        xss[e] = sum;
    }
#endif
#endif
    __syncthreads();
#ifndef SKIP_OUTLIERS
    int ob[8], oe[8];  // CSR ranges of the first 8 tiles, loaded together
#pragma unroll
    for (int tk = 0; tk < 8; ++tk) {
        const int tile = blockIdx.x + tk * gridDim.x;
        ob[tk] = tk < my_tiles ? optr[tile * 16] : 0;
        oe[tk] = tk < my_tiles ? optr[min(tile * 16 + 16, N)] : 0;
    }
    for (int tk = 0; tk < my_tiles; ++tk) {
        const int tile = blockIdx.x + tk * gridDim.x;
        int o0, o1;
        if (tk < 8) {
#pragma unroll
            for (int q = 0; q < 8; ++q)  // constant indices keep the arrays in registers
                if (q == tk) o0 = ob[q], o1 = oe[q];
        } else {
            o0 = optr[tile * 16];
            o1 = optr[min(tile * 16 + 16, N)];
        }
        for (int base0 = o0 + warp * 32; base0 < o1; base0 += OU * W_ * 32) {
            int rr[OU], cc[OU];  // OU warp-steps of loads in flight before the first use
            float vv[OU];
#pragma unroll
            for (int u = 0; u < OU; ++u) {
                const int o = base0 + u * W_ * 32 + lane;
                const bool valid = o < o1;
                rr[u] = valid ? orow[o] - tile * 16 : 16;
                vv[u] = valid ? half_f(ov[o]) : 0.f;
                cc[u] = valid ? oc[o] : 0;
            }
#pragma unroll
            for (int u = 0; u < OU; ++u) {
                if (base0 + u * W_ * 32 >= o1) break;  // warp-uniform
                const int r = rr[u];
                const int r_next = __shfl_down_sync(0xffffffffu, r, 1);
                const bool last = lane == 31 || r_next != r;
                for (int b = 0; b < M; ++b) {
#if XS
                    float sum = vv[u] * act_f(xsm[frag_pos(b, cc[u], KC)]);
#else
                    float sum = vv[u] * act_f(x[(long long)b * sx + cc[u]]);
#endif
#pragma unroll
                    for (int off = 1; off < 32; off <<= 1) {  // inclusive scan within runs of equal rows
                        const float up = __shfl_up_sync(0xffffffffu, sum, off);
                        const int r_up = __shfl_up_sync(0xffffffffu, r, off);
                        if (lane >= off && r_up == r) sum += up;
                    }
                    if (r < 16 && last) atomicAdd(&osum[(tk * 16 + r) * M + b], sum);
                }
            }
        }
    }
#endif
    __syncthreads();

    float acc[NB][4];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.f;
    for (int i = 0; i < total; ++i) {
        ISSUE(i + S_ - 1);
        cp_async_wait<S_ - 1>();
        __syncwarp();
        const int c = i % CPT;
        const int kc = warp + c * W_;
        if (kc < KC) {
            const char* st = ring + (i % S_) * stage_bytes;
            const uint4 cw = *(const uint4*)(st + lane * 16);
#ifdef SKIP_MMA
            acc[0][0] += (float)(cw.x & 1u) + (float)xin[0];  // keep the ring read
#else
#if !RAW
            const uint2 sw = *(const uint2*)(st + 512 + g * 8);
            const uint4 sa = *(const uint4*)(st + 576), sz = *(const uint4*)(st + 592);
#endif
            uint4 xa[NB], xb[NB];
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
                if (xin[nb]) {
#if XS
                    const uint4* xp = (const uint4*)(xsm + (((g + 8 * nb) * KC + kc) * 4 + t) * 16);
#else
                    const uint4* xp = (const uint4*)(st + STAGE_FIXED + (g + 8 * nb) * 128 + t * 32);
#endif
                    xa[nb] = xp[0];
                    xb[nb] = xp[1];
                } else {
                    xa[nb] = make_uint4(0, 0, 0, 0);
                    xb[nb] = make_uint4(0, 0, 0, 0);
                }
            }
            const u32 w4[4] = {cw.x, cw.y, cw.z, cw.w};
#if !RAW
            const u32 s2w[8] = {sa.x, sa.y, sa.z, sa.w, sz.x, sz.y, sz.z, sz.w};
#else
            decode_stats(st, stab, lane);
            __syncwarp();
            const float4 ra0 = *(const float4*)(stab + g * 4), ra1 = *(const float4*)(stab + g * 4 + 2);
            const float4 rb0 = *(const float4*)(stab + (g + 8) * 4), rb1 = *(const float4*)(stab + (g + 8) * 4 + 2);
            const float rs0[4] = {ra0.x, ra0.z, ra1.x, ra1.z}, rz0[4] = {ra0.y, ra0.w, ra1.y, ra1.w};
            const float rs1[4] = {rb0.x, rb0.z, rb1.x, rb1.z}, rz1[4] = {rb0.y, rb0.w, rb1.y, rb1.w};
            // tile sums of the activation rows of this thread's C columns: 2t + 8nb and 2t + 8nb + 1
            float4 xs0[NB], xs1[NB];
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
                const int b0 = 2 * t + 8 * nb;
#if XS
                const float* xsp = xss + (long long)kc * 4;
                xs0[nb] = b0 < M ? *(const float4*)(xsp + (long long)b0 * KC * 4) : make_float4(0.f, 0.f, 0.f, 0.f);
                xs1[nb] = b0 + 1 < M ? *(const float4*)(xsp + (long long)(b0 + 1) * KC * 4) : make_float4(0.f, 0.f, 0.f, 0.f);
#else
                const float* xsp = (const float*)(st + STAGE_FIXED + 128 * M);
                xs0[nb] = b0 < M ? *(const float4*)(xsp + b0 * 4) : make_float4(0.f, 0.f, 0.f, 0.f);
                xs1[nb] = b0 + 1 < M ? *(const float4*)(xsp + (b0 + 1) * 4) : make_float4(0.f, 0.f, 0.f, 0.f);
#endif
            }
#endif
#pragma unroll
            for (int j = 0; j < 4; ++j) {
#if RAW
                // the codes themselves (plus the magic number) on the tensor cores, then per row and column
                // acc += s * (C - (magic + z) * sum of the tile's activations), in fp32
                const u32 a[4] = {(w4[j] & 0x000F000Fu) | RAW_MAGIC, ((w4[j] >> 4) & 0x000F000Fu) | RAW_MAGIC,
                                  ((w4[j] >> 8) & 0x000F000Fu) | RAW_MAGIC, ((w4[j] >> 12) & 0x000F000Fu) | RAW_MAGIC};
                const float s0 = rs0[j], z0 = rz0[j], s1 = rs1[j], z1 = rz1[j];
#pragma unroll
                for (int nb = 0; nb < NB; ++nb) {
                    const u32 xw[8] = {xa[nb].x, xa[nb].y, xa[nb].z, xa[nb].w, xb[nb].x, xb[nb].y, xb[nb].z, xb[nb].w};
                    float cf[4] = {0.f, 0.f, 0.f, 0.f};
                    mma16816(cf, a, xw[2 * j], xw[2 * j + 1]);
                    const float x0 = j == 0 ? xs0[nb].x : j == 1 ? xs0[nb].y : j == 2 ? xs0[nb].z : xs0[nb].w;
                    const float x1 = j == 0 ? xs1[nb].x : j == 1 ? xs1[nb].y : j == 2 ? xs1[nb].z : xs1[nb].w;
                    acc[nb][0] = fmaf(s0, fmaf(-z0, x0, cf[0]), acc[nb][0]);
                    acc[nb][1] = fmaf(s0, fmaf(-z0, x1, cf[1]), acc[nb][1]);
                    acc[nb][2] = fmaf(s1, fmaf(-z1, x0, cf[2]), acc[nb][2]);
                    acc[nb][3] = fmaf(s1, fmaf(-z1, x1, cf[3]), acc[nb][3]);
                }
#else
                u32 a[4];
                dequant_tile(a, w4[j], sw.x, sw.y, s2w[2 * j], s2w[2 * j + 1], j);
#pragma unroll
                for (int nb = 0; nb < NB; ++nb) {
                    const u32 xw[8] = {xa[nb].x, xa[nb].y, xa[nb].z, xa[nb].w, xb[nb].x, xb[nb].y, xb[nb].z, xb[nb].w};
                    mma16816(acc[nb], a, xw[2 * j], xw[2 * j + 1]);
                }
#endif
            }
#endif  // SKIP_MMA
        }
        __syncwarp();
        if (c != CPT - 1) continue;
        // the tile's last chunk for every warp: reduce over the warps, add outliers and bias, store
        const int tk = i / CPT, tile = blockIdx.x + tk * gridDim.x;
        // C fragment: c0 (row g, col 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1); columns are activation rows
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
            red[warp][g][8 * nb + 2 * t] = acc[nb][0];
            red[warp][g][8 * nb + 2 * t + 1] = acc[nb][1];
            red[warp][g + 8][8 * nb + 2 * t] = acc[nb][2];
            red[warp][g + 8][8 * nb + 2 * t + 1] = acc[nb][3];
            acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.f;
        }
        __syncthreads();
        for (int e = threadIdx.x; e < 16 * M; e += W_ * 32) {
            const int b = e >> 4, r = e & 15, row = tile * 16 + r;
            float v = osum[(tk * 16 + r) * M + b];
#pragma unroll
            for (int w = 0; w < W_; ++w) v += red[w][r][b];
            if (row < N) {
                if (bias) v += act_f(bias[row]);
                y[(long long)b * sy + row] = act_from_f(v);
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();
}

// the dense weight (N, K) in stored column order, outliers not added, in the activation dtype: one warp per chunk
extern "C" __global__ void spqr_cuda_dequant(const u32* __restrict__ codes, const u32* __restrict__ stats,
                                             const u32* __restrict__ stats2, u32* __restrict__ out, int N, int K,
                                             int KC, int NT) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const long long item = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (item >= (long long)NT * KC) return;
    const int tile = (int)(item / KC), kc = (int)(item % KC);
    const uint4 cw = ld_stream(codes + item * 128 + lane * 4);
    const uint2 st = *(const uint2*)(stats + item * 16 + g * 2);
    const uint4 sa = *(const uint4*)(stats2 + item * 8), sz = *(const uint4*)(stats2 + item * 8 + 4);
    const u32 w4[4] = {cw.x, cw.y, cw.z, cw.w};
    const u32 s2w[8] = {sa.x, sa.y, sa.z, sa.w, sz.x, sz.y, sz.z, sz.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        u32 a[4];
        dequant_tile(a, w4[j], st.x, st.y, s2w[2 * j], s2w[2 * j + 1], j);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = tile * 16 + g + 8 * (i & 1), col = kc * 64 + 16 * j + 2 * t + 8 * (i >> 1);
            if (row < N && col < K) {  // K is even: a pair never straddles the end
                out[((long long)row * K + col) >> 1] = a[i];
            }
        }
    }
}
"""


def cuda_source(*, warps: int, stages: int, nb: int, bf16: bool, xs: bool, raw: bool = False) -> str:
    """The CUDA source of the three kernels for ``warps`` per block, ``stages`` in each warp's ring, ``nb`` n8
    blocks of activation rows (1: up to 8, 2: up to 16), the activation dtype, where the activation fragments
    live (``xs``: gathered into shared memory by the kernel; else streamed with each chunk from the prep kernel),
    and the decode (``raw``: see :func:`spqr_gemv_cuda`)."""
    skip = "".join(f"#define SKIP_{p.upper()} 1\n" for p in sorted(_SKIP))
    return render(_SOURCE, W=warps, S=stages, NB=nb, BF16=bf16, XS=xs, RAW=raw, SKIP=skip)


def smem_bytes(
    warps: int, stages: int, rows: int, chunks: int, tiles_per_block: int, xs: bool, raw: bool = False
) -> int:
    """Dynamic shared memory of a ``spqr_cuda_gemv`` block: each warp's ring of ``stages`` chunks (608 bytes of
    weight data, plus 128 bytes of activation fragments per activation row without ``xs``), the outlier sums of its
    row tiles, and with ``xs`` the activations of all ``chunks`` (128 bytes per chunk and row). ``raw`` adds the
    activations' tile sums (16 bytes per chunk and row) and a 512-byte statistics table per warp."""
    per_row = 128 + (16 if raw else 0)
    stage = 608 + (0 if xs else per_row * rows)
    tables = warps * 512 if raw else 0  # each warp's decoded statistics of a chunk
    return warps * stages * stage + tables + tiles_per_block * 16 * rows * 4 + (rows * chunks * per_row if xs else 0)


def layout_supported(*, bits: int, group_size: int, stats_bits: int, stats_group_size: int, **_: Any) -> str | None:
    """None when :func:`cuda_layout` takes this format, else the reason it does not."""
    if bits > 4:
        return f"bits={bits}; the CUDA kernel takes at most 4 (4-bit code lanes)"
    if stats_bits > 4:
        return f"stats_bits={stats_bits}; the CUDA kernel takes at most 4"
    if group_size % 16 or stats_group_size % 16:
        return (
            f"group_size={group_size}, stats_group_size={stats_group_size}; the CUDA kernel's 16x16 tiles need "
            f"multiples of 16"
        )
    return None


def supports(x: torch.Tensor, meta: dict[str, Any]) -> str | None:
    """None when :func:`spqr_gemv_cuda` handles ``x`` for a layer of format ``meta``, else the reason (answered
    once per device, dtype and format: the question is asked on every decode step)."""
    if x.device.type != "cuda":
        return _NO_CUDA
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    keys = ("in_features", "bits", "group_size", "stats_bits", "stats_group_size")
    return _supports(index, x.dtype, *(meta[k] for k in keys))


_NO_CUDA = "needs CUDA and torch.cuda._compile_kernel (torch >= 2.8)"


@functools.cache
def _supports(
    index: int, dtype: torch.dtype, in_features: int, bits: int, group_size: int, stats_bits: int, stats_group_size: int
) -> str | None:
    if not available():
        return _NO_CUDA
    if torch.cuda.get_device_capability(index) < (8, 0):
        return "needs a GPU of compute capability 8.0 or newer (fp16/bf16 mma.m16n8k16)"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"x.dtype={dtype}; the CUDA kernel takes float16 or bfloat16"
    if in_features % 2:
        return f"in_features={in_features} is odd; the CUDA kernel takes an even number"
    return layout_supported(bits=bits, group_size=group_size, stats_bits=stats_bits, stats_group_size=stats_group_size)


def _recenter_outliers(codes, sc, zc, stats2, orow, cols, ov, bits, group_size, stats_group_size):
    """The codes under the outliers set to the level nearest the zero-point, the corrections adjusted to match.

    The format stores an outlier as a correction added to whatever its code decodes to, and that base can be far
    larger than the weight itself (a code of a group whose statistics were fitted without the outlier: 620 against
    a weight of 30 in the tests). The kernels decode the base in 16-bit arithmetic, so its rounding error would
    survive the correction; with the base near zero it is negligible. Same weights up to fp16 rounding of the
    corrections."""
    if ov.numel() == 0:
        return codes, ov.to(torch.float16)
    gi = cols // group_size
    s = dequantize_stats(sc, stats2[..., 0], stats2[..., 1], stats_group_size)[orow, gi]
    z = dequantize_stats(zc, stats2[..., 2], stats2[..., 3], stats_group_size)[orow, gi]
    q_old = codes[orow, cols].float()
    q_new = z.round().clamp(0, 2**bits - 1)
    codes = codes.clone()
    codes[orow, cols] = q_new.to(codes.dtype)
    return codes, (ov.float() + s * (q_old - z) - s * (q_new - z)).to(torch.float16)


def cuda_layout(
    tensors: dict[str, torch.Tensor],
    *,
    in_features: int,
    bits: int,
    group_size: int,
    stats_bits: int,
    stats_group_size: int,
    **_: Any,
) -> dict[str, Any]:
    """Re-lay a layer's packed tensors out for the CUDA kernels (see the module docstring for the layout).

    Works on any device (the tests check it on the CPU against the format's own dequantization). Also holds the
    outliers (``ov`` fp16 corrections, re-centred by :func:`_recenter_outliers`; ``oc_orig`` original columns,
    ``oc`` stored columns, ``orow`` rows and ``optr`` row offsets, all int32: 14 bytes per outlier), ``perm`` (int32,
    stored order -> original column), ``perm_long`` and its inverse ``perm_inv``.
    """
    from .spqr import outlier_index, unpack_codes  # kernels.spqr imports this module

    reason = layout_supported(
        bits=bits, group_size=group_size, stats_bits=stats_bits, stats_group_size=stats_group_size
    )
    if reason is not None:
        raise HfEffllmError(f"the SpQR CUDA layout does not take this format: {reason}.")
    dev = tensors["qweight"].device
    ptr = tensors["outlier_row_ptr"]
    n = ptr.shape[0] - 1
    k = in_features
    g = cdiv(k, group_size)
    nt, kc = cdiv(n, 16), cdiv(k, 64)
    np_, kp = nt * 16, kc * 64
    codes, sc, zc = unpack_codes(tensors, n, k, g, bits, stats_bits)

    orow, cols, cols_orig = outlier_index(tensors)
    codes, ov = _recenter_outliers(
        codes, sc, zc, tensors["stats2"], orow, cols, tensors["outlier_values"], bits, group_size, stats_group_size
    )
    c = torch.zeros(np_, kp, dtype=torch.int64, device=dev)
    c[:n, :k] = codes
    # (tile, row in tile, chunk, tile j, column in tile) -> (tile, chunk, g, t, j, i, h) with row = g + 8 (i & 1),
    # column = 2 t + 8 (i >> 1) + h
    c = c.reshape(nt, 2, 8, kc, 4, 2, 4, 2)  # tile, i&1, g, chunk, j, i>>1, t, h
    c = c.permute(0, 3, 2, 6, 4, 5, 1, 7)  # tile, chunk, g, t, j, i>>1, i&1, h
    c = c.reshape(nt, kc, 8, 4, 4, 4, 2)  # ..., j, i = 2 (i>>1) + (i&1), h
    shifts = 4 * torch.arange(4, device=dev)[:, None] + 16 * torch.arange(2, device=dev)[None, :]
    words = (c << shifts).sum((-1, -2))  # tile, chunk, g, t, j
    codes_l = ((words + 2**31) % 2**32 - 2**31).to(torch.int32).reshape(-1)
    # statistics codes per (row, tile column): the group of tile column j of chunk c is (64 c + 16 j) // group_size
    tcol = torch.arange(kc * 4, device=dev) * 16
    grp = (tcol // group_size).clamp_max(g - 1)
    valid = tcol < k
    byte = torch.zeros(np_, kc * 4, dtype=torch.int64, device=dev)
    byte[:n] = ((sc | (zc << 4)).to(torch.int64)[:, grp]) * valid
    byte = byte.reshape(nt, 2, 8, kc, 4).permute(0, 3, 2, 1, 4)  # tile, chunk, g, half (row g / g+8), j
    sw = (byte << (8 * torch.arange(4, device=dev))).sum(-1)
    stats_l = ((sw + 2**31) % 2**32 - 2**31).to(torch.int32).reshape(-1)
    s2 = tensors["stats2"]  # (out2, G, 4) fp16
    rows2 = (torch.arange(nt, device=dev) * 16 // stats_group_size).clamp_max(s2.shape[0] - 1)
    st2 = s2[rows2][:, grp] * valid[None, :, None]  # (tile, tile column, 4)
    stats2_l = st2.reshape(nt, kc, 4, 4).contiguous()
    perm = tensors.get("perm")
    layout: dict[str, Any] = {
        "codes": codes_l,
        "stats": stats_l,
        "stats2": stats2_l.reshape(-1),
        "n": n,
        "k": k,
        "kc": kc,
        "nt": nt,
        "ov": ov,
        "oc_orig": cols_orig.to(torch.int32),
        "oc": cols.to(torch.int32),
        "orow": orow.to(torch.int32),
        "optr": ptr.to(torch.int32),
    }
    if perm is not None:
        layout["perm"] = perm.to(torch.int32)
        layout["perm_long"] = perm.long()
        layout["perm_inv"] = torch.argsort(layout["perm_long"])  # stored column of each original column
    return layout


def _check_layout(x: torch.Tensor, layout: dict[str, Any]) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise HfEffllmError(f"x.dtype={x.dtype} is not supported by the SpQR CUDA kernels; use float16 or bfloat16.")
    if x.shape[-1] != layout["k"]:
        raise HfEffllmError(f"x has {x.shape[-1]} features in its last dimension; this layer expects {layout['k']}.")
    if layout["codes"].device != x.device:
        raise HfEffllmError(
            f"the CUDA layout is on {layout['codes'].device} but x is on {x.device}; rebuild it with cuda_layout()."
        )


def default_launch(rows: int, n_tiles: int, device: torch.device) -> tuple[int, int, int]:
    """``(warps, stages, blocks per SM)`` of ``spqr_gemv_cuda``: the fastest of the H200 sweep in
    ``benchmarks/results/spqr_speed.md`` per regime (up to 8 rows: 16 warps x 4 stages, one block per SM, or
    8 x 8 with three blocks when there are at least four row tiles per SM; 9-16 rows: 8 x 4, two blocks)."""
    if rows > 8:
        return 8, 4, 2
    if n_tiles >= 4 * sm_count(device):
        return 8, 8, 3
    return 16, 4, 1


def spqr_gemv_cuda(
    x: torch.Tensor,
    layout: dict[str, Any],
    *,
    bias: torch.Tensor | None = None,
    warps: int | None = None,
    stages: int | None = None,
    blocks_per_sm: int | None = None,
    decode: str = "dequant",
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for at most 16 rows of activations (the decode path), W in :func:`cuda_layout`.

    Args:
        x: (..., in_features) float16 or bfloat16 on the layout's GPU, at most 16 rows in total.
        layout: the layer's :func:`cuda_layout`.
        bias: optional (out_features,) bias (cast to ``x.dtype``).
        warps: warps per block (1-16); they split the input dimension of a row tile.
        stages: chunks in each warp's shared-memory ring (2-16); ``stages - 1`` are in flight.
        blocks_per_sm: resident blocks per SM the grid is sized for (the blocks loop over the row tiles).
        (``None``: :func:`default_launch`.)
        decode: ``"dequant"`` (weights dequantized in fp16 arithmetic into the mma operand; measured on the H200)
            or ``"raw"`` (the codes plus a magic number go into the mma as they are and scale and zero-point are
            applied to its fp32 output with the activations' tile sums, the statistics decoded once per warp: 210
            instead of 276 warp instructions per 1,024 weights in the SASS, fp32 statistics like the reference;
            written in session 7 without GPU time left, so it is not the default until it has been measured).

    Returns:
        (..., out_features) in ``x.dtype``.
    """
    _check_layout(x, layout)
    n, k, kc, nt = layout["n"], layout["k"], layout["kc"], layout["nt"]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > MAX_ROWS:
        raise HfEffllmError(f"x has {m} rows; spqr_gemv_cuda takes at most {MAX_ROWS} (use spqr_matmul).")
    if warps is not None and not 1 <= warps <= 16:
        raise HfEffllmError(f"warps={warps} is out of range; use 1 to 16.")
    if stages is not None and not 2 <= stages <= 16:
        raise HfEffllmError(f"stages={stages} is out of range; use 2 to 16.")
    if blocks_per_sm is not None and blocks_per_sm < 1:
        raise HfEffllmError(f"blocks_per_sm={blocks_per_sm} must be >= 1.")
    if decode not in ("dequant", "raw"):
        raise HfEffllmError(f"decode={decode!r} is not supported; use 'dequant' or 'raw'.")
    if None in (warps, stages, blocks_per_sm):
        w0, s0, b0 = default_launch(m, nt, x.device)
        warps = w0 if warps is None else warps
        stages = s0 if stages is None else stages
        blocks_per_sm = b0 if blocks_per_sm is None else blocks_per_sm
    raw = decode == "raw"
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    if bias is not None:
        if bias.shape != (n,):
            raise HfEffllmError(f"bias has shape {tuple(bias.shape)}; expected ({n},).")
        bias = bias.to(x.dtype).contiguous()
    nb = 1 if m <= 8 else 2
    bf16 = x.dtype == torch.bfloat16
    in_smem = m * kc * (144 if raw else 128) <= XS_MAX_BYTES
    grid = min(nt, blocks_per_sm * sm_count(x.device))
    tmax = cdiv(nt, grid)
    smem = smem_bytes(warps, stages, m, kc, tmax, in_smem, raw)
    static = warps * 16 * 8 * nb * 4  # the reduction buffer
    limit = smem_limit(x.device) - static
    if smem > limit:
        raise HfEffllmError(
            f"warps={warps}, stages={stages}, blocks_per_sm={blocks_per_sm} need {smem} bytes of shared memory per "
            f"block for {m} rows; this GPU gives {limit}. Use fewer warps or stages, or more blocks per SM."
        )
    key = ("spqr", warps, stages, nb, bf16, in_smem, raw, _SKIP)

    def source() -> str:
        return cuda_source(warps=warps, stages=stages, nb=nb, bf16=bf16, xs=in_smem, raw=raw)

    with on_device(x.device):
        gemv = compiled(key, x.device, source, "spqr_cuda_gemv")
        need = max(smem, 48 * 1024) if smem + static > 48 * 1024 else 0  # static + dynamic above 48 KiB: opt in
        if need > _SMEM_SET.get(id(gemv), 0):
            gemv.set_shared_memory_config(need)
            _SMEM_SET[id(gemv)] = need
        xs = xsum = None
        if not in_smem:
            xs = torch.empty(m * kc * 32, device=x.device, dtype=torch.int32)  # m x kc x 4 lanes x 8 words
            xsum = torch.empty(m * kc * 4, device=x.device, dtype=torch.float32) if raw else None
            prep = compiled(key, x.device, source, "spqr_cuda_prep")
            launch(
                prep, (cdiv(m * kc * 4, _PREP_THREADS), 1, 1), _PREP_THREADS, 0,
                [x2, layout.get("perm"), xs, xsum], [m, k, kc, x2.stride(0)],
            )  # fmt: skip
        launch(
            gemv, (grid, 1, 1), warps * 32, smem,
            [xs, layout["codes"], layout["stats"], layout["stats2"], layout["ov"],
             layout["oc"] if in_smem else layout["oc_orig"], layout["orow"], layout["optr"], x2,
             layout.get("perm"), bias, xsum, y],
            [m, n, nt, k, kc, tmax, x2.stride(0), y.stride(0)],
        )  # fmt: skip
    return y.reshape(*lead, n)


def dequantize_launch(
    layout: dict[str, Any], dtype: torch.dtype, kind: str, key: tuple, source: Any, name: str, warps: int, ints: list
) -> torch.Tensor:
    """The dense weight (out, in) of a CUDA layout (``kind``: "CUDA" or "octet") in stored column order and ``dtype``
    (float16 or bfloat16): kernel ``name`` of ``source()`` with one warp per unit of work (``warps`` in all, 8 per
    block) over ``(codes, stats, stats2, out)`` and ``ints``, then the outliers added."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise HfEffllmError(f"dtype={dtype} is not supported by the SpQR {kind} kernels; use float16 or bfloat16.")
    dev = layout["codes"].device
    w = torch.empty(layout["n"], layout["k"], device=dev, dtype=dtype)
    if w.numel() == 0:
        return w
    with on_device(dev):
        kern = compiled(key, dev, source, name)
        per_block = 8
        launch(
            kern, (cdiv(warps, per_block), 1, 1), per_block * 32, 0,
            [layout["codes"], layout["stats"], layout["stats2"], w], ints,
        )  # fmt: skip
    if layout["ov"].numel():
        w.index_put_((layout["orow"], layout["oc"]), layout["ov"].to(dtype), accumulate=True)
    return w


def spqr_dequantize_cuda(layout: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """The dense weight (out, in) in stored column order and ``dtype`` (float16 or bfloat16), outliers added."""
    bf16 = dtype == torch.bfloat16

    def source() -> str:
        return cuda_source(warps=1, stages=2, nb=1, bf16=bf16, xs=False)

    n, k, kc, nt = layout["n"], layout["k"], layout["kc"], layout["nt"]
    return dequantize_launch(
        layout, dtype, "CUDA", ("spqr", 1, 2, 1, bf16, False), source, "spqr_cuda_dequant", nt * kc, [n, k, kc, nt]
    )
