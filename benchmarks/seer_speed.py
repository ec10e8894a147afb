"""SeerAttention kernels: block-sparse prefill and the block-max (distillation) forward against dense SDPA.

Shape: Llama-3-8B attention (32 query / 8 KV heads, head_dim 128), bf16, batch 1, S in 8k/32k/128k, block 64.
In one run:

1. correctness first: the block-sparse kernel (with padding, a partial last block, batch 2) and the block-max kernel
   against their float32 PyTorch references; failures flag every later row;
2. a small launch-configuration sweep (heads per program, warps, stages) for each kernel, best config kept;
3. per S: dense ``sdpa`` flash and cuDNN (``enable_gqa``), the block-sparse kernel at 0/50/90/95% sparsity (mask per
   KV head from random gate scores with ``select_blocks``, diagonal kept, as the model uses it), the block-max
   kernel, and the gate (pooling + projections + RoPE + softmax + top-k + block index) as a share of attention time;
4. up to 32k: the gate step by step (pool / scores+softmax / select / index build), with the aten ops and CUDA
   kernel launches of each step (torch.profiler) and a host-sync check (CUDA sync debug mode), for the Triton path
   and for the PyTorch path it replaced.

Usage (repo root)::

    python benchmarks/seer_speed.py            # H200: full run
    python benchmarks/seer_speed.py --quick    # tiny shapes on the CPU (Triton interpreter): smoke check

Results: ``$HF_EFFLLM_RESULTS_DIR`` (default ``benchmarks/results``) ``seer_speed{,_quick}.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import re
import sys
from pathlib import Path

if importlib.util.find_spec("hf_effllm") is None:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, so before importing them

import torch.nn.functional as F  # noqa: E402
from hf_effllm.kernels import seer_attention as seer_kernels  # noqa: E402
from hf_effllm.kernels import seer_blockmax  # noqa: E402
from hf_effllm.kernels.seer_attention import (  # noqa: E402
    block_sparse_attention,
    block_sparse_attention_reference,
    build_block_index,
    build_block_index_triton,
    causal_block_mask,
    triton_usable,
)
from hf_effllm.kernels.seer_blockmax import blockmax_attention, blockmax_attention_reference  # noqa: E402
from hf_effllm.kernels.seer_gate import block_pool_reference  # noqa: E402

from hf_effllm.attention.seer import SeerAttentionConfig, SeerAttnGate, select_blocks  # noqa: E402
from hf_effllm.attention.seer.attention import causal_block_count  # noqa: E402
from hf_effllm.benchmarking import BenchmarkRun, markdown_table, rel_err, time_ms  # noqa: E402

COLUMNS = [
    "section", "variant", "seq", "sparsity", "ms", "tflops_dense_equiv", "x_vs_flash", "x_vs_cudnn",
    "ms_vs_cudnn", "gate_share", "launches", "aten_ops", "rel_err", "ok", "config", "note",
]  # fmt: skip
GATE_BREAKDOWN_MAX_SEQ = 32768
REL_TOL = 2e-2
MAP_TOL = 1e-4  # block-max map and pooled Q/K: float32 math on the same inputs


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench(fn, quick: bool) -> float:
    if torch.cuda.is_available():
        fn()
        _sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        _sync()
        t = start.elapsed_time(end)
        return time_ms(fn, warmup=max(25, int(2 * t)), rep=max(100, int(8 * t)))
    return time_ms(fn, warmup=1, rep=3 if quick else 20)


def make_mask(b: int, hkv: int, s: int, bs: int, sparsity: float, dev, seed: int = 0) -> torch.Tensor:
    """Kept blocks as the model selects them: top-k of (random) gate probabilities per block row, diagonal kept."""
    nb = math.ceil(s / bs)
    g = torch.Generator(device=dev).manual_seed(seed)
    logits = torch.randn(b, hkv, nb, nb, generator=g, device=dev)
    logits = logits.masked_fill(~torch.ones(nb, nb, dtype=torch.bool, device=dev).tril(), float("-inf"))
    cfg = SeerAttentionConfig(block_size=bs, nz_ratio=max(1e-6, 1.0 - sparsity))
    return select_blocks(torch.softmax(logits, -1), cfg)


def achieved_sparsity(mask: torch.Tensor) -> float:
    nb = mask.shape[-1]
    return 1.0 - float(mask.sum()) / (mask.shape[0] * mask.shape[1] * nb * (nb + 1) / 2)


def dense_backends(dev) -> dict[str, object]:
    if dev.type != "cuda":
        return {"sdpa (cpu)": None}
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def sdpa_fn(backend, q, k, v):
    from torch.nn.attention import sdpa_kernel

    def call():
        ctx = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
        with ctx:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return call


def gate_steps(gate: SeerAttnGate, cfg: SeerAttentionConfig, q, k, fast: bool = True, state=None) -> dict[str, object]:
    """The gate path of ``seer_attention_forward`` (no padding) as separate steps, each a no-argument callable.

    ``fast=False`` runs the PyTorch pooling, scores and softmax and the sort-based block index (the path before
    the Triton kernels; the CPU always runs it).
    Each step reads the previous step's output from ``state`` (a dict, given or new), so the steps can be timed
    one by one.
    """
    state = {} if state is None else state
    bs = cfg.block_size
    use_kernels = fast and triton_usable(q.device) and q.device.type == "cuda"

    @torch.no_grad()
    def pool():
        if use_kernels:
            state["pooled"] = gate.pool(q, k)
        else:
            pq, pk = block_pool_reference(q, bs, cfg.q_pooling), block_pool_reference(k, bs, cfg.k_pooling)
            state["pooled"] = (pq, pk, torch.ones(q.shape[0], pq.shape[2], dtype=torch.bool, device=q.device))

    @torch.no_grad()
    def scores():
        pq, pk, kvalid = state["pooled"]
        if use_kernels:
            state["probs"] = gate.probs_from_pooled(pq, pk, kvalid)
        else:
            state["probs"] = torch.softmax(gate.logits_from_pooled(pq, pk, kvalid), dim=-1).nan_to_num(0.0)

    @torch.no_grad()
    def select():
        state["keep"] = select_blocks(state["probs"], cfg, state["pooled"][2])

    @torch.no_grad()
    def index():
        keep = state["keep"]
        nb = keep.shape[-1]
        gate.count_blocks(keep.sum(), causal_block_count(None, keep.shape[0], nb) * keep.shape[1])
        if use_kernels:
            state["index"] = build_block_index_triton(keep)
        else:
            state["index"] = build_block_index(keep & causal_block_mask(nb, keep.device))

    def total():
        pool(), scores(), select(), index()
        return state["index"]

    return {"pool": pool, "scores+softmax": scores, "select": select, "index build": index, "gate total": total}


def count_ops(fn) -> tuple[int, int | None]:
    """``(aten ops called from Python, CUDA kernels launched)`` in one call of ``fn`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
        _sync()
    events = prof.events()

    def top_level(e) -> bool:
        par = e.cpu_parent
        while par is not None:
            if par.name.startswith("aten::"):
                return False
            par = par.cpu_parent
        return e.name.startswith("aten::")

    aten = sum(1 for e in events if e.device_type.name == "CPU" and top_level(e))
    if not torch.cuda.is_available():
        return aten, None
    kernels = sum(1 for e in events if e.device_type.name == "CUDA" and "memcpy" not in e.name.lower())
    return aten, kernels


def host_syncs(fn) -> str:
    """'none' when ``fn`` runs without a device-to-host sync (CUDA sync debug mode), else the first sync's error."""
    if not torch.cuda.is_available():
        return "n/a (cpu)"
    fn()
    _sync()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except RuntimeError as e:
        return f"sync: {str(e).splitlines()[0][:80]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        _sync()


def gate_breakdown(run, s, q, k, gate, bs, quick) -> None:
    """Time each gate step (the Triton path and the PyTorch path) and count its ops / kernel launches."""
    cfg = SeerAttentionConfig(block_size=bs, nz_ratio=0.1)
    for fast in (True, False):
        steps = gate_steps(gate, cfg, q, k, fast=fast)
        label = "" if fast else " (PyTorch path)"
        steps["gate total"]()  # fills the state every step reads
        for name, fn in steps.items():
            ms = bench(fn, quick)
            aten, kernels = count_ops(fn)
            note = f"host syncs: {host_syncs(fn)}" if name == "gate total" else ""
            run.add(section="gate", variant=name + label, seq=s, sparsity=0.9, ms=ms, launches=kernels,
                    aten_ops=aten, note=note)  # fmt: skip
            print(f"  S={s:6d} gate {name + label:42s} {ms:8.3f} ms  aten ops {aten:4d}  launches {kernels}  {note}")


def call_blockmax(q, k, v, cfg: dict, **kwargs):
    """:func:`blockmax_attention` with a swept launch config and main-loop variant (``fold_scale``: the softmax
    arithmetic, ``pair``: two key tiles per softmax step, None = where they fit; ``fixed_max``: each row's
    diagonal-block max as a fixed reference instead of the online softmax)."""
    cfg = dict(cfg)
    seer_blockmax._FOLD_SCALE = bool(cfg.pop("fold_scale", True))
    seer_blockmax._PAIR = cfg.pop("pair", None)
    seer_blockmax._FIXED_MAX = bool(cfg.pop("fixed_max", False))
    return blockmax_attention(q, k, v, **cfg, **kwargs)


def blockmax_configs(dev, group: int) -> list[dict]:
    """The block-max launch configs the sweep times (and the correctness check runs first).

    The configs within 15% of the best in the session-6 and -8 H200 sweeps (the others spilled heavily or ran
    1.2-3x slower; the folded scale was faster in each; a lazy rescale was 10-30% slower in each and TMA loads of
    the paired tiles 2-6% slower), with the key tiles single or in pairs (pairs at 4 heads per program fit the
    shared memory with 2 stages only, and ran 26% slower than unpaired). Session 14 (``seer_speed_blockmax_s14``):
    each pair's Q K^T issued one step ahead of its softmax ran 22.2 ms against 17.9 (Triton still waits for every
    wgmma group at depth 0, so nothing overlaps, and it took 254 registers); ``tl.range(warp_specialize=True)`` on
    the paired loop compiled to the same code as without (same shared memory, registers, copies): both dropped.
    """
    if dev.type != "cuda":  # interpreter: the main loops at 4 warps
        return [
            {"heads_per_program": 2, "num_warps": 4, "pair": pair, "fixed_max": fm}
            for pair in (False, True)
            for fm in (False, True)
        ]
    return [
        {"heads_per_program": hp, "num_warps": w, "num_stages": st, "fold_scale": True, "pair": pair, "fixed_max": fm}
        for hp, w, st, pair, fm in [
            (2, 4, 2, False, False), (4, 8, 3, False, False), (2, 8, 3, False, False), (2, 8, 3, True, False),
            (2, 8, 2, True, False), (2, 8, 3, True, True), (2, 8, 2, True, True), (4, 8, 3, False, True),
            (2, 8, 3, False, True), (2, 4, 2, False, True),
        ]
        if group % hp == 0
    ]  # fmt: skip


def check_correctness(run, dev, dtype, hq, hkv, d, bs, quick) -> bool:
    s = 200 if quick else 1000
    torch.manual_seed(0)
    q = torch.randn(2, hq, s, d, device=dev, dtype=dtype)
    k = torch.randn(2, hkv, s, d, device=dev, dtype=dtype)
    v = torch.randn(2, hkv, s, d, device=dev, dtype=dtype)
    pad = torch.ones(2, s, dtype=torch.bool, device=dev)
    pad[1, : s // 5] = False
    all_ok = True
    for sp in (0.0, 0.5, 0.9):
        mask = make_mask(2, hkv, s, bs, sp, dev)
        out = block_sparse_attention(q, k, v, mask, key_padding=pad, block_size=bs)
        ref = block_sparse_attention_reference(q, k, v, mask, key_padding=pad, block_size=bs)
        err = rel_err(out, ref)
        ok = bool(torch.isfinite(out).all()) and err < REL_TOL
        all_ok &= ok
        run.add(section="check", variant="seer block-sparse", seq=s, sparsity=sp, rel_err=err, ok=ok,
                note="batch 2, left padding in row 2, partial last block")  # fmt: skip
        print(f"  check seer sparsity={sp:.2f} rel_err={err:.2e} {'OK' if ok else 'FAIL'}")
    ro, rb = blockmax_attention_reference(q, k, v, key_padding=pad, block_size=bs)
    g = hq // hkv
    configs = [{}] + [
        {"heads_per_program": hp, "num_warps": w, "fold_scale": f, "pair": False}
        for hp in (1, 2, 4) if g % hp == 0 for w in ((4, 8) if dev.type == "cuda" else (4,)) for f in (False, True)
    ] + blockmax_configs(dev, g)  # fmt: skip
    for c in configs:  # every launch config the sweep may pick (the map must match to float32 rounding)
        try:
            out, bm = call_blockmax(q, k, v, c, key_padding=pad, block_size=bs)
        except Exception as e:  # a config the GPU refuses (shared memory) is skipped here and in the sweep
            print(f"  check block-max {c}: {type(e).__name__}, skipped")
            continue
        e1, e2 = rel_err(out, ro), rel_err(bm, rb)
        ok = e1 < REL_TOL and e2 < MAP_TOL
        all_ok &= ok
        run.add(section="check", variant="block-max", seq=s, rel_err=max(e1, e2), ok=ok, config=str(c or "default"),
                note=f"output rel_err {e1:.2e}, block-max map rel_err {e2:.2e}")  # fmt: skip
        print(f"  check block-max {c or 'default'} out {e1:.2e} map {e2:.2e} {'OK' if ok else 'FAIL'}")
    # Gate kernels: Triton pooling and block index against the PyTorch path (same pooled inputs / same mask).
    gate = SeerAttnGate(hq, hkv, d, SeerAttentionConfig(block_size=bs), rope_theta=500000.0, layer_idx=0).to(dev)
    cfg = SeerAttentionConfig(block_size=bs, nz_ratio=0.3)
    sf, ss = {}, {}
    gate_steps(gate, cfg, q, k, fast=True, state=sf)["pool"]()
    gate_steps(gate, cfg, q, k, fast=False, state=ss)["pool"]()
    (pq, pk, _), (rq, rk, _) = sf["pooled"], ss["pooled"]
    e = max(rel_err(pq, rq), rel_err(pk, rk))
    keep = make_mask(2, hkv, s, bs, 0.7, dev)
    nb = keep.shape[-1]
    ri, rc = build_block_index(keep & causal_block_mask(nb, dev))
    ti, tc = build_block_index_triton(keep) if triton_usable(dev) else (ri, rc)
    slots = torch.arange(nb, device=dev) < rc[..., None]
    same = bool(torch.equal(tc, rc)) and bool(torch.equal(ti[slots], ri[slots]))
    ok = e < MAP_TOL and same
    all_ok &= ok
    run.add(section="check", variant="gate kernels", seq=s, rel_err=e, ok=ok,
            note=f"pooled Q/K rel_err {e:.2e}; block index identical: {same}")  # fmt: skip
    print(f"  check gate pooling {e:.2e}, block index identical {same} {'OK' if ok else 'FAIL'}")
    return all_ok


def compiled_facts(jit_fn) -> dict[str, str]:
    """What the compiler made of each specialization of a Triton kernel launched so far, by cache key: shared
    memory, registers, spills, asynchronous copies (``cp.async``: the loads pipelined over stages), wgmma
    instructions and the depths their waits allow (0 = wait for all: no overlap with the next products)."""
    facts = {}
    for entry in getattr(jit_fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        for key, k in list(cache.items()):
            ptx = k.asm.get("ptx", "") if hasattr(k, "asm") else ""
            waits = sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)))
            facts[str(key)] = (
                f"shared {k.metadata.shared} B, regs {getattr(k, 'n_regs', '?')}, spills {getattr(k, 'n_spills', '?')}, "
                f"cp.async {ptx.count('cp.async.cg') + ptx.count('cp.async.ca')}, bulk {ptx.count('cp.async.bulk')}, "
                f"wgmma {ptx.count('wgmma.mma_async')}, wait depths {waits}"
            )
    return facts


def sweep(run, name, fn_of_cfg, configs, quick, jit_fn=None) -> dict:
    """The fastest of ``configs``; with ``jit_fn`` (the Triton kernel they launch) each config's row also says what
    the compiler made of it (:func:`compiled_facts`)."""
    best, best_ms = configs[0], float("inf")
    for cfg in configs:
        seen = set(compiled_facts(jit_fn)) if jit_fn is not None else set()
        try:
            ms = bench(fn_of_cfg(cfg), quick)
        except Exception as e:  # a config the compiler or the GPU refuses (shared memory) is skipped
            print(f"  sweep {name} {cfg}: {type(e).__name__}")
            continue
        new = {k: v for k, v in compiled_facts(jit_fn).items() if k not in seen} if jit_fn is not None else {}
        note = " | ".join(new.values())
        run.add(section="sweep", variant=name, ms=ms, config=str(cfg), note=note)
        print(f"  sweep {name} {cfg}: {ms:.3f} ms  {note}")
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best


def tune(run, dev, dtype, hq, hkv, d, bs, seqs, quick, blockmax_only=False) -> tuple[dict, dict]:
    """Pick heads-per-program / warps / stages for each kernel on one mid-size shape (0% sparsity)."""
    s = min(32768, max(seqs))
    q = torch.randn(1, hq, s, d, device=dev, dtype=dtype)
    k = torch.randn(1, hkv, s, d, device=dev, dtype=dtype)
    v = torch.randn(1, hkv, s, d, device=dev, dtype=dtype)
    mask = make_mask(1, hkv, s, bs, 0.0, dev)
    index = build_block_index(mask)
    configs = [
        {"heads_per_program": hp, "num_warps": w, "num_stages": st}
        for hp in (1, 2, 4) for w in (4, 8) for st in (2, 3)
    ]  # fmt: skip

    def seer_fn(c):
        return lambda: block_sparse_attention(q, k, v, mask, block_index=index, **c)

    seer_cfg = (
        {}
        if blockmax_only
        else sweep(run, f"seer 0% S={s}", seer_fn, configs, quick, getattr(seer_kernels, "_seer_fwd_kernel", None))
    )

    def bmax_fn(c):
        return lambda: call_blockmax(q, k, v, c)

    bmax_configs = blockmax_configs(dev, hq // hkv)
    bmax_cfg = sweep(
        run, f"block-max S={s}", bmax_fn, bmax_configs, quick, getattr(seer_blockmax, "_blockmax_fwd_kernel", None)
    )
    return seer_cfg, bmax_cfg


def time_seq(run, s, dev, dtype, hq, hkv, d, bs, sparsities, seer_cfg, bmax_cfg, quick, repeats=1) -> None:
    """Dense baselines, the block-sparse kernel at each sparsity (with gate cost) and the block-max kernel at S."""
    torch.manual_seed(s)
    q = torch.randn(1, hq, s, d, device=dev, dtype=dtype)
    k = torch.randn(1, hkv, s, d, device=dev, dtype=dtype)
    v = torch.randn(1, hkv, s, d, device=dev, dtype=dtype)
    flops = 4 * hq * s * s * d / 2
    dense = {}
    for name, be in dense_backends(dev).items():
        try:
            dense[name] = bench(sdpa_fn(be, q, k, v), quick)
        except Exception as e:
            run.add(section="dense", variant=name, seq=s, note=f"error: {type(e).__name__}: {str(e)[:120]}")
    flash = dense.get("flash", dense.get("sdpa (cpu)"))
    cudnn = dense.get("cudnn")

    def ratios(ms: float) -> dict:
        out = {"tflops_dense_equiv": flops / (ms * 1e-3) / 1e12}
        if flash:
            out["x_vs_flash"] = flash / ms
        if cudnn:
            out["x_vs_cudnn"] = cudnn / ms
            out["ms_vs_cudnn"] = ms / cudnn
        return out

    for name, ms in dense.items():
        run.add(section="dense", variant=name, seq=s, sparsity=0.0, ms=ms, **ratios(ms))
        print(f"  S={s:6d} {name:12s} {ms:9.3f} ms")
    gate = SeerAttnGate(hq, hkv, d, SeerAttentionConfig(block_size=bs), rope_theta=500000.0, layer_idx=0).to(dev)
    for sp in sparsities:
        mask = make_mask(1, hkv, s, bs, sp, dev, seed=s)
        index = build_block_index(mask)
        real_sp = achieved_sparsity(mask)
        cfg = SeerAttentionConfig(block_size=bs, nz_ratio=max(1e-6, 1.0 - sp))

        def seer_call(mask=mask, index=index):
            return block_sparse_attention(q, k, v, mask, block_index=index, **seer_cfg)

        gate_call = gate_steps(gate, cfg, q, k)["gate total"]

        ms = bench(seer_call, quick)
        gms = bench(gate_call, quick)
        r = ratios(ms)
        run.add(section="seer", variant="seer block-sparse", seq=s, sparsity=round(real_sp, 4), ms=ms,
                gate_share=gms / (gms + ms), config=str(seer_cfg), note=f"gate {gms:.3f} ms", **r)  # fmt: skip
        print(
            f"  S={s:6d} seer {real_sp:5.1%} {ms:9.3f} ms  x_flash {r.get('x_vs_flash', 0):6.2f}  "
            f"x_cudnn {r.get('x_vs_cudnn', 0):6.2f}  gate {gms:.3f} ms ({gms / (gms + ms):.1%})"
        )

    if s <= GATE_BREAKDOWN_MAX_SEQ and sparsities:
        gate_breakdown(run, s, q, k, gate, bs, quick)

    def bmax_call(stat="max"):
        return call_blockmax(q, k, v, bmax_cfg, stat=stat)

    for stat in ("max", "mass"):  # the paper's block-max map, and the block-mass map the default distillation uses
        ms = bench(lambda stat=stat: bmax_call(stat), quick)
        name = "block-max forward" if stat == "max" else "block-mass forward (stat='mass')"
        run.add(section="block-max", variant=name, seq=s, ms=ms, config=str(bmax_cfg), **ratios(ms))
        print(f"  S={s:6d} {name} {ms:9.3f} ms  ms_vs_cudnn {ratios(ms).get('ms_vs_cudnn', float('nan')):.2f}")
    if cudnn and repeats > 1:  # the block-max / cuDNN time ratio again, the two timed back to back each round
        cudnn_call = sdpa_fn(dense_backends(dev)["cudnn"], q, k, v)
        for i in range(repeats):
            c_ms, b_ms = bench(cudnn_call, quick), bench(bmax_call, quick)
            run.add(section="repeat", variant=f"block-max vs cudnn, round {i + 1}", seq=s, ms=b_ms,
                    ms_vs_cudnn=b_ms / c_ms, config=str(bmax_cfg), note=f"cudnn {c_ms:.3f} ms")  # fmt: skip
            print(f"  S={s:6d} round {i + 1}: cudnn {c_ms:.3f} ms, block-max {b_ms:.3f} ms, {b_ms / c_ms:.3f}x")
    if dev.type == "cuda":
        del q, k, v
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    p.add_argument("--seqs", default=None, help="comma-separated sequence lengths (default 8192,32768,131072)")
    p.add_argument("--no-sweep", action="store_true", help="skip the launch-configuration sweep")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument(
        "--blockmax-only", action="store_true", help="dense baselines and the block-max kernel only (no seer rows)"
    )
    p.add_argument("--repeats", type=int, default=1, help="rounds of cuDNN and block-max timed back to back")
    args = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or dev.type != "cuda"
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16
    hq, hkv, d, bs = (32, 8, 128, 64) if not quick else (4, 2, 32, 64)
    seqs = [int(x) for x in args.seqs.split(",")] if args.seqs else ([8192, 32768, 131072] if not quick else [256, 320])
    sparsities = [] if args.blockmax_only else [0.0, 0.5, 0.9, 0.95]
    stem = "seer_speed_quick" if quick else "seer_speed"
    run = BenchmarkRun(
        stem + ("_blockmax" if args.blockmax_only else ""),
        f"SeerAttention kernels vs dense SDPA: {hq} query / {hkv} KV heads, head_dim {d}, block {bs}, "
        f"{str(dtype).split('.')[-1]}, batch 1, causal prefill. 'seer' rows: block-sparse kernel, mask per KV "
        "head from top-k of random gate scores (diagonal kept), sparsity = skipped share of causal blocks; kernel "
        "time only (block index prebuilt; its cost is in the gate row). 'block-max': attention output plus the "
        "64x64 block-max map of the probabilities (distillation target), one pass over K/V (row maxima kept in a "
        "scratch). 'gate' in the seer rows: pooling + projections + RoPE + softmax + top-k + index for one layer "
        "(Triton pooling / scores / index on CUDA); gate_share = gate / (gate + seer kernel at that sparsity). "
        "'gate' section (S <= 32k, nz_ratio 0.1): the same path step by step, with the aten ops called and the "
        "CUDA kernels launched per step (torch.profiler) and a host-sync check, for the Triton path and for the "
        "PyTorch path it replaced ('(PyTorch path)': PyTorch pooling, scores and softmax, sort-based index). "
        "x_vs_flash / x_vs_cudnn: dense time / this time (speed-up); ms_vs_cudnn: this time / cuDNN time. "
        "tflops_dense_equiv: dense causal FLOPs / time. Median of triton do_bench.",
    )
    run.meta["dtype"] = str(dtype)
    run.meta["quick"] = quick
    print(f"device {dev}, dtype {dtype}, heads {hq}/{hkv}, head_dim {d}, seqs {seqs}")
    print("[1/3] correctness")
    ok = check_correctness(run, dev, dtype, hq, hkv, d, bs, quick)
    run.meta["correctness"] = "passed" if ok else "FAILED: do not use the timings"

    seer_cfg = {"heads_per_program": None, "num_warps": None, "num_stages": None}
    bmax_cfg = dict(seer_cfg)
    if dev.type == "cuda" and not args.no_sweep:
        print("[2/3] launch-configuration sweep")
        seer_cfg, bmax_cfg = tune(run, dev, dtype, hq, hkv, d, bs, seqs, quick, args.blockmax_only)
        run.meta["seer launch config"] = str(seer_cfg)
        run.meta["block-max launch config"] = str(bmax_cfg)
    print("[3/3] timings")
    for s in seqs:
        time_seq(run, s, dev, dtype, hq, hkv, d, bs, sparsities, seer_cfg, bmax_cfg, quick, args.repeats)
        if not args.no_write:
            run.write(COLUMNS)
    for r in run.rows:
        if r["section"] in ("seer", "block-max") and not ok:
            r["note"] = ("FAILED correctness; " + (r.get("note") or "")).strip("; ")
    if not args.no_write:
        print("wrote", *run.write(COLUMNS))
    print()
    print(markdown_table([r for r in run.rows if r["section"] != "sweep"], COLUMNS))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
