"""Parameter grouping on tiny llama/qwen3/qwen3_moe/deepseek_v3, optim_args parsing, and the update rule."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_effllm.errors import HfEffllmError
from hf_effllm.optim import Muon, MuonConfig, classify_parameters, newton_schulz
from hf_effllm.optim.muon import fused_splits, lr_adjustment
from hf_effllm.testing import tiny_model


def _routes(model) -> dict[str, tuple[bool, str]]:
    return {i.name: (i.use_muon, i.reason) for i in classify_parameters(model)}


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "qwen3_moe", "deepseek_v3"])
def test_grouping(model_type):
    model = tiny_model(model_type)
    routes = _routes(model)
    assert routes["model.embed_tokens.weight"] == (False, "embedding")
    assert routes["lm_head.weight"] == (False, "output head")
    assert routes["model.norm.weight"][0] is False
    assert routes["model.layers.0.self_attn.o_proj.weight"] == (True, "hidden matrix")
    for name, p in model.named_parameters():
        if p.ndim < 2 or name.endswith("mlp.gate.weight"):
            assert routes[name][0] is False, name
        if ".mlp.experts." in name:
            assert p.ndim == 3 and routes[name] == (True, "stacked experts"), name
    if model_type in ("qwen3_moe", "deepseek_v3"):
        assert routes["model.layers.1.mlp.gate.weight"] == (False, "MoE router")
    if model_type == "qwen3":
        assert routes["model.layers.0.self_attn.q_norm.weight"][0] is False
    # Every trainable parameter is in exactly one group of the optimizer.
    opt = Muon.from_model(model, lr=1e-3)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    muon_ids = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    assert muon_ids == {id(i.param) for i in classify_parameters(model) if i.use_muon}


def test_tied_head_is_adamw_once():
    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    infos = classify_parameters(model)
    assert [i.reason for i in infos if i.param is model.lm_head.weight] == ["embedding"]


def test_fused_blocks_detected():
    model = tiny_model("deepseek_v3")
    routes = {i.name: i.splits for i in classify_parameters(model)}
    assert routes["model.layers.1.mlp.experts.gate_up_proj"] == (32, 32)
    assert routes["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (16, 8)  # [latent | rope key]
    cfg = tiny_model("llama").config
    assert fused_splits("x.qkv_proj.weight", (128, 64), cfg) == (64, 32, 32)
    assert fused_splits("x.qkv_proj.weight", (100, 64), cfg) is None  # not a [q|k|v] layout: whole matrix
    assert classify_parameters(model, split_fused=False)[5].splits is None


def test_stacked_and_fused_are_orthogonalised_per_matrix():
    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.zeros(3, 16, 8))  # 3 experts, rows = [gate(8) | up(8)]
    opt = Muon(
        [{"params": [stacked], "use_muon": True, "splits": [(8, 8)]}],
        lr=1.0,
        config=MuonConfig(momentum=0.0, nesterov=False, adjust_lr="none"),
    )
    grad = torch.randn(3, 16, 8)
    stacked.grad = grad.clone()
    opt.step()
    for e in range(3):
        for rows in (slice(0, 8), slice(8, 16)):
            expected = -newton_schulz(grad[e, rows]).float()
            torch.testing.assert_close(stacked.detach()[e, rows], expected, atol=1e-2, rtol=0)


def test_matches_torch_muon_and_adamw():
    torch.manual_seed(0)
    hidden = [torch.nn.Parameter(torch.randn(32, 48)), torch.nn.Parameter(torch.randn(48, 32))]
    other = [torch.nn.Parameter(torch.randn(10, 8)), torch.nn.Parameter(torch.randn(8))]
    ref_h = [torch.nn.Parameter(p.detach().clone()) for p in hidden]
    ref_o = [torch.nn.Parameter(p.detach().clone()) for p in other]
    opt = Muon(
        [{"params": hidden, "use_muon": True}, {"params": other, "use_muon": False, "lr": 3e-3}],
        lr=0.02,
        weight_decay=0.1,
        betas=(0.9, 0.95),
        config=MuonConfig(adjust_lr="original"),
    )
    ref1 = torch.optim.Muon(ref_h, lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    ref2 = torch.optim.AdamW(ref_o, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(3):
        for p, r in zip(hidden + other, ref_h + ref_o):
            g = torch.randn_like(p)
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        ref1.step()
        ref2.step()
    for p, r in zip(hidden + other, ref_h + ref_o):
        torch.testing.assert_close(p, r, atol=1e-6, rtol=1e-6)
    # State round-trip: a fresh optimizer loaded from the state dict continues identically.
    clone = [torch.nn.Parameter(p.detach().clone()) for p in hidden + other]
    opt2 = Muon(
        [{"params": clone[:2], "use_muon": True}, {"params": clone[2:], "use_muon": False, "lr": 3e-3}],
        lr=0.02,
        weight_decay=0.1,
        betas=(0.9, 0.95),
        config=MuonConfig(adjust_lr="original"),
    )
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a checkpoint: no shared buffers
    for p, c in zip(hidden + other, clone):
        g = torch.randn_like(p)
        p.grad, c.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    for p, c in zip(hidden + other, clone):
        assert torch.equal(p, c)


def test_lr_adjustment_rules():
    assert lr_adjustment(256, 64, "original") == 2.0
    assert lr_adjustment(64, 256, "original") == 1.0
    assert lr_adjustment(64, 256, "match_rms_adamw") == pytest.approx(0.2 * 16)
    assert lr_adjustment(64, 256, "none") == 1.0


def test_match_rms_adamw_update_rms_is_point_two():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(64, 256))
    opt = Muon([{"params": [w], "use_muon": True}], lr=1.0, config=MuonConfig(momentum=0.0))
    w.grad = torch.randn(64, 256)
    opt.step()
    rms = w.detach().pow(2).mean().sqrt()
    assert 0.15 < rms < 0.25  # ~0.2 (the RMS of an AdamW update), up to the quintic's spread of singular values


def test_optim_args_parsing():
    cfg = MuonConfig.from_optim_args("momentum=0.9, ns_steps=6,adjust_lr=original,adamw_lr=3e-4,nesterov=false")
    assert (cfg.momentum, cfg.ns_steps, cfg.adjust_lr, cfg.adamw_lr, cfg.nesterov) == (0.9, 6, "original", 3e-4, False)
    assert MuonConfig.from_optim_args(None) == MuonConfig()
    assert MuonConfig.from_optim_args("adamw_lr=none").adamw_lr is None


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("momentun=0.9", "unknown key"),
        ("momentum=abc", "not a valid float"),
        ("momentum=1.5", "momentum=1.5"),
        ("ns_steps=0", "ns_steps=0"),
        ("ns_steps=2.5", "not a valid int"),
        ("adjust_lr=fancy", "adjust_lr='fancy'"),
        ("nesterov=maybe", "not a valid bool"),
        ("momentum=0.9,momentum=0.8", "given twice"),
        ("momentum", "not key=value"),
        ("distributed=always", "distributed="),
        ("ns_dtype=float16", "ns_dtype="),
    ],
)
def test_bad_optim_args(text, match):
    with pytest.raises(HfEffllmError, match=match):
        MuonConfig.from_optim_args(text)


def test_bad_groups_and_models():
    with pytest.raises(HfEffllmError, match="cannot take Muon"):
        Muon([{"params": [torch.nn.Parameter(torch.ones(4))], "use_muon": True}])
    with pytest.raises(HfEffllmError, match="use_muon"):
        Muon([torch.nn.Parameter(torch.ones(4, 4))])
    with pytest.raises(HfEffllmError, match="do not add up"):
        Muon([{"params": [torch.nn.Parameter(torch.ones(4, 4))], "use_muon": True, "splits": [(1, 2)]}])
    with pytest.raises(HfEffllmError, match="no trainable"):
        Muon.from_model(torch.nn.Linear(4, 4).requires_grad_(False))


def test_model_without_matrices_falls_back_to_adamw(caplog):
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Embedding(10, 8))
    with caplog.at_level("WARNING"):
        opt = Muon.from_model(model)
    assert not any(g["use_muon"] for g in opt.param_groups)
    assert "no hidden weight matrix" in caplog.text
