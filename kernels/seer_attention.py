"""Block-sparse causal attention (SeerAttention prefill): Triton kernel, host wrapper and PyTorch reference.

The attention map is cut into ``block_size x block_size`` tiles; a boolean ``block_mask`` of shape
``(B, Hm, nqb, nkb)`` says which key blocks each query block attends to (``Hm`` is the number of query heads or
of KV heads: a mask per KV head is shared by its GQA group). The kernel turns the mask into a compact, sorted list
of kept key-block indices per query block (:func:`build_block_index_triton`, one launch, no sort or host sync;
:func:`build_block_index` is its PyTorch version) and each program loops over that list only,
so the work is proportional to the kept blocks. Causal masking is applied inside the diagonal block only, a key
padding mask (``key_padding``, True = real token) handles batches of different lengths, and the last block may be
partial. K/V are indexed per KV head (``h // group``) and never repeated.

Example:
    >>> from hf_effllm.kernels.seer_attention import block_sparse_attention
    >>> out = block_sparse_attention(q, k, v, block_mask)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os

import torch

from hf_effllm.errors import HfEffllmError

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a Linux dependency
    HAS_TRITON = False

SUPPORTED_BLOCK_SIZES: tuple[int, ...] = (16, 32, 64, 128)
_REFERENCE_CHUNK_ELEMENTS = 1 << 24


def triton_usable(device: torch.device) -> bool:
    """True when the Triton kernels can run on ``device`` (CUDA, or the CPU under ``TRITON_INTERPRET=1``)."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    key_padding: torch.Tensor | None,
    name: str,
) -> tuple[int, int, int, int, int]:
    """Validate ``q (B, Hq, S, D)``, ``k``/``v (B, Hkv, S, D)`` for a causal self-attention kernel.

    Returns:
        ``(B, Hq, Hkv, S, D)``.

    Raises:
        HfEffllmError: naming the bad argument and what would work.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise HfEffllmError(
            f"{name}: q, k, v must be 4-D (batch, heads, seq, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}."
        )
    b, hq, s, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise HfEffllmError(
            f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} must be (batch={b}, kv_heads, seq={s}, "
            f"head_dim={d}) like q {tuple(q.shape)} (causal self-attention over the same tokens)."
        )
    hkv = k.shape[1]
    if hkv < 1 or hq % hkv:
        raise HfEffllmError(f"{name}: query heads {hq} must be a multiple of KV heads {hkv} (GQA).")
    if not (q.dtype == k.dtype == v.dtype):
        raise HfEffllmError(f"{name}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); use one dtype.")
    if not (q.device == k.device == v.device):
        raise HfEffllmError(f"{name}: q, k, v are on different devices ({q.device}, {k.device}, {v.device}).")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise HfEffllmError(f"{name}: block_size={block_size} is not supported; use one of {SUPPORTED_BLOCK_SIZES}.")
    if key_padding is not None and (key_padding.shape != (b, s) or key_padding.dtype != torch.bool):
        raise HfEffllmError(
            f"{name}: key_padding must be a bool tensor of shape (batch={b}, seq={s}); got "
            f"{key_padding.dtype} {tuple(key_padding.shape)}."
        )
    if key_padding is not None and key_padding.device != q.device:
        raise HfEffllmError(f"{name}: key_padding is on {key_padding.device}, q on {q.device}; move it to q's device.")
    return b, hq, hkv, s, d


def _check_triton_inputs(q: torch.Tensor, name: str) -> None:
    if not triton_usable(q.device):
        raise HfEffllmError(
            f"{name}: the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1 on the CPU); q is on {q.device}. "
            "Use the *_reference function on the CPU."
        )
    allowed = (torch.float16, torch.bfloat16, torch.float32)
    if q.dtype not in allowed:
        raise HfEffllmError(f"{name}: dtype {q.dtype} is not supported; use one of {allowed}.")
    if q.shape[-1] > 256:
        raise HfEffllmError(f"{name}: head_dim={q.shape[-1]} is too large for the kernel; use <= 256.")


def build_block_index(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact list of kept key blocks per query block.

    Args:
        block_mask: bool ``(B, Hm, nqb, nkb)``.

    Returns:
        ``(index, count)``: ``index`` int32 ``(B, Hm, nqb, nkb)`` holding, per row, the kept key-block indices in
        ascending order first (the rest is padding), and ``count`` int32 ``(B, Hm, nqb)``.
    """
    nkb = block_mask.shape[-1]
    # Kept blocks get their own index as key, dropped ones nkb + index: one sort puts kept blocks first, ascending.
    ar = torch.arange(nkb, device=block_mask.device, dtype=torch.int32)
    key = torch.where(block_mask, ar, ar + nkb)
    index = torch.sort(key, dim=-1).values
    count = block_mask.sum(-1, dtype=torch.int32)
    index = torch.where(index >= nkb, index - nkb, index).to(torch.int32).contiguous()
    return index, count.contiguous()


