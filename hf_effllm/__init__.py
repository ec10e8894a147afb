"""hf-effllm: efficiency methods for stock Hugging Face models, through the stack's own extension points.

``import hf_effllm`` registers every method with transformers and PEFT; importing again, reloading, or importing
in worker processes is harmless.

Example:
    >>> import hf_effllm
    >>> model, tok = hf_effllm.load_model(), hf_effllm.load_tokenizer()  # doctest: +SKIP
    >>> hf_effllm.perplexity(model, hf_effllm.corpus_text("eval"), tokenizer=tok).perplexity  # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"

from .attention import seer
from .attention.seer import SeerAttentionConfig, apply_seer_attention
from .cache import million
from .cache.million import MillionCache, MillionConfig
from .compat import cache_kwargs, output_cache
from .data import calibration_batches, corpus_books, corpus_text, load_model, load_tokenizer, split_books
from .errors import HfEffllmError
from .evaluation import PerplexityResult, perplexity
from .optim import Muon, MuonConfig
from .quant.spqr import SpQRConfig, SpQRLinear, quantize_spqr
from .registration import register_all

register_all()

__all__ = [
    "Muon",
    "MuonConfig",
    "MillionCache",
    "MillionConfig",
    "million",
    "SeerAttentionConfig",
    "apply_seer_attention",
    "seer",
    "SpQRConfig",
    "SpQRLinear",
    "quantize_spqr",
    "HfEffllmError",
    "PerplexityResult",
    "__version__",
    "cache_kwargs",
    "calibration_batches",
    "corpus_books",
    "corpus_text",
    "load_model",
    "load_tokenizer",
    "output_cache",
    "perplexity",
    "split_books",
]
