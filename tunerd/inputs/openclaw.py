"""Reading OpenClaw's native cron history (the shell around ``inputs.gateway``).

The gateway owns its state: tunerd opens its SQLite database read-only (``mode=ro``, queries
only, one short read transaction, which in WAL mode never blocks a writer) and never writes
anything of it. Where the history is depends on the gateway's version, told from what is there:

- from 2026.8.1: ``cron_run_receipts`` (one row per execution), ``task_runs`` (its
  ``detail_json``: the error's class, when the next run was planned) and ``cron_jobs``;
- 2026.6 and 2026.7: ``cron_run_logs`` (one finished entry per row, ``entry_json``);
- before: ``~/.openclaw/cron/runs/<jobId>.jsonl`` beside ``jobs.json`` (give that folder).

Anything else is refused with a message, never guessed at.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from tunerd.inputs.gateway import BACKOFF_MS, Execution, Job, runs
from tunerd.params import InForce
from tunerd.records import Entry
from tunerd.rules import Advisory

DEFAULT_STATE: Final = Path("~/.openclaw/state/openclaw.sqlite")
RECEIPTS: Final = "2026.8 or later (cron_run_receipts)"
RUN_LOGS: Final = "2026.6-2026.7 (cron_run_logs)"
RUN_FILES: Final = "before 2026.6 (cron/runs/*.jsonl)"


class OpenClawError(Exception):
    """The history cannot be read: one line that says why."""


@dataclass(frozen=True, slots=True)
class History:
    version: str
    """Which of the gateway's layouts it was read from."""
    jobs: dict[str, Job]
    executions: list[Execution]


def read_history(path: Path) -> History:
    """The native jobs and their executions at ``path``: the gateway's state database, or
    (before 2026.6) its ``cron`` folder."""
    path = path.expanduser()
    if path.is_dir():
        return _read_folder(path)
    if not path.is_file():
        raise OpenClawError(f"OpenClaw's state {path} does not exist")
    try:
        db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise OpenClawError(f"cannot open OpenClaw's state {path}: {exc}") from None
    try:
        db.execute("PRAGMA query_only = ON")
        db.execute("BEGIN")  # one snapshot, released at once
        try:
            return _read_database(db, path)
        finally:
            db.execute("COMMIT")
    except sqlite3.Error as exc:
        raise OpenClawError(f"cannot read OpenClaw's state {path}: {exc}") from None
    finally:
        db.close()


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


_NEEDS: Final = {
    "cron_jobs": {"job_id", "name", "enabled", "job_json", "state_json"},
    "cron_run_receipts": {
        "receipt_id",
        "job_id",
        "request_run_id",
        "status",
        "started_at_ms",
        "finished_at_ms",
        "error_text",
        "config_revision",
    },
    "cron_run_logs": {"job_id", "entry_json"},
}


def _read_database(db: sqlite3.Connection, path: Path) -> History:
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "cron_run_receipts" in tables and "cron_jobs" in tables:
        version = RECEIPTS
    elif "cron_run_logs" in tables and "cron_jobs" in tables:
        version = RUN_LOGS
    else:
        (user_version,) = db.execute("PRAGMA user_version").fetchone()
        raise OpenClawError(
            f"{path} holds no cron history tunerd knows (no cron_run_receipts or cron_run_logs"
            f" table; schema version {user_version}): is it OpenClaw's state database?"
        )
    for table in ("cron_jobs", "cron_run_receipts" if version == RECEIPTS else "cron_run_logs"):
        missing = _NEEDS[table] - _columns(db, table)
        if missing:
            raise OpenClawError(
                f"{path}: table {table} has no column {', '.join(sorted(missing))}: a layout of"
                " OpenClaw's that tunerd does not know"
            )
    jobs = {
        row[0]: _job(row[0], row[1], row[2], row[3], row[4])
        for row in db.execute("SELECT job_id, name, enabled, job_json, state_json FROM cron_jobs")
    }
    if version == RECEIPTS:
        executions = _receipts(db, "task_runs" in tables and _has_details(db))
    else:
        executions = [
            e
            for job, entry in db.execute("SELECT job_id, entry_json FROM cron_run_logs")
            if (e := _finished(job, _loads(entry))) is not None
        ]
    return History(version, jobs, executions)


def _has_details(db: sqlite3.Connection) -> bool:
    return {"run_id", "detail_json"} <= _columns(db, "task_runs")


def _receipts(db: sqlite3.Connection, details: bool) -> list[Execution]:
    """Finished executions, with what ``task_runs`` adds to a failure (the error's class, the
    next run the gateway planned). SQLite does the work: each row comes out as an
    ``Execution``, no JSON parsed nor value converted in Python."""
    reason = planned = "NULL"
    joined = ""
    if details:
        # Only a failure's details matter: the join and the JSON are skipped for the others.
        joined = (
            " LEFT JOIN task_runs t ON r.status != 'ok' AND t.run_id = 'cron:' || r.job_id"
            " || ':' || r.started_at_ms || ':' || r.receipt_id"
            " || COALESCE(':' || r.request_run_id, '')"
        )
        reason = (
            "CASE WHEN json_type(t.detail_json, '$.errorReason') = 'text'"
            " THEN json_extract(t.detail_json, '$.errorReason') END"
        )
        planned = (
            "CASE WHEN json_type(t.detail_json, '$.nextRunAtMs') IN ('integer', 'real')"
            " THEN CAST(json_extract(t.detail_json, '$.nextRunAtMs') AS INTEGER) END"
        )
    query = (
        "SELECT r.job_id, r.started_at_ms, r.finished_at_ms, r.status = 'ok',"
        " CASE WHEN r.status = 'interrupted' THEN COALESCE(r.error_text, 'interrupted')"
        f" ELSE r.error_text END, {reason}, r.request_run_id IS NOT NULL, {planned},"
        f" r.config_revision FROM cron_run_receipts r{joined}"
        " WHERE r.status IN ('ok', 'error', 'interrupted') AND r.finished_at_ms IS NOT NULL"
    )
    return list(map(Execution._make, db.execute(query)))


