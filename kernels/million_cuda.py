"""MILLION decode over PQ codes as a CUDA kernel compiled at run time (NVRTC, through torch): ``variant="cuda"``.

Why a CUDA kernel next to the Triton ones: decode over codes is bound by the per-(token, subspace) centroid
gathers, not by HBM bytes (module docstring of :mod:`kernels.million`). A gather served by shared memory costs one
wavefront when the 32 lanes of a warp hit 32 different banks; Triton has no per-lane shared-memory indexing except
``tl.gather``, which stores its table to shared memory again on every call (1 KiB of table stores per token at
4 bits). Here the two codebook tables are stored to shared memory once per block and every gather is one
``ld.shared``.

Two designs of the kernel, one block per (batch, KV head, split of the codes); :func:`design_for` picks:

**"mma"** (any shape up to 16 query rows; 8-12 warps, each owning 32 tokens per step):

* shared memory: the K and V tables, subspace-major (word of centroid ``c`` of subspace ``m`` at ``m * K + c``:
  the codebook tensor itself, no copy), 256 x D x 2 B each (128 KiB for both at D=128), stored once per block.
* a software pipeline per warp: the next tile's key codes load into registers while this tile's softmax and
  values run, its value codes while the next tile's scores run.
* scores on the tensor cores: ``mma.m16n8k16`` with the (up to 16) query rows of the KV group as the A operand,
  held in registers for the whole kernel, and the centroid words gathered straight into the B fragments. The head
  dimension is permuted consistently in A and B so that each thread's subspaces are ``M/4`` consecutive code bytes
  of its token (one 16-byte load of codes per token and thread at 4 bits). A gather is three instructions: the
  code byte by one byte permute (``PRMT``), the address by one ``LEA`` (the subspace's row offset is folded into
  the load's immediate), the ``ld.shared``.
* online softmax per warp and 32-token tile; the probabilities stay in registers: the score mma's C fragments,
  rounded to the model dtype, are exactly the B fragments of the value mma (as in FlashAttention-2).
* values on the tensor cores: ``O^T (dims x rows) += V^T (dims x tokens) P^T (tokens x rows)``. Thread
  ``(g, t4)`` owns the words ``g * D/16 + j`` (two dimensions each, one m-tile ``j`` per word) of the tokens
  ``2 t4, 2 t4 + 1, 2 t4 + 8, 2 t4 + 9`` of each 16-token slice: it gathers the four centroid words and two byte
  permutes per pair turn them into the A fragment (rows = the two dimensions, k = the tokens); its value codes
  are ``D/16`` consecutive bytes (one 8-byte load per token at 4 bits).
* Counts per cached token and KV head at 4 bits, D=128: 128 HBM bytes of codes; 128 centroid gathers whose banks
  are set by the code values (lanes of one gather share a subspace), so about 3.5 wavefronts per 32 instead of 1:
  about 14 shared-memory wavefronts per token, the limit; 30 warp instructions per token (SASS of the main loop).

**"lut"** (up to 4 query rows, e.g. Llama-3's GQA; the default there when a block has at least
``LUT_MIN_TOKENS`` codes; 12 warps, each owning 32 tokens per step). Its gathers are free of bank conflicts:

* each block first builds the lookup table ``LUT[m][c] = scale log2(e) q_r(m) . C_k[m][c]`` for the 4 query rows
  ``r`` (fp16, 8 bytes per entry, code-major: 128 KiB at M=64), then stores the value table (fp16, code-major,
  :func:`lut_value_table`) over the key codebook it no longer needs.
* scores: lane ``(g, t4)`` reads the entries of its token ``g`` at subspace ``16 bb + 4 t4 + ((i + g) & 3)`` in
  step ``(bb, i)``, so the 16 lanes of a half-warp hit 16 distinct 8-byte banks whatever the codes; one entry is
  two registers of an mma A fragment (rows: 8 tokens x query rows 0-1 / 2-3), and a 0/1 B operand sums each
  query row's k-slots: the per-token sum over the M subspaces runs on the tensor cores in fp32.
* online softmax in log2 units over 32 tokens (the 0/1 operand puts each row's sum in every column, so every lane
  holds the 4 rows of its tokens); the probabilities go to a per-warp tile in shared memory as fp16 pairs, lane
  ``(g, t4)`` storing token ``g + 8 t4`` in a tile padded so that each quarter-warp's 16-byte stores take one
  wavefront (session 18: 4 per 32-token step instead of 16, bit-identical; 1.4-2.4% faster at 4 bits, batch 16,
  32k-128k tokens, no change at 2 bits: ``benchmarks/results/million_lut_tile_s18.md``; ``LUT_TILE`` keeps the
  earlier layout for comparison).
* values on the CUDA cores: lane ``l`` owns subspaces ``2 l, 2 l + 1`` (M=64) or ``l``; the value table's layout
  gives them distinct banks, so every gather is one wavefront; fp16 pair FMAs (``HFMA2``) over a 32-token step,
  added to fp32 accumulators between steps.
* Counts at 4 bits, D=128: about 7 shared-memory wavefronts per token (LUT 4, values 2, probabilities 1) and
  about 32 warp instructions per token (8 of them ``HFMA2``): it is issue-bound.
* Precision: the table entries are fp16 (relative error 2^-11 per subspace term) and the values are summed in
  fp16 over 32 tokens; on the embedded model at 2k the perplexity through this kernel is +0.18% (4 bits) and
  +1.67% (2 bits) over dense (``benchmarks/results/million_quality_lut.md``).

The warps' (max, sum, accumulator) are merged in shared memory at the end; the block writes one partial per query
row in the layout of the Triton kernels, so the same merge kernel adds the full-precision window.

Measured on the H200 (``benchmarks/results/million_speed_cuda.md``, batch 16, 32k / 128k tokens, 4 bits): "lut"
1.72x / 1.82x bf16 sdpa, "mma" 1.50x / 1.52x (the first "mma" version, values on the CUDA cores, 1.27x / 1.29x).

Supported: float16/bfloat16, ``DSUB`` 2 or 4 (4 and 2 bits at D = 2M, 4M), 256 centroids, D in (64, 128),
``GQ * Lq <= 16`` ("lut": <= 4 and a value codebook within fp16's range), codes rows 16-byte aligned; :func:`supports` says whether a call qualifies, and
:func:`kernels.million.million_attention` falls back to the Triton kernels otherwise. The PyTorch reference of the
same function is :func:`kernels.million.million_attention_reference`.

Example:
    >>> out = million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=D**-0.5, variant="cuda")  # doctest: +SKIP
"""

from __future__ import annotations

import struct
from typing import Any

import torch

from hf_effllm.errors import HfEffllmError

from .cuda_rt import available, capability, cdiv, compiled, launch, on_device, render, sm_count, smem_limit
from .million import _WORD_DTYPES, memoized_per_tensor

__all__ = [
    "DESIGNS",
    "available",
    "cuda_source",
    "design_for",
    "kernel_tables",
    "lut_value_table",
    "million_codes_cuda",
    "million_merge_cuda",
    "num_warps",
    "smem_bytes",
    "smem_limit",
    "split_plan",
    "subspace_table",
    "supports",
]

NWARPS = 16  # the most warps a block may have (the final merge reuses the tables' shared memory)
ROWS = 16  # query rows per KV head in the partials (the mma's M dimension)
LUT_ROWS = 4  # query rows per KV head the "lut" design takes (four fp16 values per table entry)
# codes per block from which "lut" is the default: on the H200 (million_speed_cuda.md, codes kernel alone, 4 bits)
# it took 8-12% longer than "mma" at 512-2048 codes per block (batch 1, 8k-32k: building its tables dominates) and
# was 7-19% faster at 8192 and more (2 bits: as fast or faster everywhere, 7-40%)
LUT_MIN_TOKENS = 8192
DESIGNS = ("mma", "lut")
# "lut": how each warp's probability tile is stored (module setting, so that the benchmark can compare them):
# "padded" (every lane stores one token's 4 rows, two 16-byte pads per 8 tokens: 4 shared-memory wavefronts per
# 32-token step) or "t4zero" (session 11: the 8 lanes t4 = 0 store all 32 tokens, 16 wavefronts)
LUT_TILE = "padded"


def lut_tile_words(tile: str | None = None) -> int:
    """Words per warp of the "lut" design's probability tile (32 tokens x 4 rows as fp16 pairs, padded or not) and
    its 4 rescale factors, for ``tile`` (default: the module setting ``LUT_TILE``)."""
    tile = LUT_TILE if tile is None else tile
    if tile not in ("padded", "t4zero"):
        raise HfEffllmError(f"million_cuda.LUT_TILE={tile!r} is not known; use 'padded' or 't4zero'.")
    return (40 if tile == "padded" else 32) * 4 + 4


