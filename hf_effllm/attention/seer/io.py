"""Save and load SeerAttention gates: only the gate weights (safetensors) and the config, plus a model card."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import HfEffllmError
from ...utils.io import atomic_dir
from .apply import apply_seer_attention, gates_of, model_signature, remove_seer_attention, seer_config_of
from .config import SeerAttentionConfig

GATES_FILE = "seer_gates.safetensors"
CONFIG_FILE = "seer_config.json"
FORMAT_VERSION = 1


def _base_model_id(model: nn.Module) -> str:
    name = getattr(model.config, "name_or_path", "") or ""
    if name.count("/") == 1 and not Path(name).exists():
        return name
    from ...data import EMBEDDED_MODEL_HUB_ID

    return EMBEDDED_MODEL_HUB_ID if not name or Path(name).exists() else name


def save_gates(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    base_model: str | None = None,
    results: list[dict[str, Any]] | None = None,
) -> Path:
    """Write the gates of ``model`` to ``directory``: ``seer_gates.safetensors``, ``seer_config.json``, ``README.md``.

    Only gate parameters are saved (a few MB), never the base model. The folder is built atomically.

    Args:
        model: a model set up with :func:`apply_seer_attention` (and usually :func:`distill_gates`).
        directory: output folder; must be empty or absent unless ``overwrite``.
        overwrite: replace an existing non-empty folder.
        base_model: Hub id for the card's ``base_model`` (default: from the model's config).
        results: optional result rows (``variant``, ``perplexity``, ...) for the card's table.

    Returns:
        The folder path.

    Example:
        >>> hf_effllm.seer.save_gates(model, "smollm2-seer-gates")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    from ... import __version__
    from ...benchmarking import markdown_table
    from ...hub import render_card

    config = seer_config_of(model)
    gates = gates_of(model)
    if config is None or not gates:
        raise HfEffllmError("model has no SeerAttention gates; call hf_effllm.apply_seer_attention(model) first.")
    tensors = {}
    for idx, gate in gates.items():
        tensors[f"layers.{idx}.q_weight"] = gate.q_weight.detach().float().cpu().contiguous()
        tensors[f"layers.{idx}.k_weight"] = gate.k_weight.detach().float().cpu().contiguous()
    meta = {
        "format_version": FORMAT_VERSION,
        "hf_effllm_version": __version__,
        "seer_config": config.to_dict(),
        "model_signature": model_signature(model),
        "rope_theta_used": next(iter(gates.values())).rope_theta,
    }
    base = base_model or _base_model_id(model)
    n_params = sum(t.numel() for t in tensors.values())
    with atomic_dir(directory, overwrite=overwrite, arg_name="directory") as tmp:
        save_file(tensors, str(tmp / GATES_FILE), metadata={"format": "pt", "hf_effllm": "seer_gates"})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        card = render_card(
            "seer",
            library_name="transformers",
            base_model=base,
            tags=["hf-effllm", "seer-attention", "sparse-attention"],
            hf_effllm_version=__version__,
            config=config,
            num_layers=len(gates),
            num_params=n_params,
            signature=meta["model_signature"],
            results_table=markdown_table(results) if results else "No measurements were recorded with these gates.",
        )
        (tmp / "README.md").write_text(str(card), encoding="utf-8")
    return Path(directory)


def _resolve(source: str | os.PathLike, revision: str | None) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise HfEffllmError(f"gates={str(source)!r} is a file; give the folder written by save_gates or a Hub id.")
    text = str(source)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise HfEffllmError(f"gates={text!r} is neither an existing folder nor a Hub repo id (user/name).")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=[GATES_FILE, CONFIG_FILE, "README.md"]))
    except Exception as e:
        raise HfEffllmError(f"gates={text!r}: could not download from the Hub ({type(e).__name__}: {e}).") from e


