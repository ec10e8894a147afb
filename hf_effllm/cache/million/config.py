"""``MillionConfig``: the settings of a MILLION product-quantized KV cache and of its codebook training."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ...errors import HfEffllmError

Scope = Literal["layer", "head", "shared"]
_SCOPES = ("layer", "head", "shared")


def _is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` would silently mean 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class MillionConfig:
    """How keys and values are product-quantized, and how the codebooks are trained.

    Each head vector of ``head_dim`` elements is split into ``num_subspaces`` sub-vectors; each sub-vector is
    replaced by the index of its nearest of ``2**nbits`` centroids. Bits per element: ``num_subspaces * nbits /
    head_dim`` (4 at the defaults; 2 with ``num_subspaces = head_dim // 4``).

    Example:
        >>> MillionConfig(num_subspaces=16).bits_per_element(64)
        2.0
    """

    num_subspaces: int | None = field(
        default=None, metadata={"help": "sub-vectors per head vector (M); must divide head_dim. None: head_dim // 2"}
    )
    nbits: int = field(default=8, metadata={"help": "bits per code: 2**nbits centroids per subspace (1..8)"})
    residual_length: int = field(
        default=128, metadata={"help": "most recent tokens kept in full precision (0: everything is encoded)"}
    )
    sink_length: int = field(
        default=4,
        metadata={
            "help": "first tokens of each sequence kept in full precision forever (attention sinks); the tokens "
            "between them and the recent window are encoded. 0: none (the public MILLION setting). 4 removes most "
            "of the long-context perplexity gap (README, MILLION section)"
        },
    )
    scope: Scope = field(
        default="layer",
        metadata={
            "help": "codebook sharing: 'layer' (one per layer, K and V separate), 'head' (one per layer and KV "
            "head), 'shared' (one for all layers, K and V separate: the public MILLION setting)"
        },
    )
    kmeans_iters: int = field(default=20, metadata={"help": "k-means (Lloyd) iterations"})
    calibration_samples: int = field(default=8, metadata={"help": "calibration windows drawn from the train split"})
    calibration_seqlen: int = field(
        default=2048,
        metadata={"help": "tokens per calibration window; cover the positions you will decode at (keys carry RoPE)"},
    )
    max_points: int = field(
        default=65536, metadata={"help": "k-means points per codebook (a random subset when more are collected)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the k-means initialisation and subsampling"})

    def __post_init__(self) -> None:
        if self.num_subspaces is not None and (not _is_int(self.num_subspaces) or self.num_subspaces < 1):
            raise HfEffllmError(f"num_subspaces={self.num_subspaces!r} must be a positive integer or None.")
        if not _is_int(self.nbits) or not 1 <= self.nbits <= 8:
            raise HfEffllmError(f"nbits={self.nbits!r} is out of range; use 1..8 (codes are stored as uint8).")
        if not _is_int(self.residual_length) or self.residual_length < 0:
            raise HfEffllmError(f"residual_length={self.residual_length!r} must be an integer >= 0.")
        if not _is_int(self.sink_length) or self.sink_length < 0:
            raise HfEffllmError(
                f"sink_length={self.sink_length!r} must be an integer >= 0 (e.g. 4: the first 4 tokens stay exact)."
            )
        if self.scope not in _SCOPES:
            raise HfEffllmError(f"scope={self.scope!r} is not known; use one of {list(_SCOPES)}.")
        for name in ("kmeans_iters", "calibration_samples", "calibration_seqlen", "max_points"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise HfEffllmError(f"{name}={value!r} must be an integer >= 1.")

    @property
    def num_centroids(self) -> int:
        """Centroids per subspace, ``2**nbits``."""
        return 1 << self.nbits

    def subspaces_for(self, head_dim: int) -> int:
        """``num_subspaces`` resolved for a head size, checked to divide it.

        Raises:
            HfEffllmError: if ``num_subspaces`` does not divide ``head_dim``.
        """
        m = self.num_subspaces if self.num_subspaces is not None else max(1, head_dim // 2)
        if head_dim % m:
            divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0]
            raise HfEffllmError(
                f"num_subspaces={m} does not divide head_dim={head_dim}; use a divisor such as {divisors[-6:]} "
                f"({head_dim // 2} for 4 bits, {head_dim // 4} for 2 bits at nbits=8)."
            )
        return m

    def bits_per_element(self, head_dim: int) -> float:
        """Storage bits per key/value element for this head size (codes only)."""
        return self.subspaces_for(head_dim) * self.nbits / head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MillionConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
