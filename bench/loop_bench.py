#!/usr/bin/env python3
"""The closed loop's costs: the simulator's speed, and what `tunerd exec` adds to a job.

usage: python bench/loop_bench.py [--runs 20]

  1. `tunerd exec --cron bench -- true` against running `true` directly: the runner's overhead
     per run (median of --runs), and its peak RSS;
  2. 50 `tunerd exec` runs started together, each printing 100 kB: wall time until all fifty
     lines are in the log, and that every line is whole;
  3. `tunerd simulate deploy/scenarios/demo.toml --json`: wall time, simulated runs per second
     and simulated weeks per second (target of issue 6: the demo's timeline in under 30 s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if not k.startswith("TUNERD_")}


def tunerd(*args: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "tunerd", *args],
        cwd=ROOT,
        env=ENV,
        check=True,
        **kw,  # type: ignore[arg-type]
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        config = root / "tunerd.toml"
        log = root / "auto-retry.jsonl"
        config.write_text(
            f'log_path = "{log}"\nparams_file = "{root / "params.json"}"\n'
            f'state_dir = "{root / "state"}"\n'
        )
        exec_args = ["exec", "--cron", "bench", "--config", str(config), "--"]
        plain, wrapped = [], []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            subprocess.run(["true"], check=True)
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            tunerd(*exec_args, "true")
            wrapped.append(time.perf_counter() - t0)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # exec's: first
        overhead = (statistics.median(wrapped) - statistics.median(plain)) * 1000
        print(
            f"exec overhead per run: {overhead:.0f} ms (median of {args.runs}),"
            f" peak RSS of a run {peak:.0f} MB"
        )

        program = "import sys; sys.stdout.write('x' * 100_000)"
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "tunerd", *exec_args, sys.executable, "-c", program],
                cwd=ROOT,
                env=ENV,
                stdout=subprocess.DEVNULL,
            )
            for _ in range(50)
        ]
        for p in procs:
            p.wait()
        wall = time.perf_counter() - t0
        lines = log.read_bytes().splitlines()[args.runs :]
        whole = sum(1 for line in lines if json.loads(line)["type"] == "success")
        print(f"50 concurrent exec runs: {wall:.1f} s, {whole}/50 whole lines in the log")

    start = time.perf_counter()
    done = tunerd("simulate", "deploy/scenarios/demo.toml", "--json", capture_output=True)
    elapsed = time.perf_counter() - start
    result = json.loads(done.stdout)
    runs = sum(w["runs"] for w in result["weeks"])
    print(
        f"simulate demo: {len(result['weeks'])} weeks, {runs:,} runs, {len(result['changes'])}"
        f" changes in {elapsed:.1f} s ({runs / elapsed:,.0f} runs/s,"
        f" {len(result['weeks']) / elapsed:.2f} weeks/s)   (target: under 30 s)"
    )


if __name__ == "__main__":
    main()
