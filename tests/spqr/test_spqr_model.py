import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_effllm
from hf_effllm import HfEffllmError, SpQRConfig, SpQRLinear
from hf_effllm.testing import tiny_model

TEXT = "In the beginning God created the heaven and the earth. " * 40


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "mixtral"])
def test_tiny_models_quantize_and_run(model_type, calib_ids):
    model = tiny_model(model_type)
    ids = calib_ids[:2]
    with torch.no_grad():
        ref = model(ids).logits
    cfg = SpQRConfig(bits=4, stats_bits=4)
    hf_effllm.quantize_spqr(model, cfg, calibration_ids=calib_ids)
    layers = [m for m in model.modules() if isinstance(m, SpQRLinear)]
    assert layers and len(layers) == len(cfg.layers)
    assert isinstance(model.lm_head, torch.nn.Linear)  # the output head stays in float by default
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()
    assert (out - ref).abs().mean() < 0.1 * ref.abs().mean()
    assert 4 < cfg.avg_bits < 16 and model.config.quantization_config is cfg
    generated = model.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 8)


def test_save_reload_is_bit_identical(tmp_path, calib_ids):
    model = tiny_model("llama")
    hf_effllm.quantize_spqr(model, SpQRConfig(bits=3), calibration_ids=calib_ids)
    with torch.no_grad():
        before = model(calib_ids[:2]).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, SpQRLinear)
    with torch.no_grad():
        after = loaded(calib_ids[:2]).logits
    assert torch.equal(before, after)
    qc = loaded.config.quantization_config
    assert qc.avg_bits == model.config.quantization_config.avg_bits
    rec = qc.layers["model.layers.0.self_attn.q_proj"]
    assert set(rec) >= {"in_features", "out_features", "nnz", "avg_bits", "crc32"}


def test_from_pretrained_calibrates_a_float_checkpoint(tmp_path, byte_tokenizer):
    tiny_model("qwen2").save_pretrained(tmp_path / "float")
    cfg = SpQRConfig(bits=3, nsamples=4, seqlen=32, dataset=[TEXT], tokenizer=byte_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=cfg)
    assert isinstance(model.model.layers[0].self_attn.k_proj, SpQRLinear)
    assert model.config.quantization_config.layers
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


@pytest.fixture
def saved(tmp_path, calib_ids):
    model = tiny_model("llama")
    hf_effllm.quantize_spqr(model, SpQRConfig(bits=3), calibration_ids=calib_ids)
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "edit",
    [
        lambda sd, k: sd.pop(k + "qweight"),
        lambda sd, k: sd.__setitem__(k + "qweight", sd[k + "qweight"] ^ 1),
        lambda sd, k: sd.__setitem__(k + "qweight", sd[k + "qweight"].float()),
        lambda sd, k: sd.__setitem__(k + "stats2", sd[k + "stats2"] * 2),
    ],
    ids=["missing", "edited", "cast", "edited-stats"],
)
def test_corrupt_checkpoint_names_the_tensor(saved, edit):
    path = saved / "model.safetensors"
    sd = load_file(path)
    edit(sd, "model.layers.0.self_attn.q_proj.")
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(HfEffllmError, match=r"model\.layers\.0\.self_attn\.q_proj\.(qweight|stats2)"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_truncated_checkpoint_fails_loudly(saved):
    path = saved / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(Exception, match="(?i)incomplete|truncat|deserializ"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_bad_inputs(calib_ids, byte_tokenizer):
    model = tiny_model("llama")
    with pytest.raises(HfEffllmError, match="no nn.Linear layers to convert"):
        hf_effllm.quantize_spqr(
            model, SpQRConfig(modules_to_not_convert=["self_attn", "mlp"]), calibration_ids=calib_ids
        )
    with pytest.raises(HfEffllmError, match="fewer than seqlen"):
        hf_effllm.quantize_spqr(model, SpQRConfig(seqlen=4096, dataset=["too short"]), tokenizer=byte_tokenizer)
    with pytest.raises(HfEffllmError, match="no list of decoder layers"):
        hf_effllm.quantize_spqr(torch.nn.Sequential(torch.nn.ReLU()), SpQRConfig(), calibration_ids=calib_ids)
    hf_effllm.quantize_spqr(model, SpQRConfig(bits=4), calibration_ids=calib_ids)
    with pytest.raises(HfEffllmError, match="already SpQR-quantized"):
        hf_effllm.quantize_spqr(model, SpQRConfig(), calibration_ids=calib_ids)
    with pytest.raises(HfEffllmError, match="calibration_ids"):
        hf_effllm.quantize_spqr(tiny_model("llama"), SpQRConfig(), calibration_ids=calib_ids.float())


def test_modules_to_not_convert_keeps_float(calib_ids):
    model = tiny_model("llama")
    cfg = SpQRConfig(bits=4, modules_to_not_convert=["lm_head", "down_proj"])
    hf_effllm.quantize_spqr(model, cfg, calibration_ids=calib_ids)
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, SpQRLinear)
    assert not any(k.endswith("down_proj") for k in cfg.layers)


def test_dequantize_gives_a_plain_float_model(tmp_path, calib_ids):
    """``model.dequantize()`` (transformers' API) turns SpQR layers back into nn.Linear with the same outputs."""
    model = tiny_model("llama")
    hf_effllm.quantize_spqr(model, SpQRConfig(bits=3), calibration_ids=calib_ids)
    with torch.no_grad():
        before = model(calib_ids[:2]).logits
    model.dequantize()
    assert not any(isinstance(m, SpQRLinear) for m in model.modules())
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert getattr(model.config, "quantization_config", None) is None and not model.is_quantized
    with torch.no_grad():
        torch.testing.assert_close(model(calib_ids[:2]).logits, before, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path)(calib_ids[:2]).logits, before)


def test_vision_language_model_picks_the_layers_a_text_forward_reaches(calib_ids):
    """A VLM whose vision tower has as many layers as its language model: a clear error, and the way out."""
    model = tiny_model("llava")
    with pytest.raises(HfEffllmError, match=r"never reached 'model\.vision_tower\.encoder\.layers'"):
        hf_effllm.quantize_spqr(model, SpQRConfig(bits=4), calibration_ids=calib_ids)
    cfg = SpQRConfig(bits=4, modules_to_not_convert=["lm_head", "vision_tower"])
    hf_effllm.quantize_spqr(model, cfg, calibration_ids=calib_ids)
    assert cfg.layers and all(k.startswith("model.language_model.layers.") for k in cfg.layers)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calib_ids[:1]).logits).all()


def test_dtype_casts_keep_the_packed_fp16_tensors(tmp_path, calib_ids):
    """``model.to(torch.bfloat16)`` casts float buffers: the fp16 statistics and outliers must stay exact fp16 (or
    the weights change silently and the saved checkpoint no longer matches its checksums)."""
    model = tiny_model("llama")
    hf_effllm.quantize_spqr(model, SpQRConfig(bits=3), calibration_ids=calib_ids)
    q = model.model.layers[0].self_attn.q_proj
    weight = q.dequantize()
    assert q.nnz > 0
    model.to(torch.bfloat16)
    assert q.stats2.dtype == q.outlier_values.dtype == torch.float16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(q.dequantize(), weight)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.dequantize(), weight)
