"""``hf-effllm quantize --method spqr`` and the SpQR stage of ``hf-effllm quickstart``.

    hf-effllm quantize --method spqr --bits 3 [--model PATH_OR_ID] --output DIR [--push-to-hub USER/NAME]

The output folder is a ``save_pretrained`` checkpoint (packed SpQR tensors + config.json with the per-layer records),
the tokenizer, ``results.json`` and a model card; ``from_pretrained(DIR)`` loads it after ``import hf_effllm``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from ...errors import HfEffllmError
from .config import PERMUTATIONS, SpQRConfig
from .linear import SpQRLinear


def _json_rules(text: str) -> dict:
    try:
        rules = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f'--dynamic {text!r} is not JSON ({e}); e.g. \'{{"v_proj": {{"bits": 4}}}}\''
        ) from None
    if not isinstance(rules, dict):
        raise argparse.ArgumentTypeError(f"--dynamic {text!r} must be a JSON object {{regex: {{field: value}}}}")
    return rules


def _threshold(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (use 'inf' to disable outliers)") from None


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``hf-effllm quantize``."""
    from ...cli import add_model_args

    add_model_args(p)
    p.add_argument("--method", default="spqr", choices=["spqr"], help="quantization method (default spqr)")
    p.add_argument("--output", required=True, help="output folder (a save_pretrained checkpoint + card)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--bits", type=int, default=3, help="bits per weight code, 2..8 (default 3)")
    p.add_argument("--group-size", type=int, default=16, help="input columns per group (default 16)")
    p.add_argument("--stats-bits", type=int, default=3, help="bits of the scales/zero-points (default 3)")
    p.add_argument("--stats-group-size", type=int, default=16, help="rows per second-level group (default 16)")
    p.add_argument("--outlier-threshold", type=_threshold, default=0.2, help="relative threshold; inf disables")
    p.add_argument("--permutation", default="act_order", choices=list(PERMUTATIONS), help="column order")
    p.add_argument("--percdamp", type=float, default=0.01, help="Hessian dampening / mean diagonal (default 0.01)")
    p.add_argument(
        "--dynamic",
        type=_json_rules,
        default=None,
        metavar="JSON",
        help='per-module settings, e.g. \'{"\\\\.v_proj$": {"bits": 4}}\' (SpQRConfig.dynamic)',
    )
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window (default 2048)")
    p.add_argument("--no-true-sequential", action="store_true", help="one calibration pass per decoder layer")
    p.add_argument(
        "--dataset",
        nargs="+",
        default=None,
        metavar="FILE",
        help="UTF-8 text files to calibrate on (default: the embedded corpus's train split)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")
    p.add_argument(
        "--tune-epochs",
        type=int,
        default=0,
        help="tune each layer's float parts (statistics, outliers, norms) toward the float layer (default 0: off)",
    )
    p.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens to score; 0 skips (default 16384)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the folder to this Hub repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--no-progress", action="store_true", help="hide progress output")


def _layer_stats(config: SpQRConfig) -> dict[str, Any]:
    layers = config.layers or {}
    params = sum(r["in_features"] * r["out_features"] for r in layers.values())
    nnz = sum(r["nnz"] for r in layers.values())
    bits = [r["avg_bits"] for r in layers.values()] or [math.nan]
    return {
        "total_outliers": nnz,
        "outlier_pct": round(100.0 * nnz / params, 3) if params else 0.0,
        "min_layer_bits": round(min(bits), 3),
        "max_layer_bits": round(max(bits), 3),
        "quantized_params": params,
    }


def folder_size_mb(path: Path) -> float:
    """Total size of the weight files (``*.safetensors``) in a folder, in MB."""
    return round(sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 1e6, 2)


