"""``hf-effllm train CONFIG.yaml``: train a causal LM with ``transformers.Trainer`` on the corpus and report it.

A recipe is a YAML file (see ``configs/muon_mla_moe.yaml``) read into :class:`TrainRecipe`: the model is built from
a config (``model_config``: ``model_type`` plus any ``AutoConfig`` fields, random init) or loaded
(``model_name_or_path``); training windows are drawn from the corpus's train split
(:func:`hf_effllm.data.calibration_batches`), ``training`` is passed to ``TrainingArguments`` as is (so any
registered ``optim``, e.g. ``muon``, works), and the result is held-out perplexity
(:func:`hf_effllm.evaluation.perplexity`), KV-cache bytes per token, peak memory, training and decoding tokens/s,
written to ``<output_dir>/results.json``. Other methods reuse :func:`run_recipe` with their own ``training`` or
callbacks.

Example:
    $ hf-effllm train configs/muon_mla_moe.yaml --max-steps 20 --eval-tokens 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import HfEffllmError

logger = logging.getLogger(__name__)


@dataclass
class TrainRecipe:
    """A training recipe (one YAML file). Unknown top-level keys are an error."""

    name: str = field(default="train", metadata={"help": "Row name in results."})
    model_config: dict[str, Any] | None = field(
        default=None, metadata={"help": "model_type + AutoConfig fields of a model trained from scratch."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Load this model instead (None with no model_config: the embedded model)."}
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer (None: the embedded SmolLM2's)."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per training window."})
    eval_context: int = field(default=256, metadata={"help": "Context length of the held-out perplexity."})
    eval_tokens: int = field(default=16384, metadata={"help": "Held-out tokens scored."})
    decode_tokens: int = field(default=64, metadata={"help": "Tokens generated to time decoding (0: skip)."})
    dtype: str = field(default="float32", metadata={"help": "Parameter dtype: float32 or bfloat16."})
    seed: int = field(default=0, metadata={"help": "Seed of the model init and the training windows."})
    output_dir: str = field(default="runs/train", metadata={"help": "Trainer output folder; results.json goes here."})
    training: dict[str, Any] = field(default_factory=dict, metadata={"help": "TrainingArguments keyword arguments."})

    def __post_init__(self) -> None:
        if self.model_config is not None and self.model_name_or_path is not None:
            raise HfEffllmError("give model_config (train from scratch) or model_name_or_path (load), not both.")
        if self.model_config is not None and "model_type" not in self.model_config:
            raise HfEffllmError(f"model_config={self.model_config!r} needs a model_type (e.g. deepseek_v3, llama).")
        for name in ("seq_len", "eval_context", "eval_tokens"):
            if getattr(self, name) < 1:
                raise HfEffllmError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.decode_tokens < 0:
            raise HfEffllmError(f"decode_tokens={self.decode_tokens} must be >= 0.")
        if self.dtype not in ("float32", "bfloat16"):
            raise HfEffllmError(f"dtype={self.dtype!r} is not supported; use float32 or bfloat16.")
        if "output_dir" in self.training:
            raise HfEffllmError("training.output_dir is set by the recipe's output_dir; remove it from training.")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainRecipe:
        """Read a recipe file; unknown keys raise :class:`HfEffllmError` naming them."""
        import yaml

        p = Path(path)
        if not p.is_file():
            raise HfEffllmError(
                f"config={str(path)!r} is not a file; pass a recipe YAML such as configs/muon_mla_moe.yaml."
            )
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise HfEffllmError(f"config={str(path)!r} must hold a mapping of recipe fields.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HfEffllmError(f"config={str(path)!r} has unknown key(s) {unknown}; allowed: {sorted(known)}.")
        return cls(**data)


def build_model(recipe: TrainRecipe) -> torch.nn.Module:
    """The recipe's model: random init from ``model_config`` or loaded from ``model_name_or_path``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, recipe.dtype)
    if recipe.model_config is not None:
        cfg = dict(recipe.model_config)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        torch.manual_seed(recipe.seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    from .data import load_model

    return load_model(recipe.model_name_or_path, dtype=dtype, device="cpu")


def kv_cache_bytes_per_token(model: torch.nn.Module, *, tokens: int = 16) -> dict[str, float]:
    """Bytes per token held by the model's default ``DynamicCache`` (measured), and MLA's latent size if it has one.

    transformers' DeepSeek-V3 (5.17 and 5.24) caches the MLA latent (``kv_lora_rank``) and the shared RoPE key
    (``qk_rope_head_dim``) per layer, so for MLA models the two figures agree; a dense model caches K and V of
    every KV head.
    """
    from transformers import DynamicCache

    from .compat import cache_kwargs

    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    ids = torch.zeros((1, tokens), dtype=torch.long, device=device)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **cache_kwargs(cache))
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    out = {"cache_bytes_per_token": total / tokens}
    cfg = model.config
    if getattr(cfg, "kv_lora_rank", None):
        elt = next(model.parameters()).element_size()
        out["mla_latent_bytes_per_token"] = float(
            cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * elt
        )
    return out


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # process peak RSS on Linux


