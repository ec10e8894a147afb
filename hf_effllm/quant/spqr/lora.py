"""LoRA adapters on SpQR-quantized layers through PEFT's custom-module API (QLoRA-style fine-tuning).

The packed weights stay frozen and packed; each adapted ``SpQRLinear`` gets PEFT's low-rank ``lora_A``/``lora_B``
beside it, and gradients reach earlier layers through the quantized layers' backward pass. PEFT does not know the
``SpQRLinear`` type by itself: :func:`register_lora` adds it to a ``LoraConfig`` (PEFT's documented experimental API
``LoraConfig._register_custom_module``), before ``get_peft_model`` and again before ``PeftModel.from_pretrained``
(the mapping is not saved with the adapter). ``target_modules="all-linear"`` only finds ``nn.Linear`` layers: name
the projections instead.

Example:
    >>> from peft import LoraConfig, get_peft_model  # doctest: +SKIP
    >>> config = register_lora(LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    >>> model = get_peft_model(spqr_model, config)  # doctest: +SKIP
    >>> # later: PeftModel.from_pretrained(spqr_model, adapter_dir,
    >>> #     config=register_lora(LoraConfig.from_pretrained(adapter_dir)))
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.lora import LoraConfig, LoraLayer

from ...errors import HfEffllmError
from .linear import SpQRLinear


class SpQRLoraLinear(torch.nn.Module, LoraLayer):
    """A PEFT LoRA layer around a frozen :class:`SpQRLinear`: ``base(x) + scaling * B(A(dropout(x)))``.

    Merging is refused (the sum of a packed weight and a dense update is not a packed weight): load the adapter onto
    the dequantized model (``model.dequantize()``) to merge into float weights.
    """

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:  # fmt: skip
        for option in ("use_dora", "use_alora"):
            if getattr(config, option, False):
                raise HfEffllmError(f"LoraConfig({option}=True) is not supported on SpQR layers; set it to False.")
        super().__init__()
        with warnings.catch_warnings():  # PEFT warns about every custom layer type; this one is the point
            warnings.filterwarnings("ignore", message="Unsupported layer type .*SpQRLinear")
            LoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:
            raise HfEffllmError("adapter_names=... (a different adapter per sample) is not supported on SpQR layers.")
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            update = lora_b(lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype))))
            result = result + (update * self.scaling[name]).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise HfEffllmError(
            "LoRA adapters cannot be merged into SpQR-packed weights. To merge: save the adapter, load the SpQR "
            "model, call .dequantize() on it (float weights), load the adapter onto that float model with "
            "PeftModel.from_pretrained and call merge_and_unload(); or keep the adapter unmerged."
        )

    def unmerge(self) -> None:  # nothing is ever merged
        return None

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


LORA_CUSTOM_MODULES: dict[type[torch.nn.Module], type[torch.nn.Module]] = {SpQRLinear: SpQRLoraLinear}


def register_lora(config: LoraConfig) -> LoraConfig:
    """Let PEFT put LoRA adapters on :class:`SpQRLinear` layers; returns ``config`` (registered in place).

    Args:
        config: a ``peft.LoraConfig``.

    Returns:
        The same config, with ``SpQRLinear -> SpQRLoraLinear`` in its custom-module mapping.
    """
    if not isinstance(config, LoraConfig):
        raise HfEffllmError(f"config={type(config).__name__} is not a peft.LoraConfig; pass a LoraConfig.")
    config._register_custom_module(LORA_CUSTOM_MODULES)
    return config
