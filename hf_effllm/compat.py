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
