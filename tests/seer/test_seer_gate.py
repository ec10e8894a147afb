"""Pooling, gate and block selection against plain PyTorch references written with loops; config validation."""

from __future__ import annotations

import math

import pytest
import torch

from hf_effllm import SeerAttentionConfig
from hf_effllm.attention.seer import SeerAttnGate, block_pool, select_blocks
from hf_effllm.attention.seer.gate import sink_local_blocks
from hf_effllm.errors import HfEffllmError


def loop_pool(x, bs, kinds, valid=None):
    b, h, s, d = x.shape
    nb = math.ceil(s / bs)
    out = torch.zeros(b, h, nb, d * len(kinds))
    for bi in range(b):
        for j in range(nb):
            idx = [t for t in range(j * bs, min(s, (j + 1) * bs)) if valid is None or valid[bi, t]]
            if not idx:
                continue
            seg = x[bi, :, idx]
            parts = {"avg": seg.mean(1), "max": seg.max(1).values, "min": seg.min(1).values}
            out[bi, :, j] = torch.cat([parts[k] for k in kinds], -1)
    return out


def loop_gate(gate, q, k):
    """The paper's gate, one KV head and one block pair at a time."""
    cfg = gate.seer_config
    bs, gh = cfg.block_size, cfg.gate_hidden_size
    pq, pk = loop_pool(q, bs, cfg.q_pooling), loop_pool(k, bs, cfg.k_pooling)
    b, hkv, nb = k.shape[0], k.shape[1], pq.shape[2]
    g = q.shape[1] // hkv
    inv = 1.0 / (gate.rope_theta ** (torch.arange(0, gh, 2).float() / gh))
    probs = torch.zeros(b, hkv, nb, nb)
    for bi in range(b):
        for h in range(hkv):
            qh = sum(pq[bi, h * g + j] @ gate.q_weight[h, j] for j in range(g))  # (nb, gh)
            kh = pk[bi, h] @ gate.k_weight[h]

            def rope(x):
                out = torch.empty_like(x)
                for n in range(nb):
                    c, s_ = torch.cos(n * inv), torch.sin(n * inv)
                    x1, x2 = x[n, : gh // 2], x[n, gh // 2 :]
                    out[n] = torch.cat([x1 * c - x2 * s_, x1 * s_ + x2 * c])
                return out

            qh, kh = rope(qh), rope(kh)
            for i in range(nb):
                row = torch.stack([qh[i] @ kh[j] / math.sqrt(gh) for j in range(i + 1)])
                probs[bi, h, i, : i + 1] = torch.softmax(row, 0)
    return probs


@pytest.mark.parametrize("kinds", [["avg"], ["max", "min", "avg"], ["min", "max"]])
def test_block_pool_matches_loops(kinds):
    x = torch.randn(2, 3, 37, 5)
    valid = torch.ones(2, 37, dtype=torch.bool)
    valid[1, :11] = False
    torch.testing.assert_close(block_pool(x, 16, kinds), loop_pool(x, 16, kinds))
    torch.testing.assert_close(block_pool(x, 16, kinds, valid), loop_pool(x, 16, kinds, valid))


def test_gate_matches_loop_reference():
    torch.manual_seed(0)
    cfg = SeerAttentionConfig(block_size=16, gate_hidden_size=8)
    gate = SeerAttnGate(4, 2, 6, cfg, rope_theta=100.0, layer_idx=0)
    q, k = torch.randn(2, 4, 53, 6), torch.randn(2, 2, 53, 6)
    with torch.no_grad():
        probs = gate(q, k)
        expected = loop_gate(gate, q, k)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 2, 4))


