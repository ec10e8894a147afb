import torch
from transformers import DynamicCache

from hf_effllm.compat import CACHE_KWARG, MIN_TRANSFORMERS, TRANSFORMERS_VERSION, cache_kwargs, output_cache
from hf_effllm.testing import tiny_model


def test_supported_version():
    assert TRANSFORMERS_VERSION >= MIN_TRANSFORMERS
    assert CACHE_KWARG in ("cache", "past_key_values")


def test_cache_roundtrip_through_forward_and_generate():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 10))
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, use_cache=True, **cache_kwargs(cache))
    assert output_cache(out) is cache and cache.get_seq_length() == 10
    gen = model.generate(ids, max_new_tokens=3, do_sample=False, **cache_kwargs(DynamicCache(config=model.config)))
    assert gen.shape == (1, 13)