_CAUSAL_CACHE: dict[tuple[int, torch.device], torch.Tensor] = {}


def causal_block_mask(nb: int, device: torch.device) -> torch.Tensor:
    """Cached lower-triangular bool ``(nb, nb)`` (read-only: never modify it in place)."""
    key = (nb, torch.device(device))
    mask = _CAUSAL_CACHE.get(key)
    if mask is None:
        if len(_CAUSAL_CACHE) >= 64:
            _CAUSAL_CACHE.clear()
        with torch.inference_mode(False):  # a normal tensor, usable later with autograd
            mask = _CAUSAL_CACHE[key] = torch.ones(nb, nb, dtype=torch.bool, device=device).tril()
    return mask


if HAS_TRITON:

    @triton.jit
    def _block_index_kernel(
        MASK, IDX, CNT, stride_mb, stride_mh, stride_mq, stride_mk, H, NKB,
        NKB_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    ):  # fmt: skip
        # One program per (batch, head, query block): stream compaction of the row with a prefix sum.
        qb = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        kb = tl.arange(0, NKB_PAD)
        ok = kb < NKB
        if CAUSAL:
            ok = ok & (kb <= qb)
        m = tl.load(MASK + b * stride_mb + h * stride_mh + qb * stride_mq + kb * stride_mk, mask=ok, other=0)
        keep = (m != 0).to(tl.int32)
        pos = tl.cumsum(keep, 0) - 1
        row = (bh * tl.num_programs(0) + qb).to(tl.int64)
        tl.store(IDX + row * NKB + pos, kb, mask=keep != 0)
        tl.store(CNT + row, tl.sum(keep, 0))


