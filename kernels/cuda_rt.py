"""Run-time compiled CUDA kernels: the pieces shared by ``kernels.million_cuda`` and ``kernels.spqr_cuda``.

* :func:`available`: whether this torch compiles CUDA source at run time (NVRTC through
  ``torch.cuda._compile_kernel``, torch >= 2.8) and a GPU is present;
* :func:`smem_limit`: the dynamic shared memory a block may opt in to; :func:`capability`, :func:`sm_count`;
* :func:`compiled`: compile a source once per (key, device) and keep the kernel;
* ``DEVICE_COMMON``: device helpers shared by the sources (types, ``cp.async``, ``mma.m16n8k16``), and
  :func:`render`, which bakes a source's constants in and inserts them;
* :func:`launch`: launch through a cached binding of the driver's ``cuLaunchKernel`` (falling back to the kernel
  object's own call).

Example:
    >>> kernel = compiled(("my", 1), device, lambda: src, "my_kernel")  # doctest: +SKIP
    >>> launch(kernel, (blocks, 1, 1), 128, 0, [x, y], [n])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import struct
import threading
from collections.abc import Callable
from typing import Any

import torch

from hf_effllm.errors import HfEffllmError

__all__ = [
    "DEVICE_COMMON",
    "available",
    "capability",
    "cdiv",
    "compiled",
    "launch",
    "on_device",
    "render",
    "sm_count",
    "smem_limit",
]

# CUDA pieces both kernel sources use (inserted where a source has the line ``//@COMMON``, after its macros, since
# ``mma16816`` reads IS_BF16 and the activation helpers ACT_BF16): integer types, cp.async with zero fill, fp16 pair
# helpers, conversions of the activation dtype, and the m16n8k16 tensor-core product.
DEVICE_COMMON = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

// 16 bytes global -> shared without registers (bytes = 0: zero fill, nothing read)
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
    const u32 d = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(d), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

// fp16 pair arithmetic, byte permutes, and an fp16 value as a float
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}
__device__ __forceinline__ float half_f(u16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}

// values of the activation dtype (ACT_BF16: bf16, else fp16) to and from fp32, and an fp16 pair in that dtype
__device__ __forceinline__ float act_f(u16 v) {
#if ACT_BF16
    return __uint_as_float(((u32)v) << 16);
#else
    return half_f(v);
#endif
}
__device__ __forceinline__ u16 act_from_f(float f) {
    u16 v;
#if ACT_BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
#endif
    return v;
}
__device__ __forceinline__ u32 to_act2(u32 h) {
#if ACT_BF16
    float lo, hi;
    u32 d;
    asm("{ .reg .b16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }" : "=f"(lo), "=f"(hi) : "r"(h));
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
#else
    return h;
#endif
}

// c += a b on the tensor cores: a 16x16 (4 registers of pairs), b 16x8 (2), c 16x8 fp32; IS_BF16 picks the type
__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
#if IS_BF16
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
#endif
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
"""


def render(template: str, **values: int | bool | str) -> str:
    """A kernel source from ``template``: each ``{NAME}`` replaced by ``values[NAME]`` (bools as 1 / 0, like
    Triton's ``constexpr`` baked in) and the line ``//@COMMON`` by :data:`DEVICE_COMMON`."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", str(int(value)) if isinstance(value, bool) else str(value))
    return template.replace("//@COMMON", DEVICE_COMMON)


def available() -> bool:
    """Whether this torch can compile CUDA source at run time (NVRTC through ``torch.cuda._compile_kernel``)."""
    return torch.cuda.is_available() and hasattr(torch.cuda, "_compile_kernel")


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers (grid and tile counts)."""
    return -(a // -b)


_HERE = contextlib.nullcontext()  # reusable: on_device's answer when nothing is to switch


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)``, or a no-op when it is already current (no device switch on the hot path)."""
    index = device.index
    return _HERE if index is None or index == torch.cuda.current_device() else torch.cuda.device(device)


def sm_count(device: torch.device) -> int:
    """The number of SMs of ``device`` (looked up once per device)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of ``device`` (looked up once per device)."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def smem_limit(device: torch.device) -> int:
    """The most dynamic shared memory a block of ``device`` may opt in to (227 KiB on the H100/H200)."""
    return _smem_limit(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 227 * 1024))