def test_select_blocks_nz_ratio_threshold_and_diagonal():
    torch.manual_seed(0)
    nb = 8
    logits = torch.randn(1, 2, nb, nb).masked_fill(~torch.ones(nb, nb, dtype=torch.bool).tril(), float("-inf"))
    probs = torch.softmax(logits, -1)
    keep = select_blocks(probs, SeerAttentionConfig(nz_ratio=0.5))
    n_row = torch.arange(1, nb + 1)
    expected_k = torch.maximum(torch.ceil(n_row * 0.5).long(), n_row.clamp_max(2))
    assert (keep.sum(-1) == expected_k).all()  # exact density, the diagonal counted in it
    assert keep.diagonal(dim1=-2, dim2=-1).all() and not keep.triu(1).any()
    off = probs.masked_fill(torch.eye(nb, dtype=torch.bool), -1.0)
    for i in range(2, nb):  # the other kept blocks are the gate's top-(k-1) off-diagonal ones
        top = set(off[0, 0, i, :i].topk(int(expected_k[i]) - 1).indices.tolist())
        assert top == set(keep[0, 0, i, :i].nonzero().flatten().tolist())
    sl = sink_local_blocks(1, 1, nb, 0.5, torch.device("cpu"))
    assert (sl.sum(-1) == expected_k).all() and sl[0, 0, 1:, 0].all() and sl.diagonal(dim1=-2, dim2=-1).all()
    assert sl[0, 0, 7].tolist() == [True, False, False, False, False, True, True, True]
    top1 = select_blocks(probs, SeerAttentionConfig(nz_ratio=0.01, last_block_dense=False))
    assert (top1.sum(-1) == 1).all()
    assert (top1 == (probs == probs.amax(-1, keepdim=True))).all()
    thr = select_blocks(probs, SeerAttentionConfig(threshold=0.2, last_block_dense=False))
    assert (thr == (probs >= 0.2)).all()
    assert select_blocks(probs, SeerAttentionConfig(nz_ratio=1.0)).sum() == nb * (nb + 1) // 2 * 2


def test_select_blocks_top_p_adaptive_budget():
    torch.manual_seed(1)
    nb = 9
    logits = 3 * torch.randn(2, 3, nb, nb)
    probs = torch.softmax(logits.masked_fill(~torch.ones(nb, nb, dtype=torch.bool).tril(), float("-inf")), -1)
    for p in (0.5, 0.9, 0.99):
        keep = select_blocks(probs, SeerAttentionConfig(top_p=p, last_block_dense=False))
        assert not keep.triu(1).any()
        kept_mass = (probs * keep).sum(-1)
        assert (kept_mass >= p - 1e-6).all()  # enough mass in every row ...
        # ... and minimal: dropping the least probable kept block would fall below p.
        least = probs.masked_fill(~keep, 2.0).amin(-1)
        assert (kept_mass - least < p).all()
        # the kept blocks are each row's most probable ones
        assert (probs.masked_fill(~keep, 2.0).amin(-1) >= probs.masked_fill(keep, -1.0).amax(-1)).all()
    counts = select_blocks(probs, SeerAttentionConfig(top_p=0.9, last_block_dense=False)).sum(-1)
    assert counts.min() < counts.max()  # the budget adapts per row / head
    with_diag = select_blocks(probs, SeerAttentionConfig(top_p=0.5))
    assert with_diag.diagonal(dim1=-2, dim2=-1).all()
    assert select_blocks(probs, SeerAttentionConfig(top_p=1.0)).sum() == 2 * 3 * nb * (nb + 1) // 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_size": 48}, "block_size=48"),
        ({"q_pooling": ["mean"]}, "q_pooling"),
        ({"k_pooling": []}, "k_pooling"),
        ({"k_pooling": ["max", "max"]}, "k_pooling"),
        ({"gate_hidden_size": 7}, "gate_hidden_size=7"),
        ({"nz_ratio": 0.0}, "nz_ratio=0.0"),
        ({"nz_ratio": 1.5}, "nz_ratio=1.5"),
        ({"threshold": -0.1}, "threshold=-0.1"),
        ({"threshold": 0.1, "nz_ratio": 0.2}, "give only one"),
        ({"nz_ratio": 0.2, "top_p": 0.9}, "give only one"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"top_p": 0.9, "fixed_pattern": "sink_local"}, "needs nz_ratio"),
        ({"dense_layers": [-1]}, "dense_layers"),
        ({"min_seq_len": -5}, "min_seq_len=-5"),
        ({"backend": "cuda"}, "backend='cuda'"),
        ({"rope_theta": 0}, "rope_theta=0"),
        ({"fixed_pattern": "local"}, "fixed_pattern='local'"),
        ({"fixed_pattern": "sink_local", "threshold": 0.1}, "needs nz_ratio"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(HfEffllmError, match=match):
        SeerAttentionConfig(**kwargs)


def test_config_defaults_and_round_trip():
    cfg = SeerAttentionConfig()
    assert cfg.nz_ratio == 0.5 and cfg.q_pooling == ["avg"] and cfg.k_pooling == ["max", "min", "avg"]
    assert SeerAttentionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(HfEffllmError, match="unknown field"):
        SeerAttentionConfig.from_dict({"sparsity": 0.5})
