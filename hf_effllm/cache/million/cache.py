"""``MillionCache``: a transformers ``Cache`` whose layers keep old tokens as PQ codes and recent ones exact.

Each :class:`MillionLayer` holds

* ``sink_keys``/``sink_values``: the first ``sink_length`` tokens of the sequence, kept in full precision forever
  (attention sinks: they take a large share of the attention mass and have outlier keys, so their PQ error would
  shift it);
* ``codes_k``/``codes_v``: ``uint8`` ``(B, Hkv, capacity, M)`` buffers (grown by doubling; the first ``n_codes``
  tokens are valid), encoded with the layer's codebooks in one batched call per flush (no per-token loop);
* ``keys``/``values``: the full-precision window of the most recent tokens, ``residual_length`` of them (up to
  ``residual_length // 8`` more between flushes, so decode encodes in blocks instead of one token at a time).

Tokens are in position order sinks, codes, window. With ``attn_implementation="million"`` the ``update`` call returns
only the exact part, ``cat(sinks, window + new tokens)``, and the ``"million"`` attention function (see
:mod:`.attention`) combines it with attention over the codes. With any other attention implementation ``update``
returns the decoded cache (sinks + codes rebuilt from centroids + window), so the cache works everywhere, at the
cost of rebuilding K/V every step (a warning says so once).

Left padding: the sinks are the first ``sink_length`` positions of the cache, the same for every row, so in a
left-padded batch a padded row's first buffer tokens are padding (masked, as everywhere else) and that row's own
first tokens may be encoded; rows without padding get the full benefit.

Example:
    >>> model.set_attn_implementation("million")  # doctest: +SKIP
    >>> cache = MillionCache(model.config, codebooks)  # doctest: +SKIP
    >>> out = model.generate(ids, max_new_tokens=64, **hf_effllm.cache_kwargs(cache))  # doctest: +SKIP
    >>> cache.nbytes, cache.get_seq_length()  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ...errors import HfEffllmError
from ...kernels.million import pq_decode_reference, pq_encode
from .attention import ATTENTION_NAME, PendingCodes, pop_pending, set_pending
from .codebooks import MillionCodebooks, ModelSignature


class MillionLayer(CacheLayerMixin):
    """One attention layer of a :class:`MillionCache` (PQ codes for old tokens, exact recent window).

    Args:
        codebook_k, codebook_v: ``(G, M, K, DSUB)`` float codebooks of this layer.
        residual_length: recent tokens kept in full precision.
        sink_length: first tokens of the sequence kept in full precision forever.
        layer_idx: the layer's index (matched against the attention module's ``layer_idx``).
        owner: the :class:`MillionCache`, asked which attention implementation the model runs.
    """

    is_sliding = False
    is_croppable = True
    # After a step without a flush, ``keys``/``values`` (the window) are held as the exact tensors that step's update
    # returned, ``(sinks + window) K, V`` with the sink tensors they hold, and sliced out of them on first read: the
    # next step appends to them (``cat(sinks, window, new) == cat(exact, new)``), so a decode step makes no window
    # views (two tensor views cost about 5 us of host time per layer and step, million_host_cpu on a 2-core VM).
    _exact: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __init__(
        self,
        codebook_k: torch.Tensor,
        codebook_v: torch.Tensor,
        *,
        residual_length: int,
        layer_idx: int,
        owner: MillionCache | None = None,
        sink_length: int = 0,
    ) -> None:
        super().__init__()
        self._cb_src = (codebook_k, codebook_v)
        self.residual_length = residual_length
        self.sink_length = sink_length
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
        self.flush_block = residual_length // 8
        self.layer_idx = layer_idx
        self.owner = owner
        self.n_codes = 0
        self.codes_k: torch.Tensor | None = None
        self.codes_v: torch.Tensor | None = None
        # (n_codes, codes_k, codes_v, their first n_codes as views): update's memo of the codes it passes on
        self._code_views: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.codebook_k: torch.Tensor | None = None
        self.codebook_v: torch.Tensor | None = None

    @property
    def keys(self) -> torch.Tensor | None:
        """The full-precision window's keys ``(B, Hkv, R, D)``."""
        if self._exact is not None:
            self._split_exact()
        return self._keys

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        if self._exact is not None:
            self._split_exact()  # the values stay those of the same step
        self._keys = value

    @property
    def values(self) -> torch.Tensor | None:
        """The full-precision window's values ``(B, Hkv, R, D)``."""
        if self._exact is not None:
            self._split_exact()
        return self._values

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        if self._exact is not None:
            self._split_exact()
        self._values = value

    def _split_exact(self) -> None:
        """``keys``/``values`` as the window views of ``_exact`` (which is dropped)."""
        exact_k, exact_v, sinks, _ = self._exact
        self._exact = None
        n = sinks.shape[2]
        self._keys, self._values = exact_k[:, :, n:], exact_v[:, :, n:]

    # -- CacheLayerMixin -------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        g, m, _, dsub = self._cb_src[0].shape
        if m * dsub != d or g not in (1, h):
            raise HfEffllmError(
                f"layer {self.layer_idx}: codebooks for head_dim {m * dsub} and {g} head group(s) cannot encode keys "
                f"with head_dim {d} and {h} KV heads; train codebooks for this model."
            )
        self.device, self.dtype = key_states.device, key_states.dtype
        self.batch_size, self.num_heads, self.head_dim, self.num_subspaces = b, h, d, m
        self.codebook_k = self._cb_src[0].to(self.device, self.dtype).contiguous()
        self.codebook_v = self._cb_src[1].to(self.device, self.dtype).contiguous()
        self.keys = key_states.new_empty(b, h, 0, d)
        self.values = value_states.new_empty(b, h, 0, d)
        self.sink_keys = key_states.new_empty(b, h, 0, d)
        self.sink_values = value_states.new_empty(b, h, 0, d)
        self.codes_k = torch.empty(b, h, 0, m, dtype=torch.uint8, device=self.device)
        self.codes_v = torch.empty_like(self.codes_k)
        self.n_codes = 0
        self.is_initialized = True

    def _check_batch(self, key_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        if b != self.batch_size:
            raise HfEffllmError(
                f"this MillionCache holds batch size {self.batch_size} but got key states of batch size {b}; "
                "use a new cache (or cache.reset()) for a different batch."
            )
        if (h, d) != (self.num_heads, self.head_dim):
            raise HfEffllmError(
                f"layer {self.layer_idx} holds {self.num_heads} KV heads of size {self.head_dim}, got {h} x {d}."
            )

    def _grow(self, needed: int) -> None:
        cap = self.codes_k.shape[2]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap, 256)
        self._code_views = None  # so the old buffers go once this step's attention has read them
        for name in ("codes_k", "codes_v"):
            old = getattr(self, name)
            buf = torch.empty(*old.shape[:2], new_cap, old.shape[3], dtype=torch.uint8, device=old.device)
            buf[:, :, : self.n_codes] = old[:, :, : self.n_codes]
            setattr(self, name, buf)

    def _flush(self, exact_k: torch.Tensor, exact_v: torch.Tensor, n_sinks: int, kernel_enabled: bool) -> None:
        """Take the exact part ``cat(sinks, window)`` (``n_sinks`` sink tokens): encode the tokens of the window
        beyond ``residual_length`` (oldest first) and keep the rest exact; ``kernel_enabled``: the owner's answer for
        this device (the encoding's default path without an owner)."""
        r = exact_k.shape[2] - n_sinks
        limit = self.residual_length + self.flush_block
        if r <= limit:  # kept as it is, the window sliced out when read (see _exact)
            self._exact = (exact_k, exact_v, self.sink_keys, self.sink_values)
            self._keys = self._values = None
            return
        self._exact = None  # keys and values are set below
        move = r - self.residual_length
        self._grow(self.n_codes + move)
        dst = slice(self.n_codes, self.n_codes + move)
        kernel = None if self.owner is None or kernel_enabled else False
        old = slice(n_sinks, n_sinks + move)
        pq_encode(exact_k[:, :, old], self.codebook_k, out=self.codes_k[:, :, dst], use_kernel=kernel)
        pq_encode(exact_v[:, :, old], self.codebook_v, out=self.codes_v[:, :, dst], use_kernel=kernel)
        self.n_codes += move
        # a copy, so the (possibly long) prompt tensor is not kept alive by a view
        self.keys = exact_k[:, :, n_sinks + move :].clone()
        self.values = exact_v[:, :, n_sinks + move :].clone()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new tokens; return what the attention function needs (see the module docstring)."""
        left = pop_pending()
        if left is not None and self.owner is not None and left.owner is self.owner:
            raise HfEffllmError(
                f"MillionCache: layer {left.layer_idx} returned codes for the 'million' attention function, but the "
                "model's attention did not take them (the model runs another attn_implementation than the config "
                "the cache was built with, or a forward was interrupted after the cache update). Build the cache "
                "with the model's own config (MillionCache(model.config, codebooks)) after "
                "model.set_attn_implementation('million'), and start from a fresh cache after an interruption."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        ks = key_states.shape
        if len(ks) != 4 or ks[0] != self.batch_size or ks[1] != self.num_heads or ks[3] != self.head_dim:
            self._check_batch(key_states)  # raises
        n_before = self.n_codes
        # the valid codes as views, made again only when the count or the buffers change (a flush, a crop, a
        # batch reordering), not every step (two views fewer per decode step)
        views = self._code_views
        if views is None or views[0] != n_before or views[1] is not self.codes_k or views[2] is not self.codes_v:
            ck, cv = self.codes_k, self.codes_v
            views = self._code_views = (n_before, ck, cv, ck[:, :, :n_before], cv[:, :, :n_before])
        codes_k, codes_v = views[3], views[4]
        n_sinks = self.sink_keys.shape[2]
        if n_sinks < self.sink_length:  # the sequence's first tokens become sinks (codes and window are empty then)
            take = min(self.sink_length - n_sinks, key_states.shape[2])
            self.sink_keys = torch.cat([self.sink_keys, key_states[:, :, :take]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, value_states[:, :, :take]], dim=-2)
            key_states, value_states = key_states[:, :, take:], value_states[:, :, take:]
            n_sinks = self.sink_keys.shape[2]
        # The exact part in position order (sinks, then the window with the new tokens), built with one copy.
        exact = self._exact
        if exact is not None and exact[2] is self.sink_keys and exact[3] is self.sink_values:
            exact_k = torch.cat([exact[0], key_states], dim=-2)
            exact_v = torch.cat([exact[1], value_states], dim=-2)
        else:
            exact_k = torch.cat([self.sink_keys, self.keys, key_states], dim=-2)
            exact_v = torch.cat([self.sink_values, self.values, value_states], dim=-2)
        owner = self.owner
        active, kernel = owner._forward_state(self.layer_idx, self.device) if owner is not None else (False, False)
        self._flush(exact_k, exact_v, n_sinks, kernel)
        if active:
            # positional: about half the time of keyword arguments (the fields' order)
            set_pending(PendingCodes(self.layer_idx, exact_k, codes_k, codes_v, self.codebook_k, self.codebook_v,
                                     kernel, n_sinks, owner))  # fmt: skip
            return exact_k, exact_v
        if n_before == 0:
            return exact_k, exact_v
        if self.owner is not None and not self.owner._warned_decoded:
            self.owner._warned_decoded = True  # once per cache
            warnings.warn(
                "MillionCache is used with an attention implementation other than 'million', so it rebuilds the "
                "full K/V from the codes every step (correct but slow); call model.set_attn_implementation("
                "'million') to attend over the codes directly.",
                stacklevel=3,
            )
        dk = pq_decode_reference(codes_k, self.codebook_k)
        dv = pq_decode_reference(codes_v, self.codebook_v)
        return (
            torch.cat([self.sink_keys, dk, exact_k[:, :, n_sinks:]], dim=-2),
            torch.cat([self.sink_values, dv, exact_v[:, :, n_sinks:]], dim=-2),
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        exact = self._exact
        window = exact[0].shape[-2] - exact[2].shape[-2] if exact is not None else self.keys.shape[-2]
        return self.sink_keys.shape[-2] + self.n_codes + window

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.sink_keys = self.sink_values = None
        self.codes_k = self.codes_v = None
        self._code_views = None  # holds the buffers
        self.n_codes = 0
        self.is_initialized = False
        for name in ("batch_size",):
            self.__dict__.pop(name, None)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a positive value is the length to keep, as in 5.17).

        Tokens that remain keep their representation: exact if a sink or in the window, codes if already encoded.
        Cropping into the sinks drops all codes and the window; the next tokens refill the sinks first.
        """
        if not self.is_initialized:
            return
        total = self.get_seq_length()
        keep = tokens_to_remove if tokens_to_remove > 0 else total + tokens_to_remove
        keep = max(0, min(total, keep))
        if keep >= total:
            return
        n_sinks = self.sink_keys.shape[2]
        if keep >= n_sinks + self.n_codes:
            r = keep - n_sinks - self.n_codes
            self.keys, self.values = self.keys[:, :, :r], self.values[:, :, :r]
            return
        self.keys, self.values = self.keys[:, :, :0], self.values[:, :, :0]
        if keep >= n_sinks:
            self.n_codes = keep - n_sinks
        else:
            self.n_codes = 0
            self.sink_keys, self.sink_values = self.sink_keys[:, :, :keep], self.sink_values[:, :, :keep]

    def _index_batch(self, fn) -> None:
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        self.codes_k = fn(self.codes_k[:, :, : self.n_codes])
        self.codes_v = fn(self.codes_v[:, :, : self.n_codes])
        self._code_views = None  # of the buffers just replaced
        self.batch_size = self.keys.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            idx = beam_idx.to(self.device)
            self._index_batch(lambda t: t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._index_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._index_batch(lambda t: t[indices])

    def offload(self) -> None:  # the codes are the small part; offloading is not supported
        return None

    def prefetch(self) -> None:
        return None

    # -- memory ----------------------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of the cached state: valid codes plus the full-precision sinks and window."""
        if not self.is_initialized:
            return 0
        codes = 2 * self.batch_size * self.num_heads * self.n_codes * self.num_subspaces
        exact = self.keys.numel() + self.values.numel() + self.sink_keys.numel() + self.sink_values.numel()
        return codes + exact * self.keys.element_size()

    @property
    def allocated_bytes(self) -> int:
        """Bytes held, including spare code capacity and the codebooks."""
        if not self.is_initialized:
            return 0
        t = (self.codes_k, self.codes_v, self.keys, self.values, self.sink_keys, self.sink_values, self.codebook_k,
             self.codebook_v)  # fmt: skip
        return sum(x.numel() * x.element_size() for x in t)


class MillionCache(Cache):
    """A KV cache that stores tokens older than a recent window as product-quantization codes (MILLION).

    Pass it as ``past_key_values`` (``cache`` on newer transformers; :func:`hf_effllm.cache_kwargs` picks the name)
    to ``forward`` or ``generate``. Run the model with ``attn_implementation="million"`` so attention reads the
    codes directly (any other implementation still works, through decoded K/V).

    Args:
        config: the model's config (``model.config``); checked against the codebooks.
        codebooks: :class:`~hf_effllm.million.MillionCodebooks` trained for this model.
        residual_length: recent tokens kept exact (default: the codebooks' config).
        sink_length: first tokens of each sequence kept exact forever, the attention sinks (default: the
            codebooks' config); the tokens between them and the recent window are encoded.
        use_kernel: use the Triton decode kernel: ``None`` (default) on CUDA only, ``True`` also under
            ``TRITON_INTERPRET=1`` on the CPU, ``False`` never (PyTorch path).

    Raises:
        HfEffllmError: codebooks trained for another model, or a model with sliding-window / linear-attention
            layers.

    Example:
        >>> cache = MillionCache(model.config, codebooks)  # doctest: +SKIP
        >>> model(input_ids=ids, **hf_effllm.cache_kwargs(cache))  # doctest: +SKIP
    """

    def __init__(
        self,
        config: Any,
        codebooks: MillionCodebooks,
        *,
        residual_length: int | None = None,
        sink_length: int | None = None,
        use_kernel: bool | None = None,
    ) -> None:
        if not isinstance(codebooks, MillionCodebooks):
            raise HfEffllmError(
                f"codebooks must be MillionCodebooks (from hf_effllm.million.train_codebooks or "
                f"MillionCodebooks.from_pretrained); got {type(codebooks).__name__}."
            )
        codebooks.check_compatible(config)
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise HfEffllmError(
                f"MillionCache supports full-attention layers only; this model also has {other} layers."
            )
        rl = codebooks.config.residual_length if residual_length is None else residual_length
        if not isinstance(rl, int) or isinstance(rl, bool) or rl < 0:
            raise HfEffllmError(f"residual_length={rl!r} must be an integer >= 0.")
        sl = codebooks.config.sink_length if sink_length is None else sink_length
        if not isinstance(sl, int) or isinstance(sl, bool) or sl < 0:
            raise HfEffllmError(f"sink_length={sl!r} must be an integer >= 0 (e.g. 4: the first 4 tokens stay exact).")
        self.model_config = text
        self.codebooks = codebooks
        self.residual_length = rl
        self.sink_length = sl
        self.use_kernel = use_kernel
        self.signature = ModelSignature.from_config(config)
        self._warned_decoded = False
        self._fwd: tuple[bool, bool, torch.device] | None = None  # _forward_state's answer for this forward
        self._fwd_layer = -1
        layers = [
            MillionLayer(*codebooks.layer(i), residual_length=rl, sink_length=sl, layer_idx=i, owner=self)
            for i in range(text.num_hidden_layers)
        ]
        super().__init__(layers=layers)

    @property
    def uses_million_attention(self) -> bool:
        """Whether the model currently runs the ``"million"`` attention function."""
        return getattr(self.model_config, "_attn_implementation", None) == ATTENTION_NAME

    def _forward_state(self, layer_idx: int, device: torch.device) -> tuple[bool, bool]:
        """``(uses_million_attention, kernel_enabled(device))`` as a layer's ``update`` needs them, read once per
        forward (reading the model config's attribute costs about as much as the rest of an update): read again
        whenever the layer index does not exceed the last one seen (a new forward began) or the device changes, so
        ``set_attn_implementation`` or ``use_kernel`` set between forwards take effect at the next one."""
        state = self._fwd
        if state is None or layer_idx <= self._fwd_layer or state[2] != device:
            state = self._fwd = (self.uses_million_attention, self.kernel_enabled(device), device)
        self._fwd_layer = layer_idx
        return state[0], state[1]

    def kernel_enabled(self, device: torch.device) -> bool:
        from ...kernels.million import kernel_available

        if self.use_kernel is False:
            return False
        if self.use_kernel is None:
            return device.type == "cuda" and kernel_available(device)
        return kernel_available(device)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached state (codes + full-precision sinks and window), all layers."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def allocated_bytes(self) -> int:
        """Bytes allocated (spare code capacity and per-layer codebook copies included), all layers."""
        return sum(layer.allocated_bytes for layer in self.layers)

    def memory_report(self) -> dict[str, int | float]:
        """Cached bytes vs what a bf16/fp16 ``DynamicCache`` would hold for the same tokens."""
        first = self.layers[0]
        if not first.is_initialized:
            return {"tokens": 0, "nbytes": 0, "dense_16bit_bytes": 0, "ratio": 0.0}
        tokens = self.get_seq_length()
        dense = 2 * 2 * first.batch_size * first.num_heads * first.head_dim * tokens * len(self.layers)
        return {
            "tokens": tokens,
            "sink_tokens": first.sink_keys.shape[2],
            "nbytes": self.nbytes,
            "dense_16bit_bytes": dense,
            "ratio": dense / max(1, self.nbytes),
            "allocated_bytes": self.allocated_bytes,
        }
