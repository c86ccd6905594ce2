#!/usr/bin/env python3
"""The daemon under load and at rest: ingest rate, latency to statistics, idle CPU and memory.

usage: python bench/daemon_bench.py [--ingest-lines 300000] [--crons 1000] [--days 7]

Runs the real daemon (`tunerd run`) as a subprocess on a scratch directory and watches the status
snapshot it publishes in its SQLite database:
  1. ingest: lines in the wrapper's real shape appended as fast as Python writes them; lines per
     second until the daemon has counted them all;
  2. latency: one line every 20 ms for 10 s; time from the write to the line being counted in the
     published statistics (p50, p99);
  3. idle: a log of `--crons` crons x `--days` days of runs (every 15 minutes, timestamps in the
     window) read at start, then 30 s with nothing written: the daemon's CPU time and RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ERR = {
    "type": "ETIMEDOUT",
    "message": "Command failed: yf TQQQ",
    "retryable": True,
    "category": "network",
    "suggestedFix": "Network timeout - check connection",
}


def line(rnd: random.Random, cron: str, at: datetime) -> str:
    ok = rnd.random() > 0.05
    d = int(rnd.lognormvariate(7, 0.3))
    attempts = [{"attempt": 1, "success": ok, "duration": d}]
    rec = {
        "timestamp": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "type": "success" if ok else "failure",
        "context": {"cron": cron, "schedule": "*/15 * * * *"},
        "attempts": attempts,
        "totalDuration": d,
    }
    if ok:
        rec["result"] = {"output": f"TQQQ 51.27 vol {rnd.randint(1, 10**7)}\n", "stderr": ""}
    else:
        attempts[0]["error"] = ERR
        rec["finalError"] = ERR
    return json.dumps(rec) + "\n"


class Daemon:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = root / "logs" / "auto-retry.jsonl"
        self.log.parent.mkdir()
        self.config = root / "tunerd.toml"
        self.config.write_text(
            f'log_path = "{self.log}"\nstate_dir = "{root / "state"}"\n'
            f'params_file = "{root / "params.json"}"\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNERD_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tunerd", "run", "--config", str(self.config)],
            stderr=subprocess.DEVNULL,
            env=env,
        )
        while self.entries() is None:
            time.sleep(0.05)

    def entries(self) -> int | None:
        try:
            db = sqlite3.connect(self.root / "state" / "tunerd.sqlite3", timeout=5)
            row = db.execute("SELECT document FROM daemon_status WHERE id = 1").fetchone()
            db.close()
        except sqlite3.Error:
            return None
        return json.loads(row[0])["tail"]["entries"] if row else None

    def wait_for(self, n: int, poll: float = 0.002) -> float:
        while (self.entries() or 0) < n:
            time.sleep(poll)
        return time.perf_counter()

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        assert self.proc is not None
        for row in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if row.startswith("VmRSS:"):
                return int(row.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ingest-lines", type=int, default=300_000)
    ap.add_argument("--crons", type=int, default=1000)
    ap.add_argument("--days", type=int, default=7)
    args = ap.parse_args()
    rnd = random.Random(1)
    names = [f"cron-{i:04d}" for i in range(args.crons)]

    with tempfile.TemporaryDirectory() as scratch:
        d = Daemon(Path(scratch))
        d.start()
        now = datetime.now(UTC)
        body = "".join(line(rnd, rnd.choice(names), now) for _ in range(args.ingest_lines))
        start = time.perf_counter()
        with d.log.open("a") as f:
            for i in range(0, len(body), 1 << 20):
                f.write(body[i : i + (1 << 20)])
                f.flush()
        written = time.perf_counter()
        done = d.wait_for(args.ingest_lines, poll=0.01)
        rate = args.ingest_lines / (done - start)
        print(
            f"ingest: {args.ingest_lines:,} lines ({len(body) / 1e6:.0f} MB) written in "
            f"{written - start:.2f} s, counted after {done - start:.2f} s: {rate:,.0f} lines/s"
            "   (target: at least 100,000 lines/s)"
        )

        lags = []
        base = args.ingest_lines
        with d.log.open("a") as f:
            for i in range(500):
                f.write(line(rnd, rnd.choice(names), datetime.now(UTC)))
                f.flush()
                t0 = time.perf_counter()
                lags.append((d.wait_for(base + i + 1) - t0) * 1000)
                time.sleep(max(0.0, 0.02 - (time.perf_counter() - t0)))
        lags.sort()
        print(
            f"latency, appended line to published statistics: p50 {statistics.median(lags):.1f} ms,"
            f" p99 {lags[int(len(lags) * 0.99) - 1]:.1f} ms, max {lags[-1]:.1f} ms"
            "   (target: p99 at most 50 ms)"
        )
        d.stop()

    with tempfile.TemporaryDirectory() as scratch:
        d = Daemon(Path(scratch))
        end = datetime.now(UTC)
        per_cron = args.days * 96
        total = per_cron * args.crons
        with d.log.open("w") as f:
            for k in range(per_cron):
                at = end - timedelta(minutes=15 * (per_cron - k))
                f.write("".join(line(rnd, name, at) for name in names))
        d.start()
        d.wait_for(total, poll=0.05)
        time.sleep(10)  # let the last checkpoint and status settle
        cpu0, t0 = d.cpu_seconds(), time.perf_counter()
        time.sleep(30)
        cpu = d.cpu_seconds() - cpu0
        elapsed = time.perf_counter() - t0
        print(
            f"idle with {args.crons:,} crons x {args.days} days ({total:,} runs): CPU "
            f"{cpu:.2f} s over {elapsed:.0f} s ({100 * cpu / elapsed:.2f} %),"
            f" RSS {d.rss_mb():.0f} MB"
            "   (targets: no CPU when nothing is written, RSS at most 60 MB)"
        )
        d.stop()


if __name__ == "__main__":
    main()
