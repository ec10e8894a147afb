"""The SpQR CUDA kernels (``kernels.spqr_cuda``): the layout, checked on the CPU by emulating the kernels' register
mapping (A fragment of ``mma.m16n8k16``, B fragment order of the activations), and the kernels themselves on a GPU
against the PyTorch reference."""

import pytest
import torch
from hf_effllm.kernels import spqr_cuda
from hf_effllm.kernels.spqr import spqr_matmul, spqr_matmul_reference
from hf_effllm.kernels.spqr_cuda import (
    cuda_layout,
    cuda_source,
    layout_supported,
    spqr_dequantize_cuda,
    spqr_gemv_cuda,
    supports,
)

from hf_effllm import HfEffllmError
from hf_effllm.quant.spqr import dequantize_weight
from hf_effllm.testing import spqr_layer as make_layer


def emulate_weight(lay):
    """The weight (out, in) in stored order as the kernel decodes it: thread (g, t) of a warp, tile j of a chunk,
    register i, half h -> row g + 8 (i & 1), column 16 j + 2 t + 8 (i >> 1) + h; code at bits 4 i + 16 h of its word;
    statistics byte j of word (i & 1) of group g."""
    nt, kc = lay["nt"], lay["kc"]
    words = lay["codes"].view(nt, kc, 8, 4, 4).long() & 0xFFFFFFFF  # tile, chunk, g, t, j
    stats = lay["stats"].view(nt, kc, 8, 2).long() & 0xFFFFFFFF
    s2 = lay["stats2"].view(nt, kc, 4, 4).float()
    w = torch.zeros(nt, 16, kc, 64)
    for g in range(8):
        for t in range(4):
            for j in range(4):
                for i in range(4):
                    half = i & 1
                    byte = (stats[:, :, g, half] >> (8 * j)) & 255
                    s = s2[:, :, j, 0] * (byte & 15) + s2[:, :, j, 1]
                    z = s2[:, :, j, 2] * (byte >> 4) + s2[:, :, j, 3]
                    for h in range(2):
                        q = (words[:, :, g, t, j] >> (4 * i + 16 * h)) & 15
                        w[:, g + 8 * half, :, 16 * j + 2 * t + 8 * (i >> 1) + h] = s * (q - z)
    w = w.reshape(nt * 16, kc * 64)[: lay["n"], : lay["k"]]
    w.index_put_((lay["orow"], lay["oc"]), lay["ov"].float(), accumulate=True)
    return w


def emulate_gemv(x, lay):
    """``x @ W^T`` through the B-fragment order the prep kernel writes and the A fragments of the layout."""
    m, k = x.shape
    kc = lay["kc"]
    xp = torch.zeros(m, kc * 64)
    xp[:, :k] = x[:, lay["perm_long"]] if "perm_long" in lay else x
    # prep: [row][chunk][t][tile j][4 values: 2t, 2t+1, 2t+8, 2t+9]
    frag = torch.zeros(m, kc, 4, 4, 4)
    for t in range(4):
        for j in range(4):
            for e in range(4):
                frag[:, :, t, j, e] = xp.view(m, kc, 64)[:, :, 16 * j + 2 * t + (e & 1) + 8 * (e >> 1)]
    # mma: sum over k of A[row, k] B[k, n]; B's k = 2t + (e & 1) + 8 (e >> 1) for thread t of column n
    w = emulate_weight({**lay, "ov": lay["ov"][:0], "orow": lay["orow"][:0], "oc": lay["oc"][:0]})
    wp = torch.zeros(w.shape[0], kc * 64)
    wp[:, : w.shape[1]] = w
    y = torch.zeros(m, w.shape[0])
    for t in range(4):
        for j in range(4):
            for e in range(4):
                col = 16 * j + 2 * t + (e & 1) + 8 * (e >> 1)
                y += frag[:, :, t, j, e] @ wp.view(-1, kc, 64)[:, :, col].T
    cols = lay["oc_orig"].long()
    y.index_put_(
        (torch.arange(m)[:, None].expand(m, cols.numel()), lay["orow"][None, :].expand(m, cols.numel())),
        lay["ov"].float()[None, :] * x[:, cols],
        accumulate=True,
    )
    return y


