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

import contextlib
import hashlib
import json
import logging
import math
import os
import shlex
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

import msgspec

from tunerd.inputs.digest import Digest, KeptShape
from tunerd.inputs.gateway import (
    BACKOFF_MS,
    INTERRUPTED,
    SAFE_ID,
    Execution,
    Job,
    is_native,
    job_runs,
    runs,
)
from tunerd.params import InForce, untrusted
from tunerd.records import Entry
from tunerd.rules import Advisory

if TYPE_CHECKING:
    from tunerd.analysis import ParamsLookup
    from tunerd.config import OpenClawSettings
    from tunerd.stats import LogStats

DEFAULT_STATE: Final = Path("~/.openclaw/state/openclaw.sqlite")
RECEIPTS: Final = "2026.8 or later, cron_run_receipts"
RUN_LOGS: Final = "2026.6-2026.7, cron_run_logs"
RUN_FILES: Final = "before 2026.6, cron/runs/*.jsonl"


class OpenClawError(Exception):
    """The history cannot be read: one line that says why."""


LATEST_MS: Final = 2**53
"""Beyond any time a history holds (a kept digest's times are checked against it)."""
EARLIEST_MS: Final = 946_684_800_000
"""2000-01-01: an execution from before is a clock that was not set (as for the wrapper's log)."""
FUTURE_MS: Final = 86_400_000
"""How far after the time of reading an execution may end (a clock a little wrong)."""
LONGEST_MS: Final = 30 * 86_400_000
"""An execution longer than 30 days is not one (the same bound as a wrapper's run)."""


@dataclass(frozen=True, slots=True)
class History:
    version: str
    """Which of the gateway's layouts it was read from."""
    jobs: dict[str, Job]
    executions: list[Execution]
    running: dict[str, int]
    """Job id -> when its execution in progress started."""
    skipped: int = 0
    """Executions that cannot be real (times out of range, ending before they start, a field
    of the wrong type): left out, like malformed lines of the wrapper's log."""
    bad: tuple[str, ...] = ()
    """Their ids, where the layout has them (``receipt_id``)."""


def read_history(path: Path, now: float, names: set[str] | None = None) -> History:
    """The native jobs and their executions at ``path``: the gateway's state database, or
    (before 2026.6) its ``cron`` folder. ``now`` bounds the times that can be real. ``names``:
    the executions of these jobs alone (``NAME (OpenClaw)``), each read through the gateway's
    index of a job's history, not the whole of it (what an experiment's verdict needs)."""
    path = path.expanduser()
    horizon = int(now * 1000) + FUTURE_MS
    if _is_folder(path):
        return _read_folder(path, horizon, names)
    with _snapshot(path) as db:
        if names is not None and "cron_run_receipts" in _tables(db):
            history = _read_jobs(db, path, horizon, names)
            if history is not None:
                return history
        return _read_database(db, path, horizon)


def read_jobs(path: Path) -> dict[str, Job]:
    """The native jobs alone, by id (what a target reads back after an edit): a cheap read."""
    path = path.expanduser()
    if _is_folder(path):
        return _folder_jobs(path, strict=True)
    with _snapshot(path) as db:
        if "cron_jobs" not in _tables(db):
            raise OpenClawError(f"{path} has no cron_jobs table: is it OpenClaw's state database?")
        return _database_jobs(db, path)


def _is_folder(path: Path) -> bool:
    """A folder (the layout before 2026.6); False for a file; OpenClawError for neither."""
    try:
        folder, file = path.is_dir(), path.is_file()
    except OSError as exc:  # a folder on the way tunerd may not look into
        raise OpenClawError(f"cannot look at OpenClaw's state {path}: {exc.strerror}") from None
    if not folder and not file:
        what = "is not a file" if there(path) else "does not exist"
        raise OpenClawError(f"OpenClaw's state {path} {what}")
    return folder


@contextlib.contextmanager
def _snapshot(path: Path) -> Iterator[sqlite3.Connection]:
    """The database read-only, in one short read transaction (in WAL mode it never blocks the
    gateway's writes); any SQLite error becomes one line."""
    try:
        db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise OpenClawError(f"cannot open OpenClaw's state {path}: {exc}") from None
    try:
        db.execute("PRAGMA query_only = ON")
        db.execute("BEGIN")  # one snapshot, released at once
        try:
            yield db
        finally:
            db.execute("COMMIT")
    except sqlite3.Error as exc:
        hint = ""
        writable = os.access(path.parent, os.W_OK)
        if "readonly" in str(exc) or (not writable and "unable to open" in str(exc)):
            # SQLite could not create the -shm file a WAL reader needs
            hint = (
                ": SQLite needs to create its shared-memory file beside it; run tunerd as the"
                " gateway's user"
            )
        raise OpenClawError(f"cannot read OpenClaw's state {path}: {exc}{hint}") from None
    finally:
        db.close()


