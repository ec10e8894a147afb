"""Block statistics of the true attention map: the distillation targets of the gates and the ``oracle`` diagnostic.

SeerAttention (paper) distils its gates towards the 2D max-pooled attention map (``target="max"``, computed by the
one-pass Triton kernel :func:`hf_effllm.kernels.seer_blockmax.blockmax_attention`). ``target="mass"`` uses the
attention *mass* of each 64x64 tile instead (the sum of its softmax probabilities): the share of each query block's
attention that dropping the tile would lose, which is what block-sparse attention's error depends on. Both maps are
reduced over the query heads of a KV group (the gate scores KV heads) and normalised to sum 1 per block row.

:func:`block_attention_map` is the plain PyTorch computation (the CPU path and the reference; on CUDA the same
one-pass Triton kernel computes either map, ``blockmax_attention(..., stat="mass")``), a chunk of query rows at a time (memory
``O(chunk x S)``, never the dense ``S x S`` map per head); it also returns the attention output, so the distillation
forward computes attention once.
"""

from __future__ import annotations

import math

import torch

from ...errors import HfEffllmError
from ...kernels.seer_attention import check_attention_inputs
from .config import GROUP_REDUCTIONS, TARGET_STATS

_CHUNK_ELEMENTS = 1 << 26  # scores of one chunk of query rows (float32): 256 MB


def block_attention_map(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    stat: str = "mass",
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    block_size: int = 64,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Causal attention output and a per-tile statistic of its probabilities, per query head.

    Args:
        q: ``(B, Hq, S, D)`` queries (after RoPE).
        k: ``(B, Hkv, S, D)`` keys (``Hq`` a multiple of ``Hkv``).
        v: ``(B, Hkv, S, D)`` values, or None to skip the output.
        stat: ``"mass"`` (sum of the probabilities in each ``block_size`` x ``block_size`` tile) or ``"max"``
            (their maximum, the paper's target).
        scale: softmax scale, default ``D ** -0.5``.
        key_padding: optional bool ``(B, S)``, True for real tokens.
        block_size: tile size.

    Returns:
        ``(out, block_map)``: ``out`` ``(B, Hq, S, D)`` in ``q``'s dtype (None without ``v``) and ``block_map``
        float32 ``(B, Hq, nb, nb)``, zero above the diagonal; not normalised.

    Example:
        >>> out, mass = block_attention_map(q, k, v, stat="mass")  # doctest: +SKIP
        >>> target = reduce_target(mass, num_kv_heads=k.shape[1], group_reduce="mean")  # doctest: +SKIP
    """
    if stat not in TARGET_STATS:
        raise HfEffllmError(f"stat={stat!r} is unknown; use one of {list(TARGET_STATS)}.")
    b, hq, hkv, s, d = check_attention_inputs(
        q, k, k if v is None else v, block_size=block_size, key_padding=key_padding, name="block_attention_map"
    )
    g = hq // hkv
    nb = math.ceil(s / block_size)
    scale = d**-0.5 if scale is None else float(scale)
    out = None if v is None else torch.empty(b, hq, s, d, dtype=q.dtype, device=q.device)
    bmap = torch.zeros(b, hq, nb, nb, dtype=torch.float32, device=q.device)
    qg = q.reshape(b, hkv, g, s, d)
    rows = max(block_size, (_CHUNK_ELEMENTS // max(1, b * hq * s)) // block_size * block_size)
    pos = torch.arange(s, device=q.device)
    for start in range(0, s, rows):
        end = min(s, start + rows)
        sc = torch.matmul(qg[:, :, :, start:end].float(), k[:, :, None, :end].float().transpose(-1, -2)) * scale
        allowed = pos[start:end, None] >= pos[None, :end]
        if key_padding is not None:
            allowed = allowed & key_padding[:, None, None, None, :end].to(q.device)
        p = torch.softmax(sc.masked_fill_(~allowed, float("-inf")), dim=-1).nan_to_num_(0.0)
        del sc
        if out is not None:
            o = torch.matmul(p, v[:, :, None, :end].float())
            out[:, :, start:end] = o.reshape(b, hq, end - start, d).to(q.dtype)
        qb0, qb1 = start // block_size, math.ceil(end / block_size)
        extra_k, extra_q = qb1 * block_size - end, (qb1 - qb0) * block_size - (end - start)
        pp = torch.nn.functional.pad(p, (0, extra_k, 0, extra_q)) if extra_k or extra_q else p
        pp = pp.reshape(b, hkv, g, qb1 - qb0, block_size, qb1, block_size)
        red = pp.sum(dim=(-3, -1)) if stat == "mass" else pp.amax(dim=(-3, -1))
        bmap[:, :, qb0:qb1, :qb1] = red.reshape(b, hq, qb1 - qb0, qb1)
    return out, bmap


def reduce_target(block_map: torch.Tensor, num_kv_heads: int, group_reduce: str = "max") -> torch.Tensor:
    """Per-KV-head target ``(B, Hkv, nb, nb)`` from a per-query-head block map, normalised to sum 1 per block row.

    Args:
        block_map: ``(B, Hq, nb, nb)`` non-negative block statistic (block max or block mass).
        num_kv_heads: KV heads; the ``Hq / Hkv`` query heads of each group are combined.
        group_reduce: ``"max"`` or ``"mean"`` over the group.

    Returns:
        float32 ``(B, Hkv, nb, nb)``; rows without any mass stay zero.
    """
    if group_reduce not in GROUP_REDUCTIONS:
        raise HfEffllmError(f"group_reduce={group_reduce!r} is unknown; use one of {list(GROUP_REDUCTIONS)}.")
    b, hq, nb, _ = block_map.shape
    if hq % num_kv_heads:
        raise HfEffllmError(f"block map has {hq} heads, not a multiple of num_kv_heads={num_kv_heads}.")
    t = block_map.float().view(b, num_kv_heads, hq // num_kv_heads, nb, nb)
    t = t.amax(2) if group_reduce == "max" else t.mean(2)
    return t / t.sum(-1, keepdim=True).clamp_min(1e-30)
