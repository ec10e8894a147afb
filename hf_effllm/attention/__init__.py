"""Attention methods of hf-effllm (each sub-package registers its attention function on import)."""
