"""MillionCache attention sinks: the first ``sink_length`` tokens stay exact, the middle is PQ-coded.

The reference here is independent of :mod:`hf_effllm.cache.million.cache`: a ``DynamicLayer`` that keeps every
token exact and, at each step, hands attention ``[exact sinks, decoded(encoded(middle)), exact window]`` with the
middle chosen by the same flush rule (window beyond ``residual_length + residual_length // 8`` tokens: encode all
but the last ``residual_length``), run with plain ``sdpa``. Tolerance: float32 round-off (1e-4 on logits).
"""

from __future__ import annotations

import pytest
import torch
from hf_effllm.kernels.million import pq_decode_reference, pq_encode_reference
from transformers.cache_utils import Cache, DynamicLayer

from hf_effllm import MillionCache, MillionConfig, million
from hf_effllm.cache.million import attention
from hf_effllm.cache.million.attention import set_pending, split_mask
from hf_effllm.compat import cache_kwargs, output_cache
from hf_effllm.errors import HfEffllmError
from hf_effllm.testing import tiny_model

RESIDUAL = 8
CFG = MillionConfig(num_subspaces=8, nbits=8, residual_length=RESIDUAL, kmeans_iters=8, sink_length=0)


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


class _RefLayer(DynamicLayer):
    """All tokens exact; attention gets [sinks, decode(encode(middle)), window] (see the module docstring)."""

    def __init__(self, codebook_k: torch.Tensor, codebook_v: torch.Tensor, sinks: int, residual: int) -> None:
        super().__init__()
        self.cb = (codebook_k, codebook_v)
        self.sinks, self.residual, self.n = sinks, residual, 0

    def update(self, key_states, value_states, *args, **kwargs):
        n_before = self.n
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        total = keys.shape[2]
        s = min(self.sinks, total)
        if total - s - self.n > self.residual + self.residual // 8:
            self.n = total - s - self.residual
        if n_before == 0:
            return keys, values
        mid = slice(s, s + n_before)
        out = []
        for x, cb in ((keys, self.cb[0]), (values, self.cb[1])):
            dec = pq_decode_reference(pq_encode_reference(x[:, :, mid], cb), cb)
            out.append(torch.cat([x[:, :, :s], dec, x[:, :, s + n_before :]], dim=2))
        return tuple(out)


def _ref_cache(model, books, sinks):
    return Cache(layers=[_RefLayer(*books.layer(i), sinks, RESIDUAL) for i in range(model.config.num_hidden_layers)])


def _run(model, cache, ids, split, attention_mask=None, chunk=1):
    """Logits of the last prompt token and every later token, fed ``chunk`` at a time through ``cache``."""
    am = torch.ones_like(ids) if attention_mask is None else attention_mask
    pos = (am.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids[:, :split], attention_mask=am[:, :split], position_ids=pos[:, :split],
                **cache_kwargs(cache))  # fmt: skip
    logits, cache = [out.logits[:, -1:]], output_cache(out)
    for s in range(split, ids.shape[1], chunk):
        e = min(s + chunk, ids.shape[1])
        out = model(input_ids=ids[:, s:e], attention_mask=am[:, :e], position_ids=pos[:, s:e], **cache_kwargs(cache))
        cache = output_cache(out)
        logits.append(out.logits)
    return torch.cat(logits, 1), cache


def test_sink_length_validation(model_and_books):
    model, books = model_and_books
    for bad in (-1, 2.5, "4", True):
        with pytest.raises(HfEffllmError, match="sink_length"):
            MillionConfig(sink_length=bad)
        with pytest.raises(HfEffllmError, match="sink_length"):
            MillionCache(model.config, books, sink_length=bad)
    assert MillionConfig().sink_length == 4  # the default (measured: see the README)
    assert MillionConfig.from_dict({"residual_length": 4}).sink_length == 4  # configs saved before sinks existed
    assert MillionCache(model.config, books).sink_length == CFG.sink_length == 0
    assert MillionCache(model.config, books, sink_length=5).layers[1].sink_length == 5


