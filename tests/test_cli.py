import json
import os
import subprocess
import sys

import pytest

from hf_effllm.cli import main


def run_cli(*args, env=None):
    """Run the real console entry point in a subprocess (exit code, stdout, stderr)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "hf_effllm.cli", *args], capture_output=True, text=True, env=full_env, timeout=600
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_no_command_is_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_bad_number_is_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--context-length", "0"])
    assert e.value.code == 2
    assert "0 must be >= 1" in capsys.readouterr().err


def test_missing_model_path_one_line_error(capsys):
    assert main(["eval", "--model", "/no/such/model"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("hf-effllm: error: model='/no/such/model'")
    assert "Traceback" not in err


def test_method_subcommands_reachable_through_python_m():
    code, out, _ = run_cli("--help")
    assert code == 0
    for command in ("quickstart", "eval", "push", "train", "quantize"):
        assert command in out


def test_debug_shows_traceback():
    with pytest.raises(Exception, match="no such file"):
        main(["--debug", "eval", "--model", "/no/such/model"])


def test_push_missing_folder(tmp_path, capsys):
    assert main(["push", str(tmp_path / "nope"), "--repo-id", "me/x", "--dry-run"]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_quickstart_refuses_nonempty_output(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["quickstart", "--output", str(out), "--model", "/no/such"]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_quickstart_unknown_stage(tmp_path, capsys):
    assert main(["quickstart", "--output", str(tmp_path / "o"), "--stages", "nonsense"]) == 1
    assert "stages=['nonsense'] unknown" in capsys.readouterr().err


def test_eval_and_quickstart_on_tiny_model_then_push_dry_run(tiny_dir, tmp_path):
    code, out, err = run_cli(
        "eval",
        "--model",
        str(tiny_dir),
        "--context-length",
        "64",
        "--eval-tokens",
        "256",
        "--json",
        "--no-progress",
        "--device",
        "cpu",
    )
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["num_tokens"] == 256 - 4 and res["perplexity"] > 1

    target = tmp_path / "qs"
    code, out, err = run_cli(
        "quickstart",
        "--model",
        str(tiny_dir),
        "--output",
        str(target),
        "--context-length",
        "64",
        "--eval-tokens",
        "256",
        "--no-progress",
        "--device",
        "cpu",
        "--stages",
        "baseline",
    )
    assert code == 0, err
    assert "| baseline | dense (baseline) |" in out
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "perplexity.png", "results.json", "results.md"]
    payload = json.loads((target / "results.json").read_text())
    assert payload["rows"][0]["perplexity"] == pytest.approx(res["perplexity"])

    code, out, err = run_cli("push", str(target), "--repo-id", "me/tiny", "--dry-run")
    assert code == 0, err
    assert out.startswith("dry run: 4 file(s)")
    code, out, err = run_cli("quickstart", "--model", str(tiny_dir), "--output", str(target), "--eval-tokens", "256")
    assert code == 1 and "exists and is not empty" in err


@pytest.mark.slow
def test_quickstart_embedded_default(tmp_path):
    target = tmp_path / "qs"
    code, out, err = run_cli(
        "quickstart",
        "--output",
        str(target),
        "--eval-tokens",
        "2048",
        "--context-length",
        "1024",
        "--no-progress",
        "--stages",
        "baseline",
    )
    assert code == 0, err
    rows = json.loads((target / "results.json").read_text())["rows"]
    assert rows[0]["variant"] == "dense (baseline)" and 12 < rows[0]["perplexity"] < 35
    card = (target / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert run_cli("push", str(target), "--repo-id", "me/smol", "--dry-run")[0] == 0
