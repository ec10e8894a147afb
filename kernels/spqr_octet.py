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
* outliers in CSR order: ``oent`` int32 ``column | fp16 correction << 16`` (zero-padded to a multiple of 4
  entries), ``optr`` int32 row offsets; and for the prefill path ``ov``/``orow``/``oc`` as in ``cuda_layout``.
* the outliers again, sorted by (octet, step, row, column), for ``spqr_octet_stream``: ``sent`` int32
  ``column in step | row in octet << 6 | (step mod 128) << 9 | fp16 correction << 16`` (zero-padded to a multiple
  of 4) and ``sptr`` int32, the first entry of every (octet, step) item.

Bytes per weight read by the decode kernels: 4 + 0.5 + 0.25 bits, plus 4 bytes per outlier and 4 per row
(``spqr_octet_gemv``) or 4 per (octet, step) (``spqr_octet_stream``).

The decode kernel ``spqr_octet_gemv``: a block of ``W`` warps gathers and scales the activations once, then handles
``W / P`` octets per round, ``P`` warps splitting each octet's steps (each warp keeps ``D`` steps of loads in flight
in registers); at the end of a round each warp stores its fragment sums plus its share of the octet's outliers in
its own shared-memory slot and the block adds the slots and writes the rows. The dequantization kernel
``spqr_octet_dequant`` writes the dense weight for the prefill path.

The streaming decode kernel ``spqr_octet_stream`` (1-2 rows, sm_90+): whole octets split evenly over the blocks of
a persistent grid and each block's (octet, step) items evenly over its warps (stream-K inside the block), each warp
streaming its items through its own ring of shared-memory stages filled by bulk copies (``cp.async.bulk`` with an
``mbarrier`` per stage): a stage is up to ``U`` steps of one octet plus those steps' outlier entries from ``sent``.
An octet shared by neighbouring warps is summed by the last contributor to arrive (a shared-memory counter), in
warp order. Faster than ``spqr_octet_gemv`` at 1 row of the MLP shapes (4096 -> 11008,
11008 -> 4096), slower on square layers and at 4 rows (``benchmarks/results/spqr_speed_stream.md``);
``kernels.spqr.cuda_path`` picks between them.

The chunked decode kernel ``spqr_octet_split`` (up to 16 rows, sm_90+): the same streaming, with the input dimension
cut into chunks whose activations (all rows) fit one block's shared memory and the chunks of an octet summed by the
block that finishes it last (a counter per octet; partial sums in a scratch); the outliers are added to the decoded
weights (fp16) before the ``mma`` instead of being multiplied separately, so 16 rows cost about what one does.
Faster than ``spqr_octet_gemv`` from 8 rows and on layers with 8,192+ inputs from 3
(``benchmarks/results/spqr_speed_split.md``).

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

from .cuda_rt import capability, cdiv, compiled, launch, on_device, render, sm_count, smem_limit
from .spqr_cuda import _recenter_outliers, dequantize_launch

__all__ = [
    "MAX_ROWS",
    "octet_layout",
    "octet_source",
    "octet_supported",
    "rows_per_launch",
    "spqr_octet_dequant",
    "spqr_octet_gemv",
    "spqr_octet_split",
    "spqr_octet_stream",
    "SPLIT_ROWS",
    "split_launch",
    "split_plan",
    "split_smem_bytes",
    "STREAM_ROWS",
    "stream_launch",
]

MAX_ROWS = 16  # activation rows of one launch: the m16 side of the mma
_STATIC_SMEM = 256  # the kernels' static shared memory (rmax, rscale, rinv: 192 bytes; ptxas -v reports 256)
_SMEM_SET: dict[int, int] = {}  # dynamic shared memory each compiled kernel has opted in to
# Phases of spqr_octet_stream left out, for the time breakdown of benchmarks/spqr_speed.py --stream-breakdown only
# (the results are then wrong): "compute" (decode + mma; the stage is still read), "outliers", "fixup" (shared
# octets written as if whole), "onecopy" (one bulk copy of the stage's bytes instead of three).
_SKIP: frozenset[str] = frozenset()
# spqr_octet_split's correction tile (module setting, so that the benchmark can compare them): "interleaved" (the
# default: each 16-byte read covers 512 contiguous bytes of the warp, 4 wavefronts; only the entries written are
# cleared, once per stage) or "lane" (each lane's 16 corrections in 32 bytes in a row, read and zeroed with two
# 16-byte accesses per step: 8 shared-memory wavefronts each). Measured on the H200 (spqr_speed_split_s13.md, session
# 13): "interleaved" 1.0-1.18x faster, most at 1-4 rows.
_SPLIT_TILE = "interleaved"
# spqr_octet_split with clock64() timers (benchmarks/spqr_speed.py --split-timing only): the kernel takes one more
# parameter and writes each warp's cycles (all, waiting for stages, staging activations, finishing octets, writing
# corrections, running steps, after the steps) to _SPLIT_TIMES[0] (an int64 tensor of 8 per warp that the caller sets)
_SPLIT_TIMING = False
_SPLIT_TIMES: list[torch.Tensor] = []