_KERNELS: dict[tuple, Any] = {}


def compiled(key: tuple, device: torch.device, source: Callable[[], str], name: str, smem: int = 0) -> Any:
    """The kernel ``name`` of ``source()`` compiled for ``device``; generated and compiled on the first call for
    ``key`` only (a dict lookup afterwards). ``smem``: the dynamic shared memory its launches use (opted in when
    above the default 48 KiB)."""
    full = (*key, name, device.index if device.index is not None else torch.cuda.current_device())
    kernel = _KERNELS.get(full)
    if kernel is None:
        with torch.cuda.device(device):
            kernel = torch.cuda._compile_kernel(source(), name)
            if smem >= 48 * 1024:
                if not hasattr(kernel, "set_shared_memory_config"):
                    raise HfEffllmError(
                        f"this torch ({torch.__version__}) cannot give a run-time compiled kernel {smem} bytes of "
                        f"shared memory; use a Triton variant."
                    )
                kernel.set_shared_memory_config(smem)
        kernel = _KERNELS[full] = kernel
    return kernel


@functools.lru_cache(maxsize=1)
def _cu_launch_kernel() -> Any:
    """The driver's ``cuLaunchKernel``, bound once. torch's ``_CudaKernel.__call__`` opens libcuda and looks the
    function up again on every launch; with the argument conversion that cost 70 us of host time per call on the
    H200 machine (``benchmarks/results/million_speed.md``, section host), three times the kernel's GPU time at
    batch 1 and 8k cached tokens."""
    fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernel
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    return fn


class _LaunchAttribute(ctypes.Structure):
    """``CUlaunchAttribute``: an id, padding to 8 bytes, a 64-byte value union."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]


class _LaunchConfig(ctypes.Structure):
    """``CUlaunchConfig`` (grid, block, dynamic shared memory, stream, attributes)."""

    _fields_ = [
        ("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
        ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
        ("smem", ctypes.c_uint), ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint),
    ]  # fmt: skip


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def _pdl_attribute() -> _LaunchAttribute:
    """The attribute that lets a kernel start before the previous kernel of its stream has finished (programmatic
    dependent launch, sm_90+): ``programmaticStreamSerializationAllowed = 1``."""
    attr = _LaunchAttribute()
    attr.id = _PROGRAMMATIC_STREAM_SERIALIZATION
    ctypes.memmove(ctypes.addressof(attr) + _LaunchAttribute.value.offset, ctypes.byref(ctypes.c_int(1)), 4)
    return attr


_PDL_ATTRIBUTE = _pdl_attribute()


@functools.lru_cache(maxsize=1)
def _cu_launch_kernel_ex() -> Any:
    """The driver's ``cuLaunchKernelEx`` (CUDA 12+), bound once; None where the driver lacks it."""
    fn = getattr(ctypes.CDLL("libcuda.so.1"), "cuLaunchKernelEx", None)
    if fn is not None:
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return fn


class _ParamBlock:
    """The parameter values of one kernel signature (``nptr`` pointers, then ``nint`` 32-bit ints) in one ctypes
    buffer, native byte order and no padding (pointers at ``8 i``, ints at ``8 nptr + 4 j``), and the
    ``void*[nptr + nint]`` array of their addresses that ``cuLaunchKernel`` reads, built once. A launch packs the
    values into the buffer (one ``struct.pack_into``); the driver copies them before ``cuLaunchKernel`` returns,
    so one block per signature and thread (:func:`_param_block`) is reused by every launch."""

    __slots__ = ("argv", "buf", "nptr", "pack")

    def __init__(self, nptr: int, nint: int) -> None:
        self.nptr = nptr
        self.pack = struct.Struct(f"={nptr}Q{nint}i").pack_into
        self.buf = ctypes.create_string_buffer(max(1, 8 * nptr + 4 * nint))
        base = ctypes.addressof(self.buf)
        offsets = [8 * i for i in range(nptr)] + [8 * nptr + 4 * j for j in range(nint)]
        self.argv = (ctypes.c_void_p * max(1, nptr + nint))(*[base + o for o in offsets])

    def fill(self, ptrs: list, ints: list) -> None:
        """Write the pointer values (``data_ptr()``; None: a null pointer) and the ints into the buffer; ints
        outside the 32-bit range wrap as ``ctypes.c_int`` would (non-integers raise its ``TypeError``)."""
        addrs = [0 if t is None else t.data_ptr() for t in ptrs]
        try:
            self.pack(self.buf, 0, *addrs, *ints)
        except struct.error:
            self.pack(self.buf, 0, *addrs, *[ctypes.c_int(i).value for i in ints])


