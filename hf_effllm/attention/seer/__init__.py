"""SeerAttention (Gao et al. 2024): learned block-sparse attention for stock transformers decoders.

Importing this package registers the ``seer_attention`` attention function (and its mask function, transformers'
``sdpa`` mask) with transformers, and the quickstart stage ``seer``.

Example:
    >>> import hf_effllm
    >>> model = hf_effllm.apply_seer_attention(model, hf_effllm.SeerAttentionConfig(nz_ratio=0.2))  # doctest: +SKIP
    >>> hf_effllm.seer.distill_gates(model, nsamples=16, seqlen=2048, max_steps=200)  # doctest: +SKIP
    >>> hf_effllm.seer.save_gates(model, "my-gates")  # doctest: +SKIP
"""

from __future__ import annotations

from ...registration import register_attention_function
from .apply import (
    apply_seer_attention,
    attention_layers,
    gates_of,
    mean_sparsity,
    model_signature,
    remove_seer_attention,
    seer_config_of,
    set_seer_options,
    sparsity_report,
)
from .attention import ATTENTION_NAME, distill_loss, seer_attention_forward
from .config import SeerAttentionConfig
from .distill import DistillResult, GateDistillModel, distill_gates
from .gate import SeerAttnGate, block_pool, rope_at_blocks, select_blocks
from .io import load_gates, read_gates_config, save_gates


def _register() -> None:
    register_attention_function(ATTENTION_NAME, seer_attention_forward)  # dense fallback is sdpa: sdpa's mask
    from . import cli  # noqa: F401  (registers the quickstart stage)


_register()

__all__ = [
    "ATTENTION_NAME",
    "DistillResult",
    "GateDistillModel",
    "SeerAttentionConfig",
    "SeerAttnGate",
    "apply_seer_attention",
    "attention_layers",
    "block_pool",
    "distill_gates",
    "distill_loss",
    "gates_of",
    "load_gates",
    "mean_sparsity",
    "model_signature",
    "read_gates_config",
    "remove_seer_attention",
    "rope_at_blocks",
    "save_gates",
    "seer_attention_forward",
    "seer_config_of",
    "select_blocks",
    "set_seer_options",
    "sparsity_report",
]
