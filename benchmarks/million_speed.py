"""MILLION speed: decode attention over PQ codes vs bf16 sdpa decode, prompt encoding, end-to-end generate.

Sections (all in one run, baseline measured alongside):

1. correctness first: the code-kernel variants (``l1``: per-lane gathers from the L1-cached codebook; ``smem``:
   packed centroid words gathered from shared memory with ``tl.gather``; ``cuda``: the NVRTC-compiled kernel of
   ``kernels/million_cuda.py``, tables stored to shared memory once per block; GPU only, D 64/128, 256 centroids;
   ``cuda-mma``: the same with its "mma" design forced, where the default may pick "lut"; ``cuda-tmerge`` /
   ``cuda-cmerge``, not run by default: the partials merged by the Triton / the CUDA merge kernel)
   against the PyTorch reference on small odd shapes (fp16
   and bf16 on the GPU; fp32 and fp16 under the interpreter with ``--quick``); timings of a failing variant are
   flagged;
2. decode attention, Llama-3-8B attention shape (32 query / 8 KV heads, head_dim 128): one query token over N
   cached tokens (N = 8k/32k/128k, batch 1 and 16): MILLION kernel (codes of N tokens + a 128-token bf16 window)
   at 4 bits (M=64) and 2 bits (M=32), each variant at its best launch config of ``SWEEP`` (rows
   ``MILLION 4-bit (l1)``, ``MILLION 4-bit (smem)``, ...), vs ``sdpa`` over bf16 K/V of N+128 tokens
   (``enable_gqa``); bytes read (codes vs bf16 K/V) and the achieved TB/s are reported;
   then, at batch 1 and 8k, the host time of one call per variant and of the CUDA path's parts, and the GPU time of
   the whole call alone (CUDA graph) ("host" rows; a profiler table goes to the log);
3. prompt encoding: ``pq_encode`` of a 32k-token prompt's K and V for one layer (time-to-first-token overhead per
   layer), both encode kernels (``loop``: one token per lane; ``chunked``: the first one), checked against the
   reference's codes, against one layer's sdpa prefill attention on the same prompt;
4. end-to-end ``generate`` on a Llama-3-8B-shaped random-weight model (bf16) with a 32k prompt: time to first
   token and time per output token with ``DynamicCache`` vs ``MillionCache`` (``attn_implementation="million"``),
   and the cache memory of each.

Usage (from the repo root)::

    python benchmarks/million_speed.py                 # full run on a GPU
    python benchmarks/million_speed.py --skip-e2e      # kernel sections only
    python benchmarks/million_speed.py --quick         # tiny shapes on the CPU (interpreter): a smoke check
    python benchmarks/million_speed.py --decode-only --variants cuda,cuda-mma --name million_speed_cuda

Results: ``benchmarks/results/million_speed.{json,md}`` (``million_speed_quick.*`` with ``--quick``; ``--name`` sets
the stem).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

if importlib.util.find_spec("hf_effllm") is None:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hf_effllm.kernels import million_cuda  # noqa: E402
from hf_effllm.kernels.million import (  # noqa: E402
    ENCODE_VARIANTS,
    _smem_chunks,
    ideal_bytes,
    million_attention,
    million_attention_reference,
    pq_encode,
    pq_encode_reference,
)

from hf_effllm.benchmarking import BenchmarkRun, markdown_table, module_setting, time_ms  # noqa: E402

HQ, HKV, D, K, WINDOW = 32, 8, 128, 256, 128
# (block_n, num_warps, chunks) tried per variant on the GPU; the best is reported. All compile with triton 3.6
# for sm_90 without spills at Lq = 1 (smem: chunks None = 16 subspaces per chunk, 2 = 32: conflict-free gathers)
SWEEP = {  # "cuda-mma", "cuda-tmerge", "cuda-cmerge" (below) sweep as "cuda"
    "l1": [(32, 4, None), (64, 4, None), (32, 8, None), (16, 4, None)],
    "smem": [(128, 8, None), (128, 8, 2), (64, 8, None), (64, 4, None), (64, 8, 2)],
    "cuda": [(32, None, None), (32, 8, None), (32, 16, None)],  # warps: default (12 at Lq=1), 8, 16
}
SWEEP["cuda-mma"] = SWEEP["cuda-tmerge"] = SWEEP["cuda-cmerge"] = SWEEP["cuda"]


def _inputs(b, hq, hkv, n, r, d, m, k, dtype, dev, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(b, hq, 1, d, device=dev, generator=g).to(dtype)
    ck = torch.randint(0, k, (b, hkv, n, m), device=dev, generator=g, dtype=torch.uint8)
    cv = torch.randint(0, k, (b, hkv, n, m), device=dev, generator=g, dtype=torch.uint8)
    cbk = torch.randn(1, m, k, d // m, device=dev, generator=g).to(dtype)
    cbv = torch.randn(1, m, k, d // m, device=dev, generator=g).to(dtype)
    rk = torch.randn(b, hkv, r, d, device=dev, generator=g).to(dtype)
    rv = torch.randn(b, hkv, r, d, device=dev, generator=g).to(dtype)
    return q, ck, cv, cbk, cbv, rk, rv


# "cuda-mma": the CUDA kernel with its "mma" design forced; "cuda-tmerge" / "cuda-cmerge": with the partials merged
# by the Triton / the CUDA merge kernel (million_cuda.MERGE), whichever is the default
VARIANTS = ("l1", "smem", "cuda", "cuda-mma", "cuda-tmerge", "cuda-cmerge")
_FORCED = {"cuda-mma": ("DESIGN", "mma"), "cuda-tmerge": ("MERGE", "triton"), "cuda-cmerge": ("MERGE", "cuda")}


@contextlib.contextmanager
def _design(variant: str):
    """Run ``variant`` (the ``cuda-*`` ones: variant "cuda" with the million_cuda setting of ``_FORCED``); yields
    the variant name ``million_attention`` takes."""
    name, value = _FORCED.get(variant, ("DESIGN", million_cuda.DESIGN))
    with module_setting(million_cuda, **{name: value}):
        yield "cuda" if variant.startswith("cuda") else variant


def _skip(variant, q, ck, cv, cbk, m, d, k) -> bool:
    """Whether ``variant`` does not take this shape/dtype/device (the others are compared on it)."""
    if variant == "smem":
        return _smem_chunks(m, d // m, k, q.element_size()) is None  # e.g. fp32 with DSUB 4 (128-bit centroids)
    if variant.startswith("cuda"):
        return million_cuda.supports(q, ck, cv, cbk, q.shape[1] // ck.shape[1], q.shape[2]) is not None
    return False


def check(run, dev, quick, variants=VARIANTS[:4]) -> dict[str, bool]:
    """Both kernel variants against the reference; returns {variant: passed}."""
    ok_all: dict[str, bool] = {}  # only the variants that ran on some shape here
    dtypes = [torch.float32, torch.float16] if dev.type == "cpu" else [torch.float16, torch.bfloat16]
    shapes = [(1, 4, 2, 45, 7, 16, 8, 16), (2, 6, 2, 77, 13, 32, 8, 32), (1, 6, 2, 150, 9, 64, 32, 32)]
    if not quick:
        shapes += [(2, HQ, HKV, 5000, WINDOW, D, 64, K), (2, HQ, HKV, 3001, WINDOW, D, 32, K)]
        shapes += [(3, 8, 2, 999, 17, 64, 16, K), (1, 16, 1, 2049, 0, D, 64, K)]  # CUDA variant: D 64, 16 rows
    for dtype in dtypes:
        for b, hq, hkv, n, r, d, m, k in shapes:
            q, ck, cv, cbk, cbv, rk, rv = _inputs(b, hq, hkv, n, r, d, m, k, dtype, dev, seed=n)
            cm = torch.rand(b, n, device=dev) > 0.1
            ref = million_attention_reference(q, ck, cv, cbk, cbv, rk, rv, scale=d**-0.5, code_mask=cm, path="lut")
            for variant in variants:
                if _skip(variant, q, ck, cv, cbk, m, d, k):
                    continue
                with _design(variant) as v:
                    out = million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=d**-0.5, code_mask=cm, use_kernel=True,
                                            variant=v)  # fmt: skip
                err = float((out.float() - ref.float()).norm() / ref.float().norm())
                ok = err < (1e-4 if dtype == torch.float32 else 2e-2)
                ok_all[variant] = ok_all.get(variant, True) and ok
                run.add(section="check", variant=f"{variant} kernel vs reference {str(dtype)[6:]}", batch=b, tokens=n,
                        rel_err=err, ok=ok, note=f"Hq={hq} Hkv={hkv} D={d} M={m} K={k} window={r}")  # fmt: skip
                print(f"  check {variant:4s} {str(dtype)[6:]:8s} B={b} N={n} D={d} M={m}: rel_err {err:.2e} "
                      f"{'OK' if ok else 'FAIL'}")  # fmt: skip
    return ok_all


def bench_decode(run, dev, quick, ok, variants=VARIANTS[:4]):
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    hq, hkv, d = (HQ, HKV, D) if not quick else (8, 2, 32)
    ns = [8192, 32768, 131072] if not quick else [256, 1024]
    batches = [1, 16] if not quick else [1, 2]
    k = K if not quick else 32
    for b in batches:
        for n in ns:
            g = torch.Generator(device=dev).manual_seed(n + b)
            q = torch.randn(b, hq, 1, d, device=dev, generator=g).to(dtype)
            kk = torch.randn(b, hkv, n + WINDOW, d, device=dev, generator=g).to(dtype)
            vv = torch.randn_like(kk)
            base = time_ms(
                lambda q=q, kk=kk, vv=vv: F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True), warmup=25, rep=100
            )
            dense_bytes = 2 * kk.numel() * kk.element_size()
            run.add(section="decode", variant="sdpa bf16 (baseline)", batch=b, tokens=n, ms=base,
                    tbps=dense_bytes / base / 1e9, bytes=dense_bytes, speedup=1.0)  # fmt: skip
            print(f"  decode B={b:2d} N={n:6d} sdpa {base:.4f} ms")
            del kk, vv
            for bits, m in ((4, d // 2), (2, d // 4)):
                _, ck, cv, cbk, cbv, rk, rv = _inputs(b, hq, hkv, n, WINDOW, d, m, k, dtype, dev, seed=n)
                for variant in variants:
                    if _skip(variant, q, ck, cv, cbk, m, d, k):
                        continue
                    configs = SWEEP[variant] if not quick else [(16, 4, None)]
                    best = None
                    for bn, warps, chunks in configs:

                        def fn(bn=bn, w=warps, c=chunks, v=variant, t=(q, ck, cv, cbk, cbv, rk, rv)):
                            with _design(v) as v_:
                                return million_attention(*t, scale=d**-0.5, block_n=bn, num_warps=w, use_kernel=True,
                                                         variant=v_, chunks=c)  # fmt: skip

                        try:
                            ms = time_ms(fn, warmup=25 if not quick else 1, rep=100 if not quick else 1)
                        except Exception as e:  # a launch config the compiler refuses must not stop the run
                            print(f"    {variant} block_n={bn} warps={warps} chunks={chunks}: {type(e).__name__}")
                            continue
                        if best is None or ms < best[0]:
                            best = (ms, bn, warps, chunks)
                    if best is None:
                        continue
                    ib = ideal_bytes(b, hkv, n, d, m)
                    moved = ib["code_bytes"] + 2 * rk.numel() * rk.element_size()
                    ms, bn, warps, chunks = best
                    if variant.startswith("cuda"):
                        with _design(variant):
                            design = million_cuda.design_for(
                                q.shape[1] // hkv, cbv, million_cuda.split_plan(n, b * hkv, q.device)[1]
                            )
                        note = f"M={m} {design} warps={warps or million_cuda.num_warps(q.shape[1] // hkv, design)}"
                    else:
                        note = f"M={m} block_n={bn} warps={warps}" + (
                            f" chunks={chunks or 'default'}" if variant == "smem" else ""
                        )
                    run.add(section="decode", variant=f"MILLION {bits}-bit ({variant})", batch=b, tokens=n, ms=ms,
                            tbps=moved / ms / 1e9, bytes=moved, speedup=base / ms,
                            note=note + ("" if ok.get(variant, False) else "; FAILED or unchecked correctness"))  # fmt: skip
                    print(f"    {bits}-bit {variant:4s}: {ms:.4f} ms  x{base / ms:.2f} vs sdpa  "
                          f"({moved / ms / 1e9:.2f} TB/s, {note})")  # fmt: skip
                    if variant in ("cuda", "cuda-mma"):  # where the time goes: the codes kernel alone (no merge)
                        with _design(variant):
                            codes_ms = _cuda_codes_only_ms(q, ck, cv, cbk, cbv, d, warps)
                        run.add(section="decode", variant=f"MILLION {bits}-bit ({variant}, codes kernel only)", batch=b,
                                tokens=n, ms=codes_ms, tbps=ib["code_bytes"] / codes_ms / 1e9,
                                bytes=ib["code_bytes"], speedup=base / codes_ms, note=note)  # fmt: skip
                        print(f"    {bits}-bit cuda codes kernel only: {codes_ms:.4f} ms")
                del ck, cv, rk, rv


def _cuda_codes_call(q, ck, cv, cbk, cbv, d, warps):
    """A call of the CUDA codes kernel alone (no window, no merge), with the splits ``million_attention`` would use
    and its partials allocated once."""
    b, hq = q.shape[:2]
    hkv, n = ck.shape[1], ck.shape[2]
    splits, split_len = million_cuda.split_plan(n, b * hkv, q.device)
    po = torch.empty(b * hkv * splits * million_cuda.ROWS * d, dtype=torch.float32, device=q.device)
    pm = torch.empty(b * hkv * splits * million_cuda.ROWS, dtype=torch.float32, device=q.device)
    pl = torch.empty_like(pm)
    design = million_cuda.design_for(hq // hkv, cbv, split_len)
    tk, tv = million_cuda.kernel_tables(cbk, cbv, design)
    return lambda: million_cuda.million_codes_cuda(
        q, ck, cv, tk, tv, None, po, pm, pl, n=n, split_len=split_len, splits=splits, scale=d**-0.5, hkv=hkv,
        gq=hq // hkv, lq=1, per_head=False, nwarps=warps, design=design,
    )  # fmt: skip


def _cuda_codes_only_ms(q, ck, cv, cbk, cbv, d, warps) -> float:
    """Time of the CUDA codes kernel alone, with the splits ``million_attention`` would use."""
    return time_ms(_cuda_codes_call(q, ck, cv, cbk, cbv, d, warps), warmup=25, rep=100)


def bench_host(run, dev):
    """Batch 1, 8k, 4 bits: host microseconds per call (200 calls queued without a sync) of ``million_attention`` per
    variant and of the CUDA path's parts, and the GPU time of the whole call alone (one CUDA graph); a profiler
    table of the CUDA path goes to the log. When the host time exceeds the GPU time, eager decode is launch-bound."""
    from hf_effllm.benchmarking import graph_time_ms

    m = D // 2
    q, ck, cv, cbk, cbv, rk, rv = _inputs(1, HQ, HKV, 8192, WINDOW, D, m, K, torch.bfloat16, dev, seed=1)

    def host_us(fn, reps=200):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        us = (time.perf_counter() - t0) / reps * 1e6
        torch.cuda.synchronize()
        return us

    def merged_by(kernel):  # the call with the partials merged by the "triton" or the "cuda" kernel
        def call():
            with _design({"triton": "cuda-tmerge", "cuda": "cuda-cmerge"}[kernel]):
                return million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=D**-0.5, variant="cuda")

        return call

    ref = merged_by("triton")()
    err = ((merged_by("cuda")().float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"  cuda merge vs triton merge: rel_err {err:.2e}")
    run.meta["cuda_merge_rel_err_vs_triton"] = err
    parts = {
        "million_attention (cuda, triton merge)": merged_by("triton"),
        "million_attention (cuda, cuda merge)": merged_by("cuda"),
        "million_attention (smem)": lambda: million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=D**-0.5, variant="smem"),
        "cuda codes kernel launch": _cuda_codes_call(q, ck, cv, cbk, cbv, D, None),
        "cuda supports()": lambda: million_cuda.supports(q, ck, cv, cbk, HQ // HKV, 1),
        "cuda tables": lambda: million_cuda.kernel_tables(
            cbk, cbv, million_cuda.design_for(HQ // HKV, cbv, million_cuda.split_plan(8192, HKV, dev)[1])
        ),
    }  # fmt: skip
    for name, fn in parts.items():
        us = host_us(fn)
        gpu = None
        if name.startswith("million_attention"):
            try:
                gpu = graph_time_ms([fn])
            except Exception as e:  # a path that cannot be captured keeps its host figure
                print(f"  host {name}: no CUDA graph ({type(e).__name__}: {str(e)[:100]})")
        run.add(section="host", variant=name, batch=1, tokens=8192, ms=gpu, host_us=us,
                note="ms: GPU time alone (CUDA graph)" if gpu is not None else "host only")  # fmt: skip
        print(f"  host {name}: {us:.1f} us per call" + (f", GPU alone {gpu * 1e3:.1f} us" if gpu is not None else ""))
    from torch.profiler import ProfilerActivity, profile

    fn = parts[f"million_attention (cuda, {million_cuda.MERGE} merge)"]  # the default merge
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    # where the Python time of one call goes (functions by own time, 200 calls)
    import cProfile
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)


def bench_encode(run, dev, quick):
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    n = 32768 if not quick else 512
    hq, hkv, d, k = (HQ, HKV, D, K) if not quick else (8, 2, 32, 32)
    x = torch.randn(1, hkv, n, d, device=dev, dtype=dtype)
    q = torch.randn(1, hq, n, d, device=dev, dtype=dtype)
    prefill = time_ms(lambda: F.scaled_dot_product_attention(q, x, x, is_causal=True, enable_gqa=True),
                      warmup=5, rep=20)  # fmt: skip
    run.add(section="encode", variant="sdpa causal prefill, one layer (reference)", batch=1, tokens=n, ms=prefill)
    for bits, m in ((4, d // 2), (2, d // 4)):
        cb = torch.randn(1, m, k, d // m, device=dev, dtype=dtype)
        ref = pq_encode_reference(x, cb)
        for ev in ENCODE_VARIANTS:
            agree = float((pq_encode(x, cb, use_kernel=True, encode_variant=ev) == ref).float().mean())
            ms = time_ms(lambda cb=cb, ev=ev: (pq_encode(x, cb, encode_variant=ev), pq_encode(x, cb, encode_variant=ev)),
                         warmup=5 if not quick else 1, rep=20 if not quick else 1)  # fmt: skip
            run.add(section="encode", variant=f"pq_encode K+V {bits}-bit, one layer ({ev})", batch=1, tokens=n, ms=ms,
                    ok=agree > 0.999, note=f"{ms / prefill:.2f}x one layer's prefill attention; codes equal to the "
                    f"reference's: {100 * agree:.3f}%")  # fmt: skip
            print(
                f"  encode {bits}-bit {ev} N={n}: {ms:.3f} ms (prefill attention {prefill:.3f} ms), {agree:.5f} agree"
            )


def bench_e2e(run, dev, quick, prompt_len, new_tokens, layers, profile=False, rounds=3, batch=1):
    from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LogitsProcessor, LogitsProcessorList

    import hf_effllm
    from hf_effllm.cache.million.codebooks import MillionCodebooks, ModelSignature

    if quick:
        cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                          num_key_value_heads=2, head_dim=32, vocab_size=1000, max_position_embeddings=4096)  # fmt: skip
        dtype = torch.float32
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                          rope_theta=500000.0)  # fmt: skip
        dtype = torch.bfloat16
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    sig = ModelSignature.from_config(model.config)
    d = sig.head_dim
    books = MillionCodebooks(hf_effllm.MillionConfig(num_subspaces=d // 2), sig,
                             torch.randn(sig.num_layers, 1, d // 2, 256, 2), torch.randn(sig.num_layers, 1, d // 2, 256, 2))  # fmt: skip
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=dev)

    class StepClock(LogitsProcessor):
        """Stamps the time at every decode step (after a device sync), so that a token's time is the median
        interval between steps: free of the prefill's run-to-run noise, which a (total - prefill) difference
        spreads over the tokens."""

        def __init__(self):
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores):
            sync()
            self.stamps.append(time.perf_counter())
            return scores

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def gen(make_cache, n_new):
        """(seconds, cache, device allocations, seconds per step between the first and last token) of one
        generate of n_new tokens."""
        cache = make_cache()
        stats = torch.cuda.memory_stats if dev.type == "cuda" else dict
        clock = StepClock()
        sync()
        mallocs = stats().get("num_device_alloc", 0)
        t0 = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                       logits_processor=LogitsProcessorList([clock]), **hf_effllm.cache_kwargs(cache))  # fmt: skip
        sync()
        steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
        step = statistics.median(steps) if steps else float("nan")
        return time.perf_counter() - t0, cache, stats().get("num_device_alloc", 0) - mallocs, step

    rows = {}
    caches = (("DynamicCache (sdpa)", "sdpa", lambda: DynamicCache(config=model.config)),
              ("MillionCache 4-bit (million)", "million", lambda: hf_effllm.MillionCache(model.config, books)))  # fmt: skip
    times = {name: ([], [], [], []) for name, _, _ in caches}
    cache_bytes = {}  # per cache kind: the bytes of the last round's cache (the cache itself is not kept alive)
    with torch.no_grad():
        for _name, impl, make in caches:
            model.set_attn_implementation(impl)
            gen(make, 2)  # warm-up (compilation, allocator)
        # rounds interleaved between the caches; time per token two ways: (generate of new_tokens - generate of 1)
        # / the tokens between, from the medians (as before session 15), and the median interval between decode
        # steps (StepClock; the reported figure); device allocations (cudaMalloc) counted per generate of new_tokens
        for _ in range(rounds):
            for name, impl, make in caches:
                model.set_attn_implementation(impl)
                times[name][0].append(gen(make, 1)[0])
                total, cache, mallocs, step = gen(make, new_tokens)
                cache_bytes[name] = cache.nbytes if hasattr(cache, "nbytes") else sum(
                    lay.keys.numel() * lay.keys.element_size() * 2 for lay in cache.layers)  # fmt: skip
                del cache  # not alive during the next generate (batch 8 x 32k runs out of memory otherwise)
                times[name][1].append(total)
                times[name][2].append(mallocs)
                times[name][3].append(step)
    for name, impl, make in caches:
        firsts, totals, mallocs, steps = times[name]
        ttft = statistics.median(firsts)
        tpot_diff = (statistics.median(totals) - ttft) / (new_tokens - 1)
        tpot = statistics.median(steps)
        per_round = [round(s * 1e3, 2) for s in steps]
        per_round_diff = [round((t - f) / (new_tokens - 1) * 1e3, 1) for f, t in zip(firsts, totals)]
        mem = cache_bytes[name]
        rows[name] = (ttft, tpot, mem)
        run.add(section="e2e", variant=name, batch=batch, tokens=prompt_len, ttft_s=ttft, ms_per_token=tpot * 1e3,
                ms_per_token_diff=tpot_diff * 1e3, cache_mib=mem / 2**20,
                note=f"{layers if not quick else 2} layers, {new_tokens} new tokens; median step ms per round "
                f"{per_round}; (total - TTFT) ms/token per round {per_round_diff}; device allocations per generate "
                f"{mallocs}")  # fmt: skip
        print(f"  e2e {name}: TTFT {ttft:.3f} s, {tpot * 1e3:.2f} ms/token median step (rounds {per_round}; "
              f"(total - TTFT) method {tpot_diff * 1e3:.2f}: {per_round_diff}), cache {mem / 2**20:.1f} MiB, "
              f"cudaMalloc per generate {mallocs}")  # fmt: skip
        if profile:  # where a decode step's time goes: 1 vs 5 new tokens, the difference is 4 decode steps
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            model.set_attn_implementation(impl)
            for n_new in (1, 5):
                with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    gen(make, n_new)
                print(f"  profile {name}, generate with {n_new} new tokens:")
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    (t0, p0, m0), (t1, p1, m1) = rows.values()
    run.meta["e2e speedup per token (Dynamic/Million)"] = round(p0 / p1, 3)
    run.meta["e2e TTFT ratio (Million/Dynamic)"] = round(t1 / t0, 3)
    run.meta["e2e cache memory ratio (Dynamic/Million)"] = round(m0 / max(1, m1), 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (interpreter)")
    p.add_argument("--skip-e2e", action="store_true", help="kernel sections only")
    p.add_argument("--prompt", type=int, default=32768, help="end-to-end prompt length (default 32768)")
    p.add_argument("--new-tokens", type=int, default=32, help="end-to-end generated tokens (default 32)")
    p.add_argument("--layers", type=int, default=32, help="end-to-end model layers (default 32, Llama-3-8B)")
    p.add_argument("--decode-only", action="store_true", help="correctness and decode attention only")
    p.add_argument("--host-only", action="store_true", help="the host-overhead section only (GPU; with profiles)")
    p.add_argument("--e2e-only", action="store_true", help="the end-to-end generate section only")
    p.add_argument("--profile", action="store_true", help="with --e2e-only: profiler tables of each cache's generate")
    p.add_argument("--no-cudnn", action="store_true", help="sdpa without its cuDNN backend (flash or efficient)")
    p.add_argument("--batch", type=int, default=1, help="with --e2e-only: sequences per generate (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="with --e2e-only: timed rounds per cache (default 3)")
    default = ",".join(VARIANTS[:4])
    p.add_argument("--variants", default=default, help=f"of {','.join(VARIANTS)} (default {default})")
    p.add_argument("--name", default=None, help="results file name (default million_speed)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    variants = tuple(v for v in args.variants.split(",") if v)
    if not variants or any(v not in VARIANTS for v in variants):
        p.error(f"--variants={args.variants!r}: use a comma-separated subset of {','.join(VARIANTS)}")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or dev.type == "cpu"
    run = BenchmarkRun(args.name or ("million_speed_quick" if quick else "million_speed"),
                       "MILLION decode attention (Triton, codes + 128-token window) vs bf16 sdpa decode, prompt "
                       "encoding, end-to-end generate. speedup = sdpa ms / MILLION ms in the same run; bytes = HBM "
                       "bytes a step must read (codes + window for MILLION, K+V for sdpa).")  # fmt: skip
    if args.host_only:
        if dev.type != "cuda":
            p.error("--host-only needs a GPU (it times the CUDA path's host overhead)")
        bench_host(run, dev)
        if not args.no_write:
            print("wrote", *run.write(["section", "variant", "batch", "tokens", "ms", "host_us", "note"]))
        return 0
    if args.batch < 1 or args.rounds < 1:
        p.error(f"--batch={args.batch} and --rounds={args.rounds} must be at least 1")
    if args.no_cudnn:
        torch.backends.cuda.enable_cudnn_sdp(False)
        run.meta["sdpa backends"] = "cuDNN disabled (torch.backends.cuda.enable_cudnn_sdp(False))"
    if args.e2e_only:
        bench_e2e(run, dev, quick, args.prompt if not quick else 256, args.new_tokens if not quick else 4, args.layers,
                  profile=args.profile, rounds=args.rounds, batch=args.batch)  # fmt: skip
        if not args.no_write:
            print("wrote", *run.write(["section", "variant", "batch", "tokens", "ttft_s", "ms_per_token",
                                       "ms_per_token_diff", "cache_mib", "note"]))  # fmt: skip
        print(markdown_table(run.rows, ["section", "variant", "ttft_s", "ms_per_token", "ms_per_token_diff",
                                        "cache_mib", "note"]))  # fmt: skip
        for k, v in run.meta.items():
            print(f"- {k}: {v}")
        return 0
    print("[1/4] correctness")
    ok = check(run, dev, quick, variants)
    for variant, passed in ok.items():
        run.meta[f"correctness ({variant})"] = "passed" if passed else "FAILED"
    print("[2/4] decode attention")
    bench_decode(run, dev, quick, ok, variants)
    if args.decode_only:
        pass
    elif dev.type == "cuda":
        print("[2b] host overhead at batch 1")
        bench_host(run, dev)
    if not args.decode_only:
        print("[3/4] prompt encoding")
        bench_encode(run, dev, quick)
    if not (args.skip_e2e or args.decode_only):
        print("[4/4] end-to-end generate")
        bench_e2e(run, dev, quick, args.prompt if not quick else 256, args.new_tokens if not quick else 4, args.layers)
    cols = ["section", "variant", "batch", "tokens", "ms", "speedup", "tbps", "bytes", "host_us", "ttft_s",
            "ms_per_token", "cache_mib", "rel_err", "ok", "note"]  # fmt: skip
    if not args.no_write:
        print("wrote", *run.write(cols))
    print(markdown_table(run.rows, cols))
    for k, v in run.meta.items():
        print(f"- {k}: {v}")
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
