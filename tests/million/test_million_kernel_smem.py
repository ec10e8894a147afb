"""The shared-memory MILLION decode kernel (``variant="smem"``) against the PyTorch reference, under the interpreter."""

from __future__ import annotations

import pytest
import torch
from hf_effllm.kernels import million as mk
from hf_effllm.kernels.million import million_attention, million_attention_reference

from hf_effllm.errors import HfEffllmError

TOL = {torch.float32: 2e-5, torch.float16: 2e-2}


def _inputs(b, hq, hkv, lq, n, r, d, m, k, g, dtype, seed=0, masks=True):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen).to(dtype)
    ck = torch.randint(0, k, (b, hkv, n, m), generator=gen, dtype=torch.uint8)
    cv = torch.randint(0, k, (b, hkv, n, m), generator=gen, dtype=torch.uint8)
    cbk = torch.randn(g, m, k, d // m, generator=gen).to(dtype)
    cbv = torch.randn(g, m, k, d // m, generator=gen).to(dtype)
    rk = torch.randn(b, hkv, r, d, generator=gen).to(dtype)
    rv = torch.randn(b, hkv, r, d, generator=gen).to(dtype)
    cm = (torch.rand(b, n, generator=gen) > 0.2) if masks else None
    rm = (torch.rand(b, lq, r, generator=gen) > 0.3) if masks and r > 0 else None
    if rm is not None:
        rm[:, :, -1] = True
    return q, ck, cv, cbk, cbv, rk, rv, cm, rm


# (b, hq, hkv, lq, n, r, d, m, k, per_head, dtype, chunks): N never a multiple of the 16-token block, GQ 3,
# DSUB 1/2/4 (16/32/64-bit words), 1, 2 and 4 subspace chunks, per-head codebooks, Lq > 1
CASES = [
    (1, 4, 2, 1, 45, 7, 16, 8, 16, False, torch.float32, None),
    (2, 6, 2, 1, 70, 13, 16, 8, 32, True, torch.float16, None),
    (2, 3, 1, 3, 33, 9, 32, 16, 16, False, torch.float16, 2),  # GQ 3, Lq 3, DSUB 2, two chunks
    (1, 6, 2, 2, 50, 5, 32, 8, 16, True, torch.float16, 1),  # DSUB 4: 64-bit words
    (1, 2, 1, 1, 37, 0, 16, 16, 16, False, torch.float16, None),  # DSUB 1: 16-bit words, no window
    (1, 4, 2, 1, 29, 4, 64, 32, 16, False, torch.float16, 4),  # four chunks of 8 subspaces
]


@pytest.mark.parametrize("b,hq,hkv,lq,n,r,d,m,k,per_head,dtype,chunks", CASES)
def test_smem_kernel_matches_reference(triton_interpret, b, hq, hkv, lq, n, r, d, m, k, per_head, dtype, chunks):
    q, ck, cv, cbk, cbv, rk, rv, cm, rm = _inputs(b, hq, hkv, lq, n, r, d, m, k, hkv if per_head else 1, dtype)
    if r == 0:
        rk = rv = None
    ref = million_attention_reference(q, ck, cv, cbk, cbv, rk, rv, scale=0.3, code_mask=cm, res_mask=rm)
    out = million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=0.3, code_mask=cm, res_mask=rm, num_splits=3,
                            use_kernel=True, variant="smem", chunks=chunks)  # fmt: skip
    assert out.dtype == dtype and out.shape == (b, hq, lq, d)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    l1 = million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=0.3, code_mask=cm, res_mask=rm, num_splits=3,
                           use_kernel=True, variant="l1")  # fmt: skip
    torch.testing.assert_close(out.float(), l1.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_smem_kernel_strided_codes_no_masks_default_launch(triton_interpret):
    """Codes as views into a larger buffer (as the cache holds them), no masks, heuristic splits and block."""
    q, ck, cv, cbk, cbv, rk, rv, _, _ = _inputs(2, 4, 2, 1, 60, 6, 16, 8, 16, 1, torch.float16, seed=5, masks=False)
    buf_k = torch.zeros(2, 2, 80, 8, dtype=torch.uint8)
    buf_v = torch.zeros_like(buf_k)
    buf_k[:, :, :60], buf_v[:, :, :60] = ck, cv
    ref = million_attention_reference(q, ck, cv, cbk, cbv, rk, rv, scale=0.25)
    out = million_attention(q, buf_k[:, :, :60], buf_v[:, :, :60], cbk, cbv, rk, rv, scale=0.25, use_kernel=True,
                            variant="smem")  # fmt: skip
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_default_variant_and_packed_table(triton_interpret):
    """variant=None picks smem where it supports the shape and l1 elsewhere; the packed table is memoized and
    follows in-place updates of the codebook."""
    assert mk._smem_chunks(64, 2, 256, 2) == 4  # 4 bits, D=128: 16 subspaces per chunk
    assert mk._smem_chunks(32, 4, 256, 2) == 2  # 2 bits, D=128: 64-bit words
    assert mk._smem_chunks(8, 4, 16, 4) is None  # fp32 with DSUB 4: 128-bit centroids
    cb = torch.randn(1, 8, 16, 2, dtype=torch.float16)
    t1 = mk._packed_table(cb)
    assert t1.dtype == torch.int32 and t1.shape == (1, 16, 8) and mk._packed_table(cb) is t1
    assert torch.equal(t1[0, 3, 5:6].view(torch.float16), cb[0, 5, 3])  # word (code 3, subspace 5)
    cb.mul_(2)
    t2 = mk._packed_table(cb)
    assert t2 is not t1 and torch.equal(t2[0, 3, 5:6].view(torch.float16), cb[0, 5, 3])
    # fp32 with DSUB 4 has no smem path: the default falls back to l1 and stays correct
    q, ck, cv, cbk, cbv, rk, rv, cm, rm = _inputs(1, 2, 1, 1, 20, 3, 32, 8, 16, 1, torch.float32)
    ref = million_attention_reference(q, ck, cv, cbk, cbv, rk, rv, scale=0.2, code_mask=cm, res_mask=rm)
    out = million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=0.2, code_mask=cm, res_mask=rm, use_kernel=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    with pytest.raises(HfEffllmError, match="variant='smem' needs"):
        million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=0.2, use_kernel=True, variant="smem")


def test_variant_arguments_are_validated():
    q, ck, cv, cbk, cbv, rk, rv, _, _ = _inputs(1, 4, 2, 1, 10, 3, 16, 8, 16, 1, torch.float32)
    with pytest.raises(HfEffllmError, match="variant='shared' is not known"):
        million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=1.0, variant="shared")
    with pytest.raises(HfEffllmError, match="chunks=3"):
        million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=1.0, variant="smem", chunks=3)
