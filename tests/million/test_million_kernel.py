"""MILLION kernels (Triton under the interpreter) against their PyTorch references, on small odd shapes."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from hf_effllm.kernels.million import (
    million_attention,
    million_attention_reference,
    pq_decode_reference,
    pq_encode,
    pq_encode_reference,
)

from hf_effllm.errors import HfEffllmError

TOL = {torch.float32: 2e-5, torch.float16: 2e-2}


def _inputs(b, hq, hkv, lq, n, r, d, m, k, g, dtype, seed=0, masks=True):
    gen = torch.Generator().manual_seed(seed)
    dsub = d // m
    q = torch.randn(b, hq, lq, d, generator=gen).to(dtype)
    ck = torch.randint(0, k, (b, hkv, n, m), generator=gen, dtype=torch.uint8)
    cv = torch.randint(0, k, (b, hkv, n, m), generator=gen, dtype=torch.uint8)
    cbk = torch.randn(g, m, k, dsub, generator=gen).to(dtype)
    cbv = torch.randn(g, m, k, dsub, generator=gen).to(dtype)
    rk = torch.randn(b, hkv, r, d, generator=gen).to(dtype)
    rv = torch.randn(b, hkv, r, d, generator=gen).to(dtype)
    cm = (torch.rand(b, n, generator=gen) > 0.2) if masks else None
    rm = (torch.rand(b, lq, r, generator=gen) > 0.3) if masks else None
    if masks and r > 0:
        rm[:, :, -1] = True  # every query row sees at least its own token
    return q, ck, cv, cbk, cbv, rk, rv, cm, rm


@pytest.mark.parametrize("variant", ["loop", "chunked"])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_encode_kernel_matches_reference(triton_interpret, per_head, dtype, variant):
    gen = torch.Generator().manual_seed(1)
    h, d, m, k = 3, 16, 8, 32
    x = torch.randn(2, h, 37, d, generator=gen).to(dtype)
    cb = torch.randn(h if per_head else 1, m, k, d // m, generator=gen).to(dtype)
    codes = pq_encode(x, cb, encode_variant=variant)
    ref = pq_encode_reference(x, cb)
    assert codes.dtype == torch.uint8 and codes.shape == (2, h, 37, m)
    assert (codes == ref).float().mean() > 0.995  # ties between equidistant centroids may differ in fp16
    # writing into a strided view of a larger buffer
    buf = torch.zeros(2, h, 50, m, dtype=torch.uint8)
    pq_encode(x, cb, out=buf[:, :, 5:42], encode_variant=variant)
    assert torch.equal(buf[:, :, 5:42], codes) and buf[:, :, :5].eq(0).all()


@pytest.mark.parametrize(
    "b,hq,hkv,lq,n,r,g",
    [
        (1, 4, 2, 1, 45, 7, 1),
        (2, 6, 2, 1, 70, 13, 2),
        (2, 3, 3, 3, 33, 9, 1),
        (1, 4, 1, 2, 0, 5, 1),
        (1, 2, 2, 1, 19, 0, 2),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_kernel_matches_reference(triton_interpret, b, hq, hkv, lq, n, r, g, dtype):
    d, m, k = 16, 8, 16
    g = 1 if g == 1 else hkv
    q, ck, cv, cbk, cbv, rk, rv, cm, rm = _inputs(b, hq, hkv, lq, n, r, d, m, k, g, dtype)
    if r == 0:
        rk = rv = rm = None
    ref = million_attention_reference(q, ck, cv, cbk, cbv, rk, rv, scale=0.3, code_mask=cm, res_mask=rm)
    out = million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=0.3, code_mask=cm, res_mask=rm, num_splits=3,
                            use_kernel=True)  # fmt: skip
    assert out.dtype == dtype and out.shape == (b, hq, lq, d)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_attention_kernel_dsub4_no_masks(triton_interpret):
    """2-bit layout (DSUB = 4), no masks, split count chosen by the heuristic."""
    q, ck, cv, cbk, cbv, rk, rv, _, _ = _inputs(1, 4, 2, 1, 50, 6, 32, 8, 16, 1, torch.float32, masks=False)
    ref = million_attention_reference(q, ck, cv, cbk, cbv, rk, rv, scale=0.2)
    out = million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=0.2, use_kernel=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("lq", [1, 4])
def test_lut_and_decoded_paths_are_the_same_function(lq):
    """Attention over codes (lookup tables + per-centroid value weights) == attention over the decoded K/V."""
    q, ck, cv, cbk, cbv, rk, rv, cm, rm = _inputs(2, 6, 3, lq, 41, 5, 16, 4, 32, 3, torch.float32, seed=3)
    lut = million_attention_reference(q, ck, cv, cbk, cbv, rk, rv, scale=0.25, code_mask=cm, res_mask=rm, path="lut")
    dec = million_attention_reference(q, ck, cv, cbk, cbv, rk, rv, scale=0.25, code_mask=cm, res_mask=rm,
                                      path="decoded")  # fmt: skip
    torch.testing.assert_close(lut, dec, atol=1e-5, rtol=1e-5)
    # and both equal plain softmax attention over [decoded codes ; window] with the same mask
    kk = torch.cat([pq_decode_reference(ck, cbk), rk], 2).repeat_interleave(2, 1)
    vv = torch.cat([pq_decode_reference(cv, cbv), rv], 2).repeat_interleave(2, 1)
    mask = torch.cat([cm[:, None].expand(-1, lq, -1), rm], -1)[:, None]
    s = (q @ kk.transpose(-1, -2) * 0.25).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lut, torch.softmax(s, -1) @ vv, atol=1e-5, rtol=1e-5)


def test_attention_wrapper_rejects_bad_inputs():
    q, ck, cv, cbk, cbv, rk, rv, cm, rm = _inputs(1, 4, 2, 1, 10, 3, 16, 8, 16, 1, torch.float32)
    with pytest.raises(HfEffllmError, match="not a multiple"):
        million_attention(q[:, :3], ck, cv, cbk, cbv, rk, rv, scale=1.0)
    with pytest.raises(HfEffllmError, match="uint8"):
        million_attention(q, ck.long(), cv, cbk, cbv, rk, rv, scale=1.0)
    with pytest.raises(HfEffllmError, match="dtype"):
        million_attention(q, ck, cv, cbk.half(), cbv.half(), rk, rv, scale=1.0)
    with pytest.raises(HfEffllmError, match="code_mask"):
        million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=1.0, code_mask=cm[:, :5])
    with pytest.raises(HfEffllmError, match="batch"):
        million_attention(q.expand(2, -1, -1, -1), ck, cv, cbk, cbv, rk, rv, scale=1.0)
    with pytest.raises(HfEffllmError, match="head_dim"):
        pq_encode(torch.randn(1, 2, 3, 12), cbk)


def test_kernels_use_64bit_batch_offsets(triton_interpret):
    """Batch offsets past 2**31 elements (e.g. batch 3 at 1M cached tokens, Llama-3-8B shape): codes and the
    vectors to encode are views with a batch stride just over 2**30 into a large, mostly untouched (virtual)
    buffer, so ``b * stride`` overflows int32 at b = 2 unless the kernels compute it in 64 bits."""
    stride = 2**30 + 4096
    b, hq, hkv, lq, n, r, d, m, k = 3, 4, 2, 1, 20, 3, 16, 8, 16
    q, ck, cv, cbk, cbv, rk, rv, cm, rm = _inputs(b, hq, hkv, lq, n, r, d, m, k, 1, torch.float16, seed=7)

    def far_view(x: torch.Tensor) -> torch.Tensor:  # same values, batch stride `stride` (pages touched: 3 rows)
        buf = torch.empty(2 * stride + x[0].numel(), dtype=x.dtype)
        view = buf.as_strided(x.shape, (stride, *x[0].contiguous().stride()))
        view.copy_(x)
        return view

    ref = million_attention_reference(q, ck, cv, cbk, cbv, rk, rv, scale=0.3, code_mask=cm, res_mask=rm)
    for variant in ("l1", "smem"):
        out = million_attention(q, far_view(ck), far_view(cv), cbk, cbv, rk, rv, scale=0.3, code_mask=cm,
                                res_mask=rm, num_splits=2, use_kernel=True, variant=variant)  # fmt: skip
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    x = torch.randn(b, hkv, 9, d, generator=torch.Generator().manual_seed(8)).half()
    codes = pq_encode(far_view(x), cbk, use_kernel=True)
    assert (codes == pq_encode_reference(x, cbk)).float().mean() > 0.99
    out = far_view(torch.zeros(b, hkv, 9, m, dtype=torch.uint8))
    pq_encode(x, cbk, out=out, use_kernel=True)
    assert torch.equal(out, codes)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["l1", "smem"])
@pytest.mark.parametrize("m,k", [(64, 256), (32, 256)])  # 4-bit and 2-bit at head_dim 128, 256 centroids
def test_bf16_kernels_on_gpu(variant, m, k):
    """bf16 is checked on the GPU only (the Triton interpreter computes bf16 wrongly)."""
    args = _inputs(2, 8, 2, 1, 3001, 128, 128, m, k, 2, torch.bfloat16)
    q, ck, cv, cbk, cbv, rk, rv, cm, rm = (t.cuda() if t is not None else None for t in args)
    ref = million_attention_reference(q.float(), ck, cv, cbk.float(), cbv.float(), rk.float(), rv.float(),
                                      scale=128**-0.5, code_mask=cm, res_mask=rm)  # fmt: skip
    out = million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=128**-0.5, code_mask=cm, res_mask=rm,
                            use_kernel=True, variant=variant)  # fmt: skip
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "b,hq,hkv,lq,n,r,d,m,g,masks",
    [
        (2, 8, 2, 1, 3001, 128, 128, 64, 2, True),  # 4 bits, per-head codebooks, masks, N not a multiple of 32
        (1, 32, 8, 1, 5000, 128, 128, 32, 1, False),  # 2 bits (DSUB 4), Llama-3 GQA
        (3, 4, 4, 3, 77, 9, 64, 32, 1, True),  # GQ 1 x Lq 3, D 64
        (1, 16, 1, 1, 1000, 0, 128, 64, 1, True),  # 16 query rows (8 warps), no window
        (2, 6, 2, 1, 31, 5, 64, 16, 2, False),  # fewer codes than one warp's tile, M = 16 (half the lanes)
    ],
)
@pytest.mark.parametrize("merge", ["triton", "cuda"])  # million_cuda.MERGE: which kernel merges the partials
@pytest.mark.parametrize("design", ["lut", "mma"])  # both designs forced ("lut": up to 4 query rows)
def test_cuda_variant_matches_reference_on_gpu(monkeypatch, design, merge, dtype, b, hq, hkv, lq, n, r, d, m, g, masks):
    from hf_effllm.kernels import million_cuda

    if design == "lut" and (hq // hkv) * lq > million_cuda.LUT_ROWS:
        pytest.skip("the lut design takes at most 4 query rows per KV head")
    monkeypatch.setattr(million_cuda, "DESIGN", design)
    monkeypatch.setattr(million_cuda, "MERGE", merge)
    args = _inputs(b, hq, hkv, lq, n, r, d, m, 256, g, dtype, seed=n, masks=masks)
    q, ck, cv, cbk, cbv, rk, rv, cm, rm = (t.cuda() if t is not None else None for t in args)
    ref = million_attention_reference(q.float(), ck, cv, cbk.float(), cbv.float(), rk.float(), rv.float(),
                                      scale=d**-0.5, code_mask=cm, res_mask=rm)  # fmt: skip
    for splits in (None, 3):
        out = million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=d**-0.5, code_mask=cm, res_mask=rm,
                                use_kernel=True, variant="cuda", num_splits=splits)  # fmt: skip
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("aligned", [True, False])
def test_cuda_merge_over_several_window_tiles(monkeypatch, dtype, aligned):
    """million_merge_cuda with a 77-token window (three tiles of 32, the last partial, each loaded one tile ahead),
    the window rows on 16-byte boundaries (16-byte loads) or not (a view one element into a wider buffer: 2-byte
    loads), 8 query rows per KV head, a mask and 5 code splits."""
    from hf_effllm.kernels import million_cuda

    monkeypatch.setattr(million_cuda, "MERGE", "cuda")
    q, ck, cv, cbk, cbv, rk, rv, cm, rm = (
        t.cuda() if t is not None else None for t in _inputs(2, 8, 2, 2, 700, 77, 64, 16, 256, 1, dtype, seed=7)
    )
    if not aligned:
        rk = torch.cat([torch.zeros_like(rk[..., :1]), rk], -1)[..., 1:]
        rv = torch.cat([torch.zeros_like(rv[..., :1]), rv], -1)[..., 1:]
        assert rk.data_ptr() % 16 != 0 and rk.stride(-1) == 1
    ref = million_attention_reference(q.float(), ck, cv, cbk.float(), cbv.float(), rk.float(), rv.float(),
                                      scale=0.125, code_mask=cm, res_mask=rm)  # fmt: skip
    out = million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=0.125, code_mask=cm, res_mask=rm, use_kernel=True,
                            variant="cuda", num_splits=5)  # fmt: skip
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_cuda_variant_refuses_what_it_cannot_run():
    q, ck, cv, cbk, cbv, rk, rv, cm, rm = _inputs(1, 4, 2, 1, 40, 3, 16, 8, 16, 1, torch.float16)
    with pytest.raises(HfEffllmError, match="variant='cuda' does not run here"):
        million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=0.25, use_kernel=True, variant="cuda")
    with pytest.raises(HfEffllmError, match="'cuda'"):
        million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=0.25, use_kernel=True, variant="cudnn")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA compiler) on PATH")
@pytest.mark.parametrize("d,m,gq,lq,bf16", [(128, 64, 4, 1, True), (128, 32, 8, 2, False), (64, 16, 2, 1, True)])
def test_cuda_source_compiles_for_sm90_without_spills(tmp_path, d, m, gq, lq, bf16):
    """The generated source compiles for the H200 (sm_90) with no register spills (no GPU needed)."""
    from hf_effllm.kernels.million_cuda import cuda_source, num_warps

    src = tmp_path / "k.cu"
    src.write_text(cuda_source(d=d, m=m, gq=gq, lq=lq, hkv=2, bf16=bf16, per_head=True, has_mask=True,
                               nwarps=num_warps(gq * lq)))  # fmt: skip
    res = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"), str(src)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "0 bytes spill stores" in res.stderr, res.stderr[-3000:]


@pytest.mark.parametrize("n,splits", [(1, 4), (31, 3), (32, 2), (1000, 16), (5000, 7), (100000, 132)])
def test_cuda_split_plan_covers_every_code_once(n, splits):
    from hf_effllm.kernels.million_cuda import split_plan

    got, length = split_plan(n, 8, torch.device("cpu"), splits)
    assert length % 32 == 0 and 1 <= got <= splits
    assert (got - 1) * length < n <= got * length  # no empty split, every code in one
    assert split_plan(0, 8, torch.device("cpu"), splits)[0] == 0


@pytest.mark.parametrize("m,dsub", [(64, 2), (32, 4)])
def test_cuda_subspace_table_is_a_view_in_the_kernels_layout(m, dsub):
    """The kernel reads word (m, c) = centroid c of subspace m at m * K + c, straight from the codebook."""
    from hf_effllm.kernels.million_cuda import kernel_tables, subspace_table

    cb = torch.randn(2, m, 256, dsub).half()
    table = subspace_table(cb)
    assert table.shape == (2, m, 256) and table.data_ptr() == cb.data_ptr()  # no copy
    flat = table.contiguous().view(torch.float16).reshape(2, m, 256, dsub)
    assert torch.equal(flat, cb)
    assert table.stride(0) == m * 256  # what the kernel's per-head table offset assumes
    tk, tv = kernel_tables(cb, cb * 2)
    assert torch.equal(tk, table) and torch.equal(tv.contiguous().view(torch.float16).reshape(cb.shape), cb * 2)


def test_cuda_design_for_picks_lut_only_where_it_was_measured_faster(monkeypatch):
    from hf_effllm.kernels import million_cuda as mc

    cb = torch.randn(8, 64, 256, 2).bfloat16()
    assert mc.design_for(4, cb, 8192) == "lut"  # Llama-3's GQA, 8k+ codes per block
    assert mc.design_for(4, cb, 2048) == "mma"  # too few codes to amortise the tables
    assert mc.design_for(5, cb, 8192) == "mma"  # more than 4 query rows
    huge = cb.clone()
    huge[0, 0, 0, 0] = 1e5  # a value codebook beyond fp16
    assert mc.lut_value_table(huge) is None and mc.design_for(4, huge, 8192) == "mma"
    monkeypatch.setattr(mc, "DESIGN", "mma")
    assert mc.design_for(4, cb, 8192) == "mma"
    monkeypatch.setattr(mc, "DESIGN", "lut")
    assert mc.design_for(4, cb, 32) == "lut"
    with pytest.raises(HfEffllmError, match="at most 4 query rows"):
        mc.design_for(8, cb, 8192)
    monkeypatch.setattr(mc, "DESIGN", "fast")
    with pytest.raises(HfEffllmError, match="DESIGN='fast' is not known"):
        mc.design_for(4, cb, 8192)


@pytest.mark.parametrize("m,dsub", [(64, 2), (32, 4), (32, 2), (16, 4)])
def test_cuda_lut_value_table_is_the_kernels_layout(m, dsub):
    """Word w of centroid c of subspace s at (c * M + perm(s)) * DSUB/2 + w, fp16; perm gives lane l's subspaces
    2l and 2l+1 the banks l and 32 + l when M = 64 (identity otherwise); memoized per codebook."""
    from hf_effllm.kernels.million_cuda import lut_value_table

    cb = torch.randn(2, m, 256, dsub).bfloat16()
    table = lut_value_table(cb)
    words = table.view(torch.float16).reshape(2, 256, m, dsub)  # (G, K, position, DSUB)
    for s in (0, 1, 5, m - 1):
        pos = (s % 2) * 32 + s // 2 if m > 32 else s
        for c in (0, 7, 255):
            assert torch.equal(words[1, c, pos], cb[1, s, c].half())
    assert lut_value_table(cb) is table


def test_cuda_lut_tile_setting_reaches_the_source_and_the_shared_memory(monkeypatch):
    """LUT_TILE picks the probability tile's layout: padded (default: 40 slots of 4 words per warp + 4 factors,
    every lane stores a token) or the session-11 one (32 slots, lanes t4 = 0); the source, the shared memory and
    the compiled kernel's key follow it; an unknown value is refused."""
    from hf_effllm.kernels import million_cuda as mc

    kw = dict(d=128, m=64, gq=4, lq=1, hkv=8, bf16=True, per_head=True, has_mask=False, nwarps=12, design="lut")
    assert mc.LUT_TILE == "padded" and mc.lut_tile_words() == 164
    src = mc.cuda_source(**kw)
    assert "#define TILE_PAD 1" in src and "#define PW 164" in src
    padded = mc.smem_bytes(128, 64, 12, 4, "lut")
    monkeypatch.setattr(mc, "LUT_TILE", "t4zero")
    src = mc.cuda_source(**kw)
    assert "#define TILE_PAD 0" in src and "#define PW 132" in src
    assert padded - mc.smem_bytes(128, 64, 12, 4, "lut") == 12 * 32 * 4
    monkeypatch.setattr(mc, "LUT_TILE", "wide")
    with pytest.raises(HfEffllmError, match="LUT_TILE='wide' is not known"):
        mc.cuda_source(**kw)


