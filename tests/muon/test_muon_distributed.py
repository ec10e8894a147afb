"""Two gloo processes on the CPU: DDP and FSDP2 Muon steps equal the single-process steps, and the
Newton-Schulz work is shared (each rank orthogonalises about half of the matrices).

Every rank runs the full batch, so the averaged gradients are bitwise those of one process: what is compared is the
optimizer's distributed path (work split, all-gather, DTensor gather and re-shard), not all-reduce rounding, which
AdamW amplifies on rarely used embedding rows.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from hf_effllm.optim import Muon
from hf_effllm.testing import end_gloo_worker, spawn_gloo, tiny_model

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 3
LR = 1e-2


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (STEPS, 2 * WORLD, 16), generator=g)


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _single_process() -> dict[str, torch.Tensor]:
    model = tiny_model("deepseek_v3").train()
    opt = Muon.from_model(model, lr=LR, weight_decay=0.1)
    for ids in _batch():
        _loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, mode: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    model = tiny_model("deepseek_v3").train()
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    opt = Muon.from_model(wrapped, lr=LR, weight_decay=0.1)
    stats = []
    for ids in _batch():
        _loss(wrapped, ids).backward()
        opt.step()
        opt.zero_grad()
        stats.append(dict(opt.last_step_stats))
    state = {}
    for n, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        state[n.removeprefix("module.")] = full.detach().clone()
    # Muon's state_dict round-trips under DTensor too.
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    if rank == 0:
        torch.save({"params": state, "stats": stats}, out + f".{rank}")
    else:
        torch.save({"stats": stats}, out + f".{rank}")
    end_gloo_worker()  # not destroy_process_group(): see its docstring


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_gloo_processes_equal_one(mode, tmp_path):
    out = str(tmp_path / "result")
    spawn_gloo(_worker, (mode, out), nprocs=WORLD, timeout=300)
    reference = _single_process()
    initial = {n: p.detach() for n, p in tiny_model("deepseek_v3").named_parameters()}
    got = torch.load(out + ".0")
    assert set(got["params"]) == set(reference)
    for name, ref in reference.items():
        moved = (ref - initial[name]).abs().max()
        diff = (got["params"][name] - ref).abs().max()
        assert moved > 1e-3, name  # every parameter trains, so the comparison can fail
        assert diff <= 1e-6, (name, float(diff), float(moved))
    # Each rank orthogonalised about half of the matrices, never all of them.
    for rank in range(WORLD):
        for step in torch.load(out + f".{rank}")["stats"]:
            assert 0 < step["orthogonalised_here"] < step["matrices"]
    shares = [torch.load(out + f".{r}")["stats"][0]["orthogonalised_here"] for r in range(WORLD)]
    assert sum(shares) == torch.load(out + ".0")["stats"][0]["matrices"]
