"""Fixtures of the SpQR tests: a byte-level tokenizer for the tiny random models (vocab 256)."""

from __future__ import annotations

import types

import pytest
import torch


class ByteTokenizer:
    """Bytes as token ids (what ``calibration_batches`` needs from a tokenizer)."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)
        return types.SimpleNamespace(input_ids=ids)


@pytest.fixture
def byte_tokenizer():
    return ByteTokenizer()


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (8, 48), generator=g)