def write_card(
    folder: Path,
    config: SpQRConfig,
    *,
    base_model: str,
    repo_id: str,
    rows: list[dict[str, Any]],
    quantize_seconds: float,
    files: list[tuple[str, str]],
    calibration_note: str = "",
) -> None:
    """Render ``hub_cards/spqr.md`` into ``folder/README.md``."""
    from ... import __version__
    from ...benchmarking import environment_info, markdown_table
    from ...hub import render_card
    from ...utils.io import atomic_write_text

    env = environment_info()
    card = render_card(
        "spqr",
        library_name="transformers",
        base_model=base_model,
        license="apache-2.0",
        tags=["hf-effllm", "hf-effllm-spqr", "spqr", "quantized", f"{config.bits}-bit"],
        hf_effllm_version=__version__,
        title=f"{Path(base_model).name} SpQR {config.avg_bits} bits",
        repo_id=repo_id,
        bits=config.bits,
        avg_bits=config.avg_bits,
        group_size=config.group_size,
        stats_bits=config.stats_bits,
        stats_group_size=config.stats_group_size,
        outlier_threshold=config.outlier_threshold,
        permutation=config.permutation,
        percdamp=config.percdamp,
        nsamples=config.nsamples,
        seqlen=config.seqlen,
        calibration_note=calibration_note,
        quantize_seconds=round(quantize_seconds, 1),
        device=env["device"]["name"],
        files=files,
        results_table=markdown_table(rows) if rows else "(perplexity not measured: --eval-tokens 0)",
        **{k: v for k, v in _layer_stats(config).items() if k != "quantized_params"},
    )
    atomic_write_text(folder / "README.md", str(card))


def _held_out_perplexity(model: Any, eval_ids: torch.Tensor, args: argparse.Namespace) -> float:
    from ...evaluation import perplexity

    res = perplexity(
        model, eval_ids, context_length=args.context_length, batch_size=args.batch_size, progress=not args.no_progress
    )
    return res.perplexity


