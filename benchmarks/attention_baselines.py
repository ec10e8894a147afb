"""Dense attention baselines: PyTorch SDPA backends for causal prefill and single-token decode.

Shape: Llama-3-8B attention (32 query heads, 8 KV heads, head_dim 128), bf16 on CUDA.

Measures, in one run (so later kernels compare against numbers taken on the same card and day):

1. causal prefill (batch 1, S in 4k..128k) with ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)``
   for each backend forced with ``sdpa_kernel`` (flash, cuDNN, mem-efficient); a backend that refuses
   ``enable_gqa`` gets K/V expanded to 32 heads with ``repeat_interleave`` outside the timed region (``gqa`` column);
2. decode: one query token attending over N cached tokens (N in 8k/32k/128k, batch 1 and 16) for flash, cuDNN,
   efficient and the default dispatch;
3. the two machine ceilings: device-to-device copy bandwidth and a bf16 8192^3 matmul;
4. correctness first: each backend against a float32 matmul+softmax reference on fresh random inputs.

Usage (from the repo root)::

    python benchmarks/attention_baselines.py            # full run on a GPU (~2 min)
    python benchmarks/attention_baselines.py --quick    # tiny shapes, float32 on the CPU (smoke check)

Results go to ``$HF_EFFLLM_RESULTS_DIR`` (default ``benchmarks/results``) as ``attention_baselines.{json,md}``
(``attention_baselines_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

if (
    importlib.util.find_spec("hf_effllm") is None
):  # not installed (see benchmarks/device_prepare.sh): use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from hf_effllm.benchmarking import BenchmarkRun, markdown_table, rel_err, time_ms  # noqa: E402

HQ, HKV, D = 32, 8, 128
BACKENDS: dict[str, SDPBackend | None] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "default": None,  # no sdpa_kernel context: PyTorch's own dispatch
}
REL_ERR_TOL = 2e-2
COLUMNS = [
    "section",
    "backend",
    "batch",
    "seq",
    "gqa",
    "ms",
    "tflops",
    "tbps",
    "ms_vs_flash",
    "best",
    "rel_err",
    "ok",
    "kernel",
    "note",
]


def _ctx(backend: SDPBackend | None):
    import contextlib

    return sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _sdpa(q, k, v, *, causal: bool, gqa: bool):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


def _expand(t: torch.Tensor) -> torch.Tensor:
    return t.repeat_interleave(HQ // HKV, dim=1).contiguous()


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """Float32 attention by plain matmul + softmax (K/V expanded to the query heads)."""
    q, k, v = q.float(), _expand(k.float()), _expand(v.float())
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if causal:
        lq, lk = s.shape[-2], s.shape[-1]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def probe(backend: SDPBackend | None, q, k, v, *, causal: bool) -> tuple[str | None, str]:
    """Find how a backend runs this shape: 'enable_gqa', 'expanded' (K/V repeated to 32 heads) or None.

    Returns (mode, reason): reason is the warning text when enable_gqa or the backend is refused.
    """
    reasons: list[str] = []
    for mode in ("enable_gqa", "expanded"):
        kk, vv = (k, v) if mode == "enable_gqa" else (_expand(k), _expand(v))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with _ctx(backend):
                    _sdpa(q, kk, vv, causal=causal, gqa=mode == "enable_gqa")
                _sync(q.device)
                return mode, "; ".join(reasons)
            except RuntimeError as e:
                msgs = [str(w.message).splitlines()[0][:160] for w in caught] or [str(e).splitlines()[0][:160]]
                reasons.append(f"{mode}: " + " | ".join(dict.fromkeys(msgs)))
        del kk, vv
    return None, "; ".join(reasons)


def dominant_kernel(fn: Callable[[], Any], dev: torch.device) -> str:
    """Name of the GPU kernel with the largest device time in one call of ``fn`` (to see what a backend ran)."""
    if dev.type != "cuda":
        return ""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(dev)
        best, best_t = "", -1.0
        for ev in prof.key_averages():
            t = getattr(ev, "self_device_time_total", None)
            if t is None:
                t = getattr(ev, "self_cuda_time_total", 0.0)
            if t > best_t and not ev.key.startswith(("cudaDevice", "Memset", "Memcpy")):
                best, best_t = ev.key, t
        return best[:70]
    except Exception as e:  # profiler trouble must not stop the benchmark
        return f"(profiler failed: {type(e).__name__})"


def bench(fn: Callable[[], Any], dev: torch.device, quick: bool) -> float:
    """Median ms via ``time_ms``, with warmup/rep (ms) scaled to one call's time so long calls run ~8 times."""
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(dev)
        t = start.elapsed_time(end)
        if quick:
            return time_ms(fn, warmup=5, rep=20)
        return time_ms(fn, warmup=max(25, int(2 * t)), rep=max(100, int(8 * t)))
    return time_ms(fn, warmup=5, rep=30 if quick else 200)


