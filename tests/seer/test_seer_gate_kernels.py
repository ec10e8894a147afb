"""Gate-side Triton kernels (block pooling, block-index build) against their PyTorch references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hf_effllm.kernels.seer_attention import build_block_index, build_block_index_triton, causal_block_mask
from hf_effllm.kernels.seer_gate import (
    block_pool_reference,
    block_pool_triton,
    gate_probs_reference,
    gate_probs_triton,
)

from hf_effllm.attention.seer.attention import causal_block_count
from hf_effllm.errors import HfEffllmError

POOL_CASES = [  # (B, H, S, D, block_size, kinds)
    (2, 3, 37, 16, 16, ["max", "min", "avg"]),  # partial last block
    (1, 2, 64, 24, 32, ["avg"]),  # head_dim not a power of two, exact blocks
    (2, 1, 21, 8, 8, ["min", "max"]),
    (1, 2, 10, 16, 16, ["avg", "avg"]),  # shorter than one block, a pooling twice
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", POOL_CASES)
def test_block_pool_kernel_matches_reference(triton_interpret, case, dtype):
    b, h, s, d, bs, kinds = case
    g = torch.Generator().manual_seed(s)
    x = torch.randn(b, s, h, d, generator=g).to(dtype).transpose(1, 2)  # strided like the gate's pending Q/K
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[-1, : bs + 2] = False  # a fully padded block, then a partly padded one
    valid[0, -1] = False
    dev = triton_interpret
    for v in (None, valid):
        out = block_pool_triton(x.to(dev), bs, kinds, None if v is None else v.to(dev)).cpu()
        ref = block_pool_reference(x, bs, kinds, v)
        assert out.dtype == torch.float32 and out.shape == (b, h, math.ceil(s / bs), d * len(kinds))
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    if b > 1 and s > bs:
        assert (out[-1, :, 0] == 0).all()  # the fully padded block pools to zeros


def test_block_pool_kernel_rejects_bad_input(triton_interpret):
    x = torch.randn(1, 2, 20, 16)
    with pytest.raises(HfEffllmError, match="kinds"):
        block_pool_triton(x, 16, ["mean"])
    with pytest.raises(HfEffllmError, match="block_size=24"):
        block_pool_triton(x, 24, ["avg"])
    with pytest.raises(HfEffllmError, match="valid"):
        block_pool_triton(x, 16, ["avg"], torch.ones(1, 19, dtype=torch.bool))
    with pytest.raises(HfEffllmError, match="4-D"):
        block_pool_triton(x[0], 16, ["avg"])


@pytest.mark.parametrize("causal", [True, False])
def test_block_index_kernel_matches_sort_version(triton_interpret, causal):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 3, 5, 7, generator=g) < 0.5
    mask[0, 0, 1] = False  # an empty row
    dev = triton_interpret
    index, count = build_block_index_triton(mask.to(dev), causal=causal)
    ref_mask = mask & torch.ones(5, 7, dtype=torch.bool).tril() if causal else mask
    ref_index, ref_count = build_block_index(ref_mask)
    assert index.dtype == count.dtype == torch.int32 and index.shape == mask.shape
    assert torch.equal(count.cpu(), ref_count)
    for bi, hi, qi in itertools.product(*(range(n) for n in count.shape)):
        n = int(ref_count[bi, hi, qi])
        assert index[bi, hi, qi, :n].tolist() == ref_index[bi, hi, qi, :n].tolist()
    # A broadcast mask (stride 0, as sink_local_blocks returns) needs no copy.
    base = torch.rand(1, 1, 6, 6, generator=g) < 0.6
    index, count = build_block_index_triton(base.expand(2, 4, 6, 6).to(dev))
    _, ref_count = build_block_index(base.expand(2, 4, 6, 6) & causal_block_mask(6, torch.device("cpu")))
    assert torch.equal(count.cpu(), ref_count)


def test_causal_block_count():
    kvalid = torch.tensor([[True, True, True], [False, True, True]])
    allowed = torch.ones(3, 3, dtype=torch.bool).tril() & kvalid[:, None, :]
    assert int(causal_block_count(kvalid, 2, 3)) == int(allowed.sum()) == 6 + 3
    assert causal_block_count(None, 2, 3) == 12


@pytest.mark.parametrize(
    "case", [(2, 3, 37, 8, True), (1, 2, 70, 128, False), (1, 1, 1, 16, True), (1, 1, 300, 16, True)]
)
def test_gate_probs_kernel_matches_reference(triton_interpret, case):
    b, h, nb, e, with_kvalid = case
    g = torch.Generator().manual_seed(nb)
    qg, kg = torch.randn(b, h, nb, e, generator=g), torch.randn(b, h, nb, e, generator=g)
    kvalid = None
    if with_kvalid:
        kvalid = torch.ones(b, nb, dtype=torch.bool)
        kvalid[-1, : min(nb, 3)] = False  # left padding: the first rows of the last sequence see nothing
    dev = triton_interpret
    out = gate_probs_triton(qg.to(dev), kg.to(dev), None if kvalid is None else kvalid.to(dev), 1000.0).cpu()
    ref = gate_probs_reference(qg, kg, kvalid, 1000.0)
    assert out.shape == (b, h, nb, nb) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert (out.triu(1) == 0).all()
    if with_kvalid:
        assert (out[-1, :, : min(nb, 3)] == 0).all()


def test_gate_uses_one_scoring_function():
    """``probs_from_pooled`` (the inference path) is the softmax of ``logits_from_pooled`` (the distillation path)."""
    from hf_effllm import SeerAttentionConfig
    from hf_effllm.attention.seer import SeerAttnGate

    gate = SeerAttnGate(4, 2, 8, SeerAttentionConfig(block_size=16, gate_hidden_size=16), 100.0, 0)
    q, k = torch.randn(1, 4, 50, 8), torch.randn(1, 2, 50, 8)
    pooled = gate.pool(q, k)
    with torch.no_grad():
        probs = gate.probs_from_pooled(*pooled)
        torch.testing.assert_close(probs, torch.softmax(gate.logits_from_pooled(*pooled), -1).nan_to_num(0.0))


def test_block_counters_accumulate_on_device_and_read_as_int():
    from hf_effllm import SeerAttentionConfig
    from hf_effllm.attention.seer import SeerAttnGate

    gate = SeerAttnGate(2, 1, 8, SeerAttentionConfig(block_size=16), 100.0, 0)
    gate.count_blocks(torch.tensor(3), 10)  # as the forward does: a device tensor, no .item()
    gate.count_blocks(2, torch.tensor(5))
    assert isinstance(gate._kept, torch.Tensor)
    assert gate.kept_blocks == 5 and gate.total_blocks == 15 and isinstance(gate.kept_blocks, int)
    gate.kept_blocks += 1  # the int interface still works
    assert gate.kept_blocks == 6
    gate.reset_stats()
    assert gate.kept_blocks == 0 and gate.total_blocks == 0


def test_key_padding_from_mask_needs_no_host_check():
    from hf_effllm.attention.seer.attention import key_padding_from_mask

    s = 6
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    mask = causal.expand(2, 1, s, s).clone()
    mask[1, :, :, :2] = False  # left padding in the second row
    valid = key_padding_from_mask(mask, 2, s)
    assert valid.tolist() == [[True] * s, [False, False] + [True] * (s - 2)]
    assert key_padding_from_mask(None, 2, s) is None
    assert key_padding_from_mask(causal.expand(2, 1, s, s), 2, s).all()  # no padding: all True, not checked


@pytest.mark.gpu
def test_gate_path_has_no_host_sync_on_gpu():
    """Pooling, scores, selection, block index and the counters run without a device-to-host sync."""
    from hf_effllm import SeerAttentionConfig
    from hf_effllm.attention.seer import SeerAttnGate, select_blocks

    cfg = SeerAttentionConfig(nz_ratio=0.2)
    gate = SeerAttnGate(8, 2, 64, cfg, 10000.0, 0).cuda()
    q = torch.randn(1, 1000, 8, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # strided, as captured
    k = torch.randn(1, 1000, 2, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    valid = torch.ones(1, 1000, dtype=torch.bool, device="cuda")

    def gate_path():
        with torch.no_grad():
            pq, pk, kvalid = gate.pool(q, k, valid)
            keep = select_blocks(gate.probs_from_pooled(pq, pk, kvalid), cfg, kvalid)
            gate.count_blocks(keep.sum(), causal_block_count(kvalid, 1, keep.shape[-1]) * keep.shape[1])
            return build_block_index_triton(keep)

    gate_path()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gate_path()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = block_pool_reference(q, cfg.block_size, cfg.k_pooling)
    torch.testing.assert_close(block_pool_triton(q, cfg.block_size, cfg.k_pooling), ref, atol=1e-6, rtol=1e-5)
    assert 0 < gate.kept_blocks < gate.total_blocks
