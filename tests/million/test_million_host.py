"""The host side of the CUDA path of ``million_attention`` on the CPU: the packed ``cuLaunchKernel`` parameters, the
memoized ``supports()`` / launch plan / tables, and a whole call through a fake GPU (the driver call replaced by a
Python kernel that reads its parameters the way the CUDA kernel does and writes the partials the Triton merge
reads)."""

from __future__ import annotations

import ctypes
import math
import struct
import threading
import types

import pytest
import torch
from hf_effllm.kernels import cuda_rt
from hf_effllm.kernels import million as km
from hf_effllm.kernels import million_cuda as mc
from hf_effllm.kernels.million import million_attention, million_attention_reference, pq_decode_reference

from hf_effllm.errors import HfEffllmError


def _read_params(argv, nptr: int, nint: int) -> tuple[list[int], list[int]]:
    """The parameter values as the driver reads them: pointer i at ``argv[i]``, int j at ``argv[nptr + j]``."""
    ptrs = [ctypes.c_uint64.from_address(argv[i]).value for i in range(nptr)]
    ints = [ctypes.c_int32.from_address(argv[nptr + j]).value for j in range(nint)]
    return ptrs, ints


class _Driver:
    """Stands in for ``cuLaunchKernel``: records each launch's arguments and parameter values (read at call time,
    as the driver copies them), then runs ``body`` (the fake kernel) if given."""

    def __init__(self, nptr: int, body=None, rc: int = 0):
        self.nptr, self.body, self.rc, self.launches = nptr, body, rc, []

    def __call__(self, func, gx, gy, gz, bx, by, bz, smem, stream, argv, extra):
        nint = len(argv) - self.nptr
        ptrs, ints = _read_params(argv, self.nptr, nint)
        self.launches.append(
            {"func": func, "grid": (gx, gy, gz), "block": (bx, by, bz), "smem": smem, "stream": stream,
             "ptrs": ptrs, "ints": ints, "extra": extra}
        )  # fmt: skip
        if self.body is not None:
            self.body(ptrs, ints)
        return self.rc


@pytest.fixture
def driver(monkeypatch):
    """A fake driver (``_Driver``) behind ``cuda_rt.launch``, stream handle 77."""

    def install(nptr: int, body=None, rc: int = 0) -> _Driver:
        drv = _Driver(nptr, body, rc)
        monkeypatch.setattr(cuda_rt, "_cu_launch_kernel", lambda: drv)
        monkeypatch.setattr(cuda_rt, "_current_stream", lambda: 77)
        return drv

    return install


def test_param_block_holds_each_value_at_its_address():
    """Pointers (8 bytes) then ints (4 bytes), each at the address its ``argv`` entry names; None is a null pointer;
    ints wrap to 32 bits like ``ctypes.c_int`` (the previous marshalling), non-integers still raise."""
    a, b = torch.zeros(3), torch.zeros(5, dtype=torch.uint8)
    block = cuda_rt._ParamBlock(3, 4)
    base = ctypes.addressof(block.buf)
    assert [block.argv[i] for i in range(7)] == [base, base + 8, base + 16, base + 24, base + 28, base + 32, base + 36]
    block.fill([a, None, b], [5, -7, 2**31 - 1, 0])
    assert _read_params(block.argv, 3, 4) == ([a.data_ptr(), 0, b.data_ptr()], [5, -7, 2**31 - 1, 0])
    block.fill([b, a, None], [2**31, -(2**31) - 1, 2**32 + 3, True])  # refilled: nothing of the last call is left
    assert _read_params(block.argv, 3, 4) == ([b.data_ptr(), a.data_ptr(), 0], [-(2**31), 2**31 - 1, 3, 1])
    assert [ctypes.c_int(i).value for i in (2**31, -(2**31) - 1, 2**32 + 3)] == [-(2**31), 2**31 - 1, 3]
    with pytest.raises(TypeError):
        block.fill([a, b, a], [1.5, 0, 0, 0])


def test_param_blocks_are_per_signature_and_thread():
    first = cuda_rt._param_block(9, 15)
    assert cuda_rt._param_block(9, 15) is first and cuda_rt._param_block(9, 14) is not first
    other = []
    t = threading.Thread(target=lambda: other.append(cuda_rt._param_block(9, 15)))
    t.start()
    t.join()
    assert other[0] is not first and len(other[0].argv) == len(first.argv) == 24