def num_warps(rows: int, design: str = "mma") -> int:
    """Default warps per block for ``rows = GQ * Lq`` query rows, the most that compile without register spills
    (ptxas 13.0, sm_90, with masks and per-head codebooks): ``"mma"``: 12 up to 8 rows (at most 168 registers),
    else 8 (up to 218); ``"lut"``: 12."""
    return 12 if design == "lut" or rows <= 8 else 8


_HEADER = r"""
#define D_ {D}
#define M_ {M}
#define DSUB {DSUB}
#define GQ {GQ}
#define LQ {LQ}
#define NQ (GQ * LQ)
#define HKV {HKV}
#define NWARPS {NWARPS}
#define IS_BF16 {IS_BF16}
#define PER_HEAD {PER_HEAD}
#define HAS_MASK {HAS_MASK}
#define KC 256
#define WPS (DSUB / 2)         // 4-byte words per centroid
#define CB (M_ / 4)            // key-code bytes per thread and token: subspaces t4 * CB ..
#define KS (D_ / 16)           // k-slices of the score mma = m-tiles (16 dimensions) of the value mma
#define VB (KS / WPS)          // value-code bytes per thread and token: subspaces g * VB ..
#define VW ((VB + 3) / 4)      // their 32-bit words
#define RR ((NQ > 8) ? 2 : 1)  // query-row halves in use: rows g (and g + 8 when more than 8 query rows)
#define RROWS (8 * RR)         // query rows per warp in the final merge
#define SPL ((M_ + 31) / 32)   // "lut": value subspaces per lane (SPL * lane ..)
#define VLANES (M_ / SPL)      // "lut": lanes that own value subspaces
#define NBLK (M_ / 16)         // "lut": 16-subspace blocks of a key-code row
#define PW {PW}                 // "lut": words per warp of the probability tile (32 tokens x 4 rows) + 4 rescale factors
#define TILE_PAD {TILE_PAD}     // "lut": the probability tile padded (every lane stores a token) or not (lanes t4 = 0)
#define CS {CS}                // "lut": the codes' token stride in bytes when known at compile time (else 0)
#define NEG_INF (-__int_as_float(0x7f800000))
//@COMMON


__device__ __forceinline__ u32 byte_at(const u32* w, int i) { return __byte_perm(w[i >> 2], 0u, 0x4440 | (i & 3)); }

// shared-memory loads at a 32-bit shared address (the constant part of the address folds into the instruction)
__device__ __forceinline__ u32 lds32(u32 a) {
    u32 v;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(a));
    return v;
}
__device__ __forceinline__ uint2 lds64(u32 a) {
    uint2 v;
    asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(a));
    return v;
}

__device__ __forceinline__ u32 pack2(float lo, float hi) {  // two floats -> one pair of the model dtype
    u32 d;
#if IS_BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
#endif
    return d;
}

// m16n8k16 product in fp16 whatever the model dtype (the lookup tables are fp16)
__device__ __forceinline__ void mma_f16(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float ex2(float x) {  // 2^x (ex2.approx: -inf -> 0)
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ u32 h2dup(float x) {  // (x, x) in fp16 (x in [0, 1]: a probability)
    u32 d;
    asm("cvt.rn.f16x2.f32 %0, %1, %1;" : "=r"(d) : "f"(x));
    return d;
}

__device__ __forceinline__ u32 half2_of(float lo, float hi) {  // fp16 pair, saturated to the finite range
    lo = fminf(fmaxf(lo, -65504.f), 65504.f);
    hi = fminf(fmaxf(hi, -65504.f), 65504.f);
    u32 d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}
// The block's 16 partial rows (output, max, sum) from its warps' shares: red [NWARPS][WROWS][D] accumulators,
// redM / redL [NWARPS][16] maxima and sums; LOG2: the maxima are in log2 units (written out in natural-log units,
// the merge kernel's); rows NQ.. are written empty.
template <int WROWS, bool LOG2>
__device__ __forceinline__ void write_partials(const float* red, const float* redM, const float* redL, float* po,
                                               float* pm, float* pl, long long part) {
    for (int idx = threadIdx.x; idx < 16 * D_; idx += NWARPS * 32) {
        const int r = idx / D_, d = idx % D_;
        if (r < NQ) {
            float mx = NEG_INF;
            for (int w = 0; w < NWARPS; ++w) mx = fmaxf(mx, redM[w * 16 + r]);
            const float m_safe = mx == NEG_INF ? 0.f : mx;
            float o = 0.f, l = 0.f;
            for (int w = 0; w < NWARPS; ++w) {
                const float f = LOG2 ? ex2(redM[w * 16 + r] - m_safe) : __expf(redM[w * 16 + r] - m_safe);
                o += red[(w * WROWS + r) * D_ + d] * f;
                l += redL[w * 16 + r] * f;
            }
            po[(part + r) * D_ + d] = o;
            if (d == 0) {
                pm[part + r] = LOG2 ? mx * 0.6931471805599453f : mx;
                pl[part + r] = l;
            }
        } else {
            po[(part + r) * D_ + d] = 0.f;
            if (d == 0) {
                pm[part + r] = NEG_INF;
                pl[part + r] = 0.f;
            }
        }
    }
}

// the parameters of both kernels (million_codes_cuda's host wrapper passes them in this order)
#define KERNEL_PARAMS                                                                                   \
    const u16* __restrict__ q, const u8* __restrict__ ck, const u8* __restrict__ cv,                   \
    const u32* __restrict__ tk, const u32* __restrict__ tv, const signed char* __restrict__ cmask,     \
    float* __restrict__ po, float* __restrict__ pm, float* __restrict__ pl,                            \
    int n_codes, int split_len, int num_splits, int scale_bits,                                        \
    int sq_b, int sq_h, int sq_l, int sc_b, int sc_h, int sc_n, int scv_b, int scv_h, int scv_n,         \
    int stab_g, int smask_b
"""

