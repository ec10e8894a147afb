"""Quality options of SeerAttention: block-mass targets, KV-group reduction, the oracle diagnostic, sink forcing."""

from __future__ import annotations

import copy

import pytest
import torch
from test_seer_kernels import naive_attention, naive_blockmax

from hf_effllm import SeerAttentionConfig, apply_seer_attention, seer
from hf_effllm.attention.seer.attention import oracle_scores
from hf_effllm.attention.seer.gate import select_blocks
from hf_effllm.attention.seer.targets import block_attention_map, reduce_target
from hf_effllm.errors import HfEffllmError
from hf_effllm.testing import tiny_model


def naive_blockmass(p, block_size):
    b, h, s, _ = p.shape
    nb = -(-s // block_size)
    pp = torch.nn.functional.pad(p, (0, nb * block_size - s, 0, nb * block_size - s))
    return pp.view(b, h, nb, block_size, nb, block_size).sum(dim=(-1, -3))


@pytest.mark.parametrize("stat", ["mass", "max"])
def test_block_attention_map_matches_naive(stat):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 6, 83, 8, generator=g), torch.randn(2, 2, 83, 8, generator=g), torch.randn(2, 2, 83, 8)
    pad = torch.ones(2, 83, dtype=torch.bool)
    pad[1, 60:] = False
    ref_out, p = naive_attention(q, k, v, None, pad, 16)
    out, bmap = block_attention_map(q, k, v, stat=stat, key_padding=pad, block_size=16)
    expected = naive_blockmass(p, 16) if stat == "mass" else naive_blockmax(p, 16)
    torch.testing.assert_close(bmap, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert block_attention_map(q, k, None, stat=stat, key_padding=pad, block_size=16)[0] is None
    if stat == "mass":  # each real query row spreads exactly 1 over its keys
        rows = torch.tensor([16, 16, 16, 16, 16, 3], dtype=torch.float32)
        torch.testing.assert_close(bmap[0].sum(-1), rows.expand(6, 6))


def test_reduce_target_group_max_and_mean():
    m = torch.rand(1, 6, 4, 4).tril()
    for how, fn in (("max", lambda t: t.amax(2)), ("mean", lambda t: t.mean(2))):
        t = fn(m.view(1, 2, 3, 4, 4))
        torch.testing.assert_close(reduce_target(m, 2, how), t / t.sum(-1, keepdim=True))
    with pytest.raises(HfEffllmError, match="group_reduce='sum'"):
        reduce_target(m, 2, "sum")
    with pytest.raises(HfEffllmError, match="num_kv_heads=4"):
        reduce_target(m, 4)


def test_select_blocks_keep_sink():
    torch.manual_seed(1)
    nb = 9
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    probs = torch.softmax(torch.randn(2, 3, nb, nb).masked_fill(~causal, float("-inf")), -1)
    probs[..., 0] = 0.0  # the gate ranks the sink last: keep_sink must still keep it
    plain = select_blocks(probs, SeerAttentionConfig(nz_ratio=0.4))
    sink = select_blocks(probs, SeerAttentionConfig(nz_ratio=0.4, keep_sink=True))
    assert (sink.sum(-1) == plain.sum(-1)).all()  # same density per row
    assert sink[..., 0].all() and not plain[..., 2:, 0].any()
    assert sink.diagonal(dim1=-2, dim2=-1).all() and not sink.triu(1).any()
    for i in range(3, nb):  # besides sink and diagonal, the gate's top blocks
        k = int(plain[0, 0, i].sum())
        top = set(probs[0, 0, i, 1:i].topk(k - 2).indices.add(1).tolist())
        assert top == set(sink[0, 0, i, 1:i].nonzero().flatten().add(1).tolist())
    thr = select_blocks(probs, SeerAttentionConfig(threshold=0.99, keep_sink=True))
    assert thr[..., 0].all()
    kvalid = torch.ones(2, nb, dtype=torch.bool)
    kvalid[1, 0] = False  # an empty first block (left padding) is not kept even with keep_sink
    assert not select_blocks(probs, SeerAttentionConfig(nz_ratio=0.4, keep_sink=True), kvalid)[1, ..., 0].any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": "sum"}, "target='sum'"),
        ({"target_group_reduce": "min"}, "target_group_reduce='min'"),
        ({"oracle": "max"}, "oracle='max'"),
        ({"oracle": "kv", "fixed_pattern": "sink_local"}, "give only one"),
        ({"keep_sink": 1}, "keep_sink=1"),
    ],
)
def test_config_rejects_bad_quality_options(kwargs, match):
    with pytest.raises(HfEffllmError, match=match):
        SeerAttentionConfig(**kwargs)


