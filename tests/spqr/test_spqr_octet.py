"""The SpQR octet kernels (``kernels.spqr_octet``): the layout, checked on the CPU by emulating the kernel's register
mapping (lane (g, t) of a warp owns weight row g of the octet and the 16-column slice t of a step; the B fragments
of the step's four ``mma`` and the A fragments in the activations' shared-memory order), and the kernels themselves
on a GPU against the PyTorch reference."""

import pytest
import torch
from hf_effllm.kernels.spqr import spqr_matmul_reference
from hf_effllm.kernels.spqr_octet import (
    gemv_launch,
    octet_layout,
    octet_supported,
    smem_bytes,
    split_plan,
    split_smem_bytes,
    spqr_octet_dequant,
    spqr_octet_gemv,
    spqr_octet_split,
    spqr_octet_stream,
)

from hf_effllm import HfEffllmError
from hf_effllm.quant.spqr import dequantize_weight
from hf_effllm.testing import spqr_layer as make_layer


def emulate_weight(lay, outliers=True):
    """The weight (out, in) in stored order as ``decode_step`` produces it: word h of lane (g, t) holds column
    ``16 t + 8 h + 2 p + odd`` at bits ``4 p + 16 odd``; the statistics byte is ``scale | zero << 4``; the second
    level (scale step, zero step, scale minimum, zero minimum) is per 16-row block, step and slice t."""
    no, ks = lay["no"], lay["ks"]
    words = lay["codes"].view(no, ks, 8, 4, 2).long() & 0xFFFFFFFF  # octet, step, g, t, h
    byte = lay["stats"].view(no, ks, 8, 4).long()
    s2 = lay["stats2"].view(-1, ks, 4, 4).float()[torch.arange(no) // 2]  # octet, step, t, 4
    s = s2[..., 0][:, :, None, :] * (byte & 15) + s2[..., 2][:, :, None, :]  # octet, step, g, t
    z = s2[..., 1][:, :, None, :] * (byte >> 4) + s2[..., 3][:, :, None, :]
    w = torch.zeros(no, 8, ks, 4, 16)
    for h in range(2):
        for p in range(4):
            for odd in range(2):
                q = (words[..., h] >> (4 * p + 16 * odd)) & 15  # octet, step, g, t
                w[:, :, :, :, 8 * h + 2 * p + odd] = (s * (q - z)).permute(0, 2, 1, 3)
    w = w.reshape(no * 8, ks * 64)[: lay["n"], : lay["k"]]
    if outliers:
        w.index_put_((lay["orow"].long(), lay["oc"].long()), lay["ov"].float(), accumulate=True)
    return w


def xs_index(m, c, rsb):
    """The kernel's ``xs_index``: half index of activation (row m, stored column c) in shared memory."""
    s, t, q, e = c >> 6, (c >> 4) & 3, (c >> 2) & 3, (c >> 1) & 1
    return (m & 7) * (rsb >> 1) + ((s * 16 + q * 4 + t) * 4 + e * 2 + (m >> 3)) * 2 + (c & 1)


def emulate_gemv(x, lay):
    """``x @ W^T`` the kernel's way: activations in the shared-memory order, per (step, mma q, lane t) the A fragment
    {x[g][c, c+1], x[g+8][c, c+1], x[g][c+2, c+3], x[g+8][c+2, c+3]} (c = 64 s + 16 t + 4 q) against the B fragment
    b[q] = weights at (4 q, 4 q + 1) and (4 q + 2, 4 q + 3) of the slice; the outliers from the octet lists."""
    m, k = x.shape
    ks, n = lay["ks"], lay["n"]
    kp, rsb = ks * 64, ks * 256 + 64
    xp = x[:, lay["perm_long"]] if "perm_long" in lay else x
    smem = torch.zeros(min(m, 8) * rsb // 2 + 8 * 4 * kp)
    for row in range(m):
        for c in range(k):
            smem[xs_index(row, c, rsb)] = xp[row, c]
    w = emulate_weight(lay, outliers=False)
    wp = torch.zeros(n, kp)
    wp[:, :k] = w
    y = torch.zeros(m, n)
    for s in range(ks):
        for q in range(4):
            for t in range(4):
                c = 64 * s + 16 * t + 4 * q
                base = (s * 16 + q * 4 + t) * 8  # 16 bytes = 8 halves
                for row in range(m):
                    p = (row & 7) * (rsb // 2) + base + 2 * (row >> 3)
                    a = smem[[p, p + 1, p + 4, p + 5]]  # x[row][c, c+1] and x[row][c+2, c+3]
                    y[row] += wp[:, c : c + 4] @ a
    ent = lay["oent"][: int(lay["optr"][-1])].long() & 0xFFFFFFFF
    cols = ent & 0xFFFF
    vals = (ent >> 16).to(torch.int16).view(torch.float16).float()
    rows = torch.repeat_interleave(torch.arange(n), (lay["optr"][1:] - lay["optr"][:-1]).long())
    y.index_put_(
        (torch.arange(m)[:, None].expand(m, cols.numel()), rows[None, :].expand(m, cols.numel())),
        vals[None, :] * xp[:, cols],
        accumulate=True,
    )
    return y


def outlier_matrix(rows, cols, vals, n, k):
    w = torch.zeros(n, k, dtype=torch.float64)
    w.index_put_((rows, cols), vals.double(), accumulate=True)
    return w


def csr_outliers(lay):
    """The outliers of the CSR copy (``oent``/``optr``) as a dense (out, in) matrix in stored order."""
    nnz = int(lay["optr"][-1])
    ent = lay["oent"][:nnz].long() & 0xFFFFFFFF
    rows = torch.repeat_interleave(torch.arange(lay["n"]), (lay["optr"][1:] - lay["optr"][:-1]).long())
    vals = (ent >> 16).to(torch.int16).view(torch.float16)
    return outlier_matrix(rows, ent & 0xFFFF, vals, lay["n"], lay["k"])


def stream_outliers(lay):
    """The same from the step-sorted copy (``sent``/``sptr``) that ``spqr_octet_stream`` reads: entry ``column in
    step | row in octet << 6 | (step mod 128) << 9 | fp16 << 16``, ``sptr`` the first entry of each (octet, step)."""
    no, ks, sptr = lay["no"], lay["ks"], lay["sptr"].long()
    nnz = int(sptr[-1])
    assert lay["sent"].numel() % 4 == 0 and not lay["sent"][nnz:].any()  # padded for 16-byte copies
    item = torch.repeat_interleave(torch.arange(no * ks), sptr[1:] - sptr[:-1])
    ent = lay["sent"][:nnz].long() & 0xFFFFFFFF
    step = item % ks
    assert torch.equal((ent >> 9) & 127, step % 128)
    rows = (item // ks) * 8 + ((ent >> 6) & 7)
    vals = (ent >> 16).to(torch.int16).view(torch.float16)
    return outlier_matrix(rows, step * 64 + (ent & 63), vals, lay["n"], lay["k"])


def _cdiv(a, b):
    return -(-a // b)


def _stage_end(ib, ie, ks, j, u):
    """The kernels' ``stage_end``: the item after stage ``j`` of a warp with items [ib, ie), ``ks`` steps per octet,
    stages of up to ``u`` steps of one octet."""
    o1end = min(ie, (ib // ks + 1) * ks)
    f = o1end - ib
    n1 = _cdiv(f, u)
    if j < n1:
        return ib + min((j + 1) * u, f)
    spo, jj = _cdiv(ks, u), j - n1
    return min(ie, o1end + (jj // spo) * ks + min((jj % spo + 1) * u, ks))


def emulate_split(x, lay, *, warps, stage_steps, blocks, chunk_steps=None, rows=None):
    """``x @ W^T`` the way ``spqr_octet_split`` partitions it (float64): the plan's chunks and blocks, each block's
    (octet, step of the chunk) items split over its warps, each warp's stages with the outlier range the producer
    reads from ``sptr`` (chunk items mapped to layer items), and per step the entries whose step field matches
    added to the decoded weights (the correction tile). Also checks that every (octet, step) is computed once."""
    m, k = x.shape
    ks, no, n = lay["ks"], lay["no"], lay["n"]
    chunks, kc, grid = split_plan(rows or m, ks, no, warps, stage_steps, 2, blocks, 1 << 40, chunk_steps)
    per_chunk = grid // chunks
    xp = torch.zeros(m, ks * 64, dtype=torch.float64)
    xp[:, :k] = (x[:, lay["perm_long"]] if "perm_long" in lay else x).double()
    base = torch.zeros(no * 8, ks * 64, dtype=torch.float64)
    base[:n, :k] = emulate_weight(lay, outliers=False).double()
    sptr = lay["sptr"].long()
    sent = lay["sent"].long() & 0xFFFFFFFF
    y = torch.zeros(m, no * 8, dtype=torch.float64)
    seen = torch.zeros(no, ks, dtype=torch.int64)
    for b in range(grid):
        c, bb = b // per_chunk, b % per_chunk
        soff = c * kc
        ksc = min(kc, ks - soff)
        ob0, ob1 = bb * no // per_chunk, (bb + 1) * no // per_chunk
        if ob0 == ob1 or ksc <= 0:
            continue
        b0, tb = ob0 * ksc, (ob1 - ob0) * ksc
        for w in range(warps):
            ib, ie = b0 + w * tb // warps, b0 + (w + 1) * tb // warps
            if ib >= ie:
                continue
            j = 0
            for o in range(ib // ksc, (ie - 1) // ksc + 1):
                s_begin = ib % ksc if o == ib // ksc else 0
                s_end = min(ksc, ie - o * ksc)
                for s0 in range(s_begin, s_end, stage_steps):
                    st_b = ib if j == 0 else _stage_end(ib, ie, ksc, j - 1, stage_steps)
                    st_e = _stage_end(ib, ie, ksc, j, stage_steps)
                    assert (st_b, st_e) == (o * ksc + s0, o * ksc + min(s0 + stage_steps, s_end))
                    g_b, g_l = (
                        (st_b // ksc) * ks + soff + st_b % ksc,
                        ((st_e - 1) // ksc) * ks + soff + (st_e - 1) % ksc,
                    )
                    lo, hi = int(sptr[g_b]), int(sptr[g_l + 1])  # chunk items -> layer items (GITEM)
                    ents = sent[lo:hi]
                    for u in range(min(stage_steps, s_end - s0)):
                        step = soff + s0 + u
                        seen[o, step] += 1
                        wt = base[o * 8 : o * 8 + 8, step * 64 : step * 64 + 64].clone()
                        e = ents[((ents >> 9) & 127) == step % 128]
                        vals = (e >> 16).to(torch.int16).view(torch.float16).double()
                        wt[(e >> 6) & 7, e & 63] += vals
                        y[:, o * 8 : o * 8 + 8] += xp[:, step * 64 : step * 64 + 64] @ wt.T
                    j += 1
    assert torch.equal(seen, torch.ones_like(seen))
    return y[:, :n]


@pytest.mark.parametrize(
    ("out", "inp", "warps", "stage_steps", "blocks", "chunk_steps"),
    [(37, 46, 4, 2, 3, None), (300, 1000, 16, 8, 5, 4), (300, 1000, 3, 3, 7, 5), (40, 2048, 6, 1, 4, 3),
     (4000, 128, 2, 2, 9, 1)],
)  # fmt: skip
def test_split_partition_and_outlier_selection_give_the_product(out, inp, warps, stage_steps, blocks, chunk_steps):
    """spqr_octet_split's work partition, emulated on the CPU: chunks x blocks x warps x stages cover every (octet,
    step) once, and the entries the producer's ranges and the step test pick are exactly the step's outliers."""
    layer, _ = make_layer(out, inp, bits=3)
    t, meta = layer.packed_tensors(), layer.packed_meta()
    lay = octet_layout(t, **meta)
    x = torch.randn(3, inp)
    ref = spqr_matmul_reference(x, t, **meta).double()
    y = emulate_split(x, lay, warps=warps, stage_steps=stage_steps, blocks=blocks, chunk_steps=chunk_steps)
    torch.testing.assert_close(y, ref, rtol=0, atol=2e-3 * ref.abs().max().item())


def _tile_pos(tile):
    """spqr_octet_split's TILE_POS macro for ``tile``, taken from the rendered source and evaluated in Python."""
    import re

    from hf_effllm.kernels import spqr_octet

    old = spqr_octet._SPLIT_TILE
    try:
        spqr_octet._SPLIT_TILE = tile
        src = spqr_octet.octet_source(warps=4, hi=True, bf16=False, split=True)
    finally:
        spqr_octet._SPLIT_TILE = old
    active = re.search(r"#if TILE_IL\n#define TILE_POS\(en\) (.*)\n#else\n#define TILE_POS\(en\) (.*)\n#endif", src)
    il = re.search(r"#define TILE_IL (\d)", src).group(1) == "1"
    expr = re.sub(r"(\d+)u\b", r"\1", active.group(1 if il else 2))
    return lambda en: eval(expr, {"en": en})  # noqa: S307 (the kernel's own macro text)


@pytest.mark.parametrize("tile", ["lane", "interleaved"])
def test_split_correction_tile_puts_each_entry_where_its_lane_reads_it(tile):
    """Entry (row, column of the step) -> tile half (TILE_POS); lane (g, t) reads halves [16 lane, 16 lane + 16)
    (lane-major) or [8 lane, 8 lane + 8) and [256 + 8 lane, 256 + 8 lane + 8) (interleaved) as its 16 B-fragment
    halves, i.e. columns 16 t .. 16 t + 15 of row g in order: a bijection that hands every entry to its lane."""
    pos = _tile_pos(tile)
    seen = set()
    for row in range(8):
        for col in range(64):
            en = col | (row << 6) | (37 << 9)  # the step and value bits above must not matter
            p = pos(en)
            assert 0 <= p < 512 and p not in seen
            seen.add(p)
            lane, c16 = (row * 64 + col) // 16, col % 16
            if tile == "lane":
                assert p == 16 * lane + c16
            else:
                assert p == (256 if c16 >= 8 else 0) + 8 * lane + c16 % 8
    assert len(seen) == 512
    with pytest.raises(HfEffllmError, match="_SPLIT_TILE"):
        _tile_pos("diagonal")


def test_split_plan_takes_the_fewest_chunks_that_fit():
    # the default launch (16 warps, 3 stages of 4 steps) on a 227 KiB GPU: 16 rows of 4096 inputs (64 steps) in two
    # chunks of 32 steps, of 11008 inputs (172 steps) in six of 29; 4 rows of 4096 in one
    limit = 227 * 1024 - 256
    assert split_plan(16, 64, 1376, 16, 4, 3, 132, limit) == (2, 32, 132)
    assert split_plan(16, 172, 512, 16, 4, 3, 132, limit) == (6, 29, 132)
    assert split_plan(4, 64, 1376, 16, 4, 3, 132, limit) == (1, 64, 132)
    assert split_plan(16, 10, 7, 4, 2, 2, 4, limit, chunk_steps=3) == (4, 3, 4)  # 3 + 3 + 3 + 1 steps
    assert split_plan(16, 5, 7, 4, 2, 2, 4, limit, chunk_steps=2) == (3, 2, 3)
    assert split_smem_bytes(16, 32, 16, 4, 3, 11) <= limit < split_smem_bytes(16, 33, 16, 4, 3, 11)
    assert split_plan(16, 64, 1376, 16, 8, 2, 132, limit) is None  # 8-step stages' tiles leave no room for 16 rows
    assert split_plan(4, 64, 1376, 8, 8, 2, 132, limit) is not None  # with 8 warps they fit


def test_gemv_launch_keeps_large_layers_and_gives_small_ones_one_round_per_block():
    # large layers (4096 -> 11008, 11008 -> 4096, 4096 -> 4096 on 132 SMs): the launch measured before, unchanged
    for octets, steps in ((1376, 64), (512, 172), (512, 64), (397, 9)):
        assert gemv_launch(octets, steps, 132) == (16, 4, 4, 1)
    # SmolLM2-135M's shapes: the fastest launches of benchmarks/results/spqr_gemv_small.md
    assert gemv_launch(24, 9, 132) == (8, 8, 2, 1)  # 576 -> 192
    assert gemv_launch(72, 9, 132) == (8, 8, 2, 1)  # 576 -> 576
    assert gemv_launch(192, 9, 132) == (16, 8, 2, 1)  # 576 -> 1536: two octets per block
    assert gemv_launch(72, 24, 132) == (16, 16, 2, 1)  # 1536 -> 576
    for octets in (1, 2, 7, 131, 132, 133, 263, 264, 265, 396, 1000):
        for steps in (1, 2, 3, 9, 16, 17, 64):
            warps, per_octet, depth, blocks_per_sm = gemv_launch(octets, steps, 132)
            per_block = warps // per_octet
            assert warps % per_octet == 0 and 1 <= warps <= 16 and 1 <= depth <= 4 and blocks_per_sm == 1
            assert per_block in (1, 2, 4) and per_octet & (per_octet - 1) == 0  # powers of two
            if octets > 2 * 132:  # large: the launch measured on 4096- and 11008-feature layers
                assert (warps, per_octet, depth) == (16, 4, 4)
            else:  # one round per block, no warp without a step
                assert -(-octets // per_block) <= 132 and per_octet <= steps


LAYOUT_CASES = [
    (37, 46, 3, 16, "act_order"),  # partial octet and step
    (16, 64, 4, 16, "identity"),  # exact
    (21, 130, 2, 32, "act_order"),  # groups of two slices, three steps
    (40, 200, 3, 64, "identity"),
]


@pytest.mark.parametrize(("out", "inp", "bits", "gs", "perm"), LAYOUT_CASES)
def test_octet_layout_decodes_to_the_reference_weight(out, inp, bits, gs, perm):
    layer, res = make_layer(out, inp, bits=bits, group_size=gs, permutation=perm)
    t, meta = layer.packed_tensors(), layer.packed_meta()
    lay = octet_layout(t, **meta)
    wref = dequantize_weight(t, **meta)
    # the outlier corrections are re-centred (codes under them set near the zero-point): equal up to fp16 rounding
    torch.testing.assert_close(emulate_weight(lay), wref, rtol=0, atol=1e-3 * wref.abs().max().item())
    x = torch.randn(3, inp)
    ref = spqr_matmul_reference(x, t, **meta)
    torch.testing.assert_close(emulate_gemv(x, lay), ref, rtol=0, atol=5e-3 * ref.abs().max().item())
    assert torch.equal(stream_outliers(lay), csr_outliers(lay))
    if perm == "act_order":
        assert res.nnz > 0 and lay["optr"][-1].item() == res.nnz
    nnz = lay["optr"][-1].item()
    assert lay["oent"].numel() == -(nnz // -4) * 4 and not lay["oent"][nnz:].any()  # padded for 16-byte copies


def test_octet_layout_with_stats_blocks_of_32_rows_and_16_activation_rows():
    from hf_effllm import SpQRConfig
    from hf_effllm.quant.spqr import SpQRLinear, spqr_quantize_matrix

    g = torch.Generator().manual_seed(1)
    w = torch.randn(50, 96, generator=g)
    cfg = SpQRConfig(bits=3, stats_group_size=32, permutation="identity", outlier_threshold=0.1)
    res = spqr_quantize_matrix(w, torch.eye(96), cfg)
    layer = SpQRLinear.from_packed(res.tensors, cfg, in_features=96, bias=None)
    t, meta = layer.packed_tensors(), layer.packed_meta()
    lay = octet_layout(t, **meta)
    wref = dequantize_weight(t, **meta)
    torch.testing.assert_close(emulate_weight(lay), wref, rtol=0, atol=1e-3 * wref.abs().max().item())
    x = torch.randn(13, 96)  # rows 8-12 travel in the high halves of the row pairs
    ref = spqr_matmul_reference(x, t, **meta)
    torch.testing.assert_close(emulate_gemv(x, lay), ref, rtol=0, atol=5e-3 * ref.abs().max().item())


def test_shared_memory_order_is_a_bijection_with_conflict_free_quarter_warps():
    ks = 3
    rsb = ks * 256 + 64
    seen = {xs_index(m, c, rsb) for m in range(16) for c in range(ks * 64)}
    assert len(seen) == 16 * ks * 64
    # one 16-byte fragment load per lane: the 8 lanes of a quarter-warp (g = 0, 1; t = 0..3) touch 32 distinct banks
    for s in range(ks):
        for q in range(4):
            banks = set()
            for g in range(2):
                for t in range(4):
                    byte = g * rsb + (s * 16 + q * 4 + t) * 16
                    banks.update((byte // 4 + i) % 32 for i in range(4))
            assert len(banks) == 32
    assert smem_bytes(1, 172, 16, 16) == 172 * 256 + 64 + 16 * 8 * 4


def test_formats_and_inputs_the_octet_kernels_refuse():
    kw = dict(in_features=64, group_size=16, stats_bits=3, stats_group_size=16)
    assert "bits=6" in octet_supported(bits=6, **kw)
    assert "stats_bits=5" in octet_supported(bits=3, **{**kw, "stats_bits": 5})
    assert "multiples of 16" in octet_supported(bits=3, **{**kw, "group_size": 8})
    assert "odd" in octet_supported(bits=3, **{**kw, "in_features": 63})
    assert "65536" in octet_supported(bits=3, **{**kw, "in_features": 70000})
    assert octet_supported(bits=3, **kw) is None
    layer, _ = make_layer(16, 40, bits=6)
    with pytest.raises(HfEffllmError, match="bits=6"):
        octet_layout(layer.packed_tensors(), **layer.packed_meta())
    ok, _ = make_layer(16, 40)
    lay = octet_layout(ok.packed_tensors(), **ok.packed_meta())
    with pytest.raises(HfEffllmError, match="float32"):
        spqr_octet_gemv(torch.zeros(1, 40), lay)
    with pytest.raises(HfEffllmError, match="expects 40"):
        spqr_octet_gemv(torch.zeros(1, 41, dtype=torch.float16), lay)
    with pytest.raises(HfEffllmError, match="17 rows"):
        spqr_octet_gemv(torch.zeros(17, 40, dtype=torch.float16), lay)
    with pytest.raises(HfEffllmError, match="float32"):
        spqr_octet_dequant(lay, torch.float32)
    with pytest.raises(HfEffllmError, match="compute capability 9.0"):
        spqr_octet_stream(torch.zeros(1, 40, dtype=torch.float16), lay)
    with pytest.raises(HfEffllmError, match="spqr_octet_split needs a CUDA GPU"):
        spqr_octet_split(torch.zeros(40, 40, dtype=torch.float16), lay)  # any number of rows
    with pytest.raises(HfEffllmError, match="expects 40"):
        spqr_octet_split(torch.zeros(1, 41, dtype=torch.float16), lay)


def test_stream_breakdown_switches_only_enter_the_source_when_set(monkeypatch):
    """spqr_speed --stream-breakdown compiles phases of spqr_octet_stream out through _SKIP; by default the source
    has none, and each switch set becomes one #define that the source tests."""
    from hf_effllm.kernels import spqr_octet

    default = spqr_octet.octet_source(warps=16, hi=False, bf16=True, stage_steps=8, stages=2)
    assert "#define SKIP" not in default and "{SKIP}" not in default
    monkeypatch.setattr(spqr_octet, "_SKIP", frozenset({"compute", "fixup"}))
    src = spqr_octet.octet_source(warps=16, hi=False, bf16=True, stage_steps=8, stages=2)
    assert "#define SKIP_COMPUTE 1" in src and "#define SKIP_FIXUP 1" in src and "#define SKIP_OUTLIERS" not in src
    for name in ("SKIP_COMPUTE", "SKIP_OUTLIERS", "SKIP_FIXUP", "SKIP_ONECOPY"):
        assert f"#ifndef {name}" in default or f"#ifdef {name}" in default


def test_cuda_path_prefers_the_octet_kernel_where_it_runs_in_one_launch(monkeypatch):
    from hf_effllm.kernels import spqr, spqr_octet
    from hf_effllm.kernels.spqr import cuda_path

    monkeypatch.setattr(spqr_octet, "smem_limit", lambda device: 232448)  # the H200's opt-in limit
    meta = dict(in_features=4096, bits=3, group_size=16, stats_bits=3, stats_group_size=16)
    dev = torch.device("cpu")
    assert [cuda_path(r, meta, dev) for r in (1, 8, 16, 40)] == ["octet"] * 4
    wide = {**meta, "in_features": 11008}  # 16 rows of 11008 inputs need 352 KB: the other kernel, one launch
    assert [cuda_path(r, wide, dev) for r in (1, 5, 6, 16, 17)] == ["octet", "octet", "cuda", "cuda", "octet"]
    assert cuda_path(1, {**meta, "bits": 6}, dev) == "cuda"
    # the streaming kernel: 1-2 rows of layers with >= 4096 inputs and one side >= twice the other, on sm_90+
    assert [cuda_path(r, meta, dev, out_features=11008) for r in (1, 2, 3)] == ["octet"] * 3  # no bulk copies
    monkeypatch.setattr(spqr, "_bulk_copies", lambda device: True)
    assert [cuda_path(r, meta, dev, out_features=11008) for r in (1, 2, 3)] == ["stream", "stream", "split"]
    assert [cuda_path(r, meta, dev, out_features=4096) for r in (1, 3, 7, 8)] == ["octet"] * 3 + ["flat"]
    assert [cuda_path(r, wide, dev, out_features=4096) for r in (1, 2, 3)] == ["stream", "stream", "split"]
    # on sm_90+ the chunked kernel takes 3-7 rows of >= 8192 inputs or outputs and spqr_octet_flat 8 rows and more
    # (prefill, > 16 rows, dequantizes from the same layout)
    assert [cuda_path(r, meta, dev) for r in (1, 3, 7, 8, 16, 40)] == ["octet"] * 3 + ["flat"] * 3
    assert [cuda_path(r, wide, dev) for r in (1, 2, 3, 7, 8, 16, 17)] == ["octet"] * 2 + ["split"] * 2 + ["flat"] * 3
    assert cuda_path(1, meta, dev, out_features=4096) == "octet"
    assert cuda_path(1, meta, dev, out_features=6144) == "octet"
    assert cuda_path(1, {**meta, "in_features": 2048}, dev, out_features=8192) == "octet"
    assert cuda_path(1, meta, dev) == "octet"  # out_features unknown


GPU_CASES = [
    (37, 46, 1, 3, 16, "act_order"),
    (64, 256, 3, 4, 16, "identity"),
    (21, 130, 8, 2, 32, "act_order"),
    (50, 202, 9, 3, 16, "act_order"),
    (300, 1000, 16, 3, 16, "act_order"),
    (4000, 128, 2, 3, 16, "act_order"),  # 500 octets of 2 steps: whole octets per warp of the stream kernel
]


# launches of each decode kernel: spqr_octet_gemv (warps, per_octet, depth, blocks_per_sm) and spqr_octet_stream
# (warps, stage_steps, stages, blocks_per_sm: one warp per block gives several whole octets per warp; 16 warps on
# the larger cases split each octet over many warps; 1-step stages take an octet's outliers in several runs)
GEMV_CONFIGS = [(16, 16, 4, 1), (8, 4, 2, 2), (4, 1, 1, 3), (32, 8, 8, 1), (6, 3, 3, 1)]
STREAM_CONFIGS = [(16, 4, 4, 1), (8, 2, 2, 2), (4, 1, 3, 1), (1, 2, 2, 1), (6, 3, 5, 1), (32, 8, 2, 1)]
# spqr_octet_split: (warps, stage_steps, stages, blocks_per_sm, chunk_steps): one chunk and several, 1-step stages
SPLIT_CONFIGS = [(16, 4, 3, 1, None), (8, 2, 2, 2, 1), (4, 1, 3, 1, 2), (1, 8, 2, 1, None), (6, 3, 5, 1, 3),
                 (32, 2, 2, 1, 5)]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["gemv", "stream", "split"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("out", "inp", "rows", "bits", "gs", "perm"), GPU_CASES)
def test_octet_decode_kernels_match_reference(out, inp, rows, bits, gs, perm, dtype, kernel, monkeypatch, octet_case):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from hf_effllm.kernels import spqr_octet

    monkeypatch.setattr(spqr_octet, "_SPLIT_TILE", spqr_octet._SPLIT_TILE)  # restored after the test
    layer, t, meta, lay, x, ref = octet_case(out, inp, rows, bits, gs, perm, dtype)
    wref = dequantize_weight(t, **meta)
    base = emulate_weight({k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in lay.items()}, outliers=False)
    # each weight is decoded in fp16: its code's value rounded, plus the correction. In degenerate groups the base
    # can far exceed the weight (row 21 of the last case decodes to -620 under its outliers), so the bound follows it
    bound = 2.0**-10 * (base.abs() + wref.abs().cpu()) + 1e-3 * wref.abs().max().item()
    xs = x.float().index_select(-1, lay["perm_long"]) if "perm_long" in lay else x.float()  # stored order
    slack = xs.abs().cpu() @ bound.T
    tol = 1e-2 if dtype == torch.float16 else 2e-2  # bf16 outputs round once more
    fn, names, configs = {
        "gemv": (spqr_octet_gemv, ("warps", "per_octet", "depth", "blocks_per_sm"), GEMV_CONFIGS),
        "stream": (spqr_octet_stream, ("warps", "stage_steps", "stages", "blocks_per_sm"), STREAM_CONFIGS),
        "split": (spqr_octet_split, ("warps", "stage_steps", "stages", "blocks_per_sm", "chunk_steps"), SPLIT_CONFIGS),
    }[kernel]
    if kernel == "split":  # both correction-tile orders (spqr_octet._SPLIT_TILE), each config
        configs = [(*c, tile) for tile in ("lane", "interleaved") for c in configs]
    for cfg in configs:
        launch = dict(zip(names, cfg))
        if kernel == "split":
            spqr_octet._SPLIT_TILE = cfg[-1]
        y = fn(x, lay, bias=layer.bias, **launch)
        assert y.dtype == dtype and y.shape == (rows, out)
        assert (y.float() - ref).norm() <= 5e-3 * ref.norm(), cfg
        err = (y.float() - ref).abs().cpu()
        assert (err <= tol * (ref.abs().cpu() + ref.abs().max().item()) + slack).all(), cfg
        if kernel != "gemv":  # shared octets (and chunks) are added in order: the same launch gives the same bits
            assert torch.equal(fn(x, lay, bias=layer.bias, **launch), y), cfg
    y3 = fn(x.view(rows, 1, inp), lay)
    assert y3.shape == (rows, 1, out)
    if kernel == "gemv":
        w = spqr_octet_dequant(lay, dtype)
        ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
        wbound = ulp * (base.abs() + wref.abs().cpu()) + 1e-3 * wref.abs().max().item()
        assert ((w.float() - wref).abs().cpu() <= wbound).all()


@pytest.mark.gpu
def test_stream_kernel_with_many_stages_per_warp():
    """Over 64 stages per warp: the stages' outlier ranges are read from sptr 32 stages at a time."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    layer, _ = make_layer(3000, 2048, bits=3)
    layer = layer.cuda()
    t, meta = layer.packed_tensors(), layer.packed_meta()
    lay = octet_layout(t, **meta)
    x = torch.randn(2, 2048, device="cuda", dtype=torch.float16)
    ref = spqr_matmul_reference(x.float(), t, bias=layer.bias, **meta)
    for warps, steps, stages in [
        (1, 1, 2),
        (2, 1, 3),
        (1, 2, 16),
    ]:  # 2-3 octets of 32 steps per 1-warp block: 64-96 stages
        y = spqr_octet_stream(x, lay, bias=layer.bias, warps=warps, stage_steps=steps, stages=stages, blocks_per_sm=1)
        assert (y.float() - ref).norm() <= 5e-3 * ref.norm(), (warps, steps, stages)


@pytest.mark.gpu
def test_spqr_linear_routes_rows_to_the_stream_split_and_flat_kernels():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs an sm_90 GPU")
    from hf_effllm.kernels.spqr import cuda_path

    from hf_effllm import SpQRConfig
    from hf_effllm.quant.spqr import SpQRLinear, spqr_quantize_matrix

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(8200, 4096, device="cuda", generator=g)
    w[torch.rand(w.shape, device="cuda", generator=g) < 0.01] *= 8
    cfg = SpQRConfig(bits=3, outlier_threshold=0.1)
    res = spqr_quantize_matrix(w, None, cfg)
    layer = SpQRLinear.from_packed(res.tensors, cfg, in_features=4096, bias=torch.randn(8200, device="cuda"))
    t, meta = layer.packed_tensors(), layer.packed_meta()
    for rows in (1, 2, 3, 8, 16):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        path = cuda_path(rows, meta, x.device, out_features=8200)
        assert path == {1: "stream", 2: "stream", 3: "split", 8: "flat", 16: "flat"}[rows]  # 8200 outputs: 3-7 split
        ref = spqr_matmul_reference(x.float(), t, bias=layer.bias, **meta)
        y = layer(x)
        assert y.dtype == torch.bfloat16 and (y.float() - ref).norm() <= 5e-3 * ref.norm(), rows
    # a layer with fewer than 8192 inputs and outputs keeps 3-7 rows on spqr_octet_gemv
    assert cuda_path(3, meta, x.device, out_features=4096) == "octet"


@pytest.mark.gpu
def test_octet_gemv_splits_rows_that_do_not_fit_shared_memory():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from hf_effllm.kernels.spqr_octet import rows_per_launch

    layer, _ = make_layer(24, 12000, bits=3)
    layer = layer.cuda()
    t, meta = layer.packed_tensors(), layer.packed_meta()
    per = rows_per_launch(12000, torch.device("cuda"))
    assert 0 < per < 16
    x = torch.randn(16, 12000, device="cuda", dtype=torch.bfloat16)
    ref = spqr_matmul_reference(x.float(), t, **meta)
    lay = octet_layout(t, **meta)
    for fn in (spqr_octet_gemv, spqr_octet_stream):
        y = fn(x, lay)
        assert (y.float() - ref).norm() <= 5e-3 * ref.norm(), fn.__name__


@pytest.mark.gpu
@pytest.mark.parametrize("tile", ["lane", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_kernel_with_outliers_beyond_a_stage_capacity(dtype, tile, monkeypatch):
    """2 bits at threshold 0.02: about 290 outliers per 512-weight step, far over the 16 per step a ring stage
    holds, so most entries are read from global memory (and over the lanes' registers). So few weights are left in
    each group that its statistics degenerate (decoded values up to ~7,600 under the corrections): every octet
    kernel decodes them in fp16 (5% off the fp32 product here), so the reference is spqr_octet_gemv, which adds
    the same outliers in fp32 after the mma."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from hf_effllm.kernels import spqr_octet

    monkeypatch.setattr(spqr_octet, "_SPLIT_TILE", tile)
    layer, _ = make_layer(64, 512, bits=2, threshold=0.02)
    layer = layer.cuda()
    t, meta = layer.packed_tensors(), layer.packed_meta()
    lay = octet_layout(t, **meta)
    assert int(lay["sptr"][-1]) > 64 * 512 // 4
    for rows in (5, 16):
        x = torch.randn(rows, 512, device="cuda", dtype=dtype)
        ref = spqr_octet_gemv(x, lay, bias=layer.bias).float()
        for warps, steps, stages, chunk in [(16, 4, 3, None), (4, 1, 2, 2), (3, 8, 3, 3)]:
            y = spqr_octet_split(
                x, lay, bias=layer.bias, warps=warps, stage_steps=steps, stages=stages, chunk_steps=chunk
            )
            tol = 2e-3 if dtype == torch.float16 else 1e-2  # two roundings of bf16 outputs
            assert (y.float() - ref).norm() <= tol * ref.norm(), (rows, warps, steps, stages, chunk)


@pytest.mark.gpu
def test_split_kernel_runs_16_rows_of_11008_inputs_in_chunks():
    """The down projection's input (11008: 172 steps) at 16 rows: the default launch's chunks of 16 steps (11 of
    them); 40 rows take three launches."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    layer, _ = make_layer(96, 11008, bits=3)
    layer = layer.cuda()
    t, meta = layer.packed_tensors(), layer.packed_meta()
    lay = octet_layout(t, **meta)
    for rows in (16, 40):
        x = torch.randn(rows, 11008, device="cuda", dtype=torch.bfloat16)
        ref = spqr_matmul_reference(x.float(), t, bias=layer.bias, **meta)
        y = spqr_octet_split(x, lay, bias=layer.bias)
        assert (y.float() - ref).norm() <= 5e-3 * ref.norm(), rows
        assert torch.equal(spqr_octet_split(x, lay, bias=layer.bias), y)


def test_split_timing_build_only_enters_the_source_when_set(monkeypatch):
    """spqr_speed --split-timing compiles clock64() timers and one more parameter into spqr_octet_split through
    _SPLIT_TIMING; by default the macros expand to nothing, and a timed launch without its buffer is refused."""
    from hf_effllm.kernels import spqr_octet

    plain = spqr_octet.octet_source(warps=16, hi=True, bf16=True, split=True)
    assert "#define SPLIT_TIMING 0" in plain
    monkeypatch.setattr(spqr_octet, "_SPLIT_TIMING", True)
    timed = spqr_octet.octet_source(warps=16, hi=True, bf16=True, split=True)
    assert "#define SPLIT_TIMING 1" in timed and timed.replace("SPLIT_TIMING 1", "SPLIT_TIMING 0") == plain
    monkeypatch.setattr(spqr_octet, "_SPLIT_TIMES", [])
    with pytest.raises(HfEffllmError, match="_SPLIT_TIMES"):
        spqr_octet._timing(16)
    monkeypatch.setattr(spqr_octet, "_SPLIT_TIMES", [torch.zeros(128, dtype=torch.int64)])
    assert len(spqr_octet._timing(16)) == 1  # 8 values per warp
    with pytest.raises(HfEffllmError, match="at least 256"):
        spqr_octet._timing(32)


def test_streaming_kernels_refuse_layers_past_their_32_bit_item_counts():
    """spqr_octet_stream / spqr_octet_split / spqr_octet_dequant count (octet, step) items in 32 bits (udiv32): the
    hosts refuse a layer whose counts could pass 2^32 instead of computing garbage."""
    from hf_effllm.kernels.spqr_octet import _check_index_range

    _check_index_range(11008 // 8, 4096 // 64, 132)  # a Llama MLP layer on the H200's grid
    _check_index_range(152064 // 8, 8192 // 64, 4224)  # a large vocabulary head, 32 blocks per SM
    with pytest.raises(HfEffllmError, match="32-bit item counts"):
        _check_index_range(2**20 // 8, 65536 // 64)
    with pytest.raises(HfEffllmError, match="grid 4096"):
        _check_index_range(2**20, 1, 4096)
