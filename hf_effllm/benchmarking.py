"""Timing, memory and result-writing helpers shared by every benchmark in ``benchmarks/``.

Speed is measured as the median of many timed runs after warm-up (``triton.testing.do_bench`` on CUDA, a
``perf_counter`` loop on the CPU), and reported as a ratio against a baseline measured in the same run.
Each benchmark writes ``benchmarks/results/<name>.json`` and ``<name>.md`` with the device, package versions
and date.

Example:
    >>> run = BenchmarkRun("attention_baselines")  # doctest: +SKIP
    >>> ms = time_ms(lambda: q @ k.T)  # doctest: +SKIP
    >>> run.add(op="matmul", ms=ms)  # doctest: +SKIP
    >>> run.write()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .utils.io import atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
_PACKAGES = ("torch", "triton", "transformers", "peft", "trl", "accelerate", "hf-effllm")


def environment_info() -> dict[str, Any]:
    """Device name, package versions, Python, platform and the UTC date and time."""
    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = {
            "type": "cuda",
            "name": props.name,
            "count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "sms": props.multi_processor_count,
            "cuda": torch.version.cuda,
        }
    else:
        device = {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    return {
        "device": device,
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def time_ms(
    fn: Callable[[], Any],
    *,
    warmup: int = 25,
    rep: int = 100,
    device: torch.device | str | None = None,
) -> float:
    """Median time of ``fn()`` in milliseconds.

    On CUDA uses ``triton.testing.do_bench`` (``warmup``/``rep`` in milliseconds, median of the timed runs, L2
    flushed between runs); on the CPU runs ``fn`` for ``max(3, warmup // 10)`` warm-up calls and then about
    ``rep`` ms (at least 5 calls), returning the median.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    for _ in range(max(3, warmup // 10)):
        fn()
    times: list[float] = []
    budget = rep / 1000.0
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
        if len(times) >= 1000:
            break
    return statistics.median(times)


def graph_time_ms(fns: Sequence[Callable[[], Any]], *, replays: int = 20, trials: int = 7) -> float:
    """Median GPU time of one call, with launch overhead removed: the calls are captured in one CUDA graph.

    ``fns`` should be the same operation on distinct copies of its data, together larger than the L2 cache (a
    decode step reads each layer's weights once, so they are not L2-resident); the graph runs them in turn,
    ``replays`` times per trial, and the median over ``trials`` of (trial time / calls) is returned.

    Example:
        >>> ms = graph_time_ms([lambda w=w: x @ w.T for w in copies])  # doctest: +SKIP
    """
    if not fns:
        raise ValueError("fns is empty; give at least one callable.")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, allocator) outside the capture
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (replays * len(fns)))
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp32, the error every benchmark checks its kernel's output by before timing it;
    a zero reference counts as norm 1e-30 (an exact zero output gives 0, anything else a large number, never nan).

    Example:
        >>> rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
        0.0
    """
    ref = ref.float()
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def peak_memory_bytes(fn: Callable[[], Any], *, device: torch.device | str = "cuda") -> int:
    """Peak CUDA memory allocated while ``fn()`` runs, above what was allocated before (bytes)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"device={device!r}: peak memory is measured on CUDA only.")
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    fn()
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) - before


@contextlib.contextmanager
def module_setting(module: Any, **values: Any) -> Iterator[None]:
    """Set attributes of ``module`` (a kernel module's switches, e.g. ``spqr_octet._SPLIT_TILE``) for the ``with``
    block; the previous values come back when it ends, also on an error.

    Example:
        >>> with module_setting(spqr_octet, _SPLIT_TILE="lane"):  # doctest: +SKIP
        ...     y = spqr_octet_split(x, layout)
    """
    old = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(module, name, value)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or 0.01 <= abs(v) < 1e5:
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"
        return f"{v:.3g}"
    return "" if v is None else str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts as a Markdown table (columns in first-seen order unless given)."""
    if not rows:
        return "(no rows)\n"
    if columns is None:
        columns = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


@dataclass
class BenchmarkRun:
    """Collects result rows of one benchmark and writes them as JSON and Markdown.

    Args:
        name: file stem under the results folder.
        description: one paragraph written above the table.
        results_dir: where to write (default ``$HF_EFFLLM_RESULTS_DIR``, else ``benchmarks/results`` of the
            source tree).
    """

    name: str
    description: str = ""
    results_dir: Path | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, **row: Any) -> dict[str, Any]:
        """Append one result row (a flat dict of numbers and strings)."""
        self.rows.append(row)
        return row

    def write(self, columns: Sequence[str] | None = None) -> tuple[Path, Path]:
        """Write ``<name>.json`` and ``<name>.md`` atomically; returns their paths."""
        out = Path(self.results_dir or os.environ.get("HF_EFFLLM_RESULTS_DIR") or RESULTS_DIR)
        env = environment_info()
        payload = {"benchmark": self.name, "description": self.description, **env, "meta": self.meta, "rows": self.rows}
        json_path = atomic_write_text(out / f"{self.name}.json", json.dumps(payload, indent=2, default=str) + "\n")
        dev = env["device"]
        header = (
            f"# {self.name}\n\n{self.description}\n\n"
            f"Device: {dev['name']} ({dev['type']}); date {env['date']}; "
            + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
            + "\n\n"
        )
        if self.meta:
            header += "".join(f"- {k}: {v}\n" for k, v in self.meta.items()) + "\n"
        md_path = atomic_write_text(out / f"{self.name}.md", header + markdown_table(self.rows, columns))
        return json_path, md_path
