"""MILLION codebooks: k-means training on calibration keys/values, save/load, Hub upload.

Keys are collected exactly as the cache stores them (after RoPE, from a ``DynamicCache`` filled by a forward pass
over calibration text from the corpus's *train* split), values likewise. Each (layer, K or V[, KV head]) gets one
codebook of ``M`` subspaces x ``2**nbits`` centroids by default; ``scope="shared"`` trains one for all layers (the
public MILLION setting).

Example:
    >>> cfg = MillionConfig(num_subspaces=32)  # doctest: +SKIP
    >>> books = train_codebooks(model, tokenizer=tok, config=cfg)  # doctest: +SKIP
    >>> books.save_pretrained("smollm2-million-4bit")  # doctest: +SKIP
    >>> books = MillionCodebooks.from_pretrained("smollm2-million-4bit")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from ...errors import HfEffllmError
from ...kernels.million import pq_decode_reference, pq_encode
from ...utils.io import atomic_dir
from .config import MillionConfig

CODEBOOK_FILE = "million_codebooks.safetensors"
CONFIG_FILE = "million_config.json"
FORMAT_VERSION = 1

logger = logging.get_logger(__name__)


def _basename(name_or_path: str) -> str:
    """The last component of a local path or Hub id ("org/SmolLM2-135M" and "/models/SmolLM2-135M" agree)."""
    return name_or_path.rstrip("/").rsplit("/", 1)[-1]


def kmeans(
    points: torch.Tensor,
    k: int,
    *,
    iters: int = 20,
    seed: int = 0,
    init: torch.Tensor | None = None,
    chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """Batched Lloyd k-means: one independent problem per leading index.

    Args:
        points: ``(S, P, d)`` float points (``S`` problems of ``P`` points each).
        k: centroids per problem (points are repeated when ``P < k``).
        iters: Lloyd iterations.
        seed: initialisation seed (centroids start at distinct random points).
        init: ``(S, k, d)`` starting centroids instead of random points.
        chunk_elements: bound on the temporary distance tensor.

    Returns:
        ``(S, k, d)`` float32 centroids. Empty clusters are re-seeded at the points farthest from their centroid.

    Example:
        >>> kmeans(torch.randn(3, 500, 2), 16, iters=5).shape
        torch.Size([3, 16, 2])
    """
    s, p, d = points.shape
    x = points.float()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if p < k:
        x = x.repeat(1, (k + p - 1) // p, 1)
        p = x.shape[1]
    if init is not None:
        if tuple(init.shape) != (s, k, d):
            raise HfEffllmError(f"init has shape {tuple(init.shape)}; expected {(s, k, d)}.")
        cent = init.float().to(x.device).clone()
    else:
        first = torch.stack([torch.randperm(p, generator=gen)[:k] for _ in range(s)]).to(x.device)
        cent = torch.gather(x, 1, first[..., None].expand(-1, -1, d)).clone()
    step = max(1, chunk_elements // max(1, s * k))
    for _ in range(iters):
        assign, dist = _assign(x, cent, step)
        sums = torch.zeros(s, k, d, device=x.device).scatter_add_(1, assign[..., None].expand(-1, -1, d), x)
        counts = torch.zeros(s, k, device=x.device).scatter_add_(1, assign, torch.ones_like(dist))
        new = sums / counts.clamp_min(1)[..., None]
        empty = counts == 0
        if empty.any():  # re-seed empty clusters at the worst-served points
            far = dist.topk(k, dim=1).indices  # (S, k)
            cand = torch.gather(x, 1, far[..., None].expand(-1, -1, d))
            new = torch.where(empty[..., None], cand, new)
        cent = new
    return cent


def _assign(x: torch.Tensor, cent: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid index and squared distance of every point, in chunks of points."""
    s, p, _ = x.shape
    idx = torch.empty(s, p, dtype=torch.long, device=x.device)
    dist = torch.empty(s, p, device=x.device)
    c2 = cent.square().sum(-1)[:, None]
    ct = cent.transpose(1, 2)
    for a in range(0, p, step):
        xs = x[:, a : a + step]
        v, i = torch.baddbmm(c2, xs, ct, alpha=-2.0).min(-1)  # ||c||^2 - 2 x.c: one fused pass
        idx[:, a : a + step] = i
        dist[:, a : a + step] = (v + xs.square().sum(-1)).clamp_min(0)
    return idx, dist