_SOURCE = r"""
// key codes of this thread's tokens T0 + nt * 8 + g (subspaces t4 * CB ...) -> registers
#define LOAD_K(T0)                                                                                   \
    _Pragma("unroll") for (int nt = 0; nt < 4; ++nt) {                                               \
        const int tok = (T0) + nt * 8 + g;                                                           \
        _Pragma("unroll") for (int i = 0; i < CB / 4; ++i) ckr[nt][i] = 0u;                          \
        if (tok < end) {                                                                             \
            const u8* src = ck + ckb + (long long)tok * sc_n + t4 * CB;                              \
            LOAD_W(ckr[nt], src, CB);                                                                \
        }                                                                                            \
    }
// value codes of this thread's tokens T0 + 16 i + 8 (u >> 1) + 2 t4 + (u & 1) (subspaces g * VB ...) -> registers
#define LOAD_V(T0)                                                                                   \
    _Pragma("unroll") for (int i = 0; i < 2; ++i)                                                    \
    _Pragma("unroll") for (int u = 0; u < 4; ++u) {                                                  \
        const int tok = (T0) + 16 * i + 8 * (u >> 1) + 2 * t4 + (u & 1);                             \
        _Pragma("unroll") for (int k = 0; k < VW; ++k) vcr[i][u][k] = 0u;                            \
        if (tok < end) {                                                                             \
            const u8* src = cv + cvb + (long long)tok * scv_n + g * VB;                              \
            LOAD_W(vcr[i][u], src, VB);                                                              \
        }                                                                                            \
    }
#define LOAD_W(cw, src, NB) load_w<NB>(cw, src)
template <int NB> __device__ __forceinline__ void load_w(u32* cw, const u8* src) {  // NB code bytes -> words
    if constexpr (NB == 16) {
        const uint4 w = *(const uint4*)src;
        cw[0] = w.x; cw[1] = w.y; cw[2] = w.z; cw[3] = w.w;
    } else if constexpr (NB == 8) {
        const uint2 w = *(const uint2*)src;
        cw[0] = w.x; cw[1] = w.y;
    } else if constexpr (NB == 4) {
        cw[0] = *(const u32*)src;
    } else {
        cw[0] = *(const u16*)src;
    }
}

extern "C" __global__ void __launch_bounds__(NWARPS * 32, 1) million_codes_cuda(KERNEL_PARAMS) {
    extern __shared__ __align__(16) u32 smem[];
    u32* sK = smem;                      // [M][KC] centroids (WPS words each), subspace-major
    u32* sV = sK + KC * M_ * WPS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;

    const int bh = blockIdx.x, sp = blockIdx.y;
    const int b = bh / HKV, h = bh % HKV;
    const u32* tkb = tk + (PER_HEAD ? (long long)h * stab_g * WPS : 0);
    const u32* tvb = tv + (PER_HEAD ? (long long)h * stab_g * WPS : 0);
    for (int i = threadIdx.x; i < KC * M_ * WPS / 4; i += NWARPS * 32) {
        ((uint4*)sK)[i] = ((const uint4*)tkb)[i];
        ((uint4*)sV)[i] = ((const uint4*)tvb)[i];
    }

    // A fragments of the scores: the query rows (row r = li * GQ + jh) with the head dimension permuted so that
    // thread t4's subspaces in k-slice ks are the code bytes t4 * CB + ...: DSUB 2: m = t4*CB + 2ks + khi, dim
    // 2m + e; DSUB 4: m = t4*CB + ks, dim 4m + 2khi + e (khi: k >= 8 within the slice, e: the pair element).
    u32 afr[KS][4];
    #pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int row = g + (j & 1) * 8, khi = j >> 1;
#if DSUB == 2
            const int dim = 2 * (t4 * CB + 2 * ks + khi);
#else
            const int dim = 4 * (t4 * CB + ks) + 2 * khi;
#endif
            u32 v = 0;
            if (row < NQ) {
                const u16* qr = q + (long long)b * sq_b + (long long)(h * GQ + row % GQ) * sq_h + (long long)(row / GQ) * sq_l;
                v = (u32)qr[dim] | ((u32)qr[dim + 1] << 16);
            }
            afr[ks][j] = v;
        }
    }
    __syncthreads();

    const float scale = __int_as_float(scale_bits);
    const long long ckb = (long long)b * sc_b + (long long)h * sc_h;
    const long long cvb = (long long)b * scv_b + (long long)h * scv_h;
    const int start = sp * split_len;
    const int end = min(start + split_len, n_codes);
    // this thread's table rows: key subspaces t4 * CB .., value subspaces g * VB ..
    const u32 sKt = (u32)__cvta_generic_to_shared(sK + t4 * CB * KC * WPS);
    const u32 sVt = (u32)__cvta_generic_to_shared(sV + g * VB * KC * WPS);
    float m_r[RR], l_r[RR];
    // value accumulators: o[rr][j] = the value mma's C fragment of m-tile j: rows = dimensions 2w, 2w + 1 of word
    // w = g * KS + j (c0, c1: 2w; c2, c3: 2w + 1), columns = query rows 8 rr + 2 t4 (c0, c2) and + 1 (c1, c3)
    float o[RR][KS][4];
    #pragma unroll
    for (int rr = 0; rr < RR; ++rr) {
        m_r[rr] = NEG_INF;
        l_r[rr] = 0.f;
        #pragma unroll
        for (int j = 0; j < KS; ++j)
            #pragma unroll
            for (int e = 0; e < 4; ++e) o[rr][j][e] = 0.f;
    }

    // Software pipeline: the next tile's key codes load while this tile's softmax and values run, its value codes
    // while the next tile's scores run.
    u32 ckr[4][CB / 4];
    u32 vcr[2][4][VW];
    int t0 = start + warp * 32;
    if (t0 < end) {
        LOAD_K(t0);
        LOAD_V(t0);
    }
    for (; t0 < end; t0 += NWARPS * 32) {
        const int tn = t0 + NWARPS * 32;
        // scores of 16 rows x 32 tokens: four n-tiles of 8 tokens, the centroids gathered into the B fragments
        float s[4][4];
        #pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const u32* cw = ckr[nt];
            float c[4] = {0.f, 0.f, 0.f, 0.f};
            #pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
#if DSUB == 2
                const u32 b0 = lds32(sKt + (2 * ks) * KC * 4 + (byte_at(cw, 2 * ks) << 2));
                const u32 b1 = lds32(sKt + (2 * ks + 1) * KC * 4 + (byte_at(cw, 2 * ks + 1) << 2));
#else
                const uint2 w = lds64(sKt + ks * KC * 8 + (byte_at(cw, ks) << 3));
                const u32 b0 = w.x, b1 = w.y;
#endif
                mma16816(c, afr[ks], b0, b1);
            }
            #pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int tok_c = t0 + nt * 8 + t4 * 2 + e;
                bool ok = tok_c < end;
#if HAS_MASK
                if (ok) ok = cmask[(long long)b * smask_b + tok_c] != 0;
#endif
                s[nt][e] = ok ? c[e] * scale : NEG_INF;
                s[nt][2 + e] = ok ? c[2 + e] * scale : NEG_INF;
            }
        }
        if (tn < end) LOAD_K(tn);
        // online softmax: this thread holds rows g (and g + 8), tokens nt * 8 + t4 * 2 + e; the probabilities
        // become the B fragments of the value mma (k = tokens 16 i + 2 t4 + e and 16 i + 8 + 2 t4 + e, n = row)
        u32 pb[RR][2][2];
        float alpha[RR][2];
        #pragma unroll
        for (int rr = 0; rr < RR; ++rr) {
            float mx = NEG_INF;
            #pragma unroll
            for (int nt = 0; nt < 4; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * rr], s[nt][2 * rr + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m_r[rr], mx);
            const float m_safe = m_new == NEG_INF ? 0.f : m_new;
            const float a = __expf(m_r[rr] - m_safe);
            float p[4][2];
            float sum = 0.f;
            #pragma unroll
            for (int nt = 0; nt < 4; ++nt)
                #pragma unroll
                for (int e = 0; e < 2; ++e) {
                    p[nt][e] = __expf(s[nt][2 * rr + e] - m_safe);
                    sum += p[nt][e];
                }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            l_r[rr] = l_r[rr] * a + sum;
            m_r[rr] = m_new;
            #pragma unroll
            for (int i = 0; i < 2; ++i) {
                pb[rr][i][0] = pack2(p[2 * i][0], p[2 * i][1]);
                pb[rr][i][1] = pack2(p[2 * i + 1][0], p[2 * i + 1][1]);
            }
            // the accumulator columns are query rows 8 rr + 2 t4 + e, whose factor lane 4 (2 t4 + e) computed
            alpha[rr][0] = __shfl_sync(0xffffffffu, a, 8 * t4);
            alpha[rr][1] = __shfl_sync(0xffffffffu, a, 8 * t4 + 4);
        }
        // values on the tensor cores: O^T (dims x rows) += V^T (dims x tokens) P^T (tokens x rows), the centroid
        // words gathered per token and transposed into the A fragments with byte permutes
        #pragma unroll
        for (int rr = 0; rr < RR; ++rr)
            #pragma unroll
            for (int j = 0; j < KS; ++j) {
                o[rr][j][0] *= alpha[rr][0];
                o[rr][j][1] *= alpha[rr][1];
                o[rr][j][2] *= alpha[rr][0];
                o[rr][j][3] *= alpha[rr][1];
            }
        #pragma unroll
        for (int j = 0; j < KS; ++j) {
            #pragma unroll
            for (int i = 0; i < 2; ++i) {
                u32 x[4];
                #pragma unroll
                for (int u = 0; u < 4; ++u)
                    x[u] = lds32(sVt + ((j / WPS) * KC * WPS + (j % WPS)) * 4 + (byte_at(vcr[i][u], j / WPS) << (WPS + 1)));
                u32 a[4];
                a[0] = prmt(x[0], x[1], 0x5410u);
                a[1] = prmt(x[0], x[1], 0x7632u);
                a[2] = prmt(x[2], x[3], 0x5410u);
                a[3] = prmt(x[2], x[3], 0x7632u);
                #pragma unroll
                for (int rr = 0; rr < RR; ++rr) mma16816(o[rr][j], a, pb[rr][i][0], pb[rr][i][1]);
            }
        }
        if (tn < end) LOAD_V(tn);
    }

    // merge the warps: accumulators [NWARPS][RROWS][D] over the tables, maxima and sums [NWARPS][16] after them
    __syncthreads();
    float* red = (float*)smem;
    float* redM = red + NWARPS * RROWS * D_;
    float* redL = redM + NWARPS * 16;
    #pragma unroll
    for (int rr = 0; rr < RR; ++rr)
        #pragma unroll
        for (int j = 0; j < KS; ++j) {
            const int w = g * KS + j;
            #pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int row = 2 * t4 + e;  // within the half rr
                red[(warp * RROWS + 8 * rr + row) * D_ + 2 * w] = o[rr][j][e];
                red[(warp * RROWS + 8 * rr + row) * D_ + 2 * w + 1] = o[rr][j][2 + e];
            }
        }
    if (t4 == 0) {
        #pragma unroll
        for (int rr = 0; rr < RR; ++rr) {
            redM[warp * 16 + g + 8 * rr] = m_r[rr];
            redL[warp * 16 + g + 8 * rr] = l_r[rr];
        }
    }
    __syncthreads();
    write_partials<RROWS, false>(red, redM, redL, po, pm, pl, ((long long)bh * num_splits + sp) * 16);
}
"""


