"""MILLION quality: perplexity of the embedded SmolLM2-135M with the PQ cache really in use, vs full precision.

Protocol (per context length, 2k and 8k): windows of held-out text (the corpus's eval split); the first half of each
window is prefilled into the cache (exact attention), the second half is fed through the cache in chunks of
``--decode-chunk`` tokens and scored, so every scored token attends to PQ codes of the older tokens. Rows:

* dense: the same protocol with ``DynamicCache`` (the reference; ``vs_dense_pct`` is relative to it);
* MILLION 4-bit (M = head_dim/2) and 2-bit (M = head_dim/4), 256 centroids, one codebook per layer and K/V,
  128-token exact window (this package's defaults);
* the anchor's setting: one codebook shared by all layers, no window (residual_length 0), at 4 and 2 bits;
* with ``--sink-lengths 0 4 16``: each MILLION/anchor row again with the first N tokens of each window kept exact
  (attention sinks, ``MillionCache(..., sink_length=N)``; same codebooks), named "..., sinks N";
* transformers' ``QuantizedCache`` int4/int2 (quanto, HQQ backends) where the backend is installed; a row says
  when it is not.

Codebooks are trained on the train split only (calibration windows as long as the context, so keys see every RoPE
position they will be decoded at).

Usage::

    python benchmarks/million_quality.py            # GPU: 2k and 8k contexts, full settings
    python benchmarks/million_quality.py --quick    # CPU: 2k only, fewer tokens and k-means iterations
    python benchmarks/million_quality.py --contexts 8192 --variants "per head" --sink-lengths 0 4 16  # sinks

Results: ``benchmarks/results/million_quality.{json,md}`` (``million_quality_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

if importlib.util.find_spec("hf_effllm") is None:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import hf_effllm  # noqa: E402
from hf_effllm.benchmarking import BenchmarkRun, markdown_table  # noqa: E402
from hf_effllm.cache.million.codebooks import ModelSignature, collect_kv, fit_codebooks  # noqa: E402
from hf_effllm.data import calibration_batches  # noqa: E402

# the grouping axis each QuantizedCache backend is given: groups of 64 consecutive elements (one token of one head at
# head_dim 64) for both, quanto's axis 0 and HQQ's axis 1. HQQ's axis 0 (transformers' default) groups elements
# numel/64 apart instead, a grouping that changes as the cache grows and is re-quantized at each flush: the strongest
# setting of each backend is the baseline
QC_AXIS = {"quanto": 0, "hqq": 1}


def quantized_cache_factories(config) -> dict:
    """transformers' QuantizedCache per installed backend; missing backends map to the reason."""
    from transformers import QuantizedCache

    out: dict = {}
    for backend, module in (("quanto", "optimum.quanto"), ("hqq", "hqq")):
        try:
            __import__(module)
        except Exception as e:
            out[backend] = f"backend not installed ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
            continue
        axis = QC_AXIS[backend]
        for nbits in (4, 2):
            out[f"{backend} int{nbits}"] = lambda b=backend, n=nbits, a=axis: QuantizedCache(
                b, config, nbits=n, axis_key=a, axis_value=a, residual_length=128
            )
    return out


