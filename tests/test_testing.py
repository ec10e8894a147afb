from pathlib import Path

import pytest
import torch

from hf_effllm.errors import HfEffllmError
from hf_effllm.testing import MOE_TYPES, TINY_MODEL_TYPES, spawn_gloo, tiny_model


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_tiny_model_runs(model_type):
    model = tiny_model(model_type)
    assert model.config.model_type == model_type
    if model_type == "llava":
        ids = torch.randint(0, 250, (1, 24))
        ids[0, :16] = model.config.image_token_index
        out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32))
    else:
        out = model(input_ids=torch.randint(0, 256, (2, 12)))
    assert out.logits.shape[-1] == 256 and torch.isfinite(out.logits).all()
    assert sum(p.numel() for p in model.parameters()) < 400_000


def test_tiny_model_is_deterministic_and_overridable():
    a, b = tiny_model("qwen3", seed=1), tiny_model("qwen3", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert tiny_model("llama", num_hidden_layers=3).config.num_hidden_layers == 3


def test_moe_models_have_experts():
    for t in MOE_TYPES:
        names = [n for n, _ in tiny_model(t).named_modules()]
        assert any("expert" in n for n in names), t


def test_unknown_type():
    with pytest.raises(HfEffllmError, match="model_type='gpt5'"):
        tiny_model("gpt5")


def _sleeping_worker(rank: int, seconds: float) -> None:
    import time

    time.sleep(seconds)


def _env_worker(rank: int, out: str) -> None:
    import os

    with open(f"{out}.{rank}", "w") as f:
        f.write(os.environ["GLOO_SOCKET_IFNAME"] + " " + os.environ["MASTER_ADDR"])


@pytest.mark.distributed
def test_spawn_gloo_sets_loopback_env_and_kills_hung_ranks(tmp_path):
    import os

    out = str(tmp_path / "env")
    before = dict(os.environ)
    spawn_gloo(_env_worker, (out,), nprocs=2, timeout=120)
    assert os.environ == before  # the parent's environment is restored
    for rank in range(2):
        ifname, addr = Path(f"{out}.{rank}").read_text().split()
        assert addr == "127.0.0.1" and ifname.startswith("lo")
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] of 2"):
        spawn_gloo(_sleeping_worker, (600.0,), nprocs=2, timeout=3)
    with pytest.raises(HfEffllmError, match="timeout=0"):
        spawn_gloo(_sleeping_worker, (0.0,), timeout=0)