_SOURCE = r"""
{SKIP}
#define W_ {W}                 // warps per block
#define P_ {P}                 // warps per octet (they split its steps); divides W_
#define D_ {D}                 // steps of loads each warp keeps in flight
#define U_ {U}                 // spqr_octet_stream: steps per ring stage
#define R_ {R}                 // spqr_octet_stream: ring stages per warp
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

// the outlier corrections of a lane's 16 weights (fp16; q0: columns 0-7 of its slice, q1: 8-15, in order) added to
// the B fragments decode_step made of them
__device__ __forceinline__ void add_corrections(u32 (*b)[2], uint4 q0, uint4 q1) {
    b[0][0] = hadd2(b[0][0], q0.x);
    b[0][1] = hadd2(b[0][1], q0.y);
    b[1][0] = hadd2(b[1][0], q0.z);
    b[1][1] = hadd2(b[1][1], q0.w);
    b[2][0] = hadd2(b[2][0], q1.x);
    b[2][1] = hadd2(b[2][1], q1.y);
    b[3][0] = hadd2(b[3][0], q1.z);
    b[3][1] = hadd2(b[3][1], q1.w);
}

__device__ __forceinline__ void mma_f16(float* c, uint4 a, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

// *p += v, returning the old value, with release and acquire semantics at GPU scope
__device__ __forceinline__ int atom_add_acq_rel(int* p, int v) {
    int old;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
    return old;
}

// e such that a row whose largest magnitude is mx, scaled by 2^e, has its largest magnitude in [2^13, 2^14) (exact,
// far from fp16's limits); 0 for an all-zero or non-finite row, |e| <= 120
__device__ __forceinline__ int scale_exponent(float mx) {
    int e = 0;
    if (mx > 0.f && mx <= 3.0e38f) {
        int ex;
        frexpf(mx, &ex);
        e = min(max(14 - ex, -120), 120);
    }
    return e;
}

// a warp's arrival at counters[i], shared by n pieces, after its stores: lane 0's release-acquire count, broadcast;
// true for the warp that arrives last, whose lanes may then read the other pieces' stores (CUTLASS's semaphore
// pattern at warp scope)
__device__ __forceinline__ bool warp_arrives_last(int* counters, int i, int n) {
    __syncwarp();
    int old = 0;
    if ((threadIdx.x & 31) == 0) old = atom_add_acq_rel(counters + i, 1);
    old = __shfl_sync(0xffffffffu, old, 0);
    if (old != n - 1) return false;
    __syncwarp();
    return true;
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

#define XR 16                  // activation rows a launch takes at most

// a batch of the chunk's activations: the SB columns k0 + i W_ 32 of rows 0..M-1 (M <= RB) into shared memory
// (xs_index, the column relative to the chunk) and their magnitudes into mx: the SB permutation entries are loaded
// first, then all RB x SB values (independent loads, in flight together: two memory round trips per batch)
template <int RB, int SB>
__device__ __forceinline__ void stage_batch(const u16* __restrict__ x, const int* __restrict__ perm, u16* xs, int M,
                                            int K, int c0, int KPc, int RSB, int sx, int k0, float* mx) {
    int src[SB];
#pragma unroll
    for (int i = 0; i < SB; ++i) {
        const int kk = k0 + i * W_ * 32, j = c0 + kk;
        src[i] = kk < KPc && j < K ? (perm ? __ldg(perm + j) : j) : -1;
    }
    u16 v[RB][SB];
#pragma unroll
    for (int m = 0; m < RB; ++m)
#pragma unroll
        for (int i = 0; i < SB; ++i) v[m][i] = m < M && src[i] >= 0 ? __ldg(x + (long long)m * sx + src[i]) : (u16)0;
#pragma unroll
    for (int m = 0; m < RB; ++m)
#pragma unroll
        for (int i = 0; i < SB; ++i) {
            const int kk = k0 + i * W_ * 32;
            if (m < M && kk < KPc) {
                xs[xs_index(m, kk, RSB)] = v[m][i];
                mx[m] = fmaxf(mx[m], fabsf(act_f(v[m][i])));
            }
        }
}

// the activations (layout above) of stored columns [c0, c0 + KPc) of rows 0..M-1 (M <= 16), gathered by perm, into
// shared memory (xs_index with the column taken relative to c0), each row m scaled by 2^e so that its largest magnitude in the chunk lies in
// [2^13, 2^14): rscale[m] = 2^e, rinv[m] = 2^-e. Called by the whole block.
__device__ void stage_chunk(const u16* __restrict__ x, const int* __restrict__ perm, u16* xs, int M, int K, int c0,
                            int KPc, int RSB, int sx, float* rmax, float* rscale, float* rinv) {
    const int lane = threadIdx.x & 31;
    if (threadIdx.x < XR) rmax[threadIdx.x] = 0.f;
    __syncthreads();
    float mx[XR];
#pragma unroll
    for (int m = 0; m < XR; ++m) mx[m] = 0.f;
    if (M <= 2) {
        for (int k0 = threadIdx.x; k0 < KPc; k0 += 8 * W_ * 32) stage_batch<2, 8>(x, perm, xs, M, K, c0, KPc, RSB, sx, k0, mx);
    } else if (M <= 4) {
        for (int k0 = threadIdx.x; k0 < KPc; k0 += 4 * W_ * 32) stage_batch<4, 4>(x, perm, xs, M, K, c0, KPc, RSB, sx, k0, mx);
    } else {
        for (int k0 = threadIdx.x; k0 < KPc; k0 += 2 * W_ * 32) stage_batch<XR, 2>(x, perm, xs, M, K, c0, KPc, RSB, sx, k0, mx);
    }
#pragma unroll
    for (int m = 0; m < XR; ++m) {
        if (m < M) {  // M is the same for the whole block: the shuffles run in whole warps
            float v = mx[m];
#pragma unroll
            for (int off = 16; off; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
            if (lane == 0) atomicMax((int*)&rmax[m], __float_as_int(v));  // non-negative: int order is float order
        }
    }
    __syncthreads();
    if (threadIdx.x < M) {
        const int e = scale_exponent(rmax[threadIdx.x]);
        rscale[threadIdx.x] = ldexpf(1.f, e);
        rinv[threadIdx.x] = ldexpf(1.f, -e);
    }
    __syncthreads();
    for (int m = 0; m < M; ++m) {
        const float sc = rscale[m];
        for (int k = threadIdx.x; k < KPc; k += W_ * 32) {
            const int ix = xs_index(m, k, RSB);
            xs[ix] = half_from_f(act_f(xs[ix]) * sc);
        }
    }
    __syncthreads();
}

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

    stage_chunk(x, perm, xs, M, K, 0, KP, RSB, sx, rmax, rscale, rinv);

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

// ---- the streaming decode kernel (spqr_octet_stream): bulk copies into per-warp shared-memory rings ----
#define SM_ 2                              // activation rows per launch (the per-lane outlier sums hold 8 x SM_)
#define CAPO (U_ * 16)                     // outlier entries a stage holds (~9 per step at 1.7%); more: global
#define STAGE_BYTES (U_ * 384 + 16)        // codes U_ x 256, stats U_ x 32, stats2 U_ x 32, header, outliers

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(u32 bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar) : "memory");
}

// one arrival that also expects `bytes` of bulk copies to land before the phase completes
__device__ __forceinline__ void mbar_expect(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

// global -> shared without registers (the TMA unit; 16-byte aligned addresses, a multiple of 16 bytes)
__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

// wait for the phase of parity `phase` of the barrier; a stream that never lands traps (an error, not a hang)
__device__ __forceinline__ void mbar_wait(u32 bar, u32 phase) {
    for (int spin = 0;; ++spin) {
        u32 ok;
        asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
                     : "=r"(ok) : "r"(bar), "r"(phase) : "memory");
        if (ok) return;
        if (spin > (1 << 22)) __trap();
    }
}

// a / b and a % b for item counts and indices (0 <= a < 2^32, 0 < b < 2^32; the hosts check the layer's range, see
// _check_index_range): 32-bit unsigned division, a few instructions inline, instead of the 64-bit division routine
// (a call of about 70 instructions, 26 call sites in spqr_octet_split, most of them in every warp's prologue)
__device__ __forceinline__ long long udiv32(long long a, long long b) { return (long long)((u32)a / (u32)b); }
__device__ __forceinline__ long long umod32(long long a, long long b) { return (long long)((u32)a % (u32)b); }

// the first item of warp w of a block whose W_ warps split the TB items from B0 evenly (an empty range when TB < W_)
__device__ __forceinline__ long long warp_begin(int w, long long B0, long long TB) { return B0 + w * TB / W_; }

// the last warp of the block whose range begins at or before item i
__device__ __forceinline__ int item_owner(long long i, long long B0, long long TB) {
    return (int)udiv32((i - B0 + 1) * W_ + TB - 1, TB) - 1;
}

// a warp's partial sums wred[0 .. 8M) of octet o, which other warps of its block share, into its slot of part (SLOT
// floats; slot 0: o is its first octet, 1: its last), counted in cntb (one counter per octet of the block from ob0).
// True for the warp that arrives last; wf, wl: the first and last warps of the block whose items touch o.
__device__ __forceinline__ bool shared_octet_arrive(const float* wred, float* part, int* cntb, int o, int ob0,
                                                    int first_oct, int M, int SLOT, long long B0, long long TB,
                                                    int KS, int& wf, int& wl) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* pp = part + (warp * 2 + (o == first_oct ? 0 : 1)) * SLOT;
    for (int e = lane; e < 8 * M; e += 32) pp[e] = wred[e];
    __syncwarp();
    int old = 0;
    if (lane == 0) {
        __threadfence_block();
        old = atomicAdd(cntb + (o - ob0), 1);
        __threadfence_block();
    }
    old = __shfl_sync(0xffffffffu, old, 0);
    wf = item_owner((long long)o * KS, B0, TB);
    wl = item_owner((long long)o * KS + KS - 1, B0, TB);
    int nc = 0;
    for (int w = wf; w <= wl; ++w) nc += warp_begin(w, B0, TB) < warp_begin(w + 1, B0, TB);
    return old == nc - 1;
}

// element e of octet o's sums: the slots of the warps wf..wl that hold a share of it, added in warp order
__device__ __forceinline__ float shared_octet_sum(const float* part, int o, int e, int wf, int wl, int SLOT,
                                                  long long B0, long long TB, int KS) {
    float val = 0.f;
    for (int w = wf; w <= wl; ++w) {
        const long long wb = warp_begin(w, B0, TB);
        if (wb == warp_begin(w + 1, B0, TB)) continue;  // an empty warp
        const int sl = udiv32(wb, KS) == o ? 0 : 1;       // o is w's first octet, or its last
        val += ((volatile const float*)part)[(w * 2 + sl) * SLOT + e];
    }
    return val;
}

// the item after stage j of a warp with items [ib, ie): stages are up to U_ consecutive steps of one octet
__device__ __forceinline__ long long stage_end(long long ib, long long ie, int KS, long long j) {
    const long long o1end = min(ie, (udiv32(ib, KS) + 1) * KS), f = o1end - ib, n1 = (f + U_ - 1) / U_;
    if (j < n1) return ib + min((j + 1) * U_, f);
    const long long spo = (KS + U_ - 1) / U_, jj = j - n1;
    return min(ie, o1end + udiv32(jj, spo) * KS + min((umod32(jj, spo) + 1) * U_, (long long)KS));
}

// a ring producer's step past the stage it just issued (n_ steps): the next steps of its octet, else the next octet
// of the warp (KSX steps per octet), else done
#define PRODUCER_ADVANCE(KSX)                                                                      \
    p_s += n_;                                                                                     \
    if (p_s == p_send) {                                                                           \
        if (++p_oct > last_oct) {                                                                  \
            p_done = true;                                                                         \
        } else {                                                                                   \
            p_s = 0;                                                                               \
            p_send = (int)min((long long)(KSX), ie - (long long)p_oct * (KSX));                    \
        }                                                                                          \
    }

// y (M, N) = x (M, K) W^T (+ bias), M <= SM_, on a persistent grid. Block b takes the whole octets
// [b NO / G, (b + 1) NO / G), and its warps split their NO_b x KS (octet, step) items evenly in octet-major order
// (stream-K inside the block), so every warp of a block gets the same number of steps whatever the shape; most of a
// warp's octets are whole, its first and last may be shared with its neighbours in the block.
// Each warp streams its items through its own ring of R_ stages in shared memory, filled by bulk copies (lane 0
// issues them; an mbarrier per stage counts the bytes in): a stage is up to U_ steps of one octet with the outlier
// entries of those steps (the step-sorted copy sent/sptr), so the outliers are spread as evenly as the steps. The
// stage's outlier range comes from sptr, read for 32 stages at a time one chunk ahead (lane j: stage 32 c + j).
// Every lane runs the same stage sequence twice: the producer R_ stages ahead (state p_*) and the consumer.
// An octet's sums go through the warp's slot of red; a shared octet's partial sums go to the warp's slot of part
// (two per warp: its first and its last octet), and the contributor that arrives last (shared-memory counter per
// octet of the block) adds them in warp order (deterministic) and writes the rows.
extern "C" __global__ void __launch_bounds__(W_ * 32) spqr_octet_stream(
    const u16* __restrict__ x, const int* __restrict__ perm, const uint2* __restrict__ codes,
    const u8* __restrict__ stats, const uint2* __restrict__ stats2, const u32* __restrict__ sent,
    const int* __restrict__ sptr, const u16* __restrict__ bias, u16* __restrict__ y, int M, int N, int K, int KS,
    int NO, int sx, int sy) {
    extern __shared__ __align__(128) char smem[];
    const int KP = KS * 64, RSB = KP * 4 + 64, PR = M;            // M <= SM_ < 8: one row per row pair
    u16* xs = (u16*)smem;                                          // PR row pairs of RSB bytes (a multiple of 64)
    char* ring = smem + PR * RSB;                                  // [W_][R_] stages
    unsigned long long* bars = (unsigned long long*)(ring + W_ * R_ * STAGE_BYTES);  // [W_][R_]
    float* red = (float*)(bars + W_ * R_);                         // [W_][8][M]
    float* part = red + W_ * 8 * M;                                // [W_][2][8 SM_]
    int* cntb = (int*)(part + W_ * 2 * 8 * SM_);                   // [octets of the block]
    __shared__ float rmax[16];
    __shared__ float rscale[16];
    __shared__ float rinv[16];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int ob0 = (int)udiv32((long long)blockIdx.x * NO, gridDim.x), ob1 = (int)udiv32((long long)(blockIdx.x + 1) * NO, gridDim.x);
    const long long B0 = (long long)ob0 * KS, TB = (long long)(ob1 - ob0) * KS;
    const long long ib = warp_begin(warp, B0, TB), ie = warp_begin(warp + 1, B0, TB);  // this warp's items
    const bool active = ib < ie;
    const int first_oct = (int)udiv32(ib, KS), last_oct = active ? (int)udiv32(ie - 1, KS) : first_oct - 1;
    char* wring = ring + warp * R_ * STAGE_BYTES;
    const u32 wring_s = smem_addr(wring), wbar = smem_addr(bars + warp * R_);
    float* wred = red + warp * 8 * M;
    for (int i = threadIdx.x; i < ob1 - ob0; i += W_ * 32) cntb[i] = 0;  // before stage_chunk's barriers

    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R_; ++r) mbar_init(wbar + 8 * r);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncwarp();

    // producer: the next stage is steps [p_s, min(p_s + U_, p_send)) of octet p_oct, stage p_j of the warp, its
    // outlier entries from p_lo; lane j's bnd_cur / bnd_next: the first entry after stage 32 c + j / 32 (c + 1) + j
    int p_oct = first_oct, p_s = (int)umod32(ib, KS), p_send = (int)min((long long)KS, ie - (long long)first_oct * KS);
    int p_j = 0;
    bool p_done = !active;
    int p_lo = sptr[ib];
    int bnd_cur = sptr[stage_end(ib, ie, KS, lane)], bnd_next = sptr[stage_end(ib, ie, KS, 32 + lane)];
#ifndef SKIP_ONECOPY
#define STAGE_COPY                                                                                 \
    bulk_copy(dst_, codes + it_ * 32, n_ * 256, bar_);                                             \
    bulk_copy(dst_ + U_ * 256, stats + it_ * 32, n_ * 32, bar_);                                   \
    bulk_copy(dst_ + U_ * 288, stats2 + ((long long)(p_oct >> 1) * KS + p_s) * 4, n_ * 32, bar_);
#else
#define STAGE_COPY                                                                                 \
    bulk_copy(dst_, (const char*)codes + (((it_ * 320) % ((long long)NO * KS * 256 - U_ * 320)) & ~15LL), \
              n_ * 320, bar_);
#endif
#ifdef SKIP_OUTLIERS
#define HAS_OUTLIERS 0
#else
#define HAS_OUTLIERS 1
#endif
#define PRODUCE(ST)                                                                                \
    if (!p_done) {                                                                                 \
        const u32 bar_ = wbar + 8 * (ST), dst_ = wring_s + (ST) * STAGE_BYTES;                     \
        const int n_ = min(U_, p_send - p_s);                                                      \
        const int hi_ = __shfl_sync(0xffffffffu, bnd_cur, p_j & 31);                               \
        if (lane == 0) {                                                                           \
            const long long it_ = (long long)p_oct * KS + p_s;                                     \
            const int a0_ = p_lo & ~3, a1_ = min((hi_ + 3) & ~3, a0_ + CAPO);                      \
            const int ob_ = HAS_OUTLIERS && hi_ > p_lo ? (a1_ - a0_) * 4 : 0;                      \
            *(int4*)(wring + (ST) * STAGE_BYTES + U_ * 320) = make_int4(p_lo, hi_, a0_, 0);        \
            mbar_expect(bar_, n_ * 320 + ob_);                                                     \
            STAGE_COPY                                                                             \
            if (ob_) bulk_copy(dst_ + U_ * 320 + 16, sent + a0_, ob_, bar_);                       \
        }                                                                                          \
        p_lo = hi_;                                                                                \
        if ((++p_j & 31) == 0) {                                                                   \
            bnd_cur = bnd_next;                                                                    \
            bnd_next = sptr[stage_end(ib, ie, KS, p_j + 32 + lane)];                               \
        }                                                                                          \
        PRODUCER_ADVANCE(KS)                                                                       \
    }
    // the activations first, then the ring's first stages: staged after the ring, the activations' loads waited
    // behind every warp's first bulk copies (ncu, session 16: the largest single stall of a warp's start).
    // Measured on the H200 against the other order, same bits: 2.6-4.8% faster at every shape and row count of
    // both streaming kernels (benchmarks/results/spqr_octet_stage_order_s16.md)
    stage_chunk(x, perm, xs, M, K, 0, KP, RSB, sx, rmax, rscale, rinv);
#pragma unroll
    for (int r = 0; r < R_; ++r) PRODUCE(r);

    const char* xlane = smem + (g < PR ? g : 0) * RSB + t * 16;
    int k = 0;  // stages consumed
    for (int o = first_oct; o <= last_oct; ++o) {
        const int s_begin = o == first_oct ? (int)umod32(ib, KS) : 0;
        const int s_end = (int)min((long long)KS, ie - (long long)o * KS);
        float acc0[4] = {0.f, 0.f, 0.f, 0.f}, acc1[4] = {0.f, 0.f, 0.f, 0.f};
        float os[SM_][8];  // this lane's outlier sums: activation row, weight row of the octet
#pragma unroll
        for (int m = 0; m < SM_; ++m)
#pragma unroll
            for (int r = 0; r < 8; ++r) os[m][r] = 0.f;
        for (int s0 = s_begin; s0 < s_end; s0 += U_) {
            const int n = min(U_, s_end - s0), st = k % R_;
            mbar_wait(wbar + 8 * st, (k / R_) & 1);
            const char* sp = wring + st * STAGE_BYTES;
            const uint2* cw = (const uint2*)sp;
            const u8* sb = (const u8*)(sp + U_ * 256);
            const uint2* s2 = (const uint2*)(sp + U_ * 288);
            const char* xp0 = xlane + s0 * 256;
#pragma unroll
            for (int u = 0; u < U_; ++u) {
                if (u < n) {
#ifndef SKIP_COMPUTE
                    u32 b[4][2];
                    decode_step(b, cw[u * 32 + lane], sb[u * 32 + lane], s2[u * 4 + t]);
                    const uint4* xp = (const uint4*)(xp0 + u * 256);
                    mma_f16(acc0, xp[0], b[0][0], b[0][1]);
                    mma_f16(acc1, xp[4], b[1][0], b[1][1]);
                    mma_f16(acc0, xp[8], b[2][0], b[2][1]);
                    mma_f16(acc1, xp[12], b[3][0], b[3][1]);
#else
                    acc0[0] += (float)(cw[u * 32 + lane].x ^ sb[u * 32 + lane] ^ s2[u * 4 + t].x);
#endif
                }
            }
            if (HAS_OUTLIERS) {  // the stage's outliers, spread over the lanes
                const int4 hd = *(const int4*)(sp + U_ * 320);  // first, end, first copied entry
                const u32* oe = (const u32*)(sp + U_ * 320 + 16);
                for (int e = hd.x + lane; e < hd.y; e += 32) {
                    const u32 ent = e < hd.z + CAPO ? oe[e - hd.z] : sent[e];
                    const int r = (ent >> 6) & 7, sm = (ent >> 9) & 127;
                    const int ix = xs_index(0, (s0 + ((sm - s0) & 127)) * 64 + (ent & 63), RSB);
                    const float v = half_f((u16)(ent >> 16));
#pragma unroll
                    for (int m = 0; m < SM_; ++m) {
                        if (m < M) {
                            const float p = v * half_f(xs[ix + m * (RSB >> 1)]);
#pragma unroll
                            for (int rr = 0; rr < 8; ++rr)
                                if (rr == r) os[m][rr] += p;
                        }
                    }
                }
            }
            __syncwarp();  // every lane has read the stage: it may be refilled
            if (lane == 0) asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            PRODUCE(st);
            ++k;
        }
        // C fragment: c0 = (activation row g, weight row 2t), c1 = (g, 2t + 1)
        if (g < M) {
            wred[(2 * t) * M + g] = acc0[0] + acc1[0];
            wred[(2 * t + 1) * M + g] = acc0[1] + acc1[1];
        }
        if (HAS_OUTLIERS) {  // the outlier sums over the warp; lane r < 8 adds weight row r's
#pragma unroll
            for (int m = 0; m < SM_; ++m) {
                float mine = 0.f;
#pragma unroll
                for (int rr = 0; rr < 8; ++rr) {
                    float v = os[m][rr];
#pragma unroll
                    for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
                    if (lane == rr) mine = v;
                }
                __syncwarp();
                if (m < M && lane < 8) wred[lane * M + m] += mine;
            }
        }
        __syncwarp();
#ifdef SKIP_FIXUP
        if (true) {
#else
        if (s_begin == 0 && s_end == KS) {  // a whole octet: write its rows
#endif
            for (int e = lane; e < 8 * M; e += 32) {
                const int row = o * 8 + e / M, m = e % M;
                if (row < N) {
                    float val = wred[e] * rinv[m];
                    if (bias) val += act_f(bias[row]);
                    y[(long long)m * sy + row] = act_from_f(val);
                }
            }
        } else {  // shared: partial sums to this warp's slot; the last to arrive adds all of them in warp order
            int wf, wl;
            if (shared_octet_arrive(wred, part, cntb, o, ob0, first_oct, M, 8 * SM_, B0, TB, KS, wf, wl)) {
                __syncwarp();
                for (int e = lane; e < 8 * M; e += 32) {
                    float val = shared_octet_sum(part, o, e, wf, wl, 8 * SM_, B0, TB, KS);
                    const int row = o * 8 + e / M, m = e % M;
                    if (row < N) {
                        val *= rinv[m];
                        if (bias) val += act_f(bias[row]);
                        y[(long long)m * sy + row] = act_from_f(val);
                    }
                }
            }
        }
        __syncwarp();  // wred is rewritten by the next octet
    }
}

// the dense weight (N, K) in stored column order and the activation dtype, outliers not added: one warp per step
extern "C" __global__ void spqr_octet_dequant(const uint2* __restrict__ codes, const u8* __restrict__ stats,
                                              const uint2* __restrict__ stats2, u32* __restrict__ out, int N,
                                              int K, int KS, int NO) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const long long it = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (it >= (long long)NO * KS) return;
    const int oct = (int)udiv32(it, KS), s = (int)umod32(it, KS);
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


_SPLIT_SOURCE = r"""
// ---- spqr_octet_split: up to 16 activation rows; the input dimension split into chunks over the blocks ----
#define TILE_IL {TILE_IL}          // correction tile order: 0 lane-major, 1 interleaved (see _SPLIT_TILE)
// the half of a step's 8 x 64 correction tile that entry en (column | row << 6 in its low 9 bits) goes to. Lane
// (g, t) reads the 16 columns 16 t .. 16 t + 15 of row g, i.e. halves 16 lane .. 16 lane + 15 of the row-major tile.
// Lane-major: those 32 bytes in a row (two 16-byte loads 32 bytes apart per lane: 8 wavefronts each). Interleaved:
// the first 8 of every lane, then the second 8 (each load 512 contiguous bytes: 4 wavefronts).
// SPLIT_TIMING (spqr_speed --split-timing only): each warp's SM cycles in all, waiting for its stages, staging the
// activations, finishing octets, writing a stage's corrections into the tile, running its steps and what follows
// them (clearing the tile, refilling the stage), in timing[(block W_ + warp) 8 + 0..6] (an extra kernel parameter)
#define SPLIT_TIMING {TIMING}
#if SPLIT_TIMING
#define TIMING_PARAM long long* __restrict__ timing,
#define TIMING_START long long t_all = clock64(), t_wait = 0, t_stage = 0, t_finish = 0, t_corr = 0, t_steps = 0, t_after = 0;
#define TIMED(ACC, CALL) { const long long t0_ = clock64(); CALL; ACC += clock64() - t0_; }
#define TIMING_END                                                                                 \
    if ((threadIdx.x & 31) == 0) {                                                                 \
        long long* tw_ = timing + ((long long)blockIdx.x * W_ + (threadIdx.x >> 5)) * 8;           \
        tw_[0] = clock64() - t_all; tw_[1] = t_wait; tw_[2] = t_stage; tw_[3] = t_finish;          \
        tw_[4] = t_corr; tw_[5] = t_steps; tw_[6] = t_after; tw_[7] = 0;                           \
    }