def _read_texts(paths: list[str] | None) -> list[str] | None:
    """The calibration texts of ``--dataset`` (one text per file), or None for the corpus."""
    if not paths:
        return None
    texts = []
    for path in paths:
        try:
            texts.append(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise HfEffllmError(f"--dataset {path!r} cannot be read as UTF-8 text ({type(e).__name__}).") from e
    return texts


def run(args: argparse.Namespace) -> int:
    """Run ``hf-effllm quantize``; returns the exit status."""
    from ...data import corpus_text, load_model, load_tokenizer
    from ...quickstart import base_model_id
    from ...utils.io import atomic_dir, atomic_write_text, prepare_output_dir
    from .quantizer import quantize_spqr

    config = SpQRConfig(
        bits=args.bits,
        group_size=args.group_size,
        stats_bits=args.stats_bits,
        stats_group_size=args.stats_group_size,
        outlier_threshold=args.outlier_threshold,
        permutation=args.permutation,
        percdamp=args.percdamp,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        true_sequential=not args.no_true_sequential,
        dataset=_read_texts(args.dataset),
        seed=args.seed,
        tune_epochs=args.tune_epochs,
        dynamic=args.dynamic,
    )
    if args.eval_tokens < 0:
        raise HfEffllmError(f"--eval-tokens={args.eval_tokens} must be >= 0.")
    if args.eval_tokens and args.eval_tokens < args.context_length:
        raise HfEffllmError(f"--eval-tokens={args.eval_tokens} must be 0 or >= --context-length={args.context_length}.")
    prepare_output_dir(args.output, overwrite=args.overwrite, arg_name="output")
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(args.model)
    base_model = base_model_id(args.model, model)
    rows: list[dict[str, Any]] = []
    eval_ids = None
    if args.eval_tokens:
        eval_ids = tokenizer(corpus_text("eval"), return_tensors="pt", add_special_tokens=False).input_ids[0]
        eval_ids = eval_ids[: args.eval_tokens]
        rows.append(
            {
                "variant": "float",
                "perplexity": round(_held_out_perplexity(model, eval_ids, args), 4),
                "avg_bits": 16 if next(model.parameters()).dtype != torch.float32 else 32,
            }
        )
    t0 = time.perf_counter()
    quantize_spqr(model, config, tokenizer=tokenizer, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    if eval_ids is not None:
        ppl = _held_out_perplexity(model, eval_ids, args)
        rows.append({"variant": f"SpQR {config.bits}-bit", "perplexity": round(ppl, 4), "avg_bits": config.avg_bits})
        base = rows[0]["perplexity"]
        for r in rows:
            r["vs_float_pct"] = round(100.0 * (r["perplexity"] / base - 1.0), 2)
    with atomic_dir(args.output, overwrite=args.overwrite, arg_name="output") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        payload = {
            "base_model": base_model,
            "quantization_config": config.to_dict(),
            "rows": rows,
            "quantize_seconds": round(seconds, 1),
            "context_length": args.context_length,
            "eval_tokens": int(eval_ids.numel()) if eval_ids is not None else 0,
            **_layer_stats(config),
        }
        atomic_write_text(tmp / "results.json", json.dumps(payload, indent=2) + "\n")
        names = sorted(p.name for p in tmp.iterdir())
        files = [(n, "packed SpQR weights" if n.endswith(".safetensors") else "") for n in names]
        files = [(n, d or "tokenizer / model configuration") for n, d in files] + [("README.md", "this card")]
        repo = args.push_to_hub or f"<user>/{Path(base_model).name}-SpQR-{config.bits}bit"
        write_card(tmp, config, base_model=base_model, repo_id=repo, rows=rows, quantize_seconds=seconds, files=files)
    print(f"[hf-effllm] SpQR: {config.avg_bits} avg bits; wrote {Path(args.output).resolve()}", flush=True)
    for r in rows:
        print(f"  {r['variant']}: perplexity {r['perplexity']}", flush=True)
    if args.push_to_hub:
        from ...hub import push_folder

        print(push_folder(args.output, args.push_to_hub, private=args.private), flush=True)
    return 0


def quickstart_stage(ctx: Any) -> list[dict[str, Any]]:
    """Quickstart stage: SpQR-quantize a copy of the model (small calibration on CPU), measure it, save it."""
    on_gpu = next(ctx.model.parameters()).is_cuda
    # CPU: a small calibration (8 x 256 tokens, one pass per layer) keeps the stage near two minutes on 2 cores
    # groups of 32 and threshold 0.45 land near 3.6 average bits on SmolLM2 (benchmarks/spqr_quality.py)
    config = SpQRConfig(
        bits=3,
        group_size=32,
        outlier_threshold=0.45,
        nsamples=128 if on_gpu else 8,
        seqlen=2048 if on_gpu else 256,
        true_sequential=on_gpu,
    )
    model = copy.deepcopy(ctx.model)
    t0 = time.perf_counter()
    from .quantizer import quantize_spqr

    quantize_spqr(model, config, tokenizer=ctx.tokenizer, progress=ctx.options.progress)
    seconds = time.perf_counter() - t0
    for m in model.modules():
        if isinstance(m, SpQRLinear):
            m.cache_weight = True  # CPU evaluation: dequantize once, not in every forward (same values)
    res = ctx.evaluate(model=model)
    out = ctx.folder / "spqr"
    model.save_pretrained(out)
    ctx.tokenizer.save_pretrained(out)
    n_layers = sum(isinstance(m, SpQRLinear) for m in model.modules())
    ctx.files.append(("spqr/", f"the SpQR {config.avg_bits}-bit model ({n_layers} layers; load with hf_effllm)"))
    del model
    return [
        {
            "variant": f"SpQR {config.bits}-bit ({config.avg_bits} avg bits)",
            **res,
            "avg_bits": config.avg_bits,
            "quantize_seconds": round(seconds, 1),
            "size_mb": folder_size_mb(out),
        }
    ]