def test_launch_passes_the_packed_parameters_and_the_current_stream(driver):
    drv = driver(nptr=3)
    kernel = types.SimpleNamespace(func=ctypes.c_void_p(0xABC))
    x, y = torch.zeros(4), torch.zeros(2, dtype=torch.int32)
    cuda_rt.launch(kernel, (5, 6, 1), 256, 70000, [x, None, y], [3, -4])
    cuda_rt.launch(kernel, (1, 1, 1), 32, 0, [y, x, x], [9, 8])  # the same signature, new values
    cuda_rt.launch(kernel, (2, 1, 1), 64, 0, [x], [1, 2, 3, 4, 5])  # another signature (3 + ... read as 3 ptrs)
    first, second, third = drv.launches
    assert first["func"] is kernel.func and first["grid"] == (5, 6, 1) and first["block"] == (256, 1, 1)
    assert first["smem"] == 70000 and first["stream"] == 77 and first["extra"] is None
    assert (first["ptrs"], first["ints"]) == ([x.data_ptr(), 0, y.data_ptr()], [3, -4])
    assert (second["ptrs"], second["ints"]) == ([y.data_ptr(), x.data_ptr(), x.data_ptr()], [9, 8])
    # the third launch has 1 pointer and 5 ints: the driver stub reads 3 words as pointers, so check the raw block
    block = cuda_rt._param_block(1, 5)
    assert _read_params(block.argv, 1, 5) == ([x.data_ptr()], [1, 2, 3, 4, 5]) and third["grid"] == (2, 1, 1)


def test_launch_reports_a_driver_error(driver):
    driver(nptr=1, rc=700)
    with pytest.raises(HfEffllmError, match="CUDA error 700"):
        cuda_rt.launch(types.SimpleNamespace(func=ctypes.c_void_p(1)), (1, 1, 1), 32, 0, [torch.zeros(1)], [])


def test_programmatic_dependent_launch_goes_through_cu_launch_kernel_ex(driver, monkeypatch):
    """``pdl=True``: ``cuLaunchKernelEx`` with a CUlaunchConfig (grid, block, shared memory, stream) carrying one
    attribute, programmatic stream serialization (id 6) = 1, and the same packed parameters; where the driver has
    no ``cuLaunchKernelEx`` (or ``pdl=False``) the ordinary ``cuLaunchKernel``."""
    plain = driver(nptr=2)
    calls = []

    def ex(cfg_ptr, func, argv, extra):
        cfg = cfg_ptr._obj
        attr = cfg.attrs[0]
        value = ctypes.c_int.from_buffer_copy(bytes(attr)[8:12]).value
        calls.append(
            {"grid": (cfg.grid_x, cfg.grid_y, cfg.grid_z), "block": (cfg.block_x, cfg.block_y, cfg.block_z),
             "smem": cfg.smem, "stream": cfg.stream, "num_attrs": cfg.num_attrs, "attr": (attr.id, value),
             "func": func, "params": _read_params(argv, 2, 1), "extra": extra}
        )  # fmt: skip
        return 0

    monkeypatch.setattr(cuda_rt, "_cu_launch_kernel_ex", lambda: ex)
    kernel = types.SimpleNamespace(func=ctypes.c_void_p(0xDEF))
    x, y = torch.zeros(4), torch.zeros(3)
    cuda_rt.launch(kernel, (7, 2, 1), 128, 4096, [x, y], [11], pdl=True)
    assert ctypes.sizeof(cuda_rt._LaunchConfig) == 56 and ctypes.sizeof(cuda_rt._LaunchAttribute) == 72
    (call,) = calls
    assert call["grid"] == (7, 2, 1) and call["block"] == (128, 1, 1) and call["smem"] == 4096
    assert call["stream"] == 77 and call["num_attrs"] == 1 and call["attr"] == (6, 1) and call["extra"] is None
    assert call["func"] is kernel.func and call["params"] == ([x.data_ptr(), y.data_ptr()], [11])
    assert plain.launches == []
    cuda_rt.launch(kernel, (1, 1, 1), 32, 0, [x, y], [3])  # pdl=False: the ordinary launch
    monkeypatch.setattr(cuda_rt, "_cu_launch_kernel_ex", lambda: None)  # a driver without cuLaunchKernelEx
    cuda_rt.launch(kernel, (1, 1, 1), 32, 0, [x, y], [4], pdl=True)
    assert [c["ints"] for c in plain.launches] == [[3], [4]] and len(calls) == 1


def test_current_stream_uses_the_raw_getter_of_the_current_device(monkeypatch):
    asked = []
    monkeypatch.setattr(cuda_rt, "_RAW_STREAM", lambda index: asked.append(index) or 1234)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert cuda_rt._current_stream() == 1234 and asked == [3]
    monkeypatch.setattr(cuda_rt, "_RAW_STREAM", None)  # a torch without it: the Stream object's handle
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: types.SimpleNamespace(cuda_stream=99))
    assert cuda_rt._current_stream() == 99


