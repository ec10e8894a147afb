"""The packed SpQR storage format (version 1) and its honest bit accounting.

One quantized ``Linear`` of shape (out, in) stores, as safetensors tensors (buffers of :class:`SpQRLinear`):

* ``qweight``  int32 (ceil(out * in * bits / 32) + 1,): the weight codes, row-major in permuted column order, as
  one little-endian bitstream (code (r, c) at bit (r * in + c) * bits; one padding word at the end, so no row
  pays for alignment and a code never reads past the tensor);
* ``qscale`` / ``qzero`` int32 (ceil(out * G * stats_bits / 32) + 1,): the first-level scale and zero-point codes
  of the G = ceil(in / group_size) column groups of each row, as bitstreams of the same kind;
* ``stats2`` float16 (ceil(out / stats_group_size), G, 4): second-level statistics (scale step, scale minimum,
  zero step, zero minimum) of each block of ``stats_group_size`` rows;
* ``outlier_values`` float16 (nnz), ``outlier_cols`` int16 or int32 (nnz), ``outlier_row_ptr`` int32 (out + 1):
  the outliers in CSR, as corrections added to the dequantized weight, columns in permuted order;
* ``perm`` int16 or int32 (in), only with ``permutation="act_order"``: ``W[:, perm]`` is the stored order.

Dequantization: ``s = step_s * code_s + min_s``, ``z = step_z * code_z + min_z``, ``W[r, c] = s * (code - z)``,
plus the CSR corrections. The average bits per parameter count every stored byte of all these tensors.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from ...errors import HfEffllmError

TENSOR_NAMES = (
    "qweight",
    "qscale",
    "qzero",
    "stats2",
    "outlier_values",
    "outlier_cols",
    "outlier_row_ptr",
    "perm",
)


def words_per_row(n_codes: int, bits: int) -> int:
    """int32 words of one bitstream row holding ``n_codes`` codes of ``bits`` bits (plus one padding word)."""
    return (n_codes * bits + 31) // 32 + 1


def index_dtype(n: int) -> torch.dtype:
    """The smallest signed integer dtype able to index ``n`` entries (int16 or int32)."""
    return torch.int16 if n <= 32767 else torch.int32


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer ``codes`` (rows, n) < 2**bits into int32 bitstreams (rows, words_per_row(n, bits)).

    Example:
        >>> unpack_bits(pack_bits(torch.tensor([[1, 7, 3]]), 3), 3, 3).tolist()
        [[1, 7, 3]]
    """
    rows, n = codes.shape
    c = codes.to(torch.int64)
    pos = torch.arange(n, device=codes.device, dtype=torch.int64) * bits
    word, off = pos // 32, pos % 32
    nw = words_per_row(n, bits)
    out = torch.zeros(rows, nw, dtype=torch.int64, device=codes.device)
    out.scatter_add_(1, word.expand(rows, n), (c << off) & 0xFFFFFFFF)
    spill = (off + bits > 32).expand(rows, n)
    hi = torch.where(spill, c >> (32 - off), torch.zeros_like(c))
    out.scatter_add_(1, (word + 1).expand(rows, n), hi)
    return ((out + 2**31) % 2**32 - 2**31).to(torch.int32)


