"""``SpQRConfig(dynamic=...)``: per-module formats that quantize, save, reload and tune."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_effllm
from hf_effllm import HfEffllmError, SpQRConfig, SpQRLinear
from hf_effllm.testing import tiny_model

DYNAMIC = {r"\.v_proj$": {"bits": 4, "outlier_threshold": float("inf")}, r"layers\.1\.mlp\.": {"group_size": 8}}


def test_dynamic_formats_quantize_save_and_reload(tmp_path, calib_ids):
    model = tiny_model("llama")
    cfg = SpQRConfig(bits=3, dynamic=DYNAMIC)
    hf_effllm.quantize_spqr(model, cfg, calibration_ids=calib_ids)
    layers = model.model.layers
    assert layers[0].self_attn.v_proj.bits == 4 and layers[1].self_attn.v_proj.bits == 4
    assert layers[0].self_attn.v_proj.outlier_values.numel() == 0  # inf threshold: no outliers there
    assert layers[0].self_attn.q_proj.bits == 3 and layers[0].self_attn.q_proj.group_size == 16
    assert layers[1].mlp.up_proj.group_size == 8 and layers[0].mlp.up_proj.group_size == 16
    assert (
        cfg.layers["model.layers.0.self_attn.v_proj"]["avg_bits"]
        > cfg.layers["model.layers.0.self_attn.k_proj"]["avg_bits"]
    )
    with torch.no_grad():
        before = model(calib_ids[:2]).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    v = loaded.model.layers[1].self_attn.v_proj
    assert isinstance(v, SpQRLinear) and v.bits == 4 and loaded.model.layers[1].mlp.down_proj.group_size == 8
    assert loaded.config.quantization_config.dynamic[r"\.v_proj$"]["outlier_threshold"] == float("inf")
    with torch.no_grad():
        assert torch.equal(before, loaded(calib_ids[:2]).logits)


def test_dynamic_matches_the_plain_config_where_no_rule_applies(calib_ids):
    a, b = tiny_model("llama"), tiny_model("llama")
    hf_effllm.quantize_spqr(a, SpQRConfig(bits=3), calibration_ids=calib_ids)
    hf_effllm.quantize_spqr(b, SpQRConfig(bits=3, dynamic={"no_such_module": {"bits": 8}}), calibration_ids=calib_ids)
    with torch.no_grad():
        assert torch.equal(a(calib_ids[:2]).logits, b(calib_ids[:2]).logits)


def test_dynamic_reaches_stacked_experts_and_tuning(calib_ids):
    model = tiny_model("qwen3_moe")
    cfg = SpQRConfig(bits=3, stats_bits=4, dynamic={r"experts\.down_proj_spqr\.": {"bits": 5}}, tune_epochs=1)
    hf_effllm.quantize_spqr(model, cfg, calibration_ids=calib_ids)
    holder = model.model.layers[0].mlp.experts.down_proj_spqr
    assert {lin.bits for lin in holder.modules() if isinstance(lin, SpQRLinear)} == {5}
    holder = model.model.layers[0].mlp.experts.gate_up_proj_spqr
    assert {lin.bits for lin in holder.modules() if isinstance(lin, SpQRLinear)} == {3}
    with torch.no_grad():
        assert torch.isfinite(model(calib_ids[:2]).logits).all()


@pytest.mark.parametrize(
    "dynamic,match",
    [
        ({"v_proj": {"bits": 1}}, r"dynamic\['v_proj'\]: bits=1"),
        ({"v_proj": {"tune_epochs": 2}}, "a rule may set only"),
        ({"v_proj": {}}, "non-empty dict"),
        ({"(": {"bits": 4}}, "not a regular expression"),
        ([("v_proj", {"bits": 4})], "must be a dict"),
    ],
)
def test_bad_dynamic_rules_are_named(dynamic, match):
    with pytest.raises(HfEffllmError, match=match):
        SpQRConfig(dynamic=dynamic)
