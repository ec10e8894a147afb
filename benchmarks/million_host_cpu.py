"""Host time of one MillionCache decode step per layer, on the CPU with the GPU launches stubbed.

At batch 1 (and 8) a decode step of a Llama-3-8B-shaped model is bound by the host on the H200 machine
(``million_speed_e2e*.md``): MillionCache's Python work per layer (the cache update, the attention call and its
two CUDA launches) is what it adds to the default cache's step. This measures that work without a GPU: the CPU is
taken for an H200-like device by ``kernels.million_cuda`` (capability 9.0, 132 SMs), ``cuLaunchKernel`` is replaced
by a no-op, so everything on the host runs as on the GPU path except the kernels themselves; the window's
concatenation is a real (small) copy on the CPU, where the GPU would launch a kernel. The flush's encoding (16
window tokens every 16 steps) is left out, its copies kept. Median of repeated batches of steps, microseconds per layer and step:
``update`` (MillionCache layer), ``attention`` (the registered attention function, i.e. ``million_attention`` and
its launches), and the parts of ``million_attention``.

    python benchmarks/million_host_cpu.py [--steps 1000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import types
from pathlib import Path

if importlib.util.find_spec("hf_effllm") is None:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import hf_effllm  # noqa: E402
from hf_effllm.benchmarking import BenchmarkRun, markdown_table  # noqa: E402

LAYERS = 4  # the cache's layers, updated in turn as in a forward (a new forward starts at layer 0)
# Llama-3's GQA (4 query heads per KV head) at the smallest shape the CUDA path takes: the host's work per call does
# not depend on the sizes, while on the CPU the window's concatenation is a real copy that would blur it
HQ, HKV, D = 8, 2, 64


def _fake_gpu() -> None:
    """The CPU taken for an H200-like GPU by the CUDA path; launches are no-ops (nothing is computed)."""
    from hf_effllm.kernels import cuda_rt
    from hf_effllm.kernels import million as km
    from hf_effllm.kernels import million_cuda as mc

    from hf_effllm.cache.million import cache as cache_mod

    mc._on_gpu = lambda device: True
    mc.capability = lambda device: (9, 0)
    mc.smem_limit = lambda device: 232448
    mc.sm_count = lambda device: 132
    mc.compiled = lambda key, *a, **kw: types.SimpleNamespace(func=1)
    cuda_rt._cu_launch_kernel = lambda: lambda *a: 0
    cuda_rt._current_stream = lambda: 77
    km.kernel_available = lambda *a, **k: True
    encode = cache_mod.pq_encode
    cache_mod.pq_encode = lambda x, cb, out=None, use_kernel=None: encode(x, cb, out=out, use_kernel=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000, help="steps per timed batch (default 1000)")
    p.add_argument("--repeats", type=int, default=7, help="timed batches per part (default 7)")
    p.add_argument("--tokens", type=int, default=2000, help="prompt tokens in the cache (default 2000)")
    p.add_argument("--window", type=int, default=16, help="exact window (residual_length, default 16)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    _fake_gpu()
    from hf_effllm.kernels import million_cuda as mc
    from hf_effllm.kernels.million import million_attention
    from transformers import LlamaConfig

    from hf_effllm.cache.million import cache as cache_mod
    from hf_effllm.cache.million.attention import million_attention_forward, set_pending, take_pending
    from hf_effllm.cache.million.codebooks import MillionCodebooks, ModelSignature

    cfg = LlamaConfig(hidden_size=512, intermediate_size=512, num_hidden_layers=LAYERS, num_attention_heads=HQ,
                      num_key_value_heads=HKV, head_dim=D, vocab_size=100)  # fmt: skip
    cfg._attn_implementation = "million"
    sig = ModelSignature.from_config(cfg)
    gen = torch.Generator().manual_seed(0)
    books = MillionCodebooks(hf_effllm.MillionConfig(num_subspaces=D // 2), sig,
                             torch.randn(LAYERS, 1, D // 2, 256, 2, generator=gen),
                             torch.randn(LAYERS, 1, D // 2, 256, 2, generator=gen))  # fmt: skip
    cache = hf_effllm.MillionCache(cfg, books, residual_length=args.window)
    cache.use_kernel = True
    dt = torch.float16
    prompt = torch.randn(1, HKV, args.tokens, D, generator=gen).to(dt)
    for i in range(LAYERS):  # prefill: codes + window (encoded by the reference)
        cache.update(prompt, prompt.clone(), i)
        set_pending(None)
    cache_mod.pq_encode = lambda *a, **k: None  # flushes keep their slicing and copies; the encoding is left out
    mods = [types.SimpleNamespace(layer_idx=i, training=False) for i in range(LAYERS)]
    q = torch.randn(1, HQ, 1, D, generator=gen).to(dt)
    kn = torch.randn(1, HKV, 1, D, generator=gen).to(dt)
    saved = [(lay.keys.clone(), lay.values.clone()) for lay in cache.layers]

    def reset():  # the windows back to their size after the prefill, so every batch times the same state
        for lay, (k, v) in zip(cache.layers, saved):
            lay.keys, lay.values = k, v
        set_pending(None)

    def step():  # one layer's update and attention, the layers in turn as in a forward
        for i in range(LAYERS):
            ek, ev = cache.update(kn, kn, i)
            million_attention_forward(mods[i], q, ek, ev, None)

    def update_only():
        for i in range(LAYERS):
            cache.update(kn, kn, i)
            set_pending(None)

    mod = mods[0]
    ek, ev = cache.update(kn, kn, 0)
    state = take_pending(mod, ek)
    reset()
    args_ma = (q, state.codes_k, state.codes_v, state.codebook_k, state.codebook_v, ek, ev)
    attn_call = lambda: million_attention(*args_ma, scale=D**-0.5)  # noqa: E731
    b, hkv, n = 1, HKV, state.codes_k.shape[2]
    splits, split_len = mc.split_plan(n, b * hkv, q.device)
    po = torch.empty(b * hkv * splits * mc.ROWS * D)
    pm = torch.empty(b * hkv * splits * mc.ROWS)
    design = mc.design_for(HQ // HKV, state.codebook_v, split_len)
    tk, tv = mc.kernel_tables(state.codebook_k, state.codebook_v, design)
    out = torch.empty_like(q)
    codes_call = lambda: mc.million_codes_cuda(  # noqa: E731
        q, state.codes_k, state.codes_v, tk, tv, None, po, pm, pm, n=n, split_len=split_len, splits=splits,
        scale=D**-0.5, hkv=hkv, gq=HQ // HKV, lq=1, per_head=False, design=design,
    )  # fmt: skip
    merge_call = lambda: mc.million_merge_cuda(  # noqa: E731
        q, ek, ev, None, po, pm, pm, out, r=ek.shape[2], splits=splits, scale=D**-0.5, hkv=hkv, gq=HQ // HKV, lq=1
    )
    parts = {
        "decode step (update + attention)": step,
        "MillionCache layer update": update_only,
        "million_attention (codes + merge launches)": attn_call,
        "million_codes_cuda (launch path)": codes_call,
        "million_merge_cuda (launch path)": merge_call,
    }
    per = {
        name: LAYERS if name in ("decode step (update + attention)", "MillionCache layer update") else 1
        for name in parts
    }  # the first two time all layers per call
    run = BenchmarkRun("million_host_cpu", __doc__.split("\n\n")[1].replace("\n", " "))
    for name, fn in parts.items():
        times = []
        for _ in range(args.repeats):
            reset()
            for _ in range(20):
                fn()
            reset()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times.append((time.perf_counter() - t0) / args.steps / per[name] * 1e6)
        reset()
        us = statistics.median(times)
        run.add(part=name, us_per_call=round(us, 1), min_us=round(min(times), 1), max_us=round(max(times), 1))
        print(f"  {name}: {us:.1f} us (min {min(times):.1f}, max {max(times):.1f})")
    run.meta["layers (in turn)"] = LAYERS
    run.meta["window tokens"] = int(saved[0][0].shape[2])
    run.meta["coded tokens"] = int(n)
    cols = ["part", "us_per_call", "min_us", "max_us"]
    if not args.no_write:
        print("wrote", *run.write(cols))
    print(markdown_table(run.rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
