"""MillionCache with transformers: the 'million' attention path, generate (padding, sampling, beams), errors.

Tolerances: with codes in play the 'million' attention path must equal attention over the decoded K/V (the same
cache used with sdpa) to float32 round-off (1e-4 on logits); against the default cache, PQ at 8 bits/2 dims on the
tiny random model stays within 5% relative logit error (a property of the quantization, checked as a bound).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache

from hf_effllm import MillionCache, MillionConfig, million
from hf_effllm.cache.million.attention import PendingCodes, million_attention_forward, peek_pending, set_pending
from hf_effllm.compat import cache_kwargs, output_cache
from hf_effllm.errors import HfEffllmError
from hf_effllm.testing import tiny_model

# sink_length=0: these tests pin the plain codes + window layout (sinks: test_million_sinks.py)
CFG = MillionConfig(num_subspaces=8, nbits=8, residual_length=8, kmeans_iters=8, sink_length=0)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def model_and_books():
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    books = million.train_codebooks(model, torch.randint(0, 256, (4, 96), generator=gen), CFG)
    return model, books


@torch.no_grad()
def _prefill_then_decode(model, cache, ids, split, attention_mask=None, chunk=1):
    """Logits of the last prompt token and of every later token, fed ``chunk`` at a time through ``cache``."""
    am = torch.ones_like(ids) if attention_mask is None else attention_mask
    pos = (am.cumsum(-1) - 1).clamp_min(0)  # as generate does: left padding does not shift positions
    out = model(input_ids=ids[:, :split], attention_mask=am[:, :split], position_ids=pos[:, :split],
                **cache_kwargs(cache))  # fmt: skip
    logits = [out.logits[:, -1:]]
    cache = output_cache(out)
    for s in range(split, ids.shape[1], chunk):
        e = min(s + chunk, ids.shape[1])
        out = model(input_ids=ids[:, s:e], attention_mask=am[:, :e], position_ids=pos[:, s:e], **cache_kwargs(cache))
        cache = output_cache(out)
        logits.append(out.logits)
    return torch.cat(logits, 1), cache


@pytest.mark.parametrize("chunk", [1, 3])
def test_million_attention_equals_attention_over_decoded_cache(model_and_books, chunk):
    model, books = model_and_books
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    model.set_attn_implementation("million")
    a, cache = _prefill_then_decode(model, MillionCache(model.config, books), ids, 30, chunk=chunk)
    assert cache.layers[0].n_codes > 0  # codes were really attended
    model.set_attn_implementation("sdpa")
    with pytest.warns(UserWarning, match="rebuilds the full K/V"):
        b, _ = _prefill_then_decode(model, MillionCache(model.config, books), ids, 30, chunk=chunk)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_cache_vs_default_cache(model_and_books):
    model, books = model_and_books
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    model.set_attn_implementation("million")
    dense, _ = _prefill_then_decode(model, DynamicCache(config=model.config), ids, 24)
    # a window covering everything: no codes, identical to the default cache
    exact, c = _prefill_then_decode(model, MillionCache(model.config, books, residual_length=100), ids, 24)
    assert c.layers[0].n_codes == 0
    torch.testing.assert_close(exact, dense, atol=1e-5, rtol=1e-5)
    pq, c = _prefill_then_decode(model, MillionCache(model.config, books), ids, 24)
    assert c.layers[0].n_codes >= 24 - 8
    rel = float((pq - dense).norm() / dense.norm())
    assert 0 < rel < 0.05, rel


def test_batch_with_left_padding_matches_unpadded_rows(model_and_books):
    model, books = model_and_books
    model.set_attn_implementation("million")
    gen = torch.Generator().manual_seed(3)
    long_row, short_row = torch.randint(1, 256, (30,), generator=gen), torch.randint(1, 256, (24,), generator=gen)
    ids = torch.stack([long_row, torch.cat([torch.zeros(6, dtype=torch.long), short_row])])
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    batched = model.generate(
        input_ids=ids, attention_mask=mask, **kw, **cache_kwargs(MillionCache(model.config, books))
    )
    for row, x in ((0, long_row), (1, short_row)):
        alone = model.generate(input_ids=x[None], **kw, **cache_kwargs(MillionCache(model.config, books)))
        assert torch.equal(batched[row, -10:], alone[0, -10:])
    # the codes really covered the prompt, and the padded row saw no padding in its attention
    logits_b, _ = _prefill_then_decode(model, MillionCache(model.config, books), ids, 20, attention_mask=mask)
    logits_a, _ = _prefill_then_decode(model, MillionCache(model.config, books), short_row[None], 14)
    torch.testing.assert_close(logits_b[1:], logits_a, atol=1e-4, rtol=1e-4)


def test_generate_greedy_sampling_and_beam_search(model_and_books):
    model, books = model_and_books
    model.set_attn_implementation("million")
    ids = torch.randint(1, 256, (2, 20), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=12, pad_token_id=0)
    torch.manual_seed(0)
    sampled = model.generate(input_ids=ids, do_sample=True, **kw, **cache_kwargs(MillionCache(model.config, books)))
    assert sampled.shape == (2, 32)
    dense_beams = model.generate(input_ids=ids, num_beams=3, do_sample=False, **kw)
    wide = MillionCache(model.config, books, residual_length=1000)
    assert torch.equal(model.generate(input_ids=ids, num_beams=3, do_sample=False, **kw, **cache_kwargs(wide)),
                       dense_beams)  # fmt: skip
    pq_beams = model.generate(input_ids=ids, num_beams=3, do_sample=False, **kw,
                              **cache_kwargs(MillionCache(model.config, books)))  # fmt: skip
    model.set_attn_implementation("sdpa")
    with pytest.warns(UserWarning):
        ref_beams = model.generate(input_ids=ids, num_beams=3, do_sample=False, **kw,
                                   **cache_kwargs(MillionCache(model.config, books)))  # fmt: skip
    assert torch.equal(pq_beams, ref_beams)  # beams reordered identically through codes and window


def test_reorder_crop_seq_length_and_nbytes(model_and_books):
    model, books = model_and_books
    model.set_attn_implementation("million")
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(5))
    _, cache = _prefill_then_decode(model, MillionCache(model.config, books), ids, 36)
    layer = cache.layers[0]
    assert cache.get_seq_length() == 40 and layer.n_codes + layer.keys.shape[2] == 40
    n_codes, n_heads, m = layer.n_codes, layer.num_heads, layer.num_subspaces
    assert layer.nbytes == 2 * 3 * n_heads * n_codes * m + 2 * layer.keys.numel() * 4
    assert cache.memory_report()["ratio"] > 1
    before_k, before_c = layer.keys.clone(), layer.codes_k[:, :, :n_codes].clone()
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(layer.keys, before_k[[2, 0, 1]]) and torch.equal(
        layer.codes_k[:, :, :n_codes], before_c[[2, 0, 1]]
    )
    cache.crop(-3)
    assert cache.get_seq_length() == 37 and layer.n_codes == n_codes
    cache.crop(n_codes - 2)  # legacy form (5.17): the length to keep; cuts into the codes
    assert cache.get_seq_length() == n_codes - 2 and layer.keys.shape[2] == 0
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes == 0


def test_bad_inputs(model_and_books):
    model, books = model_and_books
    with pytest.raises(HfEffllmError, match="does not divide head_dim"):
        million.train_codebooks(model, torch.randint(0, 256, (1, 16)), MillionConfig(num_subspaces=5))
    for overrides, what in (({"num_hidden_layers": 3}, "num_layers"), ({"num_key_value_heads": 4}, "num_kv_heads"),
                            ({"head_dim": 32}, "head_dim")):  # fmt: skip
        other = tiny_model("llama", **overrides)
        with pytest.raises(HfEffllmError, match=what):
            MillionCache(other.config, books)
    model.set_attn_implementation("million")
    cache = MillionCache(model.config, books)
    model(input_ids=torch.randint(0, 256, (2, 12)), **cache_kwargs(cache))
    with pytest.raises(HfEffllmError, match="batch size 2"):
        model(input_ids=torch.randint(0, 256, (3, 1)), **cache_kwargs(cache))
    with pytest.raises(HfEffllmError, match="MillionCodebooks"):
        MillionCache(model.config, {"keys": 1})
    with pytest.raises(HfEffllmError, match="residual_length=True"):
        MillionCache(model.config, books, residual_length=True)
    with pytest.raises(HfEffllmError, match="nbits"):
        MillionConfig(nbits=9)
    with pytest.raises(HfEffllmError, match="scope"):
        MillionConfig(scope="tensor")


def test_codes_not_taken_by_the_attention_raise(model_and_books):
    """A cache built from a config that says 'million' while the model runs sdpa would silently drop its codes."""
    import copy

    model, books = model_and_books
    model.set_attn_implementation("sdpa")
    config = copy.deepcopy(model.config)
    config._attn_implementation = "million"
    cache = MillionCache(config, books)
    with pytest.raises(HfEffllmError, match="did not take them"):
        model(input_ids=torch.randint(0, 256, (1, 12)), **cache_kwargs(cache))
    model.set_attn_implementation("million")  # the consistent setup runs, also right after the failure
    model(input_ids=torch.randint(0, 256, (1, 12)), **cache_kwargs(MillionCache(model.config, books)))


@torch.no_grad()
def test_attention_implementation_switched_between_forwards_takes_effect(model_and_books):
    """The cache reads the model's attention implementation once per forward (at its first layer); a switch between
    forwards of one cache takes effect at the next forward: codes are left for the 'million' function only while it
    runs, sdpa gets the decoded cache (with the warning), and the logits match a cache that never switched."""
    model, books = model_and_books
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(11))
    model.set_attn_implementation("million")
    ref_logits, _ = _prefill_then_decode(model, MillionCache(model.config, books), ids, 30)
    cache = MillionCache(model.config, books)
    logits = [model(input_ids=ids[:, :30], **cache_kwargs(cache)).logits[:, -1:]]
    try:
        for i in range(30, 40):
            model.set_attn_implementation("sdpa" if i % 2 else "million")
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                logits.append(model(input_ids=ids[:, i : i + 1], **cache_kwargs(cache)).logits)
            assert peek_pending() is None  # every record left was taken by the 'million' function
    finally:
        model.set_attn_implementation("million")
    torch.testing.assert_close(torch.cat(logits, 1), ref_logits, atol=1e-4, rtol=1e-4)


def test_attention_function_dispatch(model_and_books):
    """The one trick: the 'million' function finds codes only through the pending record of the same layer."""
    model, books = model_and_books
    attn = model.model.layers[0].self_attn
    q, k, v = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    set_pending(None)  # no MILLION layer in play: exactly sdpa
    torch.testing.assert_close(million_attention_forward(attn, q, k, v, None, scaling=0.25)[0],
                               sdpa_attention_forward(attn, q, k, v, None, scaling=0.25)[0])  # fmt: skip
    ck = torch.zeros(1, 2, 3, 8, dtype=torch.uint8)
    cb = books.layer(0)[0]
    set_pending(PendingCodes(0, torch.randn(1, 2, 5, 16), ck, ck, cb, cb, use_kernel=False))
    with pytest.raises(HfEffllmError, match="not the one"):
        million_attention_forward(attn, q, k, v, None, scaling=0.25)
    set_pending(PendingCodes(1, k, ck, ck, cb, cb, use_kernel=False))  # another layer's leftover: ignored
    torch.testing.assert_close(million_attention_forward(attn, q, k, v, None, scaling=0.25)[0],
                               sdpa_attention_forward(attn, q, k, v, None, scaling=0.25)[0])  # fmt: skip


def test_dynamic_cache_with_million_attention_is_sdpa(model_and_books):
    model, _ = model_and_books
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(6))
    model.set_attn_implementation("sdpa")
    ref = model(input_ids=ids).logits
    model.set_attn_implementation("million")
    torch.testing.assert_close(model(input_ids=ids).logits, ref)


def test_code_buffers_replaced_by_growth_are_released(model_and_books):
    """When the codes outgrow their buffers, the layer keeps no reference to the old ones (a decode step's memo of
    the code views must not hold them until the layer's next update: on a GPU that is one more allocation)."""
    import gc
    import weakref

    model, books = model_and_books
    model.set_attn_implementation("million")
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(9))
    _, cache = _prefill_then_decode(model, MillionCache(model.config, books), ids, 19)
    layer = cache.layers[0]
    old = weakref.ref(layer.codes_k)
    need = layer.codes_k.shape[2] - layer.n_codes + 1  # tokens to add until the next flush must grow the buffer
    steps = 0
    while layer.codes_k is old() and steps < 10 * need + 100:
        out = model(input_ids=ids[:, -1:], **cache_kwargs(cache))
        cache = output_cache(out)
        steps += 1
    assert layer.codes_k is not old(), "the codes buffer never grew"
    del out
    gc.collect()
    assert old() is None
