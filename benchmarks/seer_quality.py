"""SeerAttention quality: perplexity of the embedded model with distilled gates at several sparsities.

In one run: distil the gates on the corpus's training split (or load them with ``--gates``), then score held-out
text at ``--context`` tokens per window with the dense model, with the learned gates at 50/70/90% of the causal
64x64 blocks skipped, and with a predefined pattern at the same density per block row (attention sink + local
window, ``fixed_pattern="sink_local"``). Targets (BENCHMARKS.md): <= +1% at 50%, <= +4% at 90%.

Usage (repo root)::

    python benchmarks/seer_quality.py                 # GPU: 8k context, 64k held-out tokens, distillation at 8k
    python benchmarks/seer_quality.py --quick         # CPU smoke run: 1k context, tiny distillation
    python benchmarks/seer_quality.py --gates DIR     # reuse gates saved by a previous run (--save-gates DIR)

Results: ``$HF_EFFLLM_RESULTS_DIR`` (default ``benchmarks/results``) ``seer_quality{,_quick}.{json,md}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

if importlib.util.find_spec("hf_effllm") is None:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import hf_effllm  # noqa: E402
from hf_effllm import seer  # noqa: E402
from hf_effllm.benchmarking import BenchmarkRun, markdown_table  # noqa: E402

COLUMNS = ["variant", "target_sparsity", "sparsity", "perplexity", "vs_dense_pct", "num_tokens", "seconds", "note"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small CPU run (1k context, short distillation)")
    p.add_argument("--context", type=int, default=None, help="tokens per window (default 8192; quick 1024)")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens (default 65536; quick 2048)")
    p.add_argument("--gates", default=None, help="load gates from this folder instead of distilling")
    p.add_argument("--save-gates", default=None, help="save the distilled gates to this folder")
    p.add_argument("--nsamples", type=int, default=None, help="training windows (default 64; quick 4)")
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default 800; quick 30)")
    p.add_argument("--lr", type=float, default=3e-3, help="distillation learning rate")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick
    ctx = args.context or (1024 if quick else 8192)
    eval_tokens = args.eval_tokens or (2 * ctx if quick else 8 * ctx)
    nsamples = args.nsamples or (4 if quick else 64)
    steps = args.steps or (30 if quick else 800)
    model = hf_effllm.load_model(dtype="bfloat16" if dev == "cuda" else "float32", device=dev)
    tok = hf_effllm.load_tokenizer()
    ids = tok(hf_effllm.corpus_text("eval"), return_tensors="pt", add_special_tokens=False).input_ids[0][:eval_tokens]
    run = BenchmarkRun(
        "seer_quality_quick" if quick else "seer_quality",
        f"SeerAttention quality on the embedded SmolLM2-135M, held-out King James text, {ids.numel()} tokens in "
        f"windows of {ctx}. 'seer' rows: learned gates (distilled here: {nsamples} training windows of {ctx} tokens, "
        f"{steps} steps, lr {args.lr}); 'sink+local' rows: predefined pattern (first block + most recent blocks) with "
        "the same number of blocks per block row. sparsity = achieved share of causal 64x64 blocks skipped, "
        "averaged over layers. vs_dense_pct = perplexity change against the dense model in the same run.",
    )
    run.meta["device"] = dev
    print(f"device {dev}, context {ctx}, eval tokens {ids.numel()}")

    def evaluate(m) -> dict:
        t0 = time.perf_counter()
        r = hf_effllm.perplexity(m, ids, context_length=ctx, progress=False).to_dict()
        r["seconds"] = round(time.perf_counter() - t0, 1)
        return r

    dense = evaluate(model)
    run.add(variant="dense", target_sparsity=0.0, sparsity=0.0, **dense)
    print(f"  dense ppl {dense['perplexity']:.4f}")
    hf_effllm.apply_seer_attention(model, hf_effllm.SeerAttentionConfig(nz_ratio=0.5), gates=args.gates)
    if args.gates is None:
        t0 = time.perf_counter()
        res = seer.distill_gates(
            model,
            nsamples=nsamples,
            seqlen=ctx,
            max_steps=steps,
            learning_rate=args.lr,
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
    for target in (0.5, 0.7, 0.9):
        for pattern in (None, "sink_local"):
            seer.set_seer_options(model, nz_ratio=round(1.0 - target, 4), fixed_pattern=pattern)
            seer.sparsity_report(model, reset=True)
            r = evaluate(model)
            sp = seer.mean_sparsity(seer.sparsity_report(model, reset=True))
            pct = 100.0 * (r["perplexity"] / dense["perplexity"] - 1.0)
            name = "seer (learned gates)" if pattern is None else "sink+local (fixed)"
            run.add(variant=name, target_sparsity=target, sparsity=round(sp, 4), vs_dense_pct=round(pct, 2), **r)
            print(f"  {name:22s} target {target:.0%} achieved {sp:.1%} ppl {r['perplexity']:.4f} ({pct:+.2f}%)")
    seer.set_seer_options(model, nz_ratio=0.5, fixed_pattern=None)
    if not args.no_write:
        print("wrote", *run.write(COLUMNS))
    print()
    print(markdown_table(run.rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
