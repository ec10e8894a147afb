"""Shared fixtures. Triton kernels run on the CPU through the interpreter when no GPU is present.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here, before any kernel module is imported.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(torch.get_num_threads(), 2))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def triton_interpret():
    """Run Triton kernels under ``TRITON_INTERPRET=1`` on CPU-only machines (skips if triton is missing).

    With triton 3.9 the interpreter computes bf16 wrongly and silently: test fp16/fp32 there, bf16 on the GPU.
    """
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        yield "cuda"
        return
    from triton import knobs

    assert os.environ.get("TRITON_INTERPRET") == "1"
    old = knobs.runtime.interpret
    knobs.runtime.interpret = True
    yield "cpu"
    knobs.runtime.interpret = old


@pytest.fixture(scope="session")
def embedded():
    """The real embedded SmolLM2-135M model (float32, CPU) and its tokenizer, loaded once per session."""
    from hf_effllm.data import load_model, load_tokenizer

    return load_model(dtype="float32", device="cpu"), load_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved tiny llama with a byte-level tokenizer, usable as ``--model`` by the CLI tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hf_effllm.testing import tiny_model

    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(path)
    vocab = {chr(i) if chr(i).isprintable() else f"<{i}>": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>").save_pretrained(path)
    return path
