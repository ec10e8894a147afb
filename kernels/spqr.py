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
* :func:`spqr_matmul`: validates the inputs and picks the path (Triton on CUDA, the reference elsewhere).

Bytes and operations per weight of a matrix-vector product at 3 bits, 16x16 groups: 4 bits of codes + 0.5 bit of
statistics codes + 0.25 bit of second-level statistics + outliers (6 bytes each, ~1-2%: ~0.5-1 bit) against 16 bits
for bf16; 2 integer and 3 fp32 operations.

Example:
    >>> y = spqr_matmul(x, layer.packed_tensors(), **layer.packed_meta())  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch

from hf_effllm.errors import HfEffllmError
from hf_effllm.quant.spqr.format import dequantize_weight, index_dtype

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a Linux dependency
    HAS_TRITON = False

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GEMV_MAX_ROWS = 16


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

    * ``codes``  int32 (out, Kp / per): ``per = 32 // lane_bits(bits)`` codes per word, column ``c`` of a row at
      word ``c // per``, bits ``(c % per) * lane``; the input dimension padded to ``Kp``, a multiple of 128;
    * ``stats``  uint8 (out, Gp) (int32 when ``stats_bits > 4``): scale code | zero code << 4 (or << 8);
    * ``stats2`` float16 (4, ceil(out / stats_group_size), Gp): scale step, scale minimum, zero step, zero minimum;
    * ``perm``   int32 (Kp,) original column of each stored column (absent without a permutation);
    * outliers: ``ov`` float16 values, ``oc`` ORIGINAL column indices (the permutation folded in), ``orow`` rows
      (both int16 when they fit, else int32), ``optr`` int32 CSR row offsets.

    HBM bytes a matrix-vector product reads: ``lane_bits`` + 8 / group_size + 64 / (group_size * stats_group_size)
    bits per weight, plus 6 bytes per outlier: 4.75 bits per weight at 3 bits, 16x16 groups, plus 0.5 bit per 1% of
    outliers.
    """
    dev = tensors["qweight"].device
    out = tensors["outlier_row_ptr"].shape[0] - 1
    g = -(-in_features // group_size)
    kp = -(-in_features // BLOCK_K) * BLOCK_K
    gp = kp // group_size if kp % group_size == 0 else -(-kp // group_size)
    lane = lane_bits(bits)
    codes = torch.zeros(out, kp, dtype=torch.int32, device=dev)
    codes[:, :in_features] = _unpack_stream(tensors["qweight"], out, in_features, bits)
    sc = _unpack_stream(tensors["qscale"], out, g, stats_bits)
    zc = _unpack_stream(tensors["qzero"], out, g, stats_bits)
    shift = 4 if stats_bits <= 4 else 8
    stats = torch.zeros(out, gp, dtype=torch.int32, device=dev)
    stats[:, :g] = sc | (zc << shift)
    s2 = torch.zeros(4, tensors["stats2"].shape[0], gp, dtype=torch.float16, device=dev)
    s2[:, :, :g] = tensors["stats2"].permute(2, 0, 1)
    perm = tensors.get("perm")
    layout: dict[str, Any] = {
        "codes": _pack_lanes(codes, lane),
        "stats": stats.to(torch.uint8) if shift == 4 else stats,
        "stats2": s2,
        "lane": lane,
        "stats_shift": shift,
        "kp": kp,
        "gp": gp,
    }
    if perm is not None:
        p = torch.zeros(kp, dtype=torch.int32, device=dev)
        p[:in_features] = perm.to(torch.int32)
        layout["perm"] = p
    ptr = tensors["outlier_row_ptr"]
    cols = tensors["outlier_cols"].long()
    layout["ov"] = tensors["outlier_values"]
    layout["oc"] = (perm.long()[cols] if perm is not None else cols).to(index_dtype(in_features))
    layout["orow"] = torch.repeat_interleave(
        torch.arange(out, device=dev, dtype=torch.int32), (ptr[1:] - ptr[:-1]).long()
    ).to(index_dtype(out))
    layout["optr"] = ptr.to(torch.int32)
    layout["nnz"] = int(layout["ov"].numel())
    return layout


def layout_bytes(layout: dict[str, Any]) -> int:
    """Device bytes of a kernel layout (what it adds to the packed buffers while cached)."""
    return sum(v.numel() * v.element_size() for v in layout.values() if isinstance(v, torch.Tensor))


if HAS_TRITON:

    @triton.jit
    def _dequant_tile(
        codes_ptr,
        stats_ptr,
        s2_ptr,
        r64,
        rmask,
        k0,
        kw,
        Gp,
        n2,
        LANE: tl.constexpr,
        SHIFT: tl.constexpr,
        GS: tl.constexpr,
        SGS: tl.constexpr,
        NG: tl.constexpr,
        EXACT: tl.constexpr,
    ):
        """Dequantized weights of rows ``r64`` and columns ``k0 .. k0 + NG * GS`` as fp32 (BO, NG, GS // P, P).

        Every index is built in the 4-D shape of the result, so the statistics broadcast along the last two axes
        without layout conversions (no shared-memory round trips)."""
        P: tl.constexpr = 32 // LANE
        WPG: tl.constexpr = GS // P
        r4 = r64[:, None, None, None]
        m4 = rmask[:, None, None, None]
        g4 = tl.arange(0, NG)[None, :, None, None]
        w4 = tl.arange(0, WPG)[None, None, :, None]
        j4 = tl.arange(0, P)[None, None, None, :]
        words = tl.load(codes_ptr + r4 * kw + (k0 // P + g4 * WPG + w4), mask=m4, other=0)  # (BO, NG, WPG, 1)
        # code -> float without the (quarter-rate) int-to-float conversion: 2^23 + code has the code in its mantissa
        raw = ((words >> (j4 * LANE)) & ((1 << LANE) - 1)) | 0x4B000000
        q = raw.to(tl.float32, bitcast=True) - 8388608.0
        g = k0 // GS + g4
        st = tl.load(stats_ptr + r4 * Gp + g, mask=m4, other=0).to(tl.int32)  # (BO, NG, 1, 1)
        sc = (st & ((1 << SHIFT) - 1)).to(tl.float32)
        zc = (st >> SHIFT).to(tl.float32)
        s2 = s2_ptr + (r4 // SGS) * Gp + g
        s_step = tl.load(s2, mask=m4, other=0.0).to(tl.float32)
        s_min = tl.load(s2 + n2 * Gp, mask=m4, other=0.0).to(tl.float32)
        z_step = tl.load(s2 + 2 * n2 * Gp, mask=m4, other=0.0).to(tl.float32)
        z_min = tl.load(s2 + 3 * n2 * Gp, mask=m4, other=0.0).to(tl.float32)
        scale = s_step * sc + s_min
        zero = z_step * zc + z_min
        if EXACT:  # the reference's rounding: s * (q - z)
            w = scale * (q - zero)
        else:  # one FMA per weight
            w = q * scale + (-scale * zero)
        return w

    @triton.jit
    def _spqr_mv_kernel(
        x_ptr,
        y_ptr,
        bias_ptr,
        codes_ptr,
        stats_ptr,
        s2_ptr,
        perm_ptr,
        ov_ptr,
        oc_ptr,
        orow_ptr,
        optr_ptr,
        M,
        N,
        K,
        Gp,
        n2,
        kw,
        stride_xm,
        stride_ym,
        k_per_split,
        LANE: tl.constexpr,
        SHIFT: tl.constexpr,
        GS: tl.constexpr,
        SGS: tl.constexpr,
        HAS_PERM: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ATOMIC: tl.constexpr,
        DOT: tl.constexpr,
        FP32_DOT: tl.constexpr,
        BM: tl.constexpr,
        BO: tl.constexpr,
        BK: tl.constexpr,
        OC: tl.constexpr,
    ):
        P: tl.constexpr = 32 // LANE
        NG: tl.constexpr = BK // GS
        WPG: tl.constexpr = GS // P
        pid_o = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_o * BO + tl.arange(0, BO)
        rmask = rows < N
        r64 = rows.to(tl.int64)
        ms = tl.arange(0, BM)
        mmask = ms < M
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        # column of each tile element, in the (1, NG, WPG, P) order of _dequant_tile
        col4 = (
            tl.arange(0, NG)[None, :, None, None] * GS
            + tl.arange(0, WPG)[None, None, :, None] * P
            + tl.arange(0, P)[None, None, None, :]
        )
        if DOT:
            acc = tl.zeros([BO, BM], dtype=tl.float32)
        else:
            acc4 = tl.zeros([BO, NG, WPG, P], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            w = _dequant_tile(codes_ptr, stats_ptr, s2_ptr, r64, rmask, k0, kw, Gp, n2, LANE, SHIFT, GS, SGS, NG, False)
            if DOT:
                ks = k0 + tl.arange(0, BK)
                kmask = ks < k_hi
                if HAS_PERM:
                    src = tl.load(perm_ptr + ks, mask=kmask, other=0)
                else:
                    src = ks
                xt = tl.load(
                    x_ptr + ms[None, :] * stride_xm + src[:, None], mask=kmask[:, None] & mmask[None, :], other=0.0
                )
                w2 = tl.reshape(w, [BO, BK])
                if FP32_DOT:
                    acc += tl.dot(w2, xt.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(w2.to(xt.dtype), xt)
            else:
                ks4 = k0 + col4
                kmask4 = ks4 < k_hi
                if HAS_PERM:
                    src4 = tl.load(perm_ptr + ks4, mask=kmask4, other=0)
                else:
                    src4 = ks4
                xv = tl.load(x_ptr + src4, mask=kmask4, other=0.0).to(tl.float32)
                acc4 += w * xv
        if not DOT:
            acc = tl.sum(tl.sum(tl.sum(acc4, axis=3), axis=2), axis=1)[:, None]  # (BO, 1)
        if pid_k == 0:
            # outliers of this block of rows (contiguous in CSR order), and the bias
            first = tl.load(optr_ptr + pid_o * BO)
            last = tl.load(optr_ptr + tl.minimum(pid_o * BO + BO, N))
            for t0 in range(first, last, OC):
                idx = t0 + tl.arange(0, OC)
                om = idx < last
                orow = tl.load(orow_ptr + idx, mask=om, other=-1)
                ocol = tl.load(oc_ptr + idx, mask=om, other=0)
                oval = tl.load(ov_ptr + idx, mask=om, other=0.0).to(tl.float32)
                hit = orow[None, :] == rows[:, None]  # (BO, OC)
                if DOT:
                    xo = tl.load(
                        x_ptr + ms[None, :] * stride_xm + ocol[:, None], mask=om[:, None] & mmask[None, :], other=0.0
                    )
                    acc += tl.dot(tl.where(hit, 1.0, 0.0), oval[:, None] * xo.to(tl.float32), input_precision="ieee")
                else:
                    xo = tl.load(x_ptr + ocol, mask=om, other=0.0).to(tl.float32)
                    acc += tl.sum(tl.where(hit, (oval * xo)[None, :], 0.0), axis=1)[:, None]
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
        yp = y_ptr + ms[None, :] * stride_ym + rows[:, None]
        ymask = rmask[:, None] & mmask[None, :]
        if ATOMIC:
            tl.atomic_add(yp, acc, mask=ymask)
        else:
            tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=ymask)

    @triton.jit
    def _spqr_dequant_kernel(
        w_ptr,
        codes_ptr,
        stats_ptr,
        s2_ptr,
        perm_ptr,
        N,
        K,
        Gp,
        n2,
        kw,
        stride_w,
        LANE: tl.constexpr,
        SHIFT: tl.constexpr,
        GS: tl.constexpr,
        SGS: tl.constexpr,
        HAS_PERM: tl.constexpr,
        BO: tl.constexpr,
        BK: tl.constexpr,
    ):
        P: tl.constexpr = 32 // LANE
        NG: tl.constexpr = BK // GS
        WPG: tl.constexpr = GS // P
        rows = tl.program_id(0) * BO + tl.arange(0, BO)
        rmask = rows < N
        r64 = rows.to(tl.int64)
        k0 = tl.program_id(1) * BK
        w = _dequant_tile(codes_ptr, stats_ptr, s2_ptr, r64, rmask, k0, kw, Gp, n2, LANE, SHIFT, GS, SGS, NG, True)
        ks4 = (
            k0
            + tl.arange(0, NG)[None, :, None, None] * GS
            + tl.arange(0, WPG)[None, None, :, None] * P
            + tl.arange(0, P)[None, None, None, :]
        )
        kmask4 = ks4 < K
        if HAS_PERM:  # write in the original column order, so the activations need no gather
            dst4 = tl.load(perm_ptr + ks4, mask=kmask4, other=0)
        else:
            dst4 = ks4
        m = rmask[:, None, None, None] & kmask4
        tl.store(w_ptr + r64[:, None, None, None] * stride_w + dst4, w.to(w_ptr.dtype.element_ty), mask=m)


def _require_triton() -> None:
    if not HAS_TRITON:
        raise HfEffllmError("triton is not installed; use spqr_matmul_reference (or install triton on Linux).")


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fused_supported(bits: int, group_size: int) -> bool:
    """Whether the fused kernels take this format: ``group_size`` a power of two, a multiple of the codes per word
    (``32 // lane_bits(bits)``), and at most 128. Other formats use the reference dequantization + matmul."""
    return _pow2(group_size) and group_size <= BLOCK_K and group_size % (32 // lane_bits(bits)) == 0


def _layout_for(tensors, layout, meta) -> dict[str, Any]:
    if layout is None:
        layout = kernel_layout(tensors, **meta)
    if layout["codes"].device != tensors["qweight"].device:
        raise HfEffllmError(
            f"the kernel layout is on {layout['codes'].device} but the packed tensors are on "
            f"{tensors['qweight'].device}; rebuild it with kernel_layout()."
        )
    return layout


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
    **_: Any,
) -> torch.Tensor:
    """The dense weight (out, in), outliers added, in ``dtype``.

    Same values as ``hf_effllm.quant.spqr.format.dequantize_weight`` (cast to ``dtype``): stored (permuted) column
    order by default, the original order with ``original_order=True`` (then ``x @ W^T`` needs no gather of ``x``).
    """
    _require_triton()
    meta = dict(
        in_features=in_features,
        bits=bits,
        group_size=group_size,
        stats_bits=stats_bits,
        stats_group_size=stats_group_size,
    )
    if not fused_supported(bits, group_size):
        raise HfEffllmError(
            f"group_size={group_size} with bits={bits}: the kernels need a power of two <= {BLOCK_K} and a multiple "
            f"of {32 // lane_bits(bits)}; use spqr_matmul_reference."
        )
    lay = _layout_for(tensors, layout, meta)
    n_out = tensors["outlier_row_ptr"].shape[0] - 1
    w = torch.empty(n_out, in_features, device=lay["codes"].device, dtype=dtype)
    has_perm = "perm" in lay and original_order
    bo = 16
    grid = (triton.cdiv(n_out, bo), triton.cdiv(in_features, BLOCK_K))
    _spqr_dequant_kernel[grid](
        w, lay["codes"], lay["stats"], lay["stats2"], lay["perm"] if has_perm else lay["codes"],
        n_out, in_features, lay["gp"], lay["stats2"].shape[1], lay["codes"].shape[1], w.stride(0),
        LANE=lay["lane"], SHIFT=lay["stats_shift"], GS=group_size, SGS=stats_group_size, HAS_PERM=has_perm,
        BO=bo, BK=BLOCK_K,
    )  # fmt: skip
    if lay["nnz"]:
        cols = lay["oc"] if original_order else tensors["outlier_cols"].int()
        w.index_put_((lay["orow"].long(), cols.long()), lay["ov"].to(dtype), accumulate=True)
    return w


def default_launch(rows: int, n_out: int, in_features: int, device: torch.device) -> tuple[int, int]:
    """(rows of the output per program, split-K) for the fused kernel: enough programs to fill the GPU."""
    if device.type != "cuda":
        return 16, 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    block_out = 32 if n_out >= 8 * sms * 32 // 4 else 16
    n_prog = triton.cdiv(n_out, block_out)
    split_k = 1
    while n_prog * split_k < 2 * sms and in_features // (split_k * 2) >= 4 * BLOCK_K:
        split_k *= 2
    return block_out, split_k


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
    num_warps: int = 4,
    **_: Any,
) -> torch.Tensor:
    """Fused dequantize + matrix product for at most 16 rows of activations (the decode path), one launch.

    Args:
        x: (..., in_features) with at most 16 rows in total.
        tensors: the layer's packed tensors (see ``hf_effllm.quant.spqr.format``).
        layout: their :func:`kernel_layout` (built here when ``None``; ``SpQRLinear`` caches it).
        split_k: programs along the input dimension (``None``: :func:`default_launch`); > 1 adds with fp32 atomics.
        block_out: output rows per program (16, 32 or 64).

    Returns:
        (..., out_features) in ``x.dtype``.
    """
    _require_triton()
    _check(x, tensors, in_features)
    meta = dict(
        in_features=in_features,
        bits=bits,
        group_size=group_size,
        stats_bits=stats_bits,
        stats_group_size=stats_group_size,
    )
    if not fused_supported(bits, group_size):
        raise HfEffllmError(
            f"group_size={group_size} with bits={bits}: the fused kernel needs a power of two <= {BLOCK_K} and a "
            f"multiple of {32 // lane_bits(bits)}; use spqr_matmul (dequantize + matmul)."
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > GEMV_MAX_ROWS:
        raise HfEffllmError(f"x has {m} rows; spqr_gemv_triton takes at most {GEMV_MAX_ROWS} (use spqr_matmul).")
    if block_out is not None and block_out not in (16, 32, 64):
        raise HfEffllmError(f"block_out={block_out} is not supported; use 16, 32 or 64.")
    if split_k is not None and split_k < 1:
        raise HfEffllmError(f"split_k={split_k} must be >= 1.")
    lay = _layout_for(tensors, layout, meta)
    n_out = tensors["outlier_row_ptr"].shape[0] - 1
    bo0, sk0 = default_launch(m, n_out, in_features, x.device)
    block_out = block_out or bo0
    split_k = split_k or sk0
    k_per_split = triton.cdiv(triton.cdiv(in_features, split_k), BLOCK_K) * BLOCK_K
    split_k = triton.cdiv(in_features, k_per_split)
    atomic = split_k > 1
    y = (
        torch.zeros(m, n_out, device=x.device, dtype=torch.float32)
        if atomic
        else torch.empty(m, n_out, device=x.device, dtype=x.dtype)
    )
    has_perm = "perm" in lay
    dot = m > 1
    _spqr_mv_kernel[(triton.cdiv(n_out, block_out), split_k)](
        x2, y, bias if bias is not None else y, lay["codes"], lay["stats"], lay["stats2"],
        lay["perm"] if has_perm else lay["codes"], lay["ov"], lay["oc"], lay["orow"], lay["optr"],
        m, n_out, in_features, lay["gp"], lay["stats2"].shape[1], lay["codes"].shape[1], x2.stride(0), y.stride(0),
        k_per_split,
        LANE=lay["lane"], SHIFT=lay["stats_shift"], GS=group_size, SGS=stats_group_size, HAS_PERM=has_perm,
        HAS_BIAS=bias is not None, ATOMIC=atomic, DOT=dot, FP32_DOT=x.dtype == torch.float32, BM=16 if dot else 1,
        BO=block_out, BK=BLOCK_K, OC=32, num_warps=num_warps,
    )  # fmt: skip
    if atomic:
        y = y.to(x.dtype)
    return y.reshape(*lead, n_out)


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
    **_: Any,
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for a packed SpQR weight; picks the fused decode kernel (<= 16 rows), the dequantize +
    matmul prefill path, or the PyTorch reference.

    Args:
        x: (..., in_features) activations, fp16/bf16/fp32, any batch and sequence length.
        tensors: the layer's packed tensors.
        layout: their :func:`kernel_layout` (built when ``None``).
        use_triton: ``None`` uses Triton on CUDA tensors and the reference elsewhere; ``True`` forces Triton (the
            interpreter on CPU when ``TRITON_INTERPRET=1``); ``False`` forces the reference.

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
    if use_triton is None:
        use_triton = x.is_cuda and HAS_TRITON
    if not use_triton or not fused_supported(bits, group_size):
        return spqr_matmul_reference(x, tensors, bias=bias, **meta)
    rows = x.numel() // in_features if in_features else 0
    if 0 < rows <= GEMV_MAX_ROWS:
        return spqr_gemv_triton(x, tensors, bias=bias, layout=layout, **meta)
    w = spqr_dequantize_triton(tensors, dtype=x.dtype, layout=layout, original_order=True, **meta)
    y = torch.matmul(x, w.T)
    return y if bias is None else y + bias.to(y.dtype)
