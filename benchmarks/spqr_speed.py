"""SpQR kernel speed: fused dequantize + matrix-vector / matrix product vs bf16 ``torch.matmul``, same run.

For each weight shape (in -> out: 4096 -> 11008, 11008 -> 4096, 4096 -> 4096, Llama-7B MLP/attention) a random
Gaussian weight with 1% heavy-tailed entries is SpQR-quantized (3-bit codes, 16x16 bi-level groups, act-order,
outliers; identity Hessian, since speed does not depend on calibration). Then, for batch 1 and 16:

1. correctness first: the Triton path against the PyTorch reference (dequantize in fp32, matmul), relative error;
2. timing: bf16 ``x @ W^T`` with the dense weight, the SpQR fused kernels at their default launch settings, a sweep
   of launch settings (Triton: rows per program x split-K x words per step; CUDA: warps x chunks in flight) whose
   best entry is reported, for the three variants (``v1``: the first Triton kernel; ``v2``: folded zero-point for
   one row, tensor cores for 2..16, columns ``*_v2``; ``cuda``: ``kernels.spqr_cuda``, columns ``*_cuda``;
   ``cuda_raw``: its ``decode="raw"`` path), and the
   dequantize-then-matmul prefill path; eager (``do_bench``) and in a CUDA graph over distinct weight copies
   (no launch overhead, nothing L2-resident: how a decode step runs when captured);
3. end to end: greedy decode tokens/s of the embedded SmolLM2-135M, bf16 vs SpQR (3-bit, quick calibration):
   eager ``generate`` (``tokens_per_s``, host work included) and one decode step with a ``StaticCache``
   captured in a CUDA graph and replayed (``static_step_ms``: the GPU's time per token).

Usage (repo root)::

    python benchmarks/spqr_speed.py            # GPU (H200): full shapes, ~3 min
    python benchmarks/spqr_speed.py --quick    # CPU smoke check: tiny shapes, Triton interpreter, tiny model

Results: ``benchmarks/results/spqr_speed.{json,md}`` (``spqr_speed_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if importlib.util.find_spec("hf_effllm") is None:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if "--quick" in sys.argv:
    import torch as _t

    if not _t.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first kernel import

import torch  # noqa: E402
from hf_effllm.kernels.spqr import (  # noqa: E402
    kernel_layout,
    layout_bytes,
    spqr_dequantize_triton,
    spqr_gemv_triton,
    spqr_matmul_reference,
)
from hf_effllm.kernels.spqr_cuda import cuda_layout, spqr_dequantize_cuda, spqr_gemv_cuda  # noqa: E402
from hf_effllm.kernels.spqr_cuda import supports as cuda_supports  # noqa: E402

from hf_effllm import SpQRConfig, SpQRLinear  # noqa: E402
from hf_effllm.benchmarking import (  # noqa: E402
    BenchmarkRun,
    graph_time_ms,
    markdown_table,
    module_setting,
    rel_err,
    time_ms,
)
from hf_effllm.quant.spqr import spqr_quantize_matrix  # noqa: E402

FULL_SHAPES = [(4096, 11008), (11008, 4096), (4096, 4096)]
QUICK_SHAPES = [(96, 160), (160, 96)]
SWEEP = [(bo, sk, bkw) for bo in (64, 128) for bkw in (8, 16) for sk in (4, 8, 16, 32)]
VARIANTS = ("v1", "v2")  # kernels.spqr.GEMV_VARIANTS: v1 = the measured kernel, v2 = folded zero / tensor cores
# kernels.spqr_cuda: warps per block x ring stages per warp x blocks per SM (the grid)
CUDA_SWEEP = [(8, 8, 1), (8, 8, 2), (8, 8, 3), (8, 4, 2), (4, 8, 4), (4, 12, 3), (16, 4, 1), (16, 6, 1)]


def make_layer(inp: int, out: int, device: torch.device, threshold: float) -> SpQRLinear:
    g = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(out, inp, generator=g) * 0.02
    w[torch.rand(w.shape, generator=g) < 0.01] *= 6
    w = w.to(device)
    cfg = SpQRConfig(bits=3, group_size=16, stats_bits=3, stats_group_size=16, outlier_threshold=threshold)
    res = spqr_quantize_matrix(w, None, cfg)
    return SpQRLinear.from_packed(res.tensors, cfg, in_features=inp, bias=None)


def _copies(nbytes: int, total: int = 256 << 20) -> int:
    """Distinct data copies so one graph replay reads ``total`` bytes (well over the 50-60 MB L2)."""
    return max(1, -(-total // max(1, nbytes)))


def _clone_layout(lay: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in lay.items()}


def measure(layer: SpQRLinear, x: torch.Tensor, dev: torch.device, quick: bool) -> dict[str, Any]:
    """Correctness, then bf16 matmul vs the fused kernels (default launch and a sweep) vs dequantize + matmul.

    Variants: the Triton kernels ``v1`` and ``v2`` and the CUDA kernel ``cuda`` (GPU only). Two timings each:
    ``*_ms`` eager (``do_bench``, launch included, L2 flushed) and ``*_graph_ms`` (CUDA graph over distinct copies
    of the weights, so launch overhead is gone and nothing is L2-resident: the regime of a decode step captured in a
    graph). ``speedup*`` is the graph ratio; ``speedup*_eager`` the eager one."""
    act = x.dtype
    t, meta = layer.packed_tensors(), layer.packed_meta()
    lay = kernel_layout(t, **meta)
    use_cuda = dev.type == "cuda" and cuda_supports(x, meta) is None
    clay = cuda_layout(t, **meta) if use_cuda else None
    calls = {v: (lambda lo, v=v: spqr_gemv_triton(x, t, layout=lo, variant=v, **meta)) for v in VARIANTS}
    if use_cuda:
        calls["cuda"] = lambda lo: spqr_gemv_cuda(x, lo)
        calls["cuda_raw"] = lambda lo: spqr_gemv_cuda(x, lo, decode="raw")
    lays = {v: (clay if v.startswith("cuda") else lay) for v in calls}
    w_dense = layer.dequantize().to(act)  # the same weight, dense, for the baseline
    ref = spqr_matmul_reference(x.float(), t, **meta)
    errs = {v: rel_err(fn(lays[v]), ref) for v, fn in calls.items()}
    err = max(errs.values())
    reps = dict(warmup=2, rep=5) if quick else dict(warmup=25, rep=100)
    base_ms = time_ms(lambda: torch.matmul(x, w_dense.T), device=dev, **reps)
    row: dict[str, Any] = dict(ok=err < (2e-2 if act != torch.float32 else 1e-4), bf16_ms=base_ms)
    for v, fn in calls.items():
        sfx = "" if v == "v1" else f"_{v}"
        ms = time_ms(lambda fn=fn, v=v: fn(lays[v]), device=dev, **reps)
        row.update({f"rel_err{sfx}": errs[v], f"spqr{sfx}_ms": ms, f"speedup{sfx}_eager": base_ms / ms})
    row["kernel_bits"] = round(8 * layout_bytes(lay) / (layer.in_features * layer.out_features), 3)
    row["dequant_matmul_ms"] = time_ms(
        lambda: torch.matmul(x, spqr_dequantize_triton(t, dtype=act, layout=lay, original_order=True, **meta).T),
        device=dev,
        **reps,
    )
    if dev.type != "cuda":
        return row
    if use_cuda:
        row["kernel_cuda_bits"] = round(8 * layout_bytes(clay) / (layer.in_features * layer.out_features), 3)
        row["dequant_matmul_cuda_ms"] = time_ms(
            lambda: torch.matmul(x.index_select(-1, clay["perm_long"]), spqr_dequantize_cuda(clay, act).T),
            device=dev,
            **reps,
        )
    dense = [w_dense.clone() for _ in range(_copies(w_dense.numel() * w_dense.element_size()))]
    copies = {v: [_clone_layout(lays[v]) for _ in range(_copies(layout_bytes(lays[v])))] for v in calls}
    base_g = graph_time_ms([lambda w=w: torch.matmul(x, w.T) for w in dense])
    sweeps: list[tuple[str, tuple, Any]] = []
    for variant, (bo, sk, bkw) in ((v, c) for v in VARIANTS for c in SWEEP):
        if variant == "v2" and x.shape[0] > 1 and bkw < 16:
            continue  # the tensor-core kernel takes at least 16 words a step: same as bkw=16
        nw = 8 if bo >= 256 else 4

        def fn(lo, bo=bo, sk=sk, nw=nw, bkw=bkw, variant=variant):
            return spqr_gemv_triton(
                x, t, layout=lo, block_out=bo, split_k=sk, num_warps=nw, block_k_words=bkw, variant=variant, **meta
            )

        sweeps.append((variant, f"BO={bo},split_k={sk},bkw={bkw},warps={nw}", fn))
    if use_cuda:
        for (warps, stages, per_sm), decode in ((c, d) for d in ("dequant", "raw") for c in CUDA_SWEEP):

            def fn(lo, w=warps, s=stages, b=per_sm, d=decode):
                return spqr_gemv_cuda(x, lo, warps=w, stages=s, blocks_per_sm=b, decode=d)

            variant = "cuda" if decode == "dequant" else "cuda_raw"
            sweeps.append((variant, f"warps={warps},stages={stages},blocks_per_sm={per_sm}", fn))
    best: dict[str, tuple[float, str]] = {}
    for variant, name, fn in sweeps:
        try:
            ms = graph_time_ms([lambda lo=lo, fn=fn: fn(lo) for lo in copies[variant]])
        except Exception as e:  # a launch setting the compiler rejects: report, keep sweeping
            print(f"  {variant} {name}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        if variant not in best or ms < best[variant][0]:
            best[variant] = (ms, name)
    row["bf16_graph_ms"] = base_g
    for v, fn in calls.items():  # default launch, then the best of the sweep, per variant
        default_g = graph_time_ms([lambda lo=lo, fn=fn: fn(lo) for lo in copies[v]])
        b = best.get(v)
        sfx = "" if v == "v1" else f"_{v}"
        row.update(
            {
                f"spqr{sfx}_graph_ms": default_g,
                f"speedup{sfx}": base_g / default_g,
                f"best{sfx}_graph_ms": b[0] if b else None,
                f"best{sfx}_speedup": base_g / b[0] if b else None,
                f"best{sfx}_launch": b[1] if b else None,
                f"kernel{sfx}_gbps": (layout_bytes(lays[v]) / 1e9) / ((b[0] if b else default_g) / 1e3),
            }
        )
    return row


def kernel_rows(run: BenchmarkRun, dev: torch.device, quick: bool, threshold: float) -> None:
    act = torch.float32 if quick and dev.type == "cpu" else torch.bfloat16
    for inp, out in QUICK_SHAPES if quick else FULL_SHAPES:
        layer = make_layer(inp, out, dev, threshold)
        for batch in (1, 16):
            x = torch.randn(batch, inp, device=dev).to(act)
            row = run.add(
                shape=f"{inp}->{out}",
                batch=batch,
                dtype=str(act).replace("torch.", ""),
                avg_bits=round(layer.avg_bits, 3),
                outlier_pct=round(100 * layer.nnz / (inp * out), 2),
                **measure(layer, x, dev, quick),
            )
            print(markdown_table([row]).splitlines()[-1], flush=True)


# Phases of the CUDA decode kernel left out in --breakdown (kernels.spqr_cuda._SKIP; the results are then wrong).
PHASES = [
    ("full kernel", ()),
    ("without outliers", ("outliers",)),
    ("without the activation gather", ("gather",)),
    ("without decode + mma", ("mma",)),
    ("loads, reduction and stores only", ("gather", "outliers", "mma")),
]


def breakdown_rows(run: BenchmarkRun, dev: torch.device, threshold: float) -> None:
    """Where the CUDA decode kernel's time goes: its graph time (default launch) with phases left out."""
    from hf_effllm.kernels import spqr_cuda

    for inp, out in FULL_SHAPES:
        layer = make_layer(inp, out, dev, threshold)
        t, meta = layer.packed_tensors(), layer.packed_meta()
        clay = cuda_layout(t, **meta)
        nbytes = layout_bytes(clay)
        copies = [_clone_layout(clay) for _ in range(_copies(nbytes))]
        w = layer.dequantize().to(torch.bfloat16)
        dense = [w.clone() for _ in range(_copies(w.numel() * w.element_size()))]
        for batch in (1, 16):
            x = torch.randn(batch, inp, device=dev, dtype=torch.bfloat16)
            base = graph_time_ms([lambda w=w, x=x: torch.matmul(x, w.T) for w in dense])
            for name, skip in PHASES:
                with module_setting(spqr_cuda, _SKIP=frozenset(skip)):
                    ms = graph_time_ms([lambda lo=lo, x=x: spqr_gemv_cuda(x, lo) for lo in copies])
                row = run.add(shape=f"{inp}->{out}", batch=batch, phase=name, graph_ms=ms, bf16_graph_ms=base,
                              speedup=base / ms, layout_gbps=nbytes / 1e9 / (ms / 1e3))  # fmt: skip
                print(markdown_table([row]).splitlines()[-1], flush=True)
        del copies, dense


