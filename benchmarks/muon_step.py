"""Muon optimizer step: its share of the training step at ~125M parameters, and Newton-Schulz throughput.

Model: a Llama of ~123M parameters (hidden 768, 12 layers, 12 heads, intermediate 2048, vocab 49152, tied
embeddings), batch 16 x 1024, bf16 autocast on CUDA. In one run:

1. correctness: hf-effllm ``Muon`` against ``torch.optim.Muon`` + ``AdamW`` on the same gradients (one step);
2. optimizer step time and whole training step (forward + backward + step) time for: fused AdamW alone,
   ``torch.optim.Muon`` (hidden matrices) + fused AdamW (the rest), hf-effllm ``Muon`` with and without
   ``torch.compile`` of the Newton-Schulz chain; the step's share of the training step is the figure
   (target <= 3%);
3. Newton-Schulz throughput of the model's same-shape batches (TFLOP/s), batched vs one matrix at a time;
4. under ``torchrun --nproc_per_node N`` (NCCL): the optimizer step with the work shared over ranks vs every rank
   doing all of it (``distributed=off``).

Usage (repo root)::

    python benchmarks/muon_step.py                        # GPU, ~3 min
    torchrun --nproc_per_node 2 benchmarks/muon_step.py --distributed-only   # 2-GPU scaling
    python benchmarks/muon_step.py --quick                # tiny model on the CPU (smoke check)

Results: ``benchmarks/results/muon_step.{json,md}`` (``muon_step_quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

if importlib.util.find_spec("hf_effllm") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from hf_effllm.benchmarking import BenchmarkRun, markdown_table, time_ms
from hf_effllm.optim import Muon, MuonConfig, classify_parameters, newton_schulz


def build_model(quick: bool, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    if quick:
        cfg = LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
        )
    else:
        cfg = LlamaConfig(
            vocab_size=49152,
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=12,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(device).train()


def make_optimizer(kind: str, model: torch.nn.Module, device: torch.device) -> Any:
    fused = device.type == "cuda"
    if kind == "adamw_fused":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=fused)
    if kind == "torch_muon+adamw":
        infos = classify_parameters(model, split_fused=False)
        hidden = [i.param for i in infos if i.use_muon]
        rest = [i.param for i in infos if not i.use_muon]
        muon = torch.optim.Muon(hidden, lr=1e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
        adamw = torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.1, fused=fused)

        class Pair:
            def step(self) -> None:
                muon.step()
                adamw.step()

            def zero_grad(self, set_to_none: bool = True) -> None:
                muon.zero_grad(set_to_none)
                adamw.zero_grad(set_to_none)

        return Pair()
    compile_ = {"hf_muon": "auto", "hf_muon_nocompile": "false", "hf_muon_compile": "true"}[kind]
    return Muon.from_model(model, lr=1e-3, weight_decay=0.1, config=MuonConfig(compile=compile_))


def check_correctness(device: torch.device) -> float:
    """Max |difference| of hf-effllm Muon vs torch.optim.Muon + AdamW after one step from the same gradients."""
    from hf_effllm.testing import tiny_model

    a, b = tiny_model("llama").to(device), tiny_model("llama").to(device)
    ids = torch.randint(0, 256, (2, 32), device=device)
    for m in (a, b):
        m(input_ids=ids, labels=ids).loss.backward()
    ours = Muon.from_model(
        a, lr=1e-2, weight_decay=0.1, config=MuonConfig(adjust_lr="match_rms_adamw", compile="false")
    )
    infos = classify_parameters(b)
    ref_m = torch.optim.Muon(
        [i.param for i in infos if i.use_muon], lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"
    )
    decay = [i.param for i in infos if not i.use_muon and i.param.ndim >= 2]
    no_decay = [i.param for i in infos if not i.use_muon and i.param.ndim < 2]
    ref_a = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2, weight_decay=0.1)
    ours.step()
    ref_m.step()
    ref_a.step()
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def training_step_times(
    model: torch.nn.Module, opt: Any, ids: torch.Tensor, device: torch.device
) -> tuple[float, float]:
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def fwd_bwd() -> None:
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    def full() -> None:
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)

    full()
    full()
    train_ms = time_ms(full, warmup=200, rep=1000)
    fwd_bwd()
    step_ms = time_ms(opt.step, warmup=100, rep=500)
    opt.zero_grad(set_to_none=True)
    return train_ms, step_ms


def ns_flops(n: int, r: int, c: int, steps: int = 5) -> float:
    r, c = min(r, c), max(r, c)
    return n * steps * (4.0 * r * r * c + 2.0 * r**3)


def ns_throughput(model: torch.nn.Module, device: torch.device) -> list[dict[str, Any]]:
    shapes: dict[tuple[int, int], int] = {}
    for info in classify_parameters(model):
        if info.use_muon:
            r, c = info.param.shape[-2:]
            key = (min(r, c), max(r, c))
            shapes[key] = shapes.get(key, 0) + (info.param.numel() // (r * c))
    rows = []
    for (r, c), n in shapes.items():
        x = torch.randn(n, r, c, device=device)
        batched = time_ms(lambda x=x: newton_schulz(x), warmup=50, rep=300)
        single = time_ms(lambda x=x: [newton_schulz(m) for m in x], warmup=50, rep=300)
        compiled = None
        if device.type == "cuda":
            compiled = time_ms(lambda x=x: newton_schulz(x, compile=True), warmup=50, rep=300)
        flops = ns_flops(n, r, c)
        best = min(t for t in (batched, compiled) if t is not None)
        rows.append(
            {
                "section": "newton_schulz",
                "shape": f"{n}x{r}x{c}",
                "batched_ms": round(batched, 3),
                "one_by_one_ms": round(single, 3),
                "compiled_ms": round(compiled, 3) if compiled is not None else None,
                "speedup_batched": round(single / batched, 2),
                "tflops": round(flops / best / 1e9, 2),
            }
        )
    return rows


def distributed_scaling(quick: bool) -> None:
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = build_model(quick, device)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ids = torch.randint(0, model.config.vocab_size, (2 if quick else 16, 64 if quick else 1024), device=device)
    rows = []
    for mode in ("auto", "off"):
        opt = Muon.from_model(ddp, lr=1e-3, weight_decay=0.1, config=MuonConfig(distributed=mode))
        train_ms, step_ms = training_step_times(ddp, opt, ids, device)
        rows.append(
            {
                "section": "ddp",
                "world": world,
                "distributed": mode,
                "train_step_ms": round(train_ms, 2),
                "optimizer_step_ms": round(step_ms, 3),
                "share_pct": round(100 * step_ms / train_ms, 2),
            }
        )
    if rank == 0:
        run = BenchmarkRun(
            f"muon_step_ddp{world}" + ("_quick" if quick else ""),
            f"Muon optimizer step under DDP on {world} ranks: Newton-Schulz shared over ranks (auto) vs repeated on "
            "every rank (off).",
        )
        for r in rows:
            run.add(**r)
        run.write()
        print(markdown_table(rows))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--distributed-only", action="store_true", help="only the DDP scaling part (torchrun)")
    args = parser.parse_args()
    if args.distributed_only or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        distributed_scaling(args.quick)
        return
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    diff = check_correctness(device)
    print(f"correctness: max |hf Muon - torch Muon/AdamW| after one step = {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit(f"hf-effllm Muon disagrees with torch.optim.Muon + AdamW by {diff:.2e}")

    batch, seq = (2, 64) if args.quick else (16, 1024)
    model = build_model(args.quick, device)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    kinds = ["adamw_fused", "hf_muon_nocompile", "hf_muon_compile"]
    if hasattr(torch.optim, "Muon"):
        kinds.insert(1, "torch_muon+adamw")
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        model = build_model(args.quick, device)
        opt = make_optimizer(kind, model, device)
        train_ms, step_ms = training_step_times(model, opt, ids, device)
        rows.append(
            {
                "section": "training_step",
                "optimizer": kind,
                "params_m": round(n_params / 1e6, 1),
                "batch": f"{batch}x{seq}",
                "train_step_ms": round(train_ms, 2),
                "optimizer_step_ms": round(step_ms, 3),
                "share_pct": round(100 * step_ms / train_ms, 2),
            }
        )
        print(rows[-1])
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows += ns_throughput(build_model(args.quick, device), device)
    run = BenchmarkRun(
        "muon_step" + ("_quick" if args.quick else ""),
        "Optimizer step time and its share of the training step (forward + backward + step) for a "
        f"{n_params / 1e6:.0f}M-parameter Llama at batch {batch}x{seq}; Newton-Schulz throughput per same-shape "
        "batch of that model (5 bf16 steps; batched vs one matrix at a time; compiled on CUDA).",
    )
    run.meta["correctness_max_abs_diff"] = diff
    for r in rows:
        run.add(**r)
    run.write()
    print(markdown_table([r for r in rows if r["section"] == "training_step"]))
    print(markdown_table([r for r in rows if r["section"] == "newton_schulz"]))


if __name__ == "__main__":
    main()