def _finished(job: str, entry: Any) -> Execution | None:
    """One finished entry of a ``cron_run_logs`` row or a ``runs/*.jsonl`` line (``ts,
    status, error, errorReason, runAtMs, durationMs, nextRunAtMs``); None for anything else."""
    if not isinstance(entry, dict) or entry.get("action", "finished") != "finished":
        return None
    status = entry.get("status")
    started, duration = entry.get("runAtMs"), entry.get("durationMs")
    if status not in ("ok", "error") or not isinstance(started, int | float):
        return None
    duration = duration if isinstance(duration, int | float) and duration >= 0 else 0
    planned = entry.get("nextRunAtMs")
    error, reason = entry.get("error"), entry.get("errorReason")
    return Execution(
        str(entry.get("jobId") or job),
        int(started),
        int(started + duration),
        status == "ok",
        error if isinstance(error, str) else None,
        reason if isinstance(reason, str) else None,
        None,
        int(planned) if isinstance(planned, int | float) else None,
    )


def _read_folder(folder: Path) -> History:
    runs = folder / "runs"
    if not runs.is_dir():
        raise OpenClawError(f"{folder} has no runs/ folder: not OpenClaw's cron folder")
    jobs: dict[str, Job] = {}
    try:
        listed = _loads((folder / "jobs.json").read_bytes())
    except OSError:
        listed = None
    if isinstance(listed, dict):
        listed = listed.get("jobs")
    for job in listed if isinstance(listed, list) else []:
        if isinstance(job, dict) and isinstance(job.get("id"), str):
            jobs[job["id"]] = _job(
                job["id"], job.get("name"), job.get("enabled", True), job, job.get("state")
            )
    executions = []
    for file in sorted(runs.glob("*.jsonl")):
        try:
            lines = file.read_bytes().splitlines()
        except OSError as exc:
            raise OpenClawError(f"cannot read {file}: {exc.strerror or exc}") from None
        for line in lines:
            if (e := _finished(file.stem, _loads(line))) is not None:
                executions.append(e)
    return History(RUN_FILES, jobs, executions)


def _loads(text: str | bytes | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _job(job_id: str, name: Any, enabled: Any, job: Any, state: Any) -> Job:
    """A job from its row or its ``jobs.json`` entry (JSON text or already decoded)."""
    doc = _loads(job) if isinstance(job, str | bytes) else job
    doc = doc if isinstance(doc, dict) else {}
    status = _loads(state) if isinstance(state, str | bytes) else state
    status = status if isinstance(status, dict) else {}
    payload = _object(doc.get("payload"))
    seconds = payload.get("timeoutSeconds")
    schedule = _object(doc.get("schedule"))
    errors = status.get("consecutiveErrors")
    return Job(
        job_id,
        str(name) if name else job_id,
        _schedule_text(schedule),
        int(seconds * 1000) if isinstance(seconds, int | float) and seconds > 0 else None,
        bool(enabled),
        errors if isinstance(errors, int) else 0,
    )


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _schedule_text(schedule: dict[str, Any]) -> str | None:
    """The job's schedule as a crontab line where it is one (``every`` 1 minute is
    ``*/1 * * * *``), else None."""
    if schedule.get("kind") == "cron" and isinstance(schedule.get("expr"), str):
        return str(schedule["expr"])
    every = schedule.get("everyMs")
    if schedule.get("kind") == "every" and isinstance(every, int) and every > 0:
        minutes, rest = divmod(every, 60_000)
        if not rest and 0 < minutes < 60 and 60 % minutes == 0:
            return f"*/{minutes} * * * *"
        hours, rest = divmod(every, 3_600_000)
        if not rest and 0 < hours < 24 and 24 % hours == 0:
            return f"0 */{hours} * * *"
    return None


FIXED_RETRIES: Final = (
    "the gateway's retries are built in (3, after 30 s, 60 s and 5 min) and cannot be set"
    " (`cron.retry` was removed in 2026.8): where they are not enough, run the command"
    " through `tunerd exec`, which retries as the wrapper does"
)


def native_runs(history: History, now: float) -> list[Entry]:
    """The history's runs, rebuilt from its executions (``inputs.gateway``)."""
    return list(runs(history.jobs, history.executions, int(now * 1000)))


def in_force_of(job: Job) -> InForce:
    """What a native job runs with: its timeout, and the gateway's fixed retries."""
    return InForce(
        maxRetries=len(BACKOFF_MS),
        timeout=job.timeout_ms,
        backoffBase=BACKOFF_MS[0],
        backoff="fixed",
        source=f"OpenClaw job {job.id} (native cron)",
        fixed=(("maxRetries", FIXED_RETRIES), ("backoffBase", FIXED_RETRIES)),
    )


DISABLED_AT: Final = 10
"""Consecutive errors after which the gateway disables a recurring job."""
WARN_AT: Final = 5


def advisories(history: History) -> list[Advisory]:
    """Native jobs on their way to being disabled by the gateway (10 errors in a row)."""
    return [
        Advisory(
            "disabled_soon",
            job.name,
            job.consecutive_errors,
            f"{job.name}: {job.consecutive_errors} errors in a row; OpenClaw disables a recurring"
            f" job after {DISABLED_AT}. Look at its last error (`openclaw cron runs --id"
            f" {job.id}`) before it stops running.",
        )
        for job in history.jobs.values()
        if job.enabled and WARN_AT <= job.consecutive_errors < DISABLED_AT
    ]
