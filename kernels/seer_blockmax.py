"""Attention forward that also returns the block-max map of the attention probabilities (SeerAttention target).

For causal self-attention with softmax probabilities ``P = softmax(Q K^T * scale)``, the block-max map is
``M[b, h, i, j] = max(P[b, h, rows of query block i, cols of key block j])`` (zero above the block diagonal). It is
the ground truth that SeerAttention's gates are distilled towards. The dense ``P`` is never built: one kernel launch
runs a FlashAttention forward over the causal key blocks (output, row max and row sum) and then a second pass over
the same key blocks recomputes ``Q K^T`` tile by tile, normalises it with the final log-sum-exp and keeps one max
per tile. The second pass costs the ``Q K^T`` product again but no ``P V`` product and no extra HBM traffic besides
K and the ``nb x nb`` map.

Example:
    >>> from hf_effllm.kernels.seer_blockmax import blockmax_attention
    >>> out, block_max = blockmax_attention(q, k, v)  # doctest: +SKIP
"""

from __future__ import annotations

import math

import torch
from hf_effllm.kernels.seer_attention import (
    HAS_TRITON,
    _check_triton_inputs,
    _chunk_rows,
    _heads_per_program,
    check_attention_inputs,
)

if HAS_TRITON:
    import triton
    import triton.language as tl
    from hf_effllm.kernels.seer_attention import _seer_block

    @triton.jit
    def _blockmax_fwd_kernel(
        Q, K, V, Out, BM, PAD,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_os, stride_mb, stride_mh, stride_mq, stride_pb,
        H, S, qk_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
        HAS_PAD: tl.constexpr, HP: tl.constexpr,
    ):  # fmt: skip
        qb = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // (H // HP)
        h0 = (bh % (H // HP)) * HP
        kvh = h0 // GROUP
        rows = tl.arange(0, HP * BLOCK)
        hh = h0 + rows // BLOCK
        offs_m = qb * BLOCK + rows % BLOCK
        offs_n = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D_PAD)
        dmask = offs_d < HEAD_DIM
        row_ok = offs_m < S
        q = tl.load(
            Q + b * stride_qb + hh[:, None] * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
            mask=row_ok[:, None] & dmask[None, :],
            other=0.0,
        )
        Kh = K + b * stride_kb + kvh * stride_kh
        Vh = V + b * stride_vb + kvh * stride_vh
        pad_ptr = PAD + b * stride_pb
        m_i = tl.full([HP * BLOCK], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([HP * BLOCK], dtype=tl.float32)
        acc = tl.zeros([HP * BLOCK, D_PAD], dtype=tl.float32)
        for kb in range(0, qb):
            acc, m_i, l_i = _seer_block(
                q, acc, m_i, l_i, Kh, Vh, kb, offs_m, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, S, qk_scale,
                HEAD_DIM, BLOCK, HAS_PAD, False,
            )  # fmt: skip
        acc, m_i, l_i = _seer_block(
            q, acc, m_i, l_i, Kh, Vh, qb, offs_m, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, S, qk_scale,
            HEAD_DIM, BLOCK, HAS_PAD, True,
        )  # fmt: skip
        seen = l_i > 0.0
        l_safe = tl.where(seen, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(
            Out + b * stride_ob + hh[:, None] * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
            out.to(Out.dtype.element_ty),
            mask=row_ok[:, None] & dmask[None, :],
        )
        # log2-space log-sum-exp; rows that saw nothing (padding, beyond S) get +inf so their probabilities are 0.
        lse = tl.where(seen & row_ok, m_i + tl.math.log2(l_safe), float("inf"))
        bm_ptr = BM + b * stride_mb + (h0 + tl.arange(0, HP)) * stride_mh + qb * stride_mq
        for kb in range(0, qb + 1):
            offs_k = kb * BLOCK + offs_n
            kmask = offs_k < S
            k = tl.load(
                Kh + offs_k[None, :] * stride_ks + offs_d[:, None], mask=kmask[None, :] & dmask[:, None], other=0.0
            )
            s = tl.dot(q, k) * qk_scale
            valid = (offs_k[None, :] <= offs_m[:, None]) & kmask[None, :]
            if HAS_PAD:
                pad = tl.load(pad_ptr + offs_k, mask=kmask, other=0)
                valid = valid & (pad[None, :] != 0)
            p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
            tl.store(bm_ptr + kb, tl.max(tl.reshape(p, (HP, BLOCK * BLOCK)), 1))


def blockmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    block_size: int = 64,
    num_warps: int | None = None,
    num_stages: int | None = None,
    heads_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention output and the block-max map of its probabilities, in one Triton launch.

    Args:
        q: ``(B, Hq, S, D)`` query states, fp16/bf16 (fp32 accepted).
        k: ``(B, Hkv, S, D)`` key states (GQA: ``Hq`` a multiple of ``Hkv``; K/V are not repeated).
        v: ``(B, Hkv, S, D)`` value states.
        scale: softmax scale, default ``D ** -0.5``.
        key_padding: optional bool ``(B, S)``, True for real tokens.
        block_size: tile size of the map (16, 32, 64 or 128).
        num_warps: Triton launch option (default 4 for D <= 64, else 8).
        num_stages: Triton launch option (default 3).
        heads_per_program: query heads of one KV group per program (sharing K/V loads); default 2 on CUDA when
            the group size is even, else 1.

    Returns:
        ``(out, block_max)``: ``out`` ``(B, Hq, S, D)`` in ``q``'s dtype and ``block_max`` float32
        ``(B, Hq, nb, nb)`` with ``nb = ceil(S / block_size)``, zero above the diagonal.

    Example:
        >>> out, bmax = blockmax_attention(q, k, v)  # doctest: +SKIP
        >>> target = bmax / bmax.sum(-1, keepdim=True)  # doctest: +SKIP
    """
    name = "blockmax_attention"
    b, hq, hkv, s, d = check_attention_inputs(q, k, v, block_size=block_size, key_padding=key_padding, name=name)
    _check_triton_inputs(q, name)
    nb = math.ceil(s / block_size)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    bmax = torch.zeros(b, hq, nb, nb, dtype=torch.float32, device=q.device)
    pad = key_padding.to(torch.int8).contiguous() if key_padding is not None else bmax
    scale = d**-0.5 if scale is None else float(scale)
    d_pad = max(16, triton.next_power_of_2(d))
    hp = _heads_per_program(heads_per_program, hq, hkv, hkv, q.device, name)
    _blockmax_fwd_kernel[(nb, b * hq // hp)](
        q, k, v, out, bmax, pad,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        bmax.stride(0), bmax.stride(1), bmax.stride(2), pad.stride(0) if key_padding is not None else 0,
        hq, s, scale * 1.4426950408889634,
        GROUP=hq // hkv, HEAD_DIM=d, D_PAD=d_pad, BLOCK=block_size, HAS_PAD=key_padding is not None, HP=hp,
        num_warps=num_warps or (4 if d_pad <= 64 else 8), num_stages=num_stages or 3,
    )  # fmt: skip
    return out, bmax


def blockmax_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    block_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch version of :func:`blockmax_attention` (same arguments and results).

    Float32, a chunk of query blocks at a time (memory ``O(chunk x S)`` rather than ``O(S^2)`` per head).
    """
    name = "blockmax_attention_reference"
    b, hq, hkv, s, d = check_attention_inputs(q, k, v, block_size=block_size, key_padding=key_padding, name=name)
    g = hq // hkv
    nb = math.ceil(s / block_size)
    scale = d**-0.5 if scale is None else float(scale)
    out = torch.empty(b, hq, s, d, dtype=q.dtype, device=q.device)
    bmax = torch.zeros(b, hq, nb, nb, dtype=torch.float32, device=q.device)
    qg = q.reshape(b, hkv, g, s, d)
    rows = _chunk_rows(b, hq, s, block_size)
    pos = torch.arange(s, device=q.device)
    for start in range(0, s, rows):
        end = min(s, start + rows)
        sc = torch.matmul(qg[:, :, :, start:end].float(), k[:, :, None, :end].float().transpose(-1, -2)) * scale
        allowed = pos[start:end, None] >= pos[None, :end]
        if key_padding is not None:
            allowed = allowed & key_padding[:, None, None, None, :end].to(q.device)
        p = torch.softmax(sc.masked_fill_(~allowed, float("-inf")), dim=-1).nan_to_num_(0.0)
        del sc
        out[:, :, start:end] = torch.matmul(p, v[:, :, None, :end].float()).reshape(b, hq, end - start, d).to(q.dtype)
        qb0, qb1, kb1 = start // block_size, math.ceil(end / block_size), math.ceil(end / block_size)
        extra_k, extra_q = kb1 * block_size - end, (qb1 - qb0) * block_size - (end - start)
        pp = torch.nn.functional.pad(p, (0, extra_k, 0, extra_q)) if extra_k or extra_q else p
        pp = pp.reshape(b, hkv, g, qb1 - qb0, block_size, kb1, block_size).amax(dim=(-3, -1))
        bmax[:, :, qb0:qb1, :kb1] = pp.reshape(b, hq, qb1 - qb0, kb1)
    return out, bmax
