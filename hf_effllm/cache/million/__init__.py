"""MILLION: a product-quantized KV cache for transformers ``generate``, with a Triton decode kernel.

Importing this package registers the ``"million"`` attention function (and its mask builder, the ``sdpa`` one)
with transformers, and the ``million`` quickstart stage. Exposed as ``hf_effllm.million``.

Example:
    >>> import hf_effllm  # doctest: +SKIP
    >>> books = hf_effllm.million.train_codebooks(model, config=hf_effllm.MillionConfig(), tokenizer=tok)  # doctest: +SKIP
    >>> model.set_attn_implementation("million")  # doctest: +SKIP
    >>> out = model.generate(ids, **hf_effllm.cache_kwargs(hf_effllm.MillionCache(model.config, books)))  # doctest: +SKIP
"""

from __future__ import annotations

from ...registration import register_attention_function
from .attention import ATTENTION_NAME, million_attention_forward
from .cache import MillionCache, MillionLayer
from .codebooks import MillionCodebooks, ModelSignature, collect_kv, fit_codebooks, kmeans, train_codebooks
from .config import MillionConfig


def _register() -> None:
    register_attention_function(ATTENTION_NAME, million_attention_forward)  # prefill runs sdpa: sdpa's mask
    from . import cli  # noqa: F401  (registers the quickstart stage)


_register()

__all__ = [
    "ATTENTION_NAME",
    "MillionCache",
    "MillionCodebooks",
    "MillionConfig",
    "MillionLayer",
    "ModelSignature",
    "collect_kv",
    "fit_codebooks",
    "kmeans",
    "million_attention_forward",
    "train_codebooks",
]
