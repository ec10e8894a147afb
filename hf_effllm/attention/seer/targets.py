"""Block statistics of the true attention map: the distillation targets of the gates and the ``oracle`` diagnostic.

SeerAttention (paper) distils its gates towards the 2D max-pooled attention map (``target="max"``, computed by the
one-pass Triton kernel :func:`hf_effllm.kernels.seer_blockmax.blockmax_attention`). ``target="mass"`` uses the
attention *mass* of each 64x64 tile instead (the sum of its softmax probabilities): the share of each query block's
attention that dropping the tile would lose, which is what block-sparse attention's error depends on. Both maps are
reduced over the query heads of a KV group (the gate scores KV heads) and normalised to sum 1 per block row.

:func:`block_attention_map` is the plain PyTorch computation (the CPU path; on CUDA the one-pass Triton kernel
``blockmax_attention(..., stat=...)`` computes either map): ``blockmax_attention_reference``, a chunk of query rows
at a time (memory ``O(chunk x S)``, never the dense ``S x S`` map per head); it also returns the attention output,
so the distillation forward computes attention once.
"""

from __future__ import annotations

import torch

from ...errors import HfEffllmError
from ...kernels.seer_blockmax import blockmax_attention_reference
from .config import GROUP_REDUCTIONS, TARGET_STATS


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
    out, bmap = blockmax_attention_reference(
        q, k, k if v is None else v, scale=scale, key_padding=key_padding, block_size=block_size, stat=stat
    )
    return (None if v is None else out), bmap


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