@pytest.fixture
def fake_gpu(monkeypatch):
    """The CPU taken for an H200-like GPU by million_cuda (compute capability 9.0, 227 KiB of shared memory, 12 SMs),
    fresh memo tables (restored afterwards, so no answer given here outlives the test)."""
    monkeypatch.setattr(mc, "_on_gpu", lambda device: True)
    monkeypatch.setattr(mc, "capability", lambda device: (9, 0))
    monkeypatch.setattr(mc, "smem_limit", lambda device: 232448)
    monkeypatch.setattr(mc, "sm_count", lambda device: 12)
    monkeypatch.setattr(mc, "_SUPPORTS", {})
    monkeypatch.setattr(mc, "_PLANS", {})
    return monkeypatch


def _codes(b, h, n, m, *, cap=None, row=None, offset=0, seed=0):
    """(b, h, n, m) uint8 codes, optionally a view into a (b, h, cap, row) buffer starting ``offset`` bytes in."""
    gen = torch.Generator().manual_seed(seed)
    cap, row = cap or n, row or m
    flat = torch.randint(0, 256, (offset + b * h * cap * row,), generator=gen, dtype=torch.uint8)
    return flat[offset:].view(b, h, cap, row)[:, :, :n, :m]


def _as_codebook(table: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A word table of :func:`subspace_table` read back as the (G, M, K, DSUB) codebook."""
    return table.contiguous().view(like.dtype).reshape(like.shape)


def test_supports_memo_answers_as_the_uncached_check(fake_gpu):
    """A grid of inputs (dtype, D, DSUB, K, query rows, code strides and alignment) on two devices (shared memory,
    capability): the memoized answer is the uncached one, asked once per key (the second call is a hit)."""
    calls = []
    uncached = mc._supports
    fake_gpu.setattr(mc, "_supports", lambda *a: calls.append(1) or uncached(*a))
    grid = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for d, dsub, k in ((128, 2, 256), (64, 4, 256), (128, 8, 256), (128, 2, 16), (96, 2, 256)):
            for gq, lq in ((4, 1), (16, 1), (8, 3)):
                grid.append((dtype, d, dsub, k, gq, lq, {}))
    for layout in ({"cap": 40}, {"cap": 40, "offset": 3}, {"row": 72}, {"cap": 37, "row": 80}):
        grid.append((torch.float16, 128, 2, 256, 4, 1, layout))
    seen = set()
    for smem, cap in ((232448, (9, 0)), (100000, (9, 0)), (232448, (7, 5))):  # the device's properties
        fake_gpu.setattr(mc, "smem_limit", lambda device, smem=smem: smem)
        fake_gpu.setattr(mc, "capability", lambda device, cap=cap: cap)
        fake_gpu.setattr(mc, "_SUPPORTS", {})  # another device (index) in real use: other keys
        for dtype, d, dsub, k, gq, lq, layout in grid:
            q = torch.zeros(1, 2 * gq, lq, d, dtype=dtype)
            ck = _codes(1, 2, 32, d // dsub, **layout)
            cv = _codes(1, 2, 32, d // dsub, cap=layout.get("cap"))
            cb = torch.zeros(1, d // dsub, k, dsub, dtype=dtype)
            want = uncached(q, ck, cv, cb, gq, lq)
            n_calls = len(calls)
            assert mc.supports(q, ck, cv, cb, gq, lq) == want
            assert mc.supports(q, ck, cv, cb, gq, lq) == want and len(calls) == n_calls + 1
            seen.add(want if want is None else want.split(";")[0].split(" ")[0])
    assert None in seen and len(seen) >= 7  # taken, and refused for each of the reasons
    for part in ("q.dtype=torch.float32", "K=16,", "GQ", "codes_k", "it", "needs"):
        assert any(isinstance(w, str) and w.startswith(part) for w in seen), (part, seen)


def test_supports_key_follows_what_supports_reads():
    q = torch.zeros(1, 8, 1, 128, dtype=torch.float16)
    ck, cv = _codes(1, 2, 32, 64, cap=48), _codes(1, 2, 32, 64, cap=48)
    cb = torch.zeros(1, 64, 256, 2, dtype=torch.float16)
    base = mc.supports_key(q, ck, cv, cb, 4, 1)
    assert mc.supports_key(q, ck, cv, cb, 4, 1) == base
    assert mc.supports_key(q[:, :, :, :64], ck, cv, cb, 4, 1) != base  # head dim
    assert mc.supports_key(q.bfloat16(), ck, cv, cb, 4, 1) != base  # dtype
    assert mc.supports_key(q.to("meta"), ck, cv, cb, 4, 1) != base  # device
    assert mc.supports_key(q, ck, cv, cb[:, :, :16], 4, 1) != base  # codebook shape
    assert mc.supports_key(q, ck, cv, cb, 2, 2) != base  # query rows
    assert mc.supports_key(q, _codes(1, 2, 32, 64, cap=64), cv, cb, 4, 1) != base  # strides
    assert mc.supports_key(q, ck, _codes(1, 2, 32, 64, cap=48, offset=1), cb, 4, 1) != base  # alignment
    assert mc.supports_key(q, ck[:, :, :20], cv[:, :, :20], cb, 4, 1) == base  # the number of codes is not read


def test_subspace_and_lut_tables_never_go_stale():
    """The memoized tables follow in-place changes, a swapped ``.data`` and a replaced codebook; inference tensors
    (no version counter) are rebuilt on every call instead of memoized."""
    cb = torch.randn(2, 32, 256, 2).half()
    t1 = mc.subspace_table(cb)
    assert mc.subspace_table(cb) is t1 and t1.data_ptr() == cb.data_ptr()
    cb.mul_(2)  # in place: a new version
    t2 = mc.subspace_table(cb)
    assert t2 is not t1 and torch.equal(_as_codebook(t2, cb), cb)
    cb.data = torch.randn(2, 32, 256, 2).half()  # new storage, same tensor object
    t3 = mc.subspace_table(cb)
    assert t3.data_ptr() == cb.data_ptr() and torch.equal(_as_codebook(t3, cb), cb)
    strided = torch.randn(2, 256, 32, 2).half().transpose(1, 2)  # not contiguous: a copy, then a view of it
    assert torch.equal(_as_codebook(mc.subspace_table(strided), strided), strided)
    cv = torch.randn(1, 32, 256, 2).bfloat16()
    assert mc.lut_value_table(cv) is not None
    cv[0, 0, 0, 0] = 1e6  # beyond fp16 now: the range is checked again
    assert mc.lut_value_table(cv) is None
    with torch.inference_mode():
        inf = torch.randn(1, 32, 256, 2).half()
        assert torch.equal(_as_codebook(mc.subspace_table(inf), inf), inf)
        inf.mul_(3)
        assert torch.equal(_as_codebook(mc.subspace_table(inf), inf), inf)
        assert torch.equal(km._packed_table(inf)[0, 7, 3:4].view(torch.float16), inf[0, 3, 7])


def _partials_kernel(tensors: dict, scale: float, gq: int, lq: int, hkv: int, d: int):
    """A Python stand-in for the CUDA codes kernel: reads its 9 pointers and 15 ints like the kernel, checks them
    against the tensors it should get, and writes the per-split partials (natural-log max, sum, unnormalised
    output; 16 rows per (batch, KV head, split)) into the partial buffers at the given addresses."""

    def body(ptrs, ints):
        q, ck, cv, cbk, cbv, cm = (tensors[k] for k in ("q", "ck", "cv", "cbk", "cbv", "cm"))
        n, split_len, splits, scale_bits = ints[:4]
        assert ptrs[:3] == [q.data_ptr(), ck.data_ptr(), cv.data_ptr()]
        assert ptrs[3:5] == [t.data_ptr() for t in tensors["tables"]]
        assert ints[4:13] == [*q.stride()[:3], *ck.stride()[:3], *cv.stride()[:3]]
        assert struct.unpack("<f", struct.pack("<i", scale_bits))[0] == pytest.approx(scale, rel=1e-7)
        assert n == ck.shape[2] and (splits - 1) * split_len < n <= splits * split_len
        per_head = cbk.shape[0] > 1
        assert ints[13] == (tensors["tables"][0].stride(0) if per_head else 0)
        if cm is not None:  # the bool mask itself, no int8 copy
            assert ptrs[5] == cm.data_ptr() and ints[14] == cm.stride(0)
        b = q.shape[0]
        nrows = b * hkv * splits * 16
        raw = (ctypes.c_char * (nrows * (d + 2) * 4)).from_address(ptrs[6])
        po = torch.frombuffer(raw, dtype=torch.float32, count=nrows * d).view(nrows, d)
        pm = torch.frombuffer((ctypes.c_char * (nrows * 4)).from_address(ptrs[7]), dtype=torch.float32)
        pl = torch.frombuffer((ctypes.c_char * (nrows * 4)).from_address(ptrs[8]), dtype=torch.float32)
        kh = pq_decode_reference(ck, cbk).float()  # (B, Hkv, N, D)
        vh = pq_decode_reference(cv, cbv).float()
        po.fill_(float("nan"))  # what the merge must not read: rows past GQ * Lq are written empty below
        pm.fill_(float("-inf"))
        pl.zero_()
        for bi in range(b):
            for h in range(hkv):
                for sp in range(splits):
                    lo, hi = sp * split_len, min(n, (sp + 1) * split_len)
                    for row in range(gq * lq):
                        jh, li = row % gq, row // gq
                        part = ((bi * hkv + h) * splits + sp) * 16 + row
                        s = (q[bi, h * gq + jh, li].float() @ kh[bi, h, lo:hi].T) * scale
                        if cm is not None:
                            s = s.masked_fill(~cm[bi, lo:hi], float("-inf"))
                        mx = float(s.max())
                        if mx == float("-inf"):
                            po[part] = 0.0
                            continue
                        p = torch.exp(s - mx)
                        pm[part], pl[part], po[part] = mx, p.sum(), p @ vh[bi, h, lo:hi]
                    for row in range(gq * lq, 16):
                        po[((bi * hkv + h) * splits + sp) * 16 + row] = 0.0

    return body


@pytest.mark.parametrize("design", ["mma", "lut"])
def test_cuda_path_end_to_end_through_a_fake_gpu(triton_interpret, fake_gpu, driver, design):
    """``million_attention(variant=None)`` on a faked GPU takes the CUDA path: the codes kernel gets the right
    pointers, strides, splits and scale (checked by the stand-in kernel, which writes the partials into the one
    partial buffer), then the Triton merge (interpreted) adds the window; the result is the reference's. The
    launch plan is compiled once and reused by the second call; a bad warp count is still refused."""
    if triton_interpret != "cpu":
        pytest.skip("the fake GPU runs the merge kernel under the Triton interpreter (CPU-only machines)")
    b, hq, hkv, lq, n, r, d, m, g = 2, 4, 2, 1, 70, 5, 64, 32, 2
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(b, hq, lq, d, generator=gen).half()
    ck = _codes(b, hkv, n, m, cap=96, seed=1)  # views of a larger cache buffer, as the cache passes them
    cv = _codes(b, hkv, n, m, cap=96, seed=2)
    cbk = (torch.randn(g, m, 256, 2, generator=gen) * 0.5).half()
    cbv = torch.randn(g, m, 256, 2, generator=gen).half()
    rk, rv = torch.randn(b, hkv, r, d, generator=gen).half(), torch.randn(b, hkv, r, d, generator=gen).half()
    cm = torch.rand(b, n, generator=gen) > 0.3
    cm[1, :40] = False  # split 0 of batch 1 (split_len 32: 3 splits at 12 SMs / 4 blocks) is fully masked
    rm = torch.rand(b, lq, r, generator=gen) > 0.3
    rm[:, :, -1] = True
    fake_gpu.setattr(mc, "DESIGN", design)
    fake_gpu.setattr(mc, "MERGE", "triton")  # the CUDA merge: test_cuda_merge_through_a_fake_gpu_...
    compiled = []
    fake_gpu.setattr(mc, "compiled", lambda key, *a, **kw: compiled.append(key) or types.SimpleNamespace(func=1))
    tensors = {
        "q": q,
        "ck": ck,
        "cv": cv,
        "cbk": cbk,
        "cbv": cbv,
        "cm": cm,
        "tables": mc.kernel_tables(cbk, cbv, design),
    }
    drv = driver(nptr=9, body=_partials_kernel(tensors, d**-0.5, hq // hkv, lq, hkv, d))
    assert km._default_variant(q, ck, cv, cbk, hq // hkv, lq, None) == "cuda"
    ref = million_attention_reference(q.float(), ck, cv, cbk.float(), cbv.float(), rk.float(), rv.float(),
                                      scale=d**-0.5, code_mask=cm, res_mask=rm)  # fmt: skip
    for _ in range(2):
        out = million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=d**-0.5, code_mask=cm, res_mask=rm)
        assert out.dtype == torch.float16
        torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
    assert len(drv.launches) == 2 and len(compiled) == 1  # one compile (plan memo), two launches
    launch = drv.launches[0]
    warps = mc.num_warps(hq // hkv * lq, design)
    assert launch["grid"] == (b * hkv, 3, 1) and launch["block"] == (warps * 32, 1, 1) and launch["stream"] == 77
    assert launch["smem"] == mc.smem_bytes(d, m, warps, hq // hkv * lq, design)
    # rows of M bytes: "lut" compiles M in; the probability tile's layout is in the key
    assert compiled[0][-3:] == (design, m if design == "lut" else 0, mc.LUT_TILE)
    with pytest.raises(HfEffllmError, match="nwarps=17 is out of range"):
        million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=d**-0.5, variant="cuda", num_warps=17)


def test_launch_plan_key_and_per_call_checks(fake_gpu, driver):
    """million_codes_cuda compiles once per launch key (shape, dtype, design, mask, warps, code stride, device,
    probability tile) and still checks the partial buffer and the split count on every call."""
    compiled = []
    fake_gpu.setattr(mc, "compiled", lambda key, *a, **kw: compiled.append(key) or types.SimpleNamespace(func=1))
    drv = driver(nptr=9)
    q = torch.zeros(1, 4, 1, 128, dtype=torch.float16)
    ck, cv = _codes(1, 2, 64, 64), _codes(1, 2, 64, 64)
    cb = torch.zeros(1, 64, 256, 2, dtype=torch.float16)
    tk, tv = mc.kernel_tables(cb, cb)
    parts = torch.zeros(2 * 2 * 16 * 130)
    po, pm, pl = parts.split_with_sizes((2 * 2 * 16 * 128, 64, 64))

    def call(qq=q, mask=None, design="mma", nwarps=None, splits=2, part_o=po, codes=(ck, cv)):
        mc.million_codes_cuda(qq, *codes, tk, tv, mask, part_o, pm, pl, n=64, split_len=32, splits=splits,
                              scale=0.125, hkv=2, gq=2, lq=1, per_head=False, nwarps=nwarps, design=design)  # fmt: skip

    call()
    call()
    assert len(compiled) == 1 and len(drv.launches) == 2
    call(qq=q.bfloat16())
    call(mask=torch.ones(1, 64, dtype=torch.int8))
    call(design="lut")
    call(nwarps=4)
    assert len(compiled) == 5
    assert compiled[-2][-3:] == ("lut", 64, "padded")  # contiguous codes: "lut" compiles the token stride in
    strided = _codes(1, 2, 64, 64, row=80)  # rows of 80 bytes: the stride is read at run time
    call(design="lut", codes=(strided, strided))
    assert len(compiled) == 6 and compiled[-1][-3:] == ("lut", 0, "padded")
    fake_gpu.setattr(mc, "LUT_TILE", "t4zero")  # the probability tile's layout is compiled in: its own key
    call(design="lut")
    assert len(compiled) == 7 and compiled[-1][-3:] == ("lut", 64, "t4zero")
    assert drv.launches[0]["ints"][3] == struct.unpack("<i", struct.pack("<f", 0.125))[0]
    with pytest.raises(HfEffllmError, match="part_o holds"):
        call(part_o=po[:100])  # a hit of the plan memo: checked anyway
    with pytest.raises(HfEffllmError, match="splits=70000 exceeds"):
        call(splits=70000, part_o=torch.zeros(70000 * 2 * 16 * 128, dtype=torch.float32, device="meta"))
    with pytest.raises(HfEffllmError, match="design='lut' does not take"):
        mc.million_codes_cuda(q, ck, cv, tk, tv, None, po, pm, pl, n=64, split_len=32, splits=2, scale=0.1, hkv=1,
                              gq=8, lq=1, per_head=False, design="lut")  # fmt: skip


def test_million_attention_fast_checks_raise_the_same_messages():
    """Each input check still fires (through the one-by-one path) with its message; the valid call passes."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 16, generator=gen)
    ck = torch.randint(0, 16, (1, 2, 10, 8), generator=gen, dtype=torch.uint8)
    cb = torch.randn(1, 8, 16, 2, generator=gen)
    rk = torch.randn(1, 2, 3, 16, generator=gen)
    good = dict(q=q, codes_k=ck, codes_v=ck.clone(), codebook_k=cb, codebook_v=cb.clone(), res_k=rk, res_v=rk)
    cases = [
        (dict(q=q[0]), "q must be"),
        (dict(codes_v=ck.long()), "codes_v must be a uint8"),
        (dict(codes_v=ck[:, :, :5]), "codes_k .* and codes_v .* differ"),
        (dict(q=q.expand(2, -1, -1, -1)), "batch"),
        (dict(q=q[:, :3]), "not a multiple"),
        (dict(codebook_k=cb[0]), "codebook_k must be"),
        (dict(codebook_v=cb.long()), "codebook_v.dtype=torch.int64 is not supported"),
        (dict(codebook_v=cb[:, :, :8]), "codebook_k .* and codebook_v .* differ"),
        (dict(codebook_k=cb[:, :4], codebook_v=cb[:, :4]), "do not match codes"),
        (dict(codebook_k=cb.expand(3, -1, -1, -1), codebook_v=cb.expand(3, -1, -1, -1)), "3 groups"),
        (dict(res_v=None), "give both"),
        (dict(res_k=rk[:, :, :, :8], res_v=rk[:, :, :, :8]), "res_k/res_v must be"),
        (dict(res_k=rk[0], res_v=rk[0]), "res_k/res_v must be"),  # 3-D (an IndexError before)
        (dict(code_mask=torch.ones(1, 9, dtype=torch.bool)), "code_mask must be"),
        (dict(res_mask=torch.ones(1, 1, 2, dtype=torch.bool)), "res_mask must be"),
        (dict(codes_v=ck.to("meta")), "all inputs must be on q's device"),
        (dict(res_v=rk.to("meta")), "all inputs must be on q's device"),
        (dict(code_mask=torch.ones(1, 10, dtype=torch.bool, device="meta")), "all inputs must be on q's device"),
        (dict(q=q.long()), "q.dtype=torch.int64 is not supported"),
        (dict(codebook_k=cb.double(), codebook_v=cb.double()), "codebook_k.dtype=torch.float64 is not supported"),
        (dict(codebook_k=cb.half(), codebook_v=cb.half()), "codebook_k.dtype=torch.float16 differs"),
        (dict(res_k=rk.half(), res_v=rk.half()), "res_k.dtype=torch.float16 differs"),
    ]
    for change, message in cases:
        with pytest.raises(HfEffllmError, match=message):
            million_attention(**{**good, **change}, scale=1.0, use_kernel=False)
    out = million_attention(**good, scale=0.25, use_kernel=False)
    assert out.shape == q.shape and math.isfinite(float(out.abs().sum()))


def test_int8_mask_reinterprets_bool_masks_without_a_copy():
    mask = torch.tensor([[True, False, True], [False, False, True]])
    as_int8 = km._int8_mask(mask)
    assert as_int8.dtype == torch.int8 and as_int8.data_ptr() == mask.data_ptr()
    assert as_int8.tolist() == [[1, 0, 1], [0, 0, 1]]
    strided = km._int8_mask(mask.t())  # not contiguous: a contiguous copy
    assert strided.is_contiguous() and strided.tolist() == [[1, 0], [0, 0], [1, 1]]
    assert km._int8_mask(torch.tensor([[0.0, 2.0]])).tolist() == [[0, 2]]  # other dtypes converted as before


def _strided(addr: int, dtype: torch.dtype, shape: tuple, strides: tuple) -> torch.Tensor:
    """The tensor of ``shape``/``strides`` (elements) at ``addr``, as a kernel would index it (CPU memory)."""
    span = 1 + sum((s - 1) * st for s, st in zip(shape, strides))
    size = torch.empty(0, dtype=dtype).element_size()
    flat = torch.frombuffer((ctypes.c_char * (span * size)).from_address(addr), dtype=dtype, count=span)
    return flat.as_strided(shape, strides)


def _merge_kernel(b: int, hq: int, lq: int, d: int, hkv: int):
    """A Python stand-in for ``million_merge_cuda``: reads its 8 pointers and 17 ints in the kernel's order, rebuilds
    q, the window, its mask, the partials and out from them, and writes out = the window's attention merged with the
    code splits by log-sum-exp (the function of the Triton merge)."""

    def body(ptrs, ints):
        gq = hq // hkv
        r, splits, scale_bits = ints[:3]
        scale = struct.unpack("<f", struct.pack("<i", scale_bits))[0]
        sq, sr, sv, sm, so = ints[3:6], ints[6:9], ints[9:12], ints[12:14], ints[14:17]
        q = _strided(ptrs[0], torch.float16, (b, hq, lq, d), (*sq, 1))
        out = _strided(ptrs[7], torch.float16, (b, hq, lq, d), (*so, 1))
        rk = _strided(ptrs[1], torch.float16, (b, hkv, r, d), (*sr, 1)) if r else None
        rv = _strided(ptrs[2], torch.float16, (b, hkv, r, d), (*sv, 1)) if r else None
        rm = _strided(ptrs[3], torch.int8, (b, lq, r), (*sm, 1)) if ptrs[3] and r else None
        nrows = b * hkv * splits * 16
        po = _strided(ptrs[4], torch.float32, (nrows, d), (d, 1))
        pm = _strided(ptrs[5], torch.float32, (nrows,), (1,))
        pl = _strided(ptrs[6], torch.float32, (nrows,), (1,))
        for bi in range(b):
            for h in range(hkv):
                for row in range(gq * lq):
                    jh, li = row % gq, row // gq
                    m, den, o = float("-inf"), 0.0, torch.zeros(d)
                    if r:
                        s = (q[bi, h * gq + jh, li].float() @ rk[bi, h].float().T) * scale
                        if rm is not None:
                            s = s.masked_fill(rm[bi, li] == 0, float("-inf"))
                        if float(s.max()) > float("-inf"):
                            m = float(s.max())
                            p = torch.exp(s - m)
                            den, o = float(p.sum()), p @ rv[bi, h].float()
                    for sp in range(splits):
                        part = ((bi * hkv + h) * splits + sp) * 16 + row
                        ms, ls = float(pm[part]), float(pl[part])
                        mn = max(m, ms)
                        mz = 0.0 if mn == float("-inf") else mn
                        a, c = math.exp(m - mz), math.exp(ms - mz)
                        den, o, m = den * a + ls * c, o * a + po[part] * c, mn
                    out[bi, h * gq + jh, li] = (o / (den if den > 0 else 1.0)).half()

    return body


def test_cuda_merge_through_a_fake_gpu_gets_the_parameters_in_the_kernels_order(fake_gpu, monkeypatch):
    """million_cuda.MERGE = "cuda": the partials are merged by million_merge_cuda (one cuda_rt launch per call, grid
    (B x Hkv), D threads), whose 8 pointers and 17 ints a stand-in reads in the kernel's order; the result is the
    reference's with and without a window and its mask. An unknown MERGE is refused."""
    b, hq, hkv, lq, n, d, m, g = 2, 6, 2, 2, 70, 64, 32, 1
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(b, hq, lq, d, generator=gen).half()
    ck, cv = _codes(b, hkv, n, m, cap=96, seed=1), _codes(b, hkv, n, m, cap=96, seed=2)
    cbk = (torch.randn(g, m, 256, 2, generator=gen) * 0.5).half()
    cbv = torch.randn(g, m, 256, 2, generator=gen).half()
    cm = torch.rand(b, n, generator=gen) > 0.3
    fake_gpu.setattr(mc, "DESIGN", "mma")
    fake_gpu.setattr(mc, "MERGE", "cuda")
    compiled = []
    fake_gpu.setattr(mc, "compiled", lambda key, *a, **kw: compiled.append(key) or types.SimpleNamespace(func=1))
    launches = []
    for r, with_mask in ((5, True), (37, False), (0, False)):  # a window of one partial tile, of two, none
        rk = torch.randn(b, hkv, max(r, 1), d, generator=gen).half()[:, :, :r]
        rv = torch.randn(b, hkv, max(r, 1), d, generator=gen).half()[:, :, :r]
        rm = (torch.rand(b, lq, r, generator=gen) > 0.3) if with_mask else None
        if rm is not None:
            rm[:, :, -1] = True
        tensors = {"q": q, "ck": ck, "cv": cv, "cbk": cbk, "cbv": cbv, "cm": cm, "tables": mc.kernel_tables(cbk, cbv)}
        codes, merge = _partials_kernel(tensors, d**-0.5, hq // hkv, lq, hkv, d), _merge_kernel(b, hq, lq, d, hkv)

        def drv(func, gx, gy, gz, bx, by, bz, smem, stream, argv, extra, codes=codes, merge=merge):
            nptr = 8 if len(argv) == 25 else 9  # the merge: 8 pointers + 17 ints; the codes kernel: 9 + 15
            launches.append((nptr, (gx, gy, gz), bx, smem))
            (merge if nptr == 8 else codes)(*_read_params(argv, nptr, len(argv) - nptr))
            return 0

        monkeypatch.setattr(cuda_rt, "_cu_launch_kernel", lambda drv=drv: drv)
        monkeypatch.setattr(cuda_rt, "_current_stream", lambda: 77)
        ref = million_attention_reference(q.float(), ck, cv, cbk.float(), cbv.float(),
                                          rk.float() if r else None, rv.float() if r else None,
                                          scale=d**-0.5, code_mask=cm, res_mask=rm)  # fmt: skip
        out = million_attention(q, ck, cv, cbk, cbv, rk if r else None, rv if r else None, scale=d**-0.5,
                                code_mask=cm, res_mask=rm, variant="cuda")  # fmt: skip
        torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
        assert launches[-1] == (8, (b * hkv, 1, 1), d, 0)  # the merge: one block per (batch, KV head), D threads
    assert [k[0] for k in compiled].count("merge") == 3  # masked or not, per window: compiled per key
    fake_gpu.setattr(mc, "MERGE", "fused")
    with pytest.raises(HfEffllmError, match="MERGE='fused' is not known"):
        million_attention(q, ck, cv, cbk, cbv, None, None, scale=d**-0.5, code_mask=cm, variant="cuda")
    with pytest.raises(HfEffllmError, match="head_dim 64 or 128"):
        mc.million_merge_cuda(q[..., :32], None, None, None, q, q, q, q, r=0, splits=1, scale=1.0, hkv=2, gq=3, lq=2)