@pytest.mark.parametrize(
    ("out", "inp", "bits", "gs", "perm"),
    [
        (37, 46, 3, 16, "act_order"),  # partial row tile and chunk
        (16, 64, 4, 16, "identity"),  # exact tiles
        (21, 130, 2, 32, "act_order"),  # groups of two tiles, three chunks
        (40, 200, 3, 64, "identity"),
    ],
)
def test_layout_decodes_to_the_reference_weight(out, inp, bits, gs, perm):
    layer, res = make_layer(out, inp, bits=bits, group_size=gs, permutation=perm)
    t, meta = layer.packed_tensors(), layer.packed_meta()
    lay = cuda_layout(t, **meta)
    wref = dequantize_weight(t, **meta)
    # the outlier corrections are re-centred (codes under them set near the zero-point): equal up to fp16 rounding
    torch.testing.assert_close(emulate_weight(lay), wref, rtol=0, atol=1e-3 * wref.abs().max().item())
    codes = lay["codes"].view(lay["nt"], lay["kc"], 8, 4, 4)
    assert codes.numel() and emulate_weight({**lay, "ov": lay["ov"] * 0}).abs().max() <= 2 * wref.abs().max()
    x = torch.randn(3, inp)
    ref = spqr_matmul_reference(x, t, **meta)
    torch.testing.assert_close(emulate_gemv(x, lay), ref, rtol=0, atol=5e-3 * ref.abs().max().item())
    if perm == "act_order":
        assert res.nnz > 0


def test_layout_with_stats_blocks_of_32_rows():
    from hf_effllm import SpQRConfig
    from hf_effllm.quant.spqr import SpQRLinear, spqr_quantize_matrix

    g = torch.Generator().manual_seed(1)
    w = torch.randn(50, 48, generator=g)
    cfg = SpQRConfig(bits=3, stats_group_size=32, permutation="identity")
    res = spqr_quantize_matrix(w, torch.eye(48), cfg)
    layer = SpQRLinear.from_packed(res.tensors, cfg, in_features=48, bias=None)
    t, meta = layer.packed_tensors(), layer.packed_meta()
    wref = dequantize_weight(t, **meta)
    torch.testing.assert_close(
        emulate_weight(cuda_layout(t, **meta)), wref, rtol=0, atol=1e-3 * wref.abs().max().item()
    )


def test_formats_and_inputs_the_cuda_kernels_refuse():
    assert "bits=6" in layout_supported(bits=6, group_size=16, stats_bits=3, stats_group_size=16)
    assert "stats_bits=5" in layout_supported(bits=3, group_size=16, stats_bits=5, stats_group_size=16)
    assert "multiples of 16" in layout_supported(bits=3, group_size=8, stats_bits=3, stats_group_size=16)
    assert layout_supported(bits=3, group_size=16, stats_bits=3, stats_group_size=16) is None
    layer, _ = make_layer(16, 40, bits=6)
    with pytest.raises(HfEffllmError, match="bits=6"):
        cuda_layout(layer.packed_tensors(), **layer.packed_meta())
    assert supports(torch.zeros(1, 40), layer.packed_meta()) is not None  # CPU tensor
    ok, _ = make_layer(16, 40)
    lay = cuda_layout(ok.packed_tensors(), **ok.packed_meta())
    with pytest.raises(HfEffllmError, match="float32"):
        spqr_gemv_cuda(torch.zeros(1, 40), lay)
    with pytest.raises(HfEffllmError, match="expects 40"):
        spqr_gemv_cuda(torch.zeros(1, 41, dtype=torch.float16), lay)
    with pytest.raises(HfEffllmError, match="float32"):
        spqr_dequantize_cuda(lay, torch.float32)
    with pytest.raises(HfEffllmError, match="decode='fast'"):
        spqr_gemv_cuda(torch.zeros(1, 40, dtype=torch.float16), lay, decode="fast")
    with pytest.raises(HfEffllmError, match="stages=1"):
        spqr_gemv_cuda(torch.zeros(1, 40, dtype=torch.float16), lay, stages=1)


