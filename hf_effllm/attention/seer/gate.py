"""The SeerAttention gate: block pooling of pre-RoPE Q/K, per-head projections, RoPE at block positions."""

from __future__ import annotations

import torch
from torch import nn

from ...kernels.seer_attention import triton_usable
from ...kernels.seer_gate import (
    block_pool_reference,
    block_pool_triton,
    gate_logits_reference,
    gate_probs_triton,
)
from ...kernels.seer_gate import rope_at_blocks as rope_at_blocks  # re-exported: part of the gate's API
from .config import SeerAttentionConfig


def block_pool(x: torch.Tensor, block_size: int, kinds: list[str], valid: torch.Tensor | None = None) -> torch.Tensor:
    """Pool ``x (B, H, S, D)`` over blocks of ``block_size`` tokens and concatenate the poolings (float32).

    On CUDA (no gradient needed) one Triton launch reads ``x`` once in its own dtype
    (:func:`~hf_effllm.kernels.seer_gate.block_pool_triton`); elsewhere the PyTorch reference
    :func:`~hf_effllm.kernels.seer_gate.block_pool_reference` runs.

    Args:
        x: per-head states (float16/bfloat16/float32).
        block_size: tokens per block; the last block may be partial.
        kinds: poolings to concatenate, in order, from ``avg``, ``max``, ``min``.
        valid: optional bool ``(B, S)``: tokens taking part (padding excluded). Empty blocks pool to zeros.

    Returns:
        float32 ``(B, H, nb, D * len(kinds))`` with ``nb = ceil(S / block_size)``.

    Example:
        >>> pooled = block_pool(k_pre, 64, ["max", "min", "avg"])  # doctest: +SKIP
    """
    fast = (
        x.device.type == "cuda"
        and triton_usable(x.device)
        and len(kinds) <= 3
        and not (x.requires_grad and torch.is_grad_enabled())
    )
    return (block_pool_triton if fast else block_pool_reference)(x, block_size, kinds, valid)


class _PendingHook:
    """Forward hook storing a projection's output on the gate (a class, so ``deepcopy`` of a model rebinds it)."""

    def __init__(self, gate: SeerAttnGate, slot: str) -> None:
        self.gate = gate
        self.slot = slot

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        setattr(self.gate, self.slot, output)


