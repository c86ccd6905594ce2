#!/usr/bin/env python3
"""Time `tunerd analyze` against the anchors of ../shared/bench on the same log, in one run.

usage: python bench/analyze_bench.py [--lines 1000000] [--crons 1000] [--rounds 3] [--no-anchors]

Generates the log with the shared genlog.py (cached under bench/out/), then runs every program
`--rounds` times, interleaved so that a noisy neighbour hurts all of them alike, and prints the
median wall time and the peak memory of each, with ratios to the anchors. Peak memory is sampled
every 5 ms over the program's whole process tree (tunerd reads a large log with forked workers;
counting only the parent would flatter it), both as the sum of resident sets (RSS: pages shared
after fork count twice) and of proportional sets (PSS: shared pages split between processes).

DuckDB is installed on first use into a scratch environment (bench/out/anchor-venv), never into
tunerd's own; Node runs the seed's analyzer if `node` is on the PATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SHARED = HERE.parent.parent / "shared" / "bench"
ANCHOR_FIGURES = {  # ../shared/bench/README.md, measured once on a 2-core machine
    "duckdb": (0.68, 164),
    "seed-node": (1.90, 102),
    "json.loads": (3.68, 14),
}
JSON_LOOP = (
    "import json,sys\n"
    "n=0\n"
    "for line in open(sys.argv[1],'rb'):\n"
    "    e=json.loads(line); n+=bool((e.get('context') or {}).get('cron'))\n"
    "print(n)\n"
)


def tree_memory_kb(root: int) -> tuple[int, int]:
    """Resident set and proportional set (shared pages split) of ``root`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    rss = pss = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            pass
    return rss, pss


def measure(cmd: list[str]) -> tuple[float, int, int]:
    """Wall seconds, and peak RSS and PSS (KiB) of the process tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss, pss = tree_memory_kb(proc.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.005)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        assert proc.stderr is not None
        raise SystemExit(f"{cmd[:3]} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, peak_rss, peak_pss


def anchor_python() -> str | None:
    venv = OUT / "anchor-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", "duckdb"], check=False)
        if done.returncode != 0:
            print("(duckdb could not be installed: its anchor is skipped)")
            return None
    return str(python)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--crons", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-anchors", action="store_true")
    args = ap.parse_args()

    OUT.mkdir(exist_ok=True)
    log = OUT / f"genlog-{args.lines}-{args.crons}.jsonl"
    if not log.exists():
        print(f"generating {log.name} with genlog.py ...", flush=True)
        subprocess.run(
            [sys.executable, str(SHARED / "genlog.py"), str(log), str(args.lines), str(args.crons)],
            check=True,
        )
    size_mb = log.stat().st_size / 1e6
    programs: dict[str, list[str]] = {
        "tunerd analyze": [sys.executable, "-m", "tunerd", "analyze", str(log), "--json"],
        "tunerd analyze --jobs 1": [
            sys.executable,
            "-m",
            "tunerd",
            "analyze",
            str(log),
            "--json",
            "--jobs",
            "1",
        ],
    }
    if not args.no_anchors:
        python = anchor_python()
        if python:
            programs["duckdb"] = [python, str(SHARED / "duckdb_anchor.py"), str(log)]
        if shutil.which("node"):
            programs["seed-node"] = ["node", str(SHARED / "seed_analyzer.js"), str(log)]
        programs["json.loads"] = [sys.executable, "-c", JSON_LOOP, str(log)]

    results: dict[str, list[tuple[float, int, int]]] = {name: [] for name in programs}
    for round_ in range(args.rounds):
        for name, cmd in programs.items():
            results[name].append(measure(cmd))
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)

    wall = {n: statistics.median(r[0] for r in rs) for n, rs in results.items()}
    rss = {n: max(r[1] for r in rs) / 1024 for n, rs in results.items()}
    pss = {n: max(r[2] for r in rs) / 1024 for n, rs in results.items()}
    print(f"\n{args.lines:,} lines, {args.crons:,} crons, {size_mb:.0f} MB", end="")
    print(f"; median of {args.rounds} rounds")
    columns = f"{'program':<26}{'wall s':>8}{'RSS MB':>8}{'PSS MB':>8}"
    columns += f"{'vs duckdb':>11}{'vs node':>9}"
    print(f"{columns}   anchor README (s, MB)")
    for name in programs:
        vs_duck = f"{wall[name] / wall['duckdb']:.2f}x" if "duckdb" in wall else "-"
        vs_node = f"{wall[name] / wall['seed-node']:.2f}x" if "seed-node" in wall else "-"
        anchor = ANCHOR_FIGURES.get(name)
        shown = f"{anchor[0]:.2f} s, {anchor[1]} MB" if anchor else ""
        print(
            f"{name:<26}{wall[name]:>8.2f}{rss[name]:>8.0f}{pss[name]:>8.0f}"
            f"{vs_duck:>11}{vs_node:>9}   {shown}"
        )


if __name__ == "__main__":
    main()
