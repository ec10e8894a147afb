"""Block-wise tuning of the float parts of SpQR (tune_epochs): lower error at the same codes, valid packed format."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_effllm
from hf_effllm import HfEffllmError, SpQRConfig, SpQRLinear
from hf_effllm.testing import tiny_model


@pytest.fixture(scope="module")
def quantized_pair():
    base = tiny_model("llama")
    calib = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(0))
    out = {}
    for epochs in (0, 3):
        model = copy.deepcopy(base)
        cfg = SpQRConfig(bits=3, tune_epochs=epochs)
        hf_effllm.quantize_spqr(model, cfg, calibration_ids=calib)
        out[epochs] = model
    return base, out[0], out[3]


def test_tuning_lowers_the_error_on_held_out_text(quantized_pair):
    base, plain, tuned = quantized_pair
    ids = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = base(ids).logits
        err_plain = (plain(ids).logits - ref).square().mean().item()
        err_tuned = (tuned(ids).logits - ref).square().mean().item()
    assert err_tuned < 0.97 * err_plain, (err_plain, err_tuned)


def test_only_float_parts_move(quantized_pair):
    base, plain, tuned = quantized_pair
    a, b = plain.model.layers[0].self_attn.q_proj, tuned.model.layers[0].self_attn.q_proj
    assert isinstance(a, SpQRLinear) and isinstance(b, SpQRLinear)
    for key in ("qweight", "qscale", "qzero", "outlier_cols", "outlier_row_ptr", "perm"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key  # layer 0 saw the same inputs: same codes
    assert not torch.equal(a.stats2, b.stats2)
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(dict(tuned.named_parameters())[norm], dict(base.named_parameters())[norm])
    assert all(p.grad is None for p in tuned.parameters())


def test_tuned_checkpoint_reloads_bit_identical(quantized_pair, tmp_path):
    _, _, tuned = quantized_pair
    tuned.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(tuned(ids).logits, again(ids).logits)
    assert again.config.quantization_config.tune_epochs == 3


@pytest.mark.parametrize(
    "field,value", [("tune_epochs", -1), ("tune_epochs", True), ("tune_lr", 0.0), ("tune_norm_lr", float("nan"))]
)
def test_tuning_fields_are_validated(field, value):
    with pytest.raises(HfEffllmError, match=field):
        SpQRConfig(**{field: value})