# kernels.spqr_octet: warps per block x warps per octet x steps in flight per warp x blocks per SM
OCTET_SWEEP = [
    (16, 16, 4, 1), (16, 8, 4, 1), (16, 4, 4, 1), (16, 4, 8, 1), (16, 2, 8, 1), (8, 8, 4, 2), (8, 8, 4, 3),
    (8, 4, 4, 3), (8, 4, 8, 3), (8, 2, 8, 3), (8, 1, 8, 3), (32, 16, 4, 1), (32, 8, 4, 1), (4, 2, 8, 4),
]  # fmt: skip


OCTET_READ = ("codes", "stats", "stats2", "oent", "optr", "perm")


def _octet_case(inp: int, out: int, dev: torch.device, threshold: float) -> tuple:
    """The benchmark layer of one shape for the octet kernels' modes: ``(layer, tensors, meta, layout, layout
    copies, dense copies)``, the copies (of the octet layout, and of the bf16 dense weight for the baseline) enough
    that one CUDA-graph replay over them reads nothing from L2."""
    from hf_effllm.kernels.spqr_octet import octet_layout

    layer = make_layer(inp, out, dev, threshold)
    t, meta = layer.packed_tensors(), layer.packed_meta()
    olay = octet_layout(t, **meta)
    ocopies = [_clone_layout(olay) for _ in range(_copies(layout_bytes(olay)))]
    w = layer.dequantize().to(torch.bfloat16)
    dense = [w.clone() for _ in range(_copies(w.numel() * w.element_size()))]
    return layer, t, meta, olay, ocopies, dense