@pytest.mark.parametrize("sinks,chunk", [(0, 1), (3, 1), (3, 5), (16, 3)])
def test_cache_equals_reference_with_exact_sinks(model_and_books, sinks, chunk):
    model, books = model_and_books
    ids = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(1))
    model.set_attn_implementation("sdpa")
    ref, ref_cache = _run(model, _ref_cache(model, books, sinks), ids, 30, chunk=chunk)
    model.set_attn_implementation("million")
    got, cache = _run(model, MillionCache(model.config, books, sink_length=sinks), ids, 30, chunk=chunk)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    layer, ref0 = cache.layers[0], ref_cache.layers[0]  # layer 0: same inputs in both runs, so same K/V bits
    n = layer.n_codes
    assert n > 0 and n == ref0.n and cache.get_seq_length() == 50 == sinks + n + layer.keys.shape[2]
    assert torch.equal(layer.sink_keys, ref0.keys[:, :, :sinks])
    assert torch.equal(layer.sink_values, ref0.values[:, :, :sinks])
    assert torch.equal(layer.keys, ref0.keys[:, :, sinks + n :])
    assert torch.equal(
        layer.codes_k[:, :, :n], pq_encode_reference(ref0.keys[:, :, sinks : sinks + n], books.layer(0)[0])
    )
    assert torch.equal(
        layer.codes_v[:, :, :n], pq_encode_reference(ref0.values[:, :, sinks : sinks + n], books.layer(0)[1])
    )
    if sinks:  # the sinks changed the result (they are not coded any more)
        plain, _ = _run(model, MillionCache(model.config, books), ids, 30, chunk=chunk)
        assert not torch.allclose(plain, got, atol=1e-4)


@pytest.mark.parametrize("sinks", [0, 2])
def test_update_returns_sinks_then_window(model_and_books, sinks):
    """update returns cat(sinks, window, new) (sink_length=0: the window and new tokens, as before sinks existed)."""
    model, books = model_and_books
    model.set_attn_implementation("million")
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    _, cache = _run(model, MillionCache(model.config, books, sink_length=sinks), ids, 20)
    layer = cache.layers[0]
    assert layer.sink_keys.shape[2] == sinks and layer.n_codes > 0
    before = layer.sink_keys.clone(), layer.keys.clone()
    new_k, new_v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    try:
        k, _ = layer.update(new_k, new_v)
    finally:
        set_pending(None)
    torch.testing.assert_close(k, torch.cat([before[0], before[1], new_k], 2), atol=0, rtol=0)


def test_million_and_decoded_paths_agree_with_sinks(model_and_books):
    """With sinks, the 'million' function (codes + exact part) == sdpa over what update returns otherwise."""
    model, books = model_and_books
    ids = torch.randint(0, 256, (2, 44), generator=torch.Generator().manual_seed(3))
    model.set_attn_implementation("million")
    a, _ = _run(model, MillionCache(model.config, books, sink_length=4), ids, 26, chunk=3)
    model.set_attn_implementation("sdpa")
    with pytest.warns(UserWarning, match="rebuilds the full K/V"):
        b, _ = _run(model, MillionCache(model.config, books, sink_length=4), ids, 26, chunk=3)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_split_mask_orders_sinks_codes_window():
    gen = torch.Generator().manual_seed(4)
    s, n, r, lq = 3, 5, 4, 2
    allowed = torch.rand(2, 1, lq, s + n + r, generator=gen) > 0.3
    code_mask, exact_mask = split_mask(allowed, 2, lq, n, r, torch.device("cpu"), n_sinks=s)
    assert torch.equal(exact_mask, torch.cat([allowed[:, 0, :, :s], allowed[:, 0, :, s + n :]], -1))
    assert torch.equal(code_mask, allowed[:, 0, -1, s : s + n])
    additive = torch.zeros(2, 1, lq, s + n + r).masked_fill(~allowed, torch.finfo(torch.float32).min)
    assert torch.equal(split_mask(additive, 2, lq, n, r, torch.device("cpu"), n_sinks=s)[1], exact_mask)
    # no mask: sinks visible to every query, window causal and bottom-right aligned
    _, causal = split_mask(None, 2, lq, n, r, torch.device("cpu"), n_sinks=s)
    assert causal.shape == (2, lq, s + r) and causal[:, :, :s].all()
    assert causal[0, :, s:].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert split_mask(None, 2, 1, n, r, torch.device("cpu"), n_sinks=s) == (None, None)
    with pytest.raises(HfEffllmError, match="3 sink"):
        split_mask(allowed[..., 1:], 2, lq, n, r, torch.device("cpu"), n_sinks=s)
    # a mask that allows every coded token still gives a code mask (not None: telling would read the mask's data)
    full = allowed.clone()
    full[..., s : s + n] = True
    code_mask, _ = split_mask(full, 2, lq, n, r, torch.device("cpu"), n_sinks=s)
    assert code_mask is not None and code_mask.shape == (2, n) and bool(code_mask.all())


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_split_mask_never_reads_the_masks_data(dtype):
    """On the meta device (shapes, no data) any read of the mask's values on the host (``.all()``, ``bool()``,
    ``.item()``: a device-to-host synchronisation per layer and step on a GPU) raises; the split must go through."""
    s, n, r, lq = 4, 37, 9, 1
    mask = torch.zeros(3, 1, lq, s + n + r, dtype=dtype, device="meta")
    code_mask, exact_mask = split_mask(mask, 3, lq, n, r, mask.device, n_sinks=s)
    assert code_mask.is_meta and code_mask.shape == (3, n) and code_mask.dtype == torch.bool
    assert exact_mask.is_meta and exact_mask.shape == (3, lq, s + r) and exact_mask.dtype == torch.bool
    with pytest.raises(Exception, match="meta"):  # what the check would hit: the meta device has no values
        bool(code_mask.all())


