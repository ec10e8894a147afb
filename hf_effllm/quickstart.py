"""The main job: ``hf-effllm quickstart``.

Loads a model (the embedded SmolLM2-135M by default) and the held-out corpus text, measures the dense baseline,
runs every registered method stage, and writes a Hub-ready folder: ``results.json``, ``results.md``, a plot and a
model card (``README.md``). Method sub-packages add their stage with :func:`register_stage`.

Example:
    >>> from hf_effllm.quickstart import QuickstartOptions, run_quickstart  # doctest: +SKIP
    >>> rows = run_quickstart(QuickstartOptions(output="out", eval_tokens=8192))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .benchmarking import environment_info, markdown_table
from .data import EMBEDDED_ALIASES, EMBEDDED_MODEL_HUB_ID, corpus_text, load_model, load_tokenizer, split_books
from .errors import HfEffllmError
from .evaluation import perplexity
from .hub import render_card
from .utils.io import atomic_dir, atomic_write_text, prepare_output_dir
from .utils.torch_utils import resolve_device


@dataclass
class QuickstartOptions:
    """Options of :func:`run_quickstart` (the CLI flags of ``hf-effllm quickstart``)."""

    model: str | None = None
    output: str = "quickstart_output"
    overwrite: bool = False
    device: str = "auto"
    dtype: str | None = None
    context_length: int = 2048
    eval_tokens: int = 16384
    batch_size: int = 1
    stages: list[str] | None = None
    progress: bool = True


@dataclass
class StageContext:
    """What a stage gets: the loaded base model, tokenizer, held-out token ids, options, and its output folder."""

    model: Any
    tokenizer: Any
    eval_ids: torch.Tensor
    options: QuickstartOptions
    folder: Path
    baseline: dict[str, Any] = field(default_factory=dict)
    files: list[tuple[str, str]] = field(default_factory=list)

    def evaluate(self, model: Any = None, **kwargs: Any) -> dict[str, Any]:
        """Perplexity of ``model`` (default the base model) on the held-out ids, with the run's settings."""
        opts = self.options
        res = perplexity(
            model if model is not None else self.model,
            self.eval_ids,
            context_length=opts.context_length,
            batch_size=opts.batch_size,
            progress=opts.progress,
            **kwargs,
        )
        return res.to_dict()


StageFn = Callable[[StageContext], list[dict[str, Any]]]
_STAGES: dict[str, tuple[int, StageFn]] = {}


def register_stage(name: str, fn: StageFn, *, order: int) -> None:
    """Add (or replace, so re-imports are harmless) a quickstart stage; stages run by ascending ``order``.

    A stage returns result rows with at least ``variant`` and ``perplexity`` keys, and may add files to
    ``ctx.folder`` (listing them in ``ctx.files`` as ``(name, description)`` for the card).
    """
    _STAGES[name] = (order, fn)


def available_stages() -> list[str]:
    """Registered stage names in run order."""
    return [n for n, _ in sorted(_STAGES.items(), key=lambda kv: kv[1][0])]


def _baseline_stage(ctx: StageContext) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    res = ctx.evaluate()
    ctx.baseline.update(res)
    return [{"variant": "dense (baseline)", **res, "seconds": round(time.perf_counter() - t0, 1)}]


