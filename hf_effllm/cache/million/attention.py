"""The ``"million"`` attention function: attention over PQ codes + the exact residual window, log-sum-exp merged.

How it reaches the codes (the one trick, kept here). In transformers 5.x an attention module calls
``cache.update(key, value, layer_idx, ...)`` and then the function registered in ``AttentionInterface`` under
``config._attn_implementation`` with what ``update`` returned; the function never receives the cache. A
:class:`~hf_effllm.MillionCache` layer, when the model runs with ``attn_implementation="million"``, returns only
the full-precision part (the exact first "sink" tokens, then the recent window + new tokens) and leaves a
*pending* record of its codes in a thread-local slot; this function takes that record, checks that it belongs to
the calling module's ``layer_idx`` and that the key tensor it got is the very tensor ``update`` returned (anything
else raises: no silent garbage), and computes attention over codes + window. Without a pending record (a
``DynamicCache``, no cache, or a fresh prompt with no codes yet) it is exactly ``sdpa``, so prefill stays exact and
fast. Works the same on transformers 5.17 and 5.24 (``update`` gets different extra arguments there, which the
layer ignores).

Example:
    >>> model.set_attn_implementation("million")  # doctest: +SKIP
    >>> out = model.generate(ids, **cache_kwargs(MillionCache(model.config, codebooks)))  # doctest: +SKIP
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import HfEffllmError
from ...kernels.million import million_attention, million_attention_reference

ATTENTION_NAME = "million"
_PENDING = threading.local()


@dataclass
class PendingCodes:
    """What one cache layer leaves for the attention call that follows its ``update``."""

    layer_idx: int
    key: torch.Tensor  # the exact tensor returned by update: (sinks, window + new tokens)
    codes_k: torch.Tensor  # (B, Hkv, N, M) uint8, the tokens between the sinks and the window
    codes_v: torch.Tensor
    codebook_k: torch.Tensor  # (G, M, K, DSUB) in the model dtype
    codebook_v: torch.Tensor
    use_kernel: bool
    n_sinks: int = 0  # how many of key's first tokens are sinks (positions before the codes)
    owner: Any = None  # the MillionCache that left the record


def set_pending(state: PendingCodes | None) -> None:
    _PENDING.state = state


def peek_pending() -> PendingCodes | None:
    """The record left by the last ``update`` and not yet taken by an attention call (None if none)."""
    return getattr(_PENDING, "state", None)


def pop_pending() -> PendingCodes | None:
    """:func:`peek_pending`'s record, and the slot cleared (one thread-local read when there is none)."""
    state = getattr(_PENDING, "state", None)
    if state is not None:
        _PENDING.state = None
    return state


def take_pending(module: Any, key: torch.Tensor) -> PendingCodes | None:
    """The pending codes of the calling layer, or None when no MILLION layer is in play for it."""
    state: PendingCodes | None = getattr(_PENDING, "state", None)
    if state is None:
        return None
    _PENDING.state = None
    if state.layer_idx != getattr(module, "layer_idx", None):
        return None  # left over from an interrupted forward of another layer
    if state.key is not key:
        raise HfEffllmError(
            f"layer {state.layer_idx}: the key tensor given to the 'million' attention function is not the one "
            "MillionCache.update returned (this model transforms keys between the cache and attention); use "
            "attn_implementation='sdpa' with MillionCache (it then returns the decoded cache) for this model."
        )
    return state


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """Boolean 'may attend' from a boolean or additive float mask."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def split_mask(
    attention_mask: torch.Tensor | None,
    batch: int,
    q_len: int,
    n_codes: int,
    r_len: int,
    device: torch.device,
    n_sinks: int = 0,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split a 4-D attention mask into a code mask and a mask of the exact (full-precision) keys.

    The mask covers ``n_sinks + n_codes + r_len`` keys in position order: the exact sink tokens, the coded tokens,
    the exact window (whose last ``q_len`` tokens are the queries). The exact keys the attention function gets are
    ``cat(sinks, window)``, so their mask is the sink columns followed by the window columns.

    Args:
        attention_mask: boolean or additive ``(B, 1 or H, Lq, n_sinks + n_codes + r_len)`` mask, or None.
        batch, q_len: batch size and number of queries.
        n_codes, r_len, n_sinks: coded tokens, window tokens (new ones included) and sink tokens.
        device: where to build the causal mask when ``attention_mask`` is None.

    Returns:
        ``(code_mask (B, N) or None, exact_mask (B, Lq, n_sinks + R) or None)``; None means "attend everything".
        With no mask every query sees all sinks and codes (code mask None) and the window causally, bottom-right
        aligned; with a mask both are tensors (the code mask also where it allows every coded token).

    Example:
        >>> split_mask(None, 1, 2, 5, 3, torch.device("cpu"), n_sinks=1)[1].int().tolist()
        [[[1, 1, 1, 0], [1, 1, 1, 1]]]
    """
    if attention_mask is None:
        if q_len == 1:
            return None, None
        i = torch.arange(q_len, device=device)[:, None] + (r_len - q_len)
        j = torch.arange(r_len, device=device)[None, :]
        window = j <= i
        if n_sinks:
            window = torch.cat([torch.ones(q_len, n_sinks, dtype=torch.bool, device=device), window], dim=1)
        return None, window[None].expand(batch, -1, -1)
    allowed = _allowed(attention_mask)
    if allowed.dim() != 4 or allowed.shape[-1] != n_sinks + n_codes + r_len:
        raise HfEffllmError(
            f"attention mask of shape {tuple(attention_mask.shape)} does not cover {n_sinks} sink + {n_codes} coded "
            f"+ {r_len} window tokens."
        )
    allowed = allowed[:, 0].expand(batch, q_len, -1)
    code_mask = allowed[:, -1, n_sinks : n_sinks + n_codes]  # padding only: coded tokens precede every query
    res_mask = allowed[:, :, n_sinks + n_codes :]
    if n_sinks:
        res_mask = torch.cat([allowed[:, :, :n_sinks], res_mask], dim=-1)
    # the code mask is returned even where it allows every token: asking whether it does (.all()) would be a
    # device-to-host synchronisation per layer and step; masked or not, the kernels compute the same numbers
    return code_mask.contiguous(), res_mask.contiguous()


