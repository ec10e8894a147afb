"""The MILLION quickstart stage on the real embedded model, with reduced settings (the full stage is timed by hand)."""

from __future__ import annotations

import pytest
import torch

from hf_effllm.cache.million import cli
from hf_effllm.cache.million.codebooks import MillionCodebooks
from hf_effllm.quickstart import QuickstartOptions, StageContext, available_stages


@pytest.mark.slow
def test_million_stage_rows_and_codebooks(embedded, tmp_path, monkeypatch):
    model, tok = embedded
    monkeypatch.setattr(cli, "CALIBRATION_SEQLEN", 128)
    monkeypatch.setattr(cli, "KMEANS_ITERS", 2)
    monkeypatch.setattr(cli, "MAX_POINTS", 512)
    monkeypatch.setattr(cli, "STAGE_TOKENS", 512)
    assert "million" in available_stages()
    ids = tok("In the beginning God created the heaven and the earth. " * 60, return_tensors="pt").input_ids[0]
    opts = QuickstartOptions(context_length=256, eval_tokens=512, progress=False)
    ctx = StageContext(model=model, tokenizer=tok, eval_ids=ids[:512], options=opts, folder=tmp_path)
    before = model.config._attn_implementation
    rows = cli.million_stage(ctx)
    assert model.config._attn_implementation == before  # the stage worked on a copy
    assert [r["variant"].split()[0] for r in rows] == ["dense", "MILLION", "MILLION"]
    dense, four, two = (r["perplexity"] for r in rows)
    assert all(torch.isfinite(torch.tensor(p)) for p in (dense, four, two))
    assert rows[0]["num_tokens"] == rows[1]["num_tokens"] > 0
    assert four != dense and four < dense * 1.5 and two < dense * 3  # codes in use; loose: tiny calibration
    books = MillionCodebooks.from_pretrained(tmp_path / "million-4bit")
    assert books.num_subspaces == 32 and ctx.files[0][0] == "million-4bit/"
