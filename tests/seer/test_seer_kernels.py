"""Block-sparse and block-max kernels (Triton, under the interpreter on CPU) against naive dense PyTorch."""

from __future__ import annotations

import math

import pytest
import torch
from hf_effllm.kernels.seer_attention import (
    block_sparse_attention,
    block_sparse_attention_reference,
    build_block_index,
)
from hf_effllm.kernels.seer_blockmax import blockmax_attention, blockmax_attention_reference

from hf_effllm.errors import HfEffllmError


def naive_attention(q, k, v, block_mask=None, key_padding=None, block_size=64):
    """Dense masked attention: full score matrix, element mask from the block mask, causal and padding."""
    b, hq, s, d = q.shape
    g = hq // k.shape[1]
    kk, vv = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    scores = q.float() @ kk.transpose(-1, -2) / math.sqrt(d)
    allowed = torch.ones(s, s, dtype=torch.bool).tril().expand(b, hq, s, s)
    if block_mask is not None:
        bm = block_mask if block_mask.shape[1] == hq else block_mask.repeat_interleave(g, 1)
        allowed = allowed & bm.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :s, :s]
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :]
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return p @ vv, p


def naive_blockmax(p, block_size):
    b, h, s, _ = p.shape
    nb = math.ceil(s / block_size)
    pp = torch.nn.functional.pad(p, (0, nb * block_size - s, 0, nb * block_size - s))
    return pp.view(b, h, nb, block_size, nb, block_size).amax(dim=(-1, -3))


def _inputs(b, hq, hkv, s, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, s, d, generator=g).to(dtype) for h in (hq, hkv, hkv))


def _to(dev, *ts):
    return tuple(t.to(dev) for t in ts)