COLS = ["context", "variant", "perplexity", "vs_dense_pct", "bits", "sinks", "tokens", "distortion_k",
        "distortion_v", "seconds", "note"]  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized: 2k context, 4k tokens, few k-means iterations")
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="context lengths (default 2048 8192)")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens per context (default 65536)")
    p.add_argument("--decode-chunk", type=int, default=None, help="tokens per forward after the prefix (default 16)")
    p.add_argument(
        "--no-kernel", action="store_true", help="score through the PyTorch path instead of the Triton kernel"
    )
    p.add_argument(
        "--variants",
        default=None,
        help="comma-separated substrings (';'-separated when one contains a comma); only the MILLION/anchor/"
        "QuantizedCache rows whose name contains one of them run (the dense row always runs), e.g. 'per head,anchor' "
        "or '2-bit, per head;anchor'",
    )
    p.add_argument(
        "--sink-lengths",
        type=int,
        nargs="+",
        default=None,
        help="run each MILLION/anchor row with these sink lengths (first tokens kept exact; default: 0 only)",
    )
    p.add_argument("--name", default=None, help="results file stem (default million_quality[_quick])")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    sep = ";" if args.variants and ";" in args.variants else ","  # ';' to match names that contain commas
    wanted = [w.strip() for w in args.variants.split(sep) if w.strip()] if args.variants else None
    sink_lengths = args.sink_lengths or [0]
    if any(s < 0 for s in sink_lengths):
        p.error(f"--sink-lengths {sink_lengths}: each must be >= 0")

    def chosen(name: str) -> bool:
        return wanted is None or any(w in name for w in wanted)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or dev.type == "cpu"
    contexts = args.contexts or ([2048] if quick else [2048, 8192])
    eval_tokens = args.eval_tokens or (4096 if quick else 65536)
    chunk = args.decode_chunk or (64 if quick else 16)
    kernel = False if args.no_kernel else None
    iters, windows, max_points = (5, 2, 4096) if quick else (25, 8, 65536)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16

    model = hf_effllm.load_model(dtype=dtype, device=dev)
    tok = hf_effllm.load_tokenizer()
    model.set_attn_implementation("million")
    ids = tok(hf_effllm.corpus_text("eval"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    sig = ModelSignature.from_config(model.config)
    d = sig.head_dim
    run = BenchmarkRun(
        args.name or ("million_quality_quick" if quick else "million_quality"),
        "Perplexity of SmolLM2-135M on held-out text (eval split) with the KV cache in use: each window's first half "
        f"prefilled, the rest scored through the cache in chunks of {chunk}. vs_dense_pct relative to DynamicCache "
        "under the same protocol. Codebooks: train split only.",
    )
    run.meta.update(eval_tokens=eval_tokens, decode_chunk=chunk, kmeans_iters=iters, dtype=str(dtype), kernel=kernel,
                    calibration_windows=windows, max_points=max_points, sink_lengths=sink_lengths)  # fmt: skip
    for ctx_len in contexts:
        t0 = time.perf_counter()
        calib = calibration_batches(tok, nsamples=windows, seqlen=ctx_len, seed=0)
        keys, values = collect_kv(model, calib, batch_size=1)
        settings = {
            "MILLION 4-bit, per layer, window 128": hf_effllm.MillionConfig(num_subspaces=d // 2),
            "MILLION 4-bit, per head, window 128": hf_effllm.MillionConfig(num_subspaces=d // 2, scope="head"),
            "MILLION 2-bit, per layer, window 128": hf_effllm.MillionConfig(num_subspaces=d // 4),
            "MILLION 2-bit, per head, window 128": hf_effllm.MillionConfig(num_subspaces=d // 4, scope="head"),
            "anchor 4-bit: shared codebook, no window": hf_effllm.MillionConfig(
                num_subspaces=d // 2, scope="shared", residual_length=0
            ),
            "anchor 2-bit: shared codebook, no window": hf_effllm.MillionConfig(
                num_subspaces=d // 4, scope="shared", residual_length=0
            ),
        }
        if quick and wanted is None:  # per-head rows only when asked for by --variants on the CPU
            settings.pop("MILLION 2-bit, per head, window 128")
            settings.pop("MILLION 4-bit, per head, window 128")
        settings = {name: cfg for name, cfg in settings.items() if chosen(name)}
        books = {}
        for name, cfg in settings.items():
            cfg.kmeans_iters, cfg.max_points = iters, max_points
            books[name] = fit_codebooks(keys, values, sig, cfg, device=dev)
        del keys, values
        train_s = time.perf_counter() - t0
        print(f"context {ctx_len}: trained {len(books)} codebook sets in {train_s:.0f} s")
        common = dict(context_length=ctx_len, prefix_length=ctx_len // 2, decode_chunk=chunk,
                      max_tokens=eval_tokens, progress=False)  # fmt: skip
        t1 = time.perf_counter()
        dense = hf_effllm.perplexity(model, ids, cache_factory=lambda: DynamicCache(config=model.config), **common)
        run.add(context=ctx_len, variant="dense (DynamicCache)", perplexity=dense.perplexity, vs_dense_pct=0.0,
                tokens=dense.num_tokens, seconds=time.perf_counter() - t1)  # fmt: skip
        print(f"  dense {dense.perplexity:.3f}")
        for base, book in books.items():
            for sinks in sink_lengths:
                name = f"{base}, sinks {sinks}" if sinks else base
                t1 = time.perf_counter()
                res = hf_effllm.perplexity(
                    model,
                    ids,
                    cache_factory=lambda b=book, s=sinks: hf_effllm.MillionCache(
                        model.config, b, sink_length=s, use_kernel=kernel
                    ),
                    **common,
                )
                cache = hf_effllm.MillionCache(model.config, book, sink_length=sinks)
                run.add(context=ctx_len, variant=name, perplexity=res.perplexity,
                        vs_dense_pct=100 * (res.perplexity / dense.perplexity - 1), tokens=res.num_tokens,
                        bits=book.config.bits_per_element(d), sinks=sinks,
                        distortion_k=book.meta["relative_distortion_keys"],
                        distortion_v=book.meta["relative_distortion_values"],
                        seconds=time.perf_counter() - t1, note=f"residual_length {cache.residual_length}")  # fmt: skip
                print(f"  {name}: {res.perplexity:.3f} ({100 * (res.perplexity / dense.perplexity - 1):+.2f}%)")
        model.set_attn_implementation("sdpa")  # QuantizedCache returns dequantized K/V for any attention function
        for name, factory in quantized_cache_factories(model.config).items():
            if not chosen(f"QuantizedCache {name}"):
                continue
            if isinstance(factory, str):
                run.add(context=ctx_len, variant=f"QuantizedCache {name}", note=factory)
                print(f"  QuantizedCache {name}: {factory}")
                continue
            t1 = time.perf_counter()
            try:
                res = hf_effllm.perplexity(model, ids, cache_factory=factory, **common)
            except Exception as e:
                note = f"failed: {type(e).__name__}: {e}"[:200]
                run.add(context=ctx_len, variant=f"QuantizedCache {name}", note=note)
                print(f"  QuantizedCache {name}: {note}")
                continue
            axis, pct = QC_AXIS[name.split()[0]], 100 * (res.perplexity / dense.perplexity - 1)
            run.add(context=ctx_len, variant=f"QuantizedCache {name}", perplexity=res.perplexity, vs_dense_pct=pct,
                    tokens=res.num_tokens, seconds=time.perf_counter() - t1,
                    note=f"residual_length 128, q_group_size 64, axis {axis}")  # fmt: skip
            print(f"  QuantizedCache {name}: {res.perplexity:.3f} ({pct:+.2f}%)")
        model.set_attn_implementation("million")
        if not args.no_write:  # after each context, so a run cut short keeps what it measured
            run.write(COLS)
    if not args.no_write:
        print("wrote", *run.write(COLS))
    print(markdown_table(run.rows, COLS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
