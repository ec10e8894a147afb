"""Block-wise tuning of what SpQR stores in float, after a decoder layer is quantized (``SpQRConfig.tune_epochs``).

The codes stay as GPTQ chose them. What is tuned is what the packed format keeps in 16 bits anyway, so the average
bits do not change (the tuning adds no stored bit; later layers, calibrated on the tuned outputs, may keep a few
more or fewer outliers): the second-level statistics (``stats2``: step and minimum of the 3-bit scale and zero codes of
each block of rows), the outlier values, and the layer's float vectors (norm weights, biases). The loss is the mean
squared difference between the quantized layer's output and the float layer's output on the float model's own
activations, so each layer also corrects the error the quantized layers before it let through (as in block-wise
reconstruction methods, e.g. OmniQuant / EfficientQAT's block stage; here only the stored float parameters move).

Measured on the CPU (embedded SmolLM2-135M, 3 bits + 3-bit statistics over 32 columns, 3.60 average bits, 16 x 512
calibration tokens, 8192 held-out tokens): +29.5% -> +18.3% at 3.60 bits and +5.2% -> +2.9% at 4.79 bits
(``benchmarks/results/spqr_quality_reduced_tuned_cpu.md``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .config import SpQRConfig
from .engine import _layer_output
from .format import dequantize_stats, dequantize_weight, unpack_flat


class _TunableWeight:
    """A packed weight rebuilt differentiably from fixed codes and trainable float statistics / outliers."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: SpQRConfig, in_features: int) -> None:
        out = tensors["outlier_row_ptr"].shape[0] - 1
        g = -(-in_features // config.group_size)
        self.tensors, self.config, self.out, self.n = tensors, config, out, in_features
        self.codes = unpack_flat(tensors["qweight"], out, in_features, config.bits)
        self.scale_codes = unpack_flat(tensors["qscale"], out, g, config.stats_bits)
        self.zero_codes = unpack_flat(tensors["qzero"], out, g, config.stats_bits)
        self.s2 = tensors["stats2"].float()
        self.s2_ref = self.s2.abs().mean(dim=(0, 1), keepdim=True).clamp_min(1e-8)
        self.d_s2 = torch.zeros_like(self.s2, requires_grad=True)
        self.ov = tensors["outlier_values"].float()
        self.ov_ref = self.ov.abs().mean().clamp_min(1e-8) if self.ov.numel() else self.ov.new_ones(())
        self.d_ov = torch.zeros_like(self.ov, requires_grad=True)
        ptr = tensors["outlier_row_ptr"].long()
        self.rows = torch.repeat_interleave(torch.arange(out, device=ptr.device), ptr[1:] - ptr[:-1])
        self.cols = tensors["outlier_cols"].long()
        perm = tensors.get("perm")
        self.inverse = torch.argsort(perm.long()) if perm is not None else None

    def trainable(self) -> list[torch.Tensor]:
        return [self.d_s2, self.d_ov] if self.cols.numel() else [self.d_s2]

    def weight(self) -> torch.Tensor:
        """The (out, in) weight in the original column order, differentiable in the statistics and outliers."""
        sgs, gs = self.config.stats_group_size, self.config.group_size
        s2 = self.s2 + self.d_s2 * self.s2_ref
        scale = dequantize_stats(self.scale_codes, s2[..., 0], s2[..., 1], sgs).repeat_interleave(gs, 1)[:, : self.n]
        zero = dequantize_stats(self.zero_codes, s2[..., 2], s2[..., 3], sgs).repeat_interleave(gs, 1)[:, : self.n]
        w = scale * (self.codes - zero)
        if self.cols.numel():
            w = w.index_put((self.rows, self.cols), self.ov + self.d_ov * self.ov_ref, accumulate=True)
        return w if self.inverse is None else w[:, self.inverse]

    @torch.no_grad()
    def commit(self) -> torch.Tensor:
        """Write the tuned statistics / outliers into the packed tensors (fp16); returns the stored weight."""
        self.tensors["stats2"] = (self.s2 + self.d_s2 * self.s2_ref).to(torch.float16)
        if self.cols.numel():
            self.tensors["outlier_values"] = (self.ov + self.d_ov * self.ov_ref).to(torch.float16)
        c = self.config
        w = dequantize_weight(
            self.tensors, in_features=self.n, bits=c.bits, group_size=c.group_size, stats_bits=c.stats_bits,
            stats_group_size=c.stats_group_size,
        )  # fmt: skip
        return w if self.inverse is None else w[:, self.inverse]


def tune_layer(
    layer: nn.Module,
    quantized: dict[str, Any],
    inputs: list[torch.Tensor],
    kwargs_list: list[dict[str, Any]],
    targets: list[torch.Tensor],
    config: SpQRConfig,
    prefix: str = "",
) -> None:
    """Tune one quantized decoder layer toward the float layer's outputs (see the module docstring).

    Args:
        layer: the decoder layer, its quantized linears holding their dequantized weights.
        quantized: ``{submodule path: QuantizedMatrix}`` of its quantized ``nn.Linear`` layers; their packed
            tensors and ``weight`` are updated in place, and so are the linears' weights.
        inputs / kwargs_list: the quantized model's inputs of this layer, one per calibration window.
        targets: the float layer's outputs on the float model's inputs, one per window.
        config: gives ``tune_epochs``, ``tune_lr``, ``tune_norm_lr`` and ``seed`` (and, through
            ``config.for_module(prefix + path)``, each linear's stored format).
        prefix: the layer's module path with a trailing dot (for ``config.dynamic``).
    """
    weights = {
        sub: _TunableWeight(res.tensors, config.for_module(prefix + sub), layer.get_submodule(sub).in_features)
        for sub, res in quantized.items()
    }
    dtypes = {sub: layer.get_submodule(sub).weight.dtype for sub in weights}
    # float32 master copies of the layer's float vectors (norm weights, biases): a bf16 model could not take steps
    # of 1e-4 on values near 1
    params = dict(layer.named_parameters())
    vectors = {
        n: p.detach().float().clone().requires_grad_(True)
        for n, p in params.items()
        if p.ndim == 1 and p.is_floating_point()
    }
    groups = [{"params": [t for w in weights.values() for t in w.trainable()], "lr": config.tune_lr}]
    if vectors:
        groups.append({"params": list(vectors.values()), "lr": config.tune_norm_lr})
    opt = torch.optim.Adam(groups)
    gen = torch.Generator().manual_seed(config.seed)
    flags = {n: p.requires_grad for n, p in params.items()}
    try:
        for p in params.values():  # gradients only for the tuned copies, never into the model's own parameters
            p.requires_grad_(False)
        with torch.enable_grad():
            for _ in range(config.tune_epochs):
                for j in torch.randperm(len(inputs), generator=gen).tolist():
                    swap = {f"{sub}.weight": w.weight().to(dtypes[sub]) for sub, w in weights.items()}
                    swap.update({n: v.to(params[n].dtype) for n, v in vectors.items()})
                    out = _layer_output(functional_call(layer, swap, (inputs[j],), kwargs_list[j]))
                    loss = (out.float() - targets[j].float()).square().mean()
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
    with torch.no_grad():
        for n, v in vectors.items():
            params[n].copy_(v.to(params[n].dtype))
    for sub, w in weights.items():
        stored = w.commit()
        lin = layer.get_submodule(sub)
        lin.weight.data.copy_(stored.to(lin.weight.dtype))
        quantized[sub].weight = stored
