"""``hf-effllm train``: the recipe runner trains a tiny MLA + MoE model with Muon on the corpus and reports it;
the shipped recipes parse; bad recipes error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hf_effllm.cli import main
from hf_effllm.errors import HfEffllmError
from hf_effllm.train import TrainRecipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = ["muon_mla_moe", "adamw_mla_moe", "muon_dense_mha", "adamw_dense_mha"]


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipes_parse_and_build_configs(name):
    from transformers import AutoConfig

    recipe = TrainRecipe.from_yaml(CONFIGS / f"{name}.yaml")
    assert recipe.name == name
    cfg = dict(recipe.model_config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    assert config.vocab_size == 49152 and config.hidden_size == 384
    assert recipe.training["optim"] == ("muon" if name.startswith("muon") else "adamw_torch_fused")


def test_tiny_recipe_through_cli(tmp_path, capsys):
    recipe = yaml.safe_load((CONFIGS / "muon_mla_moe.yaml").read_text())
    recipe["model_config"].update(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2)
    recipe["model_config"].update(num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=8)
    recipe["model_config"].update(qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    recipe.update(seq_len=32, eval_context=64, eval_tokens=256, decode_tokens=4, output_dir=str(tmp_path / "run"))
    recipe["training"].update(max_steps=3, per_device_train_batch_size=2, bf16=False, warmup_steps=0)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--cpu", "--no-progress"]) == 0
    import json

    row = json.loads((tmp_path / "run" / "results.json").read_text())
    assert row["optimizer_class"] == "Muon" and row["steps"] == 3 and row["model_type"] == "deepseek_v3"
    assert 1 < row["eval_perplexity"] < 1e6 and row["eval_tokens"] > 0
    # MLA latent per token: 2 layers x (kv_lora_rank 8 + rope key 8) floats; transformers caches exactly that.
    assert row["mla_latent_bytes_per_token"] == 2 * 16 * 4
    assert row["cache_bytes_per_token"] == 2 * 16 * 4
    assert row["train_tokens_per_s"] > 0 and row["peak_memory_mib"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["name"] == "muon_mla_moe"


def test_bad_recipes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nlearning_rate: 1.0\n")
    with pytest.raises(HfEffllmError, match="unknown key"):
        TrainRecipe.from_yaml(bad)
    with pytest.raises(HfEffllmError, match="model_type"):
        TrainRecipe(model_config={"hidden_size": 8})
    with pytest.raises(HfEffllmError, match="not both"):
        TrainRecipe(model_config={"model_type": "llama"}, model_name_or_path="x")
    with pytest.raises(HfEffllmError, match="not a file"):
        TrainRecipe.from_yaml(tmp_path / "missing.yaml")
