"""Triton kernels of hf-effllm, importable as ``hf_effllm.kernels``.

Each kernel module holds the Triton kernel, a host wrapper that validates shapes and dtypes, and a plain
PyTorch reference of the same function (used by the tests, as the CPU fallback and as benchmark baseline).
"""
