"""The SeerAttention quickstart stage: distil gates briefly, then perplexity at several sparsities."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from ...quickstart import StageContext, register_stage

QUICK_NZ_RATIOS: tuple[float, ...] = (0.5, 0.3, 0.1)


def _seer_stage(ctx: StageContext) -> list[dict[str, Any]]:
    from ...data import calibration_batches
    from .apply import apply_seer_attention, mean_sparsity, set_seer_options, sparsity_report
    from .config import SeerAttentionConfig
    from .distill import distill_gates
    from .io import save_gates

    on_cpu = next(ctx.model.parameters()).device.type == "cpu"
    seqlen = min(2048 if on_cpu else 8192, max(ctx.options.context_length, 128))
    # Targets do not depend on the gates, so each window costs one forward; the later steps reuse its records.
    nsamples, steps = (2, 40) if on_cpu else (32, 400)
    t0 = time.perf_counter()
    model = apply_seer_attention(copy.deepcopy(ctx.model), SeerAttentionConfig(nz_ratio=0.5))
    ids = calibration_batches(ctx.tokenizer, nsamples=nsamples, seqlen=seqlen, seed=0)
    res = distill_gates(model, ids, max_steps=steps, learning_rate=3e-3, batch_size=1, logging_steps=10)
    distill_s = time.perf_counter() - t0
    # On the CPU the sparse path is the float32 PyTorch reference (no speed-up there): score a slice of the
    # held-out tokens, and the dense model on the same slice, so the comparison is like for like.
    max_tokens = min(ctx.eval_ids.numel(), ctx.options.context_length if on_cpu else ctx.eval_ids.numel())
    rows: list[dict[str, Any]] = []
    dense_same = None
    if max_tokens < ctx.eval_ids.numel():
        t1 = time.perf_counter()
        dense_same = ctx.evaluate(max_tokens=max_tokens)
        rows.append(
            {
                "variant": f"dense, first {max_tokens} tokens",
                **dense_same,
                "seconds": round(time.perf_counter() - t1, 1),
            }
        )
    for nz in QUICK_NZ_RATIOS:
        set_seer_options(model, nz_ratio=nz)
        sparsity_report(model, reset=True)
        t1 = time.perf_counter()
        r = ctx.evaluate(model, max_tokens=max_tokens)
        achieved = mean_sparsity(sparsity_report(model, reset=True))
        row = {
            "variant": f"seer nz_ratio={nz}",
            **r,
            "sparsity": round(achieved, 3),
            "seconds": round(time.perf_counter() - t1, 1),
        }
        if dense_same is not None:
            row["vs_dense_pct"] = round(100.0 * (r["perplexity"] / dense_same["perplexity"] - 1.0), 2)
        rows.append(row)
    rows[-len(QUICK_NZ_RATIOS)]["distill_seconds"] = round(distill_s, 1)
    rows[-len(QUICK_NZ_RATIOS)]["distill_final_loss"] = round(res.final_loss, 4)
    set_seer_options(model, nz_ratio=0.5)
    save_gates(model, ctx.folder / "seer_gates", overwrite=True, results=rows)
    ctx.files.append(("seer_gates/", "SeerAttention gates (safetensors + config + card), distilled in the quickstart"))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


register_stage("seer", _seer_stage, order=30)


def _configure_distill(p) -> None:
    from ...cli import add_model_args

    add_model_args(p)
    p.add_argument("--config", required=True, help="recipe YAML (see configs/seer_distill.yaml)")
    p.add_argument("--output", required=True, help="folder for the gates (safetensors + config + card)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def _run_distill(args) -> int:
    import inspect
    from pathlib import Path

    import yaml

    from ...data import load_model, load_tokenizer
    from ...errors import HfEffllmError
    from ...utils.io import prepare_output_dir
    from .apply import apply_seer_attention
    from .config import SeerAttentionConfig
    from .distill import distill_gates
    from .io import save_gates

    path = Path(args.config)
    if not path.is_file():
        raise HfEffllmError(
            f"--config={args.config!r} does not exist; give a recipe YAML like configs/seer_distill.yaml."
        )
    recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = sorted(set(recipe) - {"seer", "data", "training"})
    if unknown:
        raise HfEffllmError(f"--config {path}: unknown section(s) {unknown}; use seer, data, training.")
    # Check the whole recipe before loading the model: a typo fails in a second with the key and the allowed ones.
    sections = {name: recipe.get(name) or {} for name in ("seer", "data", "training")}
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise HfEffllmError(f"--config {path}: section {name!r} must be a mapping; got {section!r}.")
    try:
        config = SeerAttentionConfig.from_dict(sections["seer"])
    except HfEffllmError as e:
        raise HfEffllmError(f"--config {path}: section 'seer': {e}") from e
    allowed = {
        "data": {"texts", "nsamples", "seqlen", "seed"},
        "training": set(inspect.signature(distill_gates).parameters)
        - {"model", "data", "tokenizer", "nsamples", "seqlen", "seed", "training_args", "callbacks"},
    }
    for name, keys in allowed.items():
        unknown = sorted(set(sections[name]) - keys)
        if unknown:
            raise HfEffllmError(f"--config {path}: section {name!r} has unknown key(s) {unknown}; use {sorted(keys)}.")
    prepare_output_dir(args.output, overwrite=args.overwrite, arg_name="output")
    data = dict(sections["data"])
    texts = data.pop("texts", None)
    if texts is not None:
        texts = Path(texts).read_text(encoding="utf-8")
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(args.model)
    apply_seer_attention(model, config)
    res = distill_gates(model, texts, tokenizer=tokenizer, **data, **sections["training"])
    save_gates(model, args.output, overwrite=args.overwrite)
    print(f"distilled {res.steps} steps in {res.seconds:.0f} s, final loss {res.final_loss:.4f}; wrote {args.output}")
    return 0


def _register_command() -> None:
    from ...cli import register_command

    register_command("seer-distill", "distil SeerAttention gates from a recipe YAML", _configure_distill, _run_distill)


_register_command()