#else
#define TIMING_PARAM
#define TIMING_START
#define TIMED(ACC, CALL) CALL;
#define TIMING_END
#endif
#if TILE_IL
#define TILE_POS(en) (((((en) >> 3) & 1u) << 8) | ((((en) >> 4) & 31u) << 3) | ((en) & 7u))
#else
#define TILE_POS(en) ((en) & 511u)
#endif

// step u of a ring stage: decode the lane's 16 weights (codes cw, statistics sb and s2), add their outlier
// corrections from the warp's tile (TILE_IL: read only, cleared after the stage; else read and zeroed here) and run
// the step's four mma against the activations at xp0 + u * 256
__device__ __forceinline__ void split_step(const uint2* cw, const u8* sb, const uint2* s2, u16* wtile, const char* xp0,
                                           int u, int lane, int t, float* acc0, float* acc1) {
    u32 b[4][2];
    decode_step(b, cw[u * 32 + lane], sb[u * 32 + lane], s2[u * 4 + t]);
#if TILE_IL
    const uint4* tl = (const uint4*)(wtile + u * 512);  // this lane's 16: columns 0-7, then 8-15
    const uint4 q0 = tl[lane], q1 = tl[32 + lane];
#else
    uint4* tl = (uint4*)(wtile + u * 512) + 2 * lane;  // this lane's 16: row g, columns 16 t ..
    const uint4 q0 = tl[0], q1 = tl[1];
    tl[0] = make_uint4(0u, 0u, 0u, 0u);
    tl[1] = make_uint4(0u, 0u, 0u, 0u);
#endif
    add_corrections(b, q0, q1);
    const uint4* xp = (const uint4*)(xp0 + u * 256);
    mma_f16(acc0, xp[0], b[0][0], b[0][1]);
    mma_f16(acc1, xp[4], b[1][0], b[1][1]);
    mma_f16(acc0, xp[8], b[2][0], b[2][1]);
    mma_f16(acc1, xp[12], b[3][0], b[3][1]);
}

