"""SpQR matrix products: Triton kernels, their host wrappers, and the plain PyTorch reference.

* :func:`spqr_matmul_reference`: dequantize the packed weight (``hf_effllm.quant.spqr.format``), gather the input
  columns by the permutation, matmul. The CPU path of ``SpQRLinear`` and the baseline of tests and benchmarks.
* :func:`kernel_layout`: the packed bitstreams re-laid out once per device for the kernels (codes in word-aligned
  2/4/8-bit lanes, statistics codes in bytes, second-level statistics in fp32, outlier columns in the original
  order). ``SpQRLinear`` builds it on the first GPU forward and keeps it.
* :func:`spqr_gemv_triton`: decode path (1..16 rows of activations), one launch: each program reads a block of
  output rows' codes, statistics and outliers once, dequantizes in registers (one shift + mask per code, the
  int-to-float conversion done with the 2^23 mantissa trick, one FMA) and accumulates (FMA for one row, ``tl.dot``
  for 2..16 rows); the permutation is applied by gathering activations in the kernel; outliers and bias are added by
  the same program. Optional split-K with fp32 atomics.
* :func:`spqr_dequantize_triton`: prefill path: dequantize to the activation dtype in one kernel, in the original
  column order, then ``torch.matmul``.
* :func:`spqr_matmul`: validates the inputs and picks the path: the CUDA kernels of ``kernels.spqr_cuda`` for
  fp16/bf16 activations on a GPU when the format allows (the default since session 7: in eager mode on the H200 a
  batch-1 call takes 1.6-3.3x less time than the Triton path, mostly launch overhead; batch 16 0.7-1.9x; in CUDA
  graphs it is 12-25% slower at batch 1 on two of three shapes, see ``benchmarks/results/spqr_speed.md``), else
  Triton on CUDA, the reference elsewhere.

Bytes and operations per weight of a matrix-vector product at 3 bits, 16x16 groups: 4 bits of codes + 0.5 bit of
statistics codes + 0.25 bit of second-level statistics + outliers (4 bytes read each, ~1-2%: ~0.3-0.6 bit) against 16 bits
for bf16; 2 integer and 3 fp32 operations.

Example:
    >>> y = spqr_matmul(x, layer.packed_tensors(), **layer.packed_meta())  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch

from hf_effllm.errors import HfEffllmError
from hf_effllm.quant.spqr.format import dequantize_weight, index_dtype

from .cuda_rt import capability
from .spqr_cuda import MAX_ROWS as CUDA_MAX_ROWS
from .spqr_cuda import cuda_layout as build_cuda_layout
from .spqr_cuda import spqr_dequantize_cuda, spqr_gemv_cuda
from .spqr_cuda import supports as cuda_supports
from .spqr_flat import spqr_octet_flat
from .spqr_octet import (
    STREAM_ROWS,
    octet_supported,
    rows_per_launch,
    spqr_octet_dequant,
    spqr_octet_gemv,
    spqr_octet_split,
    spqr_octet_stream,
)
from .spqr_octet import octet_layout as build_octet_layout

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a Linux dependency
    HAS_TRITON = False

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GEMV_MAX_ROWS = 16
GEMV_VARIANTS = ("v1", "v2")
# v1: one kernel for 1..16 rows (dequantize every weight to fp32; FMAs for one row, tl.dot for more), measured in
# benchmarks/results/spqr_speed.md. v2: one row -> _spqr_mv1_kernel (zero folded into a per-group correction,
# codes decoded in place: ~4 PTX ops per weight instead of ~11); MMA_MIN_ROWS.. rows -> _spqr_mma_kernel (tensor
# cores, P dots of the lanes' weight tiles, no weight-tile reshape). On the H200 v2 is faster at every measured
# shape and batch (1.05-1.31x over v1 at batch 1 and 1.13-1.34x at batch 16, default launch settings).
DEFAULT_VARIANT = "v2"
MMA_MIN_ROWS = 2


def _check(x: torch.Tensor, t: dict[str, torch.Tensor], in_features: int) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise HfEffllmError(f"x.dtype={x.dtype} is not supported; use float16, bfloat16 or float32.")
    if x.shape[-1] != in_features:
        raise HfEffllmError(f"x has {x.shape[-1]} features in its last dimension; this layer expects {in_features}.")
    for key, v in t.items():
        if v is not None and v.device != x.device:
            raise HfEffllmError(f"packed tensor {key!r} is on {v.device} but x is on {x.device}; move them together.")


def spqr_matmul_reference(
    x: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    *,
    in_features: int,
    bits: int,
    group_size: int,
    stats_bits: int,
    stats_group_size: int,
    bias: torch.Tensor | None = None,
    **_: Any,
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` with W dequantized in PyTorch (the reference of every kernel here).

    Args:
        x: (..., in_features) activations (fp16, bf16 or fp32).
        tensors: the packed tensors of one layer (see ``hf_effllm.quant.spqr.format``).
        in_features, bits, group_size, stats_bits, stats_group_size: the layer's format parameters.
        bias: optional (out_features,) bias.

    Returns:
        (..., out_features) in ``x.dtype``.
    """
    _check(x, tensors, in_features)
    w = dequantize_weight(
        tensors,
        in_features=in_features,
        bits=bits,
        group_size=group_size,
        stats_bits=stats_bits,
        stats_group_size=stats_group_size,
    )
    perm = tensors.get("perm")
    xp = x if perm is None else x.index_select(-1, perm.long())
    y = torch.matmul(xp, w.to(x.dtype).T)
    return y if bias is None else y + bias.to(y.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Kernel layout: the packed format re-laid out once per device for the kernels (word-aligned, no bitstream)
# ----------------------------------------------------------------------------------------------------------------
BLOCK_K = 128  # input columns per kernel tile; the layout pads the input dimension to a multiple of it


def lane_bits(bits: int) -> int:
    """Width of one code in the kernel layout: 2 (2-bit codes), 4 (3-4 bits) or 8 (5-8 bits) bits per lane.

    Word-aligned power-of-two lanes make the unpacking one shift and one mask per weight (a 3-bit stream would need
    two words and a funnel shift); the price is 1 bit per weight of HBM traffic at 3 bits (4 instead of 3).
    """
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def _unpack_stream(words: torch.Tensor, rows: int, n: int, bits: int, *, chunk_rows: int = 1024) -> torch.Tensor:
    """int32 codes (rows, n) from a row-major little-endian bitstream (integer ops, chunked over rows)."""
    out = torch.empty(rows, n, dtype=torch.int32, device=words.device)
    w64 = words.to(torch.int64) & 0xFFFFFFFF
    cols = torch.arange(n, device=words.device, dtype=torch.int64)
    mask = (1 << bits) - 1
    for r0 in range(0, rows, chunk_rows):
        r = torch.arange(r0, min(rows, r0 + chunk_rows), device=words.device, dtype=torch.int64)
        pos = (r[:, None] * n + cols[None, :]) * bits
        wi, off = pos >> 5, pos & 31
        v = (w64[wi] >> off) | (w64[wi + 1] << (32 - off))
        out[r0 : r0 + r.numel()] = (v & mask).to(torch.int32)
    return out


def _pack_lanes(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack int codes (rows, n), n a multiple of 32 // width, into int32 words: code j of a word at bits j*width."""
    per = 32 // width
    rows, n = codes.shape
    c = codes.to(torch.int64).reshape(rows, n // per, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * width
    words = (c << shifts).sum(-1)
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32)


def unpack_codes(
    tensors: dict[str, torch.Tensor], out: int, k: int, g: int, bits: int, stats_bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int32 weight codes (out, k) and first-level scale and zero codes (out, g) from the packed bitstreams."""
    codes = _unpack_stream(tensors["qweight"], out, k, bits)
    sc = _unpack_stream(tensors["qscale"], out, g, stats_bits)
    zc = _unpack_stream(tensors["qzero"], out, g, stats_bits)
    return codes, sc, zc


def outlier_index(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The outliers' rows, stored-order columns and original-order columns (int64) from the packed CSR."""
    ptr = tensors["outlier_row_ptr"]
    rows = torch.repeat_interleave(torch.arange(ptr.shape[0] - 1, device=ptr.device), (ptr[1:] - ptr[:-1]).long())
    cols = tensors["outlier_cols"].long()
    perm = tensors.get("perm")
    return rows, cols, (perm.long()[cols] if perm is not None else cols)


def kernel_layout(
    tensors: dict[str, torch.Tensor],
    *,
    in_features: int,
    bits: int,
    group_size: int,
    stats_bits: int,
    stats_group_size: int,
    **_: Any,
) -> dict[str, Any]:
    """Re-lay a layer's packed tensors out for the Triton kernels (built once per device by ``SpQRLinear``).

    The stored format is a dense bitstream (exact bit accounting, any width); the kernels want word-aligned codes:

    * ``codes``  int32 (Kp / per, out): ``per = 32 // lane_bits(bits)`` codes per word; word ``(w, r)`` holds
      columns ``w * per ..`` of row ``r``, column ``c`` at bits ``(c % per) * lane``; the input dimension padded to
      ``Kp``, a multiple of 128. Output rows are the contiguous dimension, so a warp's loads are coalesced and each
      thread's code word meets one activation vector shared by all its rows;
    * ``stats``  uint8 (Gp, out) (int32 when ``stats_bits > 4``): scale code | zero code << 4 (or << 8);
    * ``stats2`` int64 (Gp, ceil(out / stats_group_size)): the four fp16 second-level statistics (scale step, scale
      minimum, zero step, zero minimum) of a (group, row block) in one 8-byte word;
    * ``perm``   int64 (in,) original column of each stored column (absent without a permutation): the wrappers
      gather the activations into stored order once per call (``perm_inv``: its inverse, for weights in the
      original order);
    * outliers: ``ov`` float16 values, ``oc`` (stored order) and ``oc_orig`` (original order) columns and ``orow``
      rows (int16 when they fit, else int32), ``optr`` int32 CSR row offsets.

    HBM bytes a matrix-vector product reads: ``lane_bits`` + 8 / group_size + 64 / (group_size * stats_group_size)
    bits per weight, plus 4 bytes per outlier (value, original column): 4.75 bits per weight at 3 bits, 16x16
    groups, plus 0.32 bit per 1% of outliers.
    """
    dev = tensors["qweight"].device
    out = tensors["outlier_row_ptr"].shape[0] - 1
    g = -(-in_features // group_size)
    kp = -(-in_features // BLOCK_K) * BLOCK_K
    gp = -(-kp // group_size)
    lane = lane_bits(bits)
    codes = torch.zeros(out, kp, dtype=torch.int32, device=dev)
    codes[:, :in_features], sc, zc = unpack_codes(tensors, out, in_features, g, bits, stats_bits)
    shift = 4 if stats_bits <= 4 else 8
    stats = torch.zeros(out, gp, dtype=torch.int32, device=dev)
    stats[:, :g] = sc | (zc << shift)
    s2 = torch.zeros(tensors["stats2"].shape[0], gp, 4, dtype=torch.float16, device=dev)
    s2[:, :g] = tensors["stats2"]
    perm = tensors.get("perm")
    layout: dict[str, Any] = {
        "codes": _pack_lanes(codes, lane).T.contiguous(),
        "stats": (stats.to(torch.uint8) if shift == 4 else stats).T.contiguous(),
        "stats2": s2.view(torch.int64)[..., 0].T.contiguous(),
        "lane": lane,
        "stats_shift": shift,
        "kp": kp,
        "gp": gp,
    }
    if perm is not None:
        layout["perm"] = perm.long()
        layout["perm_inv"] = torch.argsort(layout["perm"])  # stored column of each original column
    orow, cols, cols_orig = outlier_index(tensors)
    layout["ov"] = tensors["outlier_values"]
    layout["oc"] = cols.to(index_dtype(in_features))  # stored order (prefill path)
    layout["oc_orig"] = cols_orig.to(index_dtype(in_features))
    layout["orow"] = orow.to(index_dtype(out))  # used by the prefill path
    layout["optr"] = tensors["outlier_row_ptr"].to(torch.int32)
    layout["nnz"] = int(layout["ov"].numel())
    return layout


def layout_bytes(layout: dict[str, Any]) -> int:
    """Device bytes of a kernel layout (what it adds to the packed buffers while cached)."""
    return sum(v.numel() * v.element_size() for v in layout.values() if isinstance(v, torch.Tensor))


if HAS_TRITON:

    @triton.jit
    def _tile_t(
        codes_ptr,
        stats_ptr,
        s2_ptr,
        n,
        nmask,
        k0,
        N,
        N2,
        unit,
        LANE: tl.constexpr,
        SHIFT: tl.constexpr,
        GS: tl.constexpr,
        SGS: tl.constexpr,
        BKW: tl.constexpr,
        EXACT: tl.constexpr,
    ):
        """Dequantized fp32 weights W^T (BKW, P, BN): columns ``k0 .. k0 + BKW * P`` (stored order) of rows ``n``.

        Rows are the contiguous (coalesced) axis; a word's P codes expand along a new middle axis, so the statistics
        (one load per word and row) and the activations (P values per word, shared by every row) broadcast without
        layout conversions."""
        P: tl.constexpr = 32 // LANE
        kw = tl.arange(0, BKW)[:, None, None]
        # ``unit`` is a run-time 1: it hides the contiguity of the rows from the compiler, so the code and statistics
        # loads take the compute layout directly (one coalesced 4-byte load per lane) instead of 16-byte vector loads
        # followed by a shared-memory layout conversion (two barriers per load) on every step
        n3 = (n * unit)[None, None, :]
        m3 = nmask[None, None, :]
        # 3-D pointers with a unit middle axis: the loads get the layout of the (BKW, P, BN) result directly
        words = tl.load(codes_ptr + (k0 // P + kw) * N + n3, mask=m3, other=0)  # (BKW, 1, BN)
        sh = tl.arange(0, P)[None, :, None] * LANE
        # code -> float without the (quarter-rate) int-to-float conversion: 2^23 + code has the code in its mantissa
        raw = ((words >> sh) & ((1 << LANE) - 1)) | 0x4B000000
        q = raw.to(tl.float32, bitcast=True) - 8388608.0
        g = (k0 + kw * P) // GS  # the group of each word (a word never straddles two groups)
        st = tl.load(stats_ptr + g * N + n3, mask=m3, other=0).to(tl.int32)
        sc = (st & ((1 << SHIFT) - 1)).to(tl.float32)
        zc = (st >> SHIFT).to(tl.float32)
        s2 = tl.load(s2_ptr + g * N2 + n[None, None, :] // SGS, mask=m3, other=0)
        s_step = (s2 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        s_min = ((s2 >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        z_step = ((s2 >> 32) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        z_min = ((s2 >> 48) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        scale = s_step * sc + s_min
        zero = z_step * zc + z_min
        if EXACT:  # the reference's rounding: s * (q - z)
            w = scale * (q - zero)
        else:  # one FMA per weight
            w = q * scale + (-scale * zero)
        return w

    @triton.jit
    def _spqr_prologue_kernel(
        x_ptr,
        xs_ptr,
        y0_ptr,
        bias_ptr,
        perm_ptr,
        ov_ptr,
        oc_ptr,
        optr_ptr,
        M,
        N,
        K,
        Kp,
        stride_xm,
        stride_xsm,
        stride_ym,
        xsum_ptr,
        HAS_PERM: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BM: tl.constexpr,
        OC: tl.constexpr,
        XB: tl.constexpr,
        RB: tl.constexpr,
        PRESCALE: tl.constexpr = False,
        LANE: tl.constexpr = 4,
        GS: tl.constexpr = 16,
    ):
        """Programs < NRB: y0[:, rows] = bias + the rows' outliers (fp32), RB rows each. Others: xs = x in stored
        order, zero-padded. PRESCALE (one row, for ``_spqr_mv1_kernel``): xs in fp32 times 2^-pos of each column's
        lane, and xsum = the sum of x over each group of GS stored columns."""
        NRB = tl.cdiv(N, RB)
        pid = tl.program_id(0)
        ms = tl.arange(0, BM)
        mmask = ms < M
        if pid < NRB:
            for rr in tl.static_range(RB):
                row = pid * RB + rr
                if row < N:
                    acc = tl.zeros([BM], dtype=tl.float32)
                    first = tl.load(optr_ptr + row)
                    last = tl.load(optr_ptr + row + 1)
                    for t0 in range(first, last, OC):
                        idx = t0 + tl.arange(0, OC)
                        om = idx < last
                        col = tl.load(oc_ptr + idx, mask=om, other=0)  # original column order
                        val = tl.load(ov_ptr + idx, mask=om, other=0.0).to(tl.float32)
                        xo = tl.load(
                            x_ptr + ms[None, :] * stride_xm + col[:, None], mask=om[:, None] & mmask[None, :], other=0
                        )
                        acc += tl.sum(val[:, None] * xo.to(tl.float32), axis=0)
                    if HAS_BIAS:
                        acc += tl.load(bias_ptr + row).to(tl.float32)
                    tl.store(y0_ptr + ms * stride_ym + row, acc, mask=mmask)
        else:
            ks = (pid - NRB) * XB + tl.arange(0, XB)
            kmask = ks < K
            if HAS_PERM:
                src = tl.load(perm_ptr + ks, mask=kmask, other=0)
            else:
                src = ks
            if PRESCALE:
                P: tl.constexpr = 32 // LANE
                SH_HI: tl.constexpr = ((9 + LANE - 1) // LANE) * LANE
                xv = tl.load(x_ptr + src, mask=kmask, other=0).to(tl.float32)
                j = ks % P
                pos = LANE * j - tl.where(LANE * (j + 1) > 23, SH_HI, 0)
                inv = ((127 - pos) << 23).to(tl.float32, bitcast=True)  # 2^-pos exactly
                tl.store(xs_ptr + ks, xv * inv, mask=ks < Kp)
                gsum = tl.sum(tl.reshape(xv, [XB // GS, GS]), axis=1)
                gi = (pid - NRB) * (XB // GS) + tl.arange(0, XB // GS)
                tl.store(xsum_ptr + gi, gsum, mask=gi < Kp // GS)
            else:
                xv = tl.load(
                    x_ptr + ms[:, None] * stride_xm + src[None, :], mask=mmask[:, None] & kmask[None, :], other=0
                )
                tl.store(xs_ptr + ms[:, None] * stride_xsm + ks[None, :], xv, mask=mmask[:, None] & (ks < Kp)[None, :])

    @triton.jit(do_not_specialize=["unit"])
    def _spqr_mv_kernel(
        xs_ptr,
        y0_ptr,
        y_ptr,
        codes_ptr,
        stats_ptr,
        s2_ptr,
        M,
        N,
        N2,
        k_per_split,
        Kp,
        stride_xm,
        stride_ym,
        unit,
        LANE: tl.constexpr,
        SHIFT: tl.constexpr,
        GS: tl.constexpr,
        SGS: tl.constexpr,
        ATOMIC: tl.constexpr,
        DOT: tl.constexpr,
        FP32_DOT: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BKW: tl.constexpr,
    ):
        """y[:, rows] = y0[:, rows] + xs . W^T[k-split, rows] (ATOMIC: y0 += the split's part, in fp32)."""
        P: tl.constexpr = 32 // LANE
        BK: tl.constexpr = BKW * P
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        n = pid_n * BN + tl.arange(0, BN)
        nmask = n < N
        ms = tl.arange(0, BM)
        mmask = ms < M
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, Kp)
        kcol = tl.arange(0, BKW)[:, None] * P + tl.arange(0, P)[None, :]  # (BKW, P) column inside the step
        if DOT:
            acc = tl.zeros([BM, BN], dtype=tl.float32)
        else:
            acc3 = tl.zeros([BKW, P, BN], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            w = _tile_t(codes_ptr, stats_ptr, s2_ptr, n, nmask, k0, N, N2, unit, LANE, SHIFT, GS, SGS, BKW, False)
            if DOT:
                ks = k0 + tl.arange(0, BK)
                xt = tl.load(xs_ptr + ms[:, None] * stride_xm + ks[None, :], mask=mmask[:, None], other=0.0)
                w2 = tl.reshape(w, [BK, BN])
                if FP32_DOT:
                    acc += tl.dot(xt.to(tl.float32), w2, input_precision="ieee")
                else:
                    acc += tl.dot(xt, w2.to(xt.dtype))
            else:
                xv = tl.load(xs_ptr + k0 + kcol[:, :, None]).to(tl.float32)  # (BKW, P, 1); zero-padded: no mask
                acc3 += w * xv
        if not DOT:
            acc = tl.sum(tl.sum(acc3, axis=1), axis=0)[None, :]  # (1, BN)
        yoff = ms[:, None] * stride_ym + n[None, :]
        ymask = mmask[:, None] & nmask[None, :]
        if ATOMIC:
            tl.atomic_add(y0_ptr + yoff, acc, mask=ymask)
        else:
            acc += tl.load(y0_ptr + yoff, mask=ymask, other=0.0)
            tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=ymask)

    @triton.jit
    def _stats_t(stats_ptr, s2_ptr, g, n, m, N, N2, SHIFT: tl.constexpr, SGS: tl.constexpr):
        """fp32 (scale, zero) of groups ``g`` and rows ``n`` (broadcast shapes): codes decoded with the 2^23 mantissa
        trick (no int-to-float conversion), second-level statistics from their packed fp16 word."""
        st = tl.load(stats_ptr + g * N + n, mask=m, other=0).to(tl.int32)
        sc = ((st & ((1 << SHIFT) - 1)) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        zc = ((st >> SHIFT) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        s2 = tl.load(s2_ptr + g * N2 + n // SGS, mask=m, other=0)
        s_step = (s2 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        s_min = ((s2 >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        z_step = ((s2 >> 32) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        z_min = ((s2 >> 48) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return s_step * sc + s_min, z_step * zc + z_min

    @triton.jit(do_not_specialize=["unit"])
    def _spqr_mv1_kernel(
        xs_ptr,
        xsum_ptr,
        y0_ptr,
        y_ptr,
        codes_ptr,
        stats_ptr,
        s2_ptr,
        N,
        N2,
        k_per_split,
        Kp,
        unit,
        LANE: tl.constexpr,
        SHIFT: tl.constexpr,
        GS: tl.constexpr,
        SGS: tl.constexpr,
        ATOMIC: tl.constexpr,
        BN: tl.constexpr,
        BG: tl.constexpr,
    ):
        """One activation row (variant v2): y[rows] = y0[rows] + sum_g scale * (sum_j q_j x_j - zero * sum_j x_j).

        The zero-point is folded into one correction per (group, row) with the group's activation sum ``xsum``
        (computed once by the prologue), so a weight costs: one AND|OR (a LOP3 after ptxas) that puts its code into
        the mantissa of 2^23 *in place* (lanes above mantissa bit 22 come from one shifted copy of the word), one
        subtraction and one FMA. ``xs`` holds the activations pre-multiplied by 2^-p (p = the lane's bit position
        in that float), which undoes the in-place position exactly. Scale and zero are decoded once per group."""
        P: tl.constexpr = 32 // LANE
        WPG: tl.constexpr = GS // P  # words per group
        SH_HI: tl.constexpr = ((9 + LANE - 1) // LANE) * LANE  # shift of the copy that serves the high lanes
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        n = pid_n * BN + tl.arange(0, BN)
        nmask = n < N
        n4 = n[None, None, None, :]
        m4 = nmask[None, None, None, :]
        gi = tl.arange(0, BG)[:, None, None, None]
        wi = tl.arange(0, WPG)[None, :, None, None]
        j = tl.arange(0, P)[None, None, :, None]
        hi = LANE * (j + 1) > 23  # lanes that do not fit in the mantissa in place
        pos = LANE * j - tl.where(hi, SH_HI, 0)
        lane_mask = ((1 << LANE) - 1) << pos
        xoff = (gi * WPG + wi) * P + j  # (BG, WPG, P, 1) column inside the step
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, Kp)
        acc = tl.zeros([BG, 1, 1, BN], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BG * GS):
            words = tl.load(codes_ptr + (k0 // P + gi * WPG + wi) * N + n4, mask=m4, other=0)  # (BG, WPG, 1, BN)
            src = tl.where(hi, words >> SH_HI, words)
            q = ((src & lane_mask) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # code * 2^pos, exact
            xv = tl.load(xs_ptr + k0 + tl.reshape(xoff, [BG, WPG, P]))[:, :, :, None]  # pre-scaled; padded: no mask
            part = tl.sum(tl.sum(q * xv, axis=2, keep_dims=True), axis=1, keep_dims=True)  # (BG, 1, 1, BN)
            g = k0 // GS + gi
            scale, zero = _stats_t(stats_ptr, s2_ptr, g, n4, m4, N, N2, SHIFT, SGS)
            acc += scale * (part - zero * tl.load(xsum_ptr + g))
        out = tl.reshape(tl.sum(acc, axis=0), [BN])
        if ATOMIC:
            tl.atomic_add(y0_ptr + n, out, mask=nmask)
        else:
            out += tl.load(y0_ptr + n, mask=nmask, other=0.0)
            tl.store(y_ptr + n, out.to(y_ptr.dtype.element_ty), mask=nmask)

    @triton.jit(do_not_specialize=["unit"])
    def _spqr_mma_kernel(
        xs_ptr,
        y0_ptr,
        y_ptr,
        codes_ptr,
        stats_ptr,
        s2_ptr,
        M,
        N,
        N2,
        k_per_split,
        Kp,
        stride_xm,
        stride_ym,
        unit,
        LANE: tl.constexpr,
        SHIFT: tl.constexpr,
        GS: tl.constexpr,
        SGS: tl.constexpr,
        ATOMIC: tl.constexpr,
        FP32: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BKW: tl.constexpr,
    ):
        """2..16 activation rows on tensor cores (variant v2): per step, code word ``kw`` of row ``n`` holds columns
        ``kw * P + j``; lane ``j`` of every word is dequantized to a (BN, BKW) tile in the activation dtype and
        multiplied with the matching strided (BKW, BM) activation columns, ``P`` dots of depth BKW per step: no
        reshape or interleave of the weight tile, and the weight is the wide (M = BN) operand of the MMA."""
        P: tl.constexpr = 32 // LANE
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        n = pid_n * BN + tl.arange(0, BN)
        nmask = n < N
        ms = tl.arange(0, BM)
        mmask = ms < M
        kw = tl.arange(0, BKW)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, Kp)
        acc = tl.zeros([BN, BM], dtype=tl.float32)
        n2 = (n * unit)[:, None]
        m2 = nmask[:, None]
        for k0 in range(k_lo, k_hi, BKW * P):
            kv = (k0 // P + kw) < Kp // P  # only 2-bit lanes (P = 16) make a step longer than the 128-column padding
            words = tl.load(codes_ptr + (k0 // P + kw[None, :]) * N + n2, mask=m2 & kv[None, :], other=0)  # (BN, BKW)
            g = (k0 + kw[None, :] * P) // GS
            scale, zero = _stats_t(stats_ptr, s2_ptr, g, n2, m2, N, N2, SHIFT, SGS)
            nsz = -scale * zero
            for j in tl.static_range(P):
                q = (((words >> (LANE * j)) & ((1 << LANE) - 1)) | 0x4B000000).to(tl.float32, bitcast=True)
                w = (q - 8388608.0) * scale + nsz
                xt = tl.load(
                    xs_ptr + ms[None, :] * stride_xm + (k0 + kw[:, None] * P + j),
                    mask=mmask[None, :] & kv[:, None],
                    other=0.0,
                )  # (BKW, BM)
                if FP32:
                    acc += tl.dot(w, xt.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(w.to(xt.dtype), xt)
        yoff = ms[None, :] * stride_ym + n[:, None]
        ymask = mmask[None, :] & nmask[:, None]
        if ATOMIC:
            tl.atomic_add(y0_ptr + yoff, acc, mask=ymask)
        else:
            acc += tl.load(y0_ptr + yoff, mask=ymask, other=0.0)
            tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=ymask)

    @triton.jit(do_not_specialize=["unit"])
    def _spqr_dequant_kernel(
        wt_ptr,
        codes_ptr,
        stats_ptr,
        s2_ptr,
        N,
        N2,
        K,
        k_per_prog,
        unit,
        LANE: tl.constexpr,
        SHIFT: tl.constexpr,
        GS: tl.constexpr,
        SGS: tl.constexpr,
        BN: tl.constexpr,
        BKW: tl.constexpr,
    ):
        """W^T (K, N) in stored column order, written densely (rows contiguous)."""
        P: tl.constexpr = 32 // LANE
        BK: tl.constexpr = BKW * P
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        nmask = n < N
        ks0 = tl.arange(0, BK)
        k_lo = tl.program_id(1) * k_per_prog
        for k0 in range(k_lo, tl.minimum(k_lo + k_per_prog, K), BK):
            w = _tile_t(codes_ptr, stats_ptr, s2_ptr, n, nmask, k0, N, N2, unit, LANE, SHIFT, GS, SGS, BKW, True)
            ks = (k0 + ks0).to(tl.int64)
            tl.store(
                wt_ptr + ks[:, None] * N + n[None, :],
                tl.reshape(w, [BK, BN]).to(wt_ptr.dtype.element_ty),
                mask=(ks < K)[:, None] & nmask[None, :],
            )


def _require_triton() -> None:
    if not HAS_TRITON:
        raise HfEffllmError("triton is not installed; use spqr_matmul_reference (or install triton on Linux).")


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fused_supported(bits: int, group_size: int) -> bool:
    """Whether the fused kernels take this format: ``group_size`` a power of two, a multiple of the codes per word
    (``32 // lane_bits(bits)``), and at most 128. Other formats use the reference dequantization + matmul."""
    return _pow2(group_size) and group_size <= BLOCK_K and group_size % (32 // lane_bits(bits)) == 0


def _kernel_inputs(
    tensors: dict[str, torch.Tensor],
    layout: dict[str, Any] | None,
    in_features: int,
    bits: int,
    group_size: int,
    stats_bits: int,
    stats_group_size: int,
) -> dict[str, Any]:
    """Checks shared by the Triton entry points; returns the kernel layout (built when ``None``)."""
    _require_triton()
    if not fused_supported(bits, group_size):
        raise _format_error(bits, group_size)
    meta = dict(
        in_features=in_features,
        bits=bits,
        group_size=group_size,
        stats_bits=stats_bits,
        stats_group_size=stats_group_size,
    )
    return _layout_for(tensors, layout, meta)


def _layout_for(tensors, layout, meta) -> dict[str, Any]:
    if layout is None:
        layout = kernel_layout(tensors, **meta)
    if layout["codes"].device != tensors["qweight"].device:
        raise HfEffllmError(
            f"the kernel layout is on {layout['codes'].device} but the packed tensors are on "
            f"{tensors['qweight'].device}; rebuild it with kernel_layout()."
        )
    return layout


def _format_error(bits: int, group_size: int) -> HfEffllmError:
    return HfEffllmError(
        f"group_size={group_size} with bits={bits}: the Triton kernels need a power of two <= {BLOCK_K} and a "
        f"multiple of {32 // lane_bits(bits)}; use spqr_matmul, which falls back to the PyTorch reference."
    )


def spqr_dequantize_triton(
    tensors: dict[str, torch.Tensor],
    *,
    in_features: int,
    bits: int,
    group_size: int,
    stats_bits: int,
    stats_group_size: int,
    dtype: torch.dtype = torch.float16,
    layout: dict[str, Any] | None = None,
    original_order: bool = False,
    transposed: bool = False,
    **_: Any,
) -> torch.Tensor:
    """The dense weight (out, in), outliers added, in ``dtype``.

    Same values as ``hf_effllm.quant.spqr.format.dequantize_weight`` (cast to ``dtype``): stored (permuted) column
    order, or the original order with ``original_order=True`` (one more copy). ``transposed=True`` returns the
    (in, out) transpose as written by the kernel (contiguous), which ``x @ W^T`` takes without a copy.
    """
    lay = _kernel_inputs(tensors, layout, in_features, bits, group_size, stats_bits, stats_group_size)
    n_out = tensors["outlier_row_ptr"].shape[0] - 1
    wt = torch.empty(in_features, n_out, device=lay["codes"].device, dtype=dtype)
    bn, k_per_prog = 64, 1024
    grid = (triton.cdiv(n_out, bn), triton.cdiv(in_features, k_per_prog))
    _spqr_dequant_kernel[grid](
        wt, lay["codes"], lay["stats"], lay["stats2"], n_out, lay["stats2"].shape[1], in_features, k_per_prog, 1,
        LANE=lay["lane"], SHIFT=lay["stats_shift"], GS=group_size, SGS=stats_group_size, BN=bn, BKW=4,
        num_warps=4,
    )  # fmt: skip
    if lay["nnz"]:
        wt.index_put_((lay["oc"].long(), lay["orow"].long()), lay["ov"].to(dtype), accumulate=True)
    if original_order and "perm" in lay:
        wt = wt.index_select(0, lay["perm_inv"])
    return wt if transposed else wt.T


def default_launch(rows: int, n_out: int, in_features: int, device: torch.device) -> tuple[int, int, int]:
    """(output rows per program, split-K, warps) of the fused kernel, from the H200 sweep in
    ``benchmarks/results/spqr_speed.md``: enough programs for ~4 per SM (split-K adds with fp32 atomics)."""
    if device.type != "cuda":
        return 32, 1, 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    block_out = 64 if n_out <= 4096 else 128
    n_prog = triton.cdiv(n_out, block_out)
    split_k = 1
    while n_prog * split_k < 4 * sms and in_features // (split_k * 2) >= 256:
        split_k *= 2
    return block_out, split_k, 4


def spqr_gemv_triton(
    x: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    *,
    in_features: int,
    bits: int,
    group_size: int,
    stats_bits: int,
    stats_group_size: int,
    bias: torch.Tensor | None = None,
    layout: dict[str, Any] | None = None,
    split_k: int | None = None,
    block_out: int | None = None,
    num_warps: int | None = None,
    block_k_words: int = 8,
    variant: str | None = None,
    **_: Any,
) -> torch.Tensor:
    """Fused dequantize + matrix product for at most 16 rows of activations (the decode path).

    Two launches: a prologue (activations gathered into stored order and zero-padded; bias + outliers per row, in
    fp32) and the fused dequantize + product; a third (the cast) with split-K.

    Args:
        x: (..., in_features) with at most 16 rows in total.
        tensors: the layer's packed tensors (see ``hf_effllm.quant.spqr.format``).
        layout: their :func:`kernel_layout` (built here when ``None``; ``SpQRLinear`` caches it).
        split_k: programs along the input dimension (``None``: :func:`default_launch`); > 1 adds with fp32 atomics.
        block_out: output rows per program (a power of two >= 16).
        num_warps: warps per program.
        block_k_words: code words per row and step (each holds ``32 // lane_bits(bits)`` columns); the v2
            tensor-core kernel uses at least 16.
        variant: ``"v1"`` or ``"v2"`` (see ``GEMV_VARIANTS``; ``None``: ``DEFAULT_VARIANT``).

    Returns:
        (..., out_features) in ``x.dtype``.
    """
    _check(x, tensors, in_features)
    lay = _kernel_inputs(tensors, layout, in_features, bits, group_size, stats_bits, stats_group_size)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > GEMV_MAX_ROWS:
        raise HfEffllmError(f"x has {m} rows; spqr_gemv_triton takes at most {GEMV_MAX_ROWS} (use spqr_matmul).")
    if block_out is not None and (block_out < 16 or not _pow2(block_out)):
        raise HfEffllmError(f"block_out={block_out} is not supported; use a power of two >= 16.")
    if split_k is not None and split_k < 1:
        raise HfEffllmError(f"split_k={split_k} must be >= 1.")
    if block_k_words not in (1, 2, 4, 8, 16):
        raise HfEffllmError(f"block_k_words={block_k_words} is not supported; use 1, 2, 4, 8 or 16.")
    variant = DEFAULT_VARIANT if variant is None else variant
    if variant not in GEMV_VARIANTS:
        raise HfEffllmError(f"variant={variant!r} is not supported; use one of {GEMV_VARIANTS}.")
    n_out = tensors["outlier_row_ptr"].shape[0] - 1
    mode = "v1" if variant == "v1" else "mv1" if m == 1 else "mma" if m >= MMA_MIN_ROWS else "v1"
    bo0, sk0, nw0 = default_launch(m, n_out, in_features, x.device)
    if mode == "mv1" and x.is_cuda:
        bo0 = 128  # 4 rows x 32 threads: each thread then holds whole groups (words, lanes) in registers
    block_out, split_k, num_warps = block_out or bo0, split_k or sk0, num_warps or nw0
    per = 32 // lay["lane"]
    if mode == "mv1":  # whole groups per step, at most BLOCK_K columns (the padding of the layout)
        block_k_words = max(group_size // per, min(block_k_words, BLOCK_K // per))
    elif mode == "mma":
        block_k_words = max(16, block_k_words)
    bk = block_k_words * per
    kp = lay["kp"]
    k_per_split = triton.cdiv(triton.cdiv(in_features, split_k), bk) * bk
    split_k = triton.cdiv(in_features, k_per_split)
    dot = m > 1
    bm = 16 if dot else 1
    prescale = mode == "mv1"
    xs = torch.empty(m, kp, device=x.device, dtype=torch.float32 if prescale else x.dtype)
    xsum = torch.empty(kp // group_size if prescale else 1, device=x.device, dtype=torch.float32)
    y0 = torch.empty(m, n_out, device=x.device, dtype=torch.float32)
    xb = 256
    has_perm = "perm" in lay
    rb = 4
    _spqr_prologue_kernel[(triton.cdiv(n_out, rb) + triton.cdiv(kp, xb),)](
        x2, xs, y0, bias if bias is not None else y0, lay["perm"] if has_perm else y0, lay["ov"], lay["oc_orig"],
        lay["optr"], m, n_out, in_features, kp, x2.stride(0), xs.stride(0), y0.stride(0), xsum,
        HAS_PERM=has_perm, HAS_BIAS=bias is not None, BM=bm, OC=64, XB=xb, RB=rb, PRESCALE=prescale,
        LANE=lay["lane"], GS=group_size, num_warps=2,
    )  # fmt: skip
    atomic = split_k > 1
    y = y0 if atomic else torch.empty(m, n_out, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n_out, block_out), split_k)
    common = dict(LANE=lay["lane"], SHIFT=lay["stats_shift"], GS=group_size, SGS=stats_group_size, ATOMIC=atomic)
    n2 = lay["stats2"].shape[1]
    if mode == "mv1":
        _spqr_mv1_kernel[grid](
            xs, xsum, y0, y, lay["codes"], lay["stats"], lay["stats2"], n_out, n2, k_per_split, kp, 1,
            BN=block_out, BG=bk // group_size, num_warps=num_warps, **common,
        )  # fmt: skip
    elif mode == "mma":
        _spqr_mma_kernel[grid](
            xs, y0, y, lay["codes"], lay["stats"], lay["stats2"],
            m, n_out, n2, k_per_split, kp, xs.stride(0), y0.stride(0), 1,
            FP32=x.dtype == torch.float32, BM=bm, BN=block_out, BKW=block_k_words, num_warps=num_warps, **common,
        )  # fmt: skip
    else:
        _spqr_mv_kernel[grid](
            xs, y0, y, lay["codes"], lay["stats"], lay["stats2"],
            m, n_out, n2, k_per_split, kp, xs.stride(0), y0.stride(0), 1,
            DOT=dot, FP32_DOT=x.dtype == torch.float32, BM=bm, BN=block_out, BKW=block_k_words,
            num_warps=num_warps, **common,
        )  # fmt: skip
    if atomic:
        y = y0.to(x.dtype)
    return y.reshape(*lead, n_out)


def _bulk_copies(device: torch.device) -> bool:
    """Whether ``device`` has the bulk-copy (TMA) unit ``spqr_octet_stream`` needs: compute capability 9.0+."""
    return device.type == "cuda" and capability(device) >= (9, 0)


# the paths of cuda_path that run on the octet layout (kernels.spqr_octet), the others on kernels.spqr_cuda's
OCTET_PATHS = ("octet", "stream", "split", "flat")
FLAT_MIN_ROWS = 8  # activation rows from which spqr_octet_flat serves a decode product on sm_90+


def cuda_path(rows: int, meta: dict[str, Any], device: torch.device, out_features: int | None = None) -> str:
    """Which CUDA kernels serve ``rows`` activation rows of a layer of format ``meta`` on ``device``: ``"octet"``
    (``kernels.spqr_octet``: decode products in one launch, and the dense weight for prefill) wherever the format
    allows and the rows' activations fit one block's shared memory, else ``"cuda"`` (``kernels.spqr_cuda``). On the
    H200 the octet kernel is the faster of the two at 1, 4 and 16 rows except where 16 rows need several launches
    (11008 inputs: ``benchmarks/results/spqr_speed_octet.md``).

    ``"stream"`` (``spqr_octet_stream``, same layout) for 1-2 rows of layers with at least 4096 inputs and one side
    at least twice the other (the MLP's projections, e.g. 4096 -> 11008 and 11008 -> 4096) on sm_90+: there it
    measured 1.06x / 1.01x bf16 at one row against 0.86x / 0.96x for ``spqr_octet_gemv``, and slower on square
    layers (4096 -> 4096: 0.85x against 0.95x; ``benchmarks/results/spqr_speed_stream.md``).

    ``"split"`` (``spqr_octet_split``, same layout) on sm_90+ for 3-7 rows of layers with at least 8192 inputs or
    outputs (and 8-16 rows of every layer until session 17): on the H200 (``benchmarks/results/spqr_speed_split_s13.md``, interleaved correction
    tile) at 16 rows 0.47x / 0.48x / 0.45x bf16 against 0.40x / 0.14x / 0.35x for ``spqr_octet_gemv`` (4096 ->
    11008, 11008 -> 4096, 4096 -> 4096), at 8 rows 0.55x / 0.59x / 0.53x against 0.48x / 0.29x / 0.46x, at 4 rows
    0.65x / 0.71x against 0.56x / 0.59x on the MLP shapes; slower than it at 4 rows of 4096 -> 4096 (0.57x against
    0.63x).

    ``"flat"`` (``kernels.spqr_flat.spqr_octet_flat``, same layout) on sm_90+ from ``FLAT_MIN_ROWS`` (8) rows, in
    place of ``"split"`` there: on the H200 (``benchmarks/results/spqr_speed_flat.md``, same run) 1.08-1.11x faster
    than it at 8 rows, 1.19-1.22x at 12, 1.31-1.36x at 16 (0.64-0.72x bf16), and not at 4 rows (0.95-1.06x); since
    session 18 another 1.08-1.10x on the MLP shapes (``benchmarks/results/spqr_flat_s18.md``: 0.76x / 0.78x / 0.65x
    bf16 at 16 rows of 4096 -> 11008, 11008 -> 4096, 4096 -> 4096)."""
    if octet_supported(**meta) is not None:
        return "cuda"
    k = meta["in_features"]
    if (
        rows <= STREAM_ROWS
        and out_features is not None
        and k >= 4096
        and max(k, out_features) >= 2 * min(k, out_features)
        and _bulk_copies(device)
    ):
        return "stream"
    if rows >= FLAT_MIN_ROWS and _bulk_copies(device):
        return "flat"
    if rows > STREAM_ROWS and max(k, out_features or 0) >= 8192 and _bulk_copies(device):
        return "split"
    if rows > CUDA_MAX_ROWS:
        return "octet"
    return "octet" if rows <= rows_per_launch(meta["in_features"], device) else "cuda"


def spqr_matmul(
    x: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    *,
    in_features: int,
    bits: int,
    group_size: int,
    stats_bits: int,
    stats_group_size: int,
    bias: torch.Tensor | None = None,
    layout: dict[str, Any] | None = None,
    use_triton: bool | None = None,
    variant: str | None = None,
    cuda_layout: dict[str, Any] | None = None,
    octet_layout: dict[str, Any] | None = None,
    **_: Any,
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for a packed SpQR weight; picks the fused decode kernel (<= 16 rows), the dequantize +
    matmul prefill path, or the PyTorch reference.

    On a GPU with fp16/bf16 activations and a format the CUDA kernels take (``kernels.spqr_cuda.supports``) both
    paths run the CUDA kernels (``variant=None`` or ``"cuda"``); otherwise the Triton kernels.

    Args:
        x: (..., in_features) activations, fp16/bf16/fp32, any batch and sequence length.
        tensors: the layer's packed tensors.
        layout: their :func:`kernel_layout` (built when ``None`` and needed).
        use_triton: ``None`` uses the GPU kernels on CUDA tensors and the reference elsewhere; ``True`` forces
            Triton for formats or dtypes the CUDA kernels do not take (the interpreter on CPU when
            ``TRITON_INTERPRET=1``); ``False`` forces the reference.
        variant: decode-kernel variant for <= 16 rows: ``"cuda"``, or a Triton one (see :func:`spqr_gemv_triton`).
        cuda_layout: the tensors' ``kernels.spqr_cuda.cuda_layout`` (built when ``None`` and needed).
        octet_layout: the tensors' ``kernels.spqr_octet.octet_layout`` (built when ``None`` and needed).

    Returns:
        (..., out_features) in ``x.dtype``.
    """
    meta = dict(
        in_features=in_features,
        bits=bits,
        group_size=group_size,
        stats_bits=stats_bits,
        stats_group_size=stats_group_size,
    )
    _check(x, tensors, in_features)
    rows = x.numel() // in_features if in_features else 0
    # under torch.compile the Triton kernels (which dynamo traces) serve: a ctypes launch would break the graph
    compiling = torch.compiler.is_compiling()
    if (
        variant in (None, "cuda")
        and use_triton is not False
        and x.numel()
        and not compiling
        and cuda_supports(x, meta) is None
    ):
        path = cuda_path(rows, meta, x.device, out_features=tensors["outlier_row_ptr"].shape[0] - 1)
        if path in OCTET_PATHS:
            lay = octet_layout if octet_layout is not None else build_octet_layout(tensors, **meta)
            gemv = {"stream": spqr_octet_stream, "split": spqr_octet_split, "flat": spqr_octet_flat}.get(
                path, spqr_octet_gemv
            )
            dequant = spqr_octet_dequant
        else:
            lay = cuda_layout if cuda_layout is not None else build_cuda_layout(tensors, **meta)
            gemv, dequant = spqr_gemv_cuda, spqr_dequantize_cuda
        if rows <= CUDA_MAX_ROWS:
            return gemv(x, lay, bias=bias)
        w = dequant(lay, x.dtype)
        xs = x.index_select(-1, lay["perm_long"]) if "perm_long" in lay else x
        y = torch.matmul(xs, w.T)
        return y if bias is None else y + bias.to(y.dtype)
    if variant == "cuda":
        why = "torch.compile is tracing this call" if compiling else cuda_supports(x, meta)
        raise HfEffllmError(f"variant='cuda' cannot run here: {why}.")
    if use_triton is None:
        use_triton = x.is_cuda and HAS_TRITON
    if not use_triton or not fused_supported(bits, group_size) or x.numel() == 0:
        return spqr_matmul_reference(x, tensors, bias=bias, **meta)
    if rows <= GEMV_MAX_ROWS:
        return spqr_gemv_triton(x, tensors, bias=bias, layout=layout, variant=variant, **meta)
    lay = _layout_for(tensors, layout, meta)
    wt = spqr_dequantize_triton(tensors, dtype=x.dtype, layout=lay, transposed=True, **meta)
    xs = x.index_select(-1, lay["perm"]) if "perm" in lay else x
    y = torch.matmul(xs, wt)
    return y if bias is None else y + bias.to(y.dtype)
