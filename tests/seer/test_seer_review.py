"""Review fixes: sliding-window models, clear errors for bad options, gate card, damaged gate files, the CLI paths."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from hf_effllm import SeerAttentionConfig, apply_seer_attention, seer
from hf_effllm.errors import HfEffllmError
from hf_effllm.testing import tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_sliding_window_longer_than_the_prompt_runs_sparse():
    """Mistral-7B-v0.1 style configs set sliding_window=4096: a no-op for shorter prompts, so the gate must run."""
    base = tiny_model("mistral", sliding_window=4096)
    ids = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(0))
    model = apply_seer_attention(copy.deepcopy(base), SeerAttentionConfig(block_size=16, nz_ratio=1.0))
    torch.testing.assert_close(_logits(model, ids), _logits(base, ids), atol=1e-5, rtol=1e-5)
    seer.set_seer_options(model, nz_ratio=0.25)
    sparsity_report = seer.sparsity_report(model, reset=True)
    assert set(sparsity_report) == {0, 1} and all(s == 0.0 for s in sparsity_report.values())
    _logits(model, ids)
    assert all(s > 0.3 for s in seer.sparsity_report(model).values())
    res = seer.distill_gates(model, ids, max_steps=2, logging_steps=1)  # every layer records a target
    assert res.steps == 2
    # A window shorter than the prompt really restricts attention: dense (transformers' sliding-window sdpa).
    short = tiny_model("mistral", sliding_window=40)
    sparse = apply_seer_attention(copy.deepcopy(short), SeerAttentionConfig(block_size=16, nz_ratio=0.25))
    torch.testing.assert_close(_logits(sparse, ids), _logits(short, ids), atol=1e-5, rtol=1e-5)
    assert seer.sparsity_report(sparse) == {}


def test_set_seer_options_unknown_option_is_named():
    model = apply_seer_attention(tiny_model("llama"), SeerAttentionConfig(block_size=16))
    with pytest.raises(HfEffllmError, match=r"nz_ratoi.*nz_ratio"):
        seer.set_seer_options(model, nz_ratoi=0.1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nz_ratio": True}, "nz_ratio=True"),
        ({"threshold": True}, "threshold=True"),
        ({"min_seq_len": True}, "min_seq_len=True"),
        ({"dense_layers": 3}, "dense_layers=3"),
        ({"gate_hidden_size": True}, "gate_hidden_size=True"),
    ],
)
def test_config_rejects_bools_and_scalars(kwargs, match):
    with pytest.raises(HfEffllmError, match=match):
        SeerAttentionConfig(**kwargs)


@pytest.mark.parametrize(
    ("selection", "text"),
    [({"top_p": 0.9}, "top_p 0.9"), ({"threshold": 0.05}, "threshold 0.05"), ({"nz_ratio": 0.2}, "nz_ratio 0.2")],
)
def test_card_names_the_selection_rule(tmp_path, selection, text):
    model = apply_seer_attention(tiny_model("llama"), SeerAttentionConfig(block_size=16, **selection))
    card = (seer.save_gates(model, tmp_path / "g") / "README.md").read_text()
    assert text in card and "None" not in card.split("sparsity selection:")[1].split("\n")[1]


def test_damaged_gate_file_leaves_the_model_untouched(tmp_path):
    from safetensors.torch import load_file, save_file

    model = apply_seer_attention(tiny_model("llama"), SeerAttentionConfig(block_size=16))
    folder = seer.save_gates(model, tmp_path / "g")
    path = folder / "seer_gates.safetensors"
    tensors = load_file(str(path))
    del tensors["layers.1.k_weight"]
    save_file(tensors, str(path))
    fresh = tiny_model("llama")
    impl = fresh.config._attn_implementation
    with pytest.raises(HfEffllmError, match=r"layers\.1\.k_weight"):
        seer.load_gates(fresh, folder)
    assert fresh.config._attn_implementation == impl and seer.seer_config_of(fresh) is None
    assert not seer.gates_of(fresh)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(HfEffllmError, match="seer_gates.safetensors"):
        seer.load_gates(fresh, folder)
    assert seer.seer_config_of(fresh) is None


def test_seer_distill_command_and_recipe_errors(tiny_dir, tmp_path, capsys):
    from hf_effllm.cli import main

    recipe, text = tmp_path / "r.yaml", tmp_path / "t.txt"
    text.write_text("SeerAttention learns where attention is sparse. " * 20)
    recipe.write_text(
        "seer: {block_size: 16, gate_hidden_size: 16, nz_ratio: 0.3}\n"
        f"data: {{nsamples: 2, seqlen: 64, texts: {text}}}\n"
        "training: {max_steps: 2, logging_steps: 1}\n"
    )
    out = tmp_path / "gates"
    args = ["seer-distill", "--model", str(tiny_dir), "--device", "cpu", "--config", str(recipe), "--output"]
    assert main([*args, str(out)]) == 0
    meta = json.loads((out / "seer_config.json").read_text())
    assert meta["seer_config"]["nz_ratio"] == 0.3 and meta["model_signature"]["layer_indices"] == [0, 1]
    capsys.readouterr()
    for section, bad in (("seer", "sparsity: 0.5"), ("data", "nsample: 2"), ("training", "max_step: 2")):
        recipe.write_text(f"{section}: {{{bad}}}\n")
        assert main([*args, str(tmp_path / "other")]) == 1
        err = capsys.readouterr().err
        assert bad.split(":")[0] in err and section in err, err


def test_quickstart_seer_stage_on_a_tiny_model(tiny_dir, tmp_path, monkeypatch):
    import hf_effllm.data
    from hf_effllm.cli import main

    def windows(tokenizer, nsamples, seqlen, seed=0, texts=None):  # the char tokenizer is slow on the whole corpus
        return torch.randint(0, 256, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))

    monkeypatch.setattr(hf_effllm.data, "calibration_batches", windows)

    target = tmp_path / "qs"
    argv = ["quickstart", "--model", str(tiny_dir), "--output", str(target), "--context-length", "512"]
    assert main([*argv, "--eval-tokens", "1024", "--no-progress", "--device", "cpu", "--stages", "seer"]) == 0
    rows = json.loads((target / "results.json").read_text())["rows"]
    seer_rows = [r for r in rows if r["variant"].startswith("seer nz_ratio=")]
    assert [r["variant"] for r in seer_rows] == ["seer nz_ratio=0.5", "seer nz_ratio=0.3", "seer nz_ratio=0.1"]
    assert all(r["perplexity"] > 1 for r in seer_rows)
    assert seer_rows[0]["sparsity"] < seer_rows[-1]["sparsity"]
    assert (target / "seer_gates" / "seer_gates.safetensors").is_file()


def test_shipped_recipe_is_valid():
    import inspect
    from pathlib import Path

    import yaml

    recipe = yaml.safe_load((Path(__file__).parents[2] / "configs" / "seer_distill.yaml").read_text())
    assert set(recipe) == {"seer", "data", "training"}
    cfg = SeerAttentionConfig.from_dict(recipe["seer"])
    assert cfg.block_size == 64 and cfg.nz_ratio == 0.1
    params = set(inspect.signature(seer.distill_gates).parameters)
    assert set(recipe["data"]) - {"texts"} <= params and set(recipe["training"]) <= params


def test_gates_from_a_hub_id_and_config_type(tmp_path, monkeypatch):
    import huggingface_hub

    model = apply_seer_attention(tiny_model("llama"), SeerAttentionConfig(block_size=16, nz_ratio=0.3))
    folder = seer.save_gates(model, tmp_path / "g")
    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, sorted(allow_patterns)))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    loaded = apply_seer_attention(tiny_model("llama"), gates="me/seer-gates", revision="v1")
    assert calls == [("me/seer-gates", "v1", ["README.md", "seer_config.json", "seer_gates.safetensors"])]
    assert seer.seer_config_of(loaded).nz_ratio == 0.3
    with pytest.raises(HfEffllmError, match="must be a SeerAttentionConfig"):
        seer.load_gates(tiny_model("llama"), folder, config={"nz_ratio": 0.1})


def test_distill_rejects_ragged_windows_and_bad_accumulation():
    import datasets

    model = apply_seer_attention(tiny_model("llama"), SeerAttentionConfig(block_size=16))
    ragged = datasets.Dataset.from_dict({"input_ids": [[1] * 40, [2] * 30]})
    with pytest.raises(HfEffllmError, match=r"lengths \[30, 40\]"):
        seer.distill_gates(model, ragged, max_steps=1)
    with pytest.raises(HfEffllmError, match="gradient_accumulation_steps=0"):
        seer.distill_gates(model, torch.zeros(2, 40, dtype=torch.long), gradient_accumulation_steps=0)


@pytest.mark.gpu
@pytest.mark.parametrize("hp", [1, 2, 4])
def test_block_sparse_bf16_on_gpu(hp):
    """bf16 block-sparse attention (the model's dtype on the GPU; broken under the interpreter) vs the reference."""
    from hf_effllm.kernels.seer_attention import block_sparse_attention, block_sparse_attention_reference

    g = torch.Generator().manual_seed(hp)
    q, k, v = (torch.randn(2, h, 1000, 128, generator=g).to("cuda", torch.bfloat16) for h in (8, 2, 2))
    nb = 16
    mask = (torch.rand(2, 2, nb, nb, generator=g) < 0.3).cuda()
    pad = torch.ones(2, 1000, dtype=torch.bool, device="cuda")
    pad[1, :130] = False
    out = block_sparse_attention(q, k, v, mask, key_padding=pad, heads_per_program=hp)
    ref = block_sparse_attention_reference(q, k, v, mask, key_padding=pad)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
