"""MILLION codebooks: k-means vs a plain Lloyd reference, encode/decode round trip, save/load, card, config."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_effllm.kernels.million import pq_decode_reference, pq_encode_reference

from hf_effllm import MillionConfig, million
from hf_effllm.cache.million.codebooks import MillionCodebooks, ModelSignature, kmeans
from hf_effllm.errors import HfEffllmError
from hf_effllm.testing import tiny_model


def lloyd_reference(points: torch.Tensor, init: torch.Tensor, iters: int) -> torch.Tensor:
    """Textbook Lloyd's algorithm, one problem at a time, in float64 (empty clusters keep their centroid)."""
    out = []
    for x, c in zip(points.double(), init.double()):
        c = c.clone()
        for _ in range(iters):
            a = torch.cdist(x, c).argmin(1)
            for j in range(c.shape[0]):
                if (a == j).any():
                    c[j] = x[a == j].mean(0)
        out.append(c)
    return torch.stack(out).float()


def test_kmeans_matches_lloyd_reference():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, 2, generator=gen) * 10
    pts = centers[:, torch.randint(0, 8, (400,), generator=gen)] + 0.3 * torch.randn(3, 400, 2, generator=gen)
    init = pts[:, :8].clone()
    ours = kmeans(pts, 8, iters=6, init=init)
    torch.testing.assert_close(ours, lloyd_reference(pts, init, 6), atol=1e-4, rtol=1e-4)
    random_init = kmeans(pts, 8, iters=10, seed=1)
    assert torch.isfinite(random_init).all() and random_init.shape == (3, 8, 2)


def test_encode_decode_round_trip_picks_nearest_centroid():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 50, 16, generator=gen)
    for groups in (1, 3):
        cb = torch.randn(groups, 8, 32, 2, generator=gen)
        codes = pq_encode_reference(x, cb)
        rec = pq_decode_reference(codes, cb)
        # brute force: every centroid of every subspace
        sub = x.reshape(2, 3, 50, 8, 1, 2)
        full = cb.expand(3, -1, -1, -1)[None, :, None]  # (1, H, 1, M, K, 2)
        best = (sub - full).square().sum(-1).min(-1).values  # (2, 3, 50, 8)
        got = (x - rec).reshape(2, 3, 50, 8, 2).square().sum(-1)
        torch.testing.assert_close(got, best, atol=1e-5, rtol=1e-5)
        # codes of decoded vectors are the same codes (decode is the inverse on the codebook's image)
        assert torch.equal(pq_encode_reference(rec, cb), codes)


def test_train_codebooks_scopes_and_distortion():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(2))
    shapes = {"layer": (2, 1, 8, 16, 2), "head": (2, 2, 8, 16, 2), "shared": (1, 1, 8, 16, 2)}
    for scope, shape in shapes.items():
        books = million.train_codebooks(
            model, ids, MillionConfig(num_subspaces=8, nbits=4, scope=scope, kmeans_iters=5)
        )
        assert books.keys.shape == shape and books.values.shape == shape
        assert 0 < books.meta["relative_distortion_keys"] < 0.2
        assert books.meta["calibration_tokens"] == 128
    k, v = books.layer(1)
    assert k.shape == (1, 8, 16, 2)


def test_save_load_and_card(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(3))
    books = million.train_codebooks(model, ids, MillionConfig(num_subspaces=4, nbits=3, kmeans_iters=3, scope="head"))
    books.save_pretrained(tmp_path / "cb")
    loaded = MillionCodebooks.from_pretrained(tmp_path / "cb")
    assert torch.equal(loaded.keys, books.keys) and torch.equal(loaded.values, books.values)
    assert loaded.config == books.config and loaded.signature == books.signature
    loaded.check_compatible(model.config)
    folder = books.push_to_hub("me/tiny-million", dry_run=True, results="| a | b |\n|---|---|\n| 1 | 2 |\n")
    text = (folder / "README.md").read_text()
    assert "hf-effllm-million" in text and "## How to use" in text
    assert 'MillionCodebooks.from_pretrained("me/tiny-million")' in text  # the card loads from its own repo
    shutil.rmtree(folder.parent)  # a dry run hands its staging folder to the caller, who removes it
    with pytest.raises(HfEffllmError, match="no million_codebooks"):
        MillionCodebooks.from_pretrained(tmp_path)
    payload = json.loads((tmp_path / "cb" / "million_config.json").read_text())
    (tmp_path / "cb" / "million_config.json").write_text(json.dumps({**payload, "format_version": 99}))
    with pytest.raises(HfEffllmError, match="format_version=99"):
        MillionCodebooks.from_pretrained(tmp_path / "cb")
    (tmp_path / "cb" / "million_config.json").write_text("{not json")
    with pytest.raises(HfEffllmError, match="corrupt"):
        MillionCodebooks.from_pretrained(tmp_path / "cb")


def test_codebooks_of_another_model_with_the_same_shapes_warn(monkeypatch):
    from hf_effllm.cache.million import codebooks as cb_module

    said = []
    monkeypatch.setattr(cb_module.logger, "warning", lambda msg, *a: said.append(msg % a))
    sig = ModelSignature(num_layers=2, num_kv_heads=2, head_dim=16, model_type="llama", name_or_path="org/a-model")
    books = MillionCodebooks(
        MillionConfig(num_subspaces=8, nbits=4), sig, torch.zeros(2, 1, 8, 16, 2), torch.zeros(2, 1, 8, 16, 2)
    )
    same = tiny_model("llama", num_hidden_layers=2, num_key_value_heads=2, head_dim=16).config
    same.name_or_path = "/local/copy/a-model"
    books.check_compatible(same)
    assert not said  # the same model from another place
    same.name_or_path = "org/b-model"
    books.check_compatible(same)
    assert said and "org/a-model" in said[0] and "org/b-model" in said[0]


def test_collect_kv_is_gradient_free_in_eval_mode_and_restores_training():
    model = tiny_model("llama", attention_dropout=0.5).train()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    keys, values = million.collect_kv(model, ids)
    again, _ = million.collect_kv(model, ids)
    assert model.training  # restored
    assert not keys[0].requires_grad and keys[0].grad_fn is None  # no autograd graph kept alive
    assert torch.equal(keys[1], again[1])  # no dropout: layer 1 keys depend on layer 0 attention, deterministic
    with pytest.raises(HfEffllmError, match="hold no tokens"):
        million.collect_kv(model, torch.zeros(0, 8, dtype=torch.long))


def test_config_validation():
    assert MillionConfig().subspaces_for(64) == 32
    assert MillionConfig(num_subspaces=16).bits_per_element(64) == 2.0
    with pytest.raises(HfEffllmError, match="does not divide head_dim=64"):
        MillionConfig(num_subspaces=24).subspaces_for(64)
    for bad in ({"num_subspaces": 0}, {"nbits": 0}, {"residual_length": -1}, {"kmeans_iters": 0}):
        with pytest.raises(HfEffllmError, match=next(iter(bad))):
            MillionConfig(**bad)
    for name in ("num_subspaces", "nbits", "residual_length", "kmeans_iters", "calibration_samples"):
        with pytest.raises(HfEffllmError, match=f"{name}=True"):  # a bool is not a count (True would mean 1)
            MillionConfig(**{name: True})
    sig = ModelSignature(num_layers=2, num_kv_heads=2, head_dim=16)
    with pytest.raises(HfEffllmError, match="do not fit"):
        MillionCodebooks(MillionConfig(num_subspaces=8), sig, torch.zeros(2, 1, 8, 16, 2), torch.zeros(2, 1, 8, 16, 2))
