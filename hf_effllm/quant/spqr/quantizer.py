"""The transformers integration: ``SpQRHfQuantizer`` and :func:`quantize_spqr` for models already in memory.

* ``from_pretrained(float_checkpoint, quantization_config=SpQRConfig(...))``: loads the float weights, then
  calibrates and quantizes layer by layer (``_process_model_after_weight_loading``).
* ``save_pretrained(dir)``: the ``SpQRLinear`` buffers are the packed format; config.json carries the config with
  the per-layer records.
* ``from_pretrained(dir)``: the records rebuild the ``SpQRLinear`` modules before the weights are read; after
  loading every layer's tensors are checked against its record (no recalibration).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from ...compat import save_state_dict_names_as_is
from ...errors import HfEffllmError
from .config import METHOD_NAME, SpQRConfig
from .engine import calibrate_and_quantize, record_results
from .experts import EXPERT_PARAMS, SpQRExpertWeights, attach, empty_holder, parse_record_name, record_name
from .linear import SpQRLinear


def _mark_quantized(model: nn.Module, config: SpQRConfig) -> None:
    model.config.quantization_config = config
    model.is_quantized = True
    model.quantization_method = METHOD_NAME
    model.hf_quantizer = SpQRHfQuantizer(config, pre_quantized=True)


def _replace_with_packed(model: nn.Module, results: dict[str, Any], config: SpQRConfig) -> None:
    stacked: dict[tuple[str, str], dict[int, Any]] = {}
    for name, res in results.items():
        parsed = parse_record_name(name)
        if parsed is not None:  # one matrix of a stacked MoE expert parameter
            stacked.setdefault(parsed[:2], {})[parsed[2]] = res
            continue
        lin = model.get_submodule(name)
        model.set_submodule(
            name,
            SpQRLinear.from_packed(res.tensors, config.for_module(name), in_features=lin.in_features, bias=lin.bias),
        )
    for (module_name, param), per_expert in stacked.items():
        holder = SpQRExpertWeights(
            SpQRLinear.from_packed(
                r.tensors,
                config.for_module(record_name(module_name, param, e)),
                in_features=r.weight.shape[1],
                bias=None,
            )
            for e, r in sorted(per_expert.items())
        )
        attach(model.get_submodule(module_name), param, holder)
    if stacked:
        save_state_dict_names_as_is(model)


@torch.no_grad()
def quantize_spqr(
    model: nn.Module,
    config: SpQRConfig | None = None,
    *,
    tokenizer: Any = None,
    calibration_ids: torch.Tensor | None = None,
    progress: bool = False,
) -> nn.Module:
    """Calibrate and quantize a model in memory with SpQR; its decoder-layer ``nn.Linear`` modules become
    ``SpQRLinear`` and stacked MoE expert weights become packed per-expert ``SpQRLinear`` sets (in place), and
    ``config`` records the per-matrix and total average bits.

    Args:
        model: a transformers causal LM (any dtype/device; calibration runs where the model is).
        config: the :class:`SpQRConfig` (default ``SpQRConfig()``); it is filled in and attached to ``model.config``.
        tokenizer: tokenizer for the calibration text (default: ``config.tokenizer`` or the model's own).
        calibration_ids: ready-made (nsamples, seqlen) token ids; then ``dataset``/``tokenizer`` are not used.
        progress: print one line per decoder layer.

    Returns:
        The same model, quantized; ``model.save_pretrained(dir)`` writes the packed checkpoint.

    Example:
        >>> import hf_effllm
        >>> model = hf_effllm.load_model()  # doctest: +SKIP
        >>> hf_effllm.quantize_spqr(model, hf_effllm.SpQRConfig(bits=3, nsamples=16, seqlen=512))  # doctest: +SKIP
    """
    config = config if config is not None else SpQRConfig()
    if not isinstance(config, SpQRConfig):
        raise HfEffllmError(f"config={type(config).__name__} must be a SpQRConfig.")
    if config.layers:
        raise HfEffllmError(
            "config.layers is already filled (this config belongs to a quantized model); pass a new one."
        )
    if any(isinstance(m, SpQRLinear) for m in model.modules()):
        raise HfEffllmError("the model is already SpQR-quantized; load the float model to quantize it again.")
    if calibration_ids is not None and (calibration_ids.dim() != 2 or calibration_ids.dtype != torch.long):
        raise HfEffllmError(
            f"calibration_ids has shape {tuple(calibration_ids.shape)} {calibration_ids.dtype}; "
            "give a LongTensor (nsamples, seqlen)."
        )
    results = calibrate_and_quantize(model, config, tokenizer=tokenizer, batches=calibration_ids, progress=progress)
    record_results(config, results)
    _replace_with_packed(model, results, config)
    _mark_quantized(model, config)
    return model


def _rebuild_modules(model: nn.Module, config: SpQRConfig) -> None:
    if not config.layers:
        raise HfEffllmError(
            "this checkpoint's quantization_config has no per-layer records ('layers'); it was not written by "
            "hf-effllm's SpQR save_pretrained. Quantize the float model instead."
        )
    stacked: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for name, rec in config.layers.items():
        parsed = parse_record_name(name)
        if parsed is not None:
            stacked.setdefault(parsed[:2], {})[parsed[2]] = rec
            continue
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise HfEffllmError(f"quantization_config.layers names {name!r}, which this model does not have.") from None
        if not isinstance(lin, nn.Linear) or (lin.out_features, lin.in_features) != (
            rec["out_features"],
            rec["in_features"],
        ):
            raise HfEffllmError(
                f"quantization_config.layers[{name!r}] says {rec['out_features']}x{rec['in_features']}, but the model "
                f"has {lin!r} there; the config does not belong to this architecture."
            )
        new = SpQRLinear.from_record(
            rec,
            config.for_module(name),
            bias=lin.bias is not None,
            dtype=lin.bias.dtype if lin.bias is not None else None,
        )
        model.set_submodule(name, new)
    for (module_name, param), records in stacked.items():
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise HfEffllmError(
                f"quantization_config.layers names experts of {module_name!r}, which this model does not have."
            ) from None
        weight = module._parameters.get(param)
        expected = {(int(r["out_features"]), int(r["in_features"])) for r in records.values()}
        if (
            weight is None
            or weight.dim() != 3
            or sorted(records) != list(range(weight.shape[0]))
            or expected != {tuple(weight.shape[1:])}
        ):
            raise HfEffllmError(
                f"quantization_config.layers has {len(records)} packed experts of shape {sorted(expected)} for "
                f"{module_name}.{param}, but the model has {None if weight is None else tuple(weight.shape)}; the "
                "config does not belong to this architecture."
            )
        attach(module, param, empty_holder(weight.shape[0], records, config, module_name, param))
    if stacked:
        save_state_dict_names_as_is(model)


def _restore_and_validate(model: nn.Module, config: SpQRConfig) -> None:
    for name, module in model.named_modules():
        if isinstance(module, SpQRLinear):
            for key in ("stats2", "outlier_values"):  # a dtype= argument may have upcast the fp16 tensors (exactly)
                buf = getattr(module, key)
                if buf.dtype != torch.float16 and buf.is_floating_point() and not buf.is_meta:
                    setattr(module, key, buf.to(torch.float16))
            module.validate(name, config)


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Replace every ``SpQRLinear`` by an ``nn.Linear`` and every packed expert set by its 3-D parameter, holding the
    dequantized weights in ``dtype`` (default: float32), in place; what ``model.dequantize()`` runs."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32
    for module in list(model.modules()):
        for param in EXPERT_PARAMS:
            holder = module._modules.get(f"{param}_spqr")
            if isinstance(holder, SpQRExpertWeights):
                weight = holder.dequantize(dtype, holder[0].qweight.device)
                del module._modules[f"{param}_spqr"]
                module.register_parameter(param, nn.Parameter(weight))
    for name, module in list(model.named_modules()):
        if isinstance(module, SpQRLinear):
            lin = nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None, device=module.qweight.device
            ).to(dtype)
            lin.weight.copy_(module.dequantize())
            if module.bias is not None:
                lin.bias.copy_(module.bias)
            model.set_submodule(name, lin)
    return model


class SpQRHfQuantizer(HfQuantizer):
    """``HfQuantizer`` of SpQR: quantizes float checkpoints after loading, rebuilds packed ones before loading."""

    requires_calibration = False

    def __init__(self, quantization_config: SpQRConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        if self.pre_quantized:
            _rebuild_modules(model, self.quantization_config)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            _restore_and_validate(model, self.quantization_config)
            return model
        config = self.quantization_config
        results = calibrate_and_quantize(model, config)
        record_results(config, results)
        _replace_with_packed(model, results, config)
        model.config.quantization_config = config
        return model

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        return dequantize_model(model, dtype)

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters train on top of the frozen packed weights (``hf_effllm.quant.spqr.lora``); the Trainer accepts a
        SpQR model once PEFT adapters are attached."""
        return True