// the sums of octet o over this block's chunk, vals[e] = (weight row e / M, activation row e % M) in the scaled
// activations, finished by one warp: with one chunk (C = 1) written to y; else stored (unscaled) in this chunk's
// slot of scratch and counted in counters[o]; the chunk that arrives last adds the C slots in chunk order
// (deterministic), writes the rows and resets the counter for the next launch.
__device__ void finish_octet(int o, const float* vals, int M, int N, int NO, int C, int c, const float* rinv,
                             const u16* __restrict__ bias, u16* __restrict__ y, int sy, float* scratch,
                             int* counters) {
    const int lane = threadIdx.x & 31;
    if (C == 1) {
        for (int e = lane; e < 8 * M; e += 32) {
            const int row = o * 8 + e / M, m = e % M;
            if (row < N) {
                float v = vals[e] * rinv[m];
                if (bias) v += act_f(bias[row]);
                y[(long long)m * sy + row] = act_from_f(v);
            }
        }
        return;
    }
    float* mine = scratch + ((long long)c * NO + o) * (8 * M);
    for (int e = lane; e < 8 * M; e += 32) mine[e] = vals[e] * rinv[e % M];
    // the warp's stores, then its count; the last chunk's lanes read after its acquire (warp_arrives_last, in place of
    // two __threadfence: their membar.gl and L1 invalidation were about 4% of the stall samples at 16 rows, ncu,
    // session 16; measured 1.2-2.5% faster there, same bits: benchmarks/results/spqr_octet_stage_order_s16.md,
    // columns ring_*)
    if (!warp_arrives_last(counters, o, C)) return;
    for (int e = lane; e < 8 * M; e += 32) {
        const int row = o * 8 + e / M, m = e % M;
        float v = 0.f;
        for (int cc = 0; cc < C; ++cc) v += __ldcg(scratch + ((long long)cc * NO + o) * (8 * M) + e);
        if (row < N) {
            if (bias) v += act_f(bias[row]);
            y[(long long)m * sy + row] = act_from_f(v);
        }
    }
    if (lane == 0) counters[o] = 0;
}

