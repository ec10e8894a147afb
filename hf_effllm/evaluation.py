"""Perplexity: the one evaluation function every method and benchmark uses."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .compat import CACHE_KWARG, output_cache
from .errors import HfEffllmError


@dataclass
class PerplexityResult:
    """Result of :func:`perplexity`.

    Attributes:
        perplexity: ``exp(nll)``.
        nll: mean negative log-likelihood (nats per token) over the scored tokens.
        num_tokens: number of scored tokens.
        num_windows: number of windows evaluated.
        context_length: window length in tokens.
        stride: step between window starts.
    """

    perplexity: float
    nll: float
    num_tokens: int
    num_windows: int
    context_length: int
    stride: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _windows(n: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) of each window; every token after the first is scored once."""
    out = []
    prev_end = 0
    for start in range(0, n, stride):
        end = min(start + context_length, n)
        first = max(prev_end, start + 1) - start  # position inside the window of the first token to score
        if end - start >= 2 and first < end - start:
            out.append((start, end, first))
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def perplexity(
    model,
    data: str | torch.Tensor,
    *,
    tokenizer=None,
    context_length: int = 2048,
    stride: int | None = None,
    batch_size: int = 1,
    max_tokens: int | None = None,
    prefix_length: int = 0,
    decode_chunk: int | None = None,
    cache_factory: Callable[[], Any] | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of a causal LM on a text or a token sequence.

    Windows of ``context_length`` tokens start every ``stride`` tokens (default: ``context_length``, i.e.
    non-overlapping); each token is scored once, in the first window that contains it with some context, so
    with ``stride < context_length`` every scored token sees at least ``context_length - stride`` tokens of
    context. Windows of equal length are batched ``batch_size`` at a time.

    To measure a custom KV cache really in use (e.g. a quantized cache), give ``cache_factory`` (called once per
    batch, returns the cache object passed as ``past_key_values``/``cache``) and ``prefix_length``: the first ``prefix_length`` tokens of
    each window are prefilled into the cache and not scored; the rest are fed through the cache in chunks of
    ``decode_chunk`` tokens (``1`` is token-by-token decoding) and scored. Works with any attention
    implementation the model is set to.

    Args:
        model: a causal LM returning ``logits``.
        data: text (needs ``tokenizer``) or a 1-D ``LongTensor`` of token ids.
        tokenizer: tokenizer used when ``data`` is text.
        context_length: tokens per window.
        stride: step between windows, ``1 <= stride <= context_length``.
        batch_size: windows per forward pass.
        max_tokens: evaluate only the first ``max_tokens`` tokens.
        prefix_length: tokens of each window prefilled into the cache and not scored (needs ``cache_factory``
            or ``decode_chunk``); must be < ``context_length``.
        decode_chunk: tokens per forward after the prefix (default: all remaining at once).
        cache_factory: zero-argument callable returning a fresh cache (e.g. ``DynamicCache``).
        progress: show a progress bar.
        device: where inputs go; default the model's device.

    Returns:
        A :class:`PerplexityResult`.

    Example:
        >>> res = perplexity(model, corpus_text("eval"), tokenizer=tok, context_length=2048)  # doctest: +SKIP
        >>> round(res.perplexity, 1)  # doctest: +SKIP
    """
    if context_length < 2:
        raise HfEffllmError(f"context_length={context_length} must be >= 2.")
    stride = context_length if stride is None else stride
    if not 1 <= stride <= context_length:
        raise HfEffllmError(f"stride={stride} must be between 1 and context_length={context_length}.")
    if batch_size < 1:
        raise HfEffllmError(f"batch_size={batch_size} must be >= 1.")
    if not 0 <= prefix_length < context_length:
        raise HfEffllmError(f"prefix_length={prefix_length} must be >= 0 and < context_length={context_length}.")
    if decode_chunk is not None and decode_chunk < 1:
        raise HfEffllmError(f"decode_chunk={decode_chunk} must be >= 1.")
    if prefix_length and stride != context_length:
        raise HfEffllmError("prefix_length needs non-overlapping windows: leave stride at its default.")

    if isinstance(data, str):
        if tokenizer is None:
            raise HfEffllmError("data is text, so a tokenizer is needed: pass tokenizer=...")
        ids = tokenizer(data, return_tensors="pt", add_special_tokens=False).input_ids[0]
    elif isinstance(data, torch.Tensor) and data.dim() == 1 and not data.is_floating_point():
        ids = data
    else:
        raise HfEffllmError("data must be a string or a 1-D tensor of token ids.")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise HfEffllmError(f"data has {ids.numel()} tokens; at least 2 are needed.")

    dev = torch.device(device) if device is not None else next(model.parameters()).device
    windows = _windows(ids.numel(), context_length, stride)
    if prefix_length:
        windows = [(s, e, max(f, prefix_length)) for s, e, f in windows if e - s > prefix_length + 1]
        if not windows:
            raise HfEffllmError(f"no window is longer than prefix_length={prefix_length} + 1 tokens.")
    groups: list[list[tuple[int, int, int]]] = []
    for w in windows:
        same = groups and len(groups[-1]) < batch_size and (groups[-1][0][1] - groups[-1][0][0]) == (w[1] - w[0])
        same = same and groups[-1][0][2] == w[2]
        if same:
            groups[-1].append(w)
        else:
            groups.append([w])

    total_nll = 0.0
    total_tokens = 0
    bar = tqdm(total=len(windows), desc=f"perplexity @ {context_length}", disable=not progress, unit="win")
    for group in groups:
        batch = torch.stack([ids[s:e] for s, e, _ in group]).to(dev)
        first = group[0][2]
        nll, count = _score(model, batch, first, prefix_length, decode_chunk, cache_factory)
        total_nll += nll
        total_tokens += count
        bar.update(len(group))
    bar.close()
    mean = total_nll / total_tokens
    return PerplexityResult(
        perplexity=math.exp(mean),
        nll=mean,
        num_tokens=total_tokens,
        num_windows=len(windows),
        context_length=context_length,
        stride=stride,
    )


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
    ).item()


def _score(model, batch, first, prefix_length, decode_chunk, cache_factory) -> tuple[float, int]:
    """Sum of NLL over positions ``first..L-1`` of each row, each predicted from the tokens before it."""
    rows, length = batch.shape
    if not prefix_length and decode_chunk is None and cache_factory is None:
        logits = model(input_ids=batch, use_cache=False).logits
        return _nll_sum(logits[:, first - 1 : -1], batch[:, first:]), rows * (length - first)

    # Prefill the context tokens 0..first-1 into the cache; the last one's logits predict token `first`.
    kwargs: dict[str, Any] = {"use_cache": True}
    if cache_factory is not None:
        kwargs[CACHE_KWARG] = cache_factory()
    out = model(input_ids=batch[:, :first], logits_to_keep=1, **kwargs)
    kwargs[CACHE_KWARG] = output_cache(out)
    nll, count = _nll_sum(out.logits[:, -1:], batch[:, first : first + 1]), rows
    chunk = decode_chunk or length
    for start in range(first, length - 1, chunk):
        end = min(start + chunk, length - 1)
        out = model(input_ids=batch[:, start:end], **kwargs)
        kwargs[CACHE_KWARG] = output_cache(out)
        nll += _nll_sum(out.logits, batch[:, start + 1 : end + 1])
        count += rows * (end - start)
    return nll, count
