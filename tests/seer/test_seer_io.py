"""Saving and loading gates: exact round trip into a fresh base model, clear errors for the wrong model."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from hf_effllm import SeerAttentionConfig, apply_seer_attention, seer
from hf_effllm.errors import HfEffllmError
from hf_effllm.hub import validate_card
from hf_effllm.testing import tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_save_load_round_trip_restores_behaviour_exactly(tmp_path, model_type):
    base = tiny_model(model_type)
    fresh = copy.deepcopy(base)
    model = apply_seer_attention(base, SeerAttentionConfig(block_size=16, nz_ratio=0.3, k_pooling=["max", "avg"]))
    torch.manual_seed(7)
    for g in seer.gates_of(model).values():  # non-default weights, as after distillation
        g.reset_parameters()
    ids = torch.randint(0, 256, (2, 120), generator=torch.Generator().manual_seed(0))
    expected = _logits(model, ids)
    folder = seer.save_gates(model, tmp_path / "gates", results=[{"variant": "x", "perplexity": 1.0}])
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["README.md", "seer_config.json", "seer_gates.safetensors"]
    meta = json.loads((folder / "seer_config.json").read_text())
    assert meta["seer_config"]["k_pooling"] == ["max", "avg"]
    validate_card(folder / "README.md")
    loaded = seer.load_gates(fresh, folder)
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=0)
    for i, g in seer.gates_of(loaded).items():
        assert torch.equal(g.q_weight, seer.gates_of(model)[i].q_weight)
    # apply_seer_attention(gates=...) with other inference options keeps the weights
    cfg = SeerAttentionConfig(block_size=16, nz_ratio=1.0, k_pooling=["max", "avg"])
    other = apply_seer_attention(copy.deepcopy(fresh), cfg, gates=folder)
    assert seer.seer_config_of(other).nz_ratio == 1.0


def test_load_into_mismatched_model_or_config_fails_clearly(tmp_path):
    model = apply_seer_attention(tiny_model("llama"), SeerAttentionConfig(block_size=16))
    folder = seer.save_gates(model, tmp_path / "g")
    with pytest.raises(HfEffllmError, match="num_key_value_heads"):
        seer.load_gates(tiny_model("llama", num_key_value_heads=4), folder)
    with pytest.raises(HfEffllmError, match="layer_indices"):
        seer.load_gates(tiny_model("llama", num_hidden_layers=3), folder)
    with pytest.raises(HfEffllmError, match="head_dim"):
        seer.load_gates(tiny_model("llama", head_dim=32), folder)
    with pytest.raises(HfEffllmError, match="architecture"):
        seer.load_gates(tiny_model("llama"), folder, config=SeerAttentionConfig(block_size=32))
    with pytest.raises(HfEffllmError, match="lacks"):
        seer.load_gates(tiny_model("llama"), tmp_path)
    with pytest.raises(HfEffllmError, match="neither an existing folder"):
        seer.load_gates(tiny_model("llama"), str(tmp_path / "missing" / "x" / "y"))
    with pytest.raises(HfEffllmError, match="not empty"):
        seer.save_gates(model, folder)
    with pytest.raises(HfEffllmError, match="no SeerAttention gates"):
        seer.save_gates(tiny_model("llama"), tmp_path / "h")


def test_save_pretrained_of_a_seer_model_writes_the_base_model_only(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = tiny_model("llama")
    model = apply_seer_attention(base, SeerAttentionConfig(block_size=16))
    model.save_pretrained(tmp_path / "m")
    keys = set(load_file(str(tmp_path / "m" / "model.safetensors")))
    assert keys and not any("seer_gate" in k for k in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert set(reloaded.state_dict()) == {k for k in model.state_dict() if "seer_gate" not in k}
    seer.remove_seer_attention(model)
    assert not any("seer_gate" in k for k in (model._keys_to_ignore_on_save or ()))
