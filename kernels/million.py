"""MILLION kernels: product-quantization encode, and decode attention over PQ codes + a full-precision window.

Notation: ``B`` batch, ``Hq`` query heads, ``Hkv`` KV heads (``GQ = Hq // Hkv`` query heads share one KV head),
``D`` head_dim, ``M`` subspaces, ``DSUB = D // M``, ``K = 2**nbits`` centroids, ``G`` codebook groups (1, or
``Hkv`` for per-head codebooks). Codes are ``uint8`` of shape ``(B, Hkv, N, M)`` (the last dimension contiguous);
codebooks are ``(G, M, K, DSUB)``.

Bytes first. At 4 bits (``M = D/2``, ``K = 256``) a cached token costs ``M`` bytes per head for K and the same for
V: ``D`` bytes against ``4 D`` for bf16 K/V, so the ideal decode is 4x fewer HBM bytes than bf16 attention; the
codebooks (``K * D`` elements each, 64 KiB in bf16 at D=128) stay on chip (L1) for the whole kernel. The decode
kernel is split-K flash-decoding: each program owns one (batch, KV head, split of the codes) and

1. reads each token's ``M`` code bytes once (one contiguous row),
2. gathers the token's centroids from the on-chip codebook: ``k_hat[n] = concat_m C_k[m, code_k[n, m]]``,
3. scores all ``GQ * Lq`` query rows of the group at once with a tensor-core dot ``q @ k_hat^T``; this is the
   same number as MILLION's lookup table ``sum_m LUT[m, code[n, m]]`` with ``LUT[m, c] = q_m . C_k[m, c]``
   (the PyTorch reference below computes it that way), but the gather is done once per KV head instead of once
   per query head (4x fewer lookups for Llama-3's GQA) and a per-query-head table (``M * K`` fp32, 64 KiB per
   head at D=128) never has to fit in shared memory,
4. online softmax, and accumulates ``p @ v_hat`` with the values rebuilt from their centroids the same way,
5. writes (partial output, running max, running sum) per split.

Two variants of that kernel (``million_attention(..., variant=)``): ``"l1"`` gathers centroid elements with
per-lane global loads served by L1 (about 1.3 elements per clock per SM on the H200: the bottleneck), ``"smem"``
(:func:`_million_codes_smem_kernel`) packs each centroid into one 16/32/64-bit word, lays the codebook out
code-major (``table[code * MC + m]``) and gathers one word per (token, subspace) from shared memory with
``tl.gather`` in chunks of ``MC`` subspaces. Per token and KV head at 4 bits, D=128, K=256 (K and V): 128 gathers
(``ld.shared.b32``, 512 B), ``2 K M W / BLOCK_N`` = 1 KiB of table words stored to shared memory and read from
L1 at BLOCK_N=128, 128 HBM bytes of codes.

A second kernel computes exact attention over the full-precision residual window (the recent tokens, and the new
ones) and merges it with the splits by log-sum-exp. No dequantized copy of the cache is ever written.

Each function has a plain PyTorch reference of the same math (:func:`pq_encode_reference`,
:func:`million_attention_reference`), used by the tests, as the CPU fallback and as the benchmark baseline.

Example:
    >>> codes = pq_encode(keys, codebook_k)  # doctest: +SKIP
    >>> out = million_attention(q, codes_k, codes_v, cb_k, cb_v, res_k, res_v, scale=D**-0.5)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import weakref

import torch

try:  # triton is optional: without it everything runs through the PyTorch references
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    HAS_TRITON = False

from hf_effllm.errors import HfEffllmError

__all__ = [
    "kernel_available",
    "million_attention",
    "million_attention_reference",
    "pq_decode_reference",
    "pq_encode",
    "pq_encode_reference",
]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run for tensors on ``device`` (CUDA, or the interpreter on the CPU)."""
    if not HAS_TRITON:
        return False
    dev = device if isinstance(device, torch.device) else torch.device(device)  # asked per call: no copy
    return dev.type == "cuda" or (dev.type == "cpu" and _interpreting())


def _pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


# ----------------------------------------------------------------------------------------------------------------
# PyTorch references
# ----------------------------------------------------------------------------------------------------------------
def _group_index(num_heads: int, groups: int, device: torch.device) -> torch.Tensor:
    if groups == 1:
        return torch.zeros(num_heads, dtype=torch.long, device=device)
    return torch.arange(num_heads, device=device)


