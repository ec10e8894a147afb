"""hf-effllm."""
