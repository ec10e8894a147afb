"""Gate distillation on transformers.Trainer: loss goes down, only gates change, DDP equals one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_effllm import SeerAttentionConfig, apply_seer_attention, seer
from hf_effllm.errors import HfEffllmError
from hf_effllm.testing import loopback_gloo_env, tiny_model

WORKER = Path(__file__).with_name("_seer_ddp_worker.py")


def _sharp_model():
    torch.manual_seed(0)
    model = apply_seer_attention(tiny_model("llama"), SeerAttentionConfig(block_size=16, gate_hidden_size=16))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    return model


def test_distillation_lowers_loss_and_trains_only_gates():
    model = _sharp_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = torch.randint(0, 256, (4, 96), generator=torch.Generator().manual_seed(1))
    wrapper = seer.GateDistillModel(model, cache_features=False)
    with torch.no_grad():
        loss0 = wrapper(ids).get("loss").item()
    res = seer.distill_gates(model, ids, max_steps=40, learning_rate=2e-2, batch_size=2, logging_steps=5)
    with torch.no_grad():
        loss1 = wrapper(ids).get("loss").item()
    assert res.steps == 40 and len(res.losses) == 8
    assert loss1 < 0.7 * loss0, (loss0, loss1)
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (".seer_gate." in n), n
        assert p.requires_grad == flags[n]
    assert all(g.mode == "sparse" for g in seer.gates_of(model).values())


def test_cached_features_equal_fresh_forward():
    model = _sharp_model()
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(2))
    wrapper = seer.GateDistillModel(model, cache_features=True)
    sid = torch.tensor([0, 1])
    first = wrapper(ids, sample_id=sid)["loss"]
    assert set(wrapper.cache) == {0, 1}
    again = wrapper(torch.zeros_like(ids), sample_id=sid)["loss"]  # served from the cache, ids are not read
    torch.testing.assert_close(first, again)
    assert set(wrapper.state_dict()) == {"model." + k for k in model.state_dict() if ".seer_gate." in k}


def test_distill_errors():
    with pytest.raises(HfEffllmError, match="apply_seer_attention"):
        seer.distill_gates(tiny_model("llama"), torch.zeros(2, 32, dtype=torch.long))
    model = apply_seer_attention(tiny_model("llama"), SeerAttentionConfig(block_size=16))
    with pytest.raises(HfEffllmError, match="max_steps=0"):
        seer.distill_gates(model, torch.zeros(2, 32, dtype=torch.long), max_steps=0)
    with pytest.raises(HfEffllmError, match="integer token ids"):
        seer.distill_gates(model, torch.zeros(2, 32))


@pytest.mark.distributed
def test_ddp_two_processes_match_single_process(tmp_path):
    gloo = loopback_gloo_env()
    env = {**os.environ, **gloo, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    single, ddp = tmp_path / "single.pt", tmp_path / "ddp.pt"
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, str(WORKER), str(single), "2"], check=True, env=env, timeout=300, cwd=root)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", gloo["MASTER_PORT"]]
    # Own process group, so that a hang kills torchrun's workers too (they hold the output pipes open).
    proc = subprocess.Popen(
        cmd + [str(WORKER), str(ddp), "1"],
        env=env,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in 300 s:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    a, b = torch.load(single), torch.load(ddp)
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        torch.testing.assert_close(a["state"][k], b["state"][k], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(b["losses"]), atol=1e-5, rtol=1e-4)
    ref = _sharp_model()  # the run really trained: weights moved from their initial values
    assert not torch.equal(ref.model.layers[0].self_attn.seer_gate.q_weight, a["state"]["0.q_weight"])
