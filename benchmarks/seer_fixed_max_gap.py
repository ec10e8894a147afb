"""How far each row's true max score lies from the block-max kernel's fixed reference, on a real model's Q/K.

``kernels.seer_blockmax`` (``_FIXED_MAX``, the default for bf16/fp32) takes each query row's probabilities against
one fixed reference instead of an online softmax: the row's largest score over key block 0 and its own diagonal
block. A program (``heads_per_program`` query heads x 64 rows) where some row's true max ends more than ``_GAP`` (64,
log2 units) above its reference is redone with the online softmax, so the share of such programs is what the
kernel pays for the trick on a given model. This runs the model (the embedded one by default) on held-out text,
records every layer's post-RoPE queries and keys, and reports per reference (key block 0 + diagonal block, as the
kernel does; the diagonal block alone; the Cauchy-Schwarz bound ``|q_i| max_j |k_j|``, which needs no products)
the quantiles of the rows' gap and the share of programs over 40 / 64 / 80 / 100.

    python benchmarks/seer_fixed_max_gap.py [--model PATH] [--tokens 2048]

CPU, float32; about a minute for the embedded model at 2k tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("hf_effllm") is None:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hf_effllm.benchmarking import BenchmarkRun  # noqa: E402
from hf_effllm.data import corpus_text, load_model, load_tokenizer  # noqa: E402

LOG2E = 1.4426950408889634
BLOCK = 64
THRESHOLDS = (40, 64, 80, 100)


def capture_qk(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's ``(q, k)`` as the attention function receives them (after RoPE), from one forward."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording(module, q, k, v, mask, **kwargs):
        seen.append((q.detach().float(), k.detach().float()))
        return sdpa_attention_forward(module, q, k, v, mask, **kwargs)

    AttentionInterface.register("hf_effllm_record_qk", recording)
    previous = model.config._attn_implementation
    model.set_attn_implementation("hf_effllm_record_qk")
    try:
        with torch.no_grad():
            model(ids)
    finally:
        model.set_attn_implementation(previous)
    return seen


def row_gaps(q: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(B, Hq, S)`` gap of each row's true max (log2 units) above each reference (Cauchy-Schwarz: below it)."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    scale = d**-0.5 * LOG2E
    qg = q.reshape(b, hkv, hq // hkv, s, d)
    scores = torch.einsum("bhgsd,bhtd->bhgst", qg, k) * scale
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    scores.masked_fill_(~causal, float("-inf"))
    true_max = scores.amax(-1)
    blk = torch.arange(s) // BLOCK
    diag = blk[:, None] == blk[None, :]
    ref_diag = scores.masked_fill(~diag, float("-inf")).amax(-1)
    ref_kernel = scores.masked_fill(~(diag | (blk[None, :] == 0)), float("-inf")).amax(-1)
    bound = qg.norm(dim=-1) * k.norm(dim=-1).amax(-1)[:, :, None, None] * scale
    return {
        "key block 0 + diagonal block (the kernel's)": (true_max - ref_kernel).reshape(b, hq, s),
        "diagonal block alone": (true_max - ref_diag).reshape(b, hq, s),
        "Cauchy-Schwarz bound |q| max|k| (gap below it)": (bound - true_max).reshape(b, hq, s),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model path or id (default: the embedded model)")
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens in the one sequence (default 2048)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.tokens < BLOCK or args.tokens % BLOCK:
        p.error(f"--tokens={args.tokens}: use a positive multiple of {BLOCK}")
    model = load_model(args.model).float().eval()
    ids = load_tokenizer(args.model)(corpus_text("eval"), return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] < args.tokens:
        p.error(f"--tokens={args.tokens}: the held-out text has only {ids.shape[1]} tokens")
    gaps: dict[str, list[torch.Tensor]] = {}
    programs: dict[str, list[torch.Tensor]] = {}
    for q, k in capture_qk(model, ids):
        group = q.shape[1] // k.shape[1]
        hp = 2 if group % 2 == 0 else 1  # the kernel's default heads per program
        for name, g in row_gaps(q, k).items():
            gaps.setdefault(name, []).append(g.flatten())
            b, hq, s = g.shape
            per_program = g.reshape(b, hq // hp, hp, s // BLOCK, BLOCK).amax(dim=(2, 4))
            programs.setdefault(name, []).append(per_program.flatten())
    run = BenchmarkRun(
        "seer_fixed_max_gap",
        "Gap (log2 units) between each query row's true max score and the block-max kernel's fixed reference "
        "(key block 0 + its diagonal block of 64 keys), and two alternatives, on the model's own post-RoPE Q/K "
        "over held-out text; over_T: share of kernel programs (heads per program x 64 rows) whose largest row "
        "gap exceeds T, i.e. redone with the online softmax at _GAP = T (the kernel uses 64).",
    )
    run.meta.update(model=args.model or "embedded", tokens=args.tokens, layers=len(next(iter(gaps.values()))))
    for name, parts in gaps.items():
        g = torch.cat(parts)
        pr = torch.cat(programs[name])
        row = {"reference": name, "rows": g.numel(), "programs": pr.numel()}
        row.update({f"gap_q{int(x * 100)}": round(g.quantile(x).item(), 2) for x in (0.5, 0.9, 0.99)})
        row["gap_max"] = round(g.max().item(), 2)
        row.update({f"over_{t}": round((pr > t).float().mean().item(), 4) for t in THRESHOLDS})
        run.add(**row)
        print(row)
    if not args.no_write:
        print(run.write()[1].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
