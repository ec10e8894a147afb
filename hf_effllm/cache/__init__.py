"""KV caches of hf-effllm (one sub-package per method)."""