def test_crop_into_and_beyond_sinks(model_and_books):
    model, books = model_and_books
    model.set_attn_implementation("million")
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(5))
    _, cache = _run(model, MillionCache(model.config, books, sink_length=4), ids[:, :40], 30, chunk=2)
    layer = cache.layers[0]
    n = layer.n_codes
    assert layer.sink_keys.shape[2] == 4 and n > 2
    cache.crop(-1)  # inside the window
    assert cache.get_seq_length() == 39 and layer.n_codes == n and layer.sink_keys.shape[2] == 4
    cache.crop(6)  # legacy form: keep 6 = 4 sinks + 2 codes
    assert cache.get_seq_length() == 6 and layer.n_codes == 2 and layer.keys.shape[2] == 0
    out = model(input_ids=ids[:, 6:9], **cache_kwargs(cache))  # continues: the new tokens go to the window
    assert output_cache(out).get_seq_length() == 9 and layer.sink_keys.shape[2] == 4 and layer.n_codes == 2
    cache.crop(-7)  # into the sinks: keep 2 exact tokens, drop codes and window
    assert cache.get_seq_length() == 2 and layer.sink_keys.shape[2] == 2 and layer.n_codes == 0
    sink_before = layer.sink_keys.clone()
    # refilled from there (no mask: the causal case), it equals a fresh cache fed the same tokens (sinks exact)
    fresh_cache = MillionCache(model.config, books, sink_length=4)
    model(input_ids=ids[:, :2], **cache_kwargs(fresh_cache))
    for s in range(2, 60, 4):
        pos = torch.arange(s, min(s + 4, 60))[None]
        a = model(input_ids=ids[:, s : s + 4], position_ids=pos, **cache_kwargs(cache)).logits
        b = model(input_ids=ids[:, s : s + 4], position_ids=pos, **cache_kwargs(fresh_cache)).logits
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.sink_keys[:, :, :2], sink_before) and layer.n_codes == fresh_cache.layers[0].n_codes > 0
    cache.crop(0)  # legacy 0 and negative beyond the length: everything goes
    cache.crop(-1000)
    assert cache.get_seq_length() == 0 and layer.sink_keys.shape[2] == 0


def test_beam_reorder_and_memory_with_sinks(model_and_books):
    model, books = model_and_books
    model.set_attn_implementation("million")
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(6))
    _, cache = _run(model, MillionCache(model.config, books, sink_length=4), ids, 36)
    layer = cache.layers[0]
    before = layer.sink_keys.clone(), layer.sink_values.clone()
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert torch.equal(layer.sink_keys, before[0][[2, 0, 0]]) and torch.equal(layer.sink_values, before[1][[2, 0, 0]])
    n, h, m = layer.n_codes, layer.num_heads, layer.num_subspaces
    exact_tokens = 4 + layer.keys.shape[2]
    assert layer.nbytes == 2 * 3 * h * n * m + 2 * 3 * h * exact_tokens * 16 * 4
    assert cache.memory_report()["sink_tokens"] == 4
    cache.batch_repeat_interleave(2)
    assert layer.sink_keys.shape[0] == 6 == layer.batch_size
    cache.batch_select_indices(torch.tensor([1, 4]))
    assert layer.sink_keys.shape[0] == 2 and torch.equal(layer.sink_keys[1], before[0][0])
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes == 0 and layer.sink_keys is None
    # beam search through the codes + exact sinks == through the decoded cache (sdpa)
    kw = dict(max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=0)
    prompt = torch.randint(1, 256, (2, 20), generator=torch.Generator().manual_seed(7))
    got = model.generate(input_ids=prompt, **kw, **cache_kwargs(MillionCache(model.config, books, sink_length=4)))
    model.set_attn_implementation("sdpa")
    with pytest.warns(UserWarning):
        ref = model.generate(input_ids=prompt, **kw, **cache_kwargs(MillionCache(model.config, books, sink_length=4)))
    assert torch.equal(got, ref)


