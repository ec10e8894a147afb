"""Muon vs AdamW: a Llama-style model trained from scratch on the corpus, same steps, batch and schedule.

AdamW runs at three learning rates (the best final held-out loss is the baseline); Muon (``match_rms_adamw``, so it
takes an AdamW-scale lr) runs once. Held-out loss is measured every ``--eval-every`` steps on fixed windows of the
corpus's eval split (never trained on). The figure: the fraction of the steps Muon needs to reach the best AdamW
run's final held-out loss (target <= 60%; paper 48-52%).

Usage (repo root)::

    python benchmarks/muon_vs_adamw.py             # GPU: ~52M-param Llama, 2000 steps of 16x512 (bf16 autocast)
    python benchmarks/muon_vs_adamw.py --quick     # tiny model, few steps, CPU (smoke check)

Results: ``benchmarks/results/muon_vs_adamw.{json,md}`` (``muon_vs_adamw_quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path
from typing import Any

if importlib.util.find_spec("hf_effllm") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from hf_effllm.benchmarking import BenchmarkRun, markdown_table
from hf_effllm.data import calibration_batches, corpus_text, load_tokenizer
from hf_effllm.optim import Muon, MuonConfig


def build_model(quick: bool, vocab: int, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    if quick:
        cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    else:
        cfg = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8)
    config = LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=2048, **cfg)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(device)


@torch.no_grad()
def eval_loss(model: torch.nn.Module, windows: torch.Tensor, device: torch.device, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        total += float(loss) * ids.shape[0]
        count += ids.shape[0]
    model.train()
    return total / count


def train_run(
    optim: str, lr: float, train: torch.Tensor, evals: torch.Tensor, args: argparse.Namespace, vocab: int
) -> dict[str, Any]:
    from transformers import get_cosine_schedule_with_warmup

    device = torch.device(args.device)
    model = build_model(args.quick, vocab, device).train()
    if optim == "adamw":
        opt = torch.optim.AdamW(
            model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda"
        )
    else:
        opt = Muon.from_model(model, lr=lr, weight_decay=0.1, betas=(0.9, 0.95), config=MuonConfig())
    sched = get_cosine_schedule_with_warmup(opt, args.warmup, args.steps)
    curve: list[tuple[int, float]] = [(0, eval_loss(model, evals, device, args.batch))]
    start = time.perf_counter()
    for step in range(args.steps):
        ids = train[step * args.batch : (step + 1) * args.batch].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append((step + 1, eval_loss(model, evals, device, args.batch)))
    seconds = time.perf_counter() - start
    print(
        f"{optim} lr {lr:g}: final held-out loss {curve[-1][1]:.4f} after {args.steps} steps ({seconds:.0f} s)",
        flush=True,
    )
    return {"optim": optim, "lr": lr, "curve": curve, "final": curve[-1][1], "seconds": seconds}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step at which the curve reaches ``target`` (linear interpolation between evaluations)."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            if l0 <= target:
                return float(s0)
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, CPU")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--adamw-lrs", default=None, help="comma-separated AdamW learning rates (default 3)")
    parser.add_argument("--muon-lr", type=float, default=None)
    args = parser.parse_args()
    q = args.quick
    args.steps = args.steps or (24 if q else 2000)
    args.batch = args.batch or (4 if q else 16)
    args.seq = args.seq or (64 if q else 512)
    args.eval_every = max(1, args.steps // (6 if q else 40))
    args.warmup = max(1, args.steps // 20)
    adamw_lrs = [float(x) for x in (args.adamw_lrs or ("3e-3,6e-3,1.2e-2" if q else "1e-3,2e-3,4e-3")).split(",")]
    muon_lr = args.muon_lr or (6e-3 if q else 2e-3)
    args.device = "cuda" if torch.cuda.is_available() and not q else "cpu"

    tok = load_tokenizer()
    vocab = len(tok)
    train = calibration_batches(tok, nsamples=args.steps * args.batch, seqlen=args.seq, seed=0)
    eval_ids = tok(corpus_text("eval"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    n_eval = min((16 if q else 256), eval_ids.numel() // args.seq) * args.seq  # whole windows of held-out text
    evals = eval_ids[:n_eval].view(-1, args.seq)

    runs = [train_run("adamw", lr, train, evals, args, vocab) for lr in adamw_lrs]
    runs.append(train_run("muon", muon_lr, train, evals, args, vocab))
    best = min((r for r in runs if r["optim"] == "adamw" and math.isfinite(r["final"])), key=lambda r: r["final"])
    muon = runs[-1]
    reach = steps_to_reach(muon["curve"], best["final"])
    rows = []
    for r in runs:
        rows.append(
            {
                "optim": r["optim"],
                "lr": r["lr"],
                "final_eval_loss": round(r["final"], 4),
                "final_eval_ppl": round(math.exp(r["final"]), 2),
                "best_adamw": r is best,
                "steps_to_best_adamw_loss": round(steps_to_reach(r["curve"], best["final"]) or float("nan"), 1),
                "seconds": round(r["seconds"], 1),
            }
        )
    n_params = sum(p.numel() for p in build_model(q, vocab, torch.device("cpu")).parameters())
    run = BenchmarkRun(
        "muon_vs_adamw" + ("_quick" if q else ""),
        f"Llama-style {n_params / 1e6:.0f}M-parameter model from scratch on the corpus's train split, {args.steps} "
        f"steps of {args.batch}x{args.seq} tokens, cosine schedule with {args.warmup} warm-up steps, weight decay 0.1, "
        "grad clip 1. AdamW at three learning rates vs Muon (match_rms_adamw); held-out loss on the eval split. "
        "Figure: steps Muon needs to reach the best AdamW final loss, as a fraction of the steps (target <= 0.6).",
    )
    run.meta["muon_fraction_of_steps"] = None if reach is None else reach / args.steps
    run.meta["curves"] = {f"{r['optim']}@{r['lr']}": r["curve"] for r in runs}
    for r in rows:
        run.add(**r)
    run.write()
    print(markdown_table(rows))
    frac = "not reached" if reach is None else f"{reach:.0f} steps = {reach / args.steps:.0%} of {args.steps}"
    print(f"Muon reaches the best AdamW final held-out loss ({best['final']:.4f}, lr {best['lr']}) in {frac}")


if __name__ == "__main__":
    main()
