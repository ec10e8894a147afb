"""SpQR decode products for 8-16 activation rows without shared-memory staging: ``spqr_octet_flat`` (sm_90+).

Same layout and decode as :mod:`kernels.spqr_octet` (one weight row per ``mma`` column, the activations in the A
operand); what changes is where the time goes. Profiles of ``spqr_octet_split`` at 16 rows
(``benchmarks/results/ncu_profiles_after_s16.md``) spent about a quarter of each warp's time before its first step:
every block gathered its chunk of the activations through the permutation, found each row's largest magnitude and
scaled them into shared memory, behind two block barriers; and about 239 warp instructions per 64-column step, of
which the decode and ``mma`` are about 60. Here:

* ``spqr_octet_prep`` (a small grid: rows x 1024-column blocks) does the gather, the per-row power-of-two scale and
  the fp16 rounding once, into a global buffer in the octet kernels' shared-memory image order (``xs_index`` with
  row pairs ``64 KS`` columns apart) plus ``rinv`` per row, and lets the next kernel start at once
  (``griddepcontrol.launch_dependents``).
* ``spqr_octet_flat`` is launched with programmatic stream serialization (:func:`kernels.cuda_rt.launch` with
  ``pdl=True``): each warp issues its first weight loads, then waits for the activations (``griddepcontrol.wait``).
  Every warp of a persistent grid takes an equal contiguous range of the layer's (octet, step) items in octet-major
  order and streams it with ``FD_`` steps of loads in flight in registers (codes, statistics, and the step's
  outlier entries, one per lane); the A fragments are read from the global buffer (L1) one step ahead; each step's
  outliers are added to its decoded weights through one of two one-step tiles per warp in shared memory, used in
  turn (positions precomputed in ``layout["fent"]``, :func:`flat_entries`). An octet the warp covers whole is
  written directly; one shared with the neighbouring warps (at most two per warp) goes through a scratch slot and a
  counter per octet, and the warp that arrives last adds the pieces in warp order (deterministic: the same launch
  gives the same bits).

With no block barrier and no staging, 16 rows cost about 1.1x one. Measured on the H200 (3-bit, 16x16 groups,
act-order, outliers; CUDA graphs over distinct copies, 3 interleaved rounds):

* session 17 (``benchmarks/results/spqr_speed_flat.md``), against ``spqr_octet_split``, the dispatch's kernel there
  before: 1.31x / 1.36x / 1.31x faster at 16 rows (4096 -> 11008, 11008 -> 4096, 4096 -> 4096), 1.19-1.22x at 12
  rows, 1.08-1.11x at 8, 0.95-1.06x at 4;
* session 18 (``benchmarks/results/spqr_flat_s18.md``), this loop against session 17's: 1.08-1.10x faster on the two
  MLP shapes, 1.00-1.01x on 4096 -> 4096. Against bf16: 0.85x / 0.86x / 0.71x at 1 row (``spqr_octet_stream``:
  1.04x / 0.97x / 0.86x, so the dispatch keeps it there), 0.77x / 0.78x / 0.65x at 8 rows, 0.76x / 0.78x / 0.65x
  at 16.

Its limit is latency, not instruction issue: about 40% fewer instructions per step (session 18's loop against
session 17's, counted in the SASS) changed the time by -4% to +4% until the A fragments were loaded a step ahead
(``benchmarks/results/spqr_flat_proto_s18.md``). By Nsight Compute (the prototypes at depth 4, 1 and 16 rows) the
issue slots are 36-42% busy with 16 warps per SM (the 128 registers a thread may use at 2 blocks of 8 warps), DRAM
17-20%, and at 16 rows 42% of the stall samples wait on L1TEX data, the hottest at the A fragments' first use. A variant over octet pairs (each A
fragment serving two octets) was correct but not faster (same file). :func:`kernels.spqr.cuda_path` routes
8-16 rows here. The PyTorch reference of the same function is :func:`kernels.spqr.spqr_matmul_reference`.

Example:
    >>> lay = octet_layout(layer.packed_tensors(), **layer.packed_meta())  # doctest: +SKIP
    >>> y = spqr_octet_flat(x, lay, bias=layer.bias)  # x: (16, in_features) bf16 on an sm_90 GPU  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch

from hf_effllm.errors import HfEffllmError

from .cuda_rt import capability, cdiv, launch, on_device, sm_count
from .spqr_octet import MAX_ROWS, _bias, _check_index_range, _check_ranges, _kernel, _rows, octet_source

__all__ = ["FLAT_ROWS", "flat_entries", "flat_launch", "flat_source", "spqr_octet_flat"]

FLAT_ROWS = 16  # activation rows of one launch (the mma's m16)
PREP_COLUMNS = 1024  # stored columns per block of spqr_octet_prep (4 per thread of 256)

_FLAT_SOURCE = r"""
#define FD_ {FD}                 // steps of loads in flight per warp
#define FW_ {FW}                 // warps per block
#define FMB_ {FMB}               // blocks per SM the registers are budgeted for