class SeerAttnGate(nn.Module):
    """Attention gate of one layer (GQA-aware: one block score map per KV head, shared by its query group).

    Q is pooled per query head; the ``G`` query heads of a KV group are projected together
    (``einsum`` over ``(G, Dq)``) to ``gate_hidden_size``; K is pooled per KV head and projected likewise. RoPE is
    applied to both at block positions, and the score of (query block i, key block j) is their scaled dot product;
    a softmax over the causal key blocks gives the gate's distribution.

    Args:
        num_heads: query heads of the layer.
        num_kv_heads: KV heads of the layer.
        head_dim: per-head width of Q/K.
        config: the shared :class:`SeerAttentionConfig`.
        rope_theta: RoPE base used at block positions.
        layer_idx: index of the attention layer.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        config: SeerAttentionConfig,
        rope_theta: float,
        layer_idx: int,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.layer_idx = layer_idx
        self.seer_config = config
        self.rope_theta = float(rope_theta)
        gh = config.gate_hidden_size
        dq, dk = head_dim * len(config.q_pooling), head_dim * len(config.k_pooling)
        self.q_weight = nn.Parameter(torch.empty(num_kv_heads, self.group, dq, gh))
        self.k_weight = nn.Parameter(torch.empty(num_kv_heads, dk, gh))
        self.reset_parameters()
        self.mode = "sparse"  # "sparse" (inference), "distill" (record targets), "dense" (gate bypassed)
        self._pending_q: torch.Tensor | None = None
        self._pending_k: torch.Tensor | None = None
        self.distill_record: dict[str, torch.Tensor] | None = None
        self.reset_stats()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.q_weight.normal_(0.0, (self.group * self.q_weight.shape[2]) ** -0.5)
            self.k_weight.normal_(0.0, self.k_weight.shape[1] ** -0.5)

    def reset_stats(self) -> None:
        """Zero the counters of kept / causal blocks behind :func:`sparsity_report`."""
        self._kept: int | torch.Tensor = 0  # a device tensor once counted in a forward: read (and synced) lazily
        self._total: int | torch.Tensor = 0

    def count_blocks(self, kept: int | torch.Tensor, total: int | torch.Tensor) -> None:
        """Add kept / causal block counts; tensors stay on their device (no host sync in the forward)."""
        self._kept = self._kept + kept
        self._total = self._total + total

    @property
    def kept_blocks(self) -> int:
        """Kept blocks since the last :meth:`reset_stats` (converted to ``int`` when read)."""
        return int(self._kept)

    @kept_blocks.setter
    def kept_blocks(self, value: int) -> None:
        self._kept = value

    @property
    def total_blocks(self) -> int:
        """Causal, non-empty blocks since the last :meth:`reset_stats` (converted to ``int`` when read)."""
        return int(self._total)

    @total_blocks.setter
    def total_blocks(self, value: int) -> None:
        self._total = value

    def extra_repr(self) -> str:
        c = self.seer_config
        return (
            f"layer={self.layer_idx}, heads={self.num_heads}/{self.num_kv_heads}, head_dim={self.head_dim}, "
            f"q_pooling={c.q_pooling}, k_pooling={c.k_pooling}, gate_hidden_size={c.gate_hidden_size}"
        )

    def take_pending(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The pre-RoPE Q and K captured by the hooks as ``(B, H, S, D)``, cleared after reading."""
        q, k = self._pending_q, self._pending_k
        self._pending_q = self._pending_k = None
        if q is None or k is None:
            return None
        b, s = q.shape[0], q.shape[1]
        q = q.reshape(b, s, -1, self.head_dim).transpose(1, 2)
        k = k.reshape(b, s, -1, self.head_dim).transpose(1, 2)
        return q, k

    def pool(
        self, q_pre: torch.Tensor, k_pre: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pooled Q ``(B, Hq, nb, Dq)``, pooled K ``(B, Hkv, nb, Dk)`` and the non-empty key blocks ``(B, nb)``."""
        bs = self.seer_config.block_size
        pq = block_pool(q_pre, bs, self.seer_config.q_pooling, valid)
        pk = block_pool(k_pre, bs, self.seer_config.k_pooling, valid)
        b, s = q_pre.shape[0], q_pre.shape[2]
        nb = pq.shape[2]
        if valid is None:
            kvalid = torch.ones(b, nb, dtype=torch.bool, device=pq.device)
        else:
            v = nn.functional.pad(valid.to(pq.device), (0, nb * bs - s), value=False)
            kvalid = v.view(b, nb, bs).any(-1)
        return pq, pk, kvalid

    def _project(self, pq: torch.Tensor, pk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, nb, dq = pq.shape
        w_q, w_k = self.q_weight, self.k_weight
        qg = torch.einsum("bkgnd,kgde->bkne", pq.view(b, self.num_kv_heads, self.group, nb, dq).to(w_q.dtype), w_q)
        kg = torch.einsum("bknd,kde->bkne", pk.to(w_k.dtype), w_k)
        return qg, kg

    def logits_from_pooled(self, pq: torch.Tensor, pk: torch.Tensor, kvalid: torch.Tensor) -> torch.Tensor:
        """Masked block scores ``(B, Hkv, nb, nb)``: ``-inf`` above the diagonal and for empty key blocks."""
        return gate_logits_reference(*self._project(pq, pk), kvalid, self.rope_theta)

    def probs_from_pooled(self, pq: torch.Tensor, pk: torch.Tensor, kvalid: torch.Tensor) -> torch.Tensor:
        """Gate probabilities ``(B, Hkv, nb, nb)``: softmax of :meth:`logits_from_pooled`, empty rows 0.

        On CUDA without autograd, RoPE, scores, masking and softmax run as one Triton launch
        (:func:`~hf_effllm.kernels.seer_gate.gate_probs_triton`).
        """
        qg, kg = self._project(pq, pk)
        if qg.device.type == "cuda" and triton_usable(qg.device) and not (torch.is_grad_enabled() and qg.requires_grad):
            return gate_probs_triton(qg, kg, kvalid, self.rope_theta)
        return torch.softmax(gate_logits_reference(qg, kg, kvalid, self.rope_theta), dim=-1).nan_to_num(0.0)

    def forward(self, q_pre: torch.Tensor, k_pre: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Gate probabilities ``(B, Hkv, nb, nb)`` (softmax over causal, non-empty key blocks; empty rows are 0).

        Args:
            q_pre: pre-RoPE queries ``(B, Hq, S, D)``.
            k_pre: pre-RoPE keys ``(B, Hkv, S, D)``.
            valid: optional bool ``(B, S)``, True for real tokens.
        """
        return self.probs_from_pooled(*self.pool(q_pre, k_pre, valid))


def select_blocks(probs: torch.Tensor, config: SeerAttentionConfig, kvalid: torch.Tensor | None = None) -> torch.Tensor:
    """Kept blocks ``(B, H, nb, nb)`` (bool) from gate probabilities, by ``threshold`` or top-k ``nz_ratio``.

    Only causal, non-empty key blocks are kept. In ``nz_ratio`` mode each block row keeps exactly
    ``k = ceil(nz_ratio * n_row)`` blocks (``n_row``: its causal, non-empty key blocks), the diagonal included when
    ``last_block_dense``; then ``k`` is at least ``min(2, n_row)`` so a row never sees only its own block (the local
    block alone loses the attention sink). With ``keep_sink`` key block 0 is also always kept (inside the same ``k``:
    the gate ranks the others). With a threshold, the diagonal (and the sink) are added to the blocks above it; with
    ``top_p`` each row keeps its most probable blocks until their probabilities sum to ``top_p`` (at least one), and
    the diagonal (and the sink) are added.

    Args:
        probs: ``(B, H, nb, nb)`` gate probabilities (or any row-normalised scores in ``[0, 1]``, e.g. the oracle's
            target map).
        config: gives ``threshold`` / ``nz_ratio`` / ``top_p``, ``last_block_dense`` and ``keep_sink``.
        kvalid: optional bool ``(B, nb)``: key blocks holding at least one real token.

    Returns:
        bool ``(B, H, nb, nb)``, False above the diagonal and for empty key blocks.

    Example:
        >>> keep = select_blocks(gate(q_pre, k_pre), SeerAttentionConfig(nz_ratio=0.1))  # doctest: +SKIP
    """
    keep_sink = config.keep_sink
    b, h, nb, _ = probs.shape
    allowed = torch.ones(nb, nb, dtype=torch.bool, device=probs.device).tril()
    if kvalid is not None:
        allowed = allowed & kvalid[:, None, None, :]
    allowed = allowed.expand(b, h, nb, nb)
    if config.threshold is not None:
        keep = probs >= config.threshold
    elif config.top_p is not None and config.top_p >= 1.0:
        keep = allowed.clone()  # every causal block, also those whose probability underflowed to 0
    elif config.top_p is not None:  # adaptive: the most probable blocks until their mass reaches top_p
        score = probs.masked_fill(~allowed, 0.0)
        srt, order = torch.sort(score, dim=-1, descending=True, stable=True)
        keep_sorted = ((srt.cumsum(-1) - srt) < config.top_p) & (srt > 0)
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    else:
        n_row = allowed.sum(-1, keepdim=True)
        k_row = torch.ceil(n_row.float() * config.nz_ratio).long().clamp_min(1)
        score = probs.masked_fill(~allowed, -1.0)
        if config.last_block_dense:
            k_row = torch.maximum(k_row, n_row.clamp_max(2))
            diag = torch.eye(nb, dtype=torch.bool, device=probs.device) & allowed
            score = score.masked_fill(diag, 2.0)  # probabilities are <= 1: the diagonal ranks first
        if keep_sink:
            score[..., 0] = torch.where(allowed[..., 0], score[..., 0].clamp_min(1.5), score[..., 0])  # then the sink
        order = torch.argsort(score, dim=-1, descending=True, stable=True)
        ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(nb, device=probs.device).expand_as(order))
        keep = ranks < k_row
    if config.last_block_dense:
        keep = keep | torch.eye(nb, dtype=torch.bool, device=probs.device)
    if keep_sink:
        keep = keep.clone()
        keep[..., 0] = True
    return keep & allowed


def sink_local_blocks(batch: int, heads: int, nb: int, nz_ratio: float, device: torch.device) -> torch.Tensor:
    """Predefined pattern at the density of ``nz_ratio``: per block row ``i``, ``max(ceil(nz_ratio * (i + 1)),
    min(2, i + 1))`` blocks (the count :func:`select_blocks` keeps), made of the first block (attention sink) and the
    most recent blocks up to the diagonal. Baseline for learned gates.
    """
    i = torch.arange(nb, device=device)[:, None]
    j = torch.arange(nb, device=device)[None, :]
    k = torch.maximum(torch.ceil((i + 1).float() * nz_ratio).long(), (i + 1).clamp_max(2))
    local = torch.where(k >= 2, k - 1, k)  # blocks ending at the diagonal; the sink takes the remaining one
    keep = ((j > i - local) & (j <= i)) | ((j == 0) & (k >= 2))
    return keep.expand(batch, heads, nb, nb)