_PARAMS = threading.local()  # per thread: (nptr, nint) -> _ParamBlock


def _param_block(nptr: int, nint: int) -> _ParamBlock:
    """This thread's parameter block for kernels of ``nptr`` pointers and ``nint`` ints (made on first use)."""
    try:
        blocks = _PARAMS.blocks
    except AttributeError:
        blocks = _PARAMS.blocks = {}
    block = blocks.get((nptr, nint))
    if block is None:
        block = blocks[nptr, nint] = _ParamBlock(nptr, nint)
    return block


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what Triton's launcher uses (CUDA builds)


def _current_stream() -> int:
    """The handle of the current CUDA stream of the current device: torch's raw-stream getter where this torch has
    it (no ``torch.cuda.Stream`` object is built, about 15 us less per launch), else ``current_stream()``."""
    if _RAW_STREAM is not None:
        return _RAW_STREAM(torch.cuda.current_device())
    return torch.cuda.current_stream().cuda_stream


def launch(
    kernel: Any, grid: tuple[int, int, int], block: int, smem: int, ptrs: list, ints: list, *, pdl: bool = False
) -> None:
    """Launch ``kernel`` (from ``torch.cuda._compile_kernel``) on the current stream: ``ptrs`` (tensors, or ``None``
    for a null pointer) then ``ints`` (32-bit) are its parameters, in that order. Falls back to the kernel's own
    ``__call__`` where torch's kernel object has no ``func`` handle or the driver library is not found under its
    usual name.

    ``pdl=True`` launches it with programmatic stream serialization (``cuLaunchKernelEx``): it may start while the
    previous kernel of the stream still runs, once that kernel has run ``griddepcontrol.launch_dependents`` (or
    finished), and must itself wait (``griddepcontrol.wait``) before it reads what that kernel writes. Where the
    driver has no ``cuLaunchKernelEx`` it is an ordinary launch (the wait then returns at once): the same results.
    Stream capture keeps the dependency as a programmatic edge of the graph.

    The parameters are packed into a buffer kept per signature (numbers of pointers and ints) and thread
    (:class:`_ParamBlock`) instead of one ctypes object per parameter and call."""
    func = getattr(kernel, "func", None)
    try:
        fn = _cu_launch_kernel() if func is not None else None
        fn_ex = _cu_launch_kernel_ex() if func is not None and pdl else None
    except OSError:
        fn = fn_ex = None
    if fn is None:
        kernel(grid=grid, block=(block, 1, 1), args=[*ptrs, *ints], shared_mem=smem)
        return
    params = _param_block(len(ptrs), len(ints))
    params.fill(ptrs, ints)
    if fn_ex is not None:
        cfg = _LaunchConfig(*grid, block, 1, 1, smem, _current_stream(), ctypes.pointer(_PDL_ATTRIBUTE), 1)
        rc = fn_ex(ctypes.byref(cfg), func, params.argv, None)
        name = "cuLaunchKernelEx"
    else:
        rc = fn(func, grid[0], grid[1], grid[2], block, 1, 1, smem, _current_stream(), params.argv, None)
        name = "cuLaunchKernel"
    if rc != 0:
        raise HfEffllmError(f"{name} failed with CUDA error {rc}.")