// activations (M, K) -> xf (the shared-memory image order of xs_index, row pairs KS * 256 bytes apart), gathered by
// perm, row m scaled by 2^e so that its largest magnitude lies in [2^13, 2^14), rounded to fp16; rinv[m] = 2^-e.
// Block (m, b) takes stored columns [b CPB, (b + 1) CPB) of row m (CPB <= 1024) and reads the whole row for the max.
extern "C" __global__ void __launch_bounds__(256) spqr_octet_prep(
    const u16* __restrict__ x, const int* __restrict__ perm, u16* __restrict__ xf, float* __restrict__ rinv,
    int M, int K, int KS, int sx, int CPB) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    const int m = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int c0 = blockIdx.y * CPB, c1 = min(c0 + CPB, KS * 64);
    __shared__ float red[8];
    const u16* xr = x + (long long)m * sx;
    int src[4];  // the permutation entries first: independent of the row's loads
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int k = c0 + (int)threadIdx.x + i * 256;
        src[i] = k < c1 && k < K ? (perm ? __ldg(perm + k) : k) : -1;
    }
    float mx = 0.f;
#pragma unroll 8
    for (int k = threadIdx.x; k < K; k += 256) mx = fmaxf(mx, fabsf(act_f(xr[k])));
#pragma unroll
    for (int off = 16; off; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    float v = red[0];
#pragma unroll
    for (int w = 1; w < 8; ++w) v = fmaxf(v, red[w]);
    const int e = scale_exponent(v);  // as stage_chunk scales a row
    const float sc = ldexpf(1.f, e);
    if (blockIdx.y == 0 && threadIdx.x == 0) rinv[m] = ldexpf(1.f, -e);
    const int RSB = KS * 256;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int k = c0 + (int)threadIdx.x + i * 256;
        if (k < c1) xf[xs_index(m, k, RSB)] = src[i] >= 0 ? half_from_f(act_f(xr[src[i]]) * sc) : (u16)0;
    }
}

// the first item of warp w when NWT warps split T items evenly, and the warp whose range holds item i
__device__ __forceinline__ long long fl_begin(long long w, long long T, long long NWT) { return w * T / NWT; }
__device__ __forceinline__ long long fl_owner(long long i, long long T, long long NWT) {
    return ((i + 1) * NWT - 1) / T;
}

// the end of an octet segment of a warp: the C fragment sums (c0 = (activation row g, weight row 2t), c1 = (g,
// 2t + 1), c2/c3 the same for row g + 8) written whole, or stored as piece `piece` of `np` in scratch and counted;
// the last piece's warp adds the pieces in order, writes the rows and resets the counter for the next launch
__device__ __forceinline__ void fl_finish(float a0, float a1, float a2, float a3, int o, bool whole, int piece, int np,
                                       int M, int N, int PMAX, const float* __restrict__ rinv,
                                       const u16* __restrict__ bias, u16* __restrict__ y, int sy,
                                       float* __restrict__ scratch, int* __restrict__ counters) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const float acc[4] = {a0, a1, a2, a3};
    if (whole) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int m = g + (i >> 1) * 8, row = o * 8 + 2 * t + (i & 1);
            if (m < M && row < N) {
                float v = acc[i] * rinv[m];
                if (bias) v += act_f(bias[row]);
                y[(long long)m * sy + row] = act_from_f(v);
            }
        }
        return;
    }
    float* mine = scratch + ((long long)o * PMAX + piece) * 128;  // [8 weight rows][16 activation rows]
