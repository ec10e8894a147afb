"""One-pass block-max kernel (row maxima in a scratch, reduced after the loop) against its PyTorch reference."""

from __future__ import annotations

import math

import pytest
import torch
from hf_effllm.kernels import seer_blockmax
from hf_effllm.kernels.seer_blockmax import blockmax_attention, blockmax_attention_reference

from hf_effllm.errors import HfEffllmError


def _inputs(b, hq, hkv, s, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, s, d, generator=g).to(dtype) for h in (hq, hkv, hkv))


def _run(dev, q, k, v, pad, bs, **kw):
    out, bm = blockmax_attention(
        q.to(dev), k.to(dev), v.to(dev), key_padding=None if pad is None else pad.to(dev), block_size=bs, **kw
    )
    return out.cpu(), bm.cpu()


CASES = [  # (B, Hq, Hkv, S, D, block_size, heads_per_program, padding)
    (1, 2, 2, 37, 16, 16, 1, None),  # group 1, partial last block
    (2, 4, 2, 50, 32, 16, 2, "left"),  # group 2, two heads per program
    (2, 4, 1, 29, 16, 16, 4, "right"),  # group 4, four heads per program, right padding
    (1, 4, 1, 70, 24, 32, 2, "left"),  # head_dim not a power of two, block 32
    (1, 2, 1, 110, 16, 16, 2, "left"),  # 7 query blocks: up to 3 pairs of key blocks, then the odd one
]


# Main-loop variants the benchmark sweeps: (folded softmax scale, key blocks in pairs, fixed reference max per row).
VARIANTS = [
    (False, False, False),
    (True, False, False),
    (True, True, False),
    (False, True, False),
    (True, False, True),
    (True, True, True),
]


def _variant_id(v):
    return f"fold{int(v[0])}-pair{int(v[1])}" + ("-fixedmax" if v[2] else "")


def _set_variant(monkeypatch, variant):
    for attr, value in zip(("_FOLD_SCALE", "_PAIR", "_FIXED_MAX"), variant, strict=True):
        monkeypatch.setattr(seer_blockmax, attr, value)


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_blockmax_matches_reference_on_odd_shapes(triton_interpret, monkeypatch, case, dtype, variant):
    _set_variant(monkeypatch, variant)
    b, hq, hkv, s, d, bs, hp, padding = case
    q, k, v = _inputs(b, hq, hkv, s, d, dtype, seed=s)
    pad = None
    if padding is not None:
        pad = torch.ones(b, s, dtype=torch.bool)
        if padding == "left":
            pad[-1, : bs + 3] = False  # a whole block of padding and part of the next
        else:
            pad[0, s - bs - 2 :] = False
    out, bm = _run(triton_interpret, q, k, v, pad, bs, heads_per_program=hp)
    ref_out, ref_bm = blockmax_attention_reference(q, k, v, key_padding=pad, block_size=bs)
    nb = math.ceil(s / bs)
    assert bm.shape == (b, hq, nb, nb) and bm.dtype == torch.float32
    # The map is computed in float32 from the same scores: equal up to float32 rounding of exp/log.
    torch.testing.assert_close(bm, ref_bm, atol=1e-6, rtol=2e-5 if dtype == torch.float32 else 2e-4)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    assert (bm.triu(1) == 0).all()
    if padding == "left":
        # Query rows that see no key (left padding) have an all-zero map; a fully padded key block is zero too.
        assert (bm[-1, :, 0] == 0).all() and (bm[-1, :, :, 0] == 0).all()
        assert (bm[-1, :, 1:, 1] > 0).all()
    if padding == "right":
        assert (bm[0, :, -1, -1] == 0).all()  # the last block holds padding keys only


def test_blockmax_scratch_split_over_launches(triton_interpret, monkeypatch):
    """More (batch, head group) slots than the scratch cap allows run in several launches, same result."""
    q, k, v = _inputs(2, 4, 2, 45, 16, torch.float32, seed=3)
    pad = torch.ones(2, 45, dtype=torch.bool)
    pad[1, :20] = False
    out1, bm1 = _run(triton_interpret, q, k, v, pad, 16, heads_per_program=1)
    slab_bytes = 3 * 4 // 2 * 16 * 4  # nb (nb + 1) / 2 blocks x 16 rows x 4 bytes, one head per program
    monkeypatch.setattr(seer_blockmax, "_SCRATCH_BYTES", 3 * slab_bytes)  # 3 of the 8 slots per launch
    monkeypatch.setattr(seer_blockmax, "_EPILOGUE_ELEMENTS", 16)  # one key block per epilogue step
    out2, bm2 = _run(triton_interpret, q, k, v, pad, 16, heads_per_program=1)
    torch.testing.assert_close(bm2, bm1, atol=0, rtol=0)
    torch.testing.assert_close(out2, out1, atol=0, rtol=0)


