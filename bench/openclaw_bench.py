#!/usr/bin/env python3
"""Reading OpenClaw's native cron history at the gateway's retention cap (issue 14).

usage: python bench/openclaw_bench.py [--jobs 1000] [--rows 2000] [--state PATH]

Builds a state database with the schema a real gateway (2026.9.6) wrote (copied from
tests/data/openclaw-cron.sqlite): ``--jobs`` jobs with ``--rows`` executions each (2,000 is what
the gateway keeps per job), a third of them failing, a tenth retried, each with its ``task_runs``
row. Then times what `tunerd analyze --openclaw` does with it: read the history (one read-only
snapshot), rebuild the runs, count them; and what the daemon's follower does: a first look
that reads everything, then looks that read only what is new.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tunerd.inputs.openclaw import (  # noqa: E402
    HistoryFollower,
    native_runs,
    read_history,
    read_native,
)
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
    parser.add_argument(
        "--state", type=Path, help="keep the database here (built if missing, reused if there)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tunerd-openclaw-") as tmp:
        state = args.state or Path(tmp) / "openclaw.sqlite"
        if not state.exists():
            started = time.perf_counter()
            build(state, args.jobs, args.rows)
            print(f"built in {time.perf_counter() - started:.0f} s")
        measure(state)


def measure(state: Path) -> None:
    started = time.perf_counter()
    history = read_history(state, time.time())
    read = time.perf_counter() - started
    entries = native_runs(history, time.time())
    rebuilt = time.perf_counter() - started - read
    stats = LogStats()
    stats.add_entries(entries, time.time())
    counted = time.perf_counter() - started - read - rebuilt
    n = len(history.executions)
    print(
        f"{len(history.jobs):,} jobs, {n:,} executions, {state.stat().st_size / 1e6:.0f} MB"
        " (`tunerd analyze --openclaw`, one read of the whole history):"
    )
    print(f"  read the history      {read:6.2f} s  ({read / n * 1e6:.2f} us an execution)")
    print(f"  rebuild {len(entries):,} runs {rebuilt:6.2f} s")
    print(f"  count them            {counted:6.2f} s")
    print(f"  total                 {read + rebuilt + counted:6.2f} s   (issue 14: well under 1 s)")

    # One-shot commands with the digest kept between them: the first builds it, the next ones
    # read what is new.
    keep = Path(tempfile.mkdtemp(prefix="tunerd-digest-")) / "history.digest"
    print("one-shot commands with a kept digest (read, then count):")
    one_shot(state, keep, "the first (builds it)  ")
    one_shot(state, keep, "the next, nothing new  ")
    print(f"  (the digest: {keep.stat().st_size / 1e6:.0f} MB)")

    # The daemon: the first look reads everything, the next ones only what is new.
    follower = HistoryFollower(state)
    started = time.perf_counter()
    first = follower.poll(time.time())
    print(f"the daemon's follower: first look {time.perf_counter() - started:6.2f} s", end="")
    print(f" ({len(first.runs):,} runs)")
    started = time.perf_counter()
    nothing = follower.poll(time.time())
    print(f"  a look, nothing new     {(time.perf_counter() - started) * 1000:8.1f} ms", end="")
    print(f" ({len(nothing.runs)} runs)")
    db = sqlite3.connect(state)
    with db:  # each job runs once more
        db.execute(
            "INSERT INTO cron_run_receipts SELECT receipt_id || '-next', store_key, job_id,"
            " config_revision, agent_id, request_run_id, 'ok', owner_pid, owner_start_time,"
            " started_at_ms + 60000000, finished_at_ms + 60000000, NULL FROM cron_run_receipts"
            " WHERE (job_id, started_at_ms) IN (SELECT job_id, MAX(started_at_ms) FROM"
            " cron_run_receipts GROUP BY job_id)"
        )
    db.close()
    started = time.perf_counter()
    new = follower.poll(time.time() + 60000)
    print(f"  a look, a run per job   {(time.perf_counter() - started) * 1000:8.1f} ms", end="")
    print(f" ({len(new.runs):,} runs)")
    one_shot(state, keep, "a one-shot command, a run per job new", time.time() + 60000)
    shutil.rmtree(keep.parent)
    db = sqlite3.connect(state)
    with db:
        db.execute("DELETE FROM cron_run_receipts WHERE receipt_id LIKE '%-next'")
    db.close()


def one_shot(state: Path, keep: Path, what: str, now: float | None = None) -> None:
    """What `tunerd analyze --openclaw` does with a digest kept in its state folder."""
    now = now or time.time()
    started = time.perf_counter()
    native = read_native(state, now, keep)
    read = time.perf_counter() - started
    stats = LogStats()
    native.digest.count(stats, native.jobs)
    stats.crons  # noqa: B018 - what is buffered is counted when read
    counted = time.perf_counter() - started - read
    print(f"  {what} {read:7.3f} s + {counted:6.3f} s = {read + counted:7.3f} s")


if __name__ == "__main__":
    main()
