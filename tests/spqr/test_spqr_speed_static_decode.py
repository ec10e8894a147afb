"""benchmarks/spqr_speed.py's StaticCache decode step (the step it captures in a CUDA graph on the GPU), run eagerly
on the CPU: it must pick the same greedy tokens as ``generate``."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from hf_effllm.testing import tiny_model

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _static_step_ms():
    sys.path.insert(0, str(_BENCH))
    try:
        spec = importlib.util.spec_from_file_location("spqr_speed_bench", _BENCH / "spqr_speed.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(_BENCH))
    return mod.static_step_ms


def test_static_cache_steps_pick_the_tokens_of_generate():
    torch.manual_seed(0)
    model = tiny_model("llama").eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 12))
    ms, chosen = _static_step_ms()(model, prompt, 6)
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=7, min_new_tokens=7, do_sample=False)[0, 12:].tolist()
    assert ms > 0
    assert chosen == ref[1:]  # the first token comes from the prefill, each step adds one


def test_static_step_ms_refuses_too_few_steps():
    model = tiny_model("llama").eval()
    with pytest.raises(ValueError, match="steps=2"):
        _static_step_ms()(model, torch.zeros(1, 4, dtype=torch.long), 2)
