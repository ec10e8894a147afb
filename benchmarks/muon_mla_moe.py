"""MLA + MoE with Muon vs its comparison rows: the four recipes of ``configs/`` trained from scratch, one table.

Rows (same data, steps, batch and schedule; only the model or the optimizer changes):

* ``muon_mla_moe``: DeepSeek-V3 architecture (Multi-head Latent Attention + Mixture-of-Experts) with Muon;
* ``adamw_mla_moe``: the same model with fused AdamW;
* ``muon_dense_mha``: a dense multi-head-attention Llama of the same width and depth with Muon;
* ``adamw_dense_mha``: that dense model with AdamW.

Each row is :func:`hf_effllm.train.run_recipe`'s result: held-out perplexity, KV-cache bytes per token (measured on
transformers' default cache, and MLA's latent size), peak memory, training and decoding tokens/s. The paper's claims
for MLA+MoE+Muon against the baseline (68% less memory, 3.2x faster inference, 8-12% better perplexity) are checked
against ``adamw_dense_mha`` in the ``vs_baseline`` columns.

Usage (repo root)::

    python benchmarks/muon_mla_moe.py                       # GPU: the recipes as written (400 steps of 16 x 512)
    python benchmarks/muon_mla_moe.py --quick               # CPU smoke check: 3 steps, few eval tokens

Results: ``benchmarks/results/muon_mla_moe.{json,md}`` (``muon_mla_moe_quick`` with ``--quick``), written after
every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import sys
import tempfile
from pathlib import Path

if importlib.util.find_spec("hf_effllm") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_effllm.benchmarking import BenchmarkRun, markdown_table  # noqa: E402
from hf_effllm.train import TrainRecipe, generate_seconds, run_recipe  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = ("muon_mla_moe", "adamw_mla_moe", "muon_dense_mha", "adamw_dense_mha")
BASELINE = "adamw_dense_mha"
COLS = ["name", "model_type", "optim", "params_m", "steps", "train_loss", "eval_perplexity", "ppl_vs_baseline_pct",
        "cache_bytes_per_token", "mla_latent_bytes_per_token", "cache_vs_baseline", "peak_memory_mib",
        "memory_vs_baseline", "train_tokens_per_s", "decode_tokens_per_s", "decode_vs_baseline",
        "decode_b16_tokens_per_s", "decode_b16_vs_baseline"]  # fmt: skip
# (column, batch, prompt tokens): greedy decode of each trained model, timed after all are trained, interleaved
DECODE = [("decode_tokens_per_s", 1, 128), ("decode_b16_tokens_per_s", 16, 1024)]
DECODE_ROUNDS = 5


class _KeepModel(TrainerCallback):
    """Keeps the trained model (``on_train_end``) for the decode timing after all runs."""

    def __init__(self) -> None:
        self.model = None

    def on_train_end(self, args, state, control, model=None, **kwargs) -> None:
        self.model = model


def time_decode(models: dict, tokens: int, quick: bool) -> dict[str, dict[str, float]]:
    """Decode tokens/s per model and setting of ``DECODE``: one warm-up each, then ``DECODE_ROUNDS`` rounds that
    time every model once in turn (interleaved, so drifts of clocks or host load hit all rows alike); the median."""
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for col, batch, context in DECODE:
        if quick:
            batch, context = min(batch, 2), min(context, 64)
        times: dict[str, list[float]] = {name: [] for name in models}
        for name, model in models.items():
            where = {(str(t.device), str(t.dtype)) for t in [*model.parameters(), *model.buffers()]}
            print(f"  {name}: parameters and buffers on {sorted(where)}")
            generate_seconds(model.eval(), batch=batch, context=context, tokens=tokens)
        for i in range(DECODE_ROUNDS if not quick else 1):
            for name, model in models.items():
                times[name].append(generate_seconds(model, batch=batch, context=context, tokens=tokens, seed=i))
        for name, ts in times.items():
            out[name][col] = round(batch * tokens / statistics.median(ts), 1)
            print(f"  {col} {name}: {out[name][col]} tok/s (batch {batch}, prompt {context})")
    return out


def compare(rows: list[dict]) -> None:
    """Fill the ``*_vs_baseline`` columns of every row against the AdamW dense row (when it has run)."""
    base = next((r for r in rows if r["name"] == BASELINE), None)
    if base is None:
        return
    for r in rows:
        r["ppl_vs_baseline_pct"] = round(100 * (r["eval_perplexity"] / base["eval_perplexity"] - 1), 2)
        r["cache_vs_baseline"] = round(r["cache_bytes_per_token"] / base["cache_bytes_per_token"], 3)
        r["memory_vs_baseline"] = round(r["peak_memory_mib"] / base["peak_memory_mib"], 3)
        for col, _, _ in DECODE:
            ratio = col.replace("tokens_per_s", "vs_baseline")
            if r.get(col) and base.get(col):
                r[ratio] = round(r[col] / base[col], 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke check (3 steps, 1024 eval tokens)")
    p.add_argument("--max-steps", type=int, default=None, help="override every recipe's training.max_steps")
    p.add_argument("--eval-tokens", type=int, default=None, help="override every recipe's eval_tokens")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names (configs/<name>.yaml)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    quick = args.quick or not torch.cuda.is_available()
    steps = args.max_steps or (3 if quick else None)
    eval_tokens = args.eval_tokens or (1024 if quick else None)
    run = BenchmarkRun(
        "muon_mla_moe_quick" if quick else "muon_mla_moe",
        "MLA + MoE (DeepSeek-V3 architecture) with Muon vs the same model with AdamW and a dense MHA Llama of the "
        "same width and depth with Muon / AdamW, trained from scratch on the corpus (recipes in configs/). "
        "*_vs_baseline: this row / adamw_dense_mha (perplexity in %, cache bytes per token, peak memory, decode "
        "tokens/s as ratios). Peak memory: CUDA max_memory_allocated during training. Decode: greedy, eager, "
        "default cache, all trained models timed in interleaved rounds after training (batch 1 x 128-token prompt, "
        "and batch 16 x 1024).",
    )
    rows: list[dict] = []
    models: dict = {}
    decode_tokens = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in [n.strip() for n in args.recipes.split(",") if n.strip()]:
            recipe = TrainRecipe.from_yaml(CONFIGS / f"{name}.yaml")
            training = dict(recipe.training)
            if steps is not None:
                training["max_steps"] = steps
            if quick:
                training["use_cpu"] = True
                training.pop("bf16", None)
                training["per_device_train_batch_size"] = 2
            changes: dict = {"training": training, "output_dir": str(Path(tmp) / name)}
            if eval_tokens is not None:
                changes["eval_tokens"] = eval_tokens
            if quick:
                changes["model_config"] = {**recipe.model_config, "num_hidden_layers": 2}
            decode_tokens = recipe.decode_tokens if not quick else 8
            changes["decode_tokens"] = 0  # timed below, interleaved over all trained models
            keep = _KeepModel()
            row = run_recipe(dataclasses.replace(recipe, **changes), callbacks=[keep], progress=False)
            models[name] = keep.model
            rows.append(row)
            print(f"{name}: perplexity {row['eval_perplexity']}, train {row['train_tokens_per_s']} tok/s")
            compare(rows)
            run.rows = rows
            run.meta.update(steps=row["steps"], eval_tokens=row["eval_tokens"], device=row["device"])
            if not args.no_write:
                run.write(COLS)
    if decode_tokens and models:
        speeds = time_decode(models, decode_tokens, quick)
        for row in rows:
            row.update(speeds[row["name"]])
        compare(rows)
        run.meta.update(decode=f"{decode_tokens} greedy tokens; (batch, prompt) = {[d[1:] for d in DECODE]}; "
                        f"median of {DECODE_ROUNDS} interleaved rounds after all models are trained")  # fmt: skip
        if not args.no_write:
            run.write(COLS)
    print(markdown_table(rows, COLS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