@pytest.mark.parametrize("oracle", ["kv", "head"])
def test_oracle_selects_top_blocks_of_the_true_map(oracle):
    """The oracle's kept blocks are select_blocks of the layer's true target map; nz_ratio=1.0 stays dense."""
    base = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 120), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = base(input_ids=ids).logits
    cfg = SeerAttentionConfig(block_size=16, nz_ratio=1.0, oracle=oracle, target="mass", target_group_reduce="mean")
    model = apply_seer_attention(copy.deepcopy(base), cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense, atol=1e-5, rtol=1e-5)
    seer.set_seer_options(model, nz_ratio=0.3)
    seer.sparsity_report(model, reset=True)
    gate = seer.gates_of(model)[0]
    g = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(2, 4, 120, 16, generator=g),
        torch.randn(2, 2, 120, 16, generator=g),
        torch.randn(2, 2, 120, 16),
    )
    scores = oracle_scores(gate, q, k, v, 0.25, None, False)
    _, p = naive_attention(q, k, v, None, None, 16)
    mass = naive_blockmass(p, 16)
    expected = reduce_target(mass, 2, "mean") if oracle == "kv" else mass / mass.sum(-1, keepdim=True)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        sparse = model(input_ids=ids).logits
    report = seer.sparsity_report(model)
    nb = 8
    n_row = torch.arange(1, nb + 1)
    kept = torch.maximum(torch.ceil(n_row * 0.3), n_row.clamp_max(2)).sum()
    assert all(abs(s - (1 - kept / (nb * (nb + 1) / 2))) < 1e-6 for s in report.values())
    assert not torch.allclose(sparse, dense, atol=1e-3)


@pytest.mark.parametrize(("oracle", "target"), [("kv", "max"), ("head", "mass")])
def test_oracle_layer_output_equals_masked_attention_with_true_top_blocks(oracle, target):
    """Inside the model, layer 0 attends exactly to select_blocks(true map of its own Q/K)."""
    cfg = SeerAttentionConfig(block_size=16, nz_ratio=0.3, oracle=oracle, target=target)
    model = apply_seer_attention(tiny_model("llama"), cfg)
    attn = model.model.layers[0].self_attn
    captured = {}

    def grab(mod, args, out):
        captured["out"] = out[0]

    handle = attn.register_forward_hook(grab)
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    q, k, v = _layer0_qkv(model, ids)
    _, p = naive_attention(q, k, v, None, None, 16)
    stat = naive_blockmass(p, 16) if target == "mass" else naive_blockmax(p, 16)
    scores = reduce_target(stat, 2, cfg.target_group_reduce) if oracle == "kv" else stat / stat.sum(-1, keepdim=True)
    keep = select_blocks(scores, cfg)
    assert keep.shape[1] == (2 if oracle == "kv" else 4)
    o, _ = naive_attention(q, k, v, keep, None, 16)
    with torch.no_grad():
        expected = attn.o_proj(o.transpose(1, 2).reshape(1, 90, -1))
    torch.testing.assert_close(captured["out"], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", ["mass", "max"])
def test_distillation_on_each_target_lowers_loss(target):
    torch.manual_seed(0)
    cfg = SeerAttentionConfig(block_size=16, gate_hidden_size=16, target=target, target_group_reduce="mean")
    model = apply_seer_attention(tiny_model("llama"), cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    ids = torch.randint(0, 256, (4, 96), generator=torch.Generator().manual_seed(1))
    wrapper = seer.GateDistillModel(model, cache_features=False)
    with torch.no_grad():
        loss0 = wrapper(ids)["loss"].item()
        rec = wrapper._records(ids, None)
    _, p = naive_attention(*_layer0_qkv(model, ids), None, None, 16)
    stat = naive_blockmass(p, 16) if target == "mass" else naive_blockmax(p, 16)
    torch.testing.assert_close(rec[0]["target"], reduce_target(stat, 2, "mean"), atol=1e-5, rtol=1e-4)
    seer.distill_gates(model, ids, max_steps=30, learning_rate=2e-2, batch_size=2, logging_steps=10)
    with torch.no_grad():
        assert wrapper(ids)["loss"].item() < 0.7 * loss0


def _layer0_qkv(model, ids):
    """Post-RoPE Q, K and V of layer 0 (its input is the embedding after the input norm)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    layer = model.model.layers[0]
    attn = layer.self_attn
    with torch.no_grad():
        x = layer.input_layernorm(model.model.embed_tokens(ids))
        pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        cos, sin = model.model.rotary_emb(x, pos)
        b, s, hd = ids.shape[0], ids.shape[1], attn.head_dim
        q = attn.q_proj(x).view(b, s, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(b, s, -1, hd).transpose(1, 2)
        v = attn.v_proj(x).view(b, s, -1, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def test_loss_without_forced_blocks_ignores_them():
    """distill_forced_blocks=False: target mass on the diagonal / sink does not change the loss; the paper loss moves."""
    from hf_effllm.attention.seer import SeerAttnGate, distill_loss

    torch.manual_seed(6)
    nb = 7
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    t = torch.rand(1, 2, nb, nb).masked_fill(~causal, 0.0)
    t2 = t.clone()
    t2[..., 0] *= 5.0
    t2 = t2 + torch.eye(nb) * 3.0
    rec = {
        "pq": torch.randn(1, 4, nb, 8),
        "pk": torch.randn(1, 2, nb, 24),
        "kvalid": torch.ones(1, nb, dtype=torch.bool),
    }

    def loss(target, **cfg):
        gate = SeerAttnGate(4, 2, 8, SeerAttentionConfig(block_size=16, gate_hidden_size=8, **cfg), 100.0, 0)
        torch.manual_seed(7)
        gate.reset_parameters()
        return distill_loss(gate, {**rec, "target": target / target.sum(-1, keepdim=True)})

    free = {"keep_sink": True, "distill_forced_blocks": False}
    torch.testing.assert_close(loss(t, **free), loss(t2, **free))
    assert not torch.allclose(loss(t, keep_sink=True), loss(t2, keep_sink=True))
    assert torch.isfinite(loss(t, **free)) and loss(t, **free) > 0