def build_block_index_triton(block_mask: torch.Tensor, *, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`build_block_index` of ``block_mask`` (``& causal`` when ``causal``) in one Triton launch.

    The mask may be a broadcast view (stride 0); only the first ``count`` entries of each index row are defined
    (the rest is left uninitialised). Used by :func:`block_sparse_attention` on CUDA: no sort, no host sync.

    Args:
        block_mask: bool ``(B, Hm, nqb, nkb)`` on a device the Triton kernels can use.
        causal: drop key blocks above the diagonal (``kb > qb``).

    Returns:
        ``(index, count)`` as :func:`build_block_index` (int32, contiguous).
    """
    if block_mask.dtype != torch.bool or block_mask.dim() != 4:
        raise HfEffllmError(
            f"build_block_index_triton: block_mask must be a 4-D bool tensor; got {block_mask.dtype} "
            f"{block_mask.dim()}-D."
        )
    if not triton_usable(block_mask.device):
        raise HfEffllmError(
            f"build_block_index_triton: block_mask is on {block_mask.device}; the kernel needs CUDA (or "
            "TRITON_INTERPRET=1). Use build_block_index on the CPU."
        )
    b, h, nqb, nkb = block_mask.shape
    index = torch.empty(b, h, nqb, nkb, dtype=torch.int32, device=block_mask.device)
    count = torch.empty(b, h, nqb, dtype=torch.int32, device=block_mask.device)
    if index.numel() == 0:
        return index, count.zero_()
    m = block_mask.view(torch.uint8)
    _block_index_kernel[(nqb, b * h)](
        m, index, count, m.stride(0), m.stride(1), m.stride(2), m.stride(3), h, nkb,
        NKB_PAD=max(16, triton.next_power_of_2(nkb)), CAUSAL=causal, num_warps=4,
    )  # fmt: skip
    return index, count


def _mask_heads(block_mask: torch.Tensor, b: int, hq: int, hkv: int, nb: int, name: str) -> int:
    if block_mask.dtype != torch.bool or block_mask.dim() != 4:
        raise HfEffllmError(
            f"{name}: block_mask must be a 4-D bool tensor; got {block_mask.dtype} {block_mask.dim()}-D."
        )
    hm = block_mask.shape[1]
    if block_mask.shape[0] != b or block_mask.shape[2:] != (nb, nb) or hm not in (hq, hkv):
        raise HfEffllmError(
            f"{name}: block_mask shape {tuple(block_mask.shape)} must be (batch={b}, heads={hq} or {hkv}, {nb}, {nb})."
        )
    return hm


def _heads_per_program(requested: int | None, hq: int, hkv: int, hm: int, device: torch.device, name: str) -> int:
    group = hq // hkv
    if requested is None:
        return 2 if (device.type == "cuda" and group % 2 == 0 and hm == hkv) else 1
    if requested < 1 or group % requested or requested & (requested - 1) or (requested > 1 and hm != hkv):
        raise HfEffllmError(
            f"{name}: heads_per_program={requested} must be a power of two dividing the GQA group size {group} "
            "(and be 1 when the mask has one entry per query head)."
        )
    return requested


if HAS_TRITON:

    @triton.jit
    def _online_max(m_i, r):
        # Online-softmax step for tile row maxima r (log2 space): (m_new, m_safe, alpha) with m_safe = m_new where
        # -inf (no key seen yet) reads 0, and alpha the factor that rescales sums built against m_i to m_safe.
        # (A lazy rescale, moving the max only when some row grew by more than 8 as FlashAttention-4 does, ran
        # 10-30% slower in every configuration of the H200 block-max sweep of 2026-11-29: a data-dependent branch
        # in the loop.)
        m_new = tl.maximum(m_i, r)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        return m_new, m_safe, tl.math.exp2(m_i - m_safe)

    @triton.jit
    def _tile_scores(
        q, K, V, kb, offs_m, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, S, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_PAD: tl.constexpr, DIAG: tl.constexpr, SCALED: tl.constexpr,
    ):  # fmt: skip
        # Key block kb's scores Q K^T (times qk_scale when SCALED; -inf where a key may not be seen: padding, and on
        # the diagonal block (DIAG) keys after the query or past S) and its V tile. Blocks below the diagonal are full.
        offs_k = kb * BLOCK + offs_n
        dmask = offs_d < HEAD_DIM
        if DIAG:
            kmask = offs_k < S
            k = tl.load(
                K + offs_k[None, :] * stride_ks + offs_d[:, None], mask=kmask[None, :] & dmask[:, None], other=0.0
            )
            v = tl.load(
                V + offs_k[:, None] * stride_vs + offs_d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0
            )
        else:
            k = tl.load(K + offs_k[None, :] * stride_ks + offs_d[:, None], mask=dmask[:, None], other=0.0)
            v = tl.load(V + offs_k[:, None] * stride_vs + offs_d[None, :], mask=dmask[None, :], other=0.0)
        s = tl.dot(q, k)
        if SCALED:
            s = s * qk_scale
        if DIAG:
            valid = (offs_k[None, :] <= offs_m[:, None]) & (offs_k[None, :] < S)
            if HAS_PAD:
                pad = tl.load(pad_ptr + offs_k, mask=offs_k < S, other=0)
                valid = valid & (pad[None, :] != 0)
            s = tl.where(valid, s, float("-inf"))
        elif HAS_PAD:
            pad = tl.load(pad_ptr + offs_k)
            s = tl.where(pad[None, :] != 0, s, float("-inf"))
        return s, v

    @triton.jit
    def _seer_block(
        q, acc, m_i, l_i, K, V, kb, offs_m, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, S, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_PAD: tl.constexpr, DIAG: tl.constexpr,
        FOLD_SCALE: tl.constexpr, TILE_LSE: tl.constexpr = False,
    ):  # fmt: skip
        # TILE_LSE: the fourth result is the tile's row log-sum-exp (log2 space, log2 sum_j 2^s_ij) instead of its row
        # max (the block-mass map needs it).
        # FOLD_SCALE: scale the row max instead of the tile and fold the scale into the exponent (one FMA per
        # score instead of a multiply and a subtract; max(s) * c == max(s * c) exactly for c > 0). Same results up
        # to rounding; which is faster depends on register pressure (benchmarks/seer_speed.py sweeps it).
        s, v = _tile_scores(
            q, K, V, kb, offs_m, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, S, qk_scale,
            HEAD_DIM, BLOCK, HAS_PAD, DIAG, not FOLD_SCALE,
        )  # fmt: skip
        # The tile's row max (log2 space, masked) is returned too: the block-max kernel stores it, the block-sparse
        # kernel drops it (dead code, eliminated by the compiler).
        r = tl.max(s, 1)
        if FOLD_SCALE:
            r = r * qk_scale
        m_new, m_safe, alpha = _online_max(m_i, r)
        if FOLD_SCALE:
            p = tl.math.exp2(s * qk_scale - m_safe[:, None])
        else:
            p = tl.math.exp2(s - m_safe[:, None])
        ps = tl.sum(p, 1)
        l_i = l_i * alpha + ps
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        if TILE_LSE:  # rows with no valid key in this tile: log2(0) = -inf, i.e. zero mass
            r = m_safe + tl.math.log2(ps)
        return acc, m_new, l_i, r

    @triton.jit
    def _seer_fwd_kernel(
        Q, K, V, Out, IDX, CNT, PAD,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_os, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch, stride_pb,
        H, S, qk_scale,
        GROUP: tl.constexpr, MASK_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK: tl.constexpr, HAS_PAD: tl.constexpr, HP: tl.constexpr,
    ):  # fmt: skip
        # One program: one query block of HP query heads of the same KV group (HP * BLOCK rows), so K/V tiles
        # are loaded once for HP heads and the tensor-core tiles are taller; the heads share one kept-block list.
        qb = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // (H // HP)).to(tl.int64)  # 64-bit: b * stride_qb passes 2^31 at batch 4, 128k, 32 heads
        h0 = (bh % (H // HP)) * HP
        kvh = h0 // GROUP
        mh = h0 // MASK_GROUP
        rows = tl.arange(0, HP * BLOCK)
        hh = h0 + rows // BLOCK
        offs_m = qb * BLOCK + rows % BLOCK
        offs_n = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D_PAD)
        dmask = offs_d < HEAD_DIM
        q_ptrs = Q + b * stride_qb + hh[:, None] * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < S) & dmask[None, :], other=0.0)
        Kh = K + b * stride_kb + kvh * stride_kh
        Vh = V + b * stride_vb + kvh * stride_vh
        pad_ptr = PAD + b * stride_pb
        m_i = tl.full([HP * BLOCK], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([HP * BLOCK], dtype=tl.float32)
        acc = tl.zeros([HP * BLOCK, D_PAD], dtype=tl.float32)
        cnt = tl.load(CNT + b * stride_cb + mh * stride_ch + qb)
        idx_ptr = IDX + b * stride_ib + mh * stride_ih + qb * stride_iq
        last = tl.load(idx_ptr + tl.maximum(cnt - 1, 0))
        has_diag = (cnt > 0) & (last == qb)
        n_full = cnt - has_diag.to(tl.int32)
        # Off-diagonal kept blocks (ascending, all below the diagonal): full tiles, no causal mask needed.
        for i in range(0, n_full):
            kb = tl.load(idx_ptr + i)
            acc, m_i, l_i, _ = _seer_block(
                q, acc, m_i, l_i, Kh, Vh, kb, offs_m, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, S, qk_scale,
                HEAD_DIM, BLOCK, HAS_PAD, False, False,
            )  # fmt: skip
        if has_diag:
            acc, m_i, l_i, _ = _seer_block(
                q, acc, m_i, l_i, Kh, Vh, qb, offs_m, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, S, qk_scale,
                HEAD_DIM, BLOCK, HAS_PAD, True, False,
            )  # fmt: skip
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        o_ptrs = Out + b * stride_ob + hh[:, None] * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < S) & dmask[None, :])


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    block_size: int = 64,
    num_warps: int | None = None,
    num_stages: int | None = None,
    heads_per_program: int | None = None,
    block_index: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal block-sparse attention with the Triton kernel (forward only).

    Args:
        q: ``(B, Hq, S, D)`` query states (after RoPE), fp16/bf16 (fp32 accepted, e.g. for the interpreter).
        k: ``(B, Hkv, S, D)`` key states; ``Hq`` must be a multiple of ``Hkv`` (GQA, K/V are not repeated).
        v: ``(B, Hkv, S, D)`` value states.
        block_mask: bool ``(B, Hq or Hkv, nb, nb)`` with ``nb = ceil(S / block_size)``: kept blocks. Blocks above
            the diagonal are ignored (causal).
        scale: softmax scale, default ``D ** -0.5``.
        key_padding: optional bool ``(B, S)``, True for real tokens; padded keys are never attended to.
        block_size: tile size of the mask (16, 32, 64 or 128).
        num_warps: Triton launch option (default 4 for D <= 64, else 8).
        num_stages: Triton launch option (default 3).
        heads_per_program: query heads of one KV group handled by one program (1, 2, 4, ...; they share K/V
            loads). Needs a mask per KV head when > 1. Default: 2 on CUDA when possible, else 1.
        block_index: ``build_block_index(block_mask & causal)`` computed beforehand (it is then not rebuilt;
            ``block_mask`` only gives the shape).

    Returns:
        ``(B, Hq, S, D)`` attention output in ``q``'s dtype. Rows that see no key get zeros.

    Example:
        >>> out = block_sparse_attention(q, k, v, mask, key_padding=attention_mask.bool())  # doctest: +SKIP
    """
    name = "block_sparse_attention"
    b, hq, hkv, s, d = check_attention_inputs(q, k, v, block_size=block_size, key_padding=key_padding, name=name)
    _check_triton_inputs(q, name)
    nb = math.ceil(s / block_size)
    hm = _mask_heads(block_mask, b, hq, hkv, nb, name)
    if block_mask.device != q.device:
        raise HfEffllmError(f"{name}: block_mask is on {block_mask.device}, q on {q.device}; move it to q's device.")
    if block_index is None:
        index, count = build_block_index_triton(block_mask, causal=True)
    else:
        index, count = block_index
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    pad = key_padding.contiguous().view(torch.uint8) if key_padding is not None else count  # dummy pointer when absent
    scale = d**-0.5 if scale is None else float(scale)
    d_pad = max(16, triton.next_power_of_2(d))
    hp = _heads_per_program(heads_per_program, hq, hkv, hm, q.device, name)
    grid = (nb, b * hq // hp)
    _seer_fwd_kernel[grid](
        q, k, v, out, index, count, pad,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        index.stride(0), index.stride(1), index.stride(2), count.stride(0), count.stride(1),
        pad.stride(0) if key_padding is not None else 0,
        hq, s, scale * 1.4426950408889634,
        GROUP=hq // hkv, MASK_GROUP=hq // hm, HEAD_DIM=d, D_PAD=d_pad, BLOCK=block_size,
        HAS_PAD=key_padding is not None, HP=hp,
        num_warps=num_warps or (4 if d_pad <= 64 else 8), num_stages=num_stages or 3,
    )  # fmt: skip
    return out


def _expand_block_mask(block_mask: torch.Tensor, hkv: int, group: int) -> torch.Tensor:
    """``(B, Hm, ...)`` -> ``(B, Hkv, G or 1, ...)`` so it broadcasts against grouped query heads."""
    b, hm = block_mask.shape[:2]
    if hm == hkv:
        return block_mask[:, :, None]
    return block_mask.reshape(b, hkv, group, *block_mask.shape[2:])


def _chunk_rows(b: int, hq: int, s: int, block_size: int) -> int:
    per_row = max(1, b * hq * s)
    return max(block_size, (_REFERENCE_CHUNK_ELEMENTS // per_row) // block_size * block_size)


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor | None,
    *,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    block_size: int = 64,
) -> torch.Tensor:
    """Plain PyTorch version of :func:`block_sparse_attention` (same arguments; ``block_mask=None`` = dense causal).

    Same algorithm as the kernel: the kept key blocks of each query block are gathered from the compact index and
    only those are scored, in float32, a chunk of query blocks at a time, so time and memory follow the kept blocks
    (``O(chunk x kept keys)``, never ``O(S^2)`` per head). Used by the tests, as the CPU path of the model, and as
    the benchmark baseline.
    """
    name = "block_sparse_attention_reference"
    b, hq, hkv, s, d = check_attention_inputs(q, k, v, block_size=block_size, key_padding=key_padding, name=name)
    nb = math.ceil(s / block_size)
    g = hq // hkv
    dev = q.device
    if block_mask is None:
        block_mask = torch.ones(b, hkv, nb, nb, dtype=torch.bool, device=dev)
    hm = _mask_heads(block_mask, b, hq, hkv, nb, name)
    index, count = build_block_index(block_mask.to(dev) & causal_block_mask(nb, dev))
    kmax = max(1, int(count.max()))
    index, slot_ok = index[..., :kmax].long(), torch.arange(kmax, device=dev) < count[..., None]
    gq = g if hm == hkv else 1  # query heads sharing one mask head
    scale = d**-0.5 if scale is None else float(scale)
    tail = nb * block_size - s

    def blocks(t: torch.Tensor) -> torch.Tensor:  # (B, Hkv, S, D) -> (B, Hm, nb, bs * D), float32
        t = torch.nn.functional.pad(t.float(), (0, 0, 0, tail)).reshape(b, hkv, nb, block_size * d)
        return t if hm == hkv else t.repeat_interleave(g, dim=1)

    kb_, vb_ = blocks(k), blocks(v)
    # (B, Hm, nb, Gq * bs, D): the query rows that share one mask head and one query block, side by side.
    qv = torch.nn.functional.pad(q, (0, 0, 0, tail)).reshape(b, hm, gq, nb, block_size, d).transpose(2, 3)
    pad_ok = None
    if key_padding is not None:
        pad_ok = torch.nn.functional.pad(key_padding.to(dev), (0, tail), value=False)
    out = torch.empty(b, hm, nb, gq, block_size, d, dtype=q.dtype, device=dev)
    ar = torch.arange(block_size, device=dev)
    per_qblock = b * hq * block_size * kmax * block_size
    step = max(1, _REFERENCE_CHUNK_ELEMENTS // per_qblock)
    for c0 in range(0, nb, step):
        c1 = min(nb, c0 + step)
        c = c1 - c0
        gi = index[:, :, c0:c1]  # (B, Hm, c, kmax)
        flat = gi.reshape(b, hm, c * kmax, 1).expand(-1, -1, -1, block_size * d)
        kg = torch.gather(kb_, 2, flat).view(b, hm, c, kmax * block_size, d)
        vg = torch.gather(vb_, 2, flat).view(b, hm, c, kmax * block_size, d)
        kpos = (gi[..., None] * block_size + ar).view(b, hm, c, 1, kmax * block_size)
        qpos = (torch.arange(c0, c1, device=dev)[:, None] * block_size + ar).view(1, 1, c, block_size, 1)
        ok = slot_ok[:, :, c0:c1, :, None].expand(-1, -1, -1, -1, block_size).reshape(b, hm, c, 1, -1)
        ok = ok & (kpos <= qpos) & (kpos < s)
        if pad_ok is not None:
            ok = ok & torch.gather(pad_ok, 1, kpos.reshape(b, -1)).view(b, hm, c, 1, -1)
        # A large finite negative instead of -inf keeps fully masked (padding) rows finite, also in backward.
        bias = torch.zeros(ok.shape, dtype=torch.float32, device=dev).masked_fill_(~ok, -1e30)[:, :, :, None]
        row_ok = ok.any(-1, keepdim=True)[:, :, :, None]
        # Query heads of a group stacked as rows: one batched matmul per (batch, mask head, query block).
        qc = qv[:, :, c0:c1].reshape(b, hm, c, gq * block_size, d).float()
        sc = torch.matmul(qc, kg.transpose(-1, -2)).mul_(scale)
        sc = sc.view(b, hm, c, gq, block_size, -1).add_(bias)
        p = (torch.softmax(sc, dim=-1) * row_ok).view(b, hm, c, gq * block_size, -1)
        out[:, :, c0:c1] = torch.matmul(p, vg).view(b, hm, c, gq, block_size, d).to(q.dtype)
    return out.transpose(2, 3).reshape(b, hq, nb * block_size, d)[:, :, :s]
