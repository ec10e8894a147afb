"""``spqr_octet_flat`` (``kernels.spqr_flat``): its outlier entries and work partition checked on the CPU, the
kernel itself on an sm_90 GPU against the PyTorch reference (eager and replayed from a CUDA graph, where its
programmatic dependent launch becomes a graph edge)."""

import pytest
import torch
from hf_effllm.kernels.spqr import spqr_matmul_reference
from hf_effllm.kernels.spqr_flat import flat_entries, flat_source, spqr_octet_flat
from hf_effllm.kernels.spqr_octet import octet_layout, spqr_octet_gemv

from hf_effllm import HfEffllmError
from hf_effllm.testing import spqr_layer as make_layer


def test_flat_entries_put_each_correction_where_its_lane_reads_it():
    """Entry (row, column of the step) -> tile half: lane (g, t) = (row, column // 16) reads halves
    [8 lane, 8 lane + 8) (columns 0-7 of its slice) and [256 + 8 lane, 256 + 8 lane + 8) (columns 8-15) as its 16
    B-fragment halves in order; the correction's 16 bits ride along unchanged (also with the sign bit set)."""
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(64), indexing="ij")
    value = (torch.arange(512).reshape(8, 64) * 977 + 0x8001) & 0xFFFF  # values with and without bit 15
    sent = cols | (rows << 6) | (37 << 9) | (value << 16)
    sent = ((sent + 2**31) % 2**32 - 2**31).to(torch.int32).reshape(-1)
    out = flat_entries(sent).to(torch.int64) & 0xFFFFFFFF
    pos, val = out & 0xFFFF, out >> 16
    lane, c16 = (rows * 64 + cols).reshape(-1) // 16, cols.reshape(-1) % 16
    assert torch.equal(pos, torch.where(c16 >= 8, 256, 0) + 8 * lane + c16 % 8)
    assert torch.equal(val, value.reshape(-1))
    assert sorted(pos.tolist()) == list(range(512))


