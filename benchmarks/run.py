"""Run several benchmark scripts in one go, each in its own process with a time limit.

Each ``benchmarks/<name>.py`` writes its JSON + Markdown through ``hf_effllm.benchmarking.BenchmarkRun``; this runner
points them all at one results folder, keeps each one's log beside its results, and prints a summary. A benchmark
that fails or runs out of time does not stop the others.

Usage (repo root)::

    python benchmarks/run.py attention_baselines spqr_speed --timeout 300 --results-dir /tmp/results
    python benchmarks/run.py "muon_vs_adamw --quick" --results-dir /tmp/r   # arguments after the name
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmarks", nargs="+", help="benchmark names (file stems in benchmarks/), with arguments")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per benchmark (default 600)")
    parser.add_argument("--results-dir", default=str(HERE / "results"), help="where results and logs go")
    args = parser.parse_args(argv)
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for spec in args.benchmarks:
        name, *extra = shlex.split(spec)
        script = HERE / f"{name}.py"
        if not script.is_file():
            print(f"[run] {name}: no such benchmark ({script})", flush=True)
            summary.append((name, "missing", 0.0))
            continue
        env = {**os.environ, "HF_EFFLLM_RESULTS_DIR": str(out), "PYTHONUNBUFFERED": "1"}
        log = out / f"{name}.log"
        print(f"[run] {name} {' '.join(extra)}", flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            try:
                proc = subprocess.run(
                    [sys.executable, str(script), *extra],
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    env=env,
                    timeout=args.timeout,
                )
                status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
            except subprocess.TimeoutExpired:
                status = f"timeout {args.timeout:.0f}s"
        seconds = time.perf_counter() - t0
        summary.append((name, status, seconds))
        tail = log.read_text(errors="replace").splitlines()[-25:]
        print("\n".join(f"  {line}" for line in tail), flush=True)
    print("\n| benchmark | status | seconds |\n|---|---|---|")
    for name, status, seconds in summary:
        print(f"| {name} | {status} | {seconds:.0f} |")
    return 0 if all(s == "ok" for _, s, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