def test_left_padding_with_sinks(model_and_books):
    """Sinks are the first buffer positions of every row; a padded row's are padding (masked) and it still equals
    the reference with the same layout; the unpadded row equals itself alone."""
    model, books = model_and_books
    gen = torch.Generator().manual_seed(8)
    long_row, short_row = torch.randint(1, 256, (36,), generator=gen), torch.randint(1, 256, (30,), generator=gen)
    ids = torch.stack([long_row, torch.cat([torch.zeros(6, dtype=torch.long), short_row])])
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    model.set_attn_implementation("sdpa")
    ref, _ = _run(model, _ref_cache(model, books, 4), ids, 20, attention_mask=mask, chunk=2)
    model.set_attn_implementation("million")
    got, cache = _run(model, MillionCache(model.config, books, sink_length=4), ids, 20, attention_mask=mask, chunk=2)
    assert cache.layers[0].n_codes > 0
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    alone, _ = _run(model, MillionCache(model.config, books, sink_length=4), long_row[None], 20, chunk=2)
    torch.testing.assert_close(got[:1], alone, atol=1e-4, rtol=1e-4)


def test_padded_batch_splits_the_mask_once_per_forward(model_and_books, monkeypatch):
    """The model hands one mask tensor to all its layers in a forward: it is split once per forward with codes (the
    prefill runs sdpa), and the logits are those of a split per layer, bit for bit."""
    model, books = model_and_books
    assert model.config.num_hidden_layers >= 2
    model.set_attn_implementation("million")
    ids = torch.randint(1, 256, (2, 34), generator=torch.Generator().manual_seed(12))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    calls = []
    split = attention.split_mask
    monkeypatch.setattr(attention, "split_mask", lambda *a: calls.append(a[0]) or split(*a))
    got, cache = _run(model, MillionCache(model.config, books, sink_length=4), ids, 22, attention_mask=mask)
    assert cache.layers[0].n_codes > 0 and len(calls) == ids.shape[1] - 22  # one per decode forward
    assert len({id(m) for m in calls}) == len(calls)  # each forward's own mask
    monkeypatch.setattr(attention, "_split_mask_once", lambda *a: split(*a))  # split per layer
    ref, _ = _run(model, MillionCache(model.config, books, sink_length=4), ids, 22, attention_mask=mask)
    assert torch.equal(got, ref)


def test_split_mask_once_follows_the_mask():
    """The decode step's memo answers for the same mask object, version and sizes only; an inference tensor is split
    on every call."""
    cpu = torch.device("cpu")
    mask = torch.rand(2, 1, 1, 20, generator=torch.Generator().manual_seed(13)) > 0.3
    once = attention._split_mask_once
    first = once(mask, 2, 1, 10, 6, cpu, 4)
    assert once(mask, 2, 1, 10, 6, cpu, 4) is first
    for got, want in zip(once(mask.clone(), 2, 1, 10, 6, cpu, 4), first):  # another object: split again, same
        assert got is not want and torch.equal(got, want)
    mask[0, 0, 0, 7] = not mask[0, 0, 0, 7]  # in place: a new version
    again = once(mask, 2, 1, 10, 6, cpu, 4)
    assert torch.equal(again[0], split_mask(mask, 2, 1, 10, 6, cpu, 4)[0]) and not torch.equal(again[0], first[0])
    other = once(mask, 2, 1, 11, 5, cpu, 4)  # other sizes
    assert other[0].shape == (2, 11) and other[1].shape == (2, 1, 9)
    with torch.inference_mode():
        inf = mask.clone()
        before = once(inf, 2, 1, 10, 6, cpu, 4)
        inf.logical_not_()  # no version counter to see this: never memoized
        assert torch.equal(once(inf, 2, 1, 10, 6, cpu, 4)[0], ~before[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_path_with_sinks(triton_interpret, model_and_books, dtype):
    """The Triton decode kernel (interpreter) gets cat(sinks, window) as its exact part: same as the PyTorch path."""
    model, books = model_and_books
    model = model.to(dtype)
    try:
        model.set_attn_implementation("million")
        ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(9))
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        kw = dict(attention_mask=mask, chunk=2)
        cache = MillionCache(model.config, books, sink_length=2, use_kernel=True)
        got, cache = _run(model, cache, ids, 24, **kw)
        assert cache.layers[0].n_codes > 0 and cache.layers[0].sink_keys.dtype == dtype
        ref, _ = _run(model, MillionCache(model.config, books, sink_length=2, use_kernel=False), ids, 24, **kw)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
    finally:
        model.to(torch.float32)
