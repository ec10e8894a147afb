import math

import pytest

import hf_effllm
from hf_effllm import HfEffllmError, SpQRConfig


def test_defaults_match_the_issue():
    c = SpQRConfig()
    assert (c.bits, c.group_size, c.stats_group_size, c.stats_bits) == (3, 16, 16, 3)
    assert (c.outlier_threshold, c.permutation, c.percdamp, c.nsamples, c.seqlen) == (0.2, "act_order", 0.01, 128, 2048)
    assert c.quant_method == "hf_effllm_spqr" and c.modules_to_not_convert is None and c.dataset is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bits", 1),
        ("bits", 9),
        ("bits", 3.0),
        ("group_size", 0),
        ("stats_group_size", -1),
        ("stats_bits", 1),
        ("outlier_threshold", 0),
        ("outlier_threshold", float("nan")),
        ("permutation", "random"),
        ("percdamp", 0),
        ("nsamples", 0),
        ("seqlen", 0),
        ("modules_to_not_convert", "lm_head"),
        ("format_version", 99),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(HfEffllmError, match=field):
        SpQRConfig(**{field: value})


def test_unknown_field_is_an_error():
    with pytest.raises(HfEffllmError, match="unknown fields"):
        SpQRConfig(bitz=3)


def test_json_round_trip_keeps_infinity_and_drops_objects():
    c = SpQRConfig(bits=4, outlier_threshold=float("inf"), dataset=["a text"], tokenizer=object())
    d = c.to_dict()
    assert d["outlier_threshold"] == "inf" and "dataset" not in d and "tokenizer" not in d
    back = SpQRConfig.from_dict(d)
    assert math.isinf(back.outlier_threshold) and back.bits == 4 and not back.enable_outliers


def test_registered_with_transformers():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["hf_effllm_spqr"] is hf_effllm.SpQRConfig
    assert AUTO_QUANTIZER_MAPPING["hf_effllm_spqr"].__name__ == "SpQRHfQuantizer"
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["spqr"] is not hf_effllm.SpQRConfig  # the built-in loader keeps its name