// y (M, N) = x (M, K) W^T (+ bias), M <= 16, on a persistent grid of C x Gc blocks: the input dimension is cut into C
// chunks of KC steps (the last may be shorter) so that one chunk's activations of all M rows fit shared memory;
// block b works on chunk c = b / Gc and the whole octets [bb NO / Gc, (bb + 1) NO / Gc) (bb = b % Gc), its warps
// splitting the block's (octet, step of the chunk) items evenly as spqr_octet_stream does over whole octets, each
// streaming its items through its own ring of bulk-copied stages. The outliers are added to the weights before the
// mma (so any number of activation rows costs the same): when a stage lands, the lanes write its entries' fp16
// corrections into the warp's tile (U_ x 8 x 64 halves: step, row, column; one pass over the entries, spread over
// the lanes), then at each step every lane adds its 16 (the 16 halves of its B fragments, in order) and zeroes
// them. Octets split between warps of a block are summed by the last contributor (as in spqr_octet_stream), chunks
// by finish_octet.
extern "C" __global__ void __launch_bounds__(W_ * 32) spqr_octet_split(
    const u16* __restrict__ x, const int* __restrict__ perm, const uint2* __restrict__ codes,
    const u8* __restrict__ stats, const uint2* __restrict__ stats2, const u32* __restrict__ sent,
    const int* __restrict__ sptr, const u16* __restrict__ bias, u16* __restrict__ y, float* __restrict__ scratch,
    int* __restrict__ counters, TIMING_PARAM int M, int N, int K, int KS, int NO, int sx, int sy, int KC, int C) {
    extern __shared__ __align__(128) char smem[];
    TIMING_START
    const int RSB = KC * 256 + 64, PR = M < 8 ? M : 8;
    const int Gc = (int)gridDim.x / C, c = (int)blockIdx.x / Gc, bb = (int)blockIdx.x % Gc;
    const int soff = c * KC, KSc = min(KC, KS - soff);             // this chunk's first step and step count
    const int ob0 = (int)udiv32((long long)bb * NO, Gc), ob1 = (int)udiv32((long long)(bb + 1) * NO, Gc);
    if (ob0 == ob1 || KSc <= 0) return;                             // the whole block: no barrier is skipped
    u16* xs = (u16*)smem;                                           // PR row pairs of RSB bytes
    char* ring = smem + PR * RSB;                                   // [W_][R_] stages
    u16* tiles = (u16*)(ring + W_ * R_ * STAGE_BYTES);              // [W_][U_][8 x 64] fp16 corrections
    unsigned long long* bars = (unsigned long long*)(tiles + W_ * U_ * 512);  // [W_][R_]
    float* red = (float*)(bars + W_ * R_);                          // [W_][8][M]
    float* part = red + W_ * 8 * M;                                 // [W_][2][8 XR]
    int* cntb = (int*)(part + W_ * 2 * 8 * XR);                     // [octets of the block]
    __shared__ float rmax[XR];
    __shared__ float rscale[XR];
    __shared__ float rinv[XR];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const long long B0 = (long long)ob0 * KSc, TB = (long long)(ob1 - ob0) * KSc;
    const long long ib = warp_begin(warp, B0, TB), ie = warp_begin(warp + 1, B0, TB);  // this warp's items
    const bool active = ib < ie;
    const int first_oct = (int)udiv32(ib, KSc), last_oct = active ? (int)udiv32(ie - 1, KSc) : first_oct - 1;
    char* wring = ring + warp * R_ * STAGE_BYTES;
    const u32 wring_s = smem_addr(wring), wbar = smem_addr(bars + warp * R_);
    u16* wtile = tiles + warp * U_ * 512;
    float* wred = red + warp * 8 * M;
    for (int i = threadIdx.x; i < ob1 - ob0; i += W_ * 32) cntb[i] = 0;  // before stage_chunk's barriers
    for (int i = lane; i < U_ * 64; i += 32) ((uint4*)wtile)[i] = make_uint4(0u, 0u, 0u, 0u);

    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R_; ++r) mbar_init(wbar + 8 * r);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncwarp();

// item i of the chunk (octet-major, KSc steps per octet) -> item of the whole layer (KS steps per octet)
#define GITEM(I) (udiv32((I), KSc) * (long long)KS + soff + umod32((I), KSc))
// the outlier range [LO, HI) of stage J of this warp (empty past its last stage)
#define STAGE_BOUNDS(J, LO, HI)                                                                    \
    {                                                                                              \
        const long long e_ = stage_end(ib, ie, KSc, (J));                                          \
        const long long b_ = (J) == 0 ? ib : stage_end(ib, ie, KSc, (J) - 1);                      \
        LO = HI = 0;                                                                               \
        if (b_ < e_) {                                                                             \
            LO = sptr[GITEM(b_)];                                                                  \
            HI = sptr[GITEM(e_ - 1) + 1];                                                          \
        }                                                                                          \
    }
    // producer: the next stage is steps [p_s, min(p_s + U_, p_send)) of octet p_oct (steps of the chunk), stage p_j
    // of the warp; lane j's blo/bhi_cur (_next): the outlier range of stage 32 q + j (32 (q + 1) + j)
    int p_oct = first_oct, p_s = (int)umod32(ib, KSc), p_send = (int)min((long long)KSc, ie - (long long)first_oct * KSc);
    int p_j = 0;
    bool p_done = !active;
    int blo_cur, bhi_cur, blo_next, bhi_next;
    STAGE_BOUNDS(lane, blo_cur, bhi_cur);
    STAGE_BOUNDS(32 + lane, blo_next, bhi_next);
#define PRODUCE_SPLIT(ST)                                                                          \
    if (!p_done) {                                                                                 \
        const u32 bar_ = wbar + 8 * (ST), dst_ = wring_s + (ST) * STAGE_BYTES;                     \
        const int n_ = min(U_, p_send - p_s);                                                      \
        const int lo_ = __shfl_sync(0xffffffffu, blo_cur, p_j & 31);                               \
        const int hi_ = __shfl_sync(0xffffffffu, bhi_cur, p_j & 31);                               \
        if (lane == 0) {                                                                           \
            const long long it_ = (long long)p_oct * KS + soff + p_s;                              \
            const int a0_ = lo_ & ~3, a1_ = min((hi_ + 3) & ~3, a0_ + CAPO);                       \
            const int ob_ = hi_ > lo_ ? (a1_ - a0_) * 4 : 0;                                       \
            *(int4*)(wring + (ST) * STAGE_BYTES + U_ * 320) = make_int4(lo_, hi_, a0_, 0);         \
            mbar_expect(bar_, n_ * 320 + ob_);                                                     \
            bulk_copy(dst_, codes + it_ * 32, n_ * 256, bar_);                                     \
            bulk_copy(dst_ + U_ * 256, stats + it_ * 32, n_ * 32, bar_);                           \
            bulk_copy(dst_ + U_ * 288, stats2 + ((long long)(p_oct >> 1) * KS + soff + p_s) * 4, n_ * 32, bar_); \
            if (ob_) bulk_copy(dst_ + U_ * 320 + 16, sent + a0_, ob_, bar_);                       \
        }                                                                                          \
        if ((++p_j & 31) == 0) {                                                                   \
            blo_cur = blo_next;                                                                    \
            bhi_cur = bhi_next;                                                                    \
            STAGE_BOUNDS(p_j + 32 + lane, blo_next, bhi_next);                                     \
        }                                                                                          \
        PRODUCER_ADVANCE(KSc)                                                                      \
    }
    // the activations first, then the ring's first stages (why: spqr_octet_stream)
    TIMED(t_stage, stage_chunk(x, perm, xs, M, K, soff * 64, KSc * 64, RSB, sx, rmax, rscale, rinv));
