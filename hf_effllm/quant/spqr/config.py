"""``SpQRConfig``: the quantization config of SpQR (Dettmers et al. 2023), registered as ``"hf_effllm_spqr"``.

Example:
    >>> import hf_effllm
    >>> cfg = hf_effllm.SpQRConfig(bits=3, nsamples=32, seqlen=512)
    >>> cfg.quant_method
    'hf_effllm_spqr'
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from ...errors import HfEffllmError

METHOD_NAME = "hf_effllm_spqr"
FORMAT_VERSION = 1
PERMUTATIONS = ("act_order", "identity")

# Fields a ``dynamic`` rule may set for the modules it matches (the stored format and the algorithm, per matrix).
DYNAMIC_FIELDS = (
    "bits",
    "group_size",
    "stats_group_size",
    "stats_bits",
    "outlier_threshold",
    "permutation",
    "percdamp",
)

# Attributes written to config.json; the calibration data and tokenizer are objects and stay out of it.
_NOT_SERIALIZED = ("dataset", "tokenizer")


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
        raise HfEffllmError(f"{name}={value!r} is not allowed; use {allowed}.")


class SpQRConfig(QuantizationConfigMixin):
    r"""Settings of SpQR quantization: bi-level groups, GPTQ error feedback and 16-bit outliers.

    Pass it to ``from_pretrained(path, quantization_config=SpQRConfig(...))`` to calibrate and quantize a float
    checkpoint after loading, or to :func:`hf_effllm.quantize_spqr` for a model in memory. A saved SpQR checkpoint
    carries it in ``config.json`` (with the per-layer records) and loads with a plain ``from_pretrained(dir)``.

    Args:
        bits: bits per weight code (2..8).
        group_size: input columns per first-level group (one scale and zero-point per output row and group).
        stats_group_size: output rows per second-level group (the first-level statistics are quantized over it).
        stats_bits: bits of the quantized first-level scales and zero-points (2..8).
        outlier_threshold: relative threshold of the outlier tests (the paper's tau); ``float("inf")`` disables
            outliers; 0 is not allowed.
        permutation: ``"act_order"`` (columns by decreasing Hessian diagonal) or ``"identity"``.
        percdamp: dampening added to the Hessian diagonal, as a fraction of its mean (> 0; default 0.01, which
            beat 1.0 on SmolLM2 for GPTQ and SpQR at 3.6 and 4.6 bits: benchmarks/results/spqr_quality_damp001.md).
        blocksize: columns per lazy GPTQ batch (the paper and GPTQ use 128).
        dataset: calibration text (list of strings or a ``datasets.Dataset`` with a "text" column); ``None`` is the
            embedded corpus's training split. Not written to config.json.
        tokenizer: tokenizer for ``dataset``; ``None`` loads the model's own. Not written to config.json.
        nsamples: calibration windows.
        seqlen: tokens per calibration window.
        true_sequential: within a decoder layer, quantize the linears in call order, each seeing the inputs produced
            by the already-quantized ones (more accurate, one layer forward per group of linears sharing an input).
        modules_to_not_convert: module names (or name suffixes) kept in float; ``None`` keeps the output head
            and one-output gate layers (qwen2_moe's ``shared_expert_gate``).
        dynamic: per-module settings, ``{regex: {field: value}}``: the first pattern that ``re.search``-es a
            module's full name (``"model.layers.3.self_attn.v_proj"``; stacked MoE experts:
            ``"model.layers.3.mlp.experts.down_proj_spqr.5"``) gives that module these values of ``bits``,
            ``group_size``, ``stats_group_size``, ``stats_bits``, ``outlier_threshold``, ``permutation`` or
            ``percdamp``; other modules use the fields above. Written to config.json, so a saved model reloads each
            module in its own format. E.g. ``{r"\.v_proj$": {"bits": 4}}``: on SmolLM2-135M v_proj alone costs
            +5.1% perplexity at the 3.6-bit setting against +0.7% for q_proj, with a third of the parameters
            (``benchmarks/results/spqr_quality_reduced_cpu_sensitivity.md``).
        seed: seed of the calibration windows (and of the tuning order).
        tune_epochs: after each decoder layer is quantized, passes over the calibration windows that tune what is
            stored in float (second-level statistics, outlier values) and the layer's norm weights and biases so
            that the layer's output matches the float model's (codes fixed, bits unchanged); 0 (default) is plain
            SpQR. Costs about ``3 * tune_epochs`` extra layer forwards per window and a second activation buffer.
        tune_lr: Adam step of that tuning for the statistics and outliers, relative to their mean magnitude.
        tune_norm_lr: Adam step for the norm weights and biases (absolute).
        layers: per-layer records filled by quantization (shapes, outlier counts, average bits); needed to rebuild
            the modules of a saved checkpoint. Leave it ``None``.
        avg_bits: average stored bits per quantized parameter over all layers (filled by quantization).
        format_version: version of the packed format (filled by quantization; checked when loading).

    Raises:
        HfEffllmError: a field out of range, e.g. ``bits=1``, ``group_size=0``, ``permutation="random"``.
    """

    def __init__(
        self,
        bits: int = 3,
        group_size: int = 16,
        stats_group_size: int = 16,
        stats_bits: int = 3,
        outlier_threshold: float = 0.2,
        permutation: str = "act_order",
        percdamp: float = 0.01,
        blocksize: int = 128,
        dataset: Any = None,
        tokenizer: Any = None,
        nsamples: int = 128,
        seqlen: int = 2048,
        true_sequential: bool = True,
        modules_to_not_convert: list[str] | None = None,
        dynamic: dict[str, dict[str, Any]] | None = None,
        seed: int = 0,
        tune_epochs: int = 0,
        tune_lr: float = 1e-3,
        tune_norm_lr: float = 1e-4,
        layers: dict[str, dict[str, Any]] | None = None,
        avg_bits: float | None = None,
        format_version: int = FORMAT_VERSION,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        if kwargs:
            raise HfEffllmError(f"SpQRConfig got unknown fields {sorted(kwargs)}; see help(SpQRConfig).")
        self.quant_method = METHOD_NAME
        self.bits = bits
        self.group_size = group_size
        self.stats_group_size = stats_group_size
        self.stats_bits = stats_bits
        self.outlier_threshold = outlier_threshold
        self.permutation = permutation
        self.percdamp = percdamp
        self.blocksize = blocksize
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.nsamples = nsamples
        self.seqlen = seqlen
        self.true_sequential = true_sequential
        self.modules_to_not_convert = modules_to_not_convert
        self.dynamic = dynamic
        self.seed = seed
        self.tune_epochs = tune_epochs
        self.tune_lr = tune_lr
        self.tune_norm_lr = tune_norm_lr
        self.layers = layers
        self.avg_bits = avg_bits
        self.format_version = format_version
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; raises :class:`HfEffllmError` naming the field, the value and what is allowed."""
        _check_int("bits", self.bits, 2, 8)
        _check_int("group_size", self.group_size, 1)
        _check_int("stats_group_size", self.stats_group_size, 1)
        _check_int("stats_bits", self.stats_bits, 2, 8)
        _check_int("blocksize", self.blocksize, 1)
        _check_int("nsamples", self.nsamples, 1)
        _check_int("seqlen", self.seqlen, 1)
        _check_int("seed", self.seed, 0)
        _check_int("tune_epochs", self.tune_epochs, 0)
        for name in ("tune_lr", "tune_norm_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise HfEffllmError(f"{name}={v!r} is not allowed; use a positive finite number (e.g. 1e-3).")
        thr = self.outlier_threshold
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or math.isnan(thr) or thr <= 0:
            raise HfEffllmError(
                f"outlier_threshold={thr!r} is not allowed; use a positive number (0.1..1 is typical) "
                "or float('inf') to disable outliers."
            )
        self.outlier_threshold = float(thr)
        if self.permutation not in PERMUTATIONS:
            raise HfEffllmError(f"permutation={self.permutation!r} is not allowed; use one of {list(PERMUTATIONS)}.")
        pd = self.percdamp
        if isinstance(pd, bool) or not isinstance(pd, (int, float)) or not math.isfinite(pd) or pd <= 0:
            raise HfEffllmError(f"percdamp={pd!r} is not allowed; use a positive finite number (default 0.01).")
        if not isinstance(self.true_sequential, bool):
            raise HfEffllmError(f"true_sequential={self.true_sequential!r} must be True or False.")
        mods = self.modules_to_not_convert
        if mods is not None and (isinstance(mods, str) or not all(isinstance(m, str) for m in mods)):
            raise HfEffllmError(f"modules_to_not_convert={mods!r} must be a list of module names or None.")
        if self.format_version != FORMAT_VERSION:
            raise HfEffllmError(
                f"format_version={self.format_version!r}: this hf-effllm reads SpQR format version {FORMAT_VERSION}; "
                "re-quantize the model or install the hf-effllm version that wrote it."
            )
        self._check_dynamic()
        if self.layers is not None and not isinstance(self.layers, dict):
            raise HfEffllmError(f"layers={type(self.layers).__name__} must be a dict of per-layer records or None.")

    def _check_dynamic(self) -> None:
        dyn = self.dynamic
        if dyn is None:
            return
        if not isinstance(dyn, dict):
            raise HfEffllmError(f"dynamic={dyn!r} must be a dict {{regex: {{field: value}}}} or None.")
        rules = {}
        for pattern, fields in dyn.items():
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise HfEffllmError(f"dynamic pattern {pattern!r} is not a regular expression: {e}.") from None
            if not isinstance(fields, dict) or not fields:
                raise HfEffllmError(f"dynamic[{pattern!r}]={fields!r} must be a non-empty dict of fields.")
            unknown = sorted(set(fields) - set(DYNAMIC_FIELDS))
            if unknown:
                raise HfEffllmError(f"dynamic[{pattern!r}] sets {unknown}; a rule may set only {list(DYNAMIC_FIELDS)}.")
            if fields.get("outlier_threshold") in ("inf", "Infinity"):  # as read back from config.json
                fields = {**fields, "outlier_threshold": float("inf")}  # a copy: the caller's dict stays as given
            try:
                self._derived(fields).post_init()
            except HfEffllmError as e:
                raise HfEffllmError(f"dynamic[{pattern!r}]: {e}") from None
            rules[pattern] = fields
        self.dynamic = rules

    def _derived(self, fields: dict[str, Any]) -> SpQRConfig:
        out = copy.copy(self)
        out.dynamic = None
        for k, v in fields.items():
            setattr(out, k, v)
        return out

    def for_module(self, name: str) -> SpQRConfig:
        r"""The config that quantizes (and describes the stored format of) module ``name``: this one with the fields
        of the first ``dynamic`` pattern that matches the name, or this one itself.

        Example:
            >>> cfg = SpQRConfig(bits=3, dynamic={r"\.v_proj$": {"bits": 4}})
            >>> cfg.for_module("layers.0.self_attn.v_proj").bits, cfg.for_module("layers.0.mlp.up_proj").bits
            (4, 3)
        """
        for pattern, fields in (self.dynamic or {}).items():
            if re.search(pattern, name):
                return self._derived(fields)
        return self

    @property
    def enable_outliers(self) -> bool:
        """Whether outliers are searched for (``outlier_threshold`` is finite)."""
        return math.isfinite(self.outlier_threshold)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable fields (the calibration ``dataset`` and ``tokenizer`` objects are left out)."""
        out = {k: v for k, v in self.__dict__.items() if k not in _NOT_SERIALIZED}
        if not math.isfinite(out["outlier_threshold"]):
            out["outlier_threshold"] = "inf"  # JSON has no infinity
        if out.get("dynamic"):
            out["dynamic"] = {
                p: {k: ("inf" if k == "outlier_threshold" and not math.isfinite(v) else v) for k, v in f.items()}
                for p, f in out["dynamic"].items()
            }
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in out.items()}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Rebuild from :meth:`to_dict` output (as read from config.json)."""
        d = dict(config_dict)
        if d.get("outlier_threshold") in ("inf", "Infinity"):
            d["outlier_threshold"] = float("inf")
        return super().from_dict(d, return_unused_kwargs=return_unused_kwargs, **kwargs)
