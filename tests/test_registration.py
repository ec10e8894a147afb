import importlib
import subprocess
import sys

import pytest
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import hf_effllm
from hf_effllm import registration
from hf_effllm.errors import HfEffllmError


def test_import_twice_and_reload():
    importlib.reload(hf_effllm)
    importlib.reload(hf_effllm)
    hf_effllm.register_all()
    for module in registration.METHOD_MODULES:
        importlib.reload(importlib.import_module(module))


def test_fresh_interpreter_imports_twice():
    code = "import hf_effllm, importlib; importlib.reload(hf_effllm); hf_effllm.register_all(); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def _make_pair():
    """Define a config/quantizer pair; calling twice mimics a module reload (new class objects, same names)."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class _ProbeConfig(QuantizationConfigMixin):
        def __init__(self, **kwargs):
            self.quant_method = "hf_effllm_probe"

    class _ProbeQuantizer(HfQuantizer):
        requires_calibration = False

        def _process_model_before_weight_loading(self, model, **kwargs):
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            return model

        def is_serializable(self):
            return True

        @property
        def is_trainable(self):
            return False

    return _ProbeConfig, _ProbeQuantizer


def test_quantization_registration_is_idempotent_and_guarded():
    try:
        for _ in range(2):
            cfg, q = _make_pair()
            registration.register_quantization_method("hf_effllm_probe", cfg, q)
            assert AUTO_QUANTIZATION_CONFIG_MAPPING["hf_effllm_probe"] is cfg
            assert AUTO_QUANTIZER_MAPPING["hf_effllm_probe"] is q
        with pytest.raises(HfEffllmError, match="'gptq' is already registered by transformers"):
            registration.register_quantization_method("gptq", *_make_pair())
        with pytest.raises(TypeError, match="QuantizationConfigMixin"):
            registration.register_quantization_method("hf_effllm_probe", object, q)
    finally:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop("hf_effllm_probe", None)
        AUTO_QUANTIZER_MAPPING.pop("hf_effllm_probe", None)


def test_attention_registration_is_idempotent():
    from transformers import AttentionInterface

    def probe_attention(module, query, key, value, attention_mask, **kwargs):
        raise NotImplementedError

    try:
        registration.register_attention_function("hf_effllm_probe", probe_attention)
        registration.register_attention_function("hf_effllm_probe", probe_attention)
        assert AttentionInterface._global_mapping["hf_effllm_probe"] is probe_attention
        with pytest.raises(HfEffllmError, match="'sdpa' is already registered"):
            registration.register_attention_function("sdpa", probe_attention)
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        assert AttentionMaskInterface._global_mapping["hf_effllm_probe"] is sdpa_mask
    finally:
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface._global_mapping.pop("hf_effllm_probe", None)
        AttentionMaskInterface._global_mapping.pop("hf_effllm_probe", None)