#pragma unroll
    for (int r = 0; r < R_; ++r) PRODUCE_SPLIT(r);

    const char* xlane = smem + (g < PR ? g : 0) * RSB + t * 16;
    int k = 0;  // stages consumed
    for (int o = first_oct; o <= last_oct; ++o) {
        const int s_begin = o == first_oct ? (int)umod32(ib, KSc) : 0;
        const int s_end = (int)min((long long)KSc, ie - (long long)o * KSc);
        float acc0[4] = {0.f, 0.f, 0.f, 0.f}, acc1[4] = {0.f, 0.f, 0.f, 0.f};
        for (int s0 = s_begin; s0 < s_end; s0 += U_) {
            const int n = min(U_, s_end - s0), st = k % R_;
            TIMED(t_wait, mbar_wait(wbar + 8 * st, (k / R_) & 1));
            const char* sp = wring + st * STAGE_BYTES;
            const uint2* cw = (const uint2*)sp;
            const u8* sb = (const u8*)(sp + U_ * 256);
            const uint2* s2 = (const uint2*)(sp + U_ * 288);
            const int4 hd = *(const int4*)(sp + U_ * 320);  // first, end, first copied entry
            const u32* oe = (const u32*)(sp + U_ * 320 + 16);
            const int gs0 = soff + s0;                                // the stage's first step in the layer
            const int cend = min(hd.y, hd.z + CAPO);                  // entries past cend: only in global memory
#if SPLIT_TIMING
            const long long t0c_ = clock64();
#endif
            for (int e = hd.x + lane; e < hd.y; e += 32) {            // the stage's corrections into the tile
                const u32 en = e < cend ? oe[e - hd.z] : __ldg(sent + e);
                wtile[(((en >> 9) - (u32)gs0) & 127u) * 512 + TILE_POS(en)] = (u16)(en >> 16);
            }
            __syncwarp();
            const char* xp0 = xlane + s0 * 256;
#if SPLIT_TIMING
            const long long t1_ = clock64();
            t_corr += t1_ - t0c_;
#endif
            // a whole stage's steps as one unguarded block, so that the compiler may interleave their loads, decodes
            // and mma; a last, shorter stage with each step behind its own guard (the same operations, same bits).
            // Measured on the H200 against all stages guarded (spqr_speed_split_fast_s15.md): 0.4-2.4% faster at 13
            // of 15 shapes and row counts, 0.4-0.6% slower at the other two
            if (n == U_) {
#pragma unroll
                for (int u = 0; u < U_; ++u) split_step(cw, sb, s2, wtile, xp0, u, lane, t, acc0, acc1);
            } else {
#pragma unroll
                for (int u = 0; u < U_; ++u) {
                    if (u < n) split_step(cw, sb, s2, wtile, xp0, u, lane, t, acc0, acc1);
                }
            }
#if SPLIT_TIMING
            const long long t2_ = clock64();
            t_steps += t2_ - t1_;
#endif
#if TILE_IL
            __syncwarp();  // every lane has read its corrections: clear the ones written (not the whole tile)
            for (int e = hd.x + lane; e < hd.y; e += 32) {
                const u32 en = e < cend ? oe[e - hd.z] : __ldg(sent + e);
                wtile[(((en >> 9) - (u32)gs0) & 127u) * 512 + TILE_POS(en)] = 0;
            }
#endif
            __syncwarp();  // every lane has read the stage: it may be refilled
            if (lane == 0) asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            PRODUCE_SPLIT(st);
#if SPLIT_TIMING
            t_after += clock64() - t2_;
#endif
            ++k;
        }
        // C fragment: c0 = (activation row g, weight row 2t), c1 = (g, 2t + 1), c2/c3 the same for row g + 8
        if (g < M) {
            wred[(2 * t) * M + g] = acc0[0] + acc1[0];
            wred[(2 * t + 1) * M + g] = acc0[1] + acc1[1];
        }
        if (g + 8 < M) {
            wred[(2 * t) * M + g + 8] = acc0[2] + acc1[2];
            wred[(2 * t + 1) * M + g + 8] = acc0[3] + acc1[3];
        }
        __syncwarp();
        if (s_begin == 0 && s_end == KSc) {  // a whole octet (of this chunk)
            TIMED(t_finish, finish_octet(o, wred, M, N, NO, C, c, rinv, bias, y, sy, scratch, counters));
        } else {  // shared: partial sums to this warp's slot; the last to arrive adds all of them in warp order
            int wf, wl;
            if (shared_octet_arrive(wred, part, cntb, o, ob0, first_oct, M, 8 * XR, B0, TB, KSc, wf, wl)) {
                __syncwarp();
                for (int e = lane; e < 8 * M; e += 32) wred[e] = shared_octet_sum(part, o, e, wf, wl, 8 * XR, B0, TB, KSc);
                __syncwarp();
                TIMED(t_finish, finish_octet(o, wred, M, N, NO, C, c, rinv, bias, y, sy, scratch, counters));
            }
        }
        __syncwarp();  // wred is rewritten by the next octet
    }
    TIMING_END
}
"""


def octet_source(
    *,
    warps: int,
    hi: bool,
    bf16: bool,
    per_octet: int = 1,
    depth: int = 1,
    stage_steps: int = 4,
    stages: int = 4,
    split: bool = False,
) -> str:
    """The CUDA source of the kernels: ``warps`` per block, ``hi`` (activation rows 8-15 present) and the
    activation dtype; for ``spqr_octet_gemv`` ``per_octet`` warps splitting each octet's steps (divides ``warps``)
    and ``depth`` steps of loads in flight per warp; for ``spqr_octet_stream`` and ``spqr_octet_split``
    ``stage_steps`` steps per ring stage and ``stages`` stages per warp; ``split`` adds ``spqr_octet_split``."""
    skip = "".join(f"#define SKIP_{p.upper()} 1\n" for p in sorted(_SKIP))
    if _SPLIT_TILE not in ("lane", "interleaved"):
        raise HfEffllmError(f"_SPLIT_TILE={_SPLIT_TILE!r} is not known; use 'lane' or 'interleaved'.")
    src = _SOURCE + _SPLIT_SOURCE if split else _SOURCE
    return render(
        src, W=warps, P=per_octet, D=depth, U=stage_steps, R=stages, HI=hi, BF16=bf16, SKIP=skip,
        TILE_IL=_SPLIT_TILE == "interleaved", TIMING=bool(_SPLIT_TIMING),
    )  # fmt: skip


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


def _as_int32(v: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values (int64) as the int32 of the same bits."""
    return ((v + 2**31) % 2**32 - 2**31).to(torch.int32)


