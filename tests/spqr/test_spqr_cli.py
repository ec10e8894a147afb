import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_effllm import SpQRLinear
from hf_effllm.cli import main
from hf_effllm.data import embedded_model_dir
from hf_effllm.testing import tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny llama with the embedded model's tokenizer (so the CLI's corpus calibration works)."""
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", vocab_size=49152).save_pretrained(folder)
    src = embedded_model_dir()
    for f in src.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, folder / f.name)
    return folder


def test_quantize_command_writes_a_loadable_folder(tiny_folder, tmp_path, capsys):
    out = tmp_path / "q"
    text = tmp_path / "calib.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 60, encoding="utf-8")
    argv = [
        "quantize",
        "--method",
        "spqr",
        "--bits",
        "3",
        "--model",
        str(tiny_folder),
        "--output",
        str(out),
        "--nsamples",
        "4",
        "--seqlen",
        "64",
        "--eval-tokens",
        "256",
        "--context-length",
        "128",
        "--no-progress",
        "--device",
        "cpu",
        "--dataset",
        str(text),
        "--seed",
        "3",
        "--tune-epochs",
        "1",
        "--dynamic",
        '{"\\\\.v_proj$": {"bits": 4}}',
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["quantization_config"]["seed"] == 3 and results["quantization_config"]["tune_epochs"] == 1
    assert results["quantization_config"]["dynamic"] == {"\\.v_proj$": {"bits": 4}}
    assert [r["variant"] for r in results["rows"]] == ["float", "SpQR 3-bit"]
    card = (out / "README.md").read_text()
    assert "hf_effllm_spqr" in card and str(results["quantization_config"]["avg_bits"]) in card
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.model.layers[0].self_attn.q_proj, SpQRLinear)
    assert model.model.layers[0].self_attn.v_proj.bits == 4 and model.model.layers[0].self_attn.q_proj.bits == 3
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_quantize_command_bad_bits_is_one_line(tmp_path, capsys):
    assert main(["quantize", "--bits", "1", "--output", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-effllm: error:") and "bits=1" in err and "\n" not in err
    assert main(["quantize", "--dataset", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "y")]) == 1
    assert "missing.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--dynamic", "{not json", "--output", str(tmp_path / "z")])
    assert "--dynamic" in capsys.readouterr().err
    assert main(["quantize", "--dynamic", '{"v_proj": {"bits": 9}}', "--output", str(tmp_path / "w")]) == 1
    assert "dynamic['v_proj']: bits=9" in capsys.readouterr().err


def test_quickstart_stage_on_a_tiny_model(tiny_folder, tmp_path):
    from hf_effllm.data import load_model, load_tokenizer
    from hf_effllm.quant.spqr.cli import quickstart_stage
    from hf_effllm.quickstart import QuickstartOptions, StageContext, available_stages

    assert available_stages().index("spqr") == 1  # right after the baseline (order 10)
    model, tok = load_model(str(tiny_folder)), load_tokenizer(str(tiny_folder))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = StageContext(
        model=model,
        tokenizer=tok,
        eval_ids=torch.randint(0, 49152, (1024,)),
        options=QuickstartOptions(context_length=512, progress=False),
        folder=tmp_path,
    )
    (row,) = quickstart_stage(ctx)
    assert row["variant"].startswith("SpQR 3-bit") and row["perplexity"] > 1 and 3 < row["avg_bits"] < 8
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # ctx.model is untouched
    assert ctx.files and (tmp_path / "spqr" / "config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "spqr")
    assert isinstance(reloaded.model.layers[0].mlp.up_proj, SpQRLinear)