#pragma unroll
    for (int i = 0; i < 4; ++i) mine[(2 * t + (i & 1)) * 16 + g + (i >> 1) * 8] = acc[i];
    if (!warp_arrives_last(counters, o, np)) return;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = g + (i >> 1) * 8, r = 2 * t + (i & 1), row = o * 8 + r;
        float v = 0.f;
#pragma unroll 1
        for (int p = 0; p < np; ++p) v += __ldcg(scratch + ((long long)o * PMAX + p) * 128 + r * 16 + m);
        if (m < M && row < N) {
            v *= rinv[m];
            if (bias) v += act_f(bias[row]);
            y[(long long)m * sy + row] = act_from_f(v);
        }
    }
    if (lane == 0) counters[o] = 0;
}

// shared-memory access by 32-bit address (the correction tiles), and the A fragments' 16-byte global load: an
// ordinary (coherent) load, so that none of the prepared activations is read before griddepcontrol.wait (ptxas moves
// ld.global.nc loads, whose data it may take as constant for the whole kernel, above it)
__device__ __forceinline__ void sts_u16(u32 a, u32 v) {
    asm volatile("st.shared.u16 [%0], %1;" ::"r"(a), "h"((u16)v) : "memory");
}
__device__ __forceinline__ uint4 lds_128(u32 a) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a) : "memory");
    return v;
}
__device__ __forceinline__ void sts_zero128(u32 a) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};" ::"r"(a), "r"(0) : "memory");
}
__device__ __forceinline__ uint4 ld_a128(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// y (M, N) = x (M, K) W^T (+ bias), M <= 16, from the prepared activations xf and rinv (spqr_octet_prep)
extern "C" __global__ void __launch_bounds__(FW_ * 32, FMB_) spqr_octet_flat(
    const uint4* __restrict__ xf, const float* __restrict__ rinv, const uint2* __restrict__ codes,
    const u8* __restrict__ stats, const uint2* __restrict__ stats2, const u32* __restrict__ fent,
    const int* __restrict__ sptr, const u16* __restrict__ bias, u16* __restrict__ y, float* __restrict__ scratch,
    int* __restrict__ counters, int M, int N, int KS, int NO, int sy, int NWT, int PMAX) {
    extern __shared__ __align__(16) char smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int T = NO * KS, gw = blockIdx.x * FW_ + warp;
    const int ib = (int)fl_begin(gw, T, NWT), ie = (int)fl_begin(gw + 1, T, NWT);
    if (gw >= NWT || ib >= ie) return;  // no block barrier follows
    // two one-step correction tiles per warp, used in turn: [half of the slice][lane][8] fp16 each
    const u32 tb = smem_addr(smem) + warp * 2048;
    for (int i = lane; i < 128; i += 32) sts_zero128(tb + i * 16);
    uint2 bcw[FD_], bs2[FD_];
    u32 bsb[FD_], ben[FD_];
    int bn[FD_], shi[FD_];
    const int last = ie - 1;
    // the loads run FD_ items ahead of the steps: the codes and statistics through per-round pointers and immediate
    // offsets, sptr one round ahead of its use (the entries' loads need it); the stats2 word of (octet pair, step, t) tracked by index (s2i, the steps to the octet's end p_left,
    // the jump at that end s2d: back to the pair's start after an even octet, none after an odd one)
    int p_o = ib / KS;
    int p_left = KS - (ib - p_o * KS);
    u32 s2i = (u32)(((p_o >> 1) * KS + (ib - p_o * KS)) * 4 + t);
    u32 s2d = (p_o & 1) ? 0u : (u32)(-KS * 4);
    const u32 s2x = (u32)(-KS * 4);
    int prev_hi = __ldg(sptr + ib);
#pragma unroll
    for (int u = 0; u < FD_; ++u) if (ib + u <= last) shi[u] = __ldg(sptr + ib + u + 1);
    const uint2* pc = codes + (u32)ib * 32u + lane;
    const u8* ps = stats + (u32)ib * 32u + lane;
    const int* pp = sptr + ib + FD_ + 1;
    int lim = last - ib;  // slots u <= lim load in this round
// slot U <- the round's item U: codes, statistics and outlier entries (lane j: entry j, if any); sptr of item + FD_
#undef LOAD  // spqr_octet_gemv's macro of the same name (octet_source, earlier in this source)
#define LOAD(U)                                                                                    \
    if (U <= lim) {                                                                                \
        bcw[U] = ld_stream2(pc + U * 32);                                                          \
        bsb[U] = ld_stream_u8(ps + U * 32);                                                        \
        bs2[U] = __ldg(stats2 + s2i);                                                              \
        const int lo_ = prev_hi, n_ = shi[U] - lo_;                                                \
        prev_hi = shi[U];                                                                          \
        bn[U] = n_;                                                                                \
        ben[U] = lane < n_ ? __ldg(fent + lo_ + lane) : 0u;                                        \
        if (U + FD_ <= lim) shi[U] = __ldg(pp + U);                                                \
        s2i += 4;                                                                                  \
        if (--p_left == 0) {                                                                       \
            p_left = KS;                                                                           \
            s2i += s2d;                                                                            \
            s2d ^= s2x;                                                                            \
        }                                                                                          \
    }
#pragma unroll
    for (int u = 0; u < FD_; ++u) LOAD(u);
    asm volatile("griddepcontrol.wait;" ::: "memory");  // spqr_octet_prep's activations are complete from here
    const uint4* xl = xf + (long long)(g < (M < 8 ? M : 8) ? g : 0) * KS * 16 + t;  // row pair g (absent: pair 0)
    int c_o = ib / KS;
    const int s0 = ib - c_o * KS;
    int seg_len = min(KS - s0, ie - ib);  // the current octet segment: its length, steps left, the next one's start
    int seg_left = seg_len, seg_next = ib + seg_len;
    float acc0[4] = {0.f, 0.f, 0.f, 0.f}, acc1[4] = {0.f, 0.f, 0.f, 0.f};
    const uint4* xpb = xl + s0 * 16;  // the round's A base: slot u reads xpb + 16 u
    u32 toff = 0;                     // the tile of this step: 0 or 1024 bytes
    uint4 na0 = ld_a128(xpb), na1 = ld_a128(xpb + 4), na2 = ld_a128(xpb + 8), na3 = ld_a128(xpb + 12);
    int rb = ib;  // the round's first item
    for (;;) {
        pc += FD_ * 32;
        ps += FD_ * 32;
        pp += FD_;
        lim -= FD_;
#pragma unroll
        for (int u = 0; u < FD_; ++u) {
            u32 b[4][2];
            decode_step(b, bcw[u], bsb[u], bs2[u]);
            const uint4 a0 = na0, a1 = na1, a2 = na2, a3 = na3;  // this step's A fragments; the next step's issued
            {
                const uint4* xq = seg_left == 1 ? xl : xpb + (u + 1) * 16;
                na0 = ld_a128(xq);
                na1 = ld_a128(xq + 4);
                na2 = ld_a128(xq + 8);
                na3 = ld_a128(xq + 12);
            }
            const int n = bn[u];
            const u32 tl = tb + toff;
            toff ^= 1024u;
            const u32 en = ben[u];
            if (lane < n) sts_u16(tl + ((en & 511u) << 1), en >> 16);
            if (n > 32) {  // warp-uniform, rare: the step's entries past the first 32
                const int lo = __ldg(sptr + rb + u);
#pragma unroll 1
                for (int e = 32 + lane; e < n; e += 32) {
                    const u32 en2 = __ldg(fent + lo + e);
                    sts_u16(tl + ((en2 & 511u) << 1), en2 >> 16);
                }
            }
            __syncwarp();  // every step: the writes before the reads, and last step's clears before the next writes
            if (n > 0) {   // warp-uniform: each lane adds its 16 corrections and clears them
                const u32 ta = tl + lane * 16;
                add_corrections(b, lds_128(ta), lds_128(ta + 512));
                sts_zero128(ta);
                sts_zero128(ta + 512);
            }
            mma_f16(acc0, a0, b[0][0], b[0][1]);
            mma_f16(acc1, a1, b[1][0], b[1][1]);
            mma_f16(acc0, a2, b[2][0], b[2][1]);
            mma_f16(acc1, a3, b[3][0], b[3][1]);
            LOAD(u);
            if (--seg_left == 0) {  // the end of an octet segment (warp-uniform)
                const bool whole = seg_len == KS;
                int piece = 0, np = 1;
                if (!whole) {
                    const long long f = fl_owner((long long)c_o * KS, T, NWT);
                    np = (int)(fl_owner((long long)c_o * KS + KS - 1, T, NWT) - f) + 1;
                    piece = (int)(gw - f);
                }
                fl_finish(acc0[0] + acc1[0], acc0[1] + acc1[1], acc0[2] + acc1[2], acc0[3] + acc1[3], c_o, whole,
                          piece, np, M, N, PMAX, rinv, bias, y, sy, scratch, counters);
                if (seg_next == ie) return;
#pragma unroll
                for (int i = 0; i < 4; ++i) acc0[i] = acc1[i] = 0.f;
                ++c_o;
                seg_len = seg_left = min(KS, ie - seg_next);
                seg_next += seg_len;
                xpb = xl - (u + 1) * 16;
            }
        }
        rb += FD_;
        xpb += FD_ * 16;
    }
}
#undef LOAD
"""


def flat_source(*, warps: int, depth: int, blocks_per_sm: int, bf16: bool) -> str:
    """The CUDA source of ``spqr_octet_prep`` and ``spqr_octet_flat`` (after the octet kernels' device helpers):
    ``warps`` per block, ``depth`` steps of loads in flight per warp, registers budgeted for ``blocks_per_sm``
    resident blocks, and the activation dtype."""
    src = _FLAT_SOURCE
    for name, value in dict(FD=depth, FW=warps, FMB=blocks_per_sm).items():
        src = src.replace("{" + name + "}", str(value))
    return octet_source(warps=warps, hi=True, bf16=bf16, split=True) + src


def flat_entries(sent: torch.Tensor) -> torch.Tensor:
    """The octet layout's step-sorted outlier entries (``column in step | row in octet << 6 | (step mod 128) << 9 |
    fp16 correction << 16``) as ``tile position | correction << 16``: the position of the correction in the warp's
    one-step tile (the half index ``(column bit 3) * 256 + (lane g * 4 + column / 16) * 8 + column % 8``, where
    lane ``(g, t)`` reads its 16 as two 16-byte words, columns 0-7 and 8-15 of its slice)."""
    e = sent.to(torch.int64) & 0xFFFFFFFF
    col, row = e & 63, (e >> 6) & 7
    pos = (((col >> 3) & 1) << 8) | (((col >> 4) | (row << 2)) << 3) | (col & 7)
    out = pos | (e & 0xFFFF0000)
    return ((out + 2**31) % 2**32 - 2**31).to(torch.int32)


def flat_launch(rows: int, device: torch.device) -> tuple[int, int, int]:
    """``(warps, depth, blocks_per_sm)`` of :func:`spqr_octet_flat`: 8 warps, 3 steps in flight, 2 blocks per SM
    (16 warps per SM at the 128 registers a thread may then use; with the A fragments loaded a step ahead, 4 steps
    is the deepest that does not spill). Measured in ``benchmarks/results/spqr_flat_s18.md`` at 1, 8 and 16 rows:
    3 was 0-3% faster than 4 on the MLP shapes and within 2% of it on 4096 -> 4096; 2 was 6-11% slower."""
    return 8, 3, 2


def spqr_octet_flat(
    x: torch.Tensor,
    layout: dict[str, Any],
    *,
    bias: torch.Tensor | None = None,
    warps: int | None = None,
    depth: int | None = None,
    blocks_per_sm: int | None = None,
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for W in :func:`kernels.spqr_octet.octet_layout`, computed by ``spqr_octet_prep`` and
    ``spqr_octet_flat`` (sm_90+; see the module docstring). Shared octets are counted in
    ``layout["flat_counters"]`` (reset by the kernel: concurrent launches on one layout from several streams are not
    supported).

    Args:
        x: (..., in_features) float16 or bfloat16 on the layout's GPU, any number of rows (one launch per 16).
        layout: the layer's octet layout.
        bias: optional (out_features,) bias.
        warps: warps per block (1-32); depth: steps of loads in flight per warp (1-8); blocks_per_sm: resident
            blocks per SM the registers are budgeted for (1-4). ``None``: :func:`flat_launch`.

    Returns:
        (..., out_features) in ``x.dtype``.
    """
    lead, x2, y = _rows(x, layout, "spqr_octet_flat", max_rows=None)
    if x.device.type != "cuda" or capability(x.device) < (9, 0):
        raise HfEffllmError(
            f"spqr_octet_flat needs an sm_90+ GPU (programmatic dependent launch); x is on {x.device}. Use "
            f"spqr_octet_split or spqr_octet_gemv."
        )
    default = flat_launch(min(x2.shape[0], FLAT_ROWS), x.device)
    warps, depth, blocks_per_sm = (d if v is None else v for d, v in zip(default, (warps, depth, blocks_per_sm)))
    _check_ranges(("warps", warps, 1, 32), ("depth", depth, 1, 8), ("blocks_per_sm", blocks_per_sm, 1, 4))
    if warps * blocks_per_sm > 64:
        raise HfEffllmError(
            f"warps={warps} x blocks_per_sm={blocks_per_sm} is over the 64 warps an SM holds; use fewer of either."
        )
    n, k, ks, no, m = layout["n"], layout["k"], layout["ks"], layout["no"], x2.shape[0]
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    bias = _bias(bias, n, x.dtype)
    items = no * ks
    nwt = min(sm_count(x.device) * blocks_per_sm * warps, items)
    _check_index_range(no, ks, nwt)
    pmax = ks // max(1, items // nwt) + 2  # pieces an octet can have: its steps over the fewest items of a warp, + 2
    dev = x.device
    if layout.get("fent") is None or layout["fent"].device != dev:
        layout["fent"] = flat_entries(layout["sent"]).to(dev)
    counters = layout.get("flat_counters")
    if counters is None or counters.device != dev or counters.numel() < no:
        counters = layout["flat_counters"] = torch.zeros(no, dtype=torch.int32, device=dev)
    # the prepared activations (8 row pairs x KS steps x 256 bytes; rows a launch does not have are left as they
    # are: they only reach output rows that are never written), their scales, the shared octets' pieces
    xf = torch.empty(8 * ks * 128, dtype=torch.float16, device=dev)
    rinv = torch.empty(FLAT_ROWS, dtype=torch.float32, device=dev)
    scratch = torch.empty(no * pmax * 128, dtype=torch.float32, device=dev)
    bf16 = x.dtype == torch.bfloat16
    key = ("spqr_octet_flat", warps, depth, blocks_per_sm, bf16)

    def source() -> str:
        return flat_source(warps=warps, depth=depth, blocks_per_sm=blocks_per_sm, bf16=bf16)

    smem = warps * 2048
    with on_device(dev):
        prep = _kernel(key, dev, source, "spqr_octet_prep", 0)
        kern = _kernel(key, dev, source, "spqr_octet_flat", smem)
        for m0 in range(0, m, MAX_ROWS):
            mc = min(MAX_ROWS, m - m0)
            launch(prep, (mc, cdiv(ks * 64, PREP_COLUMNS), 1), 256, 0, [x2[m0:], layout.get("perm"), xf, rinv],
                   [mc, k, ks, x2.stride(0), PREP_COLUMNS])  # fmt: skip
            launch(
                kern, (cdiv(nwt, warps), 1, 1), warps * 32, smem,
                [xf, rinv, layout["codes"], layout["stats"], layout["stats2"], layout["fent"], layout["sptr"], bias,
                 y[m0:], scratch, counters],
                [mc, n, ks, no, y.stride(0), nwt, pmax], pdl=True,
            )  # fmt: skip
    return y.reshape(*lead, n)