def _ov_bits(ov: torch.Tensor) -> torch.Tensor:
    """The bits of fp16 values as int64 in [0, 65536)."""
    return ov.view(torch.int16).to(torch.int64) & 0xFFFF


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
    codes_l = _as_int32(words).contiguous()
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
    ent = cols | (_ov_bits(ov) << 16)
    # the outliers again, for spqr_octet_stream: sorted by (octet, step, row, column), each entry
    # column-in-step | row-in-octet << 6 | (step mod 128) << 9 | fp16 correction << 16, and the first entry of every
    # (octet, step) item in sptr (NO * KS + 1 values), so a run of items has a contiguous run of entries
    item = (orow // 8) * ks + cols // 64
    order = torch.argsort(item * (8 * 64) + (orow % 8) * 64 + cols % 64)
    sent = ((cols % 64) | ((orow % 8) << 6) | (((cols // 64) % 128) << 9) | (_ov_bits(ov) << 16))[order]
    sptr = torch.zeros(no * ks + 1, dtype=torch.int64, device=dev)
    sptr[1:] = torch.cumsum(torch.bincount(item, minlength=no * ks), 0)
    perm = tensors.get("perm")
    layout: dict[str, Any] = {
        "sent": torch.nn.functional.pad(_as_int32(sent), (0, -sent.numel() % 4)),  # 16-byte runs
        "sptr": sptr.to(torch.int32),
        "codes": codes_l.reshape(-1),
        "stats": stats_l.reshape(-1),
        "stats2": stats2_l.reshape(-1),
        "n": n,
        "k": k,
        "ks": ks,
        "no": no,
        # padded to a multiple of 4 entries: spqr_octet_stream copies 16-byte aligned runs
        "oent": torch.nn.functional.pad(_as_int32(ent), (0, -ent.numel() % 4)),
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
    """``(warps, per_octet, depth, blocks per SM)`` of :func:`spqr_octet_gemv` for a layer of ``octets`` octets and
    ``steps`` 64-column steps on ``device``: :func:`gemv_launch` with its SM count."""
    return gemv_launch(octets, steps, sm_count(device))


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def gemv_launch(octets: int, steps: int, sms: int) -> tuple[int, int, int, int]:
    """``(warps, per_octet, depth, blocks per SM)`` of :func:`spqr_octet_gemv` on a GPU of ``sms`` SMs.

    Layers of more than ``2 sms`` octets: 16 warps, 4 per octet, 4 steps in flight, one block per SM, the
    fastest launch of the H200 sweep at 1, 4 and 16 rows on 7 of the 9 shapes of
    ``benchmarks/results/spqr_speed_octet.md`` (4096 and 11008 features). Smaller layers would leave SMs idle with
    4 octets per block, so each block takes ``ceil(octets / sms)`` octets (one round; a power of two), each octet
    split over up to 16 warps (about 2 steps each, a power of two), with as many steps in flight as a warp has. On the
    H200 (``benchmarks/results/spqr_gemv_small.md``, SmolLM2-135M's four layer shapes, session 19) it is 1.12-1.39x
    faster than the large layers' launch at 1 row and 1.17-1.55x at 4 rows, within 2.3% of the fastest of 7 launches
    swept everywhere, and one decode step of that model 1.10x faster; on mid-sized layers
    (``benchmarks/results/spqr_gemv_mid_s19.md``: 2048 -> 2048, 2048 -> 512, 8192 -> 2048, 3072 -> 1024) 1.21-1.56x
    faster at 1 and 4 rows. (``kernels.spqr.cuda_path`` still sends 1-2 rows of layers with 4096+ inputs and a 2:1
    side ratio to ``spqr_octet_stream`` and 3-7 rows of layers with a side of 8192+ to ``spqr_octet_split``, as
    measured against the previous launch; not compared again.)

    Example:
        >>> gemv_launch(1376, 64, 132)  # 4096 -> 11008
        (16, 4, 4, 1)
        >>> gemv_launch(72, 9, 132)  # 576 -> 576
        (8, 8, 2, 1)
    """
    per_block = _pow2_at_least(cdiv(octets, sms))
    if per_block >= 4:
        return 16, 4, 4, 1
    per_octet = min(16 // per_block, _pow2_at_least(cdiv(steps, 2)))
    return per_block * per_octet, per_octet, max(1, min(4, cdiv(steps, per_octet))), 1


def _check(x: torch.Tensor, layout: dict[str, Any]) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise HfEffllmError(f"x.dtype={x.dtype} is not supported by the SpQR octet kernels; use float16 or bfloat16.")
    if x.shape[-1] != layout["k"]:
        raise HfEffllmError(f"x has {x.shape[-1]} features in its last dimension; this layer expects {layout['k']}.")
    if layout["codes"].device != x.device:
        raise HfEffllmError(
            f"the octet layout is on {layout['codes'].device} but x is on {x.device}; rebuild it with octet_layout()."
        )


def _check_index_range(no: int, ks: int, grid: int = 1) -> None:
    """The streaming kernels count (octet, step) items in 32 bits (``udiv32``): refuse a layer whose item counts
    could pass 2^32 (over about a million outputs at 65,536 inputs; no real layer comes near)."""
    if no * ks * 33 >= 2**32 or no * grid >= 2**32:
        raise HfEffllmError(
            f"a layer of {8 * no} outputs x {64 * ks} inputs ({no * ks} items, grid {grid}) is past the octet "
            f"kernels' 32-bit item counts; use kernel='cuda' (spqr_cuda) or the reference for it."
        )


def _rows(
    x: torch.Tensor, layout: dict[str, Any], kernel: str, max_rows: int | None = MAX_ROWS
) -> tuple[torch.Size, torch.Tensor, torch.Tensor]:
    """``(lead, x2, y)``: the leading shape, x as contiguous-row (rows, in) and the empty (rows, out) output; more
    than ``max_rows`` rows (None: any number) are refused."""
    _check(x, layout)
    lead, k = x.shape[:-1], layout["k"]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if max_rows is not None and x2.shape[0] > max_rows:
        raise HfEffllmError(f"x has {x2.shape[0]} rows; {kernel} takes at most {MAX_ROWS}.")
    return lead, x2, torch.empty(x2.shape[0], layout["n"], device=x.device, dtype=x.dtype)


def _bias(bias: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor | None:
    if bias is None:
        return None
    if bias.shape != (n,):
        raise HfEffllmError(f"bias has shape {tuple(bias.shape)}; expected ({n},).")
    return bias.to(dtype).contiguous()


def _kernel(key: tuple, device: torch.device, source: Any, name: str, smem: int) -> Any:
    """The compiled kernel ``name`` with ``smem`` bytes of dynamic shared memory opted in (above the default 48 KiB
    including the static 256)."""
    kern = compiled(key, device, source, name)
    need = max(smem, 48 * 1024) if smem + _STATIC_SMEM > 48 * 1024 else 0
    if need > _SMEM_SET.get(id(kern), 0):
        kern.set_shared_memory_config(need)
        _SMEM_SET[id(kern)] = need
    return kern


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
    lead, x2, y = _rows(x, layout, "spqr_octet_gemv")
    n, k, ks, no, m = layout["n"], layout["k"], layout["ks"], layout["no"], x2.shape[0]
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
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    bias = _bias(bias, n, x.dtype)
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

            gemv = _kernel(key, x.device, source, "spqr_octet_gemv", smem)
            launch(
                gemv, (grid, 1, 1), warps * 32, smem,
                [x2[m0:], layout.get("perm"), layout["codes"], layout["stats"], layout["stats2"], layout["oent"],
                 layout["optr"], bias, y[m0:]],
                [mc, n, k, ks, no, x2.stride(0), y.stride(0)],
            )  # fmt: skip
    return y.reshape(*lead, n)


STREAM_ROWS = 2  # activation rows one spqr_octet_stream launch takes (SM_: its per-lane outlier sums)


def stream_smem_bytes(rows: int, steps: int, warps: int, stage_steps: int, stages: int, octets: int = 0) -> int:
    """Dynamic shared memory of a ``spqr_octet_stream`` block: the activations (``rows`` of ``256 steps + 64``
    bytes), ``stages`` ring stages of ``384 stage_steps + 16`` bytes (codes, statistics, a header and room for 16
    outliers per step) and an 8-byte barrier per warp, ``8 x rows`` fp32 sums and two slots of ``8 x 2`` partial sums
    per warp, and a 4-byte counter per octet of the block (at most ``octets``)."""
    per_warp = stages * (stage_steps * 384 + 16 + 8) + 8 * rows * 4 + 2 * 8 * STREAM_ROWS * 4
    return rows * (steps * 256 + 64) + warps * per_warp + 4 * octets


def _check_ranges(*checks: tuple[str, int, int, int]) -> None:
    """Each ``(name, value, lo, hi)`` of a launch setting: refused with its name and value unless ``lo <= value <= hi``."""
    for name, value, lo, hi in checks:
        if not lo <= value <= hi:
            raise HfEffllmError(f"{name}={value} is out of range; use {lo} to {hi}.")


def _ring_launch(
    kernel: str, x: torch.Tensor, default: tuple[int, int, int, int], given: tuple[int | None, ...]
) -> tuple[int, int, int, int]:
    """``(warps, stage_steps, stages, blocks_per_sm)`` of a bulk-copy ring kernel (``spqr_octet_stream``,
    ``spqr_octet_split``): ``given`` where not None, else ``default``; checked, and the GPU checked for bulk copies."""
    if not x.is_cuda or capability(x.device) < (9, 0):
        raise HfEffllmError(
            f"{kernel} needs a CUDA GPU with bulk copies (compute capability 9.0+); x is on {x.device}. "
            f"Use spqr_octet_gemv on older GPUs."
        )
    warps, stage_steps, stages, blocks_per_sm = (d if g is None else g for d, g in zip(default, given))
    _check_ranges(("warps", warps, 1, 32), ("stage_steps", stage_steps, 1, 8), ("stages", stages, 2, 16))
    if blocks_per_sm < 1:
        raise HfEffllmError(f"blocks_per_sm={blocks_per_sm} must be >= 1.")
    return warps, stage_steps, stages, blocks_per_sm


def stream_launch(rows: int, steps: int, device: torch.device) -> tuple[int, int, int, int]:
    """``(warps, stage_steps, stages, blocks per SM)`` of :func:`spqr_octet_stream`: 16 warps, 8 steps per stage, 2
    stages, one block per SM, the fastest launch of the H200 sweep at 1 and 2 rows of 4096 -> 11008 (the shape
    ``kernels.spqr.cuda_path`` sends to this kernel; ``benchmarks/results/spqr_speed_stream.md``)."""
    return 16, 8, 2, 1


def spqr_octet_stream(
    x: torch.Tensor,
    layout: dict[str, Any],
    *,
    bias: torch.Tensor | None = None,
    warps: int | None = None,
    stage_steps: int | None = None,
    stages: int | None = None,
    blocks_per_sm: int | None = None,
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for at most 16 rows of activations, W in :func:`octet_layout`: the same function as
    :func:`spqr_octet_gemv`, computed by ``spqr_octet_stream`` (whole octets split evenly over the blocks of a
    persistent grid and their steps evenly over each block's warps; each warp's codes, statistics and outliers
    streamed by bulk copies through its own ring of shared-memory stages). Needs an sm_90 GPU (H100/H200); one launch
    per 2 rows.

    Args:
        x: (..., in_features) float16 or bfloat16, at most 16 rows in total.
        layout: the layer's :func:`octet_layout`.
        bias: optional (out_features,) bias.
        warps: warps per block (1-32); stage_steps: 64-column steps per ring stage (1-8); stages: ring stages per
            warp (2-16); blocks_per_sm: resident blocks per SM the grid is sized for. ``None``: :func:`stream_launch`.

    Returns:
        (..., out_features) in ``x.dtype``.
    """
    lead, x2, y = _rows(x, layout, "spqr_octet_stream")
    n, k, ks, no, m = layout["n"], layout["k"], layout["ks"], layout["no"], x2.shape[0]
    warps, stage_steps, stages, blocks_per_sm = _ring_launch(
        "spqr_octet_stream", x, stream_launch(m, ks, x.device), (warps, stage_steps, stages, blocks_per_sm)
    )
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    bias = _bias(bias, n, x.dtype)
    grid = min(blocks_per_sm * sm_count(x.device), no)
    _check_index_range(no, ks, grid)
    octets = cdiv(no, grid)
    limit = smem_limit(x.device) - _STATIC_SMEM
    per_launch = next(
        (r for r in range(STREAM_ROWS, 0, -1) if stream_smem_bytes(r, ks, warps, stage_steps, stages, octets) <= limit),
        0,
    )
    if per_launch == 0:
        raise HfEffllmError(
            f"one activation row of {k} features and {stages} stages of {stage_steps} steps for {warps} warps do not "
            f"fit one block's shared memory on this GPU; use fewer stages or spqr_octet_gemv."
        )
    bf16 = x.dtype == torch.bfloat16
    with on_device(x.device):
        for m0 in range(0, m, per_launch):
            mc = min(per_launch, m - m0)
            smem = stream_smem_bytes(mc, ks, warps, stage_steps, stages, octets)
            key = ("spqr_octet_stream", warps, stage_steps, stages, bf16, _SKIP)

            def source() -> str:
                return octet_source(warps=warps, hi=False, bf16=bf16, stage_steps=stage_steps, stages=stages)

            kern = _kernel(key, x.device, source, "spqr_octet_stream", smem)
            launch(
                kern, (grid, 1, 1), warps * 32, smem,
                [x2[m0:], layout.get("perm"), layout["codes"], layout["stats"], layout["stats2"], layout["sent"],
                 layout["sptr"], bias, y[m0:]],
                [mc, n, k, ks, no, x2.stride(0), y.stride(0)],
            )  # fmt: skip
    return y.reshape(*lead, n)


SPLIT_ROWS = 16  # activation rows one spqr_octet_split launch takes (the m16 side of the mma)


def split_smem_bytes(rows: int, chunk_steps: int, warps: int, stage_steps: int, stages: int, octets: int = 0) -> int:
    """Dynamic shared memory of a ``spqr_octet_split`` block: one chunk's activations (``min(rows, 8)`` row pairs
    of ``256 chunk_steps + 64`` bytes), per warp ``stages`` ring stages of ``384 stage_steps + 16`` bytes, a
    correction tile of 1 KiB per stage step, an 8-byte barrier per stage, ``8 x rows`` fp32 sums and two slots of
    ``8 x 16`` partial sums; and a 4-byte counter per octet of the block (at most ``octets``)."""
    per_warp = stages * (stage_steps * 384 + 16 + 8) + 1024 * stage_steps + 8 * rows * 4 + 2 * 8 * SPLIT_ROWS * 4
    return min(rows, 8) * (chunk_steps * 256 + 64) + warps * per_warp + 4 * octets


def split_launch(rows: int, steps: int, device: torch.device) -> tuple[int, int, int, int, int | None]:
    """``(warps, stage_steps, stages, blocks per SM, chunk_steps)`` of :func:`spqr_octet_split`: 16 warps, 4 steps
    per stage, 3 stages, one block per SM; from 8 rows chunks of 16 steps (the fastest of the H200 sweep at 8 and 16
    rows of 4096 -> 11008 and 4096 -> 4096, ``benchmarks/results/spqr_speed_split.md``), below that the fewest
    chunks that fit."""
    return 16, 4, 3, 1, (16 if rows >= 8 else None)


def split_plan(
    rows: int, steps: int, octets: int, warps: int, stage_steps: int, stages: int, blocks: int, limit: int,
    chunk_steps: int | None = None,
) -> tuple[int, int, int] | None:  # fmt: skip
    """``(chunks, chunk_steps, grid)`` of a :func:`spqr_octet_split` launch over ``steps`` 64-column steps and
    ``octets`` octets with ``blocks`` resident blocks: the fewest chunks whose block fits ``limit`` bytes of shared
    memory (or the given ``chunk_steps``), ``grid = chunks x (blocks // chunks)``; None when nothing fits."""
    candidates = [min(chunk_steps, steps)] if chunk_steps is not None else [cdiv(steps, c) for c in range(1, steps + 1)]
    for kc in candidates:
        chunks = cdiv(steps, kc)
        per_chunk = max(1, blocks // chunks)
        if split_smem_bytes(rows, kc, warps, stage_steps, stages, cdiv(octets, per_chunk)) <= limit:
            return chunks, kc, chunks * per_chunk
    return None


def spqr_octet_split(
    x: torch.Tensor,
    layout: dict[str, Any],
    *,
    bias: torch.Tensor | None = None,
    warps: int | None = None,
    stage_steps: int | None = None,
    stages: int | None = None,
    blocks_per_sm: int | None = None,
    chunk_steps: int | None = None,
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for at most 16 rows of activations, W in :func:`octet_layout`: the same function as
    :func:`spqr_octet_gemv`, computed by ``spqr_octet_split`` (sm_90+): the input dimension cut into chunks whose
    activations (all rows) fit one block's shared memory, each chunk's octets split over the blocks of a persistent
    grid and their steps over each block's warps, which stream codes, statistics and outliers by bulk copies; the
    outliers are added to the decoded weights before the ``mma``, so 16 rows cost about what one does. Chunks are
    summed by the last block to finish an octet (a counter per octet, kept in ``layout["split_counters"]`` and reset
    by the kernel: concurrent launches on one layout from several streams are not supported).

    Args:
        x: (..., in_features) float16 or bfloat16, any number of rows (one launch per 16).
        layout: the layer's :func:`octet_layout`.
        bias: optional (out_features,) bias.
        warps: warps per block (1-32); stage_steps: 64-column steps per ring stage (1-8); stages: ring stages per
            warp (2-16); blocks_per_sm: resident blocks per SM the grid is sized for; chunk_steps: 64-column steps
            per chunk (None: the fewest chunks that fit). All ``None``: :func:`split_launch`.

    Returns:
        (..., out_features) in ``x.dtype``.
    """
    lead, x2, y = _rows(x, layout, "spqr_octet_split", max_rows=None)  # one launch per 16 rows
    n, k, ks, no, m = layout["n"], layout["k"], layout["ks"], layout["no"], x2.shape[0]
    *default, c0 = split_launch(min(m, SPLIT_ROWS), ks, x.device)
    if (warps, stage_steps, stages, blocks_per_sm, chunk_steps) == (None,) * 5:
        chunk_steps = c0  # the default launch only: a given launch keeps the fewest chunks unless it names some
    warps, stage_steps, stages, blocks_per_sm = _ring_launch(
        "spqr_octet_split", x, tuple(default), (warps, stage_steps, stages, blocks_per_sm)
    )
    if chunk_steps is not None and chunk_steps < 1:
        raise HfEffllmError(f"chunk_steps={chunk_steps} must be >= 1 (64 input columns per step).")
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    bias = _bias(bias, n, x.dtype)
    limit = smem_limit(x.device) - _STATIC_SMEM
    plan = split_plan(
        min(m, SPLIT_ROWS), ks, no, warps, stage_steps, stages, blocks_per_sm * sm_count(x.device), limit, chunk_steps
    )
    if plan is None:
        raise HfEffllmError(
            f"{stages} stages of {stage_steps} steps for {warps} warps (chunk_steps={chunk_steps}) do not fit one "
            f"block's shared memory on this GPU; use fewer warps or stages."
        )
    chunks, kc, grid = plan
    _check_index_range(no, ks, grid)
    counters = layout.get("split_counters")
    if counters is None or counters.device != x.device or counters.numel() < no:
        counters = layout["split_counters"] = torch.zeros(no, dtype=torch.int32, device=x.device)
    bf16 = x.dtype == torch.bfloat16
    with on_device(x.device):
        for m0 in range(0, m, SPLIT_ROWS):
            mc = min(SPLIT_ROWS, m - m0)
            smem = split_smem_bytes(mc, kc, warps, stage_steps, stages, cdiv(no, grid // chunks))
            scratch = torch.empty(chunks * no * 8 * mc, dtype=torch.float32, device=x.device) if chunks > 1 else y
            key = ("spqr_octet_split", warps, stage_steps, stages, bf16, _SPLIT_TILE, _SPLIT_TIMING)

            def source() -> str:
                return octet_source(warps=warps, hi=True, bf16=bf16, stage_steps=stage_steps, stages=stages, split=True)

            kern = _kernel(key, x.device, source, "spqr_octet_split", smem)
            launch(
                kern, (grid, 1, 1), warps * 32, smem,
                [x2[m0:], layout.get("perm"), layout["codes"], layout["stats"], layout["stats2"], layout["sent"],
                 layout["sptr"], bias, y[m0:], scratch, counters, *_timing(grid * warps)],
                [mc, n, k, ks, no, x2.stride(0), y.stride(0), kc, chunks],
            )  # fmt: skip
    return y.reshape(*lead, n)


def _timing(warps: int) -> list[torch.Tensor]:
    """The timing buffer parameter of a ``_SPLIT_TIMING`` build (none otherwise), checked to hold 8 per warp."""
    if not _SPLIT_TIMING:
        return []
    if not _SPLIT_TIMES or _SPLIT_TIMES[0].dtype != torch.int64 or _SPLIT_TIMES[0].numel() < 8 * warps:
        raise HfEffllmError(f"_SPLIT_TIMING needs _SPLIT_TIMES[0], an int64 tensor of at least {8 * warps} values.")
    return [_SPLIT_TIMES[0]]


def spqr_octet_dequant(layout: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """The dense weight (out, in) in stored column order and ``dtype`` (float16 or bfloat16), outliers added."""
    bf16 = dtype == torch.bfloat16

    def source() -> str:
        return octet_source(warps=1, per_octet=1, depth=1, hi=False, bf16=bf16)

    n, k, ks, no = layout["n"], layout["k"], layout["ks"], layout["no"]
    _check_index_range(no, ks)
    return dequantize_launch(
        layout, dtype, "octet", ("spqr_octet", 1, 1, 1, False, bf16), source, "spqr_octet_dequant", no * ks,
        [n, k, ks, no],
    )  # fmt: skip
