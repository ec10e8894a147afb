"""``SpQRLinear``: the runtime module of a SpQR-quantized ``nn.Linear``.

Its buffers are the packed tensors of ``hf_effllm.quant.spqr.format`` (so ``state_dict``/``save_pretrained`` write
exactly the packed format). On CUDA the forward runs the Triton kernels of ``hf_effllm.kernels.spqr``; elsewhere it
dequantizes and multiplies in PyTorch. The packed weight is frozen, but gradients flow through the layer to its
input (and to a trainable bias), so adapters (LoRA through PEFT, see ``hf_effllm.quant.spqr.lora``) train on top of
a quantized model: the backward pass multiplies by the dequantized weight, built on the fly and not kept.

Example:
    >>> layer = SpQRLinear.from_linear(torch.nn.Linear(64, 32), SpQRConfig(bits=4))
    >>> layer(torch.randn(2, 64)).shape
    torch.Size([2, 32])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import HfEffllmError
from .config import SpQRConfig
from .format import expected_shapes, stored_bits, validate_packed

_FP16_BUFFERS = ("stats2", "outlier_values")  # part of the packed format: never cast with the activations' dtype


class SpQRLinear(nn.Module):
    """A linear layer whose weight is stored in the packed SpQR format.

    Args:
        in_features: input features.
        out_features: output features.
        bias: whether the layer has a bias (kept in float).
        bits, group_size, stats_bits, stats_group_size: format parameters (from :class:`SpQRConfig`).
        nnz: number of outliers (sizes the CSR buffers).
        permuted: whether a column permutation is stored.
        device: device of the (empty) buffers.
        dtype: dtype of the bias.

    Attributes:
        cache_weight: CPU path only: keep the dequantized weight after the first forward (float memory, faster
            repeated evaluation; default ``False``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        bits: int,
        group_size: int,
        stats_bits: int,
        stats_group_size: int,
        nnz: int,
        permuted: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.stats_bits, self.stats_group_size = (
            bits,
            group_size,
            stats_bits,
            stats_group_size,
        )
        self.nnz, self.permuted = nnz, permuted
        shapes = expected_shapes(
            out_features=out_features,
            in_features=in_features,
            nnz=nnz,
            bits=bits,
            group_size=group_size,
            stats_bits=stats_bits,
            stats_group_size=stats_group_size,
            permuted=permuted,
        )
        for name, (shape, dt) in shapes.items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))
        if not permuted:
            self.register_buffer("perm", None)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        )
        self.cache_weight = False  # CPU path only: keep the dequantized weight after the first forward
        self._weight_cache: torch.Tensor | None = None
        self._layout: dict[str, Any] | None = None  # Triton kernel layout of the packed buffers, built lazily
        self._cuda_layout: dict[str, Any] | None = None  # CUDA kernel layout (fp16/bf16 on a GPU), built lazily
        self._octet_layout: dict[str, Any] | None = None  # octet kernel layout (fp16/bf16 on a GPU), built lazily

    def _drop_caches(self) -> None:
        self._weight_cache = None
        self._layout = None
        self._cuda_layout = None
        self._octet_layout = None

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.half(): caches describe the old buffers
        self._drop_caches()
        kept = {k: getattr(self, k) for k in _FP16_BUFFERS}
        super()._apply(fn, recurse)
        for key, old in kept.items():  # a dtype cast moves the packed fp16 tensors but keeps them exact fp16
            new = getattr(self, key)
            if new.dtype != old.dtype:
                setattr(self, key, new.to(old.dtype) if old.is_meta or new.is_meta else old.to(new.device))
        return self

    def _load_from_state_dict(self, *args, **kwargs):  # new packed values: rebuild the caches on next use
        self._drop_caches()
        return super()._load_from_state_dict(*args, **kwargs)

    def kernel_layout(self) -> dict[str, Any]:
        """The packed buffers re-laid out for the Triton kernels (``hf_effllm.kernels.spqr.kernel_layout``), built
        on first use and kept until the buffers move or are reloaded. It costs device memory: about
        ``lane_bits(bits) + 0.75`` bits per weight plus 8 bytes per outlier."""
        from ...kernels.spqr import kernel_layout

        dev = self.qweight.device
        if self._layout is None or self._layout["codes"].device != dev:
            with torch.no_grad():
                self._layout = kernel_layout(self.packed_tensors(), **self.packed_meta())
        return self._layout

    @classmethod
    def from_record(
        cls, record: dict[str, Any], config: SpQRConfig, *, bias: bool, dtype: torch.dtype | None = None
    ) -> SpQRLinear:
        """An empty (meta-device) layer sized by its ``config.layers`` record, to be filled by a checkpoint."""
        with torch.device("meta"):
            return cls(
                record["in_features"],
                record["out_features"],
                bias=bias,
                bits=config.bits,
                group_size=config.group_size,
                stats_bits=config.stats_bits,
                stats_group_size=config.stats_group_size,
                nnz=int(record["nnz"]),
                permuted=config.permutation == "act_order",
                dtype=dtype,
            )

    @classmethod
    def from_packed(
        cls, tensors: dict[str, torch.Tensor], config: SpQRConfig, *, in_features: int, bias: torch.Tensor | None
    ) -> SpQRLinear:
        """Build from the packed tensors of :func:`hf_effllm.quant.spqr.engine.spqr_quantize_matrix`."""
        qw = tensors["qweight"]
        layer = cls(
            in_features,
            tensors["outlier_row_ptr"].shape[0] - 1,
            bias=bias is not None,
            bits=config.bits,
            group_size=config.group_size,
            stats_bits=config.stats_bits,
            stats_group_size=config.stats_group_size,
            nnz=tensors["outlier_values"].numel(),
            permuted=tensors.get("perm") is not None,
            device=qw.device,
            dtype=bias.dtype if bias is not None else None,
        )
        for name, value in tensors.items():
            getattr(layer, name).copy_(value)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: SpQRConfig, hessian: torch.Tensor | None = None) -> SpQRLinear:
        """Quantize one ``nn.Linear`` (identity Hessian = round-to-nearest with bi-level statistics if ``None``)."""
        from .engine import spqr_quantize_matrix

        res = spqr_quantize_matrix(linear.weight, hessian, config)
        return cls.from_packed(res.tensors, config, in_features=linear.in_features, bias=linear.bias)

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """The packed buffers by name (``perm`` only when permuted)."""
        names = expected_shapes(
            out_features=self.out_features,
            in_features=self.in_features,
            nnz=self.nnz,
            bits=self.bits,
            group_size=self.group_size,
            stats_bits=self.stats_bits,
            stats_group_size=self.stats_group_size,
            permuted=self.permuted,
        )
        return {k: getattr(self, k) for k in names}

    def packed_meta(self) -> dict[str, Any]:
        """Format parameters for the functions of ``hf_effllm.kernels.spqr``."""
        return dict(
            in_features=self.in_features,
            bits=self.bits,
            group_size=self.group_size,
            stats_bits=self.stats_bits,
            stats_group_size=self.stats_group_size,
        )

    @property
    def avg_bits(self) -> float:
        """Stored bits per weight of this layer (codes + statistics + outliers + permutation; bias excluded)."""
        return stored_bits(self.packed_tensors()) / (self.in_features * self.out_features)

    def validate(self, name: str, config: SpQRConfig) -> None:
        """Check the buffers against this layer's record in ``config.layers`` (raises naming the bad tensor)."""
        record = (config.layers or {}).get(name)
        if record is None:
            raise HfEffllmError(f"quantization_config.layers has no record for {name!r}.")
        validate_packed(name, self.packed_tensors(), record, config.for_module(name))

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in) in the original column order."""
        from .format import dequantize_weight

        w = dequantize_weight(self.packed_tensors(), **{k: v for k, v in self.packed_meta().items()})
        return w if self.perm is None else w[:, torch.argsort(self.perm.long())]

    def cuda_layout(self) -> dict[str, Any]:
        """The packed buffers re-laid out for the CUDA kernels (``hf_effllm.kernels.spqr_cuda.cuda_layout``), built
        on first use and kept like :meth:`kernel_layout`: about 4.75 bits per weight plus 14 bytes per outlier."""
        from ...kernels.spqr_cuda import cuda_layout

        dev = self.qweight.device
        if self._cuda_layout is None or self._cuda_layout["codes"].device != dev:
            with torch.no_grad():
                self._cuda_layout = cuda_layout(self.packed_tensors(), **self.packed_meta())
        return self._cuda_layout

    def octet_layout(self) -> dict[str, Any]:
        """The packed buffers re-laid out for the octet kernels (``hf_effllm.kernels.spqr_octet.octet_layout``),
        built on first use and kept: about 4.75 bits per weight plus 14 bytes per outlier and 4 per row."""
        from ...kernels.spqr_octet import octet_layout

        dev = self.qweight.device
        if self._octet_layout is None or self._octet_layout["codes"].device != dev:
            with torch.no_grad():
                self._octet_layout = octet_layout(self.packed_tensors(), **self.packed_meta())
        return self._octet_layout

    def _use_cuda(self, x: torch.Tensor) -> bool:
        if not x.is_cuda or torch.compiler.is_compiling():  # compiled: the Triton kernels (see spqr_matmul)
            return False
        from ...kernels.spqr_cuda import supports  # answered once per device, dtype and format

        return supports(x, self.packed_meta()) is None

    def _use_triton(self, device: torch.device) -> bool:
        from ...kernels.spqr import HAS_TRITON, fused_supported

        return device.type == "cuda" and HAS_TRITON and fused_supported(self.bits, self.group_size)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        from ...kernels.spqr import spqr_matmul

        t, meta = self.packed_tensors(), self.packed_meta()
        with torch.no_grad():
            if self._use_cuda(x):
                from ...kernels.spqr import OCTET_PATHS, cuda_path

                path = cuda_path(x.numel() // self.in_features, meta, x.device, out_features=self.out_features)
                if path in OCTET_PATHS:
                    return spqr_matmul(x, t, bias=self.bias, octet_layout=self.octet_layout(), **meta)
                return spqr_matmul(x, t, bias=self.bias, cuda_layout=self.cuda_layout(), **meta)
            layout = self.kernel_layout() if self._use_triton(x.device) else None
            return spqr_matmul(x, t, bias=self.bias, layout=layout, **meta)

    def dense_weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The dequantized weight (out, in) in the original column order, in ``dtype`` (CUDA or Triton kernels on a
        GPU)."""
        probe = torch.empty(0, self.in_features, dtype=dtype, device=device)
        if self._use_cuda(probe):
            from ...kernels.spqr import OCTET_PATHS, cuda_path
            from ...kernels.spqr_cuda import spqr_dequantize_cuda
            from ...kernels.spqr_octet import MAX_ROWS, spqr_octet_dequant

            octet = cuda_path(MAX_ROWS + 1, self.packed_meta(), probe.device) in OCTET_PATHS  # prefill path
            lay = self.octet_layout() if octet else self.cuda_layout()
            with torch.no_grad():
                w = (spqr_octet_dequant if octet else spqr_dequantize_cuda)(lay, dtype)
                return w.index_select(1, lay["perm_inv"]) if "perm_inv" in lay else w
        if self._use_triton(torch.device(device)):
            from ...kernels.spqr import spqr_dequantize_triton

            with torch.no_grad():
                return spqr_dequantize_triton(
                    self.packed_tensors(), dtype=dtype, layout=self.kernel_layout(), original_order=True,
                    **self.packed_meta(),
                )  # fmt: skip
        return self.dequantize().to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache_weight and not x.is_cuda:
            if self._weight_cache is None or self._weight_cache.dtype != x.dtype:
                self._weight_cache = self.dequantize().to(x.dtype)
            return nn.functional.linear(x, self._weight_cache, self.bias)
        trainable_bias = self.bias is not None and self.bias.requires_grad
        if torch.is_grad_enabled() and (x.requires_grad or trainable_bias):
            return _SpQRLinearFunction.apply(x, self.bias, self)
        return self._matmul(x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, stats_bits={self.stats_bits}, stats_group_size={self.stats_group_size}, "
            f"outliers={self.nnz}, permuted={self.permuted}, bias={self.bias is not None}"
        )


class _SpQRLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with a frozen packed ``W``: forward through the layer's kernels, backward ``dy W`` with the
    weight dequantized for that one product (nothing the size of ``W`` is kept between the passes)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: SpQRLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer._matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layer: SpQRLinear = ctx.layer
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad, layer.dense_weight(grad.dtype, grad.device))
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(layer.bias.dtype)
        return grad_x, grad_bias, None