@pytest.mark.parametrize(("octets", "steps", "warps"), [(1376, 64, 2112), (512, 172, 2112), (20, 2, 2112), (7, 3, 5)])
def test_partition_pieces_fit_the_scratch_the_host_sizes(octets, steps, warps):
    """The kernel's partition (warp w takes items [w T / NWT, (w + 1) T / NWT), with NWT capped at T on the host)
    covers every item once; an octet's pieces are the consecutive warps fl_owner names, none of them empty, and
    never more than the host's PMAX = steps // (T // NWT) + 2 scratch slots."""
    t_items = octets * steps
    nwt = min(warps, t_items)
    pmax = steps // max(1, t_items // nwt) + 2
    begin = [w * t_items // nwt for w in range(nwt + 1)]
    assert all(b < e for b, e in zip(begin, begin[1:]))  # no empty warp
    owner = lambda i: ((i + 1) * nwt - 1) // t_items  # noqa: E731 (the kernel's fl_owner)
    for i in range(0, t_items, max(1, t_items // 997)):
        assert begin[owner(i)] <= i < begin[owner(i) + 1]
    for o in range(octets):
        first, last = owner(o * steps), owner(o * steps + steps - 1)
        assert last - first + 1 <= pmax
        covered = sum(min(begin[w + 1], (o + 1) * steps) - max(begin[w], o * steps) for w in range(first, last + 1))
        assert covered == steps


def test_flat_kernel_reads_the_prepared_activations_after_the_wait():
    """spqr_octet_flat reads spqr_octet_prep's buffer with ordinary loads issued after griddepcontrol.wait: ptxas
    moves ld.global.nc loads (__ldg) above the wait (seen in session 18's SASS), which would read the previous
    launch's activations."""
    src = flat_source(warps=8, depth=3, blocks_per_sm=2, bf16=True)
    body = src[src.index("spqr_octet_flat(") :]
    wait = body.index("griddepcontrol.wait")
    assert "__ldg(xf" not in body and "__ldg(xp" not in body and "__ldg(xq" not in body
    assert body.index("ld_a128(") > wait  # every read of xf (through xl / xpb / xq) follows the wait
    helper = src[src.index("uint4 ld_a128(") :]
    assert 'asm volatile("ld.global.v4.u32' in helper[: helper.index("}")]


def test_flat_source_and_refusals():
    src = flat_source(warps=8, depth=6, blocks_per_sm=2, bf16=True)
    assert "#define FD_ 6" in src and "#define FW_ 8" in src and "#define FMB_ 2" in src
    assert "spqr_octet_prep(" in src and "spqr_octet_flat(" in src and "griddepcontrol.wait" in src
    layer, _ = make_layer(24, 96, bits=3)
    lay = octet_layout(layer.packed_tensors(), **layer.packed_meta())
    with pytest.raises(HfEffllmError, match="sm_90"):
        spqr_octet_flat(torch.randn(2, 96, dtype=torch.bfloat16), lay)
    with pytest.raises(HfEffllmError, match="95 features"):
        spqr_octet_flat(torch.randn(2, 95, dtype=torch.bfloat16), lay)
    # the launch settings' bounds (the check spqr_octet_flat shares with the ring kernels' _ring_launch)
    from hf_effllm.kernels.spqr_octet import _check_ranges

    _check_ranges(("warps", 32, 1, 32), ("depth", 1, 1, 8))
    with pytest.raises(HfEffllmError, match=r"depth=9 is out of range; use 1 to 8"):
        _check_ranges(("warps", 8, 1, 32), ("depth", 9, 1, 8))


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


FLAT_CASES = [
    (37, 46, 8, 3, 16, "act_order"),
    (64, 256, 9, 4, 16, "identity"),
    (21, 130, 16, 2, 32, "act_order"),
    (300, 1000, 12, 3, 16, "act_order"),
    (4000, 128, 1, 3, 16, "act_order"),  # 500 octets of 2 steps: many whole octets per warp
    (50, 202, 3, 3, 16, "act_order"),
]
# (warps, depth, blocks_per_sm): the default, one warp per block (several octets each), deep and shallow loads
FLAT_CONFIGS = [(8, 3, 2), (1, 2, 1), (4, 8, 1), (32, 1, 2), (6, 5, 3)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("out", "inp", "rows", "bits", "gs", "perm"), FLAT_CASES)
def test_flat_kernel_matches_reference(out, inp, rows, bits, gs, perm, dtype, octet_case):
    if not _sm90():
        pytest.skip("needs an sm_90 GPU")
    layer, _, _, lay, x, ref = octet_case(out, inp, rows, bits, gs, perm, dtype)
    # the same decode as spqr_octet_gemv (fp16 weights, fp32 sums): compared with it and with the reference
    other = spqr_octet_gemv(x, lay, bias=layer.bias).float()
    for warps, depth, blocks in FLAT_CONFIGS:
        y = spqr_octet_flat(x, lay, bias=layer.bias, warps=warps, depth=depth, blocks_per_sm=blocks)
        assert y.dtype == dtype and y.shape == (rows, out)
        assert (y.float() - ref).norm() <= 5e-3 * ref.norm(), (warps, depth, blocks)
        assert (y.float() - other).norm() <= 3e-3 * other.norm(), (warps, depth, blocks)
        again = spqr_octet_flat(x, lay, bias=layer.bias, warps=warps, depth=depth, blocks_per_sm=blocks)
        assert torch.equal(again, y), (warps, depth, blocks)  # shared octets are added in warp order
    assert spqr_octet_flat(x.view(rows, 1, inp), lay).shape == (rows, 1, out)


@pytest.mark.gpu
def test_flat_kernel_many_rows_many_outliers_and_a_cuda_graph():
    """40 rows (three launches, the activations' buffer reused); 2 bits at threshold 0.02 (about 290 outlier
    entries per 512-weight step, over the 32 a warp's lanes hold, read from global memory); and the launch pair
    captured in a CUDA graph and replayed with new activations."""
    if not _sm90():
        pytest.skip("needs an sm_90 GPU")
    layer, _ = make_layer(96, 11008, bits=3)
    layer = layer.cuda()
    t, meta = layer.packed_tensors(), layer.packed_meta()
    lay = octet_layout(t, **meta)
    x = torch.randn(40, 11008, device="cuda", dtype=torch.bfloat16)
    ref = spqr_matmul_reference(x.float(), t, bias=layer.bias, **meta)
    y = spqr_octet_flat(x, lay, bias=layer.bias)
    assert (y.float() - ref).norm() <= 5e-3 * ref.norm()
    assert torch.equal(spqr_octet_flat(x, lay, bias=layer.bias), y)

    dense, _ = make_layer(64, 512, bits=2, threshold=0.02)
    dense = dense.cuda()
    dt, dmeta = dense.packed_tensors(), dense.packed_meta()
    dlay = octet_layout(dt, **dmeta)
    assert int(dlay["sptr"][-1]) > 64 * 512 // 4
    for rows in (8, 16):
        xd = torch.randn(rows, 512, device="cuda", dtype=torch.float16)
        # degenerate groups decode to large values under their corrections, in fp16 in every octet kernel: the
        # reference is spqr_octet_gemv, which adds the same outliers in fp32 after the mma
        ref_d = spqr_octet_gemv(xd, dlay, bias=dense.bias).float()
        yd = spqr_octet_flat(xd, dlay, bias=dense.bias, warps=4, depth=3)
        assert (yd.float() - ref_d).norm() <= 2e-3 * ref_d.norm(), rows

    xs = torch.randn(16, 11008, device="cuda", dtype=torch.bfloat16)
    spqr_octet_flat(xs, lay, bias=layer.bias)  # compiled and warm before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = spqr_octet_flat(xs, lay, bias=layer.bias)
    for _ in range(2):
        xs.copy_(torch.randn_like(xs))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(yg, spqr_octet_flat(xs, lay, bias=layer.bias))
