import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_effllm
from hf_effllm import HfEffllmError, SpQRConfig, SpQRLinear
from hf_effllm.quant.spqr.experts import SpQRExpertWeights, expert_hessians, parse_record_name, record_name
from hf_effllm.testing import tiny_model


def _experts(model):
    return [m for m in model.modules() if hasattr(m, "gate_up_proj_spqr")]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_stacked_experts_are_quantized_and_run(model_type, calib_ids):
    model = tiny_model(model_type)
    n_float = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj")))
    assert n_float > 0
    ids = calib_ids[:2]
    with torch.no_grad():
        ref = model(ids).logits
    cfg = SpQRConfig(bits=4, stats_bits=4)
    hf_effllm.quantize_spqr(model, cfg, calibration_ids=calib_ids)
    # no float expert weight is left; every expert matrix has a record and a packed SpQRLinear
    assert not [n for n, _ in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]
    expert_records = [n for n in cfg.layers if parse_record_name(n)]
    assert expert_records
    holders = _experts(model)
    assert holders and all(isinstance(h.gate_up_proj_spqr, SpQRExpertWeights) for h in holders)
    assert sum(len(h.gate_up_proj_spqr) + len(h.down_proj_spqr) for h in holders) == len(expert_records)
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()
    assert (out - ref).abs().mean() < 0.15 * ref.abs().mean()
    assert all("gate_up_proj" not in h.__dict__ for h in holders)  # the float weights are dropped after forward
    assert model.generate(ids[:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)
    scalar_gates = [m for n, m in model.named_modules() if n.endswith("shared_expert_gate")]
    assert all(isinstance(m, torch.nn.Linear) for m in scalar_gates)  # one-output gates stay float by default
    assert (len(scalar_gates) > 0) == (model_type == "qwen2_moe")


def test_experts_save_reload_is_bit_identical(tmp_path, calib_ids):
    model = tiny_model("qwen3_moe")
    hf_effllm.quantize_spqr(model, SpQRConfig(bits=3), calibration_ids=calib_ids)
    with torch.no_grad():
        before = model(calib_ids[:2]).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    holder = loaded.model.layers[0].mlp.experts.gate_up_proj_spqr
    assert isinstance(holder, SpQRExpertWeights) and isinstance(holder[0], SpQRLinear)
    with torch.no_grad():
        after = loaded(calib_ids[:2]).logits
    assert torch.equal(before, after)


def test_only_picked_experts_are_dequantized(calib_ids):
    model = tiny_model("qwen3_moe")
    hf_effllm.quantize_spqr(model, SpQRConfig(bits=4), calibration_ids=calib_ids)
    holder = model.model.layers[0].mlp.experts.gate_up_proj_spqr
    full = holder.dequantize(torch.float32, torch.device("cpu"))
    part = holder.dequantize(torch.float32, torch.device("cpu"), [1, 3])
    assert torch.equal(part[[1, 3]], full[[1, 3]]) and not part[[0, 2]].any()
    torch.testing.assert_close(full[2], holder[2].dequantize())


def test_expert_hessians_use_only_routed_tokens():
    model = tiny_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(6, experts.gate_up_proj.shape[2])
    index = torch.tensor([[0, 1], [0, 2], [1, 2], [0, 1], [2, 1], [0, 2]])  # expert 3 gets no token
    h = expert_hessians(experts, [((hidden, index, torch.ones(6, 2)), {})])
    x0 = hidden[[0, 1, 3, 5]]
    torch.testing.assert_close(h["gate_up_proj"][0][0], 2 * x0.T @ x0 / 4)
    assert h["gate_up_proj"][0][1] == 4 and h["gate_up_proj"][3] == (None, 0)
    assert h["down_proj"][0][0].shape == (experts.down_proj.shape[2],) * 2


def test_record_names_round_trip_and_mismatched_checkpoint(tmp_path, calib_ids):
    assert parse_record_name(record_name("model.layers.0.mlp.experts", "down_proj", 3)) == (
        "model.layers.0.mlp.experts",
        "down_proj",
        3,
    )
    assert parse_record_name("model.layers.0.self_attn.q_proj") is None
    model = tiny_model("qwen3_moe")
    cfg = SpQRConfig(bits=4)
    hf_effllm.quantize_spqr(model, cfg, calibration_ids=calib_ids)
    model.save_pretrained(tmp_path)
    other = tiny_model("qwen3_moe", num_experts=2)  # another expert count: the records do not fit
    other.config.quantization_config = cfg
    with pytest.raises(HfEffllmError, match="packed experts"):
        from hf_effllm.quant.spqr.quantizer import _rebuild_modules

        _rebuild_modules(other, cfg)


def test_dequantize_restores_stacked_expert_parameters(calib_ids):
    model = tiny_model("qwen3_moe")
    hf_effllm.quantize_spqr(model, SpQRConfig(bits=4), calibration_ids=calib_ids)
    with torch.no_grad():
        before = model(calib_ids[:2]).logits
    model.dequantize()
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts.gate_up_proj, torch.nn.Parameter) and experts.gate_up_proj.dim() == 3
    assert not _experts(model) and not any(isinstance(m, SpQRLinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(calib_ids[:2]).logits, before, rtol=1e-5, atol=1e-5)
