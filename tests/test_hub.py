import json

import pytest

from hf_effllm.errors import HfEffllmError
from hf_effllm.hub import push_folder, render_card, validate_card, validate_folder

CONTEXT = dict(
    library_name="transformers",
    base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
    license="apache-2.0",
    tags=["hf-effllm", "efficiency"],
    hf_effllm_version="0.1.0",
    stages=["baseline"],
    context_length=2048,
    eval_tokens=4096,
    title="test card",
    eval_books="Romans to Revelation",
    files=[("results.json", "all results")],
    device="cpu",
    date="2026-11-28",
    results_table="| a |\n|---|\n| 1 |\n",
)


def test_render_quickstart_card():
    card = render_card("quickstart", **CONTEXT)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["tags"] == ["hf-effllm", "efficiency"]
    assert data["hf_effllm"]["context_length"] == 2048
    for section in ("## How to use", "## What is inside", "## Results"):
        assert section in card.text


def test_missing_variable_is_named():
    ctx = dict(CONTEXT)
    del ctx["base_model"]
    with pytest.raises(HfEffllmError, match="'base_model' is undefined"):
        render_card("quickstart", **ctx)


def test_corrupt_template(tmp_path):
    bad = tmp_path / "bad.md"
    bad.write_text("---\nlibrary_name: x\n---\n{% for x in %}\n")
    with pytest.raises(HfEffllmError, match=r"bad.md is corrupt at line 4"):
        render_card(bad)


def test_template_missing_section(tmp_path):
    t = tmp_path / "t.md"
    t.write_text("---\nlibrary_name: transformers\nbase_model: a/b\ntags: [x]\n---\n# T\n## How to use\n## Results\n")
    with pytest.raises(HfEffllmError, match=r"lacks section\(s\) \['What is inside'\]"):
        render_card(t)


def test_template_missing_metadata(tmp_path):
    t = tmp_path / "t.md"
    t.write_text("---\nlibrary_name: transformers\ntags: [x]\n---\n# T\n## How to use\n## What is inside\n## Results\n")
    with pytest.raises(HfEffllmError, match=r"lacks front-matter field\(s\) \['base_model'\]"):
        render_card(t)


def test_unknown_template_lists_bundled():
    with pytest.raises(HfEffllmError, match=r"template='nope'.*quickstart"):
        render_card("nope")


def _folder(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "README.md").write_text(str(render_card("quickstart", **CONTEXT)))
    (folder / "results.json").write_text(json.dumps({"rows": []}))
    return folder


def test_validate_folder_and_dry_run(tmp_path):
    folder = _folder(tmp_path)
    assert validate_folder(folder) == ["README.md", "results.json"]
    msg = push_folder(folder, "me/model", dry_run=True)
    assert msg.startswith("dry run: 2 file(s)")


def test_validate_folder_errors(tmp_path):
    with pytest.raises(HfEffllmError, match="is not a folder"):
        validate_folder(tmp_path / "missing")
    folder = _folder(tmp_path)
    (folder / "results.json").write_text("{broken")
    with pytest.raises(HfEffllmError, match="not valid JSON"):
        validate_folder(folder)
    (folder / "results.json").unlink()
    with pytest.raises(HfEffllmError, match="no results.json"):
        validate_folder(folder)
    (folder / "README.md").write_text("no front matter\n")
    with pytest.raises(HfEffllmError, match="no YAML front matter"):
        validate_card(folder / "README.md")


def test_card_lists_missing_file(tmp_path):
    folder = _folder(tmp_path)
    ctx = dict(CONTEXT, files=[("weights.safetensors", "the weights")])
    (folder / "README.md").write_text(str(render_card("quickstart", **ctx)))
    with pytest.raises(HfEffllmError, match=r"\['weights.safetensors'\].*missing"):
        validate_folder(folder)


def test_bad_repo_id(tmp_path):
    with pytest.raises(HfEffllmError, match="repo_id='noslash'"):
        push_folder(_folder(tmp_path), "noslash", dry_run=True)
