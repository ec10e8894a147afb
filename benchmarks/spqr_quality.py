"""SpQR quality on the embedded SmolLM2-135M: perplexity vs average bits, against round-to-nearest and plain GPTQ.

Variants (all in one run, same held-out text, same calibration windows):

* float (the unmodified model);
* RTN 3 / 4 bit: the same bi-level format (groups of 16 columns, 3-bit statistics over 16 rows), no calibration,
  no error feedback, no outliers;
* GPTQ 3 / 4 bit: the same format with inverse-Hessian error feedback (act-order), no outliers;
* SpQR near 3.6 and near 4.6 average bits: error feedback plus 16-bit outliers (groups of 32 columns, so the
  outliers are paid for by cheaper statistics);
* the same with ``tune_epochs=2`` ("tuned"): after each layer, its stored float parts (second-level statistics,
  outlier values, norm weights) are tuned toward the float layer's output (``hf_effllm/quant/spqr/tuning.py``).

Average bits count every stored byte of the quantized layers (codes, statistics, CSR outliers, permutation); the
output head and embeddings stay in float and are not counted. Perplexity: held-out books (Romans..Revelation),
2048-token windows. Size on disk: the ``save_pretrained`` folder's safetensors. Time to quantize: wall clock.

Usage (repo root)::

    python benchmarks/spqr_quality.py                       # GPU: nsamples 128 x 2048, all held-out tokens
    python benchmarks/spqr_quality.py --reduced             # CPU: nsamples 16 x 512, one pass per layer,
                                                            #      first 16384 held-out tokens
    python benchmarks/spqr_quality.py --reduced --threads 1 --eval-tokens 8192   # the committed CPU run
    python benchmarks/spqr_quality.py --quick               # smoke check: tiny model, seconds
    python benchmarks/spqr_quality.py --variants float,rtn,gptq --tag a   # split a long run in parts
    python benchmarks/spqr_quality.py --variants float,gptq --set percdamp=0.01 --tag damp   # a setting sweep
    python benchmarks/spqr_quality.py --reduced --sensitivity --variants "SpQR ~3.6 bits"  # one module type at a
                                                            # time: where the perplexity loss comes from

Results: ``benchmarks/results/spqr_quality[_reduced|_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if importlib.util.find_spec("hf_effllm") is None:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import hf_effllm  # noqa: E402
from hf_effllm import SpQRConfig  # noqa: E402
from hf_effllm.benchmarking import BenchmarkRun, markdown_table  # noqa: E402
from hf_effllm.quant.spqr.engine import (  # noqa: E402
    decoder_layers,
    default_modules_to_not_convert,
    record_results,
    spqr_quantize_matrix,
)
from hf_effllm.quant.spqr.quantizer import _mark_quantized, _replace_with_packed  # noqa: E402

INF = float("inf")
KV4 = {r"\.(k|v)_proj$": {"bits": 4}}
MODULE_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# 3-bit rows first: a run cut short still compares the methods at equal bits (results are written after each row)
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("float", "float", {}),
    # thresholds picked on the first 4 layers of SmolLM2 to land near 3.6 / 4.6 average bits
    ("SpQR ~3.6 bits", "spqr", dict(bits=3, group_size=32, outlier_threshold=0.45)),
    ("GPTQ 3-bit", "gptq", dict(bits=3, outlier_threshold=INF)),
    ("RTN 3-bit", "rtn", dict(bits=3, permutation="identity", outlier_threshold=INF)),
    ("SpQR ~3.6 bits tuned", "spqr", dict(bits=3, group_size=32, outlier_threshold=0.45, tune_epochs=2)),
    # the per-parameter most sensitive matrices (v_proj, k_proj: spqr_quality_reduced_cpu_sensitivity.md) at 4 bits
    ("SpQR ~3.6 bits kv4", "spqr", dict(bits=3, group_size=32, outlier_threshold=0.45, dynamic=KV4)),
    (
        "SpQR ~3.6 bits kv4 tuned",
        "spqr",
        dict(bits=3, group_size=32, outlier_threshold=0.45, dynamic=KV4, tune_epochs=2),
    ),
    ("SpQR ~4.6 bits", "spqr", dict(bits=4, group_size=32, outlier_threshold=0.08)),
    ("SpQR ~4.6 bits tuned", "spqr", dict(bits=4, group_size=32, outlier_threshold=0.08, tune_epochs=2)),
    ("GPTQ 4-bit", "gptq", dict(bits=4, outlier_threshold=INF)),
    ("RTN 4-bit", "rtn", dict(bits=4, permutation="identity", outlier_threshold=INF)),
]


def rtn_quantize(model: torch.nn.Module, cfg: SpQRConfig) -> None:
    """Round-to-nearest into the SpQR format (identity Hessian: no feedback, no calibration)."""
    name, layers = decoder_layers(model)
    head = default_modules_to_not_convert(model)
    results = {}
    for i, layer in enumerate(layers):
        for sub, lin in layer.named_modules():
            full = f"{name}.{i}.{sub}"
            if isinstance(lin, torch.nn.Linear) and not any(f".{h}." in f".{full}." for h in head):
                results[full] = spqr_quantize_matrix(lin.weight, None, cfg.for_module(full))
    record_results(cfg, results)
    _replace_with_packed(model, results, cfg)
    _mark_quantized(model, cfg)


def _scalar(text: str) -> int | float | str:
    """A ``--set`` value: an int, else a float (``inf`` too), else the text (e.g. ``permutation=identity``)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def disk_mb(model: torch.nn.Module) -> float:
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return round(sum(f.stat().st_size for f in Path(d).glob("*.safetensors")) / 1e6, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--reduced", action="store_true", help="CPU settings: 16 x 512 calibration, 16384 eval tokens")
    mode.add_argument("--quick", action="store_true", help="tiny random model, seconds (smoke check)")
    p.add_argument("--variants", default=None, help="comma-separated variant names to run (default all)")
    p.add_argument("--eval-tokens", type=int, default=None, help="override the number of held-out tokens")
    p.add_argument("--tag", default="", help="suffix of the results file name (to split a run into parts)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is faster on a loaded machine)")
    p.add_argument(
        "--sensitivity",
        action="store_true",
        help="quantize one module type at a time (q/k/v/o/gate/up/down_proj; the rest stays float) with each SpQR "
        "variant selected by --variants: which layers the perplexity loss comes from",
    )
    p.add_argument(
        "--set",
        default="",
        help="SpQRConfig fields for every quantized variant, e.g. 'percdamp=0.01,stats_group_size=8'",
    )
    args = p.parse_args()
    overrides: dict[str, Any] = {}
    for item in filter(None, args.set.split(",")):
        key, _, value = item.partition("=")
        if not value:
            p.error(f"--set item {item!r} is not key=value")
        overrides[key.strip()] = _scalar(value.strip())
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        from hf_effllm.testing import tiny_model

        base = tiny_model("llama").to(dev)
        tok = None
        eval_ids = torch.randint(0, 256, (4096,))
        calib = dict(nsamples=4, seqlen=64, true_sequential=False)
        ctx, eval_tokens, name = 512, 4096, "spqr_quality_quick"
        calib_ids = torch.randint(0, 256, (4, 64))
    else:
        base = hf_effllm.load_model(dtype="float32" if dev.type == "cpu" else "bfloat16", device=dev)
        tok = hf_effllm.load_tokenizer()
        eval_ids = tok(hf_effllm.corpus_text("eval"), return_tensors="pt", add_special_tokens=False).input_ids[0]
        if args.reduced:
            calib = dict(nsamples=16, seqlen=512, true_sequential=False)
            eval_tokens, name = 16384, "spqr_quality_reduced"
        else:
            calib = dict(nsamples=128, seqlen=2048, true_sequential=True)
            eval_tokens, name = eval_ids.numel(), "spqr_quality"
        ctx = 2048
        calib_ids = hf_effllm.calibration_batches(tok, nsamples=calib["nsamples"], seqlen=calib["seqlen"])
    eval_ids = eval_ids[: args.eval_tokens or eval_tokens]
    name += f"_{args.tag}" if args.tag else ""
    wanted = set(args.variants.split(",")) if args.variants else None
    run = BenchmarkRun(
        name,
        "SpQR vs round-to-nearest (RTN) and GPTQ without outliers on the embedded SmolLM2-135M: perplexity on "
        "held-out text (2048-token windows), honest average bits over the quantized layers (codes + statistics + "
        "outliers + permutation), checkpoint size, wall-clock time to quantize.",
    )
    run.meta.update(calibration=calib, eval_tokens=int(eval_ids.numel()), context_length=ctx, device=str(dev))
    float_ppl = None
    plan = VARIANTS
    if args.sensitivity:
        run.name += "_sensitivity"
        types = [t for t in MODULE_TYPES if any(t in n for n, _ in base.named_modules())]
        plan = [v for v in VARIANTS if v[1] == "float"]
        for label, kind, fields in VARIANTS:
            if kind == "spqr" and (not wanted or label in wanted) and "tune_epochs" not in fields:
                for t in types:
                    others = ["lm_head", *(o for o in types if o != t)]
                    plan.append((f"{label}, {t} only", kind, {**fields, "modules_to_not_convert": others}))
        wanted = None
    for label, kind, fields in plan:
        if wanted and label not in wanted and kind not in wanted:
            continue
        model = base if kind == "float" else copy.deepcopy(base)
        fields = {**fields, **overrides} if kind != "float" else fields
        cfg = SpQRConfig(**fields, **calib) if kind != "float" else None
        t0 = time.perf_counter()
        if kind == "rtn":
            rtn_quantize(model, cfg)
        elif kind in ("gptq", "spqr"):
            hf_effllm.quantize_spqr(model, cfg, calibration_ids=calib_ids)
        seconds = time.perf_counter() - t0
        res = hf_effllm.perplexity(model, eval_ids, context_length=ctx, progress=False)
        if kind == "float":
            float_ppl = res.perplexity
        layers = (cfg.layers or {}) if cfg else {}
        nnz = sum(r["nnz"] for r in layers.values())
        params = sum(r["in_features"] * r["out_features"] for r in layers.values())
        row = run.add(
            variant=label,
            perplexity=round(res.perplexity, 4),
            vs_float_pct=round(100 * (res.perplexity / float_ppl - 1), 2) if float_ppl else None,
            avg_bits=cfg.avg_bits if cfg else (16 if dev.type == "cuda" else 32),
            outlier_pct=round(100 * nnz / params, 3) if params else None,
            size_mb=disk_mb(model),
            quantize_s=round(seconds, 1),
            params_m=round(params / 1e6, 2) if params else None,
            settings=", ".join(f"{k}={v}" for k, v in fields.items() if k != "modules_to_not_convert"),
        )
        print(markdown_table([row]), flush=True)
        run.meta["complete"] = False  # rewritten after each row, so a run cut short keeps what it measured
        run.write()
        if model is not base:
            del model
    run.meta["complete"] = True
    json_path, md_path = run.write()
    print(md_path.read_text())


if __name__ == "__main__":
    main()