_SOURCE_LUT = r"""
// key codes of this lane's token rows T0 + g + 8 r (r < 4): word 4 bb + t4 of each 16-byte block bb -> registers
// (rows past the end read the last row: they are scored -inf); with a compile-time code stride (CS: the cache's
// codes are rows of M bytes), a whole tile is one base address and immediate offsets
#define LOAD_K(T0)                                                                                   \
    if ((T0) + 32 <= end) {                                                                          \
        const u8* src = ck + ckb + (long long)((T0) + g) * SCN_K + 4 * t4;                           \
        _Pragma("unroll") for (int r = 0; r < 4; ++r)                                                \
        _Pragma("unroll") for (int bb = 0; bb < NBLK; ++bb)                                          \
            kw[r][bb] = *(const u32*)(src + 8 * r * SCN_K + 16 * bb);                                \
    } else {                                                                                         \
        _Pragma("unroll") for (int r = 0; r < 4; ++r) {                                              \
            const u8* src = ck + ckb + (long long)min((T0) + g + 8 * r, end - 1) * SCN_K + 4 * t4;   \
            _Pragma("unroll") for (int bb = 0; bb < NBLK; ++bb) kw[r][bb] = *(const u32*)(src + 16 * bb); \
        }                                                                                            \
    }
// value codes of the tokens T0 .. T0 + 31: the SPL bytes at SPL * lane -> registers (past the end: the last row,
// whose probability is 0)
#define LOAD_V(T0)                                                                                   \
    if (lane < VLANES) {                                                                             \
        if ((T0) + 32 <= end) {                                                                      \
            const u8* src = cv + cvb + (long long)(T0) * SCN_V + SPL * lane;                         \
            _Pragma("unroll") for (int j = 0; j < 32; ++j)                                           \
                vc[j] = SPL == 2 ? (u32)*(const u16*)(src + j * SCN_V) : (u32)src[j * SCN_V];        \
        } else {                                                                                     \
            _Pragma("unroll") for (int j = 0; j < 32; ++j) {                                         \
                const u8* src = cv + cvb + (long long)min((T0) + j, end - 1) * SCN_V + SPL * lane;   \
                vc[j] = SPL == 2 ? (u32)*(const u16*)src : (u32)*src;                                \
            }                                                                                        \
        }                                                                                            \
    }
#define SCN_K (CS ? CS : sc_n)
#define SCN_V (CS ? CS : scv_n)

extern "C" __global__ void __launch_bounds__(NWARPS * 32, 1) million_codes_lut(KERNEL_PARAMS) {
    extern __shared__ __align__(16) u32 smem[];
    u32* sL = smem;                          // lookup table: entry (m, c) = 4 fp16 row values at words 2 (c M + m)
    u32* sV = sL + KC * M_ * 2;              // value table (fp16, code-major, see kernel_tables); first the K table
    float* qS = (float*)(sV + KC * M_ * WPS);  // the 4 query rows x D, times scale * log2(e)
    u32* tiles = (u32*)(qS + 4 * D_);        // per warp: probabilities [32 tokens][4 rows] (fp16 pairs), 4 factors
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int bh = blockIdx.x, sp = blockIdx.y;
    const int b = bh / HKV, h = bh % HKV;
    const float scale = __int_as_float(scale_bits);

    // 1. the query rows (scaled) and the key codebook, subspace-major, into shared memory
    for (int i = threadIdx.x; i < 4 * D_; i += NWARPS * 32) {
        const int r = i / D_, d = i % D_;
        float v = 0.f;
        if (r < NQ) {
            const u16* qr = q + (long long)b * sq_b + (long long)(h * GQ + r % GQ) * sq_h + (long long)(r / GQ) * sq_l;
#if IS_BF16
            v = __uint_as_float(((u32)qr[d]) << 16) * scale * 1.4426950408889634f;
#else
            v = half_f(qr[d]) * scale * 1.4426950408889634f;
#endif
        }
        qS[i] = v;
    }
    const u32* tkb = tk + (PER_HEAD ? (long long)h * stab_g * WPS : 0);
    const u32* tvb = tv + (PER_HEAD ? (long long)h * stab_g * WPS : 0);
    for (int i = threadIdx.x; i < KC * M_ * WPS / 4; i += NWARPS * 32) ((uint4*)sV)[i] = ((const uint4*)tkb)[i];
    __syncthreads();

    // 2. the lookup table LUT[m][c][r] = scale log2(e) q_r(subspace m) . C_k[m][c]: a warp takes blocks of 32 codes x 16
    // subspaces, lane l the code cb + l and the subspaces mb + ((l + k) & 15), so that both the codebook reads and
    // the table writes hit distinct banks
    for (int blk = warp; blk < (KC / 32) * NBLK; blk += NWARPS) {
        const int c = (blk % (KC / 32)) * 32 + lane, mb = (blk / (KC / 32)) * 16;
        #pragma unroll 4
        for (int k = 0; k < 16; ++k) {
            const int m = mb + ((lane + k) & 15);
            float e[DSUB];
            #pragma unroll
            for (int w = 0; w < WPS; ++w) {
                const u32 x = sV[(m * KC + c) * WPS + w];
#if IS_BF16
                e[2 * w] = __uint_as_float(x << 16);
                e[2 * w + 1] = __uint_as_float(x & 0xffff0000u);
#else
                e[2 * w] = half_f((u16)(x & 0xffffu));
                e[2 * w + 1] = half_f((u16)(x >> 16));
#endif
            }
            float v[4];
            #pragma unroll
            for (int r = 0; r < 4; ++r) {
                v[r] = 0.f;
                #pragma unroll
                for (int i = 0; i < DSUB; ++i) v[r] = fmaf(qS[r * D_ + DSUB * m + i], e[i], v[r]);
            }
            *(uint2*)(sL + 2 * (c * M_ + m)) = make_uint2(half2_of(v[0], v[1]), half2_of(v[2], v[3]));
        }
    }
    __syncthreads();
    // 3. the value table (fp16, code-major, subspaces permuted for conflict-free gathers) over the key codebook
    for (int i = threadIdx.x; i < KC * M_ * WPS / 4; i += NWARPS * 32) ((uint4*)sV)[i] = ((const uint4*)tvb)[i];
    __syncthreads();

    const long long ckb = (long long)b * sc_b + (long long)h * sc_h;
    const long long cvb = (long long)b * scv_b + (long long)h * scv_h;
    const int start = sp * split_len;
    const int end = min(start + split_len, n_codes);
    u32* Ps = tiles + warp * PW;
    float* As = (float*)(Ps + PW - 4);
    const u32 sLa = (u32)__cvta_generic_to_shared(sL);
    const u32 sVa = (u32)__cvta_generic_to_shared(sV);
    // Scores: A = table entries (16 rows: 8 tokens x the row pairs 0-1 and 2-3 of the 4 query rows; k: 8 subspaces x
    // 2 query rows), B = a 0/1 matrix that adds the k-slots of query row 0 (or 2) into column 0 and of row 1 (or 3)
    // into column 1. Lane (g, t4), step (bb, i), takes subspace 16 bb + 4 t4 + ((i + g) & 3) of its token g: byte
    // (i + g) & 3 of its code word bb; the 16 lanes of a half-warp then read 16 distinct 8-byte banks, and one
    // 8-byte entry (4 query rows) is exactly the registers a_{0,1} or a_{2,3} of the A fragment.
    u32 sel[4], lb[4];
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int x = (i + g) & 3;
        sel[i] = 0x4440u | (u32)x;
        lb[i] = sLa + (4 * t4 + x) * 8;
    }
#if TILE_PAD  // k-slot 2t4 (+8) into every even column, 2t4 + 1 (+9) into every odd one: all lanes get the sums
    const u32 bsel = (g & 1) ? 0x3C000000u : 0x3C00u;
#else         // k-slot 2t4 (+8): column 0; +1: 1 (lanes t4 = 0 get the sums, the others zeros)
    const u32 bsel = (g == 0 ? 0x3C00u : 0u) | (g == 1 ? 0x3C000000u : 0u);
#endif
    // Values: lane l owns subspaces SPL l + s (s < SPL) for all 4 rows, accumulated in fp16 pairs over a 32-token
    // step and in fp32 across steps.
    u32 vb[SPL];
    #pragma unroll
    for (int s = 0; s < SPL; ++s) vb[s] = sVa + (SPL == 2 ? s * 32 + lane : lane) * WPS * 4;
    float acc[4][SPL * WPS][2];
    #pragma unroll
    for (int r = 0; r < 4; ++r)
        #pragma unroll
        for (int i = 0; i < SPL * WPS; ++i) acc[r][i][0] = acc[r][i][1] = 0.f;
    float m_r[4] = {NEG_INF, NEG_INF, NEG_INF, NEG_INF}, l_r[4] = {0.f, 0.f, 0.f, 0.f};  // lanes t4 = 0

    u32 kw[4][NBLK];
    u32 vc[32];
    int t0 = start + warp * 32;
    if (t0 < end) {
        LOAD_K(t0);
        LOAD_V(t0);
    }
    for (; t0 < end; t0 += NWARPS * 32) {
        const int tn = t0 + NWARPS * 32;
        // c[r]: token t0 + g + 8 r, query rows 0..3 (in the lanes t4 = 0; the other lanes hold zeros)
        float c[4][4];
        #pragma unroll
        for (int r = 0; r < 4; ++r) {
            c[r][0] = c[r][1] = c[r][2] = c[r][3] = 0.f;
            #pragma unroll
            for (int bb = 0; bb < NBLK; ++bb)
                #pragma unroll
                for (int pp = 0; pp < 2; ++pp) {
                    const u32 c1 = __byte_perm(kw[r][bb], 0u, sel[2 * pp]);
                    const u32 c2 = __byte_perm(kw[r][bb], 0u, sel[2 * pp + 1]);
                    const uint2 e1 = lds64(lb[2 * pp] + bb * 128 + c1 * (M_ * 8));
                    const uint2 e2 = lds64(lb[2 * pp + 1] + bb * 128 + c2 * (M_ * 8));
                    const u32 af[4] = {e1.x, e1.y, e2.x, e2.y};
                    mma_f16(c[r], af, bsel, bsel);
                }
        }
        if (tn < end) LOAD_K(tn);
        bool ok[4];
        #pragma unroll
        for (int r = 0; r < 4; ++r) {
            ok[r] = t0 + g + 8 * r < end;
#if HAS_MASK
            if (ok[r]) ok[r] = cmask[(long long)b * smask_b + t0 + g + 8 * r] != 0;
#endif
        }
        // online softmax in log2 units (the table holds scale * log2(e) * q . k): row max over the 32 tokens
        float p[4][4], al[4];
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
            float sc[4];
            #pragma unroll
            for (int r = 0; r < 4; ++r) sc[r] = ok[r] ? c[r][e] : NEG_INF;
            float mx = fmaxf(fmaxf(sc[0], sc[1]), fmaxf(sc[2], sc[3]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
            const float m_new = fmaxf(m_r[e], mx);
            const float m_safe = m_new == NEG_INF ? 0.f : m_new;
            al[e] = ex2(m_r[e] - m_safe);
            #pragma unroll
            for (int r = 0; r < 4; ++r) p[r][e] = ex2(sc[r] - m_safe);
            l_r[e] = l_r[e] * al[e] + ((p[0][e] + p[1][e]) + (p[2][e] + p[3][e]));  // this lane's share (added up at the end)
            m_r[e] = m_new;
        }
#if TILE_PAD
        {  // lane (g, t4) stores token g + 8 t4 at slot g + 10 t4 (two 16-byte pads per 8 tokens): the 8 lanes of a
           // quarter-warp hit 8 distinct 16-byte bank groups, one wavefront each instead of four
            u32 w[4];
            #pragma unroll
            for (int e = 0; e < 4; ++e) w[e] = h2dup(t4 == 0 ? p[0][e] : t4 == 1 ? p[1][e] : t4 == 2 ? p[2][e] : p[3][e]);
            *(uint4*)(Ps + (g + 10 * t4) * 4) = make_uint4(w[0], w[1], w[2], w[3]);
            if (lane == 0) *(float4*)As = make_float4(al[0], al[1], al[2], al[3]);
        }
#else
        if (t4 == 0) {
            #pragma unroll
            for (int r = 0; r < 4; ++r)
                *(uint4*)(Ps + (g + 8 * r) * 4) = make_uint4(h2dup(p[r][0]), h2dup(p[r][1]), h2dup(p[r][2]), h2dup(p[r][3]));
            if (g == 0) *(float4*)As = make_float4(al[0], al[1], al[2], al[3]);
        }
#endif
        __syncwarp();
        if (lane < VLANES) {
            const float4 al4 = *(const float4*)As;
            const float alr[4] = {al4.x, al4.y, al4.z, al4.w};
            u32 a16[4][SPL * WPS];
            #pragma unroll
            for (int r = 0; r < 4; ++r)
                #pragma unroll
                for (int i = 0; i < SPL * WPS; ++i) {
                    acc[r][i][0] *= alr[r];
                    acc[r][i][1] *= alr[r];
                    a16[r][i] = 0u;
                }
            #pragma unroll
            for (int j = 0; j < 32; ++j) {
                const uint4 pp = *(const uint4*)(Ps + (TILE_PAD ? j + 2 * (j >> 3) : j) * 4);
                const u32 pr[4] = {pp.x, pp.y, pp.z, pp.w};
                #pragma unroll
                for (int s = 0; s < SPL; ++s) {
                    const u32 code = __byte_perm(vc[j], 0u, 0x4440u | (u32)s);
#if WPS == 1
                    const u32 x[1] = {lds32(vb[s] + code * (M_ * 4))};
#else
                    const uint2 x2 = lds64(vb[s] + code * (M_ * 8));
                    const u32 x[2] = {x2.x, x2.y};
#endif
                    #pragma unroll
                    for (int w = 0; w < WPS; ++w)
                        #pragma unroll
                        for (int r = 0; r < 4; ++r) a16[r][s * WPS + w] = hfma2(pr[r], x[w], a16[r][s * WPS + w]);
                }
            }
            #pragma unroll
            for (int r = 0; r < 4; ++r)
                #pragma unroll
                for (int i = 0; i < SPL * WPS; ++i) {
                    acc[r][i][0] += half_f((u16)(a16[r][i] & 0xffffu));
                    acc[r][i][1] += half_f((u16)(a16[r][i] >> 16));
                }
        }
        __syncwarp();
        if (tn < end) LOAD_V(tn);
    }
    #pragma unroll
    for (int e = 0; e < 4; ++e) {
        l_r[e] += __shfl_xor_sync(0xffffffffu, l_r[e], 4);
        l_r[e] += __shfl_xor_sync(0xffffffffu, l_r[e], 8);
        l_r[e] += __shfl_xor_sync(0xffffffffu, l_r[e], 16);
    }

    // merge the warps: accumulators [NWARPS][4][D] over the lookup table, maxima and sums [NWARPS][16] after them
    __syncthreads();
    float* red = (float*)smem;
    float* redM = red + NWARPS * 4 * D_;
    float* redL = redM + NWARPS * 16;
    if (lane < VLANES) {
        #pragma unroll
        for (int r = 0; r < 4; ++r)
            #pragma unroll
            for (int s = 0; s < SPL; ++s)
                #pragma unroll
                for (int w = 0; w < WPS; ++w) {
                    const int dim = DSUB * (SPL * lane + s) + 2 * w;
                    red[(warp * 4 + r) * D_ + dim] = acc[r][s * WPS + w][0];
                    red[(warp * 4 + r) * D_ + dim + 1] = acc[r][s * WPS + w][1];
                }
    }
    if (lane == 0) {
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
            redM[warp * 16 + e] = m_r[e];
            redL[warp * 16 + e] = l_r[e];
        }
    }
    __syncthreads();
    write_partials<4, true>(red, redM, redL, po, pm, pl, ((long long)bh * num_splits + sp) * 16);
}
"""