def octet_rows(run: BenchmarkRun, dev: torch.device, threshold: float) -> None:
    """The octet kernel (``kernels.spqr_octet``) against bf16 and the CUDA kernel of ``kernels.spqr_cuda``, all
    in CUDA graphs over distinct copies: error vs the fp32 reference, default launch and the best of a sweep."""
    from hf_effllm.kernels.spqr_octet import spqr_octet_dequant, spqr_octet_gemv

    for inp, out in FULL_SHAPES:
        layer, t, meta, olay, ocopies, dense = _octet_case(inp, out, dev, threshold)
        clay = cuda_layout(t, **meta)
        obytes = sum(olay[k].numel() * olay[k].element_size() for k in OCTET_READ if k in olay)  # read per call
        ccopies = [_clone_layout(clay) for _ in range(_copies(layout_bytes(clay)))]
        wd = spqr_octet_dequant(olay, torch.bfloat16)
        wdr = layer.dequantize()[:, olay["perm_long"]] if "perm_long" in olay else layer.dequantize()
        for batch in (1, 4, 16):
            x = torch.randn(batch, inp, device=dev, dtype=torch.bfloat16)
            ref = spqr_matmul_reference(x.float(), t, **meta)
            err = rel_err(spqr_octet_gemv(x, olay), ref)
            errs = [rel_err(spqr_octet_gemv(x, olay, warps=a, per_octet=b, depth=c, blocks_per_sm=d), ref)
                    for a, b, c, d in OCTET_SWEEP]  # fmt: skip
            base = graph_time_ms([lambda w=w, x=x: torch.matmul(x, w.T) for w in dense])
            old = graph_time_ms([lambda lo=lo, x=x: spqr_gemv_cuda(x, lo) for lo in ccopies])
            default = graph_time_ms([lambda lo=lo, x=x: spqr_octet_gemv(x, lo) for lo in ocopies])
            best = (default, "default")
            for a, b, c, d in OCTET_SWEEP:
                ms = graph_time_ms(
                    [lambda lo=lo, x=x, a=a, b=b, c=c, d=d: spqr_octet_gemv(x, lo, warps=a, per_octet=b, depth=c,
                     blocks_per_sm=d) for lo in ocopies]
                )  # fmt: skip
                if ms < best[0]:
                    best = (ms, f"warps={a},per_octet={b},depth={c},blocks_per_sm={d}")
            row = run.add(
                shape=f"{inp}->{out}", batch=batch, rel_err=err, max_sweep_rel_err=max(errs),
                dequant_rel_err=rel_err(wd, wdr), bf16_graph_ms=base, cuda_graph_ms=old, octet_graph_ms=default,
                octet_speedup=base / default, best_octet_graph_ms=best[0], best_octet_speedup=base / best[0],
                best_launch=best[1], cuda_speedup=base / old, octet_gbps=obytes / 1e9 / (best[0] / 1e3),
                kernel_bits=round(8 * obytes / (inp * out), 3),
            )  # fmt: skip
            print(markdown_table([row]).splitlines()[-1], flush=True)
        del ocopies, ccopies, dense


def _best_launch(fn, x, olay, ocopies, ref, names, sweep, default_ms):
    """``((ms, label), rel_errs)``: the fastest of the default launch (``default_ms``) and the ``sweep``'s launches
    (tuples of the keywords ``names`` of ``fn``), each timed like the default in CUDA graphs over ``ocopies``, and the
    error vs ``ref`` of every swept launch that ran; launches that do not fit shared memory are skipped."""
    from hf_effllm import HfEffllmError

    best, errs = (default_ms, "default"), []
    for values in sweep:
        kw = dict(zip(names, values))
        try:
            errs.append(rel_err(fn(x, olay, **kw), ref))
        except HfEffllmError:  # does not fit shared memory at this batch
            continue
        ms = graph_time_ms([lambda lo=lo, kw=kw: fn(x, lo, **kw) for lo in ocopies])
        if ms < best[0]:
            best = (ms, ",".join(f"{k}={v}" for k, v in kw.items()))
    return best, errs


# kernels.spqr_octet.spqr_octet_split: warps x steps per stage x stages x blocks per SM x steps per chunk (None: fewest)
SPLIT_SWEEP = [
    (16, 4, 2, 1, None), (16, 2, 4, 1, None), (12, 4, 4, 1, None), (8, 8, 3, 1, None), (12, 8, 2, 1, None),
    (16, 4, 3, 1, 16), (8, 4, 4, 2, None),
]  # fmt: skip
SPLIT_READ = ("codes", "stats", "stats2", "sent", "sptr", "perm")