def test_cuda_lut_smem_fits_the_h200_at_every_warp_count():
    from hf_effllm.kernels.million_cuda import NWARPS, smem_bytes

    for d, m in ((128, 64), (128, 32), (64, 32), (64, 16)):
        assert smem_bytes(d, m, NWARPS, 4, design="lut") <= 232448  # the H200's opt-in limit


@pytest.mark.parametrize("d,m,rows,warps", [(128, 64, 4, 12), (128, 64, 16, 8), (64, 16, 16, 16), (128, 32, 8, 16)])
def test_cuda_smem_bytes_covers_tables_and_the_final_merge(d, m, rows, warps):
    from hf_effllm.kernels.million_cuda import smem_bytes

    need = smem_bytes(d, m, warps, rows)
    assert need >= 2 * 256 * d * 2  # the two tables
    assert need >= warps * ((8 if rows <= 8 else 16) * d + 32) * 4  # the warps' accumulators, maxima and sums


@pytest.mark.parametrize("dsub,m", [(1, 16), (4, 4), (8, 2)])  # DSUB 8: the loop kernel hands over to "chunked"
def test_encode_loop_kernel_other_subspace_sizes(triton_interpret, dsub, m):
    gen = torch.Generator().manual_seed(dsub)
    x = torch.randn(1, 2, 19, dsub * m, generator=gen)
    cb = torch.randn(2, m, 16, dsub, generator=gen)
    assert torch.equal(pq_encode(x, cb, encode_variant="loop"), pq_encode_reference(x, cb))
    with pytest.raises(HfEffllmError, match="encode_variant='fast'"):
        pq_encode(x, cb, encode_variant="fast")