# The merge of the code splits' partials with the exact window, as a CUDA kernel launched through cuda_rt.launch
# (instead of Triton's launcher, most of a batch-1 decode call's remaining host time: million_speed_host.md); the same
# function as kernels.million._million_merge_kernel. Block (batch, KV head), D_ threads; no step waits on a chain of
# memory round trips:
# - the rows' maxima over the code splits first (independent loads), so that the window's online softmax starts from
#   them and the splits' terms are added at the final maximum with no rescaling chain;
# - the window in tiles of 32 tokens: K and V read with 16-byte loads into registers one tile ahead, stored to shared
#   memory as floats (rows padded by 4 floats: conflict-free 16-byte reads); thread (row group t / 32, token t % 32)
#   computes the scores of its token for rows t / 32, t / 32 + D_ / 32, ...; warp w takes the online-softmax step of
#   rows w, w + D_ / 32, ... (a lane per token: shuffle reductions); thread d accumulates dimension d of every row;
# - the splits' outputs added at the final maximum, several splits' loads in flight.
_MERGE_SOURCE = r"""
#define D_ {D}
#define NQ {NQ}                // query rows of a KV head: GQ x LQ (row r: query head GQ h + r % GQ, position r / GQ)
#define GQ {GQ}
#define HKV {HKV}
#define ROWS {ROWS}            // rows per (batch, KV head, split) in the partials
#define HAS_RMASK {HAS_RMASK}
#define VEC {VEC}              // the window's rows start on 16-byte boundaries: 16-byte loads
#define ACT_BF16 {BF16}
#define IS_BF16 0
#define TR 32                  // window tokens per tile (= lanes: the softmax step takes a lane per token)
#define DP (D_ + 4)            // padded tile row (floats)
#define RG (D_ / 32)           // row groups of the score step = warps
#define RPT ((NQ + RG - 1) / RG)  // rows per thread in the score step
#define PPR (D_ / 8)           // 16-byte pieces per window row
#define VPT (TR / 8)           // pieces per thread and tile (TR PPR of them over D_ threads)
#define INFINITY __int_as_float(0x7f800000)
//@COMMON

// thread t's pieces of the tile at token r0: piece i is token r0 + t / PPR + 8 i, columns 8 (t % PPR) ..; zeros past R
__device__ __forceinline__ void load_tile(uint4* dst, const u16* __restrict__ base, int sn, int r0, int R) {
    const int t = threadIdx.x, col = (t % PPR) * 8;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
        const int tok = r0 + t / PPR + 8 * i;
        uint4 w = make_uint4(0u, 0u, 0u, 0u);
        if (tok < R) {
            const u16* p = base + (long long)tok * sn + col;
#if VEC
            w = *(const uint4*)p;
#else
            w = make_uint4(p[0] | ((u32)p[1] << 16), p[2] | ((u32)p[3] << 16), p[4] | ((u32)p[5] << 16),
                           p[6] | ((u32)p[7] << 16));
#endif
        }
        dst[i] = w;
    }
}

__device__ __forceinline__ float lo_f(u32 w) { return act_f((u16)(w & 0xffffu)); }
__device__ __forceinline__ float hi_f(u32 w) { return act_f((u16)(w >> 16)); }

// the pieces of load_tile as floats into the tile (TR x DP)
__device__ __forceinline__ void store_tile(float (*tile)[DP], const uint4* src) {
    const int t = threadIdx.x, col = (t % PPR) * 8;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
        float* row = &tile[t / PPR + 8 * i][col];
        *(float4*)row = make_float4(lo_f(src[i].x), hi_f(src[i].x), lo_f(src[i].y), hi_f(src[i].y));
        *(float4*)(row + 4) = make_float4(lo_f(src[i].z), hi_f(src[i].z), lo_f(src[i].w), hi_f(src[i].w));
    }
}

extern "C" __global__ void __launch_bounds__(D_) million_merge_cuda(
    const u16* __restrict__ q, const u16* __restrict__ rk, const u16* __restrict__ rv,
    const signed char* __restrict__ rm, const float* __restrict__ po, const float* __restrict__ pm,
    const float* __restrict__ pl, u16* __restrict__ out, int R, int splits, int scale_bits, int sq_b, int sq_h,
    int sq_l, int sr_b, int sr_h, int sr_n, int sv_b, int sv_h, int sv_n, int sm_b, int sm_l, int so_b, int so_h,
    int so_l) {
    __shared__ __align__(16) float qs[NQ][DP];
    __shared__ __align__(16) float kt[TR][DP];
    __shared__ __align__(16) float vt[TR][DP];
    __shared__ float sp[NQ][TR];
    __shared__ float m_s[NQ], l_s[NQ], alpha_s[NQ];
    const int bh = blockIdx.x, b = bh / HKV, h = bh % HKV, t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const float scale = __int_as_float(scale_bits);
    const long long pbase = (long long)bh * splits * ROWS;  // row 0 of split 0 in the partials
    if (t < NQ) {  // the row's maximum over the code splits
        float mx = -INFINITY;
#pragma unroll 8
        for (int s = 0; s < splits; ++s) mx = fmaxf(mx, pm[pbase + (long long)s * ROWS + t]);
        m_s[t] = mx;
        l_s[t] = 0.f;
    }
    for (int r = 0; r < NQ; ++r)
        qs[r][t] = act_f(q[(long long)b * sq_b + (long long)(h * GQ + r % GQ) * sq_h + (long long)(r / GQ) * sq_l + t]) * scale;
    float acc[NQ];
#pragma unroll
    for (int r = 0; r < NQ; ++r) acc[r] = 0.f;
    const u16* kb = rk + (long long)b * sr_b + (long long)h * sr_h;
    const u16* vb = rv + (long long)b * sv_b + (long long)h * sv_h;
    const int tj = t % TR, tg = t / TR;  // score step: token and row group of this thread
    uint4 kr[VPT], vr[VPT];
    if (R > 0) {
        load_tile(kr, kb, sr_n, 0, R);
        load_tile(vr, vb, sv_n, 0, R);
    }
    for (int r0 = 0; r0 < R; r0 += TR) {
        __syncthreads();  // the previous tile is no longer read (and qs, m_s, l_s are written)
        store_tile(kt, kr);
        store_tile(vt, vr);
        if (r0 + TR < R) {  // the next tile in flight during this one
            load_tile(kr, kb, sr_n, r0 + TR, R);
            load_tile(vr, vb, sv_n, r0 + TR, R);
        }
        __syncthreads();
        {
            float s[RPT];
#pragma unroll
            for (int i = 0; i < RPT; ++i) s[i] = 0.f;
            for (int c = 0; c < D_; c += 4) {
                const float4 k4 = *(const float4*)&kt[tj][c];
#pragma unroll
                for (int i = 0; i < RPT; ++i) {
                    const int r = tg + i * RG;
                    if (r < NQ) {
                        const float4 q4 = *(const float4*)&qs[r][c];
                        s[i] = fmaf(q4.x, k4.x, fmaf(q4.y, k4.y, fmaf(q4.z, k4.z, fmaf(q4.w, k4.w, s[i]))));
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < RPT; ++i) {
                const int r = tg + i * RG;
                if (r < NQ) {
                    bool ok = r0 + tj < R;
#if HAS_RMASK
                    ok = ok && rm[(long long)b * sm_b + (long long)(r / GQ) * sm_l + r0 + tj] != 0;
#endif
                    sp[r][tj] = ok ? s[i] : -INFINITY;
                }
            }
        }
        __syncthreads();
        for (int r = warp; r < NQ; r += RG) {  // row r: new maximum, probabilities in place, sum, the factor
            const float sv = sp[r][lane];
            float mt = sv;
#pragma unroll
            for (int off = 16; off; off >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
            const float mo = m_s[r], mn = fmaxf(mo, mt), ms = mn == -INFINITY ? 0.f : mn;
            const float p = expf(sv - ms);
            float sum = p;
#pragma unroll
            for (int off = 16; off; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
            sp[r][lane] = p;
            __syncwarp();
            if (lane == 0) {
                const float alpha = expf(mo - ms);
                alpha_s[r] = alpha;
                l_s[r] = l_s[r] * alpha + sum;
                m_s[r] = mn;
            }
        }
        __syncthreads();
        float v[TR];
#pragma unroll
        for (int j = 0; j < TR; ++j) v[j] = vt[j][t];
#pragma unroll
        for (int r = 0; r < NQ; ++r) {
            float a = 0.f;
#pragma unroll
            for (int j = 0; j < TR; ++j) a = fmaf(sp[r][j], v[j], a);
            acc[r] = acc[r] * alpha_s[r] + a;
        }
    }
    __syncthreads();
    // the code splits at the final maximum mz (window terms are already relative to it): sums by row, outputs by
    // dimension
    if (t < NQ) {
        const float mf = m_s[t], mz = mf == -INFINITY ? 0.f : mf;
        float l = l_s[t];
#pragma unroll 8
        for (int s = 0; s < splits; ++s) {
            const long long i = pbase + (long long)s * ROWS + t;
            l += pl[i] * expf(pm[i] - mz);
        }
        l_s[t] = l;
    }
    float mz[NQ];
#pragma unroll
    for (int r = 0; r < NQ; ++r) mz[r] = m_s[r] == -INFINITY ? 0.f : m_s[r];
#pragma unroll 4
    for (int s = 0; s < splits; ++s) {
        const long long base = pbase + (long long)s * ROWS;
#pragma unroll
        for (int r = 0; r < NQ; ++r) acc[r] = fmaf(po[(base + r) * D_ + t], expf(pm[base + r] - mz[r]), acc[r]);
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < NQ; ++r) {
        const float l = l_s[r];
        out[(long long)b * so_b + (long long)(h * GQ + r % GQ) * so_h + (long long)(r / GQ) * so_l + t] =
            act_from_f(acc[r] / (l > 0.f ? l : 1.f));
    }
}
"""

