"""Fixtures of the SpQR tests: a byte-level tokenizer for the tiny random models (vocab 256), and the setup of the
decode kernels' GPU tests (:func:`octet_case`)."""

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


@pytest.fixture
def octet_case():
    """The setup the octet decode kernels' GPU tests share: ``make(out, inp, rows, bits, gs, perm, dtype)`` gives
    ``(layer, tensors, meta, octet layout, x, fp32 reference of x W^T + b)`` for a random SpQR layer on ``device``
    (default the GPU) and ``rows`` activations with one large value (the row's power-of-two scale)."""
    from hf_effllm.kernels.spqr import spqr_matmul_reference
    from hf_effllm.kernels.spqr_octet import octet_layout

    from hf_effllm.testing import spqr_layer

    def make(out, inp, rows, bits, gs, perm, dtype, device="cuda"):
        layer, _ = spqr_layer(out, inp, bits=bits, group_size=gs, permutation=perm)
        layer = layer.to(device)
        t, meta = layer.packed_tensors(), layer.packed_meta()
        x = torch.randn(rows, inp, device=device).to(dtype) * 3
        x[0, 0] = 40.0  # one large activation: the row's power-of-two scale
        ref = spqr_matmul_reference(x.float(), t, bias=layer.bias, **meta)
        return layer, t, meta, octet_layout(t, **meta), x, ref

    return make
