"""SpQR matrix products: Triton kernels, their host wrappers, and the plain PyTorch reference.

* :func:`spqr_matmul_reference`: dequantize the packed weight (``hf_effllm.quant.spqr.format``), gather the input
  columns by the permutation, matmul. The CPU path of ``SpQRLinear`` and the baseline of tests and benchmarks.
* :func:`spqr_gemv_triton`: decode path (1..16 rows of activations): one fused kernel reads the packed codes, the
  packed statistics and the CSR outliers once, dequantizes in registers and accumulates with ``tl.dot``; the
  permutation is applied by gathering activations in the kernel. Optional split-K with fp32 atomics.
* :func:`spqr_dequantize_triton`: prefill path: dequantize to the activation dtype in one kernel, then
  ``torch.matmul``.
* :func:`spqr_matmul`: validates the inputs and picks the path (Triton on CUDA, the reference elsewhere).

Example:
    >>> y = spqr_matmul(x, layer.packed_tensors(), **layer.packed_meta())  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch

from hf_effllm.errors import HfEffllmError
from hf_effllm.quant.spqr.format import dequantize_weight

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


if HAS_TRITON:

    @triton.jit
    def _bitfield(words_ptr, pos, mask, BITS: tl.constexpr):
        """Codes at (int64) bit positions ``pos`` of an int32 bitstream (little-endian; may straddle two words)."""
        widx = pos >> 5
        off = (pos & 31).to(tl.uint32)
        lo = tl.load(words_ptr + widx, mask=mask, other=0).to(tl.uint32, bitcast=True)
        hi = tl.load(words_ptr + widx + 1, mask=mask, other=0).to(tl.uint32, bitcast=True)
        v = (lo >> off) | ((hi << 1) << (31 - off))
        return (v & ((1 << BITS) - 1)).to(tl.float32)

    @triton.jit
    def _spqr_gemv_kernel(
        x_ptr,
        y_ptr,
        qw_ptr,
        qs_ptr,
        qz_ptr,
        s2_ptr,
        perm_ptr,
        ov_ptr,
        oc_ptr,
        optr_ptr,
        M,
        N,
        K,
        G,
        stride_xm,
        stride_ym,
        max_nnz,
        k_per_split,
        BITS: tl.constexpr,
        SBITS: tl.constexpr,
        GS: tl.constexpr,
        SGS: tl.constexpr,
        HAS_PERM: tl.constexpr,
        ATOMIC: tl.constexpr,
        FP32_DOT: tl.constexpr,
        ALIGNED: tl.constexpr,
        BM: tl.constexpr,
        BO: tl.constexpr,
        NG: tl.constexpr,
    ):
        BK: tl.constexpr = NG * GS
        MASK: tl.constexpr = (1 << BITS) - 1
        pid_o = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_o * BO + tl.arange(0, BO)
        rmask = rows < N
        ms = tl.arange(0, BM)
        mmask = ms < M
        r64 = rows.to(tl.int64)
        acc = tl.zeros([BO, BM], dtype=tl.float32)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        gi = tl.arange(0, NG)
        ji = tl.arange(0, GS)
        # rows start on a word boundary when K % 32 == 0: word offsets and shifts inside a block are loop-invariant
        jj3 = (gi[:, None] * GS + ji[None, :])[None, :, :]  # [1, NG, GS] column inside the block
        w_off3 = (jj3 * BITS) >> 5
        sh3 = ((jj3 * BITS) & 31).to(tl.uint32)
        row_word3 = r64[:, None, None] * ((K * BITS) // 32)
        for k0 in range(k_lo, k_hi, BK):
            g = k0 // GS + gi  # [NG]
            ks3 = (g[:, None] * GS + ji[None, :])[None, :, :]  # [1, NG, GS]
            m3 = rmask[:, None, None] & (ks3 < k_hi)
            if ALIGNED:
                wp = qw_ptr + row_word3 + (k0 * BITS) // 32 + w_off3
                lo = tl.load(wp, mask=m3, other=0).to(tl.uint32, bitcast=True)
                hi = tl.load(wp + 1, mask=m3, other=0).to(tl.uint32, bitcast=True)
                codes = (((lo >> sh3) | ((hi << 1) << (31 - sh3))) & MASK).to(tl.float32)
            else:
                codes = _bitfield(qw_ptr, (r64[:, None, None] * K + ks3) * BITS, m3, BITS)
            m2 = rmask[:, None] & (g[None, :] < G) & (g[None, :] * GS < k_hi)
            spos = (r64[:, None] * G + g[None, :]) * SBITS
            sc = _bitfield(qs_ptr, spos, m2, SBITS)
            zc = _bitfield(qz_ptr, spos, m2, SBITS)
            s2 = ((rows // SGS).to(tl.int64)[:, None] * G + g[None, :]) * 4
            scale = tl.load(s2_ptr + s2, mask=m2, other=0).to(tl.float32) * sc + tl.load(
                s2_ptr + s2 + 1, mask=m2, other=0
            ).to(tl.float32)
            zero = tl.load(s2_ptr + s2 + 2, mask=m2, other=0).to(tl.float32) * zc + tl.load(
                s2_ptr + s2 + 3, mask=m2, other=0
            ).to(tl.float32)
            w3 = codes * scale[:, :, None] - (scale * zero)[:, :, None]
            w3 = tl.where(m3, w3, 0.0)
            w = tl.reshape(w3, [BO, BK])
            ks = k0 + tl.arange(0, BK)
            kmask = ks < k_hi
            if HAS_PERM:
                src = tl.load(perm_ptr + ks, mask=kmask, other=0).to(tl.int64)
            else:
                src = ks.to(tl.int64)
            xt = tl.load(x_ptr + ms[None, :] * stride_xm + src[:, None], mask=kmask[:, None] & mmask[None, :], other=0)
            if FP32_DOT:
                acc += tl.dot(w, xt.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(w.to(xt.dtype), xt)
        if pid_k == 0:
            start = tl.load(optr_ptr + rows, mask=rmask, other=0)
            end = tl.load(optr_ptr + rows + 1, mask=rmask, other=0)
            for t in range(0, max_nnz):
                idx = start + t
                om = rmask & (idx < end)
                col = tl.load(oc_ptr + idx, mask=om, other=0).to(tl.int64)
                if HAS_PERM:
                    col = tl.load(perm_ptr + col, mask=om, other=0).to(tl.int64)
                val = tl.load(ov_ptr + idx, mask=om, other=0).to(tl.float32)
                xv = tl.load(x_ptr + ms[None, :] * stride_xm + col[:, None], mask=om[:, None] & mmask[None, :], other=0)
                acc += val[:, None] * xv.to(tl.float32)
        yp = y_ptr + ms[None, :] * stride_ym + rows[:, None]
        ymask = rmask[:, None] & mmask[None, :]
        if ATOMIC:
            tl.atomic_add(yp, acc, mask=ymask)
        else:
            tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=ymask)

    @triton.jit
    def _spqr_dequant_kernel(
        w_ptr,
        qw_ptr,
        qs_ptr,
        qz_ptr,
        s2_ptr,
        N,
        K,
        G,
        stride_w,
        BITS: tl.constexpr,
        SBITS: tl.constexpr,
        GS: tl.constexpr,
        SGS: tl.constexpr,
        BO: tl.constexpr,
        BK: tl.constexpr,
    ):
        rows = tl.program_id(0) * BO + tl.arange(0, BO)
        ks = tl.program_id(1) * BK + tl.arange(0, BK)
        m = (rows < N)[:, None] & (ks < K)[None, :]
        r64 = rows.to(tl.int64)[:, None]
        g = (ks // GS)[None, :]
        codes = _bitfield(qw_ptr, (r64 * K + ks[None, :]) * BITS, m, BITS)
        sc = _bitfield(qs_ptr, (r64 * G + g) * SBITS, m, SBITS)
        zc = _bitfield(qz_ptr, (r64 * G + g) * SBITS, m, SBITS)
        s2 = ((rows // SGS).to(tl.int64)[:, None] * G + g) * 4
        scale = tl.load(s2_ptr + s2, mask=m, other=0).to(tl.float32) * sc + tl.load(s2_ptr + s2 + 1, mask=m, other=0)
        zero = tl.load(s2_ptr + s2 + 2, mask=m, other=0).to(tl.float32) * zc + tl.load(s2_ptr + s2 + 3, mask=m, other=0)
        w = scale * (codes - zero)
        tl.store(w_ptr + r64 * stride_w + ks[None, :], w.to(w_ptr.dtype.element_ty), mask=m)


def _require_triton() -> None:
    if not HAS_TRITON:
        raise HfEffllmError("triton is not installed; use spqr_matmul_reference (or install triton on Linux).")


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def spqr_dequantize_triton(
    tensors: dict[str, torch.Tensor],
    *,
    in_features: int,
    bits: int,
    group_size: int,
    stats_bits: int,
    stats_group_size: int,
    dtype: torch.dtype = torch.float16,
    **_: Any,
) -> torch.Tensor:
    """The dense weight (out, in) in stored (permuted) column order, outliers added, in ``dtype``.

    Same values as ``hf_effllm.quant.spqr.format.dequantize_weight`` (cast to ``dtype``).
    """
    _require_triton()
    qw = tensors["qweight"]
    n_out = tensors["outlier_row_ptr"].shape[0] - 1
    g = -(-in_features // group_size)
    w = torch.empty(n_out, in_features, device=qw.device, dtype=torch.float32)
    bo, bk = 32, 64
    grid = (triton.cdiv(n_out, bo), triton.cdiv(in_features, bk))
    _spqr_dequant_kernel[grid](
        w,
        qw,
        tensors["qscale"],
        tensors["qzero"],
        tensors["stats2"],
        n_out,
        in_features,
        g,
        w.stride(0),
        BITS=bits,
        SBITS=stats_bits,
        GS=group_size,
        SGS=stats_group_size,
        BO=bo,
        BK=bk,
    )
    ov = tensors["outlier_values"]
    if ov.numel():
        ptr = tensors["outlier_row_ptr"].long()
        rows = torch.repeat_interleave(torch.arange(n_out, device=w.device), ptr[1:] - ptr[:-1])
        w.index_put_((rows, tensors["outlier_cols"].long()), ov.float(), accumulate=True)
    return w.to(dtype)


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
    max_row_nnz: int | None = None,
    split_k: int | None = None,
    block_out: int = 32,
    **_: Any,
) -> torch.Tensor:
    """Fused dequantize + matrix product for at most 16 rows of activations (the decode path).

    Args:
        x: (..., in_features) with at most 16 rows in total.
        tensors: packed layer tensors; ``group_size`` must be a power of two (else use the prefill path).
        max_row_nnz: the largest outlier count of a row (computed when ``None``).
        split_k: programs along the input dimension (``None``: chosen from the shape).
        block_out: output rows per program.

    Returns:
        (..., out_features) in ``x.dtype``.
    """
    _require_triton()
    _check(x, tensors, in_features)
    if not _pow2(group_size) or group_size > 128:
        raise HfEffllmError(
            f"group_size={group_size}: the fused kernel needs a power of two <= 128; use the prefill path."
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).contiguous()
    m = x2.shape[0]
    if m > GEMV_MAX_ROWS:
        raise HfEffllmError(f"x has {m} rows; spqr_gemv_triton takes at most {GEMV_MAX_ROWS} (use spqr_matmul).")
    qw = tensors["qweight"]
    n_out = tensors["outlier_row_ptr"].shape[0] - 1
    g = -(-in_features // group_size)
    ptr = tensors["outlier_row_ptr"]
    if max_row_nnz is None:
        max_row_nnz = int((ptr[1:] - ptr[:-1]).max().item()) if n_out else 0
    ng = max(1, 128 // group_size)
    bk = ng * group_size
    n_prog = triton.cdiv(n_out, block_out)
    if split_k is None:
        target = 264 if x.is_cuda else 1
        split_k = max(1, min(triton.cdiv(in_features, 4 * bk), triton.cdiv(target, n_prog)))
    k_per_split = triton.cdiv(triton.cdiv(in_features, split_k), bk) * bk
    split_k = triton.cdiv(in_features, k_per_split)
    atomic = split_k > 1
    y = (
        torch.zeros(m, n_out, device=x.device, dtype=torch.float32)
        if atomic
        else torch.empty(m, n_out, device=x.device, dtype=x.dtype)
    )
    perm = tensors.get("perm")
    has_perm = perm is not None
    _spqr_gemv_kernel[(n_prog, split_k)](
        x2,
        y,
        qw,
        tensors["qscale"],
        tensors["qzero"],
        tensors["stats2"],
        perm if has_perm else qw,
        tensors["outlier_values"],
        tensors["outlier_cols"],
        ptr,
        m,
        n_out,
        in_features,
        g,
        x2.stride(0),
        y.stride(0),
        max_row_nnz,
        k_per_split,
        BITS=bits,
        SBITS=stats_bits,
        GS=group_size,
        SGS=stats_group_size,
        HAS_PERM=has_perm,
        ATOMIC=atomic,
        FP32_DOT=x.dtype == torch.float32,
        ALIGNED=in_features % 32 == 0,
        BM=16,
        BO=block_out,
        NG=ng,
    )
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
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
    max_row_nnz: int | None = None,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for a packed SpQR weight; picks the fused decode kernel, the dequantize + matmul
    prefill path, or the PyTorch reference.

    Args:
        x: (..., in_features) activations, fp16/bf16/fp32, any batch and sequence length.
        tensors: the layer's packed tensors.
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
    if not use_triton:
        return spqr_matmul_reference(x, tensors, bias=bias, **meta)
    rows = x.numel() // in_features if in_features else 0
    if rows <= GEMV_MAX_ROWS and _pow2(group_size) and group_size <= 128:
        return spqr_gemv_triton(x, tensors, bias=bias, max_row_nnz=max_row_nnz, **meta)
    w = spqr_dequantize_triton(tensors, dtype=x.dtype, **meta)
    perm = tensors.get("perm")
    xp = x if perm is None else x.index_select(-1, perm.long())
    y = torch.matmul(xp, w.T)
    return y if bias is None else y + bias.to(y.dtype)