# which kernel merges the partials of variant "cuda": "cuda" (million_merge_cuda above, the default: one cuda_rt launch,
# about 30 us less host time per call than Triton's launcher at batch 1; GPU time within 1 us of the Triton merge at
# batch 1 and up to 4% more of the whole call at batch 16 / 8k: million_speed_merge.md) or "triton"
# (kernels.million._million_merge_kernel)
MERGE = "cuda"


def million_merge_cuda(
    q: torch.Tensor,
    res_k: torch.Tensor,
    res_v: torch.Tensor,
    res_mask: torch.Tensor | None,
    part_o: torch.Tensor,
    part_m: torch.Tensor,
    part_l: torch.Tensor,
    out: torch.Tensor,
    *,
    r: int,
    splits: int,
    scale: float,
    hkv: int,
    gq: int,
    lq: int,
) -> None:
    """``out`` (B, Hq, Lq, D) = the log-sum-exp merge of the codes' partials (``ROWS`` rows per (batch, KV head,
    split)) with attention over the ``r``-token window ``res_k``/``res_v`` (B, Hkv, R, D; last dim contiguous;
    ``res_mask`` int8 (B, Lq, R) or None): the function of ``kernels.million._million_merge_kernel``, for
    ``GQ * Lq <= ROWS`` and head_dim 64 or 128. ``res_k``/``res_v`` may be any tensors when ``r == 0``."""
    b, _, _, d = q.shape
    nq = gq * lq
    if d not in (64, 128) or nq > ROWS or nq < 1:
        raise HfEffllmError(f"million_merge_cuda takes head_dim 64 or 128 and 1-{ROWS} query rows; got {d}, {nq}.")
    rk, rv = (res_k, res_v) if r > 0 else (q, q)  # dummies when there is no window (never read)
    qs, ks, vs, os_ = q.stride(), rk.stride(), rv.stride(), out.stride()  # each read once (host time per call)
    if qs[3] != 1 or os_[3] != 1 or ks[3] != 1 or vs[3] != 1:
        raise HfEffllmError("million_merge_cuda needs q, out and the window with a contiguous last dimension.")
    # 16-byte loads of the window where every row starts on a 16-byte boundary
    vec = r == 0 or (
        (rk.data_ptr() | rv.data_ptr()) % 16 == 0 and (ks[0] | ks[1] | ks[2] | vs[0] | vs[1] | vs[2]) % 8 == 0
    )
    key = ("merge", d, nq, gq, hkv, q.dtype == torch.bfloat16, res_mask is not None, vec)

    def source() -> str:
        return render(_MERGE_SOURCE, D=d, NQ=nq, GQ=gq, HKV=hkv, ROWS=ROWS, HAS_RMASK=res_mask is not None,
                      BF16=q.dtype == torch.bfloat16, VEC=vec)  # fmt: skip

    kernel = compiled(key, q.device, source, "million_merge_cuda")
    sm = res_mask.stride() if res_mask is not None else (0, 0, 0)
    ints = [
        int(r), int(splits), _float_bits(scale), qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
        sm[0], sm[1], os_[0], os_[1], os_[2],
    ]  # fmt: skip
    with on_device(q.device):
        launch(kernel, (b * hkv, 1, 1), d, 0, [q, rk, rv, res_mask, part_o, part_m, part_l, out], ints)