@dataclass
class ModelSignature:
    """The attention shape codebooks were trained for; a cache checks a model's config against it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    model_type: str = ""
    name_or_path: str = ""

    @classmethod
    def from_config(cls, config: Any) -> ModelSignature:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        return cls(
            num_layers=int(text.num_hidden_layers),
            num_kv_heads=int(kv),
            head_dim=int(head_dim),
            model_type=str(getattr(text, "model_type", "")),
            name_or_path=str(getattr(config, "name_or_path", "") or ""),
        )


@dataclass
class MillionCodebooks:
    """Trained PQ codebooks for one model.

    Attributes:
        config: the :class:`MillionConfig` they were trained with.
        signature: the model shape they fit (layers, KV heads, head_dim).
        keys: float32 ``(Lc, G, M, K, DSUB)``; ``Lc`` is the number of layers (1 when ``scope="shared"``), ``G``
            is the number of KV heads when ``scope="head"``, else 1.
        values: same shape as ``keys``.
        meta: free-form training facts (calibration tokens, distortion, time).
    """

    config: MillionConfig
    signature: ModelSignature
    keys: torch.Tensor
    values: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.keys.shape != self.values.shape or self.keys.dim() != 5:
            raise HfEffllmError(
                f"keys {tuple(self.keys.shape)} and values {tuple(self.values.shape)} must both be (L, G, M, K, DSUB)."
            )
        lc, g, m, k, dsub = self.keys.shape
        sig = self.signature
        want_l = 1 if self.config.scope == "shared" else sig.num_layers
        want_g = sig.num_kv_heads if self.config.scope == "head" else 1
        if (lc, g, m * dsub, k) != (want_l, want_g, sig.head_dim, self.config.num_centroids):
            raise HfEffllmError(
                f"codebook tensors {tuple(self.keys.shape)} do not fit scope={self.config.scope!r}, "
                f"{sig.num_layers} layers, {sig.num_kv_heads} KV heads, head_dim {sig.head_dim}, "
                f"{self.config.num_centroids} centroids."
            )

    @property
    def num_subspaces(self) -> int:
        return self.keys.shape[2]

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)`` codebooks of one layer, each ``(G, M, K, DSUB)``."""
        i = 0 if self.config.scope == "shared" else layer_idx
        return self.keys[i], self.values[i]

    def check_compatible(self, config: Any) -> None:
        """Raise if these codebooks were trained for a model of another attention shape.

        Raises:
            HfEffllmError: naming what differs (layers, KV heads, head_dim).
        """
        other = ModelSignature.from_config(config)
        diffs = [
            f"{name}: codebooks {getattr(self.signature, name)}, model {getattr(other, name)}"
            for name in ("num_layers", "num_kv_heads", "head_dim")
            if getattr(self.signature, name) != getattr(other, name)
        ]
        if diffs:
            raise HfEffllmError(
                f"these codebooks were trained for another model ({self.signature.name_or_path or 'unknown'}): "
                + "; ".join(diffs)
                + ". Train codebooks for this model with hf_effllm.million.train_codebooks."
            )
        mine, theirs = self.signature, other
        if (mine.model_type and theirs.model_type and mine.model_type != theirs.model_type) or (
            mine.name_or_path and theirs.name_or_path and _basename(mine.name_or_path) != _basename(theirs.name_or_path)
        ):
            logger.warning(
                "MILLION codebooks trained for %s (%s) are used with %s (%s): the shapes match, but keys and values "
                "of another model fall far from these centroids; train codebooks for this model.",
                mine.name_or_path or "?", mine.model_type or "?", theirs.name_or_path or "?", theirs.model_type or "?",
            )  # fmt: skip

    def encode(self, x: torch.Tensor, layer_idx: int, kind: str = "keys") -> torch.Tensor:
        """uint8 codes ``(B, Hkv, N, M)`` of ``x`` ``(B, Hkv, N, D)`` with layer ``layer_idx``'s ``kind`` codebook."""
        cb = self.layer(layer_idx)[0 if kind == "keys" else 1].to(x.device)
        return pq_encode(x, cb)

    def decode(self, codes: torch.Tensor, layer_idx: int, kind: str = "keys") -> torch.Tensor:
        """Vectors ``(B, Hkv, N, D)`` (float32) rebuilt from codes."""
        cb = self.layer(layer_idx)[0 if kind == "keys" else 1].to(codes.device)
        return pq_decode_reference(codes, cb)

    # -- persistence ---------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write ``million_codebooks.safetensors`` and ``million_config.json`` into a folder (atomically).

        Returns:
            The folder path.
        """
        from safetensors.torch import save_file

        path = Path(save_directory)
        with atomic_dir(path, overwrite=overwrite, arg_name="save_directory") as tmp:
            save_file(
                {"keys": self.keys.float().contiguous().cpu(), "values": self.values.float().contiguous().cpu()},
                str(tmp / CODEBOOK_FILE),
                metadata={"format": "hf_effllm.million", "version": str(FORMAT_VERSION)},
            )
            payload = {
                "format_version": FORMAT_VERSION,
                "config": self.config.to_dict(),
                "signature": self.signature.__dict__,
                "meta": self.meta,
            }
            (tmp / CONFIG_FILE).write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, *, revision: str | None = None) -> MillionCodebooks:
        """Load codebooks from a folder written by :meth:`save_pretrained` or a Hub repo holding one.

        Raises:
            HfEffllmError: the folder/repo lacks the files or they are corrupt.
        """
        from safetensors.torch import load_file

        folder = Path(path_or_repo)
        if not folder.is_dir():
            try:
                from huggingface_hub import snapshot_download

                folder = Path(
                    snapshot_download(str(path_or_repo), revision=revision, allow_patterns=[CODEBOOK_FILE, CONFIG_FILE])
                )
            except Exception as e:
                raise HfEffllmError(
                    f"path_or_repo={str(path_or_repo)!r} is not a folder and could not be fetched from the Hub "
                    f"({type(e).__name__}); give a folder written by MillionCodebooks.save_pretrained."
                ) from e
        if not (folder / CODEBOOK_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
            raise HfEffllmError(f"{folder} has no {CODEBOOK_FILE} and {CONFIG_FILE}; it holds no MILLION codebooks.")
        try:
            payload = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
            version = int(payload.get("format_version", FORMAT_VERSION))
            tensors = load_file(str(folder / CODEBOOK_FILE))
            config = MillionConfig.from_dict(payload["config"])
            signature = ModelSignature(**payload["signature"])
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise HfEffllmError(f"the MILLION codebooks in {folder} are corrupt: {e}") from e
        if version > FORMAT_VERSION:
            raise HfEffllmError(
                f"the MILLION codebooks in {folder} have format_version={version}; this hf-effllm reads up to "
                f"{FORMAT_VERSION}: upgrade hf-effllm."
            )
        return cls(config, signature, tensors["keys"], tensors["values"], meta=payload.get("meta", {}))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        results: str = "",
        dry_run: bool = False,
        token: str | None = None,
    ) -> Path | str:
        """Save to a temporary folder with a model card (``hub_cards/million.md``) and upload it.

        Args:
            repo_id: ``user/name`` on the Hub.
            private: create the repo as private.
            results: Markdown results to put in the card (e.g. a perplexity table).
            dry_run: build and validate the folder, upload nothing; returns the folder path (a temporary folder
                that is then the caller's to remove).
            token: Hub token (default: the logged-in one).

        Returns:
            The folder (dry run) or the uploaded repo URL.
        """
        import shutil
        import tempfile

        from ...hub import push_folder

        tmp = Path(tempfile.mkdtemp(prefix="million-codebooks-"))
        folder = tmp / "codebooks"
        self.save_pretrained(folder)
        facts = {"config": self.config.to_dict(), "signature": self.signature.__dict__, "meta": self.meta,
                 "results_markdown": results}  # fmt: skip
        (folder / "results.json").write_text(json.dumps(facts, indent=2, default=str) + "\n", encoding="utf-8")
        (folder / "README.md").write_text(str(self.model_card(results=results, repo_id=repo_id)), encoding="utf-8")
        if dry_run:
            push_folder(folder, repo_id, dry_run=True)  # validates the folder and card
            return folder
        try:
            return push_folder(folder, repo_id, private=private, token=token)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # uploaded (or failed): the staging copy is not the user's

    def model_card(self, *, results: str = "", repo_id: str | None = None) -> Any:
        """The rendered Hub card (``hub_cards/million.md``) for these codebooks.

        Args:
            results: Markdown results to put in the card.
            repo_id: the repo the codebooks go to (its "How to use" loads them from there); None: a placeholder.
        """
        from ... import __version__
        from ...hub import render_card

        cfg = self.config
        base = self.signature.name_or_path if self.signature.name_or_path.count("/") == 1 else "unknown"
        return render_card(
            "million",
            library_name="transformers",
            base_model=base,
            tags=["hf-effllm", "hf-effllm-million", "kv-cache", "product-quantization"],
            hf_effllm_version=__version__,
            bits=cfg.bits_per_element(self.signature.head_dim),
            num_subspaces=self.num_subspaces,
            num_centroids=cfg.num_centroids,
            residual_length=cfg.residual_length,
            sink_length=cfg.sink_length,
            scope=cfg.scope,
            num_layers=self.signature.num_layers,
            num_kv_heads=self.signature.num_kv_heads,
            head_dim=self.signature.head_dim,
            calibration_tokens=self.meta.get("calibration_tokens", "unknown"),
            results=results or "No results recorded with these codebooks.",
            repo_id=repo_id or "THIS_REPO_ID",
        )


# -- training --------------------------------------------------------------------------------------------------------
def _calibration_ids(model: Any, tokenizer: Any, texts: Any, config: MillionConfig) -> torch.Tensor:
    from ...data import calibration_batches, load_tokenizer

    if isinstance(texts, torch.Tensor):
        if texts.dim() != 2 or texts.is_floating_point():
            raise HfEffllmError(
                f"texts_or_dataset as a tensor must be (batch, seq) token ids; got {tuple(texts.shape)}."
            )
        return texts
    tok = tokenizer if tokenizer is not None else load_tokenizer(getattr(model.config, "name_or_path", None) or None)
    return calibration_batches(
        tok, nsamples=config.calibration_samples, seqlen=config.calibration_seqlen, texts=texts, seed=config.seed
    )


@torch.no_grad()
def collect_kv(model: Any, ids: torch.Tensor, *, batch_size: int = 4) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keys (after RoPE) and values of every layer exactly as ``DynamicCache`` stores them.

    Returns:
        Per layer, ``(Hkv, tokens, D)`` float32 keys and values on the model's device.
    """
    from transformers import DynamicCache

    from ...compat import cache_kwargs

    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise HfEffllmError(
            f"calibration ids of shape {tuple(ids.shape)} hold no tokens; give (windows, seq_len) with both > 0."
        )
    dev = next(model.parameters()).device
    keys: list[list[torch.Tensor]] = []
    values: list[list[torch.Tensor]] = []
    was_training = model.training
    model.eval()  # no dropout in the calibration keys and values
    try:
        for a in range(0, ids.shape[0], batch_size):
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(
                    input_ids=ids[a : a + batch_size].to(dev), use_cache=True, logits_to_keep=1, **cache_kwargs(cache)
                )
            _append_layers(cache, keys, values)
    finally:
        model.train(was_training)
    return [torch.cat(k, 1) for k in keys], [torch.cat(v, 1) for v in values]


def _append_layers(cache: Any, keys: list[list[torch.Tensor]], values: list[list[torch.Tensor]]) -> None:
    for i, lay in enumerate(cache.layers):
        if len(keys) <= i:
            keys.append([])
            values.append([])
        # (B, H, S, D) -> (H, B*S, D)
        keys[i].append(lay.keys.float().transpose(0, 1).reshape(lay.keys.shape[1], -1, lay.keys.shape[-1]))
        values[i].append(lay.values.float().transpose(0, 1).reshape(lay.values.shape[1], -1, lay.values.shape[-1]))


def _subsample(x: torch.Tensor, max_points: int, gen: torch.Generator) -> torch.Tensor:
    """Random subset of at most ``max_points`` along dim 1 (same subset for every leading index)."""
    if x.shape[1] <= max_points:
        return x
    idx = torch.randperm(x.shape[1], generator=gen)[:max_points].to(x.device)
    return x.index_select(1, idx)


def train_codebooks(
    model: Any,
    texts_or_dataset: str | Sequence[str] | Any | torch.Tensor | None = None,
    config: MillionConfig | None = None,
    *,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    batch_size: int = 4,
) -> MillionCodebooks:
    """Train MILLION codebooks for ``model`` on calibration text (never on evaluation text).

    Args:
        model: a transformers causal LM (keys/values are collected through its own ``DynamicCache``).
        texts_or_dataset: calibration text: a string, list of strings, ``datasets.Dataset`` with a "text" column,
            or a ``(batch, seq)`` tensor of token ids; ``None`` (default) draws windows from the corpus's train split.
        config: :class:`MillionConfig` (default: 4 bits, one codebook per layer and K/V).
        tokenizer: the model's tokenizer (default: loaded from the model's ``name_or_path``).
        device: where k-means runs (default: CUDA when available, else the model's device).
        batch_size: calibration windows per forward pass.

    Returns:
        :class:`MillionCodebooks`.

    Raises:
        HfEffllmError: if ``num_subspaces`` does not divide head_dim, or the calibration text is too short.

    Example:
        >>> books = train_codebooks(model, config=MillionConfig(num_subspaces=16), tokenizer=tok)  # doctest: +SKIP
    """
    import time

    config = config or MillionConfig()
    sig = ModelSignature.from_config(model.config)
    config.subspaces_for(sig.head_dim)  # fail fast, before the calibration pass
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else next(model.parameters()).device
    )  # fmt: skip
    t0 = time.perf_counter()
    ids = _calibration_ids(model, tokenizer, texts_or_dataset, config)
    keys, values = collect_kv(model, ids, batch_size=batch_size)
    books = fit_codebooks(keys, values, sig, config, device=dev)
    books.meta.update(
        calibration_tokens=int(ids.numel()),
        calibration_windows=int(ids.shape[0]),
        calibration_seqlen=int(ids.shape[1]),
        train_seconds=round(time.perf_counter() - t0, 2),
    )
    return books