def test_the_module_leaves_the_cuda_kernels_to_triton_under_torch_compile(monkeypatch):
    import types

    layer, _ = make_layer(16, 40)
    x = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.float16)
    monkeypatch.setattr(spqr_cuda, "supports", lambda x, meta: None)  # as if the GPU had been asked
    assert layer._use_cuda(x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not layer._use_cuda(x)
    with pytest.raises(HfEffllmError, match="torch.compile is tracing"):
        spqr_matmul(torch.zeros(1, 40), layer.packed_tensors(), variant="cuda", **layer.packed_meta())


def test_variant_cuda_without_a_gpu_says_why():
    layer, _ = make_layer(16, 40)
    with pytest.raises(HfEffllmError, match="variant='cuda' cannot run here"):
        spqr_matmul(torch.zeros(1, 40), layer.packed_tensors(), variant="cuda", **layer.packed_meta())


GPU_CASES = [
    (37, 46, 1, 3, 16, "act_order"),
    (64, 256, 3, 4, 16, "identity"),
    (21, 130, 8, 2, 32, "act_order"),
    (50, 202, 9, 3, 16, "act_order"),
    (300, 1000, 16, 3, 16, "act_order"),
]


def test_breakdown_switches_only_enter_the_source_when_set(monkeypatch):
    """spqr_speed --breakdown compiles phases out through _SKIP; by default the source has no switch (nor a blank
    one), and each switch set becomes one #define that the source tests."""
    default = cuda_source(warps=8, stages=4, nb=1, bf16=True, xs=True)
    assert "#define SKIP" not in default and "{SKIP}" not in default
    monkeypatch.setattr(spqr_cuda, "_SKIP", frozenset({"outliers", "mma"}))
    src = cuda_source(warps=8, stages=4, nb=1, bf16=True, xs=True)
    assert "#define SKIP_MMA 1" in src and "#define SKIP_OUTLIERS 1" in src and "#define SKIP_GATHER" not in src
    for name in ("SKIP_MMA", "SKIP_OUTLIERS", "SKIP_GATHER"):  # each switch is tested by the kernel source
        assert f"defined({name})" in default or f"#ifndef {name}" in default or f"#ifdef {name}" in default


def test_in_kernel_gather_and_outlier_lookup_agree_with_the_fragment_order():
    """The ``XS`` path gathers x into shared memory by pairs (row, chunk, t, tile j, pair) and the outlier pass looks
    an activation up with ``frag_pos``; both must match the prep kernel's order (checked by ``emulate_gemv``)."""
    m, k = 2, 150
    kc = -(-k // 64)
    x = torch.randn(m, k)
    halves = torch.zeros(m * kc * 64)
    for e in range(m * kc * 32):  # the kernel's gather loop, one u32 pair per e
        pr, j, tt, c, b = e & 1, (e >> 1) & 3, (e >> 3) & 3, (e >> 5) % kc, e // (kc * 32)
        kk = c * 64 + 16 * j + 2 * tt + 8 * pr
        halves[2 * e] = x[b, kk] if kk < k else 0
        halves[2 * e + 1] = x[b, kk + 1] if kk + 1 < k else 0

    def frag_pos(b, col):  # the kernel's frag_pos
        kk, kt = col & 63, col & 15
        return ((b * kc + (col >> 6)) * 4 + ((kt & 7) >> 1)) * 16 + (kk >> 4) * 4 + (kt & 1) + 2 * (kt >> 3)

    for b in range(m):
        for col in range(k):
            assert halves[frag_pos(b, col)] == x[b, col]
    # prep order: [row][chunk][t][tile j][2t, 2t+1, 2t+8, 2t+9]
    for b in range(m):
        for c in range(kc):
            for tt in range(4):
                for j in range(4):
                    for e in range(4):
                        col = c * 64 + 16 * j + 2 * tt + (e & 1) + 8 * (e >> 1)
                        if col < k:
                            assert halves[(((b * kc + c) * 4 + tt) * 4 + j) * 4 + e] == x[b, col]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("out", "inp", "rows", "bits", "gs", "perm"), GPU_CASES)
def test_cuda_gemv_matches_reference(out, inp, rows, bits, gs, perm, dtype, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    layer, _ = make_layer(out, inp, bits=bits, group_size=gs, permutation=perm)
    layer = layer.cuda()
    t, meta = layer.packed_tensors(), layer.packed_meta()
    x = torch.randn(rows, inp, device="cuda").to(dtype)
    ref = spqr_matmul_reference(x.float(), t, bias=layer.bias, **meta)
    lay = cuda_layout(t, **meta)
    # bf16: the kernels round the decoded weights to bf16 before the product. The random layer of GPU_CASES[-1] has
    # a degenerate group (row 21: its 16 codes decode to -620, all corrected by outliers to weights below 30), where
    # that rounding leaves errors of a few units in some outputs; fp16 rounds 8x finer.
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    configs = [(8, 8, 2, 1 << 16), (1, 2, 1, 1 << 16), (3, 5, 1, 1 << 16), (16, 4, 1, 1 << 16)]
    configs += [(8, 8, 2, 0), (3, 5, 1, 0)]  # activations from the prep kernel, streamed with the chunks
    configs = [(*c, d) for d in ("dequant", "raw") for c in configs]
    for warps, stages, per_sm, xs_max, decode in configs:  # (3, 5): uneven chunk split
        monkeypatch.setattr(spqr_cuda, "XS_MAX_BYTES", xs_max)
        y = spqr_gemv_cuda(x, lay, bias=layer.bias, warps=warps, stages=stages, blocks_per_sm=per_sm, decode=decode)
        assert y.dtype == dtype and y.shape == (rows, out)
        assert (y.float() - ref).norm() <= (5e-3 if dtype == torch.float16 else 1e-2) * ref.norm()
        torch.testing.assert_close(
            y.float(),
            ref,
            rtol=tol,
            atol=tol * ref.abs().max().item(),
            msg=lambda m, cfg=(warps, stages, xs_max, decode): f"warps, stages, XS_MAX_BYTES, decode = {cfg}: {m}",
        )
    w = spqr_dequantize_cuda(lay, dtype)
    wref = dequantize_weight(t, **meta)
    # each weight is its code's value rounded to 16 bits plus the correction: the error is bounded by the rounding of
    # the base (the decoded code), which can exceed the weight in degenerate groups (see above)
    base = emulate_weight(
        {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in lay.items()}
        | {"ov": lay["ov"][:0].cpu(), "orow": lay["orow"][:0].cpu(), "oc": lay["oc"][:0].cpu()}
    )
    ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
    bound = ulp * (base.abs() + wref.abs().cpu()) + 1e-3 * wref.abs().max().item()
    assert ((w.float() - wref).abs().cpu() <= bound).all()
    y = layer(x)  # the module's default path: the octet CUDA kernel (these few rows fit its shared memory)
    assert layer._octet_layout is not None and layer._layout is None
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    xl = torch.randn(2, 20, inp, device="cuda").to(dtype)  # 40 rows: dequantize + matmul
    refl = spqr_matmul_reference(xl.float(), t, bias=layer.bias, **meta)
    # the dense weight's rounding (bound above, larger in degenerate groups), summed over the inputs
    xs = xl.float().index_select(-1, lay["perm_long"]) if "perm_long" in lay else xl.float()  # stored order
    slack = xs.abs().cpu() @ bound.T
    errl = (layer(xl).float() - refl).abs().cpu()
    assert (errl <= tol * (refl.abs().cpu() + refl.abs().max().item()) + slack).all()
    xg = x.clone().requires_grad_(True)
    layer(xg).float().sum().backward()
    gref = layer.dequantize().sum(0).to(dtype).expand(rows, inp).float()
    torch.testing.assert_close(xg.grad.float(), gref, rtol=tol, atol=tol * gref.abs().max().item())
