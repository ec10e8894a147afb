"""Tiny random-weight models for tests: one factory for every architecture the project supports.

Example:
    >>> model = tiny_model("llama")  # doctest: +SKIP
    >>> model(input_ids=torch.randint(0, 256, (1, 16))).logits.shape  # doctest: +SKIP
    torch.Size([1, 16, 256])
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import HfEffllmError

_COMMON: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {"sliding_window": None},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
    },
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16},
    "deepseek_v3": {
        "num_key_value_heads": 4,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "rope_interleave": True,
    },
}
TINY_MODEL_TYPES: tuple[str, ...] = (*TINY_CONFIGS, "llava")
CAUSAL_LM_TYPES: tuple[str, ...] = tuple(TINY_CONFIGS)
MOE_TYPES: tuple[str, ...] = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


def tiny_config(model_type: str, **overrides: Any):
    """A ``PretrainedConfig`` of a tiny model of ``model_type`` (see :data:`TINY_MODEL_TYPES`)."""
    from transformers import AutoConfig

    if model_type == "llava":
        text = tiny_config("llama")
        vision = {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 32,
        }
        kwargs = {"text_config": text.to_dict(), "vision_config": vision, "image_token_index": 255}
        kwargs.update(overrides)
        return AutoConfig.for_model("llava", **kwargs)
    if model_type not in TINY_CONFIGS:
        raise HfEffllmError(f"model_type={model_type!r} has no tiny config; use one of {list(TINY_MODEL_TYPES)}.")
    kwargs = {**_COMMON, **TINY_CONFIGS[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A random-weight tiny model of ``model_type`` in eval mode, deterministic for a given ``seed``.

    Causal LMs are built with ``AutoModelForCausalLM``; "llava" with ``AutoModelForImageTextToText``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if model_type == "llava" else AutoModelForCausalLM
    return auto.from_config(config, dtype=dtype).eval()