def n_sets_for(bytes_per_set: int, dev: torch.device) -> int:
    """How many input sets to rotate through so the working set is >= 4x the L2 (1 when one set already is)."""
    if dev.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 60 * 2**20) or 60 * 2**20
    return max(1, min(16, math.ceil(4 * l2 / bytes_per_set)))


def rotating(fn, sets: list[tuple]) -> Callable[[], Any]:
    state = {"i": 0}

    def call():
        i = state["i"]
        state["i"] = (i + 1) % len(sets)
        return fn(*sets[i])

    return call


def make_sets(shapes_q, shape_kv, dtype, dev, mode: str, n: int) -> list[tuple]:
    sets = []
    for _ in range(n):
        q = torch.randn(shapes_q, dtype=dtype, device=dev)
        k = torch.randn(shape_kv, dtype=dtype, device=dev)
        v = torch.randn(shape_kv, dtype=dtype, device=dev)
        if mode == "expanded":  # outside the timed region
            k, v = _expand(k), _expand(v)
        sets.append((q, k, v))
    return sets


def gib(x: int) -> str:
    return f"{x / 2**30:.2f} GiB"


# ------------------------------------------------------------------------------------------------------------------
def check_correctness(run, backends, dev, dtype, quick) -> dict[str, bool]:
    """Each backend against the float32 reference on one prefill and one decode shape; returns {backend: ok}."""
    cases = [
        ("check-prefill", 1, 256 if quick else 1024, 256 if quick else 1024, True),
        ("check-decode", 2 if quick else 4, 1, 512 if quick else 8192, False),
    ]
    ok_by_backend: dict[str, bool] = {}
    for i, (section, b, lq, lk, causal) in enumerate(cases):
        torch.manual_seed(1234 + i)
        q = torch.randn(b, HQ, lq, D, dtype=dtype, device=dev)
        k = torch.randn(b, HKV, lk, D, dtype=dtype, device=dev)
        v = torch.randn(b, HKV, lk, D, dtype=dtype, device=dev)
        ref = reference(q, k, v, causal=causal)
        for name, be in backends.items():
            mode, reason = probe(be, q, k, v, causal=causal)
            if mode is None:
                run.add(section=section, backend=name, batch=b, seq=lk, gqa="unavailable", note=reason)
                print(f"  {section:14s} {name:9s} unavailable: {reason[:120]}")
                continue
            kk, vv = (k, v) if mode == "enable_gqa" else (_expand(k), _expand(v))
            with _ctx(be):
                out = _sdpa(q, kk, vv, causal=causal, gqa=mode == "enable_gqa")
            _sync(dev)
            err = rel_err(out, ref)
            ok = bool(torch.isfinite(out).all()) and out.shape == ref.shape and err < REL_ERR_TOL
            ok_by_backend[name] = ok_by_backend.get(name, True) and ok
            note = f"q_len {lq}, kv_len {lk}, causal={causal}" + (f"; {reason}" if mode == "expanded" else "")
            run.add(section=section, backend=name, batch=b, seq=lk, gqa=mode, rel_err=err, ok=ok, note=note)
            print(f"  {section:14s} {name:9s} gqa={mode:10s} rel_err={err:.2e} {'OK' if ok else 'FAIL'}")
            del out, kk, vv
        del q, k, v, ref
    return ok_by_backend