def generate_seconds(model: torch.nn.Module, *, batch: int, context: int, tokens: int, seed: int = 0) -> float:
    """Wall-clock seconds of one greedy ``generate`` of exactly ``tokens`` new tokens after ``batch`` random prompts of
    ``context`` tokens (eager, default cache; CUDA synchronized before and after).

    Example:
        >>> seconds = generate_seconds(model, batch=1, context=128, tokens=64)  # doctest: +SKIP
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(device)
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return time.perf_counter() - start


def decode_tokens_per_s(
    model: torch.nn.Module, tokens: int, context: int, *, batch: int = 1, repeats: int = 3
) -> float:
    """Greedy decoding speed in generated tokens/s over the batch: median of ``repeats`` timed
    :func:`generate_seconds` runs after one full-length warm-up.

    Example:
        >>> decode_tokens_per_s(model, 64, 128)  # doctest: +SKIP
    """
    generate_seconds(model, batch=batch, context=context, tokens=tokens)  # warm-up
    times = [generate_seconds(model, batch=batch, context=context, tokens=tokens) for _ in range(repeats)]
    return batch * tokens / statistics.median(times)


def run_recipe(recipe: TrainRecipe, *, callbacks: list[Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``recipe``'s model with ``Trainer`` on the corpus's train split and evaluate it on held-out text.

    Args:
        recipe: the recipe.
        callbacks: extra ``TrainerCallback`` objects (other methods plug in here).
        progress: show progress bars.

    Returns:
        The result row (also written to ``<output_dir>/results.json``): name, optimizer, parameters, steps,
        train loss, held-out perplexity, KV-cache bytes per token, peak memory, train and decode tokens/s.
    """
    from transformers import Trainer, TrainingArguments

    from .data import calibration_batches, corpus_text, load_tokenizer
    from .evaluation import perplexity
    from .utils.io import atomic_write_text

    tokenizer = load_tokenizer(recipe.tokenizer or recipe.model_name_or_path)
    model = build_model(recipe)
    if recipe.model_config is not None and len(tokenizer) > model.config.vocab_size:
        raise HfEffllmError(
            f"model_config vocab_size={model.config.vocab_size} is smaller than the tokenizer's {len(tokenizer)}."
        )
    targs = {"report_to": [], "save_strategy": "no", "seed": recipe.seed, "disable_tqdm": not progress}
    targs.update(recipe.training)
    args = TrainingArguments(output_dir=recipe.output_dir, **targs)
    if args.max_steps is None or args.max_steps <= 0:
        raise HfEffllmError("training.max_steps must be set (> 0): the corpus is sampled in windows, not epochs.")
    nsamples = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    windows = calibration_batches(tokenizer, nsamples=nsamples, seqlen=recipe.seq_len, seed=recipe.seed)
    dataset = [{"input_ids": w, "labels": w} for w in windows]
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    device = args.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    train_out = trainer.train()
    train_seconds = time.perf_counter() - start
    peak = _peak_memory_bytes(device)
    model = trainer.model.eval()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    ppl = perplexity(
        model,
        corpus_text("eval"),
        tokenizer=tokenizer,
        context_length=recipe.eval_context,
        max_tokens=recipe.eval_tokens,
        progress=progress,
    )
    row: dict[str, Any] = {
        "name": recipe.name,
        "model_type": model.config.model_type,
        "optim": str(getattr(args.optim, "value", args.optim)),
        "optimizer_class": type(optimizer).__name__,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "steps": int(trainer.state.global_step),
        "train_loss": round(float(train_out.training_loss), 4),
        "eval_perplexity": round(ppl.perplexity, 3),
        "eval_tokens": ppl.num_tokens,
        **{k: round(v, 1) for k, v in kv_cache_bytes_per_token(model).items()},
        "peak_memory_mib": round(peak / 2**20, 1),
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "train_tokens_per_s": round(nsamples * recipe.seq_len / train_seconds, 1),
        "decode_tokens_per_s": round(decode_tokens_per_s(model, recipe.decode_tokens, 128), 1)
        if recipe.decode_tokens
        else None,
        "device": str(device),
    }
    if not math.isfinite(row["eval_perplexity"]):
        logger.warning("held-out perplexity is not finite; the run diverged.")
    Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(recipe.output_dir) / "results.json", json.dumps(row, indent=2) + "\n")
    return row


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="recipe YAML (e.g. configs/muon_mla_moe.yaml)")
    p.add_argument("--output-dir", default=None, help="override the recipe's output_dir")
    p.add_argument("--max-steps", type=int, default=None, help="override training.max_steps")
    p.add_argument("--eval-tokens", type=int, default=None, help="override eval_tokens")
    p.add_argument("--optim", default=None, help="override training.optim (e.g. adamw_torch, muon)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _run(args: argparse.Namespace) -> int:
    recipe = TrainRecipe.from_yaml(args.config)
    training = dict(recipe.training)
    if args.max_steps is not None:
        training["max_steps"] = args.max_steps
    if args.optim is not None:
        training["optim"] = args.optim
    if args.cpu:
        training["use_cpu"] = True
        training.pop("bf16", None)
    changes: dict[str, Any] = {"training": training}
    if args.output_dir is not None:
        changes["output_dir"] = args.output_dir
    if args.eval_tokens is not None:
        changes["eval_tokens"] = args.eval_tokens
    row = run_recipe(dataclasses.replace(recipe, **changes), progress=not args.no_progress)
    print(json.dumps(row))
    return 0


def register() -> None:
    """Register ``hf-effllm train`` (idempotent)."""
    from .cli import register_command

    register_command(
        "train", "train a model with Trainer on the corpus from a recipe YAML and report it", _configure, _run
    )


register()
