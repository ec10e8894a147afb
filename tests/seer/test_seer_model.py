"""SeerAttention inside stock transformers models (tiny llama/qwen2/qwen3/mistral and the embedded model)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import hf_effllm
from hf_effllm import SeerAttentionConfig, apply_seer_attention, seer
from hf_effllm.errors import HfEffllmError
from hf_effllm.testing import tiny_model

TYPES = ["llama", "qwen2", "qwen3", "mistral"]


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.mark.parametrize("model_type", TYPES)
def test_nz_ratio_one_equals_dense_and_sparse_is_sparse(model_type):
    base = tiny_model(model_type)
    ids = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(0))
    dense = _logits(base, ids)
    model = apply_seer_attention(copy.deepcopy(base), SeerAttentionConfig(block_size=16, nz_ratio=1.0))
    assert model.config._attn_implementation == "seer_attention"
    torch.testing.assert_close(_logits(model, ids), dense, atol=1e-5, rtol=1e-5)
    assert seer.sparsity_report(model, reset=True) == {0: 0.0, 1: 0.0}
    seer.set_seer_options(model, nz_ratio=0.25)
    sparse = _logits(model, ids)
    report = seer.sparsity_report(model)
    assert set(report) == {0, 1} and all(0.4 < s < 0.8 for s in report.values())
    assert not torch.allclose(sparse, dense, atol=1e-3)
    cfg = seer.set_seer_options(model, top_p=1.0)  # adaptive budget; clears nz_ratio; 1.0 keeps every block
    assert cfg.nz_ratio is None and cfg.top_p == 1.0
    torch.testing.assert_close(_logits(model, ids), dense, atol=1e-5, rtol=1e-5)
    seer.sparsity_report(model, reset=True)
    seer.set_seer_options(model, top_p=0.5)
    _logits(model, ids)
    assert all(s > 0.0 for s in seer.sparsity_report(model).values())
    seer.remove_seer_attention(model)
    assert model.config._attn_implementation == base.config._attn_implementation
    torch.testing.assert_close(_logits(model, ids), dense, atol=1e-5, rtol=1e-5)


def test_sparse_layer_output_equals_masked_dense_attention():
    """One layer, the gate's kept blocks applied to a plain masked attention, versus the model's output."""
    from test_seer_kernels import naive_attention

    model = apply_seer_attention(tiny_model("llama"), SeerAttentionConfig(block_size=16, nz_ratio=0.3))
    attn = model.model.layers[0].self_attn
    captured = {}

    def grab(mod, args, kwargs, out):
        captured["out"] = out[0]

    def grab_in(mod, args, kwargs):
        captured["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        captured["pe"] = kwargs["position_embeddings"]

    h1 = attn.register_forward_pre_hook(grab_in, with_kwargs=True)
    h2 = attn.register_forward_hook(grab, with_kwargs=True)
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(1))
    _logits(model, ids)
    h1.remove(), h2.remove()
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = captured["hidden"]
    hd = attn.head_dim
    with torch.no_grad():
        qp = attn.q_proj(x).view(1, 90, -1, hd).transpose(1, 2)
        kp = attn.k_proj(x).view(1, 90, -1, hd).transpose(1, 2)
        v = attn.v_proj(x).view(1, 90, -1, hd).transpose(1, 2)
        keep = seer.select_blocks(attn.seer_gate(qp, kp), model._seer_config)
        q, k = apply_rotary_pos_emb(qp, kp, *captured["pe"])
        o, _ = naive_attention(q, k, v, keep, None, 16)
        expected = attn.o_proj(o.transpose(1, 2).reshape(1, 90, -1))
    torch.testing.assert_close(captured["out"], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_padding_in_a_batch(model_type):
    model = apply_seer_attention(tiny_model(model_type), SeerAttentionConfig(block_size=16, nz_ratio=0.4))
    g = torch.Generator().manual_seed(2)
    long, short = torch.randint(0, 256, (1, 100), generator=g), torch.randint(0, 256, (1, 70), generator=g)
    # Right padding keeps block alignment, so each row must equal its unpadded run exactly (sparse pattern too).
    ids = torch.cat([long, torch.cat([short, torch.zeros(1, 30, dtype=torch.long)], 1)])
    mask = torch.ones(2, 100, dtype=torch.long)
    mask[1, 70:] = 0
    batched = _logits(model, ids, attention_mask=mask)
    torch.testing.assert_close(batched[0], _logits(model, long)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1, :70], _logits(model, short)[0], atol=1e-5, rtol=1e-5)
    # Left padding shifts blocks; with every block kept it must still match exactly.
    seer.set_seer_options(model, nz_ratio=1.0)
    left = torch.cat([torch.zeros(1, 30, dtype=torch.long), short], 1)
    lmask = torch.ones(1, 100, dtype=torch.long)
    lmask[0, :30] = 0
    out = _logits(
        model, torch.cat([long, left]), attention_mask=torch.cat([torch.ones(1, 100, dtype=torch.long), lmask])
    )
    torch.testing.assert_close(out[1, 30:], _logits(model, short)[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_short_sequences_and_decode_run_dense():
    base = tiny_model("llama")
    model = apply_seer_attention(copy.deepcopy(base), SeerAttentionConfig(block_size=64, nz_ratio=0.1))
    ids = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_logits(model, ids), _logits(base, ids), atol=1e-5, rtol=1e-5)
    assert seer.sparsity_report(model) == {0: 0.0, 1: 0.0}
    gen = model.generate(ids[:1, :20], max_new_tokens=6, do_sample=False)
    ref = base.generate(ids[:1, :20], max_new_tokens=6, do_sample=False)
    assert torch.equal(gen, ref)
    seer.set_seer_options(model, min_seq_len=1000, dense_layers=[1])
    long = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(_logits(model, long), _logits(base, long), atol=1e-5, rtol=1e-5)


def test_triton_backend_in_model_matches_torch_backend(triton_interpret):
    base = tiny_model("qwen2")
    a = apply_seer_attention(copy.deepcopy(base), SeerAttentionConfig(block_size=16, nz_ratio=0.5, backend="torch"))
    b = copy.deepcopy(a)
    seer.set_seer_options(b, backend="triton")
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(_logits(b, ids), _logits(a, ids), atol=1e-5, rtol=1e-5)


def test_apply_errors():
    model = tiny_model("llama")
    with pytest.raises(HfEffllmError, match="dense_layers"):
        apply_seer_attention(model, SeerAttentionConfig(dense_layers=[5]))
    with pytest.raises(HfEffllmError, match="no SeerAttention"):
        seer.set_seer_options(model, nz_ratio=0.2)
    apply_seer_attention(model, SeerAttentionConfig(block_size=16))
    with pytest.raises(HfEffllmError, match="architecture"):
        seer.set_seer_options(model, gate_hidden_size=64)
    with pytest.raises(HfEffllmError, match="nz_ratio=2"):
        seer.set_seer_options(model, nz_ratio=2)
    with pytest.raises(HfEffllmError, match="no attention layers"):
        apply_seer_attention(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_embedded_model_dense_equivalence_and_sparsity(embedded):
    base, tok = embedded
    ids = tok(hf_effllm.corpus_text("train")[:3000], return_tensors="pt").input_ids[:, :300]
    dense = _logits(base, ids)
    model = apply_seer_attention(copy.deepcopy(base), SeerAttentionConfig(nz_ratio=1.0))
    assert len(seer.gates_of(model)) == 30
    gate = seer.gates_of(model)[0]
    assert (gate.num_heads, gate.num_kv_heads, gate.head_dim) == (9, 3, 64)
    torch.testing.assert_close(_logits(model, ids), dense, atol=1e-4, rtol=1e-4)
    seer.set_seer_options(model, nz_ratio=0.2)
    _logits(model, ids)
    nb = math.ceil(300 / 64)
    assert 0.0 < seer.mean_sparsity(seer.sparsity_report(model)) < 1 - 1 / nb


def test_gradients_flow_through_sparse_attention():
    model = apply_seer_attention(tiny_model("llama"), SeerAttentionConfig(block_size=16, nz_ratio=0.3))
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(6))
    model(input_ids=ids, labels=ids).loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_chunked_prefill_over_a_cache_runs_dense_and_says_so(monkeypatch):
    from transformers import DynamicCache

    from hf_effllm.attention.seer import attention
    from hf_effllm.compat import cache_kwargs

    said = []
    monkeypatch.setattr(attention.logger, "warning_once", lambda msg: said.append(msg))
    model = apply_seer_attention(tiny_model("llama"), SeerAttentionConfig(block_size=16, nz_ratio=0.2))
    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(6))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :48], use_cache=True, **cache_kwargs(cache))
        first = seer.sparsity_report(model)
        assert not said and all(v > 0 for v in first.values())  # the prompt ran sparse, silently
        out = model(input_ids=ids[:, 48:], use_cache=True, **cache_kwargs(cache)).logits
    assert torch.isfinite(out).all()
    assert seer.sparsity_report(model) == first  # the second chunk skipped no block
    assert said and "runs dense" in said[0]