def fit_codebooks(
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    signature: ModelSignature,
    config: MillionConfig,
    *,
    device: str | torch.device | None = None,
) -> MillionCodebooks:
    """k-means codebooks from collected keys/values (per layer ``(Hkv, tokens, D)``, see :func:`collect_kv`).

    Lets several settings (e.g. 4 and 2 bits) share one calibration pass.

    Returns:
        :class:`MillionCodebooks` (``meta`` holds the relative distortion of keys and values).
    """
    sig = signature
    m = config.subspaces_for(sig.head_dim)
    dsub = sig.head_dim // m
    kc = config.num_centroids
    dev = torch.device(device) if device is not None else keys[0].device
    if len(keys) != sig.num_layers:
        raise HfEffllmError(f"the model filled {len(keys)} cache layers but its config says {sig.num_layers}.")
    gen = torch.Generator().manual_seed(config.seed)
    out: dict[str, torch.Tensor] = {}
    distortion: dict[str, float] = {}
    for kind, per_layer in (("keys", keys), ("values", values)):
        # per layer: (Hkv, T, D) -> problems (G*M, P, DSUB)
        if config.scope == "shared":
            allx = torch.cat([x.reshape(-1, sig.head_dim) for x in per_layer], 0)[None]  # (1, L*H*T, D)
            groups = [_subsample(allx, config.max_points, gen)]
        elif config.scope == "layer":
            groups = [_subsample(x.reshape(1, -1, sig.head_dim), config.max_points, gen) for x in per_layer]
        else:
            groups = [_subsample(x, config.max_points, gen) for x in per_layer]
        books = []
        err = 0.0
        total = 0.0
        for x in groups:  # x: (G, P, D)
            g, p, _ = x.shape
            pts = x.to(dev).reshape(g, p, m, dsub).permute(0, 2, 1, 3).reshape(g * m, p, dsub)
            cent = kmeans(pts, kc, iters=config.kmeans_iters, seed=config.seed)
            _, dist = _assign(pts, cent, max(1, (1 << 24) // max(1, g * m * kc)))
            err += float(dist.sum())
            total += float(pts.square().sum())
            books.append(cent.reshape(g, m, kc, dsub).cpu())
        out[kind] = torch.stack(books)
        distortion[kind] = err / max(total, 1e-30)
    meta = {
        "relative_distortion_keys": round(distortion["keys"], 6),
        "relative_distortion_values": round(distortion["values"], 6),
    }
    return MillionCodebooks(config, sig, out["keys"], out["values"], meta=meta)
