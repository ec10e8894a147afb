"""Idempotent registration with the extension points of transformers (and PEFT).

Each method sub-package registers itself through these helpers, so importing ``hf_effllm`` twice, reloading a
module (which creates new class objects) or importing in worker processes never raises "already registered".
A name already taken by *another* library is never overwritten: that is an error naming the owner.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .errors import HfEffllmError

# Method sub-packages whose import registers them; each appears once its issue lands.
METHOD_MODULES: tuple[str, ...] = (
    "hf_effllm.optim",
    "hf_effllm.train",
    "hf_effllm.quant.spqr",
    "hf_effllm.attention.seer",
    "hf_effllm.cache.million",
)


def _same_origin(existing: Any, new: Any) -> bool:
    return getattr(existing, "__module__", None) == getattr(new, "__module__", None) and getattr(
        existing, "__qualname__", None
    ) == getattr(new, "__qualname__", None)


def register_in_mapping(mapping: dict[str, Any], key: str, value: Any, *, what: str) -> None:
    """Put ``value`` under ``key`` unless another library's object holds it; re-registering ours replaces it."""
    existing = mapping.get(key)
    if existing is not None and existing is not value and not _same_origin(existing, value):
        raise HfEffllmError(
            f"{what} name {key!r} is already registered by {getattr(existing, '__module__', '?')}."
            f"{getattr(existing, '__qualname__', '')}; hf-effllm cannot take it."
        )
    mapping[key] = value


def register_quantization_method(method: str, config_cls: type, quantizer_cls: type) -> None:
    """Register a ``QuantizationConfigMixin`` subclass and its ``HfQuantizer`` under ``method`` (idempotent).

    Same effect as ``transformers.quantizers.register_quantization_config`` and ``register_quantizer``, which
    raise on a second registration.
    """
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if not issubclass(config_cls, QuantizationConfigMixin):
        raise TypeError(f"config_cls={config_cls!r} must subclass QuantizationConfigMixin.")
    if not issubclass(quantizer_cls, HfQuantizer):
        raise TypeError(f"quantizer_cls={quantizer_cls!r} must subclass HfQuantizer.")
    register_in_mapping(AUTO_QUANTIZATION_CONFIG_MAPPING, method, config_cls, what="quantization config")
    register_in_mapping(AUTO_QUANTIZER_MAPPING, method, quantizer_cls, what="quantizer")


def register_attention_function(name: str, fn: Callable[..., Any], *, mask_like: str | None = "sdpa") -> None:
    """Register an attention function with ``transformers.AttentionInterface`` under ``name`` (idempotent).

    Transformers builds no attention mask for an implementation without a mask function (padding would be lost),
    so the mask function of ``mask_like`` (default: sdpa's boolean mask) is registered under ``name`` too;
    ``mask_like=None`` skips that.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    register_in_mapping(AttentionInterface._global_mapping, name, fn, what="attention function")
    if mask_like is not None:
        mask_fn = AttentionMaskInterface._global_mapping[mask_like]
        register_in_mapping(AttentionMaskInterface._global_mapping, name, mask_fn, what="attention mask")


def register_all() -> None:
    """Import every method sub-package (each registers itself on import). Safe to call any number of times."""
    for module in METHOD_MODULES:
        importlib.import_module(module)
