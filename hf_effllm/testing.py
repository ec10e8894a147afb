"""Test helpers: tiny random-weight models for every architecture the project supports, and gloo process groups
confined to the loopback interface.

Example:
    >>> model = tiny_model("llama")  # doctest: +SKIP
    >>> model(input_ids=torch.randint(0, 256, (1, 16))).logits.shape  # doctest: +SKIP
    torch.Size([1, 16, 256])
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import torch

from .errors import HfEffllmError

_COMMON: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {"sliding_window": None},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
    },
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16},
    "deepseek_v3": {
        "num_key_value_heads": 4,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "rope_interleave": True,
    },
}
TINY_MODEL_TYPES: tuple[str, ...] = (*TINY_CONFIGS, "llava")
CAUSAL_LM_TYPES: tuple[str, ...] = tuple(TINY_CONFIGS)
MOE_TYPES: tuple[str, ...] = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


def tiny_config(model_type: str, **overrides: Any):
    """A ``PretrainedConfig`` of a tiny model of ``model_type`` (see :data:`TINY_MODEL_TYPES`)."""
    from transformers import AutoConfig

    if model_type == "llava":
        text = tiny_config("llama")
        vision = {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 32,
        }
        kwargs = {"text_config": text.to_dict(), "vision_config": vision, "image_token_index": 255}
        kwargs.update(overrides)
        return AutoConfig.for_model("llava", **kwargs)
    if model_type not in TINY_CONFIGS:
        raise HfEffllmError(f"model_type={model_type!r} has no tiny config; use one of {list(TINY_MODEL_TYPES)}.")
    kwargs = {**_COMMON, **TINY_CONFIGS[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A random-weight tiny model of ``model_type`` in eval mode, deterministic for a given ``seed``.

    Causal LMs are built with ``AutoModelForCausalLM``; "llava" with ``AutoModelForImageTextToText``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if model_type == "llava" else AutoModelForCausalLM
    return auto.from_config(config, dtype=dtype).eval()


def spqr_layer(
    out: int,
    inp: int,
    *,
    bits: int = 3,
    group_size: int = 16,
    permutation: str = "act_order",
    threshold: float = 0.1,
    bias: bool = True,
    seed: int = 0,
):
    """A random SpQR-quantized layer ``(SpQRLinear, SpQRResult)`` of shape (out, inp): Gaussian weights with 2%
    heavy-tailed entries (so outliers appear), quantized with the Hessian of 256 random inputs."""
    from .quant.spqr import SpQRConfig, SpQRLinear, spqr_quantize_matrix

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    w[torch.rand(w.shape, generator=g) < 0.02] *= 8
    x = torch.randn(256, inp, generator=g)
    cfg = SpQRConfig(bits=bits, group_size=group_size, permutation=permutation, outlier_threshold=threshold)
    res = spqr_quantize_matrix(w, 2 * x.T @ x / 256, cfg)
    b = torch.randn(out, generator=g) if bias else None
    return SpQRLinear.from_packed(res.tensors, cfg, in_features=inp, bias=b), res


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a test's process-group rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_gloo_env(port: int | None = None) -> dict[str, str]:
    """Environment variables that keep a gloo process group on this machine's loopback interface.

    Without ``GLOO_SOCKET_IFNAME`` gloo connects its ranks through the address the host name resolves to, which on
    sandboxed machines can be an interface that drops connections: the rendezvous then waits for its whole timeout.

    Example:
        >>> env = loopback_gloo_env(29500)
        >>> env["MASTER_ADDR"], env["MASTER_PORT"]
        ('127.0.0.1', '29500')
    """
    names = [name for _, name in socket.if_nameindex()]
    loopback = next((n for n in names if n.startswith("lo")), "lo")
    port = free_port() if port is None else port
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": loopback}


def spawn_gloo(fn: Callable[..., None], args: tuple = (), *, nprocs: int = 2, timeout: float = 300.0) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes with :func:`loopback_gloo_env` set; fail after
    ``timeout`` seconds instead of hanging.

    ``fn`` calls ``torch.distributed.init_process_group("gloo", rank=rank, world_size=nprocs)`` itself. A child that
    raises re-raises here (``torch.multiprocessing.ProcessRaisedException``); on timeout every child is killed and
    ``TimeoutError`` names the ranks still running.
    """
    import torch.multiprocessing as mp

    if nprocs < 1:
        raise HfEffllmError(f"nprocs={nprocs} must be at least 1.")
    if timeout <= 0:
        raise HfEffllmError(f"timeout={timeout} must be positive (seconds).")
    saved = dict(os.environ)
    os.environ.update(loopback_gloo_env())
    try:
        ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            alive = [rank for rank, p in enumerate(ctx.processes) if p.is_alive()]
            for p in ctx.processes:
                p.kill()
            for p in ctx.processes:
                p.join(5)
            raise TimeoutError(f"ranks {alive} of {nprocs} were still running after timeout={timeout} s; killed.")


def end_gloo_worker() -> None:
    """End a gloo test worker whose results are written: wait for every rank, then leave without tearing down.

    Tearing a gloo process group down can deadlock in torch itself: ``~ProcessGroupGloo`` runs with the GIL held and
    waits for a worker thread that is still releasing a finished all-gather's tensors, which needs the GIL
    (pytorch/pytorch#190489; seen here about once in twenty DDP runs on a loaded 2-core machine). A test checks its
    ranks' numbers, not torch's teardown, so after a barrier this flushes the standard streams and calls
    ``os._exit(0)``. Call it last, after the results are on disk.
    """
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
