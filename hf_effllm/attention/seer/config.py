"""``SeerAttentionConfig``: gate architecture and sparsity selection of SeerAttention."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ...errors import HfEffllmError

POOLING_CHOICES: tuple[str, ...] = ("avg", "max", "min")
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
ORACLE_CHOICES: tuple[str, ...] = ("kv", "head")
TARGET_STATS: tuple[str, ...] = ("max", "mass")
GROUP_REDUCTIONS: tuple[str, ...] = ("max", "mean")
# Fields that define the gate's parameters; the others only steer inference and may change after training.
ARCHITECTURE_FIELDS: tuple[str, ...] = ("block_size", "q_pooling", "k_pooling", "gate_hidden_size", "rope_theta")


@dataclass
class SeerAttentionConfig:
    """Configuration of SeerAttention (Gao et al. 2024, "SeerAttention: learning intrinsic sparse attention").

    Give one of ``threshold``, ``nz_ratio`` or ``top_p``; with none, ``nz_ratio=0.5`` (half of the causal blocks
    kept). ``top_p`` is an adaptive budget: each block row keeps its most probable blocks until their gate
    probabilities sum to ``top_p``, so rows, heads and layers with concentrated attention keep fewer blocks.

    Distillation target: by default the gates learn the per-tile attention *mass* (``target="mass"``, KV group
    mean), measured better than the paper's block max at 70-90% sparsity (``benchmarks/seer_quality.py``).
    ``oracle`` is a diagnostic that selects from the true map instead of the gate.

    Example:
        >>> cfg = SeerAttentionConfig(nz_ratio=0.1)  # keep 10% of the causal 64x64 blocks: 90% sparsity
        >>> cfg.block_size
        64
    """

    block_size: int = field(default=64, metadata={"help": "Tile size of the attention map (16, 32, 64 or 128)."})
    q_pooling: list[str] = field(
        default_factory=lambda: ["avg"], metadata={"help": "Pooling of pre-RoPE Q per block: any of avg/max/min."}
    )
    k_pooling: list[str] = field(
        default_factory=lambda: ["max", "min", "avg"],
        metadata={"help": "Pooling of pre-RoPE K per block, concatenated: any of avg/max/min."},
    )
    gate_hidden_size: int = field(default=128, metadata={"help": "Width of the gate's Q/K projections (even)."})
    threshold: float | None = field(
        default=None, metadata={"help": "Keep blocks whose gate probability is >= threshold (0 < t <= 1)."}
    )
    nz_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of causal blocks kept per block row, top-k (0 < r <= 1)."}
    )
    top_p: float | None = field(
        default=None,
        metadata={"help": "Keep each row's most probable blocks until their probabilities sum to top_p (0 < p <= 1)."},
    )
    last_block_dense: bool = field(
        default=True, metadata={"help": "Always keep the diagonal block of each block row (the local context)."}
    )
    dense_layers: list[int] = field(default_factory=list, metadata={"help": "Layer indices that stay dense."})
    min_seq_len: int = field(default=0, metadata={"help": "Prefills shorter than this many tokens stay dense."})
    rope_theta: float | None = field(
        default=None, metadata={"help": "RoPE base of the gate (block positions); None: the model's rope_theta."}
    )
    backend: str = field(
        default="auto", metadata={"help": "auto (Triton on CUDA, PyTorch elsewhere), triton or torch."}
    )
    fixed_pattern: str | None = field(
        default=None,
        metadata={
            "help": "None: blocks chosen by the learned gate. 'sink_local': a predefined baseline at the same "
            "density per row (first block + the most recent blocks), the gate is not used."
        },
    )
    target: str = field(
        default="mass",
        metadata={
            "help": "Block statistic of the true attention map the gates are distilled towards: 'max' (the paper's "
            "2D max-pooled map) or 'mass' (sum of the probabilities in each tile: the attention a dropped block "
            "loses). Normalised per block row."
        },
    )
    target_group_reduce: str = field(
        default="mean",
        metadata={"help": "How the query heads of a KV group are combined into the per-KV-head target: max or mean."},
    )
    distill_forced_blocks: bool = field(
        default=True,
        metadata={
            "help": "Distil the gate on whole block rows (paper). False: leave out the blocks kept anyway (diagonal "
            "with last_block_dense, block 0 with keep_sink) and renormalise, so the gate learns only the ranking "
            "of the blocks it chooses; such gates must run with the same keep_sink / last_block_dense (measured: "
            "no better than True)."
        },
    )
    oracle: str | None = field(
        default=None,
        metadata={
            "help": "Diagnostic, not for deployment: choose blocks from the TRUE attention map of each layer "
            "(the statistic 'target', computed densely on the actual Q/K) instead of the gate, to bound what any "
            "gate can reach. 'kv': one mask per KV head from the distillation target itself (reduced with "
            "target_group_reduce), the bound of a gate trained on it; 'head': one mask per query head."
        },
    )
    keep_sink: bool = field(
        default=False,
        metadata={
            "help": "Always keep key block 0 (the attention sink) in every block row, inside the same per-row count; "
            "the gate picks the rest. Helps gates distilled on target='max' a lot; with target='mass' the gate "
            "keeps the sink by itself and forcing it costs a slot at high sparsity."
        },
    )

    def __post_init__(self) -> None:
        for name in ("q_pooling", "k_pooling"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
            value = list(value)
            if not value or any(v not in POOLING_CHOICES for v in value) or len(set(value)) != len(value):
                raise HfEffllmError(
                    f"{name}={getattr(self, name)!r} is invalid; use a non-empty list of distinct values from "
                    f"{list(POOLING_CHOICES)}."
                )
            setattr(self, name, value)
        if not isinstance(self.block_size, int) or self.block_size not in (16, 32, 64, 128):
            raise HfEffllmError(
                f"block_size={self.block_size!r} is not supported by the kernels; use 16, 32, 64 or 128 (paper: 64)."
            )
        if not isinstance(self.gate_hidden_size, int) or self.gate_hidden_size < 2 or self.gate_hidden_size % 2:
            raise HfEffllmError(f"gate_hidden_size={self.gate_hidden_size!r} must be an even integer >= 2 (RoPE).")
        chosen = {k: getattr(self, k) for k in ("threshold", "nz_ratio", "top_p") if getattr(self, k) is not None}
        if len(chosen) > 1:
            given = ", ".join(f"{k}={v}" for k, v in chosen.items())
            raise HfEffllmError(f"{given} are all set; give only one of threshold, nz_ratio and top_p.")
        if not chosen:
            self.nz_ratio = 0.5
        if self.top_p is not None and not (
            isinstance(self.top_p, (int, float)) and not isinstance(self.top_p, bool) and 0.0 < self.top_p <= 1.0
        ):
            raise HfEffllmError(f"top_p={self.top_p!r} is out of range; use 0 < top_p <= 1 (1.0 keeps every block).")
        if self.threshold is not None and not (
            isinstance(self.threshold, (int, float))
            and not isinstance(self.threshold, bool)
            and 0 < self.threshold <= 1
        ):
            raise HfEffllmError(f"threshold={self.threshold!r} is out of range; use 0 < threshold <= 1.")
        if self.nz_ratio is not None and not (
            isinstance(self.nz_ratio, (int, float)) and not isinstance(self.nz_ratio, bool) and 0 < self.nz_ratio <= 1
        ):
            raise HfEffllmError(f"nz_ratio={self.nz_ratio!r} is out of range; use 0 < nz_ratio <= 1 (1.0 = dense).")
        layers = list(self.dense_layers) if isinstance(self.dense_layers, (list, tuple, set, range)) else [None]
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
            raise HfEffllmError(f"dense_layers={self.dense_layers!r} must be a list of layer indices >= 0.")
        self.dense_layers = sorted(set(layers))
        if not isinstance(self.min_seq_len, int) or isinstance(self.min_seq_len, bool) or self.min_seq_len < 0:
            raise HfEffllmError(f"min_seq_len={self.min_seq_len!r} must be an integer >= 0.")
        if self.rope_theta is not None and not (
            isinstance(self.rope_theta, (int, float)) and math.isfinite(self.rope_theta) and self.rope_theta > 0
        ):
            raise HfEffllmError(f"rope_theta={self.rope_theta!r} must be a positive number (or None).")
        if self.fixed_pattern not in (None, "sink_local"):
            raise HfEffllmError(f"fixed_pattern={self.fixed_pattern!r} is unknown; use None or 'sink_local'.")
        if self.fixed_pattern is not None and self.nz_ratio is None:
            raise HfEffllmError(
                f"fixed_pattern={self.fixed_pattern!r} needs nz_ratio (the density), not threshold or top_p."
            )
        if self.target not in TARGET_STATS:
            raise HfEffllmError(f"target={self.target!r} is unknown; use one of {list(TARGET_STATS)}.")
        if self.target_group_reduce not in GROUP_REDUCTIONS:
            raise HfEffllmError(
                f"target_group_reduce={self.target_group_reduce!r} is unknown; use one of {list(GROUP_REDUCTIONS)}."
            )
        if self.oracle not in (None, *ORACLE_CHOICES):
            raise HfEffllmError(f"oracle={self.oracle!r} is unknown; use None or one of {list(ORACLE_CHOICES)}.")
        if self.oracle is not None and self.fixed_pattern is not None:
            raise HfEffllmError(
                f"oracle={self.oracle!r} and fixed_pattern={self.fixed_pattern!r} are both set; give only one."
            )
        for name in ("keep_sink", "distill_forced_blocks", "last_block_dense"):
            if not isinstance(getattr(self, name), bool):
                raise HfEffllmError(f"{name}={getattr(self, name)!r} must be True or False.")
        if self.backend not in BACKENDS:
            raise HfEffllmError(f"backend={self.backend!r} is unknown; use one of {list(BACKENDS)}.")

    @property
    def target_sparsity(self) -> float | None:
        """``1 - nz_ratio`` when selecting by ratio (None with a threshold)."""
        return None if self.nz_ratio is None else 1.0 - self.nz_ratio

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of all fields."""
        return asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeerAttentionConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HfEffllmError(f"SeerAttentionConfig got unknown field(s) {unknown}; known: {sorted(known)}.")
        return cls(**data)

    def architecture(self) -> dict[str, Any]:
        """The fields that shape the gate parameters (must match between saved gates and a config)."""
        return {k: getattr(self, k) for k in ARCHITECTURE_FIELDS}