def pq_encode_reference(x: torch.Tensor, codebook: torch.Tensor, *, chunk_elements: int = 1 << 24) -> torch.Tensor:
    """Nearest-centroid codes of ``x`` (squared Euclidean distance per subspace).

    Distances are computed as ``||c||^2 - 2 x.c`` with one batched matmul per chunk of tokens (no per-token loop);
    centroids at equal distance may be picked differently from the kernel (ties).

    Args:
        x: ``(B, H, N, D)`` vectors.
        codebook: ``(G, M, K, DSUB)`` centroids, ``G`` 1 or ``H``.
        chunk_elements: bound on the temporary distance tensor.

    Returns:
        ``uint8`` codes ``(B, H, N, M)``.
    """
    b, h, n, d = x.shape
    g, m, k, dsub = codebook.shape
    if m * dsub != d:
        raise HfEffllmError(f"codebook has M*DSUB={m * dsub} but x has head_dim={d}.")
    cb = codebook.float()
    c2 = cb.square().sum(-1)  # (G, M, K)
    out = torch.empty(b, h, n, m, dtype=torch.uint8, device=x.device)
    step = max(1, chunk_elements // max(1, b * (h // g) * m * k))
    for s in range(0, n, step):  # chunks of many tokens each
        xs = x[:, :, s : s + step].float()
        t = xs.shape[2]
        # (G, M, P, DSUB) with P = B * (H/G) * t points per (group, subspace)
        pts = xs.reshape(b, g, h // g, t, m, dsub).permute(1, 4, 0, 2, 3, 5).reshape(g * m, -1, dsub)
        dist = torch.baddbmm(c2.reshape(g * m, 1, k), pts, cb.reshape(g * m, k, dsub).transpose(1, 2), alpha=-2.0)
        idx = dist.argmin(-1).reshape(g, m, b, h // g, t).permute(2, 0, 3, 4, 1).reshape(b, h, t, m)
        out[:, :, s : s + step] = idx.to(torch.uint8)
    return out


def pq_decode_reference(codes: torch.Tensor, codebook: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Vectors rebuilt from their codes: ``(B, H, N, M)`` codes and ``(G, M, K, DSUB)`` -> ``(B, H, N, D)``."""
    b, h, n, m = codes.shape
    g, m2, k, dsub = codebook.shape
    if m2 != m:
        raise HfEffllmError(f"codes have M={m} subspaces but the codebook has {m2}.")
    cb = codebook[_group_index(h, g, codebook.device)]  # (H, M, K, DSUB)
    idx = codes.long() + (torch.arange(m, device=codes.device) * k)  # flat index into (M*K)
    flat = cb.reshape(h, m * k, dsub)
    out = torch.gather(
        flat[None].expand(b, -1, -1, -1), 2, idx.reshape(b, h, n * m, 1).expand(-1, -1, -1, dsub)
    ).reshape(b, h, n, m * dsub)
    return out if dtype is None else out.to(dtype)


def _masked_scores_lse(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax weights and log-sum-exp of scores with -inf for masked entries (rows all masked -> 0, -inf)."""
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(scores - safe[..., None])
    return p, lse


def million_attention_reference(
    q: torch.Tensor,
    codes_k: torch.Tensor,
    codes_v: torch.Tensor,
    codebook_k: torch.Tensor,
    codebook_v: torch.Tensor,
    res_k: torch.Tensor | None,
    res_v: torch.Tensor | None,
    *,
    scale: float,
    code_mask: torch.Tensor | None = None,
    res_mask: torch.Tensor | None = None,
    path: str = "lut",
) -> torch.Tensor:
    """Attention of ``q`` over PQ-coded tokens plus a full-precision window, merged by log-sum-exp (float32 math).

    Args:
        q: ``(B, Hq, Lq, D)`` queries.
        codes_k, codes_v: ``(B, Hkv, N, M)`` uint8 codes of the older tokens (``N`` may be 0).
        codebook_k, codebook_v: ``(G, M, K, DSUB)``.
        res_k, res_v: ``(B, Hkv, R, D)`` full-precision recent tokens (or None).
        scale: softmax scale.
        code_mask: ``(B, N)`` bool, True where a coded token may be attended (padding is False).
        res_mask: ``(B, Lq, R)`` bool, True where query ``i`` may attend residual token ``j`` (causal + padding).
        path: ``"lut"`` scores with per-subspace lookup tables ``LUT[m, c] = q_m . C_k[m, c]`` gathered by the
            codes and sums value weights per centroid (MILLION's formulation); ``"decoded"`` rebuilds K/V from
            the codes and runs plain attention. Both compute the same function.

    Returns:
        ``(B, Hq, Lq, D)`` in ``q.dtype``; rows with nothing to attend are 0.
    """
    b, hq, lq, d = q.shape
    hkv = codes_k.shape[1]
    n = codes_k.shape[2]
    gq = hq // hkv
    qf = q.float().reshape(b, hkv, gq * lq, d)  # rows of one KV head's group: (query head j, position i)
    parts_s: list[torch.Tensor] = []
    if n > 0:
        g, m, kc, dsub = codebook_k.shape
        if path == "lut":
            cbk = codebook_k.float()[_group_index(hkv, g, q.device)]  # (Hkv, M, K, DSUB)
            lut = torch.einsum("bhrmx,hmkx->bhrmk", qf.reshape(b, hkv, gq * lq, m, dsub), cbk)  # (B,Hkv,rows,M,K)
            idx = codes_k.long().permute(0, 1, 3, 2)  # (B, Hkv, M, N)
            s_codes = torch.zeros(b, hkv, gq * lq, n, device=q.device)
            for mi in range(m):  # sum over subspaces of the table entries picked by the codes
                s_codes += torch.gather(lut[:, :, :, mi], 3, idx[:, :, mi][:, :, None].expand(-1, -1, gq * lq, -1))
            s_codes = s_codes * scale
        elif path == "decoded":
            kk = pq_decode_reference(codes_k, codebook_k.float())
            s_codes = torch.einsum("bhrd,bhnd->bhrn", qf, kk) * scale
        else:
            raise HfEffllmError(f"path={path!r} is not known; use 'lut' or 'decoded'.")
        if code_mask is not None:
            s_codes = s_codes.masked_fill(~code_mask.bool()[:, None, None, :], float("-inf"))
        parts_s.append(s_codes)
    r = 0 if res_k is None else res_k.shape[2]
    if r > 0:
        s_res = torch.einsum("bhrd,bhnd->bhrn", qf, res_k.float()) * scale
        if res_mask is not None:
            rm = res_mask.bool()[:, None, None].expand(b, 1, gq, lq, r).reshape(b, 1, gq * lq, r)
            s_res = s_res.masked_fill(~rm, float("-inf"))
        parts_s.append(s_res)
    if not parts_s:
        return torch.zeros_like(q)
    scores = torch.cat(parts_s, dim=-1)
    p, lse = _masked_scores_lse(scores)
    denom = torch.exp(lse - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))  # 1 or 0
    out = torch.zeros(b, hkv, gq * lq, d, device=q.device)
    if n > 0:
        pc = p[..., :n]
        if path == "lut":
            g, m, kc, dsub = codebook_v.shape
            cbv = codebook_v.float()[_group_index(hkv, g, q.device)]  # (Hkv, M, K, DSUB)
            # weights per (subspace, centroid): scatter the probabilities onto the centroids their codes pick
            idx = codes_v.long().permute(0, 1, 3, 2)  # (B, Hkv, M, N)
            w = torch.zeros(b, hkv, gq * lq, m, kc, device=q.device)
            for mi in range(m):
                w[:, :, :, mi].scatter_add_(3, idx[:, :, mi][:, :, None].expand(-1, -1, gq * lq, -1), pc)
            out += torch.einsum("bhrmk,hmkx->bhrmx", w, cbv).reshape(b, hkv, gq * lq, d)
        else:
            out += pc @ pq_decode_reference(codes_v, codebook_v.float())
    if r > 0:
        out += p[..., n:] @ res_v.float()
    out = out / torch.where(denom > 0, p.sum(-1), torch.ones_like(denom))[..., None]
    return out.reshape(b, hq, lq, d).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _pq_encode_kernel(
        x_ptr,
        cb_ptr,
        out_ptr,
        N,
        sx_b,
        sx_h,
        sx_n,
        so_b,
        so_h,
        so_n,
        scb_g,
        H: tl.constexpr,
        K: tl.constexpr,
        DSUB: tl.constexpr,
        PER_HEAD: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        m = tl.program_id(2)
        b = (pid_bh // H).to(tl.int64)  # 64-bit: b * sx_b passes 2^31 at long prompts / large batches
        h = (pid_bh % H).to(tl.int64)
        x_bh = x_ptr + b * sx_b + h * sx_h
        o_bh = out_ptr + b * so_b + h * so_h
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        j = tl.arange(0, DSUB)
        x = tl.load(x_bh + n[:, None] * sx_n + m * DSUB + j[None, :], mask=n_ok[:, None], other=0.0)
        x = x.to(tl.float32)  # (BLOCK_N, DSUB)
        if PER_HEAD:
            cb_base = cb_ptr + h * scb_g + m * (K * DSUB)
        else:
            cb_base = cb_ptr + m * (K * DSUB)
        best = tl.full([BLOCK_N], float("inf"), tl.float32)
        best_i = tl.zeros([BLOCK_N], tl.int32)
        kk = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            c = tl.load(cb_base + (k0 + kk)[:, None] * DSUB + j[None, :]).to(tl.float32)  # (BLOCK_K, DSUB)
            c2 = tl.sum(c * c, axis=1)
            dist = c2[None, :] - 2.0 * tl.sum(x[:, None, :] * c[None, :, :], axis=2)  # ||x-c||^2 - ||x||^2
            dmin = tl.min(dist, axis=1)
            imin = tl.argmin(dist, axis=1).to(tl.int32) + k0
            upd = dmin < best
            best = tl.where(upd, dmin, best)
            best_i = tl.where(upd, imin, best_i)
        tl.store(o_bh + n * so_n + m, best_i.to(tl.uint8), mask=n_ok)

    @triton.jit
    def _pq_encode_loop_kernel(
        x_ptr,
        cb_ptr,
        out_ptr,
        N,
        sx_b,
        sx_h,
        sx_n,
        so_b,
        so_h,
        so_n,
        scb_g,
        H: tl.constexpr,
        K: tl.constexpr,
        DSUB: tl.constexpr,
        PER_HEAD: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MB: tl.constexpr,
    ):
        """Nearest centroid with one token per lane and a loop over the ``K`` centroids (``DSUB`` 1, 2 or 4).

        Program: ``BLOCK_N`` tokens x ``MB`` subspaces of one (batch, head). Per subspace the token's ``DSUB``
        elements stay in registers (pre-scaled by -2); each step of the centroid loop loads one centroid (the same
        address for every lane: an L1 broadcast, amortized over the lane's tokens) and costs ``DSUB`` FMAs, a compare
        and two selects per token: ``d = ||c||^2 - 2 x.c`` (the reference's distance; the first minimum wins, as
        ``argmin``). No cross-lane reduction, unlike :func:`_pq_encode_kernel`, whose ``argmin`` over a centroid
        axis spread across lanes costs shuffles per chunk.
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_bh = tl.program_id(2)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        x_rows = x_ptr + b * sx_b + h * sx_h + n.to(tl.int64) * sx_n
        o_rows = out_ptr + b * so_b + h * so_h + n.to(tl.int64) * so_n
        if PER_HEAD:
            cb_h = cb_ptr + h * scb_g
        else:
            cb_h = cb_ptr
        for mi in tl.static_range(MB):
            m = pid_m * MB + mi
            xm = x_rows + m * DSUB
            x0 = tl.load(xm, mask=n_ok, other=0.0).to(tl.float32) * -2.0
            if DSUB > 1:
                x1 = tl.load(xm + 1, mask=n_ok, other=0.0).to(tl.float32) * -2.0
            if DSUB > 2:
                x2 = tl.load(xm + 2, mask=n_ok, other=0.0).to(tl.float32) * -2.0
                x3 = tl.load(xm + 3, mask=n_ok, other=0.0).to(tl.float32) * -2.0
            cm = cb_h + m * (K * DSUB)
            best = tl.full([BLOCK_N], float("inf"), tl.float32)
            best_i = tl.zeros([BLOCK_N], tl.int32)
            for k in range(K):
                c0 = tl.load(cm + k * DSUB).to(tl.float32)
                c2 = c0 * c0
                d = x0 * c0
                if DSUB > 1:
                    c1 = tl.load(cm + k * DSUB + 1).to(tl.float32)
                    c2 += c1 * c1
                    d += x1 * c1
                if DSUB > 2:
                    c2_ = tl.load(cm + k * DSUB + 2).to(tl.float32)
                    c3 = tl.load(cm + k * DSUB + 3).to(tl.float32)
                    c2 += c2_ * c2_ + c3 * c3
                    d += x2 * c2_ + x3 * c3
                d += c2
                upd = d < best
                best = tl.where(upd, d, best)
                best_i = tl.where(upd, k, best_i)
            tl.store(o_rows + m, best_i.to(tl.uint8), mask=n_ok)

    @triton.jit
    def _million_codes_kernel(
        q_ptr,
        ck_ptr,
        cv_ptr,
        cbk_ptr,
        cbv_ptr,
        cmask_ptr,
        po_ptr,
        pm_ptr,
        pl_ptr,
        n_codes,
        split_len,
        num_splits,
        scale,
        sq_b,
        sq_h,
        sq_l,
        sc_b,
        sc_h,
        sc_n,
        scv_b,
        scv_h,
        scv_n,
        scb_g,
        smask_b,
        HKV: tl.constexpr,
        GQ: tl.constexpr,
        LQ: tl.constexpr,
        ROWS: tl.constexpr,
        D: tl.constexpr,
        M: tl.constexpr,
        DSUB: tl.constexpr,
        K: tl.constexpr,
        PER_HEAD: tl.constexpr,
        HAS_MASK: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = pid_bh // HKV
        hkv = pid_bh % HKV
        # 64-bit: b * sc_b passes 2^31 at batch 3 and 1M cached tokens (Llama-3-8B shape)
        ck_bh = ck_ptr + b.to(tl.int64) * sc_b + hkv.to(tl.int64) * sc_h
        cv_bh = cv_ptr + b.to(tl.int64) * scv_b + hkv.to(tl.int64) * scv_h
        rows = tl.arange(0, ROWS)
        row_ok = rows < GQ * LQ
        jh = rows % GQ
        li = rows // GQ
        d = tl.arange(0, D)
        q = tl.load(
            q_ptr + b * sq_b + (hkv * GQ + jh)[:, None] * sq_h + li[:, None] * sq_l + d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        msub = tl.arange(0, M)
        jj = tl.arange(0, DSUB)
        if PER_HEAD:
            cb_off = hkv * scb_g + msub * (K * DSUB)
        else:
            cb_off = msub * (K * DSUB)
        start = sp * split_len
        end = tl.minimum(start + split_len, n_codes)
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, D], tl.float32)
        nn = tl.arange(0, BLOCK_N)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + nn
            n_ok = n < end
            ck = tl.load(ck_bh + n[:, None] * sc_n + msub[None, :], mask=n_ok[:, None], other=0)
            koff = (cb_off[None, :] + ck.to(tl.int32) * DSUB)[:, :, None] + jj[None, None, :]
            k = tl.reshape(tl.load(cbk_ptr + koff), (BLOCK_N, D))  # centroids gathered from the on-chip codebook
            s = tl.dot(q, tl.trans(k)) * scale  # (ROWS, BLOCK_N)
            valid = n_ok
            if HAS_MASK:
                valid = valid & (tl.load(cmask_ptr + b * smask_b + n, mask=n_ok, other=0) != 0)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            cv = tl.load(cv_bh + n[:, None] * scv_n + msub[None, :], mask=n_ok[:, None], other=0)
            voff = (cb_off[None, :] + cv.to(tl.int32) * DSUB)[:, :, None] + jj[None, None, :]
            v = tl.reshape(tl.load(cbv_ptr + voff), (BLOCK_N, D))
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        part = (pid_bh * num_splits + sp) * ROWS + rows
        tl.store(pm_ptr + part, m_i)
        tl.store(pl_ptr + part, l_i)
        tl.store(po_ptr + part[:, None] * D + d[None, :], acc)

    @triton.jit
    def _unpack_words(w, DSUB: tl.constexpr, EBITS: tl.constexpr, DTYPE: tl.constexpr):
        """``[BN, MC]`` packed centroid words -> ``[BN, MC * DSUB]`` elements (shifts, truncation, bitcast)."""
        if EBITS == 16:
            e0 = w.to(tl.int16).to(DTYPE, bitcast=True)
            if DSUB >= 2:
                e1 = (w >> 16).to(tl.int16).to(DTYPE, bitcast=True)
            if DSUB == 4:
                e2 = (w >> 32).to(tl.int16).to(DTYPE, bitcast=True)
                e3 = (w >> 48).to(tl.int16).to(DTYPE, bitcast=True)
        else:
            e0 = w.to(tl.int32).to(DTYPE, bitcast=True)
            if DSUB >= 2:
                e1 = (w >> 32).to(tl.int32).to(DTYPE, bitcast=True)
        if DSUB == 1:
            out = e0
        elif DSUB == 2:
            out = tl.reshape(tl.join(e0, e1), (w.shape[0], w.shape[1] * 2))
        else:
            # join adds a new minor dimension: [.., j, i] = (e0, e1, e2, e3)[2 i + j] after the outer join
            out = tl.reshape(tl.join(tl.join(e0, e2), tl.join(e1, e3)), (w.shape[0], w.shape[1] * 4))
        return out

    @triton.jit
    def _centroid_tile(
        tab_ptr,
        code_ptrs,
        code_ok,
        c: tl.constexpr,
        M: tl.constexpr,
        K: tl.constexpr,
        MC: tl.constexpr,
        DSUB: tl.constexpr,
        EBITS: tl.constexpr,
        DTYPE: tl.constexpr,
    ):
        """Centroids of subspaces ``[c*MC, (c+1)*MC)`` of ``BN`` tokens, gathered from shared memory.

        The chunk's table is loaded (coalesced, code-major ``[K, MC]`` words) into registers; ``tl.gather`` stores
        it to shared memory at ``code * MC + m`` and reads one word per (token, subspace).
        """
        kk = tl.arange(0, K)
        mc = tl.arange(0, MC)
        table = tl.load(tab_ptr + kk[:, None] * M + (c * MC + mc)[None, :])  # [K, MC] words
        table = tl.reshape(table, (K * MC,))  # 1-D: tl.gather then goes through shared memory
        codes = tl.load(code_ptrs + c * MC, mask=code_ok, other=0).to(tl.int32)  # [BN, MC]
        bn: tl.constexpr = codes.shape[0]
        idx = tl.reshape(codes * MC + mc[None, :], (bn * MC,))
        w = tl.reshape(tl.gather(table, idx, 0), (bn, MC))  # w[n, m] = table[codes[n, m] * MC + m]
        return _unpack_words(w, DSUB, EBITS, DTYPE)

    @triton.jit
    def _million_codes_smem_kernel(
        q_ptr,
        ck_ptr,
        cv_ptr,
        tk_ptr,
        tv_ptr,
        cmask_ptr,
        po_ptr,
        pm_ptr,
        pl_ptr,
        n_codes,
        split_len,
        num_splits,
        scale,
        sq_b,
        sq_h,
        sq_l,
        sc_b,
        sc_h,
        sc_n,
        scv_b,
        scv_h,
        scv_n,
        stab_g,
        smask_b,
        HKV: tl.constexpr,
        GQ: tl.constexpr,
        LQ: tl.constexpr,
        ROWS: tl.constexpr,
        D: tl.constexpr,
        M: tl.constexpr,
        DSUB: tl.constexpr,
        K: tl.constexpr,
        EBITS: tl.constexpr,
        NCH: tl.constexpr,
        PER_HEAD: tl.constexpr,
        HAS_MASK: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Split-K decode over PQ codes with the centroid gathers served by shared memory (``variant="smem"``).

        Same inputs, partials and math as :func:`_million_codes_kernel`, except that the codebooks come as packed
        code-major word tables ``(G, K, M)``: one word (``DSUB`` elements) per centroid. Subspaces are processed in
        ``NCH`` chunks of ``MC = M / NCH``; per chunk and iteration of ``BLOCK_N`` tokens, the ``[K, MC]`` table
        chunk is loaded (L1/L2) and gathered with ``tl.gather``, which stores it to shared memory once and reads one
        word per (token, subspace) with ``ld.shared``. Scores are summed over the chunks (``q[:, chunk] @ k^T``), the
        value accumulator is kept per chunk (``acc_c += p @ v[:, chunk]``).

        Per token and KV head (K and V together), with ``W`` the word bytes (4 at 4 bits, 8 at 2 bits in 16-bit
        floats): ``2 M`` gathers (``ld.shared``, ``2 M W`` bytes: 512 B at D=128/4 bits), ``2 K M W / BLOCK_N``
        bytes of tables stored to shared memory and read from L1/L2 (512 B at K=256, M=64, BLOCK_N=256), and
        ``2 M`` HBM bytes of codes (128 B at 4 bits) -- the only HBM traffic besides the per-split partials.

        PTX (triton 3.6, sm_90, 4 bits, D=128, GQ=4, Lq=1, BLOCK_N=128, 8 warps, 4 chunks), per thread and
        iteration: 64 ``ld.shared.b32`` gathers (128 tokens x 64 subspaces x 2 / 256 threads), 128
        ``st.shared.b32`` + 128 ``ld.global.b32`` table words, 184 registers, no spills, 24 KiB shared memory.
        Lanes of a warp hold consecutive subspaces (the 1-D index ``code * MC + m``, 32 lanes along it), so the
        bank of a gather is ``(code * MC + m) % 32``: conflict-free with ``MC = 32`` (``chunks=2``), about 2-way
        with ``MC = 16`` (two tokens per warp: lanes ``m`` and ``m + 16`` collide when their codes have the same
        parity); table stores are conflict-free. A 2-D ``tl.gather`` would be lowered to warp shuffles (8 per
        element at K=256), hence the 1-D table; the table loads are kept in the loop (``n0 >> 31`` offset) so the
        compiler does not hoist all tables into registers.
        """
        MC: tl.constexpr = M // NCH
        DC: tl.constexpr = MC * DSUB
        DTYPE: tl.constexpr = q_ptr.dtype.element_ty
        pid_bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = pid_bh // HKV
        hkv = pid_bh % HKV
        # 64-bit: b * sc_b passes 2^31 at batch 3 and 1M cached tokens (Llama-3-8B shape)
        ck_bh = ck_ptr + b.to(tl.int64) * sc_b + hkv.to(tl.int64) * sc_h
        cv_bh = cv_ptr + b.to(tl.int64) * scv_b + hkv.to(tl.int64) * scv_h
        rows = tl.arange(0, ROWS)
        row_ok = rows < GQ * LQ
        jh = rows % GQ
        li = rows // GQ
        dc = tl.arange(0, DC)
        q_row = q_ptr + b * sq_b + (hkv * GQ + jh)[:, None] * sq_h + li[:, None] * sq_l
        q0 = tl.load(q_row + dc[None, :], mask=row_ok[:, None], other=0.0)
        q1 = tl.load(q_row + ((DC + dc) % D)[None, :], mask=row_ok[:, None], other=0.0)
        q2 = tl.load(q_row + ((2 * DC + dc) % D)[None, :], mask=row_ok[:, None], other=0.0)
        q3 = tl.load(q_row + ((3 * DC + dc) % D)[None, :], mask=row_ok[:, None], other=0.0)
        if PER_HEAD:
            tk_base = tk_ptr + hkv * stab_g
            tv_base = tv_ptr + hkv * stab_g
        else:
            tk_base = tk_ptr
            tv_base = tv_ptr
        start = sp * split_len
        end = tl.minimum(start + split_len, n_codes)
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        a0 = tl.zeros([ROWS, DC], tl.float32)
        a1 = tl.zeros([ROWS, DC], tl.float32)
        a2 = tl.zeros([ROWS, DC], tl.float32)
        a3 = tl.zeros([ROWS, DC], tl.float32)
        nn = tl.arange(0, BLOCK_N)
        mc = tl.arange(0, MC)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + nn
            n_ok = n < end
            ok2 = n_ok[:, None]
            # 0 at run time (n0 >= 0), opaque to the compiler: keeps the table loads in the loop (not hoisted, so
            # no table is live across iterations: register budget)
            tk = tk_base + (n0 >> 31)
            tv = tv_base + (n0 >> 31)
            kc = ck_bh + n[:, None] * sc_n + mc[None, :]
            s = tl.dot(q0, tl.trans(_centroid_tile(tk, kc, ok2, 0, M, K, MC, DSUB, EBITS, DTYPE)))
            if NCH > 1:
                s += tl.dot(q1, tl.trans(_centroid_tile(tk, kc, ok2, 1, M, K, MC, DSUB, EBITS, DTYPE)))
            if NCH > 2:
                s += tl.dot(q2, tl.trans(_centroid_tile(tk, kc, ok2, 2, M, K, MC, DSUB, EBITS, DTYPE)))
                s += tl.dot(q3, tl.trans(_centroid_tile(tk, kc, ok2, 3, M, K, MC, DSUB, EBITS, DTYPE)))
            s = s * scale
            valid = n_ok
            if HAS_MASK:
                valid = valid & (tl.load(cmask_ptr + b * smask_b + n, mask=n_ok, other=0) != 0)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            pd = p.to(DTYPE)
            vc = cv_bh + n[:, None] * scv_n + mc[None, :]
            a0 = a0 * alpha[:, None] + tl.dot(pd, _centroid_tile(tv, vc, ok2, 0, M, K, MC, DSUB, EBITS, DTYPE))
            if NCH > 1:
                a1 = a1 * alpha[:, None] + tl.dot(pd, _centroid_tile(tv, vc, ok2, 1, M, K, MC, DSUB, EBITS, DTYPE))
            if NCH > 2:
                a2 = a2 * alpha[:, None] + tl.dot(pd, _centroid_tile(tv, vc, ok2, 2, M, K, MC, DSUB, EBITS, DTYPE))
                a3 = a3 * alpha[:, None] + tl.dot(pd, _centroid_tile(tv, vc, ok2, 3, M, K, MC, DSUB, EBITS, DTYPE))
            m_i = m_new
        part = (pid_bh * num_splits + sp) * ROWS + rows
        tl.store(pm_ptr + part, m_i)
        tl.store(pl_ptr + part, l_i)
        po = po_ptr + part[:, None] * D + dc[None, :]
        tl.store(po, a0)
        if NCH > 1:
            tl.store(po + DC, a1)
        if NCH > 2:
            tl.store(po + 2 * DC, a2)
            tl.store(po + 3 * DC, a3)

    @triton.jit
    def _million_merge_kernel(
        q_ptr,
        rk_ptr,
        rv_ptr,
        rmask_ptr,
        po_ptr,
        pm_ptr,
        pl_ptr,
        out_ptr,
        R,
        num_splits,
        scale,
        sq_b,
        sq_h,
        sq_l,
        sr_b,
        sr_h,
        sr_n,
        srv_b,
        srv_h,
        srv_n,
        srm_b,
        srm_l,
        so_b,
        so_h,
        so_l,
        HKV: tl.constexpr,
        GQ: tl.constexpr,
        LQ: tl.constexpr,
        ROWS: tl.constexpr,
        D: tl.constexpr,
        HAS_RMASK: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        b = pid_bh // HKV
        hkv = pid_bh % HKV
        rows = tl.arange(0, ROWS)
        row_ok = rows < GQ * LQ
        jh = rows % GQ
        li = rows // GQ
        d = tl.arange(0, D)
        q = tl.load(
            q_ptr + b * sq_b + (hkv * GQ + jh)[:, None] * sq_h + li[:, None] * sq_l + d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, D], tl.float32)
        rr = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + rr
            r_ok = r < R
            k = tl.load(rk_ptr + b * sr_b + hkv * sr_h + r[:, None] * sr_n + d[None, :], mask=r_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            valid = r_ok[None, :] & row_ok[:, None]
            if HAS_RMASK:
                rm = tl.load(
                    rmask_ptr + b * srm_b + li[:, None] * srm_l + r[None, :], mask=valid, other=0
                )  # (ROWS, BLOCK_R)
                valid = valid & (rm != 0)
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(
                rv_ptr + b * srv_b + hkv * srv_h + r[:, None] * srv_n + d[None, :], mask=r_ok[:, None], other=0.0
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        for sp in range(0, num_splits):  # log-sum-exp merge of the code splits
            part = (pid_bh * num_splits + sp) * ROWS + rows
            m_s = tl.load(pm_ptr + part)
            l_s = tl.load(pl_ptr + part)
            o_s = tl.load(po_ptr + part[:, None] * D + d[None, :])
            m_new = tl.maximum(m_i, m_s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            a = tl.exp(m_i - m_safe)
            c = tl.exp(m_s - m_safe)
            l_i = l_i * a + l_s * c
            acc = acc * a[:, None] + o_s * c[:, None]
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(
            out_ptr + b * so_b + (hkv * GQ + jh)[:, None] * so_h + li[:, None] * so_l + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None],
        )


# ----------------------------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_codebook(name: str, cb: torch.Tensor) -> None:
    if cb.dim() != 4:
        raise HfEffllmError(f"{name} must be (G, M, K, DSUB); got shape {tuple(cb.shape)}.")
    if cb.dtype not in _FLOAT_DTYPES:
        raise HfEffllmError(f"{name}.dtype={cb.dtype} is not supported; use float16, bfloat16 or float32.")


ENCODE_VARIANTS = ("loop", "chunked")


def pq_encode(
    x: torch.Tensor,
    codebook: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    use_kernel: bool | None = None,
    encode_variant: str | None = None,
) -> torch.Tensor:
    """Nearest-centroid PQ codes of ``x`` (Triton on CUDA / under the interpreter, else the PyTorch reference).

    Args:
        x: ``(B, H, N, D)`` vectors (any float dtype, last dimension contiguous).
        codebook: ``(G, M, K, DSUB)`` with ``G`` 1 or ``H``; ``K`` at most 256.
        out: optional ``uint8`` ``(B, H, N, M)`` tensor (may be a strided view into a larger buffer) to write.
        use_kernel: force (True) or forbid (False) the Triton path; default: Triton where it can run.
        encode_variant: ``"loop"`` (:func:`_pq_encode_loop_kernel`: one token per lane, a loop over the centroids;
            ``DSUB`` 1, 2 or 4, else the other) or ``"chunked"`` (:func:`_pq_encode_kernel`: chunks of centroids
            with an ``argmin`` across lanes). None: ``"loop"`` on the GPU, ``"chunked"`` under the Triton
            interpreter (where a 256-step Python loop per program is the slow one; tests pick each explicitly).

    Returns:
        ``uint8`` codes ``(B, H, N, M)`` (``out`` when given).

    Example:
        >>> codes = pq_encode(torch.randn(1, 2, 5, 8), torch.randn(1, 4, 16, 2))  # doctest: +SKIP
    """
    if x.dim() != 4:
        raise HfEffllmError(f"x must be (B, H, N, D); got shape {tuple(x.shape)}.")
    if encode_variant is None:
        encode_variant = "chunked" if _interpreting() else "loop"
    if encode_variant not in ENCODE_VARIANTS:
        raise HfEffllmError(f"encode_variant={encode_variant!r} is not known; use one of {ENCODE_VARIANTS}.")
    _check_codebook("codebook", codebook)
    b, h, n, d = x.shape
    g, m, k, dsub = codebook.shape
    if m * dsub != d:
        raise HfEffllmError(f"codebook M*DSUB={m}*{dsub} does not match head_dim={d}.")
    if g not in (1, h):
        raise HfEffllmError(f"codebook has {g} groups; use 1 (shared) or {h} (one per head).")
    if k > 256:
        raise HfEffllmError(f"codebook has K={k} centroids; uint8 codes hold at most 256.")
    if x.device != codebook.device:
        raise HfEffllmError(f"x is on {x.device} but the codebook is on {codebook.device}; move them together.")
    if out is not None and (tuple(out.shape) != (b, h, n, m) or out.dtype != torch.uint8 or out.stride(-1) != 1):
        raise HfEffllmError(f"out must be a uint8 tensor of shape {(b, h, n, m)} with a contiguous last dimension.")
    can = kernel_available(x.device) and _pow2(dsub) and _pow2(k)
    if use_kernel and not can:
        raise HfEffllmError(
            f"the Triton encode needs CUDA (or TRITON_INTERPRET=1) and power-of-two DSUB={dsub}, K={k}."
        )
    if not (can if use_kernel is None else use_kernel) or n == 0:
        codes = pq_encode_reference(x, codebook)
        if out is None:
            return codes
        out.copy_(codes)
        return out
    if out is None:
        out = torch.empty(b, h, n, m, dtype=torch.uint8, device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    cb = codebook.contiguous()
    if dsub in (1, 2, 4) and encode_variant == "loop":
        mb = next(c for c in (8, 4, 2, 1) if m % c == 0)
        block_n = 512 if not _interpreting() else 16
        # subspace blocks fastest: programs that run together read the same tokens' rows (L2 reuse)
        _pq_encode_loop_kernel[(m // mb, triton.cdiv(n, block_n), b * h)](
            x, cb, out, n,
            x.stride(0), x.stride(1), x.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            cb.stride(0),
            H=h, K=k, DSUB=dsub, PER_HEAD=g > 1, BLOCK_N=block_n, MB=mb,
            num_warps=4,
        )  # fmt: skip
        return out
    block_n = 64 if not _interpreting() else 16
    block_k = min(k, 64 if dsub <= 4 else 32)
    grid = (b * h, triton.cdiv(n, block_n), m)
    _pq_encode_kernel[grid](
        x, cb, out, n,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        cb.stride(0),
        H=h, K=k, DSUB=dsub, PER_HEAD=g > 1, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4,
    )  # fmt: skip
    return out


VARIANTS = ("l1", "smem", "cuda")
# What variant=None picks: the first of these that supports the call ("cuda": kernels/million_cuda.py's conditions;
# "smem": see _smem_chunks; "l1" takes every shape). On the H200 (benchmarks/results/million_speed.md) "cuda" is
# faster than "smem" at every measured shape: 1.2-1.9x where the host's launch time dominates, 4.0-5.5x elsewhere.
DEFAULT_ORDER = ("cuda", "smem", "l1")
_WORD_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_TABLES: dict[int, tuple] = {}  # id(codebook) -> (weakref, state (memoized_per_tensor), packed table)


def _smem_chunks(m: int, dsub: int, k: int, elem_bytes: int, chunks: int | None = None) -> int | None:
    """Number of subspace chunks of the smem kernel (``chunks`` when given and valid, else the default), or None
    when it does not support the shape.

    The table chunk is ``[K, MC]`` words, ``MC = M / chunks``; ``MC = 16`` keeps it at 16-32 KiB for K = 256
    (4 or 8-byte words). Each chunk's ``MC * DSUB`` columns feed a tensor-core dot, so they must be >= 16.
    """
    if dsub * elem_bytes not in _WORD_DTYPES or not (_pow2(m) and _pow2(dsub) and _pow2(k)):
        return None
    for c in (chunks,) if chunks is not None else (max(1, m // 16), 4, 2, 1):
        if c in (1, 2, 4) and m % c == 0 and (m // c) * dsub >= 16:
            return c
    return None


def memoized_per_tensor(cache: dict[int, tuple], tensor: torch.Tensor, build) -> torch.Tensor:
    """``build(tensor)``, computed once per tensor object and in-place version (and shape, strides, dtype and
    address: a tensor whose ``.data`` was swapped or ``set_`` is rebuilt too); ``cache`` holds at most 256 entries
    (those of freed tensors go first, then the oldest). Inference tensors (no version counter) are not memoized."""
    if tensor.is_inference():  # no version counter, so an in-place change could not be seen: built every call
        return build(tensor)
    key = id(tensor)
    hit = cache.get(key)
    state = (tensor._version, tensor.shape, tensor.stride(), tensor.dtype, tensor.data_ptr())
    if hit is not None and hit[0]() is tensor and hit[1] == state:
        return hit[2]
    out = build(tensor)
    if len(cache) >= 256:
        for k_ in [k_ for k_, v in cache.items() if v[0]() is None] or list(cache)[:64]:
            del cache[k_]
    cache[key] = (weakref.ref(tensor), state, out)
    return out


def _packed_table(codebook: torch.Tensor) -> torch.Tensor:
    """``(G, M, K, DSUB)`` codebook -> code-major word table ``(G, K, M)``: one word = one centroid's ``DSUB``
    elements (little-endian: element ``j`` in bits ``[j * bits, (j + 1) * bits)``).

    Memoized per codebook tensor (identity and in-place version), so a cache layer's codebooks are packed once.
    """

    def pack(cb: torch.Tensor) -> torch.Tensor:
        word = _WORD_DTYPES[cb.shape[-1] * cb.element_size()]
        return cb.contiguous().view(word)[..., 0].transpose(1, 2).contiguous()

    return memoized_per_tensor(_TABLES, codebook, pack)


def _launch_config(
    variant: str,
    rows: int,
    d: int,
    m: int,
    dsub: int,
    k: int,
    elem_bytes: int,
    interp: bool,
    block_n: int | None = None,
    num_warps: int | None = None,
    chunks: int | None = None,
) -> tuple[str, int, int, int | None]:
    """(variant, BLOCK_N, num_warps, chunks) of the code kernel for a shape; overrides win where given.

    Every combination this picks for D in (64, 128), M in (D/2, D/4), GQ * Lq <= 128 compiles with triton 3.6
    for sm_90 without register spills (checked with scripts/aot_check.py; see the module docstring).
    """
    smem_chunks = _smem_chunks(m, dsub, k, elem_bytes, chunks)
    if variant == "smem" and smem_chunks is None:
        raise HfEffllmError(
            f"variant='smem' needs power-of-two M/DSUB/K, a centroid of 2, 4 or 8 bytes and >= 16 columns per "
            f"chunk; got M={m}, DSUB={dsub}, K={k}, {elem_bytes}-byte elements, chunks={chunks}. Use variant='l1'."
        )
    if variant == "smem":
        bn = block_n or (16 if interp else (128 if rows == 16 else 64))  # 128 x 32 rows spills at D=128
        warps = num_warps or 8
    else:  # triton 3.6 fails to compile BLOCK_N=64 with ROWS >= 64 and DSUB=4 ("PassManager::run failed"): 32
        bn = block_n or (16 if interp else (16 if rows >= 128 and d >= 128 else (32 if d >= 128 or rows >= 64 else 64)))
        warps = num_warps or 4
    return variant, bn, warps, smem_chunks


def _default_variant(q, codes_k, codes_v, cbk, gq: int, lq: int, chunks: int | None) -> str:
    """The first variant of ``DEFAULT_ORDER`` that takes this call (``"l1"`` takes every shape)."""
    for v in DEFAULT_ORDER:
        if v == "smem":
            _, m, k, dsub = cbk.shape
            if _smem_chunks(m, dsub, k, q.element_size(), chunks) is not None:
                return v
        elif v == "cuda":
            if _cuda_module().supports(q, codes_k, codes_v, cbk, gq, lq) is None:
                return v
        else:
            return v
    return "l1"


_MILLION_CUDA = None


def _cuda_module():
    """:mod:`kernels.million_cuda`, imported on first use (it imports this module) and kept (no import machinery on
    the decode path)."""
    global _MILLION_CUDA
    if _MILLION_CUDA is None:
        from . import million_cuda

        _MILLION_CUDA = million_cuda
    return _MILLION_CUDA


def _num_splits(n: int, bh: int, block_n: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4
    max_splits = max(1, triton.cdiv(n, block_n))
    want = max(1, triton.cdiv(2 * sms, bh))  # about two programs per SM
    return min(max_splits, want, 256)


def million_attention(
    q: torch.Tensor,
    codes_k: torch.Tensor,
    codes_v: torch.Tensor,
    codebook_k: torch.Tensor,
    codebook_v: torch.Tensor,
    res_k: torch.Tensor | None,
    res_v: torch.Tensor | None,
    *,
    scale: float,
    code_mask: torch.Tensor | None = None,
    res_mask: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    use_kernel: bool | None = None,
    variant: str | None = None,
    chunks: int | None = None,
) -> torch.Tensor:
    """Decode attention over PQ codes + a full-precision window (Triton), same function as the reference.

    Args:
        q: ``(B, Hq, Lq, D)`` queries, float16/bfloat16 (float32 too, e.g. under the interpreter); ``Hq`` a
            multiple of ``Hkv``; ``GQ * Lq`` at most 128 (decode and short chunks).
        codes_k, codes_v: ``(B, Hkv, N, M)`` uint8 (views into a larger buffer are fine: last dim contiguous).
        codebook_k, codebook_v: ``(G, M, K, DSUB)`` in ``q``'s dtype; ``G`` is 1 or ``Hkv``.
        res_k, res_v: ``(B, Hkv, R, D)`` full-precision window in ``q``'s dtype, or None.
        scale: softmax scale.
        code_mask: ``(B, N)`` bool (True = attend), or None.
        res_mask: ``(B, Lq, R)`` bool (True = attend), or None.
        num_splits, block_n, num_warps: launch overrides (default: heuristics).
        use_kernel: force (True) or forbid (False) the Triton path; default: Triton where it can run.
        variant: which code kernel: ``"l1"`` gathers the centroids with per-lane loads from the L1-cached
            codebook, ``"smem"`` gathers packed centroid words from shared memory (``tl.gather``; needs
            ``DSUB * element bytes`` of 2, 4 or 8 and ``M / chunks * DSUB >= 16``), ``"cuda"`` is the CUDA
            kernel of :mod:`kernels.million_cuda` (compiled at run time; both tables in shared memory once per
            block; float16/bfloat16, DSUB 2 or 4, 256 centroids, ``GQ * Lq <= 16``; raises where it does not
            apply). None: the first variant of ``DEFAULT_ORDER`` that supports the call.
        chunks: smem variant only: subspace chunks (1, 2 or 4) gathered one after the other (default: 16
            subspaces per chunk).

    Returns:
        ``(B, Hq, Lq, D)`` in ``q.dtype``.

    Raises:
        HfEffllmError: on mismatched shapes, dtypes or devices.

    Example:
        >>> out = million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=q.shape[-1] ** -0.5)  # doctest: +SKIP
    """
    # One pass over the facts every check needs (the common valid call stops here); any failure runs the checks one
    # by one (_check_inputs), which raises the message of the first that fails.
    qs, cks, cbs = q.shape, codes_k.shape, codebook_k.shape
    dev, dtype = q.device, q.dtype
    ok = (
        len(qs) == 4 and len(cks) == 4 and len(cbs) == 4 and codes_k.dtype == torch.uint8
        and codes_v.dtype == torch.uint8 and codes_v.shape == cks and codebook_v.shape == cbs
        and dtype in _FLOAT_DTYPES and codebook_k.dtype == dtype and codebook_v.dtype == dtype
        and codes_k.device == dev and codes_v.device == dev and codebook_k.device == dev and codebook_v.device == dev
    )  # fmt: skip
    if ok:
        b, hq, lq, d = qs
        _, hkv, n, m = cks
        g, m2, k, dsub = cbs
        ok = cks[0] == b and hkv >= 1 and hq % hkv == 0 and m2 == m and m * dsub == d and (g == 1 or g == hkv)
    r = 0
    if ok and (res_k is not None or res_v is not None):
        rs = res_k.shape if res_k is not None else ()
        ok = (
            res_v is not None and len(rs) == 4 and res_v.shape == rs and rs[0] == b and rs[1] == hkv and rs[3] == d
            and res_k.dtype == dtype and res_v.dtype == dtype and res_k.device == dev and res_v.device == dev
        )  # fmt: skip
        r = rs[2] if ok else 0
    if ok and code_mask is not None:
        ok = code_mask.shape == (b, n) and code_mask.device == dev
    if ok and res_mask is not None:
        ok = res_mask.shape == (b, lq, r) and res_mask.device == dev
    if not ok:
        b, hq, lq, d, hkv, n, m, g, k, dsub, r = _check_inputs(
            q, codes_k, codes_v, codebook_k, codebook_v, res_k, res_v, code_mask, res_mask
        )
    if variant is not None and variant not in VARIANTS:
        raise HfEffllmError(f"variant={variant!r} is not known; use 'l1', 'smem', 'cuda' or None (default).")
    if chunks is not None and chunks not in (1, 2, 4):
        raise HfEffllmError(f"chunks={chunks} is not supported; use 1, 2 or 4 (or None for the default).")
    gq = hq // hkv
    rows = max(16, 1 << max(0, (gq * lq - 1).bit_length()))
    can = kernel_available(dev) and _pow2(m) and _pow2(dsub) and _pow2(d) and d >= 16 and rows <= 128
    if use_kernel is None:
        use_kernel = can
    if use_kernel and not can:
        raise HfEffllmError(
            f"the Triton path needs CUDA (or TRITON_INTERPRET=1), power-of-two M/DSUB/head_dim and GQ*Lq <= 128; "
            f"got device {q.device}, M={m}, DSUB={dsub}, D={d}, GQ*Lq={gq * lq}. Use use_kernel=False."
        )
    if not use_kernel:
        return million_attention_reference(
            q, codes_k, codes_v, codebook_k, codebook_v, res_k, res_v, scale=scale, code_mask=code_mask,
            res_mask=res_mask, path="decoded",
        )  # fmt: skip

    sq = q.stride()
    if sq[3] != 1:
        q = q.contiguous()
        sq = q.stride()
    cbk, cbv = codebook_k.contiguous(), codebook_v.contiguous()
    chosen = variant is None  # the default is only picked where it runs (no second check)
    if chosen:
        variant = _default_variant(q, codes_k, codes_v, cbk, gq, lq, chunks)
    if variant == "cuda":
        mc = _cuda_module()
        if mc.MERGE not in ("triton", "cuda"):  # before any launch
            raise HfEffllmError(f"million_cuda.MERGE={mc.MERGE!r} is not known; use 'triton' or 'cuda'.")
        why = None if chosen else mc.supports(q, codes_k, codes_v, cbk, gq, lq)
        if why is not None:
            raise HfEffllmError(f"variant='cuda' does not run here: {why}. Use variant='smem' or 'l1'.")
        splits, split_len = mc.split_plan(n, b * hkv, dev, num_splits)
    else:
        variant, bn, warps, smem_chunks = _launch_config(
            variant, rows, d, m, dsub, k, q.element_size(), _interpreting(), block_n, num_warps, chunks
        )
        splits = num_splits or (_num_splits(n, b * hkv, bn, dev) if n > 0 else 0)
        splits = min(splits, max(1, triton.cdiv(n, bn))) if n > 0 else 0
        if splits > 0:
            split_len = triton.cdiv(triton.cdiv(n, splits), bn) * bn
            splits = triton.cdiv(n, split_len)
    # the partials (output, max, sum per split and query row): three views of one buffer
    nparts = b * hkv * max(splits, 1) * rows
    part_o, part_m, part_l = torch.empty(nparts * (d + 2), dtype=torch.float32, device=dev).split_with_sizes(
        (nparts * d, nparts, nparts)
    )
    cm = _int8_mask(code_mask) if code_mask is not None else part_m  # dummy pointer when unused
    if splits > 0 and variant == "cuda":
        design = mc.design_for(gq * lq, cbv, split_len)
        mc.million_codes_cuda(
            q, codes_k, codes_v, *mc.kernel_tables(cbk, cbv, design),
            cm if code_mask is not None else None, part_o, part_m, part_l,
            n=n, split_len=split_len, splits=splits, scale=float(scale), hkv=hkv, gq=gq, lq=lq, per_head=g > 1,
            nwarps=num_warps, design=design,
        )  # fmt: skip
    elif splits > 0 and variant == "smem":
        sk, sv = codes_k.stride(), codes_v.stride()
        tk, tv = _packed_table(cbk), _packed_table(cbv)
        _million_codes_smem_kernel[(b * hkv, splits)](
            q, codes_k, codes_v, tk, tv, cm, part_o, part_m, part_l,
            n, split_len, splits, float(scale),
            sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2],
            tk.stride(0), cm.stride(0) if code_mask is not None else 0,
            HKV=hkv, GQ=gq, LQ=lq, ROWS=rows, D=d, M=m, DSUB=dsub, K=k, EBITS=8 * q.element_size(),
            NCH=smem_chunks, PER_HEAD=g > 1, HAS_MASK=code_mask is not None, BLOCK_N=bn, num_warps=warps,
            num_stages=1,
        )  # fmt: skip
    elif splits > 0:
        sk, sv = codes_k.stride(), codes_v.stride()
        _million_codes_kernel[(b * hkv, splits)](
            q, codes_k, codes_v, cbk, cbv, cm, part_o, part_m, part_l,
            n, split_len, splits, float(scale),
            sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2],
            cbk.stride(0), cm.stride(0) if code_mask is not None else 0,
            HKV=hkv, GQ=gq, LQ=lq, ROWS=rows, D=d, M=m, DSUB=dsub, K=k, PER_HEAD=g > 1,
            HAS_MASK=code_mask is not None, BLOCK_N=bn, num_warps=warps,
        )  # fmt: skip
    out = torch.empty(b, hq, lq, d, dtype=q.dtype, device=dev)
    if r > 0:
        rk = res_k if res_k.stride(-1) == 1 else res_k.contiguous()
        rv = res_v if res_v.stride(-1) == 1 else res_v.contiguous()
    else:  # dummies, never read (R = 0)
        rk = rv = q
    rm = _int8_mask(res_mask) if res_mask is not None else part_m
    if variant == "cuda" and mc.MERGE == "cuda":  # the merge through cuda_rt too (million_cuda.MERGE)
        mc.million_merge_cuda(
            q, rk, rv, rm if res_mask is not None else None, part_o, part_m, part_l, out,
            r=r, splits=splits, scale=float(scale), hkv=hkv, gq=gq, lq=lq,
        )  # fmt: skip
        return out
    srk, srv, so = rk.stride(), rv.stride(), out.stride()
    srm = rm.stride() if res_mask is not None else (0, 0)
    block_r = 16 if _interpreting() else 64  # read here only: the CUDA path does not need it
    _million_merge_kernel[(b * hkv,)](
        q, rk, rv, rm, part_o, part_m, part_l, out,
        r, splits, float(scale),
        sq[0], sq[1], sq[2], srk[0], srk[1], srk[2], srv[0], srv[1], srv[2], srm[0], srm[1], so[0], so[1], so[2],
        HKV=hkv, GQ=gq, LQ=lq, ROWS=rows, D=d, HAS_RMASK=res_mask is not None, BLOCK_R=block_r,
        num_warps=(None if variant == "cuda" else num_warps) or 4,  # the cuda variant's warps may be 12
    )  # fmt: skip
    return out


def _check_inputs(
    q: torch.Tensor,
    codes_k: torch.Tensor,
    codes_v: torch.Tensor,
    codebook_k: torch.Tensor,
    codebook_v: torch.Tensor,
    res_k: torch.Tensor | None,
    res_v: torch.Tensor | None,
    code_mask: torch.Tensor | None,
    res_mask: torch.Tensor | None,
) -> tuple[int, ...]:
    """:func:`million_attention`'s input checks one by one (raising the message of the first that fails); returns
    ``(B, Hq, Lq, D, Hkv, N, M, G, K, DSUB, R)``."""
    if q.dim() != 4:
        raise HfEffllmError(f"q must be (B, Hq, Lq, D); got shape {tuple(q.shape)}.")
    b, hq, lq, d = q.shape
    for name, c in (("codes_k", codes_k), ("codes_v", codes_v)):
        if c.dim() != 4 or c.dtype != torch.uint8:
            raise HfEffllmError(f"{name} must be a uint8 (B, Hkv, N, M) tensor; got {c.dtype} {tuple(c.shape)}.")
    if codes_k.shape != codes_v.shape:
        raise HfEffllmError(f"codes_k {tuple(codes_k.shape)} and codes_v {tuple(codes_v.shape)} differ.")
    _, hkv, n, m = codes_k.shape
    if codes_k.shape[0] != b:
        raise HfEffllmError(f"codes have batch {codes_k.shape[0]} but q has batch {b}.")
    if hkv < 1 or hq % hkv:
        raise HfEffllmError(f"query heads {hq} are not a multiple of KV heads {hkv}.")
    _check_codebook("codebook_k", codebook_k)
    _check_codebook("codebook_v", codebook_v)
    if codebook_k.shape != codebook_v.shape:
        raise HfEffllmError(f"codebook_k {tuple(codebook_k.shape)} and codebook_v {tuple(codebook_v.shape)} differ.")
    g, m2, k, dsub = codebook_k.shape
    if m2 != m or m * dsub != d:
        raise HfEffllmError(f"codebooks (M={m2}, DSUB={dsub}) do not match codes M={m} and head_dim={d}.")
    if g not in (1, hkv):
        raise HfEffllmError(f"codebooks have {g} groups; use 1 or the number of KV heads ({hkv}).")
    if (res_k is None) != (res_v is None):
        raise HfEffllmError("give both res_k and res_v, or neither.")
    if res_k is not None and (
        res_k.dim() != 4 or res_k.shape != res_v.shape or tuple(res_k.shape[:2]) != (b, hkv) or res_k.shape[3] != d
    ):
        raise HfEffllmError(f"res_k/res_v must be (B={b}, Hkv={hkv}, R, D={d}); got {tuple(res_k.shape)}.")
    r = 0 if res_k is None else res_k.shape[2]
    if code_mask is not None and tuple(code_mask.shape) != (b, n):
        raise HfEffllmError(f"code_mask must be (B, N) = {(b, n)}; got {tuple(code_mask.shape)}.")
    if res_mask is not None and tuple(res_mask.shape) != (b, lq, r):
        raise HfEffllmError(f"res_mask must be (B, Lq, R) = {(b, lq, r)}; got {tuple(res_mask.shape)}.")
    tensors = [
        t for t in (codes_k, codes_v, codebook_k, codebook_v, res_k, res_v, code_mask, res_mask) if t is not None
    ]
    if any(t.device != q.device for t in tensors):
        raise HfEffllmError(f"all inputs must be on q's device {q.device}.")
    if q.dtype not in _FLOAT_DTYPES:
        raise HfEffllmError(f"q.dtype={q.dtype} is not supported; use float16, bfloat16 or float32.")
    for name, t in (("codebook_k", codebook_k), ("codebook_v", codebook_v), ("res_k", res_k), ("res_v", res_v)):
        if t is not None and t.dtype != q.dtype:
            raise HfEffllmError(f"{name}.dtype={t.dtype} differs from q.dtype={q.dtype}; cast them to one dtype.")
    return b, hq, lq, d, hkv, n, m, g, k, dsub, r


def _int8_mask(mask: torch.Tensor) -> torch.Tensor:
    """A mask as the kernels read it: contiguous int8, nonzero = attend. A bool mask is reinterpreted in place (the
    same bytes, 0 / 1: no copy and no kernel launch on the decode path), any other dtype converted."""
    return (mask.view(torch.int8) if mask.dtype == torch.bool else mask.to(torch.int8)).contiguous()


def ideal_bytes(batch: int, kv_heads: int, tokens: int, head_dim: int, num_subspaces: int, nbits: int = 8) -> dict:
    """HBM bytes one decode step must read: PQ codes (K and V) against bf16 K/V, and their ratio."""
    code_bytes = 2 * batch * kv_heads * tokens * math.ceil(num_subspaces * nbits / 8)
    bf16_bytes = 2 * batch * kv_heads * tokens * head_dim * 2
    return {"code_bytes": code_bytes, "bf16_bytes": bf16_bytes, "ratio": bf16_bytes / max(1, code_bytes)}