def there(path: Path) -> bool:
    """Whether something is at ``path``; True when tunerd may not even look (a folder of the
    gateway's user): reading it then says why, rather than skipping it in silence."""
    try:
        return path.exists()
    except OSError:
        return True


def configured_state(settings: OpenClawSettings) -> Path | None:
    """The configured state to read native runs from: when history is on and it is there."""
    return settings.state if settings.history and there(settings.state) else None


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


def _tables(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _database_jobs(db: sqlite3.Connection, path: Path) -> dict[str, Job]:
    missing = _NEEDS["cron_jobs"] - _columns(db, "cron_jobs")
    if missing:
        raise OpenClawError(
            f"{path}: table cron_jobs has no column {', '.join(sorted(missing))}: a layout of"
            " OpenClaw's that tunerd does not know"
        )
    return _named(
        _job(str(row[0]), row[1], row[2], row[3], row[4])
        for row in db.execute("SELECT job_id, name, enabled, job_json, state_json FROM cron_jobs")
    )


def _read_database(db: sqlite3.Connection, path: Path, horizon: int) -> History:
    tables = _tables(db)
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
    table = "cron_run_receipts" if version == RECEIPTS else "cron_run_logs"
    missing = _NEEDS[table] - _columns(db, table)
    if missing:
        raise OpenClawError(
            f"{path}: table {table} has no column {', '.join(sorted(missing))}: a layout of"
            " OpenClaw's that tunerd does not know"
        )
    jobs = _database_jobs(db, path)
    if version == RECEIPTS:
        executions, bad = _receipts(db, "task_runs" in tables and _has_details(db), horizon)
        return History(version, jobs, executions, _running(db), len(bad), tuple(bad))
    executions, skipped = [], 0
    for job, entry in db.execute("SELECT job_id, entry_json FROM cron_run_logs"):
        found = _finished(str(job), _loads(entry), horizon)
        if isinstance(found, Execution):
            executions.append(found)
        else:
            skipped += found
    return History(version, jobs, executions, {}, skipped)


def _read_jobs(db: sqlite3.Connection, path: Path, horizon: int, names: set[str]) -> History | None:
    """The executions of the jobs named ``names`` alone (None: a layout to read whole)."""
    if "cron_jobs" not in _tables(db) or _NEEDS["cron_run_receipts"] - _columns(
        db, "cron_run_receipts"
    ):
        return None
    jobs = _database_jobs(db, path)
    wanted = {job.id for job in jobs.values() if job.name in names}
    details = "task_runs" in _tables(db) and _has_details(db)
    executions: list[Execution] = []
    bad: list[str] = []
    for store, job_id in _histories(db):
        if job_id in wanted:
            found, ids = _receipts(db, details, horizon, (store, job_id, 0))
            executions += found
            bad += ids
    running = {job: at for job, at in _running(db).items() if job in wanted}
    return History(RECEIPTS, jobs, executions, running, len(bad), tuple(bad))


def _histories(db: sqlite3.Connection) -> list[tuple[Any, str]]:
    """Every (``store_key``, job id) that has executions (a job's history stays under the
    store key it ran with), found by skipping through the gateway's index of a job's history:
    one seek each, whatever the number of executions."""
    found: list[tuple[Any, str]] = []
    next_store = "SELECT MIN(store_key) FROM cron_run_receipts WHERE store_key > ?"
    next_job = "SELECT MIN(job_id) FROM cron_run_receipts WHERE store_key = ? AND job_id > ?"
    (store,) = db.execute("SELECT MIN(store_key) FROM cron_run_receipts").fetchone()
    while store is not None:
        (job,) = db.execute(
            "SELECT MIN(job_id) FROM cron_run_receipts WHERE store_key = ?", (store,)
        ).fetchone()
        while job is not None:
            found.append((store, str(job)))
            (job,) = db.execute(next_job, (store, job)).fetchone()
        (store,) = db.execute(next_store, (store,)).fetchone()
    return found


def _running(db: sqlite3.Connection) -> dict[str, int]:
    """Job id -> when its execution in progress started."""
    return dict(
        db.execute(
            "SELECT job_id, MIN(started_at_ms) FROM cron_run_receipts WHERE status ="
            " 'running' AND typeof(started_at_ms) = 'integer' GROUP BY job_id"
        ).fetchall()
    )


def _has_details(db: sqlite3.Connection) -> bool:
    return {"run_id", "detail_json"} <= _columns(db, "task_runs")


def _receipts(
    db: sqlite3.Connection,
    details: bool,
    horizon: int,
    job: tuple[str, str, int] | None = None,
) -> tuple[list[Execution], list[str]]:
    """Finished executions that can be real, with what ``task_runs`` adds to a failure (the
    error's class, the next run the gateway planned), and the ids of those that could not.
    SQLite does the work: each row comes out as an ``Execution``, no JSON parsed nor value
    converted in Python. ``job``: (store key, job id, from when) for one job's latest
    executions only, through the gateway's own index of each job's history."""
    detail = "NULL"
    if details:
        # Only a failure's details matter: looked up for failures alone, the first if the
        # gateway ever kept two, and only when its JSON is valid.
        detail = (
            "CASE WHEN r.status != 'ok' THEN (SELECT t.detail_json FROM task_runs t WHERE"
            " t.run_id = 'cron:' || r.job_id || ':' || r.started_at_ms || ':' || r.receipt_id"
            " || COALESCE(':' || r.request_run_id, '') AND json_valid(t.detail_json) LIMIT 1)"
            " END"
        )
    real = (
        "typeof(r.job_id) = 'text' AND typeof(r.started_at_ms) = 'integer'"
        " AND typeof(r.finished_at_ms) = 'integer' AND r.started_at_ms >= :earliest"
        " AND r.finished_at_ms <= :horizon AND r.finished_at_ms >= r.started_at_ms"
        " AND r.finished_at_ms - r.started_at_ms <= :longest"
    )
    finished = "r.status IN ('ok', 'error', 'interrupted')"
    if job is not None:
        finished += " AND r.store_key = :store AND r.job_id = :job AND r.started_at_ms >= :since"
    query = (
        "SELECT job_id, started_at_ms, finished_at_ms, ok, error,"
        " CASE WHEN json_type(detail, '$.errorReason') = 'text'"
        "  THEN json_extract(detail, '$.errorReason') END,"
        " manual,"
        " CASE WHEN json_type(detail, '$.nextRunAtMs') IN ('integer', 'real')"
        "  AND json_extract(detail, '$.nextRunAtMs') BETWEEN :earliest AND :far"
        "  THEN CAST(json_extract(detail, '$.nextRunAtMs') AS INTEGER) END,"
        " revision FROM ("
        "  SELECT r.job_id, r.started_at_ms, r.finished_at_ms, r.status = 'ok' AS ok,"
        "  CASE WHEN r.status = 'interrupted' THEN :interrupted"
        "   WHEN typeof(r.error_text) = 'text' THEN r.error_text END AS error,"
        "  r.request_run_id IS NOT NULL AS manual, r.config_revision AS revision,"
        f"  {detail} AS detail FROM cron_run_receipts r WHERE {finished} AND {real})"
    )
    bounds = {
        "earliest": EARLIEST_MS,
        "horizon": horizon,
        "far": horizon + LONGEST_MS,
        "longest": LONGEST_MS,
        "interrupted": f"{INTERRUPTED} the gateway stopped during the run",
    }
    if job is not None:
        bounds |= dict(zip(("store", "job", "since"), job, strict=True))
    try:
        found = list(map(Execution._make, db.execute(query, bounds)))
    except sqlite3.OperationalError as exc:
        if "decode" not in str(exc):
            raise
        # An error text cut inside a character (a command's output) must not lose the
        # history: read again, each text decoded in Python, with a replacement character.
        db.text_factory = lambda data: data.decode("utf-8", "replace")
        found = list(map(Execution._make, db.execute(query, bounds)))
    bad = db.execute(
        f"SELECT r.receipt_id FROM cron_run_receipts r WHERE {finished} AND NOT ({real})", bounds
    )
    return found, [str(receipt) for (receipt,) in bad]


def _finished(job: str, entry: Any, horizon: int) -> Execution | int:
    """One finished entry of a ``cron_run_logs`` row or a ``runs/*.jsonl`` line (``ts,
    status, error, errorReason, runAtMs, durationMs, nextRunAtMs, runId``): its execution, 0
    for an entry of another kind, 1 for one that cannot be real."""
    if not isinstance(entry, dict) or entry.get("action", "finished") != "finished":
        return 0
    status = entry.get("status")
    if status not in ("ok", "error"):
        return 0
    started, duration = _millis(entry.get("runAtMs")), _millis(entry.get("durationMs"))
    if duration is None and entry.get("durationMs") is None:
        duration = 0
    if started is None or duration is None or not EARLIEST_MS <= started <= horizon:
        return 1
    if duration > LONGEST_MS or started + duration > horizon:
        return 1
    planned = _millis(entry.get("nextRunAtMs"))
    error, reason, run = entry.get("error"), entry.get("errorReason"), entry.get("runId")
    return Execution(
        str(entry.get("jobId") or job),
        started,
        started + duration,
        status == "ok",
        error if isinstance(error, str) else None,
        reason if isinstance(reason, str) else None,
        run.startswith("manual:") if isinstance(run, str) else None,
        planned if planned is not None and planned >= EARLIEST_MS else None,
    )


def _millis(value: Any) -> int | None:
    """A whole, finite, non-negative number of milliseconds, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0 or value > 2**62:
        return None
    return int(value)


def _read_folder(folder: Path, horizon: int, names: set[str] | None = None) -> History:
    runs = folder / "runs"
    if not runs.is_dir():
        raise OpenClawError(f"{folder} has no runs/ folder: not OpenClaw's cron folder")
    jobs = _folder_jobs(folder)
    wanted = None if names is None or not jobs else {j.id for j in jobs.values() if j.name in names}
    executions: list[Execution] = []
    skipped = 0
    for file in sorted(runs.glob("*.jsonl")):
        if wanted is not None and file.stem not in wanted:  # ids never become paths
            continue
        try:
            lines = file.read_bytes().splitlines()
        except OSError as exc:
            raise OpenClawError(f"cannot read {file}: {exc.strerror or exc}") from None
        for line in lines:
            execution = _finished(file.stem, _loads(line), horizon)
            if isinstance(execution, Execution):
                executions.append(execution)
            else:
                skipped += execution
    return History(RUN_FILES, jobs, executions, {}, skipped)


def _folder_jobs(folder: Path, strict: bool = False) -> dict[str, Job]:
    """The jobs of ``jobs.json``; ``strict``: one that cannot be read is an ``OpenClawError``
    (a target must not take it for every job deleted), else no jobs known."""
    found: list[Job] = []
    try:
        listed = _loads((folder / "jobs.json").read_bytes())
    except OSError as exc:
        if strict:
            raise OpenClawError(f"cannot read {folder / 'jobs.json'}: {exc.strerror}") from None
        listed = None
    if isinstance(listed, dict):
        listed = listed.get("jobs")
    if strict and not isinstance(listed, list):
        raise OpenClawError(f"{folder / 'jobs.json'} holds no list of jobs")
    for job in listed if isinstance(listed, list) else []:
        if isinstance(job, dict) and isinstance(job.get("id"), str):
            found.append(
                _job(job["id"], job.get("name"), job.get("enabled", True), job, job.get("state"))
            )
    return _named(found)


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
    timeout_ms, problem = None, None
    off = seconds == 0 and not isinstance(seconds, bool)  # the gateway's "no timeout"
    if "timeoutSeconds" in payload and not off:
        milliseconds: Any = seconds
        if isinstance(seconds, int | float) and not isinstance(seconds, bool):
            milliseconds = seconds * 1000 if math.isfinite(seconds) else seconds
        why = untrusted("timeout", milliseconds)
        if why is None and isinstance(seconds, float) and not seconds.is_integer():
            # the gateway's CLI takes whole seconds: tunerd could set it, never set it back
            why = "timeout is not a whole number of seconds"
        if why is None:
            timeout_ms = int(milliseconds)
        else:
            shown = json.dumps(seconds)[:40]
            problem = f"timeoutSeconds {shown}: {why.split(' is ', 1)[-1]}"
    schedule = _object(doc.get("schedule"))
    errors = status.get("consecutiveErrors")
    return Job(
        job_id,
        str(name) if name else job_id,
        _schedule_text(schedule),
        timeout_ms,
        enabled is True or enabled == 1,
        errors if isinstance(errors, int) and not isinstance(errors, bool) else 0,
        problem,
        off,
    )


def _named(jobs: Iterable[Job]) -> dict[str, Job]:
    """Jobs by id, each named ``NAME (OpenClaw)``: a wrapper's cron of the same name (often
    the one the job runs) stays a cron of its own; two jobs of one name get their ids."""
    found = list(jobs)
    names = Counter(job.name for job in found)
    return {
        job.id: replace(
            job,
            name=f"{job.name} (OpenClaw)"
            if names[job.name] == 1
            else f"{job.name} (OpenClaw {job.id[:8]})",
        )
        for job in found
    }


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
    "the gateway's retries are built in (4 attempts: 3 retries, after 30 s, 60 s and 5 min) and"
    " cannot be set"
    " (`cron.retry` was removed in 2026.8): where they are not enough, run the command"
    " through `tunerd exec`, which retries as the wrapper does"
)


@dataclass(frozen=True, slots=True)
class Native:
    """What a one-shot command takes in of the gateway: its jobs, and their runs as a
    digest (``read_native``)."""

    version: str
    jobs: dict[str, Job]
    digest: Digest
    executions: int
    """Executions the runs were rebuilt from (those of runs still in flight included)."""
    skipped: int
    follower: HistoryFollower
    """Where reading stopped (a daemon follows the history on from there)."""
    unkept: str | None = None
    """Why the digest could not be kept, if it could not (one line to say)."""


KEPT_FORMAT: Final = 1
"""The layout of a kept digest; another is dropped and the history read afresh."""


def read_native(path: Path, now: float, keep: Path | None = None) -> Native:
    """The native jobs at ``path`` and their runs. ``keep``: a file (in tunerd's state folder)
    holding the digest between commands, so that each reads only what the gateway wrote
    since the last one (the first reads it all; at the retention cap, about 26 s). A kept
    digest that cannot be read, or of a database since replaced, is read afresh; one that
    cannot be written is said in a log line, and only costs the next command its time."""
    path = path.expanduser()
    identity = _identity(path)  # before reading: a database replaced meanwhile is read afresh
    kept = _kept(keep, path, identity) if keep is not None else None
    follower, digest = kept or (HistoryFollower(path), Digest())
    added, bad = digest.added, set(follower.bad)
    try:
        update = follower.poll(now, digest)
    except (OverflowError, ValueError, TypeError) as exc:  # a digest changed by hand
        if kept is None:
            raise
        logging.getLogger("tunerd").info("kept digest %s not used: %s", keep, exc)
        kept, follower, digest = None, HistoryFollower(path), Digest()
        update = follower.poll(now, digest)
    dropped = digest.keep(update.oldest)
    changed = kept is None or digest.added != added or dropped or follower.bad != bad
    unkept = None
    if keep is not None and update.version == RECEIPTS and changed:
        unkept = _keep(keep, identity, follower, digest)
    executions = digest.executions + follower.pending
    return Native(update.version, update.jobs, digest, executions, update.skipped, follower, unkept)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_dev, found.st_ino


class _Kept(msgspec.Struct):
    """What tunerd keeps of a history between commands: plain data (a file in its state
    folder is never code to run, whoever could write there)."""

    format: int
    identity: tuple[int, int] | None
    latest: dict[str, int]
    held: dict[str, list[Execution]]
    bad: list[str]
    jobs: dict[str, list[KeptShape]]
    params: dict[str, tuple[int, dict[str, str | None]]]


def _kept(
    keep: Path, path: Path, identity: tuple[int, int] | None
) -> tuple[HistoryFollower, Digest] | None:
    """The digest kept for the database at ``path``, if it is still its."""
    try:
        found = msgspec.msgpack.decode(keep.read_bytes(), type=_Kept)
        if found.format != KEPT_FORMAT or found.identity != identity:
            return None
        _plausible(found)
        digest = Digest.from_kept(found.jobs, found.params)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError, ValueError) as exc:  # read afresh
        logging.getLogger("tunerd").info("kept digest %s not used: %s", keep, exc)
        return None
    return HistoryFollower(path, found.latest, found.held, set(found.bad)), digest


def _plausible(found: _Kept) -> None:
    """``ValueError`` for a kept value no reading could have given (a file changed by hand):
    the history is read afresh rather than trusted or crashed on."""
    times = [*found.latest.values(), *(end for end, _ in found.params.values())]
    for chain in found.held.values():
        for e in chain:
            times += [e.started_ms, e.finished_ms, e.next_ms or EARLIEST_MS]
            if e.finished_ms < e.started_ms:
                raise ValueError("an execution held ends before it starts")
    if any(not EARLIEST_MS <= t <= LATEST_MS for t in times):
        raise ValueError("a time out of range")


def _keep(
    keep: Path, identity: tuple[int, int] | None, follower: HistoryFollower, digest: Digest
) -> str | None:
    """Keep the digest (written whole, then renamed over the old one); why not, if it was
    not."""
    kept = _Kept(
        KEPT_FORMAT,
        identity,
        follower.latest or {},
        follower.held,
        sorted(follower.bad),
        digest.kept(),
        digest.params,
    )
    try:
        keep.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".digest-", dir=keep.parent)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(msgspec.msgpack.encode(kept))
            os.replace(temporary, keep)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError as exc:
        return (
            f"the digest of OpenClaw's history is not kept ({exc.strerror or exc}): the next"
            " command reads it whole again"
        )
    return None


def kept_digest(state_dir: Path, path: Path) -> Path:
    """Where tunerd keeps the digest of the history at ``path`` (named by a hash of the path:
    one per gateway read)."""
    name = hashlib.sha256(str(path.expanduser().absolute()).encode()).hexdigest()[:16]
    return state_dir / "openclaw" / f"{name}.digest"


def count_native(
    stats: LogStats, native: Native, in_force: ParamsLookup, can_edit: bool
) -> tuple[ParamsLookup, list[Advisory]]:
    """Count the native jobs' runs into ``stats``; what each runs with, looked up by name
    before ``in_force``; the jobs the gateway is about to disable. The one way ``analyze``,
    ``status`` and the cycle take native jobs in. ``can_edit``: the ``openclaw`` command is
    there to change their timeouts with."""
    native.digest.count(stats, native.jobs)
    jobs = {job.name: in_force_of(job, can_edit) for job in native.jobs.values()}

    def lookup(cron: str, logged: dict[str, Any] | None = None) -> InForce:
        if cron in jobs:
            return jobs[cron]
        return no_job(cron) if is_native(cron) else in_force(cron, logged)

    return lookup, advisories(native.jobs)


def no_job(cron: str) -> InForce:
    """A native job's name with no job behind it (its ``jobs.json`` missing, the job gone, or a
    wrapper's log line that took the name): nothing known, nothing changed."""
    why = f"OpenClaw's state has no job named {cron}: tunerd changes nothing of it"
    return InForce(
        None,
        None,
        None,
        "fixed",
        "OpenClaw (no such job)",
        tuple((param, why) for param in ("maxRetries", "timeout", "backoffBase")),
        retrier="the gateway",
    )


def skipped_text(skipped: int) -> str:
    return (
        f"{skipped:,} native executions skipped: times out of range, an end before the start,"
        " or fields of the wrong type"
    )


def native_runs(history: History, now: float) -> list[Entry]:
    """The history's runs, rebuilt from its executions (``inputs.gateway``)."""
    listed = _listed(history.jobs, history.executions, history.version)
    return list(runs(history.jobs, listed, int(now * 1000), history.running))


def _listed(jobs: dict[str, Job], executions: list[Execution], version: str) -> list[Execution]:
    """The executions of the jobs the gateway still has: it keeps a deleted job's history,
    which is nobody's to analyse or change any more. (Before 2026.6 without ``jobs.json``,
    nothing says which jobs there are: all are kept.)"""
    if version == RUN_FILES and not jobs:
        return executions
    return [e for e in executions if e.job in jobs]


def edit_command(job_id: str) -> str:
    """The command a person runs to set a job's timeout: its id quoted for a shell, or, for an
    id that would read as an option, OpenClaw's own editor (ids come from the gateway's state,
    which tunerd does not trust)."""
    if not SAFE_ID.fullmatch(job_id):
        return "OpenClaw's own tools (its id is not one to paste into a command)"
    return f"`openclaw cron edit {shlex.quote(job_id)} --timeout-seconds N`"


def in_force_of(job: Job, can_edit: bool) -> InForce:
    """What a native job runs with: its timeout (which tunerd changes through the gateway when
    the ``openclaw`` command is there), and the gateway's fixed retries."""
    fixed = [("maxRetries", FIXED_RETRIES), ("backoffBase", FIXED_RETRIES)]
    untrusted_: tuple[tuple[str, str], ...] = ()
    by_hand = f"set it by hand with {edit_command(job.id)}"
    if job.timeout_problem is not None:
        advice = f"set a whole number of seconds with {edit_command(job.id)}"
        fixed.append(("timeout", f"{job.timeout_problem}: {advice}"))
        untrusted_ = (("timeout", f"{job.timeout_problem} (in OpenClaw job {job.id})"),)
    elif not can_edit:
        fixed.append(("timeout", f"the openclaw command is not there ([openclaw] cli): {by_hand}"))
    elif not job.enabled:
        fixed.append(("timeout", "the job is disabled: tunerd changes enabled jobs only"))
    elif not SAFE_ID.fullmatch(job.id):
        fixed.append(("timeout", f"its id is not one tunerd passes to a command: {by_hand}"))
    elif job.timeout_off:
        fixed.append(
            ("timeout", f"timeoutSeconds 0 turns its timeout off; tunerd leaves it: {by_hand}")
        )
    elif job.timeout_ms is None:
        fixed.append(("timeout", f"it sets no timeoutSeconds: {by_hand}"))
    return InForce(
        maxRetries=len(BACKOFF_MS) + 1,  # attempts in all, as the wrapper counts them
        timeout=job.timeout_ms,
        backoffBase=BACKOFF_MS[0],
        backoff="fixed",
        source=f"OpenClaw job {job.id} (native cron)",
        fixed=tuple(fixed),
        untrusted=untrusted_,
        mode=None if any(param == "timeout" for param, _ in fixed) else "switchback",
        retrier="the gateway",
        timeout_step=1000,
    )


def runs_command(job_id: str) -> str:
    if not SAFE_ID.fullmatch(job_id):
        return "with OpenClaw's own tools"
    return f"`openclaw cron runs --id {shlex.quote(job_id)}`"


DISABLED_AT: Final = 10
"""Consecutive errors after which the gateway disables a recurring job."""
WARN_AT: Final = 5


def advisories(jobs: dict[str, Job]) -> list[Advisory]:
    """Native jobs on their way to being disabled by the gateway (10 errors in a row)."""
    return [
        Advisory(
            "disabled_soon",
            job.name,
            job.consecutive_errors,
            f"{job.name}: {job.consecutive_errors} errors in a row; OpenClaw disables a recurring"
            f" job after {DISABLED_AT}. Look at its last error ({runs_command(job.id)}) before"
            " it stops running.",
        )
        for job in jobs.values()
        if job.enabled and WARN_AT <= job.consecutive_errors < DISABLED_AT
    ]


@dataclass(slots=True)
class Update:
    """What a look at the history found: runs that ended since the last look (``whole``: the
    whole history's runs, to count afresh), and the jobs as they are now."""

    runs: list[Entry]
    jobs: dict[str, Job]
    whole: bool
    version: str
    skipped: int = 0
    oldest: dict[str, int] = field(default_factory=dict)
    """Job id -> the start of its oldest execution the gateway still has (older ones it has
    dropped: 7 days, 2,000 a job), for each job that has any."""


class HistoryFollower:
    """The history as the gateway writes it: read whole at the first look, then only each
    job's executions that started after the latest one taken, through the gateway's index of
    a job's history (``store_key, job_id, started_at_ms``): a look costs what changed, not the
    2,000 executions a job the gateway keeps. A job runs one execution at a time, so none can
    finish later that started earlier. The executions of a run whose retry is still due are
    kept and rebuilt with what comes next. The older layouts are read whole at every look.
    A database whose latest execution taken of a job is gone though older ones are there is
    not the one read before (copied over, recreated): it is read whole again."""

    def __init__(
        self,
        path: Path,
        latest: dict[str, int] | None = None,
        pending: dict[str, list[Execution]] | None = None,
        bad: set[str] | None = None,
    ) -> None:
        self.path = path.expanduser()
        self.latest = latest
        """Job id -> the start of the latest execution taken (None: nothing read yet)."""
        self.held = pending or {}
        """Job id -> the executions of its run still in flight."""
        self.bad = bad or set()
        """The ids of the executions that cannot be real, still in the history."""

    def poll(self, now: float, into: Digest | None = None) -> Update:
        """What is new since the last look (``OpenClawError`` when the state cannot be read:
        the next look starts from where this one would have). ``into``: the runs go into
        this digest (cleared first when the whole history is read), not into the update."""
        horizon = int(now * 1000) + FUTURE_MS
        if _is_folder(self.path):
            return self._whole(_read_folder(self.path, horizon), now, into)
        with _snapshot(self.path) as db:  # rows only: the runs are rebuilt once it has ended
            tables = _tables(db)
            newer = None
            if self.latest is not None and "cron_run_receipts" in tables:
                newer = self._newer(db, tables, horizon)
            if newer is None:
                history = _read_database(db, self.path, horizon)
        if newer is None:
            return self._whole(history, now, into)
        history, oldest = newer
        listed = _listed(history.jobs, history.executions, RECEIPTS)
        update = self._rebuild(history.jobs, listed, history.running, now, into)
        update.skipped, update.oldest = len(self.bad), oldest
        return update

    def _newer(
        self, db: sqlite3.Connection, tables: set[str], horizon: int
    ) -> tuple[History, dict[str, int]] | None:
        """Each job's executions that started after the latest taken, as a partial history,
        and the start of each job's oldest execution (the gateway's index has both); None
        when the database is not the one read before."""
        assert self.latest is not None
        details = "task_runs" in tables and _has_details(db)
        jobs = _database_jobs(db, self.path)
        for gone in set(self.latest) - set(jobs):  # deleted: read whole if it comes back
            del self.latest[gone]
            self.held.pop(gone, None)
        executions: list[Execution] = []
        oldest: dict[str, int] = {}
        stores: dict[str, list[Any]] = {}
        for store, job_id in _histories(db):
            if job_id in jobs:
                stores.setdefault(job_id, []).append(store)
        for job_id, found_in in stores.items():
            taken = self.latest.get(job_id)
            for store in found_in:
                since = -1 if taken is None else taken + 1
                found, bad = _receipts(db, details, horizon, (store, job_id, since))
                executions += found
                self.bad.update(bad)
                (first,) = db.execute(
                    "SELECT MIN(started_at_ms) FROM cron_run_receipts WHERE store_key = ? AND"
                    " job_id = ?",
                    (store, job_id),
                ).fetchone()
                if isinstance(first, int) and first < oldest.get(job_id, first + 1):
                    oldest[job_id] = first
            if taken is not None and oldest.get(job_id, taken + 1) <= taken:
                there = "SELECT 1 FROM cron_run_receipts WHERE store_key = ? AND job_id = ? AND"
                there += " started_at_ms = ?"
                if not any(db.execute(there, (st, job_id, taken)).fetchone() for st in found_in):
                    return None
        self.bad = _still_there(db, self.bad)
        return History(RECEIPTS, jobs, executions, _running(db)), oldest

    def _whole(self, history: History, now: float, into: Digest | None) -> Update:
        self.latest, self.held, self.bad = {}, {}, set(history.bad)
        if into is not None:
            into.clear()
        listed = _listed(history.jobs, history.executions, history.version)
        update = self._rebuild(history.jobs, listed, history.running, now, into)
        update.whole, update.version, update.skipped = True, history.version, history.skipped
        for execution in listed:
            if execution.started_ms < update.oldest.get(execution.job, execution.started_ms + 1):
                update.oldest[execution.job] = execution.started_ms
        return update

    def _rebuild(
        self,
        jobs: dict[str, Job],
        executions: list[Execution],
        running: dict[str, int],
        now: float,
        into: Digest | None,
    ) -> Update:
        now_ms = int(now * 1000)
        latest = self.latest if self.latest is not None else {}
        for execution in executions:
            if execution.started_ms > latest.get(execution.job, -1):
                latest[execution.job] = execution.started_ms
        self.latest = latest
        held = [e for chain in self.held.values() for e in chain]
        self.held = {}
        update = Update([], jobs, False, RECEIPTS)
        if into is None:
            update.runs = list(runs(jobs, held + executions, now_ms, running, self.held))
            return update
        built = job_runs(jobs, held + executions, now_ms, running, self.held, into.add_clean)
        for job, start, entry in built:
            into.add(job, start, entry)
        return update

    @property
    def pending(self) -> int:
        """Executions of runs still in flight (their retry due), held for the next look."""
        return sum(map(len, self.held.values()))


def _still_there(db: sqlite3.Connection, ids: set[str]) -> set[str]:
    """Those of ``ids`` the history still has (the gateway drops old executions)."""
    if not ids:
        return ids
    found = db.execute(
        "SELECT receipt_id FROM cron_run_receipts WHERE receipt_id IN (SELECT value FROM"
        " json_each(?))",
        (json.dumps(sorted(ids)),),
    )
    return {str(receipt) for (receipt,) in found}
