#!/usr/bin/env python3
"""Reading OpenClaw's native cron history at the gateway's retention cap (issue 14).

usage: python bench/openclaw_bench.py [--jobs 1000] [--rows 2000]

Builds a state database with the schema a real gateway (2026.9.6) wrote (copied from
tests/data/openclaw-cron.sqlite): ``--jobs`` jobs with ``--rows`` executions each (2,000 is what
the gateway keeps per job), a third of them failing, a tenth retried, each with its ``task_runs``
row. Then times what `tunerd analyze --openclaw` does with it: read the history (one read-only
snapshot), rebuild the runs, count them.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tunerd.inputs.openclaw import native_runs, read_history  # noqa: E402
from tunerd.stats import LogStats  # noqa: E402

SAMPLE = ROOT / "tests" / "data" / "openclaw-cron.sqlite"


def build(path: Path, jobs: int, rows: int) -> None:
    sample = sqlite3.connect(SAMPLE)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    for (sql,) in sample.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL"):
        db.execute(sql)
    t0 = 1_796_000_000_000
    for j in range(jobs):
        job = f"job-{j:05d}"
        doc = {
            "id": job,
            "name": f"native-{j:05d}",
            "schedule": {"kind": "every", "everyMs": 60000},
            "payload": {"kind": "command", "argv": ["true"], "timeoutSeconds": 30},
        }
        db.execute(
            "INSERT INTO cron_jobs (store_key, job_id, name, enabled, payload_kind, job_json,"
            " state_json, updated_at) VALUES ('s', ?, ?, 1, 'command', ?, '{}', 0)",
            (job, doc["name"], json.dumps(doc)),
        )
        receipts, tasks = [], []
        at = t0
        for i in range(rows):
            ok = i % 3 != 0
            retry_next = not ok and i % 10 == 0
            finished = at + 800
            planned = finished + (30_000 if retry_next else 59_200)
            receipt = f"{job}-{i}"
            error = (
                None
                if ok
                else (
                    "cron: job execution timed out" if retry_next else "command exited with code 1"
                )
            )
            receipts.append(
                (
                    receipt,
                    "s",
                    job,
                    "rev",
                    "main",
                    None,
                    "ok" if ok else "error",
                    1,
                    None,
                    at,
                    finished,
                    error,
                )
            )
            detail = {
                "kind": "cron-run",
                "status": "ok" if ok else "error",
                "error": error,
                "errorReason": "timeout" if retry_next else None,
                "runAtMs": at,
                "durationMs": 800,
                "nextRunAtMs": planned,
            }
            run_id = f"cron:{job}:{at}:{receipt}"
            tasks.append(
                (
                    receipt,
                    "cron",
                    "automation_run",
                    job,
                    "",
                    "",
                    "system",
                    run_id,
                    job,
                    "succeeded" if ok else "failed",
                    "not_applicable",
                    "silent",
                    at,
                    json.dumps(detail),
                )
            )
            at = planned
        db.executemany("INSERT INTO cron_run_receipts VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", receipts)
        db.executemany(
            "INSERT INTO task_runs (task_id, runtime, task_kind, source_id, requester_session_key,"
            " owner_key, scope_kind, run_id, task, status, delivery_status, notify_policy,"
            " created_at, detail_json) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            tasks,
        )
    db.commit()
    db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tunerd-openclaw-") as tmp:
        state = Path(tmp) / "openclaw.sqlite"
        started = time.perf_counter()
        build(state, args.jobs, args.rows)
        print(
            f"{args.jobs:,} jobs x {args.rows:,} executions: built in"
            f" {time.perf_counter() - started:.0f} s, {state.stat().st_size / 1e6:.0f} MB"
        )
        started = time.perf_counter()
        history = read_history(state, time.time())
        read = time.perf_counter() - started
        entries = native_runs(history, time.time())
        rebuilt = time.perf_counter() - started - read
        stats = LogStats()
        stats.add_entries(entries, time.time())
        counted = time.perf_counter() - started - read - rebuilt
        n = len(history.executions)
        print(f"read the history      {read:6.2f} s  ({read / n * 1e6:.2f} us an execution)")
        print(f"rebuild {len(entries):,} runs {rebuilt:6.2f} s")
        print(f"count them            {counted:6.2f} s")
        print(
            f"total                 {read + rebuilt + counted:6.2f} s   (issue 14: well under 1 s)"
        )


if __name__ == "__main__":
    main()
