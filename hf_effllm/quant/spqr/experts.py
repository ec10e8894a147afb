"""SpQR for the stacked expert weights of transformers' Mixture-of-Experts layers.

transformers 5 stores the experts of a MoE layer as 3-D parameters of one ``*Experts`` module
(``gate_up_proj`` ``(E, 2 * I, H)`` and ``down_proj`` ``(E, H, I)``, used as ``F.linear(x, W[e])``). Each expert
matrix is quantized like a ``Linear``, with its own Hessian from the tokens the router sends to it:

* ``gate_up_proj[e]``: the hidden states routed to expert ``e``;
* ``down_proj[e]``: ``act_fn(gate) * up`` of those tokens, computed with expert ``e``'s ``gate_up_proj``.

At run time the packed experts live in :class:`SpQRExpertWeights` (one ``SpQRLinear`` per expert, so the
checkpoint format, validation and bit accounting are the Linear ones) registered as ``<param>_spqr`` beside the
module; a forward pre-hook dequantizes them into the attribute the module's own forward reads (eager, grouped or
batched implementations alike) and a forward hook drops them again, so only one layer's experts are ever in float.
Records in ``config.layers`` are named ``<module>.<param>_spqr.<e>``.

Example:
    >>> specs = expert_params(layer)  # doctest: +SKIP
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ...compat import mark_weights_initialized
from .config import SpQRConfig
from .linear import SpQRLinear

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
_RECORD = re.compile(r"^(?P<module>.+)\.(?P<param>gate_up_proj|down_proj)_spqr\.(?P<expert>\d+)$")


def is_experts_module(module: nn.Module) -> bool:
    """A transformers-5 experts module this file supports: 3-D ``gate_up_proj`` / ``down_proj`` and ``act_fn``,
    no expert biases."""
    params = dict(module.named_parameters(recurse=False))
    return (
        all(isinstance(params.get(p), nn.Parameter) and params[p].dim() == 3 for p in EXPERT_PARAMS)
        and callable(getattr(module, "act_fn", None))
        and not any(n.endswith("_bias") for n in params)
    )


def experts_modules(root: nn.Module) -> dict[str, nn.Module]:
    """Supported experts modules below ``root`` by relative name."""
    return {n: m for n, m in root.named_modules() if is_experts_module(m)}


def record_name(module_name: str, param: str, expert: int) -> str:
    """The ``config.layers`` record (and state-dict module path) of one expert matrix."""
    return f"{module_name}.{param}_spqr.{expert}"


def parse_record_name(name: str) -> tuple[str, str, int] | None:
    """``(module, param, expert)`` of an expert record name, or ``None`` for a Linear record."""
    m = _RECORD.match(name)
    return (m["module"], m["param"], int(m["expert"])) if m else None


class SpQRExpertWeights(nn.ModuleList):
    """The packed matrices of one stacked expert parameter, one :class:`SpQRLinear` (no bias) per expert."""

    def dequantize(self, dtype: torch.dtype, device: torch.device, experts: list[int] | None = None) -> torch.Tensor:
        """``(E, out, in)`` weights in the original column order (Triton kernel on CUDA, PyTorch elsewhere).

        With ``experts``, only those are dequantized and the others are zeros (a MoE forward reads only the experts
        its router picked)."""
        from ...kernels.spqr import HAS_TRITON, fused_supported, spqr_dequantize_triton

        first = self[0]
        out = torch.zeros(len(self), first.out_features, first.in_features, dtype=dtype, device=device)
        for e in range(len(self)) if experts is None else experts:
            lin = self[e]
            if lin.qweight.is_cuda and HAS_TRITON and fused_supported(lin.bits, lin.group_size):
                w = spqr_dequantize_triton(
                    lin.packed_tensors(), dtype=dtype, layout=lin.kernel_layout(), original_order=True,
                    **lin.packed_meta(),
                )  # fmt: skip
            else:
                w = lin.dequantize()
            out[e].copy_(w)
        return out


def _materialize(module: nn.Module, args: tuple, kwargs: dict) -> None:
    hidden = args[0] if args else kwargs["hidden_states"]
    index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
    holders = {p: h for p in EXPERT_PARAMS if (h := getattr(module, f"{p}_spqr", None)) is not None}
    picked = None
    if torch.is_tensor(index) and holders:  # only the experts the router picked (a decode step needs top-k of E)
        n_exp = len(next(iter(holders.values())))
        picked = [e for e in torch.unique(index).tolist() if 0 <= e < n_exp]
    for p, holder in holders.items():
        setattr(module, p, holder.dequantize(hidden.dtype, hidden.device, picked))


def _release(module: nn.Module, *_: Any) -> None:
    for p in EXPERT_PARAMS:
        if getattr(module, f"{p}_spqr", None) is not None and p in module.__dict__:
            del module.__dict__[p]


def attach(module: nn.Module, param: str, holder: SpQRExpertWeights) -> None:
    """Replace ``module.<param>`` (a 3-D parameter) by the packed ``holder`` and the dequantizing hooks."""
    if param in module._parameters:
        del module._parameters[param]
    module.add_module(f"{param}_spqr", holder)
    mark_weights_initialized(module)  # its weights come from the packed holders, not from initialisation
    if not getattr(module, "_hf_effllm_spqr_hooks", False):
        module.register_forward_pre_hook(_materialize, with_kwargs=True)
        module.register_forward_hook(_release)
        module._hf_effllm_spqr_hooks = True


def empty_holder(
    num_experts: int, records: dict[int, dict[str, Any]], config: SpQRConfig, module_name: str, param: str
) -> SpQRExpertWeights:
    """Meta-device ``SpQRLinear`` shells sized by the records (for loading a packed checkpoint); ``module_name`` and
    ``param`` name the records for ``config.dynamic``."""
    shells = [
        SpQRLinear.from_record(records[e], config.for_module(record_name(module_name, param, e)), bias=False)
        for e in range(num_experts)
    ]
    return SpQRExpertWeights(shells)


@torch.no_grad()
def expert_hessians(module: nn.Module, calls: list[tuple[tuple, dict]]) -> dict[str, list[tuple[torch.Tensor, int]]]:
    """Per expert, ``(2 X^T X / n, n)`` of its routed inputs for ``gate_up_proj`` and ``down_proj``.

    ``calls`` are the ``(args, kwargs)`` the module received (hidden states ``(T, H)``, top-k expert indices
    ``(T, k)``, weights). Experts no token reached get ``(None, 0)`` (round-to-nearest with bi-level statistics).
    """
    gate_up, down = module.gate_up_proj, module.down_proj
    n_exp = gate_up.shape[0]
    acc_gu = [torch.zeros(gate_up.shape[2], gate_up.shape[2], device=gate_up.device) for _ in range(n_exp)]
    acc_dn = [torch.zeros(down.shape[2], down.shape[2], device=down.device) for _ in range(n_exp)]
    counts = [0] * n_exp
    for args, kwargs in calls:
        hidden = (args[0] if args else kwargs["hidden_states"]).reshape(-1, gate_up.shape[2])
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        index = index.reshape(hidden.shape[0], -1)
        for e in range(n_exp):
            x = hidden[(index == e).any(-1)].float()
            if not x.shape[0]:
                continue
            acc_gu[e].addmm_(x.T, x)
            gate, up = F.linear(x, gate_up[e].float()).chunk(2, dim=-1)
            h = module.act_fn(gate) * up
            acc_dn[e].addmm_(h.T, h)
            counts[e] += x.shape[0]
    return {
        "gate_up_proj": [(acc_gu[e] * (2.0 / counts[e]) if counts[e] else None, counts[e]) for e in range(n_exp)],
        "down_proj": [(acc_dn[e] * (2.0 / counts[e]) if counts[e] else None, counts[e]) for e in range(n_exp)],
    }
