"""Block pooling for the SeerAttention gate: Triton kernel, host wrapper and PyTorch reference.

The gate pools pre-RoPE Q and K over blocks of ``block_size`` tokens (average, max and/or min, padding-aware) and
concatenates the poolings. The PyTorch version converts the whole tensor to float32 and runs one masked reduction
per pooling (at 32k tokens and 32 heads of 128: several passes over 0.5 GB); the kernel reads each element once in
its own dtype and writes all poolings of a block in one program.

The gate's block scores (RoPE at block positions on the projected Q/K, scaled dot products, causal and
empty-block masking, softmax over key blocks) are likewise one kernel, :func:`gate_probs_triton`, in place of about
30 small PyTorch ops per layer (:func:`gate_probs_reference`).

Example:
    >>> from hf_effllm.kernels.seer_gate import block_pool_triton
    >>> pooled = block_pool_triton(q, 64, ["max", "min", "avg"])  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math

import torch
from hf_effllm.kernels.seer_attention import HAS_TRITON, causal_block_mask, triton_usable
from torch import nn

from hf_effllm.errors import HfEffllmError

POOL_KINDS: tuple[str, ...] = ("avg", "max", "min")

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _block_pool_kernel(
        X, VALID, Out, stride_xb, stride_xh, stride_xs, stride_vb, stride_ob, stride_oh, stride_on, H, S,
        D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, HAS_VALID: tl.constexpr,
        K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    ):  # fmt: skip
        # One program: one block of BLOCK tokens of one (batch, head); K0..K2 are the poolings in output order
        # (0 = none, 1 = avg, 2 = max, 3 = min).
        n = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)  # 64-bit: b * stride_xb can pass 2^31 at long contexts
        h = bh % H
        offs_s = n * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D_PAD)
        ok = offs_s < S
        if HAS_VALID:
            ok = ok & (tl.load(VALID + b * stride_vb + offs_s, mask=ok, other=0) != 0)
        dmask = offs_d < D
        x = tl.load(
            X + b * stride_xb + h * stride_xh + offs_s[:, None] * stride_xs + offs_d[None, :],
            mask=ok[:, None] & dmask[None, :],
            other=0.0,
        ).to(tl.float32)
        cnt = tl.sum(ok.to(tl.float32), 0)
        o_ptr = Out + b * stride_ob + h * stride_oh + n * stride_on + offs_d
        for slot in tl.static_range(3):
            kind = K0 if slot == 0 else (K1 if slot == 1 else K2)
            if kind != 0:
                if kind == 1:
                    r = tl.sum(x, 0) / tl.maximum(cnt, 1.0)
                elif kind == 2:
                    r = tl.max(tl.where(ok[:, None], x, float("-inf")), 0)
                else:
                    r = tl.min(tl.where(ok[:, None], x, float("inf")), 0)
                r = tl.where(cnt > 0, r, 0.0)  # empty block (all padding): zeros
                tl.store(o_ptr + slot * D, r, mask=dmask)

    @triton.jit
    def _gate_probs_kernel(
        QG, KG, COS, SIN, KVALID, Out,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_cn, stride_vb,
        stride_ob, stride_oh, stride_on, H, NB, qk_scale,
        EH: tl.constexpr, EH_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_KVALID: tl.constexpr,
    ):  # fmt: skip
        # One program: BM query blocks (rows) of one (batch, KV head) against all key blocks, in two passes (row
        # max / sum, then normalised probabilities); RoPE (rotate-half) applied to both sides on load.
        m0 = tl.program_id(0) * BM
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = m0 + tl.arange(0, BM)
        cols = tl.arange(0, EH_PAD)
        cmask = cols < EH
        rmask = rows < NB
        q_ptr = QG + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + cols[None, :]
        qm = rmask[:, None] & cmask[None, :]
        q1 = tl.load(q_ptr, mask=qm, other=0.0).to(tl.float32)
        q2 = tl.load(q_ptr + EH, mask=qm, other=0.0).to(tl.float32)
        c = tl.load(COS + rows[:, None] * stride_cn + cols[None, :], mask=qm, other=0.0).to(tl.float32)
        sn = tl.load(SIN + rows[:, None] * stride_cn + cols[None, :], mask=qm, other=0.0).to(tl.float32)
        qr1 = (q1 * c - q2 * sn) * qk_scale
        qr2 = (q1 * sn + q2 * c) * qk_scale
        k_base = KG + b * stride_kb + h * stride_kh
        hi = tl.minimum(NB, m0 + BM)  # key blocks beyond the last row's diagonal are all masked
        m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        for p in tl.static_range(2):
            for n0 in range(0, hi, BN):
                kcols = n0 + tl.arange(0, BN)
                km = (kcols < NB)[:, None] & cmask[None, :]
                k_ptr = k_base + kcols[:, None] * stride_kn + cols[None, :]
                k1 = tl.load(k_ptr, mask=km, other=0.0).to(tl.float32)
                k2 = tl.load(k_ptr + EH, mask=km, other=0.0).to(tl.float32)
                kc = tl.load(COS + kcols[:, None] * stride_cn + cols[None, :], mask=km, other=0.0).to(tl.float32)
                ks = tl.load(SIN + kcols[:, None] * stride_cn + cols[None, :], mask=km, other=0.0).to(tl.float32)
                kr1 = k1 * kc - k2 * ks
                kr2 = k1 * ks + k2 * kc
                sc = tl.dot(qr1, tl.trans(kr1), input_precision="ieee")
                sc = tl.dot(qr2, tl.trans(kr2), sc, input_precision="ieee")
                ok = (kcols[None, :] <= rows[:, None]) & (kcols < NB)[None, :]
                if HAS_KVALID:
                    kv = tl.load(KVALID + b * stride_vb + kcols, mask=kcols < NB, other=0)
                    ok = ok & (kv != 0)[None, :]
                sc = tl.where(ok, sc, float("-inf"))
                if p == 0:
                    m_new = tl.maximum(m_i, tl.max(sc, 1))
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(sc - m_safe[:, None]), 1)
                    m_i = m_new
                else:
                    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
                    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
                    prob = tl.math.exp2(sc - m_safe[:, None]) / l_safe[:, None]
                    o_ptr = Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + kcols[None, :]
                    tl.store(o_ptr, prob, mask=rmask[:, None] & (kcols < NB)[None, :])
        zero = tl.zeros([BM, BN], dtype=tl.float32)
        for n0 in range(tl.cdiv(hi, BN) * BN, NB, BN):  # above the diagonal: zeros
            kcols = n0 + tl.arange(0, BN)
            o_ptr = Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + kcols[None, :]
            tl.store(o_ptr, zero, mask=rmask[:, None] & (kcols < NB)[None, :])


@functools.lru_cache(maxsize=64)
def rope_tables(nb: int, e: int, theta: float, device: torch.device, dtype: torch.dtype):
    """Cached ``(cos, sin)`` of shape ``(nb, e // 2)`` for RoPE at positions ``0..nb-1`` (read-only)."""
    with torch.inference_mode(False):  # normal tensors: usable later with autograd (distillation)
        inv_freq = 1.0 / (theta ** (torch.arange(0, e, 2, device=device, dtype=torch.float32) / e))
        ang = torch.arange(nb, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        return ang.cos().to(dtype), ang.sin().to(dtype)


def rope_at_blocks(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half convention) of ``x (..., nb, E)`` at positions ``0..nb-1``.

    The cos/sin tables are cached per ``(nb, E, theta, device, dtype)``.
    """
    nb, e = x.shape[-2], x.shape[-1]
    cos, sin = rope_tables(nb, e, float(theta), x.device, x.dtype)
    x1, x2 = x[..., : e // 2], x[..., e // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _check_gate_probs_args(qg: torch.Tensor, kg: torch.Tensor, kvalid: torch.Tensor | None, name: str) -> None:
    if qg.dim() != 4 or qg.shape != kg.shape:
        raise HfEffllmError(
            f"{name}: qg and kg must both be (batch, kv_heads, nb, E); got {tuple(qg.shape)} and {tuple(kg.shape)}."
        )
    if qg.shape[-1] % 2:
        raise HfEffllmError(f"{name}: E={qg.shape[-1]} must be even (rotate-half RoPE).")
    b, _, nb, _ = qg.shape
    if kvalid is not None and (kvalid.shape != (b, nb) or kvalid.dtype != torch.bool):
        raise HfEffllmError(
            f"{name}: kvalid must be a bool tensor of shape (batch={b}, nb={nb}); got {kvalid.dtype} "
            f"{tuple(kvalid.shape)}."
        )


def gate_probs_reference(qg: torch.Tensor, kg: torch.Tensor, kvalid: torch.Tensor | None, theta: float) -> torch.Tensor:
    """Plain PyTorch version of :func:`gate_probs_triton` (same arguments and result; differentiable)."""
    _check_gate_probs_args(qg, kg, kvalid, "gate_probs_reference")
    return torch.softmax(gate_logits_reference(qg, kg, kvalid, theta), dim=-1).nan_to_num(0.0)


def gate_logits_reference(
    qg: torch.Tensor, kg: torch.Tensor, kvalid: torch.Tensor | None, theta: float
) -> torch.Tensor:
    """Masked block scores ``(B, H, nb, nb)`` (float32, ``-inf`` above the diagonal and for empty key blocks)."""
    nb = qg.shape[-2]
    qg, kg = rope_at_blocks(qg, theta), rope_at_blocks(kg, theta)
    scores = torch.matmul(qg, kg.transpose(-1, -2)) * (qg.shape[-1] ** -0.5)
    allowed = causal_block_mask(nb, scores.device)
    if kvalid is not None:
        allowed = allowed & kvalid[:, None, None, :]
    return torch.where(allowed, scores.float(), float("-inf"))


def gate_probs_triton(qg: torch.Tensor, kg: torch.Tensor, kvalid: torch.Tensor | None, theta: float) -> torch.Tensor:
    """Gate probabilities from projected block queries/keys, in one Triton launch (forward only).

    ``softmax_j(rope(qg)_i . rope(kg)_j / sqrt(E))`` over the causal (``j <= i``), non-empty key blocks; other
    entries (and rows with no allowed block) are 0. Scores are computed in float32 (IEEE products, no TF32).

    Args:
        qg: ``(B, H, nb, E)`` projected query blocks (before RoPE), float32 (or fp16/bf16).
        kg: ``(B, H, nb, E)`` projected key blocks (before RoPE).
        kvalid: optional bool ``(B, nb)``: key blocks holding at least one real token.
        theta: RoPE base.

    Returns:
        float32 ``(B, H, nb, nb)``.

    Example:
        >>> probs = gate_probs_triton(qg, kg, None, 500000.0)  # doctest: +SKIP
    """
    name = "gate_probs_triton"
    _check_gate_probs_args(qg, kg, kvalid, name)
    if not triton_usable(qg.device):
        raise HfEffllmError(
            f"{name}: the kernel needs a CUDA tensor (or TRITON_INTERPRET=1 on the CPU); qg is on {qg.device}. "
            "Use gate_probs_reference on the CPU."
        )
    if qg.shape[-1] > 512:
        raise HfEffllmError(f"{name}: E={qg.shape[-1]} is too large for the kernel; use <= 512.")
    b, h, nb, e = qg.shape
    out = torch.empty(b, h, nb, nb, dtype=torch.float32, device=qg.device)
    if out.numel() == 0:
        return out
    qg, kg = (t if t.stride(-1) == 1 else t.contiguous() for t in (qg, kg))
    cos, sin = rope_tables(nb, e, float(theta), qg.device, torch.float32)
    kv = kvalid.contiguous().view(torch.uint8) if kvalid is not None else out
    bm = 16 if nb <= 256 else 32
    _gate_probs_kernel[(triton.cdiv(nb, bm), b * h)](
        qg, kg, cos, sin, kv, out,
        qg.stride(0), qg.stride(1), qg.stride(2), kg.stride(0), kg.stride(1), kg.stride(2), cos.stride(0),
        kv.stride(0) if kvalid is not None else 0, out.stride(0), out.stride(1), out.stride(2),
        h, nb, e**-0.5 * 1.4426950408889634,
        EH=e // 2, EH_PAD=max(16, triton.next_power_of_2(e // 2)), BM=bm, BN=32, HAS_KVALID=kvalid is not None,
        num_warps=4, num_stages=1,  # sm_90, E=128: no spills, 24-32 KB shared memory (ptxas via scripts/aot_check.py)
    )  # fmt: skip
    return out


def _check_pool_args(x: torch.Tensor, block_size: int, kinds: list[str], valid: torch.Tensor | None, name: str):
    if x.dim() != 4:
        raise HfEffllmError(f"{name}: x must be 4-D (batch, heads, seq, head_dim); got shape {tuple(x.shape)}.")
    if block_size < 1:
        raise HfEffllmError(f"{name}: block_size={block_size} must be >= 1.")
    bad = [k for k in kinds if k not in POOL_KINDS]
    if bad or not kinds:
        raise HfEffllmError(f"{name}: kinds={list(kinds)} must be a non-empty list of {POOL_KINDS}.")
    b, _, s, _ = x.shape
    if valid is not None and (valid.shape != (b, s) or valid.dtype != torch.bool):
        raise HfEffllmError(
            f"{name}: valid must be a bool tensor of shape (batch={b}, seq={s}); got {valid.dtype} "
            f"{tuple(valid.shape)}."
        )


def block_pool_reference(
    x: torch.Tensor, block_size: int, kinds: list[str], valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain PyTorch version of :func:`block_pool_triton` (same arguments and result; differentiable).

    Computes in float32 whatever the input dtype.
    """
    _check_pool_args(x, block_size, kinds, valid, "block_pool_reference")
    x = x.float()
    b, h, s, d = x.shape
    nb = math.ceil(s / block_size)
    tail = nb * block_size - s
    xp = nn.functional.pad(x, (0, 0, 0, tail)).reshape(b, h, nb, block_size, d)
    m = torch.ones(b, s, dtype=torch.bool, device=x.device) if valid is None else valid.to(x.device)
    m = nn.functional.pad(m, (0, tail), value=False).view(b, 1, nb, block_size, 1)
    outs = []
    for kind in kinds:
        if kind == "avg":
            count = m.sum(3).clamp_min(1)
            outs.append((xp * m).sum(3) / count)
        else:
            fill = float("-inf") if kind == "max" else float("inf")
            red = xp.masked_fill(~m, fill)
            r = red.amax(3) if kind == "max" else red.amin(3)
            outs.append(torch.where(torch.isinf(r), torch.zeros_like(r), r))
    return torch.cat(outs, dim=-1)


def block_pool_triton(
    x: torch.Tensor, block_size: int, kinds: list[str], valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Pool ``x (B, H, S, D)`` over blocks of ``block_size`` tokens and concatenate the poolings (one launch).

    Each element of ``x`` is read once, in its own dtype (fp16/bf16/fp32); the reductions run in float32.

    Args:
        x: per-head states; any strides with a unit stride on the last dim (else a copy is made).
        block_size: tokens per block, a power of two <= 256; the last block may be partial.
        kinds: up to three poolings from ``avg``, ``max``, ``min``, concatenated in this order.
        valid: optional bool ``(B, S)``: tokens taking part (padding excluded). Empty blocks pool to zeros.

    Returns:
        float32 ``(B, H, nb, D * len(kinds))`` with ``nb = ceil(S / block_size)``.

    Example:
        >>> pooled = block_pool_triton(k, 64, ["max", "min", "avg"], valid=attention_mask.bool())  # doctest: +SKIP
    """
    name = "block_pool_triton"
    _check_pool_args(x, block_size, kinds, valid, name)
    if not triton_usable(x.device):
        raise HfEffllmError(
            f"{name}: the kernel needs a CUDA tensor (or TRITON_INTERPRET=1 on the CPU); x is on {x.device}. "
            "Use block_pool_reference on the CPU."
        )
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise HfEffllmError(f"{name}: dtype {x.dtype} is not supported; use float16, bfloat16 or float32.")
    if len(kinds) > 3:
        raise HfEffllmError(f"{name}: kinds={list(kinds)} has more than 3 poolings.")
    if block_size & (block_size - 1) or block_size > 256:
        raise HfEffllmError(f"{name}: block_size={block_size} must be a power of two <= 256.")
    if x.shape[-1] > 256:
        raise HfEffllmError(f"{name}: head_dim={x.shape[-1]} is too large for the kernel; use <= 256.")
    b, h, s, d = x.shape
    nb = math.ceil(s / block_size)
    out = torch.empty(b, h, nb, d * len(kinds), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    v = valid.to(x.device).contiguous().view(torch.uint8) if valid is not None else out  # bool as bytes: no copy
    codes = [1 + POOL_KINDS.index(k) for k in kinds] + [0] * (3 - len(kinds))
    _block_pool_kernel[(nb, b * h)](
        x, v, out, x.stride(0), x.stride(1), x.stride(2), v.stride(0) if valid is not None else 0,
        out.stride(0), out.stride(1), out.stride(2), h, s,
        D=d, D_PAD=max(16, triton.next_power_of_2(d)), BLOCK=block_size, HAS_VALID=valid is not None,
        K0=codes[0], K1=codes[1], K2=codes[2], num_warps=4 if block_size * d <= 8192 else 8,
    )  # fmt: skip
    return out
