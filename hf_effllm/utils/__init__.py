"""Small shared helpers (atomic file output, device and dtype checks)."""

from .io import atomic_dir, atomic_write_text, prepare_output_dir
from .torch_utils import resolve_device, resolve_dtype

__all__ = ["atomic_dir", "atomic_write_text", "prepare_output_dir", "resolve_device", "resolve_dtype"]