_SPLIT = threading.local()  # .last: (weak reference to the mask, facts, split_mask's answer)


def _split_mask_once(
    attention_mask: torch.Tensor,
    batch: int,
    q_len: int,
    n_codes: int,
    r_len: int,
    device: torch.device,
    n_sinks: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """:func:`split_mask` of a decode step's mask, kept for the last mask split: a model hands the same mask tensor
    to each of its layers in a forward, so the split (a few tensor operations, on a GPU launches) is made once per
    forward, not per layer. Made again for another mask object, another in-place version, storage or layout of it,
    or other sizes; an inference tensor (no version counter) is split on every call. For one query per row only:
    the answer may be a view of the mask, kept alive until the next split (``B x S`` values at one query)."""
    m = attention_mask
    if m.is_inference():
        return split_mask(m, batch, q_len, n_codes, r_len, device, n_sinks)
    facts = (batch, q_len, n_codes, r_len, n_sinks, m._version, m.data_ptr(), m.shape, m.stride(), m.dtype)
    hit = getattr(_SPLIT, "last", None)
    if hit is not None and hit[0]() is m and hit[1] == facts:
        return hit[2]
    out = split_mask(m, batch, q_len, n_codes, r_len, device, n_sinks)
    _SPLIT.last = (weakref.ref(m), facts, out)
    return out


def million_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``"million"`` (signature of transformers' attention interface).

    Args:
        module: the attention module (its ``layer_idx`` identifies the cache layer).
        query: ``(B, Hq, Lq, D)``.
        key, value: what the cache's ``update`` returned: the full-precision sinks, window and new tokens
            ``(B, Hkv, S + R, D)`` when codes are pending, else the whole K/V.
        attention_mask: the ``sdpa``-style mask built for ``S + n_codes + R`` keys (position order), or None.
        dropout, scaling, is_causal: as for ``sdpa``.

    Returns:
        ``(attn_output (B, Lq, Hq, D), None)``.
    """
    state = take_pending(module, key)
    n_codes = 0 if state is None else state.codes_k.shape[2]
    if n_codes == 0:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if dropout and module.training:
        raise HfEffllmError("the 'million' attention function is for inference; dropout > 0 is not supported.")
    b, _, lq, d = query.shape
    scale = scaling if scaling is not None else d**-0.5
    n_sinks = state.n_sinks
    if attention_mask is None and lq == 1:  # decode without padding: nothing to mask (split_mask's answer)
        code_mask = res_mask = None
    else:
        split = _split_mask_once if lq == 1 and attention_mask is not None else split_mask
        code_mask, res_mask = split(attention_mask, b, lq, n_codes, key.shape[2] - n_sinks, query.device, n_sinks)
    args = (query, state.codes_k, state.codes_v, state.codebook_k, state.codebook_v, key, value)
    gq = query.shape[1] // key.shape[1]
    if state.use_kernel and gq * lq <= 128:
        out = million_attention(*args, scale=scale, code_mask=code_mask, res_mask=res_mask)  # reference if it can't
    else:
        out = million_attention_reference(*args, scale=scale, code_mask=code_mask, res_mask=res_mask, path="decoded")
    return out.transpose(1, 2).contiguous(), None
