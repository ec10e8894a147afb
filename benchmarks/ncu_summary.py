"""Summarise an Nsight Compute profile of one kernel launch as a short Markdown section.

Input: the two text pages ``ncu -i REPORT --page details --print-details all`` (``NAME_details.txt``) and
``ncu -i REPORT --page source --csv --print-source sass`` (``NAME_sass.csv``). Output, per profile:

* the launch's duration, throughputs (SM, memory, DRAM, L1/TEX), issue-slot use, warps per scheduler, registers;
* where the warps' stall samples go (reasons, and the SASS opcodes that carry them);
* the samples per stretch of SASS between ``BAR.SYNC`` instructions (a kernel's phases: prologue, staging, main
  loop) and the share in *cold* instructions, those executed at most 4 times per warp (start-up and per-octet work
  rather than the steady loop).

Usage::

    python benchmarks/ncu_summary.py DIR NAME [NAME ...] > summary.md
"""

from __future__ import annotations

import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

DETAILS = [
    "Duration", "Compute (SM) Throughput", "Memory Throughput", "DRAM Throughput", "L1/TEX Cache Throughput",
    "Issue Slots Busy", "Executed Ipc Active", "Active Warps Per Scheduler", "Eligible Warps Per Scheduler",
    "No Eligible", "Registers Per Thread", "Block Size", "Grid Size",
]  # fmt: skip


def details(path: Path) -> dict[str, str]:
    """The first value of each metric of ``DETAILS`` in a details page, with its unit."""
    found: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        for key in DETAILS:
            m = re.match(rf"\s+{re.escape(key)}\s+(\S+)?\s+([\d.,]+)\s*$", line)
            if m and key not in found:
                found[key] = f"{m.group(2)} {m.group(1) or ''}".strip()
    return found


def _num(v: str) -> float:
    try:
        return float(v.replace(",", ""))
    except ValueError:
        return 0.0


def sass_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a source page in CSV (its first line names the kernel)."""
    rows = list(csv.reader(path.open(errors="replace")))
    return rows[1], rows[2:]


def summary(directory: Path, name: str) -> str:
    det = details(directory / f"{name}_details.txt")
    hdr, rows = sass_rows(directory / f"{name}_sass.csv")
    ix = {h: i for i, h in enumerate(hdr)}

    def col(r: list[str], key: str) -> float:
        return _num(r[ix[key]]) if key in ix and ix[key] < len(r) else 0.0

    inst = [col(r, "Instructions Executed") for r in rows]
    samp = [col(r, "Warp Stall Sampling (All Samples)") for r in rows]
    src = [r[ix["Source"]].strip() for r in rows]
    total_i, total_s = sum(inst) or 1.0, sum(samp) or 1.0
    warps = _num(det.get("Grid Size", "0").split()[0]) * _num(det.get("Block Size", "0").split()[0]) / 32
    out = [f"### {name}", "", "| metric | value |", "|---|---|"]
    out += [f"| {k} | {det[k]} |" for k in DETAILS if k in det]
    out += ["", f"SASS instructions executed: {total_i / 1e6:.2f} M (warp level); stall samples: {int(total_s)}", ""]
    reasons = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    by_reason = sorted(((sum(col(r, h) for r in rows), h[6:]) for h in reasons), reverse=True)
    out.append("Stall samples by reason: " + ", ".join(f"{h} {100 * v / total_s:.1f}%" for v, h in by_reason[:8] if v))
    ops: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for s, i, p in zip(src, inst, samp):
        toks = s.split()
        if toks:
            op = (toks[1] if toks[0].startswith("@") and len(toks) > 1 else toks[0]).split(".")[0]
            ops[op][0] += i
            ops[op][1] += p
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])[:12]
    out.append("")
    out.append("Opcodes (share of instructions / of stall samples): " + ", ".join(
        f"{o} {100 * v[0] / total_i:.1f}/{100 * v[1] / total_s:.1f}" for o, v in top))  # fmt: skip
    bars = [n for n, s in enumerate(src) if re.search(r"\bBAR\.SYNC\b", s)]
    cuts = [0, *bars, len(rows)]
    segs = [f"{a}-{b}: {100 * sum(samp[a:b]) / total_s:.1f}%" for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    out += ["", "Stall samples per stretch of SASS lines between block barriers: " + ", ".join(segs)]
    if warps:
        cold = sum(p for i, p in zip(inst, samp) if 0 < i <= 4 * warps)
        out.append(f"Cold instructions (executed at most 4 times per warp, {int(warps)} warps): "
                   f"{100 * cold / total_s:.1f}% of the stall samples")  # fmt: skip
    return "\n".join(out) + "\n"


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    directory = Path(sys.argv[1])
    print("\n".join(summary(directory, n) for n in sys.argv[2:]))


if __name__ == "__main__":
    main()