def bench_ceilings(run, dev, quick) -> dict[str, float]:
    res: dict[str, float] = {}
    n = (2**24 if quick else 2**30) if dev.type == "cuda" else 2**22  # float32 elements: 4 GiB on the GPU
    src = torch.randn(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    ms = bench(lambda d=dst, s=src: d.copy_(s), dev, quick)
    nbytes = 2 * src.numel() * src.element_size()
    res["copy_tbps"] = nbytes / (ms * 1e-3) / 1e12
    copy_ms = ms
    run.add(section="ceiling", backend="d2d copy", seq=src.numel(), ms=ms, tbps=res["copy_tbps"],
            note=f"copy_ of {gib(src.numel() * 4)} float32, bytes read+written")  # fmt: skip
    del src, dst
    m = 8192 if (dev.type == "cuda" and not quick) else 512
    mdtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(m, m, dtype=mdtype, device=dev)
    b = torch.randn(m, m, dtype=mdtype, device=dev)
    c = torch.empty(m, m, dtype=mdtype, device=dev)
    ms = bench(lambda a=a, b=b, c=c: torch.matmul(a, b, out=c), dev, quick)
    res["matmul_tflops"] = 2 * m**3 / (ms * 1e-3) / 1e12
    run.add(section="ceiling", backend=f"matmul {str(mdtype).split('.')[-1]}", seq=m, ms=ms,
            tflops=res["matmul_tflops"], note=f"{m}^3 random inputs, FLOPs = 2*M*N*K")  # fmt: skip
    print(
        f"  copy {copy_ms:.3f} ms {res['copy_tbps']:.2f} TB/s; matmul {m}^3 {ms:.3f} ms {res['matmul_tflops']:.1f} TFLOP/s"
    )
    del a, b, c
    return res


def _measure(run, section, name, be, b, lq, lk, causal, dev, dtype, quick, profile) -> dict | None:
    """Probe how backend ``be`` runs this shape, then time it; returns the added row (None when unavailable)."""
    torch.manual_seed(lk * 31 + b + lq)
    q = torch.randn(b, HQ, lq, D, dtype=dtype, device=dev)
    k = torch.randn(b, HKV, lk, D, dtype=dtype, device=dev)
    v = torch.randn(b, HKV, lk, D, dtype=dtype, device=dev)
    tag = (
        f"{section:7s} {name:9s} B={b:2d} S={lk:6d}"
        if section == "prefill"
        else f"{section:7s} {name:9s} B={b:2d} N={lk:6d}"
    )
    mode, reason = probe(be, q, k, v, causal=causal)
    if mode is None:
        print(f"  {tag} unavailable: {reason[:120]}")
        run.add(section=section, backend=name, batch=b, seq=lk, gqa="unavailable", note=reason)
        return None
    esz = q.element_size()
    io_bytes = 2 * q.numel() * esz  # q read + out written
    kv_bytes = (k.numel() + v.numel()) * esz  # K and V read once, 8 heads
    set_bytes = io_bytes + kv_bytes * (1 if mode == "enable_gqa" else HQ // HKV)
    sets = [(q, *((k, v) if mode == "enable_gqa" else (_expand(k), _expand(v))))]
    del q, k, v
    n_sets = n_sets_for(set_bytes, dev)
    if n_sets > 1:
        sets += make_sets((b, HQ, lq, D), (b, HKV, lk, D), dtype, dev, mode, n_sets - 1)
    gqa = mode == "enable_gqa"
    fn = rotating(lambda q, k, v, g=gqa: _sdpa(q, k, v, causal=causal, gqa=g), sets)
    with _ctx(be):
        kernel = dominant_kernel(fn, dev) if profile else ""
        ms = bench(fn, dev, quick)
    note = []
    if mode == "expanded":
        note.append("K/V expanded to 32 heads outside timing (enable_gqa refused; reads 4x K/V bytes)")
    if n_sets > 1:
        note.append(f"rotating {n_sets} input sets")
    row = dict(section=section, backend=name, batch=b, seq=lk, gqa=mode, ms=ms, kernel=kernel, note="; ".join(note))
    if section == "prefill":
        row["tflops"] = 4 * b * HQ * lk * lk * D / 2 / (ms * 1e-3) / 1e12
        print(f"  {tag} {ms:9.3f} ms {row['tflops']:7.1f} TFLOP/s gqa={mode}")
    else:
        row["tbps"] = (kv_bytes + io_bytes) / (ms * 1e-3) / 1e12
        print(f"  {tag} {ms:9.4f} ms {row['tbps']:6.2f} TB/s gqa={mode}")
    return run.add(**row)


def _measure_safe(run, section, name, b, s, *args, **kw) -> dict | None:
    """``_measure`` that turns an error (out of memory, a backend failing at this size) into a row."""
    try:
        return _measure(run, section, name, *args, **kw)
    except Exception as e:
        msg = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(f"  {section} {name} B={b} seq={s}: {msg}")
        run.add(section=section, backend=name, batch=b, seq=s, gqa="error", note=msg)
        return None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _set_ratios(rows: list[dict]) -> None:
    flash = next((r for r in rows if r["backend"] == "flash"), None)
    for r in rows:
        if flash:
            r["ms_vs_flash"] = r["ms"] / flash["ms"]
    if rows:
        min(rows, key=lambda r: r["ms"])["best"] = "best"


def bench_prefill(run, backends, seqs, dev, dtype, quick) -> list[dict]:
    rows = []
    for s in seqs:
        shape_rows = []
        for name, be in backends.items():
            if name == "default":
                continue
            r = _measure_safe(run, "prefill", name, 1, s, be, 1, s, s, True, dev, dtype, quick,
                              profile=s == seqs[0])  # fmt: skip
            if r is not None:
                shape_rows.append(r)
        _set_ratios(shape_rows)
        rows += shape_rows
    return rows


def bench_decode(run, backends, ns, batches, dev, dtype, quick) -> list[dict]:
    rows = []
    for b in batches:
        for n_ctx in ns:
            shape_rows = []
            for name, be in backends.items():
                first = name == "default" or (b == batches[0] and n_ctx == ns[0])
                r = _measure_safe(run, "decode", name, b, n_ctx, be, b, 1, n_ctx, False, dev, dtype, quick,
                                  profile=first)  # fmt: skip
                if r is not None:
                    shape_rows.append(r)
            _set_ratios(shape_rows)
            rows += shape_rows
    return rows


def _gpu_clocks() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,clocks.max.sm,power.draw,temperature.gpu",
             "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return out.stdout.strip() or None
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (float32 on the CPU): a smoke check")
    p.add_argument("--no-efficient-prefill", action="store_true", help="skip the mem-efficient backend in prefill")
    p.add_argument("--no-write", action="store_true", help="print only; write no result files")
    args = p.parse_args(argv)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    quick = args.quick
    if dev.type == "cuda":
        backends = dict(BACKENDS)
    else:  # only flash (and the default dispatch) exist on the CPU
        backends = {k: v for k, v in BACKENDS.items() if k in ("flash", "default")}
    if quick:
        seqs, ns, batches = [128, 256], [256, 1024], [1, 2]
    else:
        seqs, ns, batches = [4096, 8192, 16384, 32768, 65536, 131072], [8192, 32768, 131072], [1, 16]

    name = "attention_baselines_quick" if quick else "attention_baselines"
    run = BenchmarkRun(
        name,
        "Dense attention baselines for later kernels: torch SDPA per backend (forced with sdpa_kernel), "
        f"{HQ} query heads / {HKV} KV heads / head_dim {D} (Llama-3-8B), {str(dtype).split('.')[-1]}. "
        "prefill: causal, batch 1, seq = S, TFLOP/s counts causal FLOPs 4*B*Hq*S^2*D/2. "
        "decode: 1 query token over seq = N cached tokens, TB/s counts K+V read once (2*B*Hkv*N*D*2 bytes) "
        "plus q and out. gqa: 'enable_gqa' = SDPA's enable_gqa=True with 8 KV heads, 'expanded' = K/V "
        "repeat_interleave'd to 32 heads outside the timed region because the backend refused enable_gqa. "
        "ms = median (triton do_bench, L2 flushed between calls). ms_vs_flash = ms / flash ms on the same shape. "
        "check-* rows: relative error ||out-ref||/||ref|| against a float32 matmul+softmax reference "
        f"(tolerance {REL_ERR_TOL:g}). kernel = the longest GPU kernel of one call (torch profiler).",
    )
    run.meta["dtype"] = str(dtype)
    run.meta["quick"] = quick
    if dev.type == "cuda":
        run.meta["clocks_before (sm, mem, max sm, power, temp)"] = _gpu_clocks()
        run.meta["l2_cache_mib"] = round(torch.cuda.get_device_properties(dev).L2_cache_size / 2**20, 1)

    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), dtype {dtype}")
    print("[1/4] correctness vs float32 reference")
    ok = check_correctness(run, backends, dev, dtype, quick)
    failed = [k for k, v in ok.items() if not v]
    run.meta["correctness"] = "all backends passed" if not failed else f"FAILED: {', '.join(failed)}"
    if failed:
        print(f"!! correctness FAILED for {failed}: their timings below are flagged and must not be used")

    print("[2/4] machine ceilings")
    ceil = bench_ceilings(run, dev, quick)
    if not args.no_write:
        run.write(COLUMNS)
    run.meta["copy_tbps"] = round(ceil["copy_tbps"], 3)
    run.meta["matmul_tflops"] = round(ceil["matmul_tflops"], 1)

    print("[3/4] causal prefill")
    pre_backends = {k: v for k, v in backends.items() if not (k == "efficient" and args.no_efficient_prefill)}
    pre = bench_prefill(run, pre_backends, seqs, dev, dtype, quick)
    if not args.no_write:
        run.write(COLUMNS)  # partial results, in case a later section dies
    print("[4/4] decode")
    dec = bench_decode(run, backends, ns, batches, dev, dtype, quick)
    for r in pre + dec:
        if r.get("backend") in failed:
            r["note"] = ("FAILED correctness; " + (r.get("note") or "")).strip("; ")

    # noise estimate: time flash and cudnn at one mid size again
    s_rep = seqs[len(seqs) // 2]
    for r in pre:
        if r["seq"] == s_rep and r.get("ms") and r["backend"] in ("flash", "cudnn"):
            q = torch.randn(1, HQ, s_rep, D, dtype=dtype, device=dev)
            k = torch.randn(1, HKV, s_rep, D, dtype=dtype, device=dev)
            v = torch.randn(1, HKV, s_rep, D, dtype=dtype, device=dev)
            if r["gqa"] == "expanded":
                k, v = _expand(k), _expand(v)
            with _ctx(backends[r["backend"]]):
                ms2 = bench(lambda q=q, k=k, v=v, g=r["gqa"] == "enable_gqa": _sdpa(q, k, v, causal=True, gqa=g),
                            dev, quick)  # fmt: skip
            run.meta[f"repeat prefill {r['backend']} S={s_rep}"] = f"{r['ms']:.3f} ms then {ms2:.3f} ms"
            del q, k, v

    # summaries in meta
    for s in seqs:
        by = {r["backend"]: r for r in pre if r["seq"] == s and r.get("ms")}
        if "flash" in by and "cudnn" in by:
            run.meta[f"prefill S={s} cudnn/flash ms"] = round(by["cudnn"]["ms"] / by["flash"]["ms"], 3)
    for r in dec:
        if r.get("best"):
            run.meta[f"decode best B={r['batch']} N={r['seq']}"] = (
                f"{r['backend']} {r['ms']:.4f} ms {r['tbps']:.2f} TB/s ({r['gqa']})"
            )
    if dev.type == "cuda":
        run.meta["clocks_after (sm, mem, max sm, power, temp)"] = _gpu_clocks()

    if not args.no_write:
        paths = run.write(COLUMNS)
        print("wrote", *paths)

    short = [{k: r.get(k) for k in COLUMNS[: COLUMNS.index("rel_err") + 1]} for r in run.rows]
    print()
    print(markdown_table(short))
    for k, v in run.meta.items():
        print(f"- {k}: {v}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
