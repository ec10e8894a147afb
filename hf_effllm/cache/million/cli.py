"""The MILLION stage of ``hf-effllm quickstart``: train small codebooks, measure perplexity with the cache in use.

Keys/values are collected once from a few thousand calibration tokens of the train split; 4-bit (M = head_dim/2)
and 2-bit (M = head_dim/4) codebooks, 256 centroids each, are fitted with a few k-means iterations. Each window of
held-out text is then scored through the cache: its first half is prefilled (exact), the second half is fed in
chunks through the cache, so every scored token attends to PQ codes of the older tokens. A dense ``DynamicCache``
row scored the same way is the reference for the same tokens. The 4-bit codebooks are written to ``million-4bit/``.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from ...compat import CACHE_KWARG  # noqa: F401  (the perplexity helper passes caches under this name)
from ...data import calibration_batches
from ...quickstart import StageContext, register_stage
from .cache import MillionCache
from .codebooks import ModelSignature, collect_kv, fit_codebooks
from .config import MillionConfig

STAGE_TOKENS = 4096  # held-out tokens scored by the stage (its budget is 2.5 min on 2 CPU cores)
CALIBRATION_WINDOWS, CALIBRATION_SEQLEN, KMEANS_ITERS, MAX_POINTS = 2, 1024, 4, 2048


def million_stage(ctx: StageContext) -> list[dict[str, Any]]:
    """Quickstart stage: returns rows for the dense-through-cache reference and MILLION at 4 and 2 bits."""
    from transformers import DynamicCache

    t0 = time.perf_counter()
    model = copy.deepcopy(ctx.model)  # the attention implementation is switched; later stages get theirs untouched
    model.set_attn_implementation("million")
    sig = ModelSignature.from_config(model.config)
    ids = calibration_batches(ctx.tokenizer, nsamples=CALIBRATION_WINDOWS, seqlen=CALIBRATION_SEQLEN, seed=0)
    keys, values = collect_kv(model, ids, batch_size=1)
    books = {}
    for bits, m in ((4, sig.head_dim // 2), (2, sig.head_dim // 4)):
        cfg = MillionConfig(
            num_subspaces=m, nbits=8, residual_length=128, kmeans_iters=KMEANS_ITERS, max_points=MAX_POINTS
        )
        books[bits] = fit_codebooks(keys, values, sig, cfg)
        books[bits].meta.update(calibration_tokens=int(ids.numel()), calibration_seqlen=CALIBRATION_SEQLEN)
    del keys, values
    train_s = time.perf_counter() - t0

    ctx_len = ctx.options.context_length
    prefix = ctx_len // 2
    chunk = max(16, ctx_len // 32)
    eval_ids = ctx.eval_ids[: max(2 * ctx_len, min(STAGE_TOKENS, ctx.eval_ids.numel()))]
    common = dict(prefix_length=prefix, decode_chunk=chunk, max_tokens=eval_ids.numel())
    rows = []
    t1 = time.perf_counter()
    dense = ctx.evaluate(model, cache_factory=lambda: DynamicCache(config=model.config), **common)
    rows.append({"variant": "dense through DynamicCache (same protocol)", **dense,
                 "seconds": round(time.perf_counter() - t1, 1)})  # fmt: skip
    for bits, book in books.items():
        t1 = time.perf_counter()
        res = ctx.evaluate(model, cache_factory=lambda b=book: MillionCache(model.config, b), **common)
        res["vs_dense_pct"] = round(100.0 * (res["perplexity"] / dense["perplexity"] - 1.0), 2)
        m = book.num_subspaces
        sinks = book.config.sink_length
        rows.append({"variant": f"MILLION {bits}-bit (M={m}, 256 centroids, window 128, {sinks} exact sinks)", **res,
                     "seconds": round(time.perf_counter() - t1 + train_s / 2, 1)})  # fmt: skip
    books[4].save_pretrained(ctx.folder / "million-4bit")
    ctx.files.append(("million-4bit/", "MILLION 4-bit codebooks (MillionCodebooks.from_pretrained)"))
    note = (f"MILLION rows: calibration {int(ids.numel())} train-split tokens, k-means {KMEANS_ITERS} iterations "
            f"(train {train_s:.0f} s); each window: {prefix} tokens prefilled, the rest scored through the cache "
            f"in chunks of {chunk}; first {eval_ids.numel()} held-out tokens")  # fmt: skip
    for r in rows:
        r["protocol"] = note
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


register_stage("million", million_stage, order=20)
