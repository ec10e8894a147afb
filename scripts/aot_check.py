"""Compile a Triton kernel ahead of time for an NVIDIA target, without a GPU (a development tool).

It runs the whole Triton pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas) for
``--arch`` (90 = Hopper, the H200), so compiler failures, register spills and shared-memory overflows are found
on a CPU-only machine. Run it with the Triton version of the GPU machine, e.g. in a venv with triton==3.6.0:

    python scripts/aot_check.py kernels.million:_million_codes_kernel \
        'q_ptr=*bf16' ... 'BLOCK_N=64' --num-warps 4

Arguments are ``name=type`` (``*bf16``, ``*fp16``, ``*fp32``, ``*u8``, ``*i32``, ``i32``, ``i64``, ``fp32``) or
``name=value`` for constexpr parameters (ints, ``True``/``False``). Unnamed parameters are an error.
"""

from __future__ import annotations

import argparse
import importlib
import sys

TYPES = {"*bf16", "*fp16", "*fp32", "*u8", "*i8", "*i16", "*i32", "*i64", "i1", "i32", "i64", "fp32"}


def _ptxas_usage(ptx: str, arch: int) -> str:
    """Registers and spills as reported by the bundled ptxas (``-v``)."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(arch)
    except TypeError:  # older triton
        ptxas = get_ptxas()
    path = getattr(ptxas, "path", ptxas)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        r = subprocess.run(
            [path, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", "/dev/null"], capture_output=True, text=True
        )
    lines = [ln.split("info    : ")[-1] for ln in (r.stdout + r.stderr).splitlines() if "Used" in ln or "spill" in ln]
    return "; ".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kernel", help="module:function of the @triton.jit kernel (module importable from the repo)")
    p.add_argument("args", nargs="*", help="name=type or name=constexpr-value for every parameter")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--num-stages", type=int, default=3)
    p.add_argument("--ptx", action="store_true", help="print the PTX")
    p.add_argument(
        "--div16",
        default="",
        help="comma-separated parameters known to be multiples of 16 (pointers: 16-byte aligned), as the JIT "
        "specializes them at launch",
    )
    a = p.parse_args(argv)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod_name, fn_name = a.kernel.split(":")
    fn = getattr(importlib.import_module(mod_name), fn_name)
    given = dict(kv.split("=", 1) for kv in a.args)
    sig, const = {}, {}
    for name in fn.arg_names:
        if name not in given:
            p.error(f"parameter {name!r} has no type or value")
        v = given.pop(name)
        if v in TYPES or v.startswith("tensordesc<"):  # e.g. tensordesc<bf16[1, 1, 64, 128]>
            sig[name] = v
        else:
            sig[name] = "constexpr"
            const[name] = {"True": True, "False": False}.get(v)
            if const[name] is None:
                const[name] = float(v) if "." in v else int(v)
    if given:
        p.error(f"unknown parameters: {sorted(given)}")
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in filter(None, a.div16.split(","))}
    src = ASTSource(fn, sig, const, attrs)
    opts = {"num_warps": a.num_warps, "num_stages": a.num_stages}
    k = triton.compile(src, target=GPUTarget("cuda", a.arch, 32), options=opts)
    meta = k.metadata
    ptx = k.asm["ptx"]
    print(
        f"{fn_name}: triton {triton.__version__} sm_{a.arch} warps={a.num_warps} stages={a.num_stages} shared={meta.shared} B"
    )
    print(_ptxas_usage(ptx, a.arch))
    if a.ptx:
        print(ptx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
