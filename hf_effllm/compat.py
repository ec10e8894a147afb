"""Every difference between supported transformers versions (5.17 .. newest 5.x) is handled here, once.

* The KV cache argument of ``forward``/``generate`` and the output field were renamed from
  ``past_key_values`` to ``cache`` in later 5.x releases (the old name still works there but warns and will be
  removed). :data:`CACHE_KWARG` is the name the installed version wants and :func:`output_cache` reads it.
"""

from __future__ import annotations

from typing import Any

import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)
MIN_TRANSFORMERS = Version("5.17.0")


def _uses_cache_kwarg() -> bool:
    from transformers.utils import generic

    return hasattr(generic, "_rename_kwargs_for_bc")


CACHE_KWARG: str = "cache" if _uses_cache_kwarg() else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{CACHE_KWARG: cache}``: pass a cache to ``model(...)`` or ``model.generate(...)`` on any version.

    Example:
        >>> out = model(input_ids=ids, **cache_kwargs(my_cache))  # doctest: +SKIP
    """
    return {CACHE_KWARG: cache}


def output_cache(output: Any) -> Any:
    """The cache returned in a model output, whatever the installed version calls the field."""
    if CACHE_KWARG == "cache":
        return output.get("cache") if hasattr(output, "get") else output.cache
    return output.past_key_values


def add_optimizer_name(value: str) -> Any:
    """Make ``TrainingArguments(optim=value)`` validate: add ``value`` to transformers' ``OptimizerNames`` enum.

    ``TrainingArguments.__post_init__`` converts ``optim`` with ``OptimizerNames(optim)``, a closed enum, and the
    Trainer's optimizer handler registry (``trainer_optimizer._OPTIMIZER_HANDLERS``, identical in 5.17 and 5.24)
    is keyed by its members; there is no public way to add a name. This adds a real member (``list()``,
    ``OptimizerNames(value)``, ``OptimizerNames.<VALUE>`` and pickling all work), once: calling it again, or with
    a value transformers already has, returns the existing member. Tested in ``tests/muon/test_muon_trainer.py``.

    Args:
        value: the optimizer name, e.g. "muon".

    Returns:
        The ``OptimizerNames`` member.
    """
    from transformers.training_args import OptimizerNames

    existing = OptimizerNames._value2member_map_.get(value)
    if existing is not None:
        return existing
    if TRANSFORMERS_VERSION < MIN_TRANSFORMERS:
        raise RuntimeError(f"transformers {TRANSFORMERS_VERSION} is older than {MIN_TRANSFORMERS}.")
    name = value.upper()
    member = str.__new__(OptimizerNames, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = OptimizerNames
    if hasattr(OptimizerNames, "_sort_order_") or any(
        hasattr(m, "_sort_order_") for m in OptimizerNames._member_map_.values()
    ):
        member._sort_order_ = len(OptimizerNames._member_names_)  # Python >= 3.12
    type.__setattr__(OptimizerNames, name, member)
    OptimizerNames._member_map_[name] = member
    OptimizerNames._value2member_map_[value] = member
    OptimizerNames._member_names_.append(name)
    return member


def save_state_dict_names_as_is(model: Any) -> None:
    """Make ``save_pretrained`` write the model's state-dict names unchanged.

    transformers 5 converts some checkpoints while loading (e.g. per-expert ``w1``/``w3`` into a stacked
    ``gate_up_proj``) and applies the reverse conversion when saving, with patterns that also match names derived
    from them (``gate_up_proj_spqr.0.qweight`` in 5.17, where it then tries to chunk a packed 1-D tensor). A model
    whose modules hf-effllm replaced is saved in its own format, so the reverse conversion is turned off by giving
    the model an empty conversion list (``_weight_conversions``, read by ``revert_weight_conversion`` in 5.17 .. 5.24;
    ``None`` there means "use the architecture's default mapping").
    """
    model._weight_conversions = []


def mark_weights_initialized(module: Any) -> None:
    """Make transformers' missing-weight initialisation skip ``module`` (5.17 .. 5.24 check ``_is_hf_initialized``).

    Needed where hf-effllm replaced a module's parameters (SpQR's packed MoE experts): the model's
    ``_init_weights`` would otherwise read the parameters that are gone (``module.gate_up_proj``).
    """
    module._is_hf_initialized = True
