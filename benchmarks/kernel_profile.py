"""Run one decode kernel a few times so that Nsight Compute (``ncu``) can profile it; GPU only.

Targets (``--target``):

* ``spqr-stream`` / ``spqr-split`` / ``spqr-flat``: ``spqr_octet_stream`` / ``spqr_octet_split`` /
  ``spqr_octet_flat`` (with its prep kernel; profile the kernel ``spqr_octet_flat``) on the SpQR 3-bit layer of
  ``benchmarks/spqr_speed.py`` (``--shape 4096x11008``: in x out), ``--rows`` activation rows (bf16);
* ``million-lut``: the MILLION CUDA codes kernel (``million_codes_lut`` at the default dispatch of batch 16) at the
  Llama-3-8B shape of ``benchmarks/million_speed.py``, ``--batch`` sequences of ``--tokens`` cached tokens, 4 bits.

The first call is checked against the PyTorch reference (printed), then the kernel runs ``--calls`` more times, so
``ncu -s 1 -c 1`` profiles a warm launch. ``benchmarks/gpu_batch.sh ncu_profiles`` runs it under ``ncu`` and turns
the report into a short summary with ``benchmarks/ncu_summary.py``.

Usage (repo root, on the GPU machine)::

    ncu --clock-control none --set full -k regex:spqr_octet_split -s 1 -c 1 -o split16 \\
        python3 benchmarks/kernel_profile.py --target spqr-split --rows 16
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("hf_effllm") is None:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

TARGETS = ("spqr-stream", "spqr-split", "spqr-flat", "million-lut")


def _spqr(kind: str, shape: str, rows: int, calls: int, dev: torch.device) -> None:
    from hf_effllm.kernels.spqr import spqr_matmul_reference
    from hf_effllm.kernels.spqr_flat import spqr_octet_flat
    from hf_effllm.kernels.spqr_octet import octet_layout, spqr_octet_split, spqr_octet_stream
    from spqr_speed import make_layer

    from hf_effllm.benchmarking import rel_err

    inp, out = (int(v) for v in shape.lower().split("x"))
    layer = make_layer(inp, out, dev, 0.2)
    t, meta = layer.packed_tensors(), layer.packed_meta()
    lay = octet_layout(t, **meta)
    kern = {"split": spqr_octet_split, "stream": spqr_octet_stream, "flat": spqr_octet_flat}[kind]
    x = torch.randn(rows, inp, device=dev, dtype=torch.bfloat16)
    err = rel_err(kern(x, lay), spqr_matmul_reference(x.float(), t, **meta))
    print(f"spqr_octet_{kind} {inp}->{out} rows {rows}: rel_err vs the fp32 reference {err:.2e}", flush=True)
    for _ in range(calls):
        kern(x, lay)


def _million(batch: int, tokens: int, calls: int, dev: torch.device) -> None:
    from hf_effllm.kernels.million import million_attention, million_attention_reference
    from million_speed import HKV, HQ, WINDOW, D, K, _cuda_codes_call, _inputs

    from hf_effllm.benchmarking import rel_err

    q, ck, cv, cbk, cbv, rk, rv = _inputs(batch, HQ, HKV, tokens, WINDOW, D, D // 2, K, torch.bfloat16, dev, seed=1)
    out = million_attention(q, ck, cv, cbk, cbv, rk, rv, scale=D**-0.5, variant="cuda")
    ref = million_attention_reference(
        q.float(), ck, cv, cbk.float(), cbv.float(), rk.float(), rv.float(), scale=D**-0.5
    )
    err = rel_err(out, ref)
    print(f"million_attention (cuda) batch {batch} x {tokens} tokens: rel_err vs the reference {err:.2e}", flush=True)
    call = _cuda_codes_call(q, ck, cv, cbk, cbv, D, None)
    for _ in range(calls):
        call()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", choices=TARGETS, required=True)
    p.add_argument("--shape", default="4096x11008", help="SpQR layer, in x out (default 4096x11008)")
    p.add_argument("--rows", type=int, default=1, help="SpQR activation rows (default 1)")
    p.add_argument("--batch", type=int, default=16, help="MILLION sequences (default 16)")
    p.add_argument("--tokens", type=int, default=32768, help="MILLION cached tokens (default 32768)")
    p.add_argument("--calls", type=int, default=3, help="launches after the checked one (default 3)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_profile.py needs a CUDA GPU")
    dev = torch.device("cuda")
    if a.target.startswith("spqr"):
        _spqr(a.target.split("-")[1], a.shape, a.rows, a.calls, dev)
    else:
        _million(a.batch, a.tokens, a.calls, dev)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
