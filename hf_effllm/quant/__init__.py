"""Weight quantization methods (one sub-package per method)."""