DESIGN: str | None = None  # None: "lut" where it applies (design_for), else "mma"; a name forces that design


def design_for(rows: int, codebook_v: torch.Tensor, split_len: int = LUT_MIN_TOKENS) -> str:
    """The kernel design for ``rows = GQ * Lq`` query rows and blocks of ``split_len`` codes: ``"lut"`` (lookup
    tables for the scores, values on the CUDA cores: this module's docstring) up to 4 rows, when each block has at
    least ``LUT_MIN_TOKENS`` codes to amortise building its tables and the value codebook fits fp16; else ``"mma"``.
    The module setting ``DESIGN`` overrides (the benchmark compares the two)."""
    if DESIGN is not None:
        if DESIGN not in DESIGNS:
            raise HfEffllmError(f"million_cuda.DESIGN={DESIGN!r} is not known; use one of {DESIGNS} or None.")
        if DESIGN == "lut" and rows > LUT_ROWS:
            raise HfEffllmError(f"design 'lut' takes at most {LUT_ROWS} query rows per KV head; got {rows}.")
        return DESIGN
    if rows > LUT_ROWS or split_len < LUT_MIN_TOKENS:
        return "mma"
    return "lut" if lut_value_table(codebook_v) is not None else "mma"


def cuda_source(
    *, d: int, m: int, gq: int, lq: int, hkv: int, bf16: bool, per_head: bool, has_mask: bool, nwarps: int = NWARPS,
    design: str = "mma", code_stride: int = 0, tile: str | None = None,
) -> str:  # fmt: skip
    """The kernel's CUDA source for one shape (constants baked in, like Triton's ``constexpr``); ``code_stride``:
    the codes' token stride in bytes when it is known (``"lut"``; 0: read at run time); ``tile``: the ``"lut"``
    probability tile's layout (default: ``LUT_TILE``)."""
    tile = LUT_TILE if tile is None else tile
    return render(
        _HEADER + (_SOURCE_LUT if design == "lut" else _SOURCE), D=d, M=m, DSUB=d // m, GQ=gq, LQ=lq, HKV=hkv,
        NWARPS=nwarps, IS_BF16=bf16, PER_HEAD=per_head, HAS_MASK=has_mask, CS=code_stride if design == "lut" else 0,
        PW=lut_tile_words(tile), TILE_PAD=tile == "padded",
    )  # fmt: skip


def smem_bytes(
    d: int, m: int, nwarps: int = NWARPS, rows: int = ROWS, design: str = "mma", tile: str | None = None
) -> int:
    """Dynamic shared memory of one block. ``"mma"``: both tables (256 x D x 2 bytes each); the final merge of the
    warps' ``rows`` query rows reuses them (and needs more at 16 warps with 9-16 rows). ``"lut"``: the lookup table
    (256 x M x 8 bytes), the value table, the scaled query rows and each warp's probability tile (its layout
    ``tile``, default ``LUT_TILE``)."""
    if design == "lut":
        return 256 * m * 8 + 256 * d * 2 + 4 * d * 4 + nwarps * lut_tile_words(tile) * 4
    merge = nwarps * ((8 if rows <= 8 else 16) * d + 32) * 4
    return max(2 * 256 * d * 2, merge)