register_stage("baseline", _baseline_stage, order=0)


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    values = [r["perplexity"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(rows) + 2), 3.5))
    bars = ax.bar(range(len(rows)), values, color=["#555555"] + ["#2a7ab0"] * (len(rows) - 1))
    ax.set_xticks(range(len(rows)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=9)
    for b, v in zip(bars, values):
        ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def base_model_id(requested: str | None, model: Any) -> str:
    """The Hub id for a card's ``base_model``: the embedded model's id, a Hub id given, or the config's name."""
    if requested is None or requested in EMBEDDED_ALIASES:
        return EMBEDDED_MODEL_HUB_ID
    if not Path(requested).expanduser().exists():
        return requested
    name = getattr(model.config, "name_or_path", "") or ""
    return name if name.count("/") == 1 and not Path(name).exists() else Path(requested).name


def run_quickstart(options: QuickstartOptions) -> list[dict[str, Any]]:
    """Run the quickstart and write its output folder; returns the result rows.

    Raises:
        HfEffllmError: bad options, an output folder that exists and is not empty (without ``overwrite``), an
            unknown stage, or a model that cannot be loaded.
    """
    prepare_output_dir(options.output, overwrite=options.overwrite, arg_name="output")
    known = available_stages()
    stages = options.stages or known
    unknown = [s for s in stages if s not in _STAGES]
    if unknown:
        raise HfEffllmError(f"stages={unknown} unknown; available: {known}.")
    if "baseline" not in stages:
        stages = ["baseline", *stages]
    stages = sorted(stages, key=lambda s: _STAGES[s][0])
    if options.context_length < 2 or options.eval_tokens < options.context_length:
        raise HfEffllmError(
            f"eval_tokens={options.eval_tokens} must be >= context_length={options.context_length} (and that >= 2)."
        )
    device = resolve_device(options.device)
    model = load_model(options.model, dtype=options.dtype, device=device)
    tokenizer = load_tokenizer(options.model)
    ids = tokenizer(corpus_text("eval"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    eval_ids = ids[: options.eval_tokens]
    base_model = base_model_id(options.model, model)
    rows: list[dict[str, Any]] = []
    with atomic_dir(options.output, overwrite=options.overwrite, arg_name="output") as tmp:
        ctx = StageContext(model=model, tokenizer=tokenizer, eval_ids=eval_ids, options=options, folder=tmp)
        for name in stages:
            print(f"[hf-effllm] stage {name}", flush=True)
            for row in _STAGES[name][1](ctx):
                base = ctx.baseline.get("perplexity")
                # Relative to the baseline only when scored on the same tokens; stages that use another protocol
                # report their own same-protocol dense reference.
                if base and "perplexity" in row and row.get("num_tokens") == ctx.baseline.get("num_tokens"):
                    row.setdefault("vs_dense_pct", round(100.0 * (row["perplexity"] / base - 1.0), 2))
                rows.append({"stage": name, **row})
        env = environment_info()
        table_cols = ["stage", "variant", "perplexity", "vs_dense_pct", "num_tokens", "seconds"]
        extra = [
            k
            for r in rows
            for k in r
            if k not in table_cols and k not in ("nll", "num_windows", "context_length", "stride")
        ]
        columns = table_cols + list(dict.fromkeys(extra))
        table = markdown_table(rows, columns)
        payload = {
            "model": base_model,
            "options": asdict(options),
            "environment": env,
            "eval_books": split_books("eval"),
            "rows": rows,
        }
        atomic_write_text(tmp / "results.json", json.dumps(payload, indent=2, default=str) + "\n")
        atomic_write_text(tmp / "results.md", table)
        _plot(rows, tmp / "perplexity.png", f"{base_model}: perplexity at {options.context_length} tokens")
        files = [
            ("results.json", "all measurements, options, device and package versions"),
            ("results.md", "the results table"),
            ("perplexity.png", "perplexity of each variant"),
            *ctx.files,
        ]
        eval_books = split_books("eval")
        card = render_card(
            "quickstart",
            library_name="transformers",
            base_model=base_model,
            license="apache-2.0",
            tags=["hf-effllm", "efficiency", *[f"hf-effllm-{s}" for s in stages if s != "baseline"]],
            hf_effllm_version=__version__,
            stages=stages,
            context_length=options.context_length,
            eval_tokens=int(eval_ids.numel()),
            title=f"hf-effllm quickstart: {base_model}",
            eval_books=f"{eval_books[0]} to {eval_books[-1]}",
            files=files,
            device=env["device"]["name"],
            date=env["date"],
            results_table=table,
        )
        atomic_write_text(tmp / "README.md", str(card))
    print(table, flush=True)
    print(f"[hf-effllm] wrote {Path(options.output).resolve()}", flush=True)
    return rows
