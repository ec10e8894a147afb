"""SpQR (Dettmers et al. 2023) as a transformers quantizer: ``SpQRConfig``, ``SpQRLinear``, ``quantize_spqr``.

Importing this package registers the config and quantizer under ``"hf_effllm_spqr"`` (the name ``"spqr"`` belongs
to transformers' built-in loader of pre-quantized checkpoints), the ``hf-effllm quantize`` command and the SpQR
quickstart stage.
"""

from __future__ import annotations

from ...cli import register_command
from ...quickstart import register_stage
from ...registration import register_quantization_method
from . import cli
from .config import METHOD_NAME, SpQRConfig
from .engine import spqr_quantize_matrix
from .format import dequantize_weight, pack_bits, unpack_bits
from .linear import SpQRLinear
from .quantizer import SpQRHfQuantizer, quantize_spqr

register_quantization_method(METHOD_NAME, SpQRConfig, SpQRHfQuantizer)
register_command(
    "quantize", "quantize a model's weights with SpQR and write a Hub-ready checkpoint", cli.configure, cli.run
)
register_stage("spqr", cli.quickstart_stage, order=10)

__all__ = [
    "METHOD_NAME",
    "SpQRConfig",
    "SpQRHfQuantizer",
    "SpQRLinear",
    "dequantize_weight",
    "pack_bits",
    "quantize_spqr",
    "spqr_quantize_matrix",
    "unpack_bits",
]