@pytest.mark.parametrize("pair", [False, True])
def test_blockmax_fixed_max_falls_back_to_the_online_softmax(triton_interpret, monkeypatch, pair):
    """_FIXED_MAX: a key whose score is far above every score of the rows' block 0 and diagonal block (their
    reference max) would overflow float32 against that reference; the programs concerned run the online softmax."""
    monkeypatch.setattr(seer_blockmax, "_FIXED_MAX", True)
    monkeypatch.setattr(seer_blockmax, "_PAIR", pair)
    q, k, v = _inputs(1, 2, 1, 90, 16, torch.float32, seed=5)
    q[..., 0] = 1.0
    k[:, :, 20, 0] = 500.0  # q . k20 ~ 500: ~180 (log2 units) above the references of rows 32 on
    ref_out, ref_bm = blockmax_attention_reference(q, k, v, block_size=16)
    for gap in (64.0, 1e9):  # 1e9: no fallback, 2^180 overflows
        monkeypatch.setattr(seer_blockmax, "_GAP", gap)
        out, bm = _run(triton_interpret, q, k, v, None, 16)
        ok = torch.allclose(out, ref_out, atol=1e-5, rtol=1e-5) and torch.allclose(bm, ref_bm, atol=1e-6, rtol=2e-5)
        assert ok == (gap == 64.0)
        # rows 0-31 do not see key 20 or see it in their diagonal block: exact with or without the fallback
        torch.testing.assert_close(out[:, :, :32], ref_out[:, :, :32], atol=1e-5, rtol=1e-5)


def test_blockmax_scale_and_single_block(triton_interpret):
    q, k, v = _inputs(1, 2, 1, 9, 16, torch.float32, seed=4)  # shorter than one block
    out, bm = _run(triton_interpret, q, k, v, None, 16, scale=0.3)
    ref_out, ref_bm = blockmax_attention_reference(q, k, v, scale=0.3, block_size=16)
    torch.testing.assert_close(bm, ref_bm, atol=1e-6, rtol=2e-5)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert bm.shape == (1, 2, 1, 1) and torch.allclose(bm[..., 0, 0], torch.ones(2))  # first row: p = 1


def test_blockmax_rejects_heads_per_program_not_power_of_two(triton_interpret):
    q, k, v = _inputs(1, 6, 1, 20, 16, torch.float32)
    with pytest.raises(HfEffllmError, match="heads_per_program=3.*power of two"):
        blockmax_attention(q, k, v, block_size=16, heads_per_program=3)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
@pytest.mark.parametrize("hp", [1, 2, 4])
def test_blockmax_bf16_on_gpu(monkeypatch, hp, variant):
    """bf16 (broken under the interpreter) on the GPU, every heads-per-program the benchmark sweeps, padding."""
    _set_variant(monkeypatch, variant)
    q, k, v = (t.cuda() for t in _inputs(2, 8, 2, 1000, 128, torch.bfloat16, seed=hp))
    pad = torch.ones(2, 1000, dtype=torch.bool, device="cuda")
    pad[1, :130] = False
    # Paired tiles at 4 heads per program: 3 pipeline stages exceed the H200's shared memory, 2 fit.
    stages = 2 if variant[1] and hp == 4 else None
    for warps in (4, 8):
        out, bm = blockmax_attention(q, k, v, key_padding=pad, heads_per_program=hp, num_warps=warps, num_stages=stages)
        ref_out, ref_bm = blockmax_attention_reference(q, k, v, key_padding=pad)
        torch.testing.assert_close(bm, ref_bm, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("variant", VARIANTS[1:], ids=_variant_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_block_mass_matches_references(triton_interpret, monkeypatch, case, dtype, variant):
    """stat="mass": the tile log-sum-exp scratch gives each tile's probability mass (rows of the map sum to 1)."""
    from hf_effllm.attention.seer.targets import block_attention_map

    _set_variant(monkeypatch, variant)

    b, hq, hkv, s, d, bs, hp, padding = case
    q, k, v = _inputs(b, hq, hkv, s, d, dtype, seed=s + 1)
    pad = None
    if padding is not None:
        pad = torch.ones(b, s, dtype=torch.bool)
        pad[-1 if padding == "left" else 0, : bs + 3] = False
    out, mass = _run(triton_interpret, q, k, v, pad, bs, heads_per_program=hp, stat="mass")
    ref_out, ref_mass = blockmax_attention_reference(q, k, v, key_padding=pad, block_size=bs, stat="mass")
    _, map_mass = block_attention_map(q, k, v, stat="mass", key_padding=pad, block_size=bs)  # the CPU path
    torch.testing.assert_close(ref_mass, map_mass)
    torch.testing.assert_close(mass, ref_mass, atol=2e-6, rtol=2e-5 if dtype == torch.float32 else 2e-4)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    # Each query block row's mass, summed over key blocks, is the number of its query rows that see a key.
    nb = math.ceil(s / bs)
    # A row sees a key when some position up to it is a real token.
    seen = torch.ones(b, s) if pad is None else (torch.cumsum(pad.int(), 1) > 0).float()
    rows = torch.nn.functional.pad(seen, (0, nb * bs - s)).view(b, nb, bs).sum(-1)
    torch.testing.assert_close(mass.sum(-1), rows[:, None].expand(b, hq, nb), atol=1e-4, rtol=1e-4)


def test_block_map_rejects_unknown_stat(triton_interpret):
    q, k, v = _inputs(1, 2, 2, 20, 16, torch.float32)
    with pytest.raises(HfEffllmError, match="stat='sum'"):
        blockmax_attention(q, k, v, block_size=16, stat="sum")
    with pytest.raises(HfEffllmError, match="stat='sum'"):
        blockmax_attention_reference(q, k, v, block_size=16, stat="sum")
