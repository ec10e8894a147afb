"""Device and dtype checks shared by every method."""

from __future__ import annotations

import torch

from ..errors import HfEffllmError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None, *, arg_name: str = "device") -> torch.device:
    """Turn ``None``/"auto"/"cpu"/"cuda"/"cuda:N" into a ``torch.device``, checking that it exists.

    ``None`` and "auto" pick CUDA when available, else the CPU.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise HfEffllmError(f"{arg_name}={device!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HfEffllmError(f"{arg_name}={device!r} but no CUDA GPU is available here; use 'cpu'.")
    if dev.type not in ("cpu", "cuda"):
        raise HfEffllmError(f"{arg_name}={device!r} is not supported; use 'cpu' or 'cuda'.")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, *, arg_name: str = "dtype") -> torch.dtype:
    """Turn a dtype name into a ``torch.dtype``; ``None``/"auto" is float32 on the CPU and bfloat16 on CUDA."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise HfEffllmError(f"{arg_name}={dtype} is not supported; use float32, float16 or bfloat16.")
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise HfEffllmError(f"{arg_name}={dtype!r} is not a known dtype; use one of {sorted(set(_DTYPES))}.") from None
