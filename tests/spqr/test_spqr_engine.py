import pytest
import torch

from hf_effllm import HfEffllmError, SpQRConfig
from hf_effllm.quant.spqr import dequantize_weight, pack_bits, spqr_quantize_matrix, unpack_bits
from hf_effllm.quant.spqr.engine import leave_one_out_reduction

INF = float("inf")


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum())).item()


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 160, generator=g)
    w[torch.rand(w.shape, generator=g) < 0.01] *= 10  # heavy tail: the weights SpQR keeps as outliers
    mix = torch.eye(160) + torch.randn(160, 160, generator=g) / 8  # correlated inputs: GPTQ feedback matters
    x = torch.randn(3000, 160, generator=g) @ mix
    return w, x, 2 * x.T @ x / x.shape[0]


def out_err(w, x, wq):
    return ((x @ (w - wq).T) ** 2).mean().item()


@pytest.mark.parametrize("bits", range(2, 9))
def test_bitstream_round_trip(bits):
    codes = torch.randint(0, 2**bits, (5, 37))
    words = pack_bits(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (5, (37 * bits + 31) // 32 + 1)
    assert torch.equal(unpack_bits(words, 37, bits), codes)


def test_sqnr_grows_with_bits(problem):
    w, _, _ = problem
    sq = {}
    for b in (2, 3, 4, 8):
        cfg = SpQRConfig(bits=b, stats_bits=max(b, 3), outlier_threshold=INF, permutation="identity")
        sq[b] = sqnr_db(w, spqr_quantize_matrix(w, None, cfg).weight)
    assert sq[2] > 7 and sq[3] > 14 and sq[4] > 20 and sq[8] > 44, sq


def test_three_bit_statistics_cap_high_bit_codes(problem):
    w, _, _ = problem
    cfg = SpQRConfig(bits=8, stats_bits=3, outlier_threshold=INF, permutation="identity")
    assert sqnr_db(w, spqr_quantize_matrix(w, None, cfg).weight) < 30  # why stats_bits must grow with bits


def test_gptq_feedback_beats_round_to_nearest(problem):
    w, x, h = problem
    cfg = SpQRConfig(bits=3, outlier_threshold=INF, permutation="identity")
    rtn = spqr_quantize_matrix(w, None, cfg)
    gptq = spqr_quantize_matrix(w, h, cfg)
    assert rtn.avg_bits == gptq.avg_bits
    assert out_err(w, x, gptq.weight) < 0.85 * out_err(w, x, rtn.weight)


def test_outliers_lower_the_error_at_equal_bits(problem):
    w, x, h = problem
    spqr = spqr_quantize_matrix(w, h, SpQRConfig(bits=3, group_size=16, outlier_threshold=1.0))
    # plain GPTQ with smaller groups spends at least as many bits on statistics instead of outliers
    gptq = spqr_quantize_matrix(w, h, SpQRConfig(bits=3, group_size=8, outlier_threshold=INF))
    assert spqr.nnz > 0 and spqr.avg_bits <= gptq.avg_bits
    assert out_err(w, x, spqr.weight) < 0.9 * out_err(w, x, gptq.weight)


def test_packed_tensors_dequantize_to_the_returned_weight(problem):
    w, _, h = problem
    cfg = SpQRConfig(bits=3, outlier_threshold=0.5)
    res = spqr_quantize_matrix(w, h, cfg)
    deq = dequantize_weight(res.tensors, in_features=160, bits=3, group_size=16, stats_bits=3, stats_group_size=16)
    assert torch.equal(deq[:, torch.argsort(res.tensors["perm"].long())], res.weight)
    t = res.tensors
    assert t["outlier_row_ptr"][-1].item() == res.nnz == t["outlier_values"].numel()
    assert t["outlier_values"].dtype == torch.float16 and t["outlier_cols"].dtype == torch.int16
    bits = sum(v.numel() * v.element_size() * 8 for v in t.values())
    assert res.avg_bits == pytest.approx(bits / w.numel())


def test_leave_one_out_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    group, d = torch.randn(40, 16, generator=g), torch.rand(16, generator=g) + 0.5

    def rtn(v):
        lo, hi = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)
        s = ((hi - lo) / 7).clamp_min(1e-12)
        return lo + torch.round((v - lo) / s).clamp(0, 7) * s

    idx = torch.arange(16)
    loo = idx[1:] - (idx[:, None] >= idx[1:]).long()
    data = group[:, loo]
    expected = ((rtn(group) - group) / d).square().sum(1, keepdim=True) - ((rtn(data) - data) / d[loo]).square().sum(-1)
    torch.testing.assert_close(leave_one_out_reduction(group, d, 3), expected, rtol=1e-4, atol=1e-5)


def test_odd_shapes_and_single_row():
    for shape in [(1, 7), (17, 33), (5, 100)]:
        w = torch.randn(shape)
        res = spqr_quantize_matrix(w, None, SpQRConfig(bits=4, group_size=16, stats_group_size=16))
        assert res.weight.shape == w.shape and torch.isfinite(res.weight).all()
        assert sqnr_db(w, res.weight) > 12


def test_a_small_scale_next_to_a_large_one_keeps_its_block_finite():
    """Row 1's group (values near 100, tiny spread) has the floor scale 100 / 1024; in a block of rows with a scale
    of 143 (row 2) the 3-bit second level steps by 20, and rounded to nearest it fell to the block's minimum (row 0,
    0.001): zero-point -1e5, -inf in fp16, and the whole block dequantized to inf. The second level now keeps
    |zero| <= 2^14."""
    w = torch.randn(16, 16) * 0.01
    w[0] = torch.linspace(0, 0.007, 16)
    w[1] = 100 + torch.linspace(0, 1e-3, 16)
    w[2] = torch.linspace(-500, 500, 16)
    res = spqr_quantize_matrix(w, None, SpQRConfig(bits=3, outlier_threshold=INF, permutation="identity"))
    assert torch.isfinite(res.tensors["stats2"].float()).all() and torch.isfinite(res.weight).all()
    assert (res.weight[1] - w[1]).abs().max() < 0.1  # within half a level (scale 20 / 7 ... 100 / 1024 floor)
    assert (res.weight[[0, *range(3, 16)]] - w[[0, *range(3, 16)]]).abs().max() < 0.05


def test_non_finite_results_raise_instead_of_a_broken_layer():
    w = torch.randn(16, 32)
    w[3, 5] = float("inf")
    with pytest.raises(HfEffllmError, match="non-finite"):
        spqr_quantize_matrix(w, None, SpQRConfig(bits=3))


@pytest.mark.parametrize("group_size", [12, 24])
def test_group_statistics_see_every_earlier_update(problem, monkeypatch, group_size):
    """Groups that are neither a divisor nor a multiple of the 16-column sub-blocks: each group's statistics must be
    fitted on weights updated by every earlier column, exactly as in the unblocked sweep (sub-blocks of one column)."""
    from hf_effllm.quant.spqr import engine

    w, x, h = problem
    cfg = SpQRConfig(bits=3, group_size=group_size, outlier_threshold=INF, permutation="identity")
    blocked = spqr_quantize_matrix(w, h, cfg)
    monkeypatch.setattr(engine, "_SUB", 1)
    unblocked = spqr_quantize_matrix(w, h, cfg)
    for key in ("qscale", "qzero"):
        assert torch.equal(blocked.tensors[key], unblocked.tensors[key]), key
    assert out_err(w, x, blocked.weight) == pytest.approx(out_err(w, x, unblocked.weight), rel=1e-3)


def _textbook_gptq(w, h, cfg):
    """GPTQ as in the paper's pseudo-code, one column at a time with immediate error feedback (no lazy blocks), with
    the same bi-level statistics: an independent reference of the engine's sweep without outliers."""
    from hf_effllm.quant.spqr.format import quantize_stats

    maxq = 2**cfg.bits - 1
    w, h = w.clone().double(), h.clone().double()
    n = w.shape[1]
    perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    w, h = w[:, perm], h[perm][:, perm]
    h += cfg.percdamp * torch.diag(h).mean() * torch.eye(n, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    out = torch.zeros_like(w)
    for j in range(n):
        if j % cfg.group_size == 0:
            grp = w[:, j : j + cfg.group_size].float()
            lo, hi = grp.amin(1), grp.amax(1)
            floor = torch.maximum(lo.abs(), hi.abs()).div(1024).clamp_min(1e-6)
            raw = torch.maximum((hi - lo) / maxq, floor)
            scale = quantize_stats(raw[:, None], cfg.stats_bits, cfg.stats_group_size)[3][:, 0]
            zero = quantize_stats((-lo / scale)[:, None], cfg.stats_bits, cfg.stats_group_size)[3][:, 0]
            scale, zero = scale.double(), zero.double()
        q = torch.clamp(torch.round(w[:, j] / scale + zero), 0, maxq)
        out[:, j] = scale * (q - zero)
        err = (w[:, j] - out[:, j]) / u[j, j]
        w[:, j + 1 :] -= err[:, None] * u[j, j + 1 :][None, :]
    return out[:, torch.argsort(perm)].float()


@pytest.mark.parametrize("group_size", [16, 12, 64])
def test_sweep_matches_textbook_gptq(problem, group_size):
    """The lazy-block sweep (128-column blocks, sub-blocks, transposed layout) computes what the one-column-at-a-time
    algorithm computes: the same dequantized weights up to float rounding flipping a few codes."""
    w, x, h = problem
    cfg = SpQRConfig(bits=3, group_size=group_size, outlier_threshold=INF, blocksize=64)
    got = spqr_quantize_matrix(w, h, cfg).weight
    ref = _textbook_gptq(w, h, cfg)
    same = (got - ref).abs() <= 1e-4 * w.abs().max()
    assert same.float().mean() > 0.98, same.float().mean()
    assert out_err(w, x, got) == pytest.approx(out_err(w, x, ref), rel=0.02)
    assert out_err(w, x, got) < 0.8 * out_err(w, x, spqr_quantize_matrix(w, None, cfg).weight)  # feedback matters