def split_rows(run: BenchmarkRun, dev: torch.device, threshold: float) -> None:
    """The chunked octet kernel (``spqr_octet_split``) against bf16 and the kernels the dispatch used before it
    (``spqr_octet_gemv``; ``spqr_octet_stream`` at 1-2 rows), all in CUDA graphs over distinct copies: error vs
    the fp32 reference, default launch and the best of a sweep, at 1 to 16 activation rows."""
    from hf_effllm.kernels import spqr_octet
    from hf_effllm.kernels.spqr_octet import spqr_octet_gemv, spqr_octet_split, spqr_octet_stream

    for inp, out in FULL_SHAPES:
        _, t, meta, olay, ocopies, dense = _octet_case(inp, out, dev, threshold)
        obytes = sum(olay[k].numel() * olay[k].element_size() for k in SPLIT_READ if k in olay)
        for batch in (1, 2, 4, 8, 16):
            x = torch.randn(batch, inp, device=dev, dtype=torch.bfloat16)
            ref = spqr_matmul_reference(x.float(), t, **meta)
            y = spqr_octet_split(x, olay)
            err, again = rel_err(y, ref), torch.equal(spqr_octet_split(x, olay), y)
            base = graph_time_ms([lambda w=w, x=x: torch.matmul(x, w.T) for w in dense])
            gemv = graph_time_ms([lambda lo=lo, x=x: spqr_octet_gemv(x, lo) for lo in ocopies])
            stream = (
                graph_time_ms([lambda lo=lo, x=x: spqr_octet_stream(x, lo) for lo in ocopies]) if batch <= 2 else None
            )
            default = graph_time_ms([lambda lo=lo, x=x: spqr_octet_split(x, lo) for lo in ocopies])
            with module_setting(spqr_octet, _SPLIT_TILE="lane"):  # the other correction-tile order, default launch
                lane_err = rel_err(spqr_octet_split(x, olay), ref)
                lane = graph_time_ms([lambda lo=lo, x=x: spqr_octet_split(x, lo) for lo in ocopies])
            names = ("warps", "stage_steps", "stages", "blocks_per_sm", "chunk_steps")
            best, errs = _best_launch(spqr_octet_split, x, olay, ocopies, ref, names, SPLIT_SWEEP, default)
            errs.append(err)
            row = run.add(
                shape=f"{inp}->{out}", batch=batch, rel_err=err, max_sweep_rel_err=max(errs), deterministic=again,
                bf16_graph_ms=base, octet_gemv_graph_ms=gemv, stream_graph_ms=stream, split_graph_ms=default,
                split_speedup=base / default, split_lane_rel_err=lane_err, split_lane_graph_ms=lane,
                split_lane_speedup=base / lane, best_split_graph_ms=best[0], best_split_speedup=base / best[0],
                best_launch=best[1], octet_gemv_speedup=base / gemv,
                stream_speedup=base / stream if stream else None, split_gbps=obytes / 1e9 / (best[0] / 1e3),
                kernel_bits=round(8 * obytes / (inp * out), 3),
            )  # fmt: skip
            print(markdown_table([row]).splitlines()[-1], flush=True)
        del ocopies, dense


FLAT_SWEEP = [(8, 3, 2), (8, 4, 2), (8, 2, 2), (4, 3, 4), (16, 3, 1)]  # (warps, depth, blocks_per_sm)
ROUNDS = 3  # interleaved timing rounds of --flat and --small (medians)


