"""SeerAttention kernels: block-sparse prefill and the block-max (distillation) forward against dense SDPA.

Shape: Llama-3-8B attention (32 query / 8 KV heads, head_dim 128), bf16, batch 1, S in 8k/32k/128k, block 64.
In one run:

1. correctness first: the block-sparse kernel (with padding, a partial last block, batch 2) and the block-max kernel
   against their float32 PyTorch references; failures flag every later row;
2. a small launch-configuration sweep (heads per program, warps, stages) for each kernel, best config kept;
3. per S: dense ``sdpa`` flash and cuDNN (``enable_gqa``), the block-sparse kernel at 0/50/90/95% sparsity (mask per
   KV head from random gate scores with ``select_blocks``, diagonal kept, as the model uses it), the block-max
   kernel, and the gate (pooling + projections + RoPE + softmax + top-k + block index) as a share of attention time.

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
import sys
from pathlib import Path

if importlib.util.find_spec("hf_effllm") is None:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, so before importing them

import torch.nn.functional as F  # noqa: E402
from hf_effllm.kernels.seer_attention import (  # noqa: E402
    block_sparse_attention,
    block_sparse_attention_reference,
    build_block_index,
)
from hf_effllm.kernels.seer_blockmax import blockmax_attention, blockmax_attention_reference  # noqa: E402

from hf_effllm.attention.seer import SeerAttentionConfig, SeerAttnGate, select_blocks  # noqa: E402
from hf_effllm.benchmarking import BenchmarkRun, markdown_table, time_ms  # noqa: E402

COLUMNS = [
    "section", "variant", "seq", "sparsity", "ms", "tflops_dense_equiv", "x_vs_flash", "x_vs_cudnn",
    "ms_vs_cudnn", "gate_share", "rel_err", "ok", "config", "note",
]  # fmt: skip
REL_TOL = 2e-2


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


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


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
    out, bm = blockmax_attention(q, k, v, key_padding=pad, block_size=bs)
    ro, rb = blockmax_attention_reference(q, k, v, key_padding=pad, block_size=bs)
    e1, e2 = rel_err(out, ro), rel_err(bm, rb)
    ok = e1 < REL_TOL and e2 < REL_TOL
    all_ok &= ok
    run.add(section="check", variant="block-max", seq=s, rel_err=max(e1, e2), ok=ok,
            note=f"output rel_err {e1:.2e}, block-max map rel_err {e2:.2e}")  # fmt: skip
    print(f"  check block-max out {e1:.2e} map {e2:.2e} {'OK' if ok else 'FAIL'}")
    return all_ok


def sweep(run, name, fn_of_cfg, configs, quick) -> dict:
    best, best_ms = configs[0], float("inf")
    for cfg in configs:
        try:
            ms = bench(fn_of_cfg(cfg), quick)
        except Exception as e:  # a config the compiler or the GPU refuses (shared memory) is skipped
            print(f"  sweep {name} {cfg}: {type(e).__name__}")
            continue
        run.add(section="sweep", variant=name, ms=ms, config=str(cfg))
        print(f"  sweep {name} {cfg}: {ms:.3f} ms")
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best


def tune(run, dev, dtype, hq, hkv, d, bs, seqs, quick) -> tuple[dict, dict]:
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

    seer_cfg = sweep(run, f"seer 0% S={s}", seer_fn, configs, quick)
    s2 = min(8192, max(seqs))
    q2, k2, v2 = q[:, :, :s2].contiguous(), k[:, :, :s2].contiguous(), v[:, :, :s2].contiguous()

    def bmax_fn(c):
        return lambda: blockmax_attention(q2, k2, v2, **c)

    bmax_cfg = sweep(run, f"block-max S={s2}", bmax_fn, configs, quick)
    return seer_cfg, bmax_cfg


def time_seq(run, s, dev, dtype, hq, hkv, d, bs, sparsities, seer_cfg, bmax_cfg, quick) -> None:
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

        def gate_call(cfg=cfg):
            with torch.no_grad():
                pq, pk, kv = gate.pool(q, k)
                keep = select_blocks(torch.softmax(gate.logits_from_pooled(pq, pk, kv), -1), cfg, kv)
                return build_block_index(keep)

        ms = bench(seer_call, quick)
        gms = bench(gate_call, quick)
        r = ratios(ms)
        run.add(section="seer", variant="seer block-sparse", seq=s, sparsity=round(real_sp, 4), ms=ms,
                gate_share=gms / (gms + ms), config=str(seer_cfg), note=f"gate {gms:.3f} ms", **r)  # fmt: skip
        print(
            f"  S={s:6d} seer {real_sp:5.1%} {ms:9.3f} ms  x_flash {r.get('x_vs_flash', 0):6.2f}  "
            f"x_cudnn {r.get('x_vs_cudnn', 0):6.2f}  gate {gms:.3f} ms ({gms / (gms + ms):.1%})"
        )

    def bmax_call():
        return blockmax_attention(q, k, v, **bmax_cfg)

    ms = bench(bmax_call, quick)
    run.add(section="block-max", variant="block-max forward", seq=s, ms=ms, config=str(bmax_cfg), **ratios(ms))
    print(f"  S={s:6d} block-max {ms:9.3f} ms  ms_vs_cudnn {ratios(ms).get('ms_vs_cudnn', float('nan')):.2f}")
    if dev.type == "cuda":
        del q, k, v
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    p.add_argument("--seqs", default=None, help="comma-separated sequence lengths (default 8192,32768,131072)")
    p.add_argument("--no-sweep", action="store_true", help="skip the launch-configuration sweep")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or dev.type != "cuda"
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16
    hq, hkv, d, bs = (32, 8, 128, 64) if not quick else (4, 2, 32, 64)
    seqs = [int(x) for x in args.seqs.split(",")] if args.seqs else ([8192, 32768, 131072] if not quick else [256, 320])
    sparsities = [0.0, 0.5, 0.9, 0.95]
    run = BenchmarkRun(
        "seer_speed_quick" if quick else "seer_speed",
        f"SeerAttention kernels vs dense SDPA: {hq} query / {hkv} KV heads, head_dim {d}, block {bs}, "
        f"{str(dtype).split('.')[-1]}, batch 1, causal prefill. 'seer' rows: block-sparse kernel, mask per KV "
        "head from top-k of random gate scores (diagonal kept), sparsity = skipped share of causal blocks; kernel "
        "time only (block index prebuilt; its cost is in the gate row). 'block-max': attention output plus the "
        "64x64 block-max map of the probabilities (distillation target). 'gate': pooling + projections + RoPE + "
        "softmax + top-k + index for one layer; gate_share = gate / (gate + seer kernel at that sparsity). "
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
        seer_cfg, bmax_cfg = tune(run, dev, dtype, hq, hkv, d, bs, seqs, quick)
        run.meta["seer launch config"] = str(seer_cfg)
        run.meta["block-max launch config"] = str(bmax_cfg)
    print("[3/3] timings")
    for s in seqs:
        time_seq(run, s, dev, dtype, hq, hkv, d, bs, sparsities, seer_cfg, bmax_cfg, quick)
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
