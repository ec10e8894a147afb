"""The ``seer_attention`` attention function registered with ``transformers.AttentionInterface``.

Prefill (several query tokens, no earlier cache) runs block-sparse with the blocks the layer's gate keeps; decode
steps (one query token), chunked prefill over an existing cache, sliding-window layers whose window is shorter
than the prompt, ``dense_layers``, short prompts and training with attention dropout run dense through
transformers' own ``sdpa`` function. In ``distill`` mode the function computes dense attention with the block-max
kernel and hands the target map to the gate.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ...errors import HfEffllmError
from ...kernels.seer_attention import block_sparse_attention, block_sparse_attention_reference, triton_usable
from ...kernels.seer_blockmax import blockmax_attention
from .config import SeerAttentionConfig
from .gate import SeerAttnGate, select_blocks, sink_local_blocks
from .targets import block_attention_map, reduce_target

logger = logging.get_logger(__name__)

ATTENTION_NAME = "seer_attention"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dense(module, query, key, value, attention_mask, dropout, scaling, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def key_padding_from_mask(attention_mask: torch.Tensor | None, batch: int, kv_len: int) -> torch.Tensor | None:
    """Real-token mask ``(B, S)`` from transformers' 4-D prefill mask (None when there is no mask).

    The last query row of a causal mask sees every real key (left or right padding alike). A mask without padding
    is returned as it is (all True) rather than checked on the host: no device sync per layer (transformers gives
    ``None`` instead of a mask when nothing is padded).
    """
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 2:
        valid = m.bool()
    elif m.dim() == 4:
        row = m[:, 0, -1, :kv_len]
        valid = row if row.dtype == torch.bool else row == 0
    else:
        raise HfEffllmError(f"attention_mask of {m.dim()} dims is not supported by seer_attention; use 2-D or 4-D.")
    return valid.expand(batch, kv_len).contiguous()


def key_blocks_valid(
    valid: torch.Tensor | None, batch: int, nb: int, block_size: int, seq: int, device: torch.device
) -> torch.Tensor:
    """``(B, nb)``: key blocks holding at least one real token."""
    if valid is None:
        return torch.ones(batch, nb, dtype=torch.bool, device=device)
    return nn.functional.pad(valid, (0, nb * block_size - seq), value=False).view(batch, nb, block_size).any(-1)


def causal_block_count(kvalid: torch.Tensor | None, batch: int, nb: int) -> int | torch.Tensor:
    """Causal blocks whose key block is non-empty, over the batch: ``sum_b sum_j kvalid[b, j] * (nb - j)``.

    A Python int without padding, else a device tensor (no host sync).
    """
    if kvalid is None:
        return batch * nb * (nb + 1) // 2
    return (kvalid * torch.arange(nb, 0, -1, device=kvalid.device)).sum()


def _use_triton(config_backend: str, query: torch.Tensor) -> bool:
    if config_backend == "torch":
        return False
    if config_backend == "triton":
        if not triton_usable(query.device):
            raise HfEffllmError(
                f"backend='triton' needs CUDA (or TRITON_INTERPRET=1); tensors are on {query.device}. Use "
                "backend='auto' or 'torch'."
            )
        return True
    return query.device.type == "cuda" and query.dtype in _TRITON_DTYPES and triton_usable(query.device)


def seer_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function of ``attn_implementation="seer_attention"`` (same signature as transformers' ones).

    Args:
        module: the attention layer (carries ``seer_gate`` after :func:`apply_seer_attention`).
        query: ``(B, Hq, Sq, D)`` after RoPE.
        key: ``(B, Hkv, Skv, D)`` after RoPE (and cache update).
        value: ``(B, Hkv, Skv, D)``.
        attention_mask: transformers' ``sdpa`` mask (4-D bool) or None for plain causal attention.
        dropout: attention dropout (training only; forces the dense path).
        scaling: softmax scale.

    Returns:
        ``(output (B, Sq, Hq, D), None)``.
    """
    gate: SeerAttnGate | None = getattr(module, "seer_gate", None)
    pending = gate.take_pending() if gate is not None else None
    b, hq, sq, d = query.shape
    skv = key.shape[2]
    prefill = pending is not None and sq > 1 and sq == skv and pending[0].shape[2] == sq
    window = kwargs.get("sliding_window")  # a window covering the whole prompt (q - k < window) changes nothing
    if gate is not None and pending is not None and 1 < sq < skv and gate.mode != "dense":
        logger.warning_once(
            "SeerAttention: a multi-token forward over a longer key cache (a static cache, or chunked prefill over "
            "earlier tokens) runs dense; block-sparse prefill applies to a prompt processed in one forward with a "
            "dynamic cache."
        )
    if (
        gate is None
        or not prefill
        or (window is not None and skv > window)
        or (dropout > 0.0 and module.training)
        or gate.mode == "dense"
    ):
        return _dense(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    cfg = gate.seer_config
    scale = d**-0.5 if scaling is None else scaling
    valid = key_padding_from_mask(attention_mask, b, skv)
    # The Triton kernels are forward-only: when a gradient is needed (fine-tuning with SeerAttention active) the
    # differentiable PyTorch path runs instead.
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    use_triton = _use_triton(cfg.backend, query) and not needs_grad
    if gate.mode == "distill":
        out, bmap = target_map(query, key, value, scale=scale, valid=valid, config=cfg, use_triton=use_triton)
        gate.distill_record = distill_record(gate, pending, valid, bmap)
        return out.transpose(1, 2).contiguous(), None
    nb = math.ceil(sq / cfg.block_size)
    causal_total = b * gate.num_kv_heads * nb * (nb + 1) // 2
    if sq <= cfg.block_size or sq < cfg.min_seq_len or gate.layer_idx in cfg.dense_layers:
        gate.count_blocks(causal_total, causal_total)
        return _dense(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    with torch.no_grad():
        if cfg.fixed_pattern == "sink_local":
            kvalid = key_blocks_valid(valid, b, nb, cfg.block_size, sq, query.device)
            keep = sink_local_blocks(b, gate.num_kv_heads, nb, cfg.nz_ratio, query.device) & kvalid[:, None, None, :]
        elif cfg.oracle is not None:  # diagnostic upper bound: the true block map (config.target), not the gate
            kvalid = key_blocks_valid(valid, b, nb, cfg.block_size, sq, query.device)
            keep = select_blocks(oracle_scores(gate, query, key, value, scale, valid, use_triton), cfg, kvalid)
        else:
            pq, pk, kvalid = gate.pool(*pending, valid)
            keep = select_blocks(gate.probs_from_pooled(pq, pk, kvalid), cfg, kvalid)
    # Device-side counts (no host sync); per KV head (per query head for oracle='head').
    gate.count_blocks(keep.sum(), causal_block_count(kvalid if valid is not None else None, b, nb) * keep.shape[1])
    fn = block_sparse_attention if use_triton else block_sparse_attention_reference
    out = fn(query, key, value, keep, scale=scale, key_padding=valid, block_size=cfg.block_size)
    return out.transpose(1, 2).contiguous(), None


def oracle_scores(
    gate: SeerAttnGate,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    valid: torch.Tensor | None,
    use_triton: bool,
) -> torch.Tensor:
    """Row-normalised true block map for ``oracle`` selection (statistic ``config.target``): ``(B, Hkv, nb, nb)``
    reduced over each KV group like the distillation target (``oracle='kv'``), or ``(B, Hq, nb, nb)`` (``'head'``)."""
    cfg = gate.seer_config
    bmap = target_map(query, key, None, scale=scale, valid=valid, config=cfg, use_triton=use_triton)[1]
    if cfg.oracle == "head":
        return bmap / bmap.sum(-1, keepdim=True).clamp_min(1e-30)
    return reduce_target(bmap, gate.num_kv_heads, cfg.target_group_reduce)


def target_map(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None,
    *,
    scale: float,
    valid: torch.Tensor | None,
    config: SeerAttentionConfig,
    use_triton: bool,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Attention output (None without ``value``) and the per-query-head block map of ``config.target``."""
    if use_triton:  # one-pass Triton kernel for both targets (values = keys when the output is not needed)
        out, bmap = blockmax_attention(query, key, key if value is None else value, scale=scale, key_padding=valid,
                                       block_size=config.block_size, stat=config.target)  # fmt: skip
        return (None if value is None else out), bmap
    return block_attention_map(
        query, key, value, stat=config.target, scale=scale, key_padding=valid, block_size=config.block_size
    )


def distill_record(
    gate: SeerAttnGate,
    pending: tuple[torch.Tensor, torch.Tensor],
    valid: torch.Tensor | None,
    block_max: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Gate inputs and the distillation target of one layer, detached (nothing here depends on gate weights).

    The target is the block map of ``config.target`` (block max or block mass), reduced over each KV group by
    ``config.target_group_reduce`` (the gate scores KV heads), normalised to sum 1 over each block row.
    """
    with torch.no_grad():
        pq, pk, kvalid = gate.pool(*pending, valid)
        t = reduce_target(block_max, gate.num_kv_heads, gate.seer_config.target_group_reduce)
    return {"pq": pq, "pk": pk, "kvalid": kvalid, "target": t}


def distill_loss(gate: SeerAttnGate, record: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(target || gate) per block row, summed over key blocks and averaged over the rows that have a target.

    With ``distill_forced_blocks=False`` the blocks that are kept anyway (the diagonal with ``last_block_dense``,
    block 0 with ``keep_sink``) leave both distributions, which are renormalised over the remaining blocks: the gate
    learns only the ranking it is used for.
    """
    logits = gate.logits_from_pooled(record["pq"], record["pk"], record["kvalid"])
    t = record["target"]
    cfg = gate.seer_config
    if not cfg.distill_forced_blocks and (cfg.last_block_dense or cfg.keep_sink):
        nb = logits.shape[-1]
        forced = torch.zeros(nb, nb, dtype=torch.bool, device=logits.device)
        if cfg.last_block_dense:
            forced |= torch.eye(nb, dtype=torch.bool, device=logits.device)
        if cfg.keep_sink:
            forced[:, 0] = True
        logits = logits.masked_fill(forced, float("-inf"))
        t = t.masked_fill(forced, 0.0)
        t = t / t.sum(-1, keepdim=True).clamp_min(1e-30)
    logp = torch.log_softmax(logits, dim=-1).masked_fill(~torch.isfinite(logits), 0.0)
    rows = t.sum(-1) > 0
    kl = torch.where(t > 0, t * (torch.log(t.clamp_min(1e-30)) - logp), torch.zeros_like(t)).sum(-1)
    return kl[rows].mean() if bool(rows.any()) else logits.sum() * 0.0