def unpack_bits(words: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int64 codes (rows, n) from int32 bitstreams."""
    return _unpack_float(words, n, bits).to(torch.int64)


def _unpack_float(words: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    # bit i of word w is bit 32 * w + i of the stream; explode to bits, regroup, weight by powers of two (exact)
    rows = words.shape[0]
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    b = ((words[..., None] >> shifts) & 1).reshape(rows, -1)[:, : n * bits].reshape(rows, n, bits)
    return b.to(torch.float32) @ (2.0 ** torch.arange(bits, dtype=torch.float32, device=words.device))


def pack_flat(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a (rows, n) code matrix row-major into one 1-D int32 bitstream."""
    return pack_bits(codes.reshape(1, -1), bits)[0]


def unpack_flat(words: torch.Tensor, rows: int, n: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_flat`: codes (rows, n) as float32 (exact integers)."""
    return _unpack_float(words[None], rows * n, bits).reshape(rows, n)


def dequantize_stats(codes: torch.Tensor, step: torch.Tensor, minimum: torch.Tensor, stats_group_size: int):
    """First-level statistics (out, G) in float32 from their codes (out, G) and second-level (out2, G) tensors."""
    out = codes.shape[0]
    st = step.float().repeat_interleave(stats_group_size, dim=0)[:out]
    mn = minimum.float().repeat_interleave(stats_group_size, dim=0)[:out]
    return st * codes.float() + mn


def quantize_stats(values: torch.Tensor, stats_bits: int, stats_group_size: int, lower: torch.Tensor | None = None):
    """Second-level min-max quantization of first-level statistics (out, G) over blocks of rows.

    ``lower`` (out, G), optional: each value's level is rounded to nearest but never below the level that reaches
    ``lower`` (the scales use it: a scale rounded far down would put the zero-point ``-min / scale`` out of the fp16
    range and break the whole block of rows).

    Returns:
        (codes int64 (out, G), step float16 (out2, G), minimum float16 (out2, G), dequantized float32 (out, G)).
    """
    out, g = values.shape
    out2 = -(-out // stats_group_size)
    pad = out2 * stats_group_size - out
    v = torch.cat([values, values[-1:].expand(pad, g)]) if pad else values
    blocks = v.reshape(out2, stats_group_size, g)
    lo, hi = blocks.amin(1), blocks.amax(1)
    maxq = 2**stats_bits - 1
    step = ((hi - lo) / maxq).to(torch.float16)
    minimum = lo.to(torch.float16)
    st = step.float().repeat_interleave(stats_group_size, dim=0)[:out]
    mn = minimum.float().repeat_interleave(stats_group_size, dim=0)[:out]
    codes = torch.where(st > 0, torch.round((values - mn) / st.clamp_min(1e-30)), torch.zeros_like(values))
    if lower is not None:
        codes = torch.where(st > 0, torch.maximum(codes, torch.ceil((lower - mn) / st.clamp_min(1e-30))), codes)
    codes = codes.clamp(0, maxq).to(torch.int64)
    return codes, step, minimum, st * codes.float() + mn


def dequantize_weight(
    t: dict[str, torch.Tensor], *, in_features: int, bits: int, group_size: int, stats_bits: int, stats_group_size: int
) -> torch.Tensor:
    """The float32 weight (out, in) in *stored* (permuted) column order, outliers included."""
    out = t["outlier_row_ptr"].shape[0] - 1
    g = -(-in_features // group_size)
    codes = unpack_flat(t["qweight"], out, in_features, bits).float()
    s2 = t["stats2"]
    scale = dequantize_stats(unpack_flat(t["qscale"], out, g, stats_bits), s2[..., 0], s2[..., 1], stats_group_size)
    zero = dequantize_stats(unpack_flat(t["qzero"], out, g, stats_bits), s2[..., 2], s2[..., 3], stats_group_size)
    scale = scale.repeat_interleave(group_size, dim=1)[:, :in_features]
    zero = zero.repeat_interleave(group_size, dim=1)[:, :in_features]
    w = scale * (codes - zero)
    nnz = t["outlier_values"].numel()
    if nnz:
        ptr = t["outlier_row_ptr"].long()
        rows = torch.repeat_interleave(torch.arange(out, device=w.device), ptr[1:] - ptr[:-1])
        w.index_put_((rows, t["outlier_cols"].long()), t["outlier_values"].float(), accumulate=True)
    return w


def tensor_crc32(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (recorded per packed tensor in config.json, checked when loading)."""
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return zlib.crc32(data)


def stored_bits(tensors: dict[str, torch.Tensor]) -> int:
    """Every stored bit of a layer's packed tensors (padding words included): the honest numerator."""
    return sum(v.numel() * v.element_size() * 8 for k, v in tensors.items() if k in TENSOR_NAMES and v is not None)


def expected_shapes(
    *,
    out_features: int,
    in_features: int,
    nnz: int,
    bits: int,
    group_size: int,
    stats_bits: int,
    stats_group_size: int,
    permuted: bool,
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every packed tensor of one layer, from its config record."""
    g = -(-in_features // group_size)
    shapes = {
        "qweight": ((words_per_row(out_features * in_features, bits),), torch.int32),
        "qscale": ((words_per_row(out_features * g, stats_bits),), torch.int32),
        "qzero": ((words_per_row(out_features * g, stats_bits),), torch.int32),
        "stats2": ((-(-out_features // stats_group_size), g, 4), torch.float16),
        "outlier_values": ((nnz,), torch.float16),
        "outlier_cols": ((nnz,), index_dtype(in_features)),
        "outlier_row_ptr": ((out_features + 1,), torch.int32),
    }
    if permuted:
        shapes["perm"] = ((in_features,), index_dtype(in_features))
    return shapes


def validate_packed(name: str, t: dict[str, torch.Tensor], record: dict[str, Any], config: Any) -> None:
    """Check a loaded layer's packed tensors against its config record; raise naming the first bad tensor.

    Raises:
        HfEffllmError: a tensor is missing, has the wrong shape or dtype, or holds impossible values (CSR offsets
            not monotone, column indices or permutation out of range, non-finite statistics).
    """
    shapes = expected_shapes(
        out_features=record["out_features"],
        in_features=record["in_features"],
        nnz=record["nnz"],
        bits=config.bits,
        group_size=config.group_size,
        stats_bits=config.stats_bits,
        stats_group_size=config.stats_group_size,
        permuted=config.permutation == "act_order",
    )
    hint = "the checkpoint does not match its config.json (truncated or edited file?); re-save or re-quantize it."
    for key, (shape, dtype) in shapes.items():
        v = t.get(key)
        full = f"{name}.{key}"
        if v is None or v.is_meta:
            raise HfEffllmError(f"tensor {full!r} is missing; {hint}")
        if tuple(v.shape) != shape or v.dtype != dtype:
            raise HfEffllmError(
                f"tensor {full!r} has shape {tuple(v.shape)} {v.dtype}, expected {shape} {dtype}; {hint}"
            )
    for key, expected in (record.get("crc32") or {}).items():
        if key in shapes and tensor_crc32(t[key]) != expected:
            raise HfEffllmError(
                f"tensor {name + '.' + key!r} does not match the checksum recorded in config.json (missing from the "
                f"checkpoint, cast to another dtype, or edited); {hint}"
            )
    ptr = t["outlier_row_ptr"].long()
    nnz, n_in = record["nnz"], record["in_features"]
    if ptr[0].item() != 0 or ptr[-1].item() != nnz or bool((ptr[1:] < ptr[:-1]).any()):
        raise HfEffllmError(f"tensor {name + '.outlier_row_ptr'!r} is not a valid CSR row-offset array; {hint}")
    cols = t["outlier_cols"].long()
    if nnz and (cols.min().item() < 0 or cols.max().item() >= n_in):
        raise HfEffllmError(f"tensor {name + '.outlier_cols'!r} has column indices outside 0..{n_in - 1}; {hint}")
    for key in ("stats2", "outlier_values"):
        if not bool(torch.isfinite(t[key].float()).all()):
            raise HfEffllmError(f"tensor {name + '.' + key!r} holds non-finite values; {hint}")
    if "perm" in shapes:
        p = t["perm"].long()
        if not torch.equal(torch.sort(p).values, torch.arange(n_in, device=p.device)):
            raise HfEffllmError(f"tensor {name + '.perm'!r} is not a permutation of 0..{n_in - 1}; {hint}")