CASES = [  # (B, Hq, Hkv, S, D, block_size, mask heads)
    (1, 4, 2, 70, 16, 16, "kv"),
    (2, 3, 1, 45, 24, 16, "q"),
    (2, 2, 2, 33, 32, 32, "kv"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_block_sparse_kernel_matches_masked_dense(triton_interpret, case, dtype):
    b, hq, hkv, s, d, bs, heads = case
    q, k, v = _inputs(b, hq, hkv, s, d, dtype)
    nb = math.ceil(s / bs)
    hm = hkv if heads == "kv" else hq
    mask = torch.rand(b, hm, nb, nb, generator=torch.Generator().manual_seed(1)) < 0.5
    mask[..., 0, 0] = True
    pad = torch.ones(b, s, dtype=torch.bool)
    pad[-1, : s // 3] = False  # left padding in the last sequence
    expected, _ = naive_attention(q, k, v, mask, pad, bs)
    dev = triton_interpret
    out = block_sparse_attention(*_to(dev, q, k, v, mask, pad)[:4], key_padding=pad.to(dev), block_size=bs).cpu()
    ref = block_sparse_attention_reference(q, k, v, mask, key_padding=pad, block_size=bs)
    tol = 2e-3 if dtype == torch.float16 else 1e-4
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    torch.testing.assert_close(ref.float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("hp", [2, 4])
def test_heads_per_program_packing(triton_interpret, hp):
    q, k, v = _inputs(2, 8, 2, 45, 16, torch.float16, seed=11)
    mask = torch.rand(2, 2, 3, 3, generator=torch.Generator().manual_seed(4)) < 0.5
    pad = torch.ones(2, 45, dtype=torch.bool)
    pad[0, :5] = False
    dev = triton_interpret
    expected, p = naive_attention(q, k, v, mask, pad, 16)
    out = block_sparse_attention(*_to(dev, q, k, v, mask), key_padding=pad.to(dev), block_size=16, heads_per_program=hp)
    torch.testing.assert_close(out.cpu().float(), expected, atol=2e-3, rtol=2e-3)
    _, pfull = naive_attention(q, k, v, None, pad, 16)
    o2, bm = blockmax_attention(*_to(dev, q, k, v), key_padding=pad.to(dev), block_size=16, heads_per_program=hp)
    torch.testing.assert_close(bm.cpu(), naive_blockmax(pfull, 16), atol=2e-3, rtol=2e-3)
    with pytest.raises(HfEffllmError, match="heads_per_program=3"):
        block_sparse_attention(*_to(dev, q, k, v, mask), block_size=16, heads_per_program=3)


def test_block_sparse_full_mask_is_dense_causal(triton_interpret):
    q, k, v = _inputs(1, 2, 1, 40, 16, torch.float32, seed=3)
    nb = math.ceil(40 / 16)
    full = torch.ones(1, 1, nb, nb, dtype=torch.bool)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out = block_sparse_attention(*_to(triton_interpret, q, k, v, full), block_size=16).cpu()
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        block_sparse_attention_reference(q, k, v, None, block_size=16), dense, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [(1, 4, 2, 70, 16, 16), (2, 2, 1, 50, 24, 32)])
def test_blockmax_kernel_matches_naive_softmax_maxpool(triton_interpret, case, dtype):
    b, hq, hkv, s, d, bs = case
    q, k, v = _inputs(b, hq, hkv, s, d, dtype, seed=5)
    pad = torch.ones(b, s, dtype=torch.bool)
    pad[0, :7] = False
    expected_out, p = naive_attention(q, k, v, key_padding=pad, block_size=bs)
    expected_bm = naive_blockmax(p, bs)
    dev = triton_interpret
    out, bm = blockmax_attention(*_to(dev, q, k, v), key_padding=pad.to(dev), block_size=bs)
    ref_out, ref_bm = blockmax_attention_reference(q, k, v, key_padding=pad, block_size=bs)
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(out.cpu().float(), expected_out, atol=tol, rtol=tol)
    torch.testing.assert_close(bm.cpu(), expected_bm, atol=tol, rtol=tol)
    torch.testing.assert_close(ref_out.float(), expected_out, atol=tol, rtol=tol)
    torch.testing.assert_close(ref_bm, expected_bm, atol=1e-5, rtol=1e-5)
    assert bm.dtype == torch.float32 and (bm.cpu().triu(1) == 0).all()


def test_reference_chunking_matches_single_chunk(monkeypatch):
    from hf_effllm.kernels import seer_attention

    q, k, v = _inputs(1, 4, 2, 150, 16, torch.float32, seed=9)
    mask = torch.rand(1, 2, 10, 10, generator=torch.Generator().manual_seed(2)) < 0.6
    big = block_sparse_attention_reference(q, k, v, mask, block_size=16)
    bo, bb = blockmax_attention_reference(q, k, v, block_size=16)
    monkeypatch.setattr(seer_attention, "_REFERENCE_CHUNK_ELEMENTS", 1)  # one query block per chunk
    torch.testing.assert_close(block_sparse_attention_reference(q, k, v, mask, block_size=16), big)
    so, sb = blockmax_attention_reference(q, k, v, block_size=16)
    torch.testing.assert_close(so, bo)
    torch.testing.assert_close(sb, bb)


def test_build_block_index_is_compact_and_sorted():
    mask = torch.tensor([[[[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]]]], dtype=torch.bool)
    index, count = build_block_index(mask)
    assert count.tolist() == [[[3, 0, 1]]]
    assert index[0, 0, 0, :3].tolist() == [0, 2, 3]
    assert index[0, 0, 2, :1].tolist() == [1]
    assert index.dtype == torch.int32


def test_wrapper_rejects_bad_inputs(triton_interpret):
    q, k, v = _inputs(1, 4, 2, 32, 16, torch.float32)
    mask = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    with pytest.raises(HfEffllmError, match="multiple of KV heads"):
        block_sparse_attention(q, k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1), mask, block_size=16)
    with pytest.raises(HfEffllmError, match="block_size=48"):
        block_sparse_attention(q, k, v, mask, block_size=48)
    with pytest.raises(HfEffllmError, match="block_mask shape"):
        block_sparse_attention(q, k, v, torch.ones(1, 3, 2, 2, dtype=torch.bool), block_size=16)
    with pytest.raises(HfEffllmError, match="dtypes differ"):
        blockmax_attention(q, k.half(), v, block_size=16)
    with pytest.raises(HfEffllmError, match="key_padding"):
        blockmax_attention(q, k, v, key_padding=torch.ones(1, 31, dtype=torch.bool), block_size=16)
    with pytest.raises(HfEffllmError, match="key_padding is on meta"):
        blockmax_attention(q, k, v, key_padding=torch.ones(1, 32, dtype=torch.bool, device="meta"), block_size=16)
    with pytest.raises(HfEffllmError, match="4-D"):
        block_sparse_attention(q[0], k, v, mask, block_size=16)
