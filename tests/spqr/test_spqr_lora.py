"""Training on top of SpQR: gradients through the packed layers, LoRA adapters through PEFT, Trainer, adapter save
and reload onto a reloaded SpQR checkpoint."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hf_effllm
from hf_effllm import HfEffllmError, SpQRConfig, SpQRLinear
from hf_effllm.quant.spqr.lora import SpQRLoraLinear, register_lora
from hf_effllm.testing import tiny_model

TARGETS = ["q_proj", "v_proj", "down_proj"]


def test_backward_multiplies_by_the_dequantized_weight():
    lin = torch.nn.Linear(40, 24)
    cfg = SpQRConfig(bits=3, group_size=8, outlier_threshold=0.1, permutation="identity")
    layer = SpQRLinear.from_linear(lin, cfg)
    assert layer.nnz > 0 and layer.permuted is False
    w = layer.dequantize()
    x = torch.randn(2, 5, 40, requires_grad=True)
    grad = torch.randn(2, 5, 24)
    layer(x).backward(grad)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x_ref, w, layer.bias).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert layer.bias.grad is None  # frozen by default
    layer.bias.requires_grad_(True)
    layer(x.detach()).backward(grad)  # only the bias needs a gradient
    torch.testing.assert_close(layer.bias.grad, grad.sum((0, 1)))
    with torch.no_grad():  # inference path unchanged
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, layer.bias), atol=1e-5, rtol=1e-5)


def test_backward_with_permutation_matches_dense(calib_ids):
    model = tiny_model("llama")
    hf_effllm.quantize_spqr(model, SpQRConfig(bits=4), calibration_ids=calib_ids)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.permuted
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x_ref, layer.dequantize()).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)


def test_lora_trains_through_trainer_and_reloads(tmp_path, calib_ids):
    model = tiny_model("llama")
    hf_effllm.quantize_spqr(model, SpQRConfig(bits=4), calibration_ids=calib_ids)
    model.save_pretrained(tmp_path / "q")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    packed = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = get_peft_model(base, register_lora(LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.0)))
    wrapped = peft_model.base_model.model.model.layers[1]
    assert isinstance(wrapped.self_attn.q_proj, SpQRLoraLinear)
    assert isinstance(wrapped.self_attn.q_proj.base_layer, SpQRLinear)
    with pytest.raises(HfEffllmError, match="adapter_names"):
        wrapped.self_attn.q_proj(torch.randn(1, 64), adapter_names=["default"])
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    ids = calib_ids[:8]
    data = [{"input_ids": row, "labels": row} for row in ids]
    with torch.no_grad():
        before = peft_model(input_ids=ids, labels=ids).loss.item()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=4, learning_rate=2e-2,
        lr_scheduler_type="constant", save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        logging_steps=100,
    )  # fmt: skip
    Trainer(model=peft_model, args=args, train_dataset=data).train()
    with torch.no_grad():
        after = peft_model(input_ids=ids, labels=ids).loss.item()
        logits = peft_model(input_ids=ids[:2]).logits
    assert after < before - 0.05, (before, after)
    # the quantized base did not move: packed buffers and float parameters are bitwise the same
    state = peft_model.base_model.model.state_dict()
    for key, value in packed.items():
        name = key.replace("q_proj.", "q_proj.base_layer.").replace("v_proj.", "v_proj.base_layer.")
        name = name.replace("down_proj.", "down_proj.base_layer.")
        assert torch.equal(state[name], value), key

    peft_model.save_pretrained(tmp_path / "adapter")
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    config = register_lora(LoraConfig.from_pretrained(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter", config=config)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids[:2]).logits, logits)

    with pytest.raises(HfEffllmError, match="dequantize"):
        peft_model.merge_and_unload()
    # the documented way to merge: the adapter on the dequantized model
    floating = AutoModelForCausalLM.from_pretrained(tmp_path / "q").dequantize()
    merged = PeftModel.from_pretrained(floating, tmp_path / "adapter").merge_and_unload()
    assert isinstance(merged.model.layers[1].self_attn.q_proj, torch.nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids[:2]).logits, logits, atol=1e-4, rtol=1e-4)


def test_register_lora_rejects_other_configs():
    with pytest.raises(HfEffllmError, match="LoraConfig"):
        register_lora({"r": 4})
