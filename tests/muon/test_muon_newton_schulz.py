"""Newton-Schulz: close to the orthogonal polar factor, batched equals one-by-one, and bad input errors."""

from __future__ import annotations

import pytest
import torch

from hf_effllm.errors import HfEffllmError
from hf_effllm.optim import newton_schulz
from hf_effllm.optim.newton_schulz import NS_SINGULAR_VALUE_BAND


def _polar(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return u @ vh


def _with_spectrum(n: int, m: int, smallest: float) -> torch.Tensor:
    """A random n x m matrix with singular values log-uniform in [smallest, 1] (a square Gaussian matrix has a
    near-zero singular value, which 5 steps cannot lift: the band holds for sigma/||X||_F above ~2e-3)."""
    q1, _ = torch.linalg.qr(torch.randn(n, n))
    q2, _ = torch.linalg.qr(torch.randn(m, m))
    k = min(n, m)
    s = torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), k)
    return q1[:, :k] @ torch.diag(s) @ q2[:, :k].T


@pytest.mark.parametrize("shape", [(64, 64), (48, 160), (160, 48), (3, 40, 24)])
def test_singular_values_in_band_and_close_to_polar_factor(shape):
    torch.manual_seed(0)
    x = _with_spectrum(64, 64, 0.05) if shape == (64, 64) else torch.randn(shape)
    o = newton_schulz(x)
    assert o.dtype == torch.bfloat16 and o.shape == x.shape
    sv = torch.linalg.svdvals(o.double())
    lo, hi = NS_SINGULAR_VALUE_BAND
    assert sv.min() > lo and sv.max() < hi, (float(sv.min()), float(sv.max()))
    # The quintic does not converge to 1, but the direction is the polar factor's: high cosine similarity.
    polar = _polar(x)
    cos = (o.double() * polar).sum(dim=(-2, -1)) / (o.double().norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert cos.min() > 0.97


def test_more_steps_in_float32_approach_the_band_centre():
    torch.manual_seed(0)
    x = torch.randn(32, 96)
    o = newton_schulz(x, steps=10, dtype=torch.float32)
    sv = torch.linalg.svdvals(o.double())
    assert sv.min() > 0.65 and sv.max() < 1.2


def test_batched_equals_one_by_one_and_matches_torch_muon():
    from torch.optim._muon import _zeropower_via_newtonschulz

    torch.manual_seed(0)
    x = torch.randn(5, 24, 40)
    batched = newton_schulz(x)
    for i in range(5):
        single = newton_schulz(x[i])
        torch.testing.assert_close(batched[i], single, atol=1e-2, rtol=0)
        ref = _zeropower_via_newtonschulz(x[i], (3.4445, -4.7750, 2.0315), 5, 1e-7)
        torch.testing.assert_close(batched[i].float(), ref.float(), atol=1e-2, rtol=0)


def test_zero_matrix_stays_zero():
    assert newton_schulz(torch.zeros(8, 16)).abs().max() == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"x": torch.randn(8)}, "not a matrix"),
        ({"x": torch.ones(4, 4, dtype=torch.int64)}, "floating point"),
        ({"x": torch.randn(4, 4), "steps": 0}, "steps=0"),
        ({"x": torch.randn(4, 4), "coefficients": (1.0, 2.0)}, "three floats"),
        ({"x": torch.randn(4, 4), "dtype": torch.int8}, "dtype"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(HfEffllmError, match=match):
        newton_schulz(**kwargs)