def test_default_variant_is_the_first_of_the_order_that_takes_the_call(triton_interpret, monkeypatch):
    import hf_effllm.kernels.million as km

    q, ck, cv, cbk, cbv, rk, rv, cm, rm = _inputs(1, 4, 2, 1, 40, 3, 16, 8, 16, 1, torch.float32)
    monkeypatch.setattr(km, "DEFAULT_ORDER", ("cuda", "smem", "l1"))
    assert km._default_variant(q, ck, cv, cbk, 2, 1, None) == "smem"  # no CUDA here
    assert km._default_variant(q, ck, cv, cbk, 2, 1, 3) == "l1"  # smem does not take 3 chunks of M=8
    ref = million_attention_reference(q, ck, cv, cbk, cbv, rk, rv, scale=0.25, code_mask=cm, res_mask=rm)
    out = million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=0.25, code_mask=cm, res_mask=rm, use_kernel=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_cuda_launch_falls_back_to_the_kernels_own_call():
    """Without a driver handle on torch's kernel object, the launch goes through the object's own ``__call__``."""
    from hf_effllm.kernels.cuda_rt import launch

    calls = []

    class Kernel:  # torch's _CudaKernel minus its ``func`` handle
        def __call__(self, **kw):
            calls.append(kw)

    launch(Kernel(), (2, 3, 1), 64, 1024, [], [5, 6])
    assert calls == [{"grid": (2, 3, 1), "block": (64, 1, 1), "args": [5, 6], "shared_mem": 1024}]