def kernel_tables(
    codebook_k: torch.Tensor, codebook_v: torch.Tensor, design: str = "mma"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two ``(G, M, K, DSUB)`` codebooks as the kernel reads them. ``"mma"``: words ``(G, M, K)``, one word =
    one centroid's ``DSUB`` elements (views of the codebooks, no copy). ``"lut"``: the keys the same way, the values
    as :func:`lut_value_table`."""
    if design == "lut":
        table_v = lut_value_table(codebook_v)
        if table_v is None:
            raise HfEffllmError("design 'lut' needs a value codebook that fits fp16 (finite, |x| <= 65504).")
        return subspace_table(codebook_k), table_v
    return subspace_table(codebook_k), subspace_table(codebook_v)


_SUBSPACE: dict[int, tuple] = {}  # id(codebook) -> (weakref, state, word view)


def subspace_table(codebook: torch.Tensor) -> torch.Tensor:
    """``(G, M, K, DSUB)`` codebook -> words ``(G, M, K)`` (one word = one centroid's ``DSUB`` elements): a view
    (of a contiguous copy when the codebook is not contiguous). Memoized per codebook tensor
    (:func:`kernels.million.memoized_per_tensor`: rebuilt after an in-place change, or when the tensor's storage,
    shape or strides change), so a decode step does not rebuild the two views."""

    def build(cb: torch.Tensor) -> torch.Tensor:
        cb = cb.contiguous()
        return cb.view(_WORD_DTYPES[cb.shape[-1] * cb.element_size()])[..., 0]

    return memoized_per_tensor(_SUBSPACE, codebook, build)


_LUT_V: dict[int, tuple] = {}  # id(value codebook) -> (weakref, state (memoized_per_tensor), table or None)


def lut_value_table(codebook_v: torch.Tensor) -> torch.Tensor | None:
    """The value codebook as the ``"lut"`` kernel reads it, or None when it does not fit fp16: fp16, code-major,
    int32 words ``(G, K * M * DSUB / 2)``; word ``w`` of centroid ``c`` of subspace ``m`` at
    ``(c * M + perm(m)) * DSUB / 2 + w``, where ``perm`` gives lane ``l``'s subspaces ``2 l, 2 l + 1`` the banks
    ``l`` and ``32 + l`` when ``M = 64`` (identity otherwise). Memoized per codebook tensor (one check of its range
    per new codebook)."""

    def build(cb: torch.Tensor) -> torch.Tensor | None:
        if not bool(torch.isfinite(cb).all()) or float(cb.abs().max()) > 65504.0:
            return None
        g, m, k, dsub = cb.shape
        x = cb.to(torch.float16).permute(0, 2, 1, 3)  # (G, K, M, DSUB)
        if m > 32:  # SPL = 2: position p holds subspace 2 (p % 32) + p // 32
            pos = torch.arange(m, device=cb.device)
            x = x[:, :, 2 * (pos % 32) + pos // 32]
        return x.contiguous().view(torch.int32).reshape(g, -1)

    return memoized_per_tensor(_LUT_V, codebook_v, build)


_SUPPORTS: dict[tuple, str | None] = {}  # supports_key(...) -> answer


def supports_key(
    q: torch.Tensor, codes_k: torch.Tensor, codes_v: torch.Tensor, codebook_k: torch.Tensor, gq: int, lq: int
) -> tuple:
    """Everything :func:`supports` reads of its inputs: ``q``'s device, dtype and head dimension, the codebook's
    shape, ``gq``, ``lq``, the codes' strides and their addresses modulo 16 (the device's capability and shared
    memory are fixed per device)."""
    return (
        q.device, q.dtype, q.shape[-1], codebook_k.shape, gq, lq,
        codes_k.stride(), codes_v.stride(), codes_k.data_ptr() & 15, codes_v.data_ptr() & 15,
    )  # fmt: skip


def supports(
    q: torch.Tensor, codes_k: torch.Tensor, codes_v: torch.Tensor, codebook_k: torch.Tensor, gq: int, lq: int
) -> str | None:
    """None when the CUDA kernel handles these inputs, else the reason it does not. Answered once per
    :func:`supports_key` (asked on every default ``million_attention`` call)."""
    key = supports_key(q, codes_k, codes_v, codebook_k, gq, lq)
    try:
        return _SUPPORTS[key]
    except KeyError:
        pass
    why = _supports(q, codes_k, codes_v, codebook_k, gq, lq)
    if len(_SUPPORTS) >= 1024:
        _SUPPORTS.clear()
    _SUPPORTS[key] = why
    return why


def _on_gpu(device: torch.device) -> bool:
    """Whether ``device`` is a GPU this torch can compile CUDA source for (the tests fake it)."""
    return device.type == "cuda" and available()


def _supports(
    q: torch.Tensor, codes_k: torch.Tensor, codes_v: torch.Tensor, codebook_k: torch.Tensor, gq: int, lq: int
) -> str | None:
    """:func:`supports`, not memoized."""
    if not _on_gpu(q.device):
        return "needs CUDA and torch.cuda._compile_kernel (torch >= 2.8)"
    if capability(q.device) < (8, 0):
        return "needs a GPU of compute capability 8.0 or newer (bf16/fp16 mma.m16n8k16)"
    _, _, k, dsub = codebook_k.shape
    d = q.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"q.dtype={q.dtype}; the CUDA kernel takes float16 or bfloat16"
    if k != 256 or dsub not in (2, 4) or d not in (64, 128):
        return f"K={k}, DSUB={dsub}, D={d}; the CUDA kernel takes K=256, DSUB 2 or 4, D 64 or 128"
    if gq * lq > ROWS:
        return f"GQ * Lq = {gq * lq} query rows per KV head; the CUDA kernel takes at most {ROWS}"
    need, limit = smem_bytes(d, d // dsub, num_warps(gq * lq), gq * lq), smem_limit(q.device)
    if need > limit:
        return f"it needs {need} bytes of shared memory per block at D={d}, M={d // dsub}; this GPU gives {limit}"
    for name, c in (("codes_k", codes_k), ("codes_v", codes_v)):
        if c.stride(-1) != 1 or any(st % 16 for st in c.stride()[:3]) or c.data_ptr() % 16:
            return f"{name} rows are not 16-byte aligned"
    if any(s >= 2**31 for c in (codes_k, codes_v) for s in c.stride()[:3]):
        return "code strides do not fit 32 bits"
    return None


def split_plan(n: int, bh: int, device: torch.device, splits: int | None = None) -> tuple[int, int]:
    """``(splits, split_len)`` for ``n`` codes and ``bh`` (batch x KV head) blocks: one block per SM (the tables
    fill its shared memory) and all blocks in one wave, unless ``splits`` is given; ``split_len`` is a multiple of
    a warp's 32-token tile."""
    if n <= 0:
        return 0, 32
    if splits is None:
        splits = max(1, sm_count(device) // bh)
    splits = max(1, min(splits, cdiv(n, 32)))
    split_len = cdiv(cdiv(n, splits), 32) * 32
    return cdiv(n, split_len), split_len


def _compiled(key: tuple, device: torch.device) -> tuple[Any, int]:
    """``(kernel, shared-memory bytes)`` for ``key = (d, m, gq, lq, hkv, bf16, per_head, has_mask, nwarps,
    design, code_stride, tile)`` on ``device`` (``tile``: the probability tile's layout, ``LUT_TILE``); the source
    is generated and compiled on the first call only (a dict lookup afterwards)."""
    d, m, gq, lq, hkv, bf16, per_head, has_mask, nwarps, design, code_stride, tile = key
    smem = smem_bytes(d, m, nwarps, gq * lq, design, tile)

    def source() -> str:
        return cuda_source(
            d=d,
            m=m,
            gq=gq,
            lq=lq,
            hkv=hkv,
            bf16=bf16,
            per_head=per_head,
            has_mask=has_mask,
            nwarps=nwarps,
            design=design,
            code_stride=code_stride,
            tile=tile,
        )

    name = "million_codes_lut" if design == "lut" else "million_codes_cuda"
    return compiled(key, device, source, name, smem), smem


def million_codes_cuda(
    q: torch.Tensor,
    codes_k: torch.Tensor,
    codes_v: torch.Tensor,
    table_k: torch.Tensor,
    table_v: torch.Tensor,
    code_mask: torch.Tensor | None,
    part_o: torch.Tensor,
    part_m: torch.Tensor,
    part_l: torch.Tensor,
    *,
    n: int,
    split_len: int,
    splits: int,
    scale: float,
    hkv: int,
    gq: int,
    lq: int,
    per_head: bool,
    nwarps: int | None = None,
    design: str = "mma",
) -> None:
    """Write the per-split partials (output, max, sum; ``ROWS`` rows per (batch, KV head, split)) of the codes.

    ``table_k``, ``table_v``: the codebooks as :func:`kernel_tables` lays them out for ``design``
    (:func:`design_for`); the other arguments are those of the Triton code kernels; ``nwarps`` (1-16) overrides
    :func:`num_warps`. Callers check :func:`supports` first.
    """
    b, d = q.shape[0], q.shape[-1]
    m = codes_k.shape[-1]
    sq, sk, sv = q.stride(), codes_k.stride(), codes_v.stride()
    # the cache's codes are rows of M bytes: that stride is compiled in ("lut"), any other one read at run time
    cs = m if design == "lut" and sk[2] == m and sv[2] == m else 0
    has_mask = code_mask is not None
    key = (d, m, gq, lq, hkv, q.dtype, per_head, has_mask, nwarps, design, cs, q.device, LUT_TILE)
    plan = _PLANS.get(key)
    if plan is None:  # checked (and compiled) once per key
        plan = _launch_plan(key)
        if len(_PLANS) >= 1024:
            _PLANS.clear()
        _PLANS[key] = plan
    kernel, smem, warps = plan
    if part_o.numel() < b * hkv * splits * ROWS * d:
        raise HfEffllmError(f"part_o holds {part_o.numel()} floats; need {b * hkv * splits * ROWS * d}.")
    if splits > 65535:
        raise HfEffllmError(f"splits={splits} exceeds the grid limit 65535; use fewer splits.")
    cm = code_mask if has_mask else part_m
    ptrs = [q, codes_k, codes_v, table_k, table_v, cm, part_o, part_m, part_l]
    ints = [
        int(n), int(split_len), int(splits), _float_bits(scale),
        sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2],
        table_k.stride(0) if per_head else 0, cm.stride(0) if has_mask else 0,
    ]  # fmt: skip
    with on_device(q.device):
        launch(kernel, (b * hkv, splits, 1), warps * 32, smem, ptrs, ints)


_PLANS: dict[tuple, tuple[Any, int, int]] = {}  # launch key -> (kernel, shared-memory bytes, warps)
_F32, _I32 = struct.Struct("<f"), struct.Struct("<i")


def _float_bits(x: float) -> int:
    """The bits of ``x`` as an fp32, read as an int32 (a float argument's C type differs by torch version)."""
    return _I32.unpack(_F32.pack(x))[0]


def _launch_plan(key: tuple) -> tuple[Any, int, int]:
    """``(kernel, shared-memory bytes, warps)`` of :func:`million_codes_cuda` for its launch key ``(d, m, gq, lq,
    hkv, dtype, per_head, has_mask, nwarps, design, code_stride, device, LUT_TILE)``, after the checks of
    ``design`` and ``nwarps`` against the device's shared memory (compiling the kernel on the first call for its
    key)."""
    d, m, gq, lq, hkv, dtype, per_head, has_mask, nwarps, design, cs, device, tile = key
    if design not in DESIGNS or (design == "lut" and gq * lq > LUT_ROWS):
        raise HfEffllmError(f"design={design!r} does not take GQ * Lq = {gq * lq} query rows; use 'mma'.")
    warps = nwarps or num_warps(gq * lq, design)
    if not 1 <= warps <= NWARPS:
        raise HfEffllmError(f"nwarps={nwarps} is out of range; use 1 to {NWARPS} (or None for the default).")
    need, limit = smem_bytes(d, m, warps, gq * lq, design, tile), smem_limit(device)
    if need > limit:
        raise HfEffllmError(
            f"nwarps={warps} needs {need} bytes of shared memory per block at D={d}, M={m}; this GPU gives {limit}. "
            f"Use fewer warps (the default, {num_warps(gq * lq, design)}, fits on the H100/H200)."
        )
    kernel, smem = _compiled(
        (d, m, gq, lq, hkv, dtype == torch.bfloat16, per_head, has_mask, warps, design, cs, tile), device
    )
    return kernel, smem, warps