def _interleaved(
    calls: dict[str, Any], timer: Callable[[Any], float]
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """``timer(calls[k])`` for every ``k`` in turn, ``ROUNDS`` times: ``(rounds, medians)``, each keyed as ``calls``."""
    rounds: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(ROUNDS):
        for k, c in calls.items():
            rounds[k].append(timer(c))
    return rounds, {k: sorted(v)[len(v) // 2] for k, v in rounds.items()}


def flat_rows(run: BenchmarkRun, dev: torch.device, threshold: float) -> None:
    """``spqr_octet_flat`` (prep kernel + programmatic dependent launch, no shared-memory staging) against the
    kernel the dispatch used before it (``spqr_octet_split``; ``spqr_octet_stream`` at 1-2 rows) and bf16, at 1 to
    16 rows: CUDA graphs over distinct copies, ``ROUNDS`` rounds interleaved (medians); a launch sweep of the new
    kernel once per row count; error vs the fp32 reference; determinism (two calls, same bits)."""
    from hf_effllm.kernels.spqr_flat import spqr_octet_flat
    from hf_effllm.kernels.spqr_octet import spqr_octet_split, spqr_octet_stream

    for inp, out in FULL_SHAPES:
        _, t, meta, olay, ocopies, dense = _octet_case(inp, out, dev, threshold)
        for batch in (1, 4, 8, 12, 16):
            x = torch.randn(batch, inp, device=dev, dtype=torch.bfloat16)
            ref = spqr_matmul_reference(x.float(), t, **meta)
            y = spqr_octet_flat(x, olay)
            err, again = rel_err(y, ref), torch.equal(spqr_octet_flat(x, olay), y)
            sweep = {}
            for cfg in FLAT_SWEEP:
                launch = dict(zip(("warps", "depth", "blocks_per_sm"), cfg))
                sweep[cfg] = graph_time_ms([lambda lo=lo, x=x, k=launch: spqr_octet_flat(x, lo, **k) for lo in ocopies])
            calls = {
                "bf16": [lambda w=w, x=x: torch.matmul(x, w.T) for w in dense],
                "flat": [lambda lo=lo, x=x: spqr_octet_flat(x, lo) for lo in ocopies],
                "split": [lambda lo=lo, x=x: spqr_octet_split(x, lo) for lo in ocopies],
            }
            if batch <= 2:
                calls["stream"] = [lambda lo=lo, x=x: spqr_octet_stream(x, lo) for lo in ocopies]
            rounds, med = _interleaved(calls, graph_time_ms)
            best = min(sweep, key=sweep.get)
            row = run.add(
                shape=f"{inp}->{out}", batch=batch, rel_err=err, rel_err_split=rel_err(spqr_octet_split(x, olay), ref),
                deterministic=again, bf16_graph_ms=med["bf16"], flat_graph_ms=med["flat"],
                split_graph_ms=med["split"], stream_graph_ms=med.get("stream"), flat_speedup=med["bf16"] / med["flat"],
                split_speedup=med["bf16"] / med["split"],
                stream_speedup=med["bf16"] / med["stream"] if "stream" in med else None,
                flat_vs_split=med["split"] / med["flat"], best_flat_graph_ms=sweep[best], best_launch=str(best),
                sweep_ms={str(c): round(v, 4) for c, v in sweep.items()},
                rounds={k: [round(v, 4) for v in vs] for k, vs in rounds.items()},
            )  # fmt: skip
            print(markdown_table([row]).splitlines()[-1], flush=True)
        del ocopies, dense


def split_timing_rows(run: BenchmarkRun, dev: torch.device, threshold: float) -> None:
    """Where ``spqr_octet_split``'s warps spend their cycles (a ``clock64()`` build, ``spqr_octet._SPLIT_TIMING``):
    per warp its cycles in all and the shares spent waiting for ring stages, staging the activations, finishing
    octets, writing each stage's outlier corrections into the tile, running the stage's steps (decode, corrections,
    mma) and after them (clearing the tile, refilling the stage); other = the rest (loop control); medians over the
    warps of one launch, default launch."""
    from hf_effllm.kernels import spqr_octet
    from hf_effllm.kernels.spqr_octet import octet_layout, spqr_octet_split

    names = ("wait", "stage", "finish", "corr", "steps", "after")
    for inp, out in FULL_SHAPES:
        layer = make_layer(inp, out, dev, threshold)
        t, meta = layer.packed_tensors(), layer.packed_meta()
        olay = octet_layout(t, **meta)
        for batch in (1, 4, 16):
            x = torch.randn(batch, inp, device=dev, dtype=torch.bfloat16)
            ref = spqr_matmul_reference(x.float(), t, **meta)
            times = torch.zeros(
                8 * 32 * torch.cuda.get_device_properties(dev).multi_processor_count, dtype=torch.int64, device=dev
            )
            with module_setting(spqr_octet, _SPLIT_TIMING=True, _SPLIT_TIMES=[times]):
                for _ in range(3):  # the last launch's cycles are kept
                    times.fill_(-1)
                    y = spqr_octet_split(x, olay)
                torch.cuda.synchronize()
            w = times.view(-1, 8)
            w = w[w[:, 0] > 0].double()  # warps that ran (empty blocks return before the timers)
            share = w[:, 1:7] / w[:, :1]
            row = run.add(
                shape=f"{inp}->{out}", batch=batch, rel_err=rel_err(y, ref), warps=w.shape[0],
                cycles_median=float(w[:, 0].median()), cycles_max=float(w[:, 0].max()),
                **{f"{n}_share": float(share[:, i].median()) for i, n in enumerate(names)},
                other_share=float((1 - share.sum(1)).median()),
            )  # fmt: skip
            print(markdown_table([row]).splitlines()[-1], flush=True)


# kernels.spqr_octet.spqr_octet_stream: warps per block x steps per ring stage x ring stages per warp x blocks per SM
STREAM_SWEEP = [
    (16, 8, 4, 1), (16, 8, 2, 1), (16, 8, 3, 1), (16, 4, 4, 1), (16, 4, 8, 1), (8, 8, 8, 1), (8, 8, 4, 2),
    (12, 8, 4, 1), (32, 4, 2, 1), (32, 8, 2, 1),
]  # fmt: skip


def stream_rows(run: BenchmarkRun, dev: torch.device, threshold: float) -> None:
    """The streaming octet kernel (``spqr_octet_stream``) against bf16 and the octet kernel ``spqr_octet_gemv``,
    all in CUDA graphs over distinct copies: error vs the fp32 reference, default launch and the best of a sweep."""
    from hf_effllm.kernels.spqr_octet import spqr_octet_gemv, spqr_octet_stream

    for inp, out in FULL_SHAPES:
        _, t, meta, olay, ocopies, dense = _octet_case(inp, out, dev, threshold)
        obytes = sum(olay[k].numel() * olay[k].element_size() for k in OCTET_READ if k in olay)  # read per call
        for batch in (1, 2, 4):
            x = torch.randn(batch, inp, device=dev, dtype=torch.bfloat16)
            ref = spqr_matmul_reference(x.float(), t, **meta)
            err = rel_err(spqr_octet_stream(x, olay), ref)
            base = graph_time_ms([lambda w=w, x=x: torch.matmul(x, w.T) for w in dense])
            gemv = graph_time_ms([lambda lo=lo, x=x: spqr_octet_gemv(x, lo) for lo in ocopies])
            default = graph_time_ms([lambda lo=lo, x=x: spqr_octet_stream(x, lo) for lo in ocopies])
            names = ("warps", "stage_steps", "stages", "blocks_per_sm")
            best, errs = _best_launch(spqr_octet_stream, x, olay, ocopies, ref, names, STREAM_SWEEP, default)
            errs.append(err)
            row = run.add(
                shape=f"{inp}->{out}", batch=batch, rel_err=err, max_sweep_rel_err=max(errs), bf16_graph_ms=base,
                octet_gemv_graph_ms=gemv, stream_graph_ms=default, stream_speedup=base / default,
                best_stream_graph_ms=best[0], best_stream_speedup=base / best[0], best_launch=best[1],
                octet_gemv_speedup=base / gemv, stream_gbps=obytes / 1e9 / (best[0] / 1e3),
                kernel_bits=round(8 * obytes / (inp * out), 3),
            )  # fmt: skip
            print(markdown_table([row]).splitlines()[-1], flush=True)
        del ocopies, dense


STREAM_PHASES = [
    ("full", ()), ("no outliers", ("outliers",)), ("no outliers, no fixup", ("outliers", "fixup")),
    ("stream + fixup only", ("compute", "outliers")), ("stream only", ("compute", "outliers", "fixup")),
    ("stream only, one copy per stage", ("compute", "outliers", "fixup", "onecopy")),
    ("compute, one copy per stage", ("outliers", "fixup", "onecopy")),
]  # fmt: skip


def stream_breakdown_rows(run: BenchmarkRun, dev: torch.device, threshold: float) -> None:
    """``spqr_octet_stream``'s graph time with phases compiled out (``spqr_octet._SKIP``), batch 1."""
    from hf_effllm.kernels import spqr_octet

    from hf_effllm import HfEffllmError

    for inp, out in FULL_SHAPES:
        _, t, meta, olay, ocopies, dense = _octet_case(inp, out, dev, threshold)
        nbytes = sum(olay[k].numel() * olay[k].element_size() for k in OCTET_READ if k in olay)
        x = torch.randn(1, inp, device=dev, dtype=torch.bfloat16)
        base = graph_time_ms([lambda w=w, x=x: torch.matmul(x, w.T) for w in dense])
        for a, b, c, d in [(16, 8, 2, 1), (16, 8, 4, 1), (32, 8, 2, 1)]:
            kw = dict(warps=a, stage_steps=b, stages=c, blocks_per_sm=d)
            try:  # does it fit shared memory at this width
                spqr_octet.spqr_octet_stream(x, olay, **kw)
            except HfEffllmError:
                continue
            for name, skip in STREAM_PHASES:
                with module_setting(spqr_octet, _SKIP=frozenset(skip)):
                    ms = graph_time_ms(
                        [lambda lo=lo, x=x, kw=kw: spqr_octet.spqr_octet_stream(x, lo, **kw) for lo in ocopies]
                    )
                row = run.add(shape=f"{inp}->{out}", launch=f"{a},{b},{c},{d}", phase=name, graph_ms=ms,
                              bf16_graph_ms=base, speedup=base / ms, gbps=nbytes / 1e9 / (ms / 1e3))  # fmt: skip
                print(markdown_table([row]).splitlines()[-1], flush=True)
        del ocopies, dense


def static_step_ms(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> tuple[float, list[int]]:
    """Milliseconds per greedy decode step with a ``StaticCache``: on CUDA, after two eager warm-up steps, one step
    (forward, argmax, position update) is captured in a CUDA graph and replayed ``steps - 2`` times, so the figure
    is the GPU's time per token without the host work of eager ``generate`` (the tokens stay on the GPU: the list
    returned is empty); elsewhere ``steps`` steps run eagerly and the list holds the tokens they chose."""
    from transformers import StaticCache

    from hf_effllm.compat import cache_kwargs

    dev, n = prompt.device, prompt.shape[1]
    if steps < 3:
        raise ValueError(f"steps={steps}; static_step_ms needs at least 3 (two warm-up steps on CUDA, then replays)")
    cache = StaticCache(config=model.config, max_cache_len=n + steps + 4)
    chosen: list[int] = []
    with torch.no_grad():
        out = model(input_ids=prompt, cache_position=torch.arange(n, device=dev), use_cache=True, **cache_kwargs(cache))
        ids = out.logits[:, -1:].argmax(-1)
        pos = torch.tensor([n], device=dev)

        def step() -> None:
            o = model(input_ids=ids, position_ids=pos[None], cache_position=pos, use_cache=True, **cache_kwargs(cache))
            ids.copy_(o.logits[:, -1:].argmax(-1))
            pos.add_(1)

        if dev.type != "cuda":
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
                chosen.append(int(ids))
            return (time.perf_counter() - t0) * 1e3 / steps, chosen
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile the kernels and warm the allocator outside the capture
            step()
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps - 2):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / (steps - 2), chosen


def decode_rows(run: BenchmarkRun, dev: torch.device, quick: bool, new_tokens: int) -> None:
    import copy

    import hf_effllm
    from hf_effllm.testing import tiny_model

    if quick:
        model = tiny_model("llama").to(dev)
        calib = torch.randint(0, 256, (4, 64))
        dtype = torch.float32
    else:
        model = hf_effllm.load_model(dtype="bfloat16", device=dev)
        tok = hf_effllm.load_tokenizer()
        dtype = torch.bfloat16
        calib = None
    qmodel = copy.deepcopy(model)
    cfg = SpQRConfig(bits=3, nsamples=4 if quick else 32, seqlen=64 if quick else 512)
    t0 = time.perf_counter()
    if quick:
        hf_effllm.quantize_spqr(qmodel, cfg, calibration_ids=calib)
    else:
        hf_effllm.quantize_spqr(qmodel, cfg, tokenizer=tok)
    quant_s = time.perf_counter() - t0
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device=dev)
    for name, m in (("bf16" if not quick else "fp32", model), ("spqr-3bit", qmodel)):
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        m.generate(prompt, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        m.generate(prompt, **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter() - t0
        step_ms, _ = static_step_ms(m, prompt, new_tokens)
        run.add(
            shape="decode SmolLM2-135M" if not quick else "decode tiny llama",
            batch=1,
            dtype=str(dtype).replace("torch.", ""),
            avg_bits=cfg.avg_bits if name.startswith("spqr") else None,
            tokens_per_s=new_tokens / s,
            static_step_ms=step_ms,
            static_tokens_per_s=1e3 / step_ms,
            note=f"{name}; quantize {quant_s:.1f} s" if name.startswith("spqr") else name,
        )


SMALL_SWEEP = [(16, 4, 4), (8, 8, 2), (16, 8, 2), (16, 16, 1), (16, 16, 2), (8, 4, 2), (4, 4, 2)]  # gemv launches
LARGE_LAUNCH = (16, 4, 4, 1)  # spqr_octet_gemv's launch for every layer before session 19 (still its large-layer one)


def _graph_with_writer(calls: list[Callable[[torch.Tensor], Any]], x0: torch.Tensor, xs: list[torch.Tensor]) -> float:
    """Milliseconds per call of ``calls[i](xs[i])`` in one CUDA graph where an elementwise kernel writes each
    ``xs[i]`` just before (as the norm before a projection does in a decode step), median of 7 trials of 20
    replays."""

    def body() -> None:
        for i, f in enumerate(calls):
            torch.mul(x0, 1.0 + i * 1e-3, out=xs[i])
            f(xs[i])

    return graph_time_ms([body]) / len(calls)


def small_rows(run: BenchmarkRun, dev: torch.device, threshold: float) -> None:
    """``spqr_octet_gemv`` on the embedded model's own layers (SmolLM2-135M: 576 -> 192, 576 -> 576, 576 -> 1536,
    1536 -> 576), where a decode step's products are latency-bound: per shape, all the model's layers of that shape
    in one CUDA graph, each after an elementwise kernel that writes its activations, at 1 and 4 rows: bf16, the
    large-layer launch for every layer (``LARGE_LAUNCH``, the default before session 19), the default
    (``kernels.spqr_octet.gemv_launch``) and a sweep, 3 rounds interleaved; then one decode step of the whole model
    (``static_step_ms``) in bf16, SpQR with ``LARGE_LAUNCH`` everywhere and SpQR with the default, 3 rounds
    interleaved. The model is quantized 3-bit with a small calibration (8 x 256 tokens; timing only)."""
    import copy

    from hf_effllm.kernels import spqr_octet

    import hf_effllm

    model = hf_effllm.load_model(dtype="bfloat16", device=dev)
    qmodel = copy.deepcopy(model)
    cfg = SpQRConfig(bits=3, nsamples=8, seqlen=256, outlier_threshold=threshold)
    hf_effllm.quantize_spqr(qmodel, cfg, tokenizer=hf_effllm.load_tokenizer())
    shapes: dict[tuple[int, int], list[tuple[Any, Any]]] = {}
    for (_, mod), (_, fmod) in zip(qmodel.named_modules(), model.named_modules()):
        if isinstance(mod, SpQRLinear):
            shapes.setdefault((mod.in_features, mod.out_features), []).append((mod, fmod))
    large = dict(zip(("warps", "per_octet", "depth", "blocks_per_sm"), LARGE_LAUNCH))
    for (inp, out), pairs in sorted(shapes.items()):
        lays = [m.octet_layout() for m, _ in pairs]
        for batch in (1, 4):
            x0 = torch.randn(batch, inp, device=dev, dtype=torch.bfloat16)
            xs = [torch.empty_like(x0) for _ in pairs]
            ref = torch.nn.functional.linear(x0.float(), pairs[0][0].dequantize().float().to(dev))
            errs = [rel_err(spqr_octet.spqr_octet_gemv(x0, lays[0], **k), ref) for k in ({}, large)]
            default = spqr_octet.default_launch(batch, lays[0]["no"], lays[0]["ks"], dev)
            calls = {
                "bf16": [lambda x, w=f.weight: torch.nn.functional.linear(x, w) for _, f in pairs],
                "large": [lambda x, lo=lo: spqr_octet.spqr_octet_gemv(x, lo, **large) for lo in lays],
                "default": [lambda x, lo=lo: spqr_octet.spqr_octet_gemv(x, lo) for lo in lays],
            }
            rounds, med = _interleaved(calls, lambda fns, x0=x0, xs=xs: _graph_with_writer(fns, x0, xs) * 1e3)
            sweep = {}
            for w, p, d in SMALL_SWEEP:
                fns = [lambda x, lo=lo, k=(w, p, d): spqr_octet.spqr_octet_gemv(x, lo, warps=k[0], per_octet=k[1], depth=k[2]) for lo in lays]  # fmt: skip
                sweep[str((w, p, d))] = round(_graph_with_writer(fns, x0, xs) * 1e3, 3)
            row = run.add(
                shape=f"{inp}->{out}", batch=batch, layers=len(pairs), rel_err=errs[0], rel_err_large=errs[1],
                default_launch=str(default[:3]), bf16_us=med["bf16"], large_us=med["large"],
                default_us=med["default"], default_vs_large=med["large"] / med["default"],
                default_x_bf16=med["bf16"] / med["default"], large_x_bf16=med["bf16"] / med["large"],
                best_sweep=min(sweep, key=sweep.get), sweep_us=sweep,
                rounds={k: [round(v, 3) for v in vs] for k, vs in rounds.items()},
            )  # fmt: skip
            print(markdown_table([row]).splitlines()[-1], flush=True)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device=dev)

    def large_step() -> float:
        with module_setting(spqr_octet, default_launch=lambda *a: LARGE_LAUNCH):
            return static_step_ms(qmodel, prompt, 64)[0]

    steps, med = _interleaved(
        {
            "bf16": lambda: static_step_ms(model, prompt, 64)[0],
            "spqr_large": large_step,
            "spqr_default": lambda: static_step_ms(qmodel, prompt, 64)[0],
        },
        lambda step: step(),
    )
    row = run.add(
        shape="decode step SmolLM2-135M", batch=1, bf16_us=med["bf16"] * 1e3, large_us=med["spqr_large"] * 1e3,
        default_us=med["spqr_default"] * 1e3, default_vs_large=med["spqr_large"] / med["spqr_default"],
        default_x_bf16=med["bf16"] / med["spqr_default"], large_x_bf16=med["bf16"] / med["spqr_large"],
        rounds={k: [round(v, 4) for v in vs] for k, vs in steps.items()},
    )  # fmt: skip
    print(markdown_table([row]).splitlines()[-1], flush=True)


# the GPU-only modes: flag -> (results name, description, rows function)
GPU_MODES = {
    "breakdown": (
        "spqr_speed_breakdown",
        "Where the SpQR CUDA decode kernel's time goes (3-bit, 16x16 groups, bf16 activations, default launch): "
        "its CUDA-graph time over distinct weight copies with phases of the kernel compiled out (the results "
        "are then wrong; timing only), against bf16 torch.matmul on the same weight. layout_gbps = bytes of "
        "the kernel layout (codes, statistics, outliers, permutation) / time.",
        breakdown_rows,
    ),
    "octet": (
        "spqr_speed_octet",
        "SpQR 3-bit (16x16 groups, act-order, outliers) decode products, bf16 activations: the octet kernel "
        "(kernels.spqr_octet: activations in the mma A operand, one weight row per lane) vs the CUDA kernel of "
        "kernels.spqr_cuda (weights in the A operand) vs bf16 torch.matmul, all as CUDA graphs over distinct "
        "copies (no launch overhead, nothing L2-resident). rel_err vs the fp32 reference (default launch; "
        "max_sweep_rel_err over the sweep); octet_gbps = bytes the kernel reads / best time; kernel_bits = those "
        "bytes per weight x 8.",
        octet_rows,
    ),
    "stream": (
        "spqr_speed_stream",
        "SpQR 3-bit (16x16 groups, act-order, outliers) decode products, bf16 activations: the streaming octet "
        "kernel (kernels.spqr_octet.spqr_octet_stream: whole octets per block, the block's steps split evenly over "
        "its warps, bulk copies into per-warp shared-memory rings) vs the octet kernel spqr_octet_gemv vs bf16 "
        "torch.matmul, all as CUDA graphs over distinct copies (no launch overhead, nothing L2-resident). "
        "rel_err vs the fp32 reference (default launch; max_sweep_rel_err over the sweep); stream_gbps = bytes "
        "the kernel reads / best time; kernel_bits = those bytes per weight x 8.",
        stream_rows,
    ),
    "split": (
        "spqr_speed_split",
        "SpQR 3-bit (16x16 groups, act-order, outliers) decode products, bf16 activations, 1-16 rows: the chunked "
        "octet kernel (kernels.spqr_octet.spqr_octet_split: the input dimension cut into chunks whose activations "
        "fit shared memory, outliers added to the decoded weights before the mma, bulk-copy rings per warp) vs "
        "bf16 torch.matmul vs the octet kernels used before (spqr_octet_gemv; spqr_octet_stream at 1-2 rows), all "
        "as CUDA graphs over distinct copies (no launch overhead, nothing L2-resident). rel_err vs the fp32 "
        "reference (default launch; max_sweep_rel_err over the sweep); deterministic: two calls give the same "
        "bits; split_lane_*: the same default launch with the lane-major correction tile (spqr_octet._SPLIT_TILE; the default is interleaved); "
        "split_gbps = bytes the kernel reads / best time; kernel_bits = those bytes per weight x 8.",
        split_rows,
    ),
    "flat": (
        "spqr_speed_flat",
        "SpQR 3-bit (16x16 groups, act-order, outliers) decode products, bf16 activations, 1-16 rows: "
        "kernels.spqr_flat.spqr_octet_flat (a prep kernel gathers and scales the activations once into global "
        "memory; the decode kernel, launched with programmatic stream serialization, streams each warp's equal "
        "share of the (octet, step) items with register prefetch, no shared-memory staging, no block barrier) vs "
        "spqr_octet_split (the dispatch's kernel for 8-16 rows before) and spqr_octet_stream (1-2 rows) vs bf16 "
        "torch.matmul, all as CUDA graphs over distinct copies (no launch overhead, nothing L2-resident), 3 rounds "
        "interleaved, medians (rounds lists them); flat times the default launch (kernels.spqr_flat.flat_launch), "
        "sweep_ms the launch sweep; rel_err vs the fp32 reference; deterministic: two calls give the same bits.",
        flat_rows,
    ),
    "small": (
        "spqr_gemv_small",
        "spqr_octet_gemv on the embedded model's own layer shapes (SmolLM2-135M, 3-bit, bf16 activations), where "
        "decode products are latency-bound: per shape all the model's layers of that shape in one CUDA graph, each "
        "after an elementwise kernel writing its activations (as in a decode step), at 1 and 4 rows; us per call "
        "(medians of 3 interleaved rounds) for bf16 F.linear, the gemv with the large-layer launch (16, 4, 4, 1) "
        "on every layer (large: the default before session 19) and with the default launch (gemv_launch), plus a "
        "launch sweep (warps, per_octet, depth); then one greedy decode step of the whole model (StaticCache, CUDA "
        "graph; us) in bf16 and SpQR with either launch rule. Quantized with a small calibration (8 x 256 "
        "tokens; timing only); rel_err vs the fp32 product of the dequantized weight.",
        small_rows,
    ),
    "split_timing": (
        "spqr_speed_split_timing",
        "Where spqr_octet_split's warps spend their cycles (3-bit, 16x16 groups, bf16 activations, default launch): "
        "a build with clock64() timers (kernels.spqr_octet._SPLIT_TIMING); per warp its SM cycles in all and the "
        "shares spent waiting for its ring stages (bulk copies), staging the activations, finishing octets "
        "(partial sums, chunk counters), writing each stage's outlier corrections into the tile (corr), running "
        "the stage's steps (decode, corrections, mma: steps) and after them (clearing the tile, refilling the "
        "stage: after); other = the rest (loop control). Medians over the warps of one launch; rel_err of the "
        "timed build vs the fp32 reference.",
        split_timing_rows,
    ),
    "stream_breakdown": (
        "spqr_speed_stream_breakdown",
        "Where spqr_octet_stream's time goes (3-bit, 16x16 groups, bf16 activations, batch 1): its CUDA-graph "
        "time over distinct weight copies with phases compiled out (the results are then wrong; timing only), "
        "against bf16 torch.matmul. launch = warps, stage_steps, stages, blocks_per_sm; gbps = bytes of the "
        "layout the kernel reads / time.",
        stream_breakdown_rows,
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    p.add_argument("--outlier-threshold", type=float, default=0.2, help="SpQR outlier threshold (default 0.2)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated in the decode test")
    p.add_argument("--skip-decode", action="store_true", help="only the kernel shapes")
    p.add_argument("--skip-kernels", action="store_true", help="only the end-to-end decode")
    p.add_argument("--breakdown", action="store_true", help="only the CUDA kernel's time with phases left out")
    p.add_argument("--octet", action="store_true", help="only the octet kernel vs bf16 and the CUDA kernel")
    p.add_argument("--stream", action="store_true", help="only the streaming octet kernel vs bf16 and the octet kernel")
    p.add_argument("--stream-breakdown", action="store_true", help="only spqr_octet_stream with phases left out")
    p.add_argument("--split", action="store_true", help="only the chunked octet kernel vs bf16 and the octet kernels")
    p.add_argument("--flat", action="store_true", help="only spqr_octet_flat vs spqr_octet_split, stream and bf16")
    p.add_argument(
        "--small", action="store_true", help="only spqr_octet_gemv on the embedded model's layers (needs the model)"
    )
    p.add_argument(
        "--split-timing", action="store_true", help="only spqr_octet_split's cycles per warp (clock64 build)"
    )
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not args.quick:
        raise SystemExit("spqr_speed.py needs a CUDA GPU; use --quick for the CPU smoke check.")
    for flag, (name, text, rows) in GPU_MODES.items():
        if getattr(args, flag):
            if dev.type != "cuda":
                raise SystemExit(f"spqr_speed.py --{flag.replace('_', '-')} times CUDA kernels: it needs a CUDA GPU.")
            run = BenchmarkRun(name, text)
            run.meta["outlier_threshold"] = args.outlier_threshold
            rows(run, dev, args.outlier_threshold)
            print(run.write()[1].read_text())
            return
    kernels_text = (
        "SpQR 3-bit (16x16 bi-level groups, act-order, 16-bit outliers) fused dequantize+matvec/matmul kernels "
        "(Triton v1, v2; CUDA: *_cuda) vs bf16 torch.matmul on the same dense weight. speedup = bf16 time / SpQR time (>1 is faster) with both "
        "timed in a CUDA graph over distinct weight copies (*_graph_ms: no launch overhead, weights not in L2); "
        "speedup_eager from do_bench (launch included). best_* is the fastest launch setting of a sweep; "
        "kernel_bits = bytes the kernel layout holds per weight x 8; dequant_matmul_ms is the prefill path."
    )
    decode_text = (
        "End-to-end greedy decoding at batch 1 of the embedded model in bf16 and quantized with SpQR 3-bit "
        "(16x16 bi-level groups, act-order, outliers): tokens_per_s = eager generate of --new-tokens tokens after "
        "a 16-token random prompt (host-bound at this model size); static_step_ms = one decode step with a "
        "StaticCache captured in a CUDA graph and replayed (the GPU's time per token, see static_step_ms), "
        "static_tokens_per_s its inverse; avg_bits of the SpQR format; quantize time in note."
    )
    run = BenchmarkRun(
        ("spqr_decode" if args.skip_kernels else "spqr_speed") + ("_quick" if args.quick else ""),
        decode_text
        if args.skip_kernels
        else kernels_text + ("" if args.skip_decode else " Decode rows: " + decode_text),
    )
    run.meta["outlier_threshold"] = args.outlier_threshold
    if not args.skip_kernels:
        kernel_rows(run, dev, args.quick, args.outlier_threshold)
    if not args.skip_decode:
        decode_rows(run, dev, args.quick, 8 if args.quick else args.new_tokens)
    json_path, md_path = run.write()
    print(md_path.read_text())


if __name__ == "__main__":
    main()