def read_gates_config(source: str | os.PathLike, *, revision: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The folder and the parsed ``seer_config.json`` of saved gates."""
    folder = _resolve(source, revision)
    cfg_path, gates_path = folder / CONFIG_FILE, folder / GATES_FILE
    if not cfg_path.is_file() or not gates_path.is_file():
        raise HfEffllmError(
            f"gates={str(source)!r} lacks {CONFIG_FILE} or {GATES_FILE}; give a folder written by save_gates."
        )
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HfEffllmError(f"{cfg_path} is not valid JSON ({e}).") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise HfEffllmError(
            f"{cfg_path} has format_version={meta.get('format_version')!r}; this hf-effllm reads {FORMAT_VERSION}."
        )
    return folder, meta


def load_gates(
    model: nn.Module,
    source: str | os.PathLike,
    *,
    config: SeerAttentionConfig | None = None,
    revision: str | None = None,
) -> nn.Module:
    """Load gates saved with :func:`save_gates` into ``model`` (applying SeerAttention if needed).

    Args:
        model: the same base model the gates were distilled on (a fresh ``from_pretrained`` copy is fine).
        source: folder or Hub repo id.
        config: optional inference options (``nz_ratio``, ``threshold``, ...); its architecture fields must match
            the saved gates. Default: the saved config.
        revision: Hub revision.

    Returns:
        The model, with the gates loaded and ``seer_attention`` active.

    Raises:
        HfEffllmError: missing files, gates saved for a model with other layers/heads/head_dim, or a config
            whose architecture differs from the saved one.

    Example:
        >>> model = hf_effllm.seer.load_gates(AutoModelForCausalLM.from_pretrained(base), "user/gates")  # doctest: +SKIP
    """
    from safetensors.torch import load_file

    if config is not None and not isinstance(config, SeerAttentionConfig):
        raise HfEffllmError(f"config={config!r} must be a SeerAttentionConfig (or None for the saved one).")
    folder, meta = read_gates_config(source, revision=revision)
    saved_cfg = SeerAttentionConfig.from_dict(meta["seer_config"])
    saved_sig = meta["model_signature"]
    sig = model_signature(model)
    diffs = [
        f"{k}: gates {saved_sig.get(k)!r} vs model {sig[k]!r}"
        for k in ("layer_indices", "num_attention_heads", "num_key_value_heads", "head_dim")
        if saved_sig.get(k) != sig[k]
    ]
    if diffs:
        raise HfEffllmError(
            f"gates at {str(source)!r} were saved for another model ({saved_sig.get('model_type')}); "
            f"mismatch: {'; '.join(diffs)}. Load them into the model they were distilled on."
        )
    if config is None:
        config = saved_cfg
    elif config.architecture() != saved_cfg.architecture():
        diff = {
            k: (v, saved_cfg.architecture()[k])
            for k, v in config.architecture().items()
            if v != saved_cfg.architecture()[k]
        }
        raise HfEffllmError(f"config differs from the saved gates in architecture fields (given, saved): {diff}.")
    if config.rope_theta is None and "rope_theta_used" in meta:
        from dataclasses import replace

        config = replace(config, rope_theta=float(meta["rope_theta_used"]))
    # Read and check the file before touching the model: a damaged file leaves the model as it was.
    try:
        tensors = load_file(str(folder / GATES_FILE))
    except Exception as e:
        raise HfEffllmError(f"{folder / GATES_FILE} could not be read ({type(e).__name__}: {e}).") from e
    expected = {f"layers.{i}.{w}" for i in sig["layer_indices"] for w in ("q_weight", "k_weight")}
    if set(tensors) != expected:
        raise HfEffllmError(
            f"{folder / GATES_FILE} holds tensors {sorted(set(tensors) ^ expected)[:6]} that do not match the "
            "model's gates; the file is damaged or from another model."
        )
    apply_seer_attention(model, config)
    gates = gates_of(model)
    with torch.no_grad():
        for i, gate in gates.items():
            for w in ("q_weight", "k_weight"):
                param, t = getattr(gate, w), tensors[f"layers.{i}.{w}"]
                if param.shape != t.shape:
                    remove_seer_attention(model)
                    raise HfEffllmError(
                        f"gate {w} of layer {i}: saved shape {tuple(t.shape)} != expected {tuple(param.shape)}."
                    )
                param.copy_(t.to(param.device, param.dtype))
    return model
