"""``apply_seer_attention``: attach gates to every attention layer and switch the model to ``seer_attention``."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ...errors import HfEffllmError
from .attention import ATTENTION_NAME
from .config import SeerAttentionConfig
from .gate import SeerAttnGate, _PendingHook


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a decoder (those with ``q_proj``/``k_proj``/``v_proj`` and ``layer_idx``)."""
    found = [
        m
        for m in model.modules()
        if all(isinstance(getattr(m, n, None), nn.Module) for n in ("q_proj", "k_proj", "v_proj"))
        and isinstance(getattr(m, "layer_idx", None), int)
    ]
    return sorted(found, key=lambda m: m.layer_idx)


def _text_config(model: nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _rope_theta(text_config: Any, config: SeerAttentionConfig) -> float:
    if config.rope_theta is not None:
        return float(config.rope_theta)
    params = getattr(text_config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(text_config, "rope_theta", None) or 10000.0)


def model_signature(model: nn.Module) -> dict[str, Any]:
    """What gates depend on: gated layer indices, heads, KV heads, head_dim (and the model type, informative)."""
    layers = attention_layers(model)
    if not layers:
        kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        raise HfEffllmError(
            f"model of type {kind!r} has no attention layers with "
            "q_proj/k_proj/v_proj and layer_idx; SeerAttention supports llama/qwen2/qwen3/mistral-style decoders."
        )
    tc = _text_config(model)
    hq = int(tc.num_attention_heads)
    hkv = int(getattr(tc, "num_key_value_heads", None) or hq)
    return {
        "model_type": getattr(tc, "model_type", None),
        "layer_indices": [m.layer_idx for m in layers],
        "num_attention_heads": hq,
        "num_key_value_heads": hkv,
        "head_dim": int(getattr(layers[0], "head_dim", None) or tc.hidden_size // hq),
    }


def seer_config_of(model: nn.Module) -> SeerAttentionConfig | None:
    """The :class:`SeerAttentionConfig` a model was set up with (None without SeerAttention)."""
    return getattr(model, "_seer_config", None)


def gates_of(model: nn.Module) -> dict[int, SeerAttnGate]:
    """``{layer_idx: gate}`` of a model set up with :func:`apply_seer_attention`."""
    return {
        m.layer_idx: m.seer_gate
        for m in attention_layers(model)
        if isinstance(getattr(m, "seer_gate", None), SeerAttnGate)
    }


def _gate_keys(model: nn.Module) -> set[str]:
    """The ``state_dict`` keys of the model's gates."""
    return {
        f"{name}.{key}"
        for name, mod in model.named_modules()
        if isinstance(mod, SeerAttnGate)
        for key in mod.state_dict()
    }


def remove_seer_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_seer_attention`: drop gates and hooks, restore the previous attention implementation."""
    if getattr(model, "_keys_to_ignore_on_save", None):
        model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save) - _gate_keys(model)
    for m in attention_layers(model):
        gate = getattr(m, "seer_gate", None)
        if gate is None:
            continue
        for handle in getattr(gate, "_hook_handles", []):
            handle.remove()
        for sub in (m.q_proj, m.k_proj, getattr(m, "q_norm", None), getattr(m, "k_norm", None)):
            if sub is None:
                continue
            for key, hook in list(sub._forward_hooks.items()):
                if isinstance(hook, _PendingHook):
                    del sub._forward_hooks[key]
        del m.seer_gate
    previous = getattr(model, "_seer_previous_attn", None)
    if previous is not None:
        model.set_attn_implementation(previous)
    for attr in ("_seer_config", "_seer_previous_attn"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def set_seer_options(model: nn.Module, **changes: Any) -> SeerAttentionConfig:
    """Change inference options (``nz_ratio``, ``threshold``, ``top_p``, ``dense_layers``, ...) of an applied model.

    The new config is validated; architecture fields (pooling, block size, gate width) cannot change here.

    Example:
        >>> set_seer_options(model, nz_ratio=0.1, threshold=None)  # doctest: +SKIP
    """
    from dataclasses import fields, replace

    old = seer_config_of(model)
    if old is None:
        raise HfEffllmError("model has no SeerAttention; call hf_effllm.apply_seer_attention(model, config) first.")
    known = sorted(f.name for f in fields(SeerAttentionConfig))
    unknown = sorted(set(changes) - set(known))
    if unknown:
        raise HfEffllmError(f"set_seer_options got unknown option(s) {unknown}; SeerAttentionConfig fields: {known}.")
    selectors = ("threshold", "nz_ratio", "top_p")
    for name in selectors:  # giving one selection rule clears the others unless they are given too
        if changes.get(name) is not None:
            for other in selectors:
                changes.setdefault(other, None)
    new = replace(old, **changes)
    if new.architecture() != old.architecture():
        raise HfEffllmError(
            f"set_seer_options cannot change gate architecture fields {sorted(changes)}; re-apply and re-distil."
        )
    _check_dense_layers(new, model_signature(model)["layer_indices"])
    model._seer_config = new
    for gate in gates_of(model).values():
        gate.seer_config = new
    return new


def _check_dense_layers(config: SeerAttentionConfig, layer_indices: list[int]) -> None:
    bad = [i for i in config.dense_layers if i not in layer_indices]
    if bad:
        raise HfEffllmError(
            f"dense_layers={config.dense_layers} names layers {bad} that the model does not have; "
            f"valid: 0..{max(layer_indices)}."
        )


def apply_seer_attention(
    model: nn.Module,
    config: SeerAttentionConfig | None = None,
    gates: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
) -> nn.Module:
    """Attach a SeerAttention gate to every attention layer and switch the model to ``seer_attention``.

    Pre-RoPE Q and K are taken from the model's own modules by forward hooks on ``q_proj``/``k_proj`` (or on
    ``q_norm``/``k_norm`` where the model normalises per head, as Qwen3 does); no modeling code is copied.
    The model is changed in place and returned.

    Args:
        model: a transformers decoder (llama, qwen2, qwen3, mistral families, ...).
        config: gate architecture and sparsity options (default :class:`SeerAttentionConfig`). With ``gates``,
            its architecture fields must match the saved ones and its inference options are used.
        gates: a folder written by :func:`save_gates` or a Hub repo id holding one.
        revision: Hub revision for ``gates``.

    Returns:
        The same model, now running SeerAttention for prefills.

    Raises:
        HfEffllmError: a model without supported attention layers, bad ``dense_layers``, gates saved for another
            model.

    Example:
        >>> model = hf_effllm.apply_seer_attention(model, hf_effllm.SeerAttentionConfig(nz_ratio=0.2))  # doctest: +SKIP
    """
    if gates is not None:
        from .io import load_gates

        return load_gates(model, gates, config=config, revision=revision)
    config = SeerAttentionConfig() if config is None else config
    if not isinstance(config, SeerAttentionConfig):
        raise HfEffllmError(f"config={config!r} must be a SeerAttentionConfig.")
    sig = model_signature(model)
    _check_dense_layers(config, sig["layer_indices"])
    if seer_config_of(model) is not None:
        remove_seer_attention(model)
    tc = _text_config(model)
    theta = _rope_theta(tc, config)
    for m in attention_layers(model):
        hq, hkv = sig["num_attention_heads"], sig["num_key_value_heads"]
        if isinstance(m.q_proj, nn.Linear) and isinstance(m.k_proj, nn.Linear):
            hq, hkv = m.q_proj.out_features // sig["head_dim"], m.k_proj.out_features // sig["head_dim"]
        gate = SeerAttnGate(hq, hkv, sig["head_dim"], config, theta, m.layer_idx)
        weight = next(m.q_proj.parameters(), None)
        gate.to(device=weight.device if weight is not None else None)
        m.seer_gate = gate
        q_src = m.q_norm if isinstance(getattr(m, "q_norm", None), nn.Module) else m.q_proj
        k_src = m.k_norm if isinstance(getattr(m, "k_norm", None), nn.Module) else m.k_proj
        gate._hook_handles = [
            q_src.register_forward_hook(_PendingHook(gate, "_pending_q")),
            k_src.register_forward_hook(_PendingHook(gate, "_pending_k")),
        ]
    model._seer_previous_attn = model.config._attn_implementation
    model._seer_config = config
    # save_pretrained writes the base model only (gates go through save_gates): a plain from_pretrained of that
    # folder then loads without "unexpected keys".
    model._keys_to_ignore_on_save = set(getattr(model, "_keys_to_ignore_on_save", None) or ()) | _gate_keys(model)
    model.set_attn_implementation(ATTENTION_NAME)
    return model


def sparsity_report(model: nn.Module, *, reset: bool = False) -> dict[int, float]:
    """Achieved sparsity per layer since the last reset: 1 - kept / causal blocks, over every gated prefill.

    Layers that ran no gated prefill are left out. Dense layers and short prompts count as 0% sparse.

    Example:
        >>> model(ids); sparsity_report(model, reset=True)  # doctest: +SKIP
        {0: 0.48, 1: 0.49, ...}
    """
    out = {}
    for idx, gate in gates_of(model).items():
        if gate.total_blocks:
            out[idx] = 1.0 - gate.kept_blocks / gate.total_blocks
        if reset:
            gate.reset_stats()
    return out


def mean_sparsity(report: dict[int, float]) -> float:
    """Average of a :func:`sparsity_report` over layers (0.0 when empty)."""
    return sum(report.values()) / len(report) if report else 0.0
