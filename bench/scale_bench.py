#!/usr/bin/env python3
"""A cycle with thousands of crons, and the commands after it (issue 12, case 5).

usage: python bench/scale_bench.py [--crons 5000] [--runs 40]

Writes a log of `--crons` crons, each with `--runs` runs over the last day and enough exhausted
failures that `maxRetries` 3 -> 4 starts for every one of them, and a params file with an entry
per cron (what a large installation's file looks like). Then times, as an operator runs them:
`tunerd cycle` (thousands of experiments started in one go), `tunerd status`, `tunerd history`,
and reports the state database's size. Before issue 12 every rollback point stored the whole
params file (5,000 crons: a 2.2 GB database after one cycle) and `status` took 184 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ERR = {
    "type": "ECONNRESET",
    "message": "socket hang up",
    "retryable": True,
    "category": "network",
    "suggestedFix": "Connection reset - server may be restarting",
}


def write_log(path: Path, crons: int, runs: int) -> None:
    now = datetime.now(UTC)
    with path.open("w") as f:
        for c in range(crons):
            for r in range(runs):
                at = now - timedelta(minutes=15 * (runs - r))
                failed = r % 10 == 0  # 10 % exhausted: maxRetries 3 -> 4, automatic
                attempts = [
                    {"attempt": k + 1, "success": not failed and k == 1, "duration": 400}
                    | ({} if not failed and k == 1 else {"error": ERR})
                    for k in range(3 if failed else 2)
                ]
                line = {
                    "timestamp": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    "type": "failure" if failed else "success",
                    "context": {"cron": f"cron-{c:05d}", "schedule": "*/15 * * * *"},
                    "attempts": attempts,
                    "totalDuration": 400 * len(attempts) + 1000,
                    "params": {"maxRetries": 3, "timeout": 15000, "backoffBase": 1000},
                }
                if failed:
                    line["finalError"] = ERR
                f.write(json.dumps(line) + "\n")


def timed(config: Path, home: Path, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNERD_")}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "tunerd", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        env=dict(env, HOME=str(home)),
        cwd=ROOT,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"tunerd {' '.join(args)} failed: {done.stderr[-2000:]}")
    return elapsed, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crons", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tunerd-scale-") as tmp:
        root = Path(tmp)
        log = root / "auto-retry.jsonl"
        write_log(log, args.crons, args.runs)
        params = root / "params.json"
        crons = {f"cron-{c:05d}": {"maxRetries": 3, "timeout": 15000} for c in range(args.crons)}
        params.write_text(json.dumps({"defaults": {}, "crons": crons, "experiments": {}}, indent=2))
        config = root / "tunerd.toml"
        config.write_text(
            f'log_path = "{log}"\nstate_dir = "{root / "state"}"\nparams_file = "{params}"\n'
            "min_runs = 20\nmax_crons = 20000\n"
        )
        print(
            f"{args.crons:,} crons x {args.runs} runs; log {log.stat().st_size / 1e6:.1f} MB,"
            f" params file {params.stat().st_size / 1e6:.2f} MB"
        )
        cycle_s, done = timed(config, root, "cycle", "--json")
        started = sum(a["result"] == "started" for a in json.loads(done.stdout)["actions"])
        status_s, _ = timed(config, root, "status", "--json")
        history_s, _ = timed(config, root, "history", "--json")
        database = root / "state" / "tunerd.sqlite3"
        size = sum(
            p.stat().st_size for p in database.parent.iterdir() if p.name.startswith(database.name)
        )
        print(f"experiments started by the cycle: {started:,}")
        print(f"{'':<28}{'tunerd':>12}{'before issue 12':>18}")
        print(f"{'cycle (s)':<28}{cycle_s:>12.1f}{'-':>18}")
        print(f"{'status (s)':<28}{status_s:>12.1f}{'184':>18}")
        print(f"{'history (s)':<28}{history_s:>12.1f}{'-':>18}")
        print(f"{'state database (MB)':<28}{size / 1e6:>12.1f}{'2200':>18}")


if __name__ == "__main__":
    main()
