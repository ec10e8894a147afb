"""SeerAttention quality: perplexity of the embedded model with distilled gates at several sparsities.

In one run: distil the gates on the corpus's training split (or load them with ``--gates``), then score held-out
text at ``--context`` tokens per window with the dense model and, at each sparsity (share of causal 64x64 blocks
skipped, top-k per block row), with these variants (``--variants``, comma-separated):

- ``seer``: the learned gates, plain top-k per block row (distilled with ``--target`` / ``--group-reduce`` /
  ``--free-blocks-loss`` / ``--keep-sink``, or loaded with ``--gates``);
- ``seer+sink``: the learned gates with key block 0 (attention sink) always kept, the gate ranking the rest (every
  variant has a ``+sink`` form);
- ``sink_local``: a predefined pattern at the same density per block row (attention sink + local window);
- ``oracle_max`` / ``oracle_max_mean``: diagnostic upper bound: the blocks are the top-k of the TRUE block-max
  attention map of each layer (the paper's distillation target, computed on the actual Q/K), reduced over each KV
  group by max / mean, i.e. the best a per-KV-head gate trained on that target could pick;
- ``oracle_mass`` / ``oracle_mass_max``: the same with the block *mass* (sum of the probabilities of each tile, the
  default target ``target="mass"``), group mean / max;
- ``oracle_max_head`` / ``oracle_mass_head``: one mask per query head (bound of a per-query-head gate).

With ``--top-p`` (e.g. ``0.95,0.9,0.8``) every variant but the fixed pattern also runs with an adaptive budget
(config ``top_p``): each block row keeps its most probable blocks until their probabilities sum to that value, so the
achieved sparsity (reported) varies with the text and the layer; one row per value and variant.

Targets (BENCHMARKS.md): <= +1% at 50%, <= +4% at 90%. Results are written after every row, so a run cut short
keeps what it measured.

Usage (repo root)::

    python benchmarks/seer_quality.py                 # GPU: 8k context, 32k held-out tokens, distillation at 8k
    python benchmarks/seer_quality.py --quick         # CPU smoke run: 1k context, tiny distillation
    python benchmarks/seer_quality.py --gates DIR     # reuse gates saved by a previous run (--save-gates DIR)
    python benchmarks/seer_quality.py --variants dense,oracle_max,sink_local --sparsities 0.9  # no distillation
    python benchmarks/seer_quality.py --variants dense,seer --sparsities 0.5,0.9 --top-p 0.95,0.9,0.8  # adaptive

Results: ``$HF_EFFLLM_RESULTS_DIR`` (default ``benchmarks/results``) ``seer_quality{,_quick}.{json,md}``
(``--name`` picks another file stem).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path

if importlib.util.find_spec("hf_effllm") is None:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import hf_effllm  # noqa: E402
from hf_effllm import seer  # noqa: E402
from hf_effllm.benchmarking import BenchmarkRun, markdown_table  # noqa: E402

COLUMNS = ["variant", "target_sparsity", "sparsity", "perplexity", "vs_dense_pct", "num_tokens", "seconds", "note"]
# variant -> (row label, inference options given to set_seer_options on top of the run's config)
VARIANTS: dict[str, tuple[str, dict]] = {
    "seer": ("seer (learned gates)", {}),
    "sink_local": ("sink+local (fixed)", {"fixed_pattern": "sink_local"}),
    "oracle_max": ("oracle: block max, group max", {"oracle": "kv", "target": "max", "target_group_reduce": "max"}),
    "oracle_max_mean": (
        "oracle: block max, group mean",
        {"oracle": "kv", "target": "max", "target_group_reduce": "mean"},
    ),
    "oracle_max_head": ("oracle: block max, per q head", {"oracle": "head", "target": "max"}),
    "oracle_mass": (
        "oracle: block mass, group mean",
        {"oracle": "kv", "target": "mass", "target_group_reduce": "mean"},
    ),
    "oracle_mass_max": (
        "oracle: block mass, group max",
        {"oracle": "kv", "target": "mass", "target_group_reduce": "max"},
    ),
    "oracle_mass_head": ("oracle: block mass, per q head", {"oracle": "head", "target": "mass"}),
}
# every variant also exists with the attention sink (key block 0) always kept: "<name>+sink"
VARIANTS.update(
    {f"{k}+sink": (f"{label} + sink kept", {**o, "keep_sink": True}) for k, (label, o) in list(VARIANTS.items())}
)
LEARNED = ("seer", "seer+sink")
DEFAULT_VARIANTS = "dense,seer,sink_local,oracle_max,oracle_mass"


def _floats(option: str, example: str) -> Callable[[str], list[float]]:
    """argparse type: comma-separated values in (0, 1) for ``option`` (named in the error, with ``example``)."""

    def parse(text: str) -> list[float]:
        try:
            values = [float(x) for x in text.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{option}={text!r}: {e}; give e.g. {example}") from None
        if not values or any(not 0.0 < v < 1.0 for v in values):
            raise argparse.ArgumentTypeError(f"{option}={text!r}: give values in (0, 1), e.g. {example}")
        return values

    return parse


def _variants(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n != "dense" and n not in VARIANTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--variants={text!r}: unknown {bad}; use dense and/or {list(VARIANTS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small CPU run (1k context, short distillation)")
    p.add_argument("--context", type=int, default=None, help="tokens per window (default 8192; quick 1024)")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens (default 4 windows; quick 2)")
    p.add_argument("--variants", type=_variants, default=_variants(DEFAULT_VARIANTS), help="rows, comma-separated")
    p.add_argument(
        "--sparsities",
        type=_floats("--sparsities", "0.5,0.7,0.9"),
        default=[0.5, 0.7, 0.9],
        help="target sparsities, e.g. 0.5,0.9",
    )
    p.add_argument(
        "--top-p",
        type=_floats("--top-p", "0.97,0.95,0.9"),
        default=[],
        help="also run the gate/oracle rows with an adaptive budget: per row, the most probable blocks up to this "
        "probability mass (config top_p), e.g. 0.9,0.95",
    )
    p.add_argument("--gates", default=None, help="load gates from this folder instead of distilling")
    p.add_argument("--save-gates", default=None, help="save the distilled gates to this folder")
    p.add_argument("--nsamples", type=int, default=None, help="training windows (default 32; quick 4)")
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default 300; quick 30)")
    p.add_argument("--lr", type=float, default=3e-3, help="distillation learning rate")
    p.add_argument("--warmup", type=int, default=0, help="distillation warm-up steps")
    p.add_argument("--target", choices=["max", "mass"], default="mass", help="distillation target (config target)")
    p.add_argument(
        "--free-blocks-loss", action="store_true", help="config distill_forced_blocks=False (loss on chosen blocks)"
    )
    p.add_argument("--group-reduce", choices=["max", "mean"], default="mean", help="config target_group_reduce")
    p.add_argument("--keep-sink", action="store_true", help="distil with keep_sink=True (with --free-blocks-loss)")
    p.add_argument("--name", default=None, help="results file stem (default seer_quality, quick seer_quality_quick)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick
    ctx = args.context or (1024 if quick else 8192)
    eval_tokens = args.eval_tokens or ((2 if quick else 4) * ctx)
    nsamples = args.nsamples or (4 if quick else 32)
    steps = args.steps or (30 if quick else 300)
    learned = any(v in LEARNED for v in args.variants)
    model = hf_effllm.load_model(dtype="bfloat16" if dev == "cuda" else "float32", device=dev)
    tok = hf_effllm.load_tokenizer()
    ids = tok(hf_effllm.corpus_text("eval"), return_tensors="pt", add_special_tokens=False).input_ids[0][:eval_tokens]
    base = hf_effllm.SeerAttentionConfig(
        nz_ratio=0.5,
        target=args.target,
        target_group_reduce=args.group_reduce,
        distill_forced_blocks=not args.free_blocks_loss,
        keep_sink=args.keep_sink,
    )
    distil_text = (
        f"'seer' rows: learned gates (distilled here: {nsamples} training windows of {ctx} tokens, {steps} steps, "
        f"lr {args.lr}, target {args.target}, group reduce {args.group_reduce}, "
        f"loss on forced blocks {not args.free_blocks_loss}, keep_sink {args.keep_sink}); "
        if args.gates is None
        else f"'seer' rows: learned gates loaded from {args.gates}; "
    )
    run = BenchmarkRun(
        args.name or ("seer_quality_quick" if quick else "seer_quality"),
        f"SeerAttention quality on the embedded SmolLM2-135M, held-out King James text, {ids.numel()} tokens in "
        f"windows of {ctx}. "
        + (distil_text if learned else "")
        + "'sink+local' rows: predefined pattern (first block + most recent blocks); 'oracle' rows (diagnostic): "
        "top-k of the true attention map of each layer (block max or block mass, per KV group or per query head, "
        "as labelled), the best a gate trained on that target can do; '+ sink kept': block 0 always kept. "
        "Rows with a target_sparsity keep the same number of blocks per block row (diagonal included). "
        + (
            "Rows 'top-p P' (note 'adaptive budget'): each block row keeps its most probable blocks (gate "
            "probabilities, or the true map for oracle rows) until they sum to P, plus the diagonal, so the budget "
            "varies per row, head and layer. "
            if args.top_p
            else ""
        )
        + "sparsity = achieved share of causal 64x64 blocks skipped, averaged over layers. vs_dense_pct = "
        "perplexity change against the dense model in the same run.",
    )
    run.meta["device"] = dev
    print(f"device {dev}, context {ctx}, eval tokens {ids.numel()}, variants {args.variants}")

    def evaluate(m) -> dict:
        t0 = time.perf_counter()
        r = hf_effllm.perplexity(m, ids, context_length=ctx, progress=False).to_dict()
        r["seconds"] = round(time.perf_counter() - t0, 1)
        return r

    def flush() -> None:
        if not args.no_write:
            run.write(COLUMNS)

    dense = evaluate(model)
    if "dense" in args.variants:
        run.add(variant="dense", target_sparsity=0.0, sparsity=0.0, **dense)
        flush()
    print(f"  dense ppl {dense['perplexity']:.4f}")
    hf_effllm.apply_seer_attention(model, base, gates=args.gates)
    if args.gates is not None:
        base = seer.seer_config_of(model)
    elif learned:
        t0 = time.perf_counter()
        res = seer.distill_gates(
            model,
            nsamples=nsamples,
            seqlen=ctx,
            max_steps=steps,
            learning_rate=args.lr,
            warmup_steps=args.warmup,
            logging_steps=max(1, steps // 10),
            tokenizer=tok,
        )
        run.meta["distillation"] = (
            f"{res.steps} steps in {time.perf_counter() - t0:.0f} s, loss {res.losses[0]:.4f} -> {res.final_loss:.4f}"
            if res.losses
            else f"{res.steps} steps"
        )
        print("  distillation:", run.meta["distillation"])
        if args.save_gates:
            seer.save_gates(model, args.save_gates, overwrite=True)
    for target in args.sparsities:
        for name in args.variants:
            if name == "dense":
                continue
            label, options = VARIANTS[name]
            opts = {
                "fixed_pattern": None,
                "oracle": None,
                "keep_sink": False,  # rows without "+sink": the plain top-k of the gate / map
                "target": base.target,
                "target_group_reduce": base.target_group_reduce,
                **options,
            }
            seer.set_seer_options(model, nz_ratio=round(1.0 - target, 4), **opts)
            seer.sparsity_report(model, reset=True)
            r = evaluate(model)
            sp = seer.mean_sparsity(seer.sparsity_report(model, reset=True))
            pct = 100.0 * (r["perplexity"] / dense["perplexity"] - 1.0)
            run.add(variant=label, target_sparsity=target, sparsity=round(sp, 4), vs_dense_pct=round(pct, 2), **r)
            flush()
            print(f"  {label:34s} target {target:.0%} achieved {sp:.1%} ppl {r['perplexity']:.4f} ({pct:+.2f}%)")
    for top_p in args.top_p:
        for name in args.variants:
            if name == "dense" or VARIANTS[name][1].get("fixed_pattern"):
                continue  # a fixed pattern has no probabilities to accumulate
            label, options = VARIANTS[name]
            opts = {"fixed_pattern": None, "oracle": None, "keep_sink": False, "target": base.target,
                    "target_group_reduce": base.target_group_reduce, **options}  # fmt: skip
            seer.set_seer_options(model, top_p=top_p, **opts)
            seer.sparsity_report(model, reset=True)
            r = evaluate(model)
            sp = seer.mean_sparsity(seer.sparsity_report(model, reset=True))
            pct = 100.0 * (r["perplexity"] / dense["perplexity"] - 1.0)
            label = f"{label}, top-p {top_p:g}"
            run.add(variant=label, sparsity=round(sp, 4), vs_dense_pct=round(pct, 2), note="adaptive budget", **r)
            flush()
            print(f"  {label:44s} achieved {sp:.1%} ppl {r['perplexity']:.4f} ({pct:+.2f}%)")
    seer.set_seer_options(
        model,
        **{k: getattr(base, k) for k in ("nz_ratio", "threshold", "top_p", "fixed_pattern", "oracle", "keep_sink")},
    )
    if not args.no_write:
        print("wrote", *run.write(COLUMNS))
    print()
    print(markdown_table(run.rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
