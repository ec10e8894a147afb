"""Batched Newton-Schulz orthogonalisation (the core of Muon).

Muon replaces a hidden layer's momentum ``M = U S V^T`` by (approximately) its orthogonal polar factor ``U V^T``.
Five steps of a quintic Newton-Schulz iteration with Keller Jordan's coefficients (3.4445, -4.7750, 2.0315) in
bf16 map every singular value of the normalised input into roughly [0.7, 1.2] (the iteration is tuned for speed,
not to converge to exactly 1). A batch of matrices of the same shape runs as one chain of ``baddbmm`` calls, which
is how the optimizer orthogonalises all same-shape matrices of a model (and every expert of a stacked MoE weight) at
once.

Example:
    >>> g = torch.randn(8, 64, 256)  # eight 64x256 matrices
    >>> o = newton_schulz(g)  # bf16, same shape, singular values ~1
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..errors import HfEffllmError

NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
"""Quintic coefficients (a, b, c) of ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` (Keller Jordan)."""

NS_SINGULAR_VALUE_BAND: tuple[float, float] = (0.6, 1.25)
"""Where 5 bf16 steps with :data:`NS_COEFFICIENTS` put the singular values of a well-conditioned input."""


def _newton_schulz(x: Tensor, a: float, b: float, c: float, steps: int, eps: float) -> Tensor:
    # x: (N, r, c) with r <= c, already in the compute dtype. The Gram matrix is r x r, the smaller side.
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x


@functools.cache
def _compiled_newton_schulz():
    return torch.compile(_newton_schulz, fullgraph=True, dynamic=None)


def newton_schulz(
    x: Tensor,
    *,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
    compile: bool = False,
) -> Tensor:
    """Approximate orthogonal polar factor of each matrix in ``x``, computed in ``dtype``.

    Each matrix is divided by its Frobenius norm (so its spectral norm is <= 1) and then goes through ``steps``
    quintic Newton-Schulz iterations; a tall matrix is processed as its transpose so that the Gram matrix is the
    small side. Same arithmetic as ``torch.optim.Muon``'s, batched.

    Args:
        x: a matrix ``(rows, cols)`` or a batch ``(..., rows, cols)``; any floating dtype.
        steps: number of iterations (1..99).
        coefficients: ``(a, b, c)`` of the quintic.
        eps: floor of the norm used for normalisation (an all-zero matrix stays zero).
        dtype: compute (and output) dtype: ``torch.bfloat16`` (Muon's default) or ``torch.float32``.
        compile: run the iteration through ``torch.compile`` (pays on GPU; see ``benchmarks/muon_step.py``).

    Returns:
        A tensor of ``x``'s shape in ``dtype``.

    Example:
        >>> o = newton_schulz(torch.randn(128, 512))
        >>> torch.linalg.svdvals(o.float())  # all within NS_SINGULAR_VALUE_BAND
    """
    if x.ndim < 2:
        raise HfEffllmError(f"x.shape={tuple(x.shape)} is not a matrix; newton_schulz needs (..., rows, cols).")
    if not x.is_floating_point():
        raise HfEffllmError(f"x.dtype={x.dtype} is not floating point; pass a float tensor.")
    if not 1 <= steps < 100:
        raise HfEffllmError(f"steps={steps} is out of range; use 1..99 (Muon uses 5).")
    if len(coefficients) != 3:
        raise HfEffllmError(f"coefficients={coefficients!r} must be three floats (a, b, c).")
    if dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise HfEffllmError(f"dtype={dtype} is not supported; use torch.bfloat16 or torch.float32.")
    shape = x.shape
    y = x.reshape(-1, shape[-2], shape[-1]).to(dtype)
    tall = shape[-2] > shape[-1]
    if tall:
        y = y.mT
    a, b, c = (float(v) for v in coefficients)
    fn = _compiled_newton_schulz() if compile else _newton_schulz
    y = fn(y, a, b, c, int(steps), float(eps))
    if tall:
        y = y.mT
    return y.reshape(shape)
