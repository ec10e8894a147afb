import pytest
import torch
from hf_effllm.kernels.spqr import (
    kernel_layout,
    spqr_dequantize_triton,
    spqr_gemv_triton,
    spqr_matmul,
    spqr_matmul_reference,
)

from hf_effllm import HfEffllmError
from hf_effllm.quant.spqr import dequantize_weight
from hf_effllm.testing import spqr_layer as make_layer

TOL = {torch.float32: 1e-4, torch.float16: 2e-2}


@pytest.mark.parametrize(
    ("out", "inp", "rows", "bits", "gs", "perm", "dtype"),
    [
        (37, 45, 1, 3, 16, "act_order", torch.float32),
        (21, 70, 3, 4, 8, "identity", torch.float16),
        (33, 200, 8, 3, 16, "act_order", torch.float16),
        (9, 131, 16, 2, 32, "act_order", torch.float32),
        (40, 128, 2, 3, 16, "act_order", torch.float32),
        (24, 96, 5, 4, 16, "identity", torch.float16),
        (17, 300, 1, 6, 16, "act_order", torch.float16),  # 8-bit lanes, two K tiles, partial last tile
        (50, 150, 1, 2, 64, "identity", torch.float32),  # 2-bit lanes
    ],
)
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_gemv_kernel_matches_reference(triton_interpret, out, inp, rows, bits, gs, perm, dtype, variant):
    layer, res = make_layer(out, inp, bits=bits, group_size=gs, permutation=perm)
    layer = layer.to(triton_interpret)
    x = torch.randn(rows, inp, device=triton_interpret).to(dtype)
    t, meta = layer.packed_tensors(), layer.packed_meta()
    ref = spqr_matmul_reference(x.float(), t, bias=layer.bias, **meta)
    lay = kernel_layout(t, **meta)
    for split_k in (1, 2):
        y = spqr_gemv_triton(x, t, bias=layer.bias, split_k=split_k, layout=lay, variant=variant, **meta)
        assert y.dtype == dtype and y.shape == (rows, out)
        torch.testing.assert_close(y.float(), ref, rtol=TOL[dtype], atol=TOL[dtype] * ref.abs().max().item())
    if perm == "act_order":
        assert res.nnz > 0  # the outlier pass was exercised


def test_dequantize_kernel_and_prefill_path(triton_interpret):
    layer, _ = make_layer(19, 53, bits=3, group_size=16)
    layer = layer.to(triton_interpret)
    t, meta = layer.packed_tensors(), layer.packed_meta()
    w = spqr_dequantize_triton(t, dtype=torch.float32, **meta)
    assert torch.equal(w, dequantize_weight(t, **meta))
    w_orig = spqr_dequantize_triton(t, dtype=torch.float32, original_order=True, **meta)
    torch.testing.assert_close(w_orig, layer.dequantize(), rtol=0, atol=1e-6)
    x = torch.randn(2, 11, 53, device=triton_interpret)  # 22 rows: the prefill path
    y = spqr_matmul(x, t, bias=layer.bias, use_triton=True, **meta)
    torch.testing.assert_close(y, spqr_matmul_reference(x, t, bias=layer.bias, **meta), rtol=1e-4, atol=1e-4)


def test_non_power_of_two_group_uses_the_reference(triton_interpret):
    layer, _ = make_layer(12, 40, group_size=10, threshold=float("inf"), bias=False)
    layer = layer.to(triton_interpret)
    t, meta = layer.packed_tensors(), layer.packed_meta()
    x = torch.randn(1, 40, device=triton_interpret)
    torch.testing.assert_close(
        spqr_matmul(x, t, use_triton=True, **meta), spqr_matmul_reference(x, t, **meta), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(HfEffllmError, match="group_size=10"):
        spqr_gemv_triton(x, t, **meta)


def test_module_forward_matches_dense_dequantized_linear():
    layer, res = make_layer(24, 48)
    x = torch.randn(3, 5, 48)
    dense = torch.nn.functional.linear(x, res.weight, layer.bias)
    torch.testing.assert_close(layer(x), dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dequantize(), res.weight)
    assert layer.avg_bits == pytest.approx(res.avg_bits)


def test_wrapper_errors():
    layer, _ = make_layer(8, 32)
    t, meta = layer.packed_tensors(), layer.packed_meta()
    with pytest.raises(HfEffllmError, match="x.dtype"):
        spqr_matmul(torch.ones(1, 32, dtype=torch.int64), t, **meta)
    with pytest.raises(HfEffllmError, match="expects 32"):
        spqr_matmul(torch.ones(1, 31), t, **meta)
    with pytest.raises(HfEffllmError, match="at most 16"):
        spqr_gemv_triton(torch.ones(17, 32), t, **meta)
    with pytest.raises(HfEffllmError, match="variant='v3'"):
        spqr_gemv_triton(torch.ones(1, 32), t, variant="v3", **meta)


@pytest.mark.parametrize("rows", [1, 2, 16])
def test_v2_kernels_on_long_rows_and_multi_step_splits(triton_interpret, rows):
    """v2 at several k-steps per split (tensor-core kernel: 128 columns a step; one-row kernel: 64), split-K
    boundaries inside a row block of statistics, outliers, bias, act-order; through spqr_matmul's dispatch."""
    layer, res = make_layer(40, 520, bits=3, group_size=16, seed=1)
    layer = layer.to(triton_interpret)
    t, meta = layer.packed_tensors(), layer.packed_meta()
    x = torch.randn(rows, 520, device=triton_interpret)
    ref = spqr_matmul_reference(x, t, bias=layer.bias, **meta)
    for split_k in (1, 3):
        y = spqr_gemv_triton(x, t, bias=layer.bias, split_k=split_k, variant="v2", block_out=16, **meta)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    y = spqr_matmul(x, t, bias=layer.bias, use_triton=True, variant="v2", **meta)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert res.nnz > 0


def test_cpu_path_takes_bf16_and_fp16_activations():
    layer, res = make_layer(24, 48)
    x = torch.randn(2, 7, 48)
    ref = torch.nn.functional.linear(x, res.weight, layer.bias)
    for dtype in (torch.bfloat16, torch.float16):
        y = layer(x.to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("rows", [1, 2, 8, 16, 40])  # decode kernels (<= 16 rows) and the prefill path
def test_bf16_forward_and_backward_on_gpu(variant, rows):
    """bf16 is checked on the GPU only (the Triton interpreter computes bf16 wrongly)."""
    layer, res = make_layer(96, 300, bits=3, group_size=16)
    layer = layer.cuda()
    x = torch.randn(rows, 300, device="cuda", dtype=torch.bfloat16)
    w = res.weight.cuda()
    ref = torch.nn.functional.linear(x.float(), w, layer.bias.float())
    t, meta = layer.packed_tensors(), layer.packed_meta()
    y = spqr_matmul(x, t, bias=layer.bias, layout=layer.kernel_layout(), variant=variant, **meta)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    xg = x.detach().requires_grad_(True)
    grad = torch.randn(rows, 96, device="cuda", dtype=torch.bfloat16)
    layer(xg).backward(grad)  # the backward dequantizes with the Triton kernel
    torch.testing.assert_close(
        xg.grad.float(), grad.float() @ w, rtol=2e-2, atol=2e-2 * (grad.float() @ w).abs().max().item()
    )
