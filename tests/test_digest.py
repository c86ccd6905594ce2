"""The digest of a gateway's history kept between commands (issue 14): counted as the runs
themselves count, and after the gateway wrote, dropped or renamed things, equal to a fresh
read; a kept digest that is damaged, stale or cannot be written costs time, never a count."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pickle
import shutil
import sqlite3
import struct
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tunerd.inputs.gateway import Execution
from tunerd.inputs.openclaw import kept_digest, native_runs, read_history, read_native
from tunerd.stats import LogStats

from .conftest import ROOT
from .test_engine_cli import cli

SAMPLE = ROOT / "tests" / "data" / "openclaw-cron.sqlite"
DAY = 86400.0


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location(
        "openclaw_bench", ROOT / "bench" / "openclaw_bench.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three jobs of 2,000 executions each (the benchmark's: a third failing, a tenth
    retried), enough runs for the duration sketches to leave their exact mode."""
    state = tmp_path_factory.mktemp("busy") / "openclaw.sqlite"
    _bench().build(state, 3, 2000)
    return state


def the_end(state: Path) -> float:
    db = sqlite3.connect(f"file:{state}?mode=ro", uri=True)
    (last,) = db.execute("SELECT MAX(finished_at_ms) FROM cron_run_receipts").fetchone()
    db.close()
    return last / 1000 + 3600


def fingerprint(stats: LogStats) -> dict[str, Any]:
    """Everything of ``stats`` a command shows (durations to the sketch's accuracy)."""
    found: dict[str, Any] = {"totals": dataclasses.asdict(stats.totals)}
    for name, cron in stats.crons.items():
        for key, b in sorted(cron.buckets.items()):
            sketches = {
                what: (
                    s.count,
                    [round(q, 3) for q in s.quantiles([0.5, 0.95, 0.99])] if s.count else [],
                )
                for what, s in (
                    ("duration", b.duration),
                    ("first", b.first_attempt),
                    ("success", b.success_attempt),
                )
            }
            found[f"{name}@{key}"] = {
                "counts": (b.runs, b.successes, b.retried, b.attempts, b.exhausted),
                "causes": (b.non_retryable, b.non_retryable_first),
                "at": (round(b.first_at, 3), round(b.last_at, 3)),
                "errors": {k: (s.count, s.retries, s.kind) for k, s in b.errors.signatures.items()},
                "timeouts": b.timeout_attempt.bins if b.timeout_attempt else None,
                "sketches": sketches,
            }
        found[f"{name} ran with"] = (cron.params, cron.schedule)
    return found


def fresh(state: Path, now: float, **options: Any) -> dict[str, Any]:
    """What counting the rebuilt runs one by one gives (no digest)."""
    stats = LogStats(**options)
    stats.add_entries(native_runs(read_history(state, now), now), now)
    return fingerprint(stats)


def digested(state: Path, now: float, keep: Path | None = None, **options: Any) -> dict[str, Any]:
    stats = LogStats(**options)
    native = read_native(state, now, keep)
    native.digest.count(stats, native.jobs)
    return fingerprint(stats)


@pytest.mark.parametrize("options", [{}, {"bucket_seconds": DAY}, {"since": "middle"}])
@pytest.mark.parametrize("which", ["sample", "busy"])
def test_the_digest_counts_what_the_runs_count(
    which: str, options: dict[str, Any], busy: Path
) -> None:
    state = SAMPLE if which == "sample" else busy
    now = the_end(state)
    if options.get("since") == "middle":
        options = {
            "since": now - 3600 - (2000 * 60 if which == "busy" else 1800),
            "bucket_seconds": DAY,
        }
    expected = fresh(state, now, **options)
    assert len(expected) > 3 and expected["totals"]["cron_entries"] > 0
    assert digested(state, now, **options) == expected


def receipts(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return db.execute("SELECT * FROM cron_run_receipts ORDER BY started_at_ms").fetchall()


def test_a_kept_digest_reads_what_is_new_and_stays_a_fresh_reads_equal(
    tmp_path: Path, busy: Path
) -> None:
    state, keep, now = changed_copy(tmp_path, busy)
    assert keep.is_file()
    db = sqlite3.connect(state)
    with db:
        # The gateway runs on: an hour more of every job, copied from its first hour.
        rows = receipts(db)
        span = rows[-1][9] - rows[0][9] + 60_000
        for row in rows[: len(rows) // 30]:
            moved = list(row)
            moved[0], moved[9], moved[10] = f"{row[0]}-later", row[9] + span, row[10] + span
            db.execute("INSERT INTO cron_run_receipts VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", moved)
        # ...drops a job's oldest executions (its retention), deletes a job, renames one.
        db.execute(
            "DELETE FROM cron_run_receipts WHERE job_id = 'job-00000' AND started_at_ms < (SELECT"
            " MIN(started_at_ms) FROM cron_run_receipts WHERE job_id = 'job-00000') + 3600000"
        )
        db.execute("DELETE FROM cron_jobs WHERE job_id = 'job-00001'")
        db.execute("UPDATE cron_jobs SET name = 'renamed' WHERE job_id = 'job-00002'")
    later = now + span / 1000
    expected = fresh(state, later)
    assert (
        "renamed (OpenClaw) ran with" in expected
        and "native-00001 (OpenClaw) ran with" not in expected
    )
    assert digested(state, later, keep) == expected
    # What was read before is not read again: an old execution changed behind the digest's back
    # (the gateway never does) is seen by a fresh read only.
    with db:
        db.execute(
            "UPDATE cron_run_receipts SET status = 'error', error_text = 'command exited with"
            " code 1' WHERE job_id = 'job-00002' AND status = 'ok' AND started_at_ms = (SELECT"
            " MAX(started_at_ms) FROM cron_run_receipts WHERE job_id = 'job-00002' AND status ="
            " 'ok' AND started_at_ms < ?)",
            (int(now * 1000) - 7_200_000,),
        )
    db.close()
    assert digested(state, later, keep) == expected != fresh(state, later)


def test_a_damaged_or_stale_digest_is_read_afresh(tmp_path: Path, busy: Path) -> None:
    state = tmp_path / "openclaw.sqlite"
    shutil.copy(SAMPLE, state)
    keep = kept_digest(tmp_path / "tunerd", state)
    now = the_end(SAMPLE)
    sample = fresh(state, now)
    assert digested(state, now, keep) == sample
    keep.write_bytes(keep.read_bytes()[:100])  # a crash mid-write of another tool, a full disk
    assert digested(state, now, keep) == sample
    assert digested(state, now, keep) == sample  # and kept whole again
    # The gateway's database replaced by another (a restore, a new machine): not its digest.
    replacement = tmp_path / "other.sqlite"
    shutil.copy(busy, replacement)
    replacement.replace(state)
    later = the_end(state)
    assert digested(state, later, keep) == fresh(state, later) != sample


def test_a_digest_that_cannot_be_kept_is_said_and_counts_stay_right(tmp_path: Path) -> None:
    blocked = tmp_path / "tunerd"
    blocked.write_text("a file where the state folder should be")
    keep = kept_digest(blocked, SAMPLE)
    now = the_end(SAMPLE)
    assert digested(SAMPLE, now, keep) == fresh(SAMPLE, now)
    unkept = read_native(SAMPLE, now, keep).unkept
    assert unkept is not None and "reads it whole again" in unkept and "\n" not in unkept
    config = tmp_path / "tunerd.toml"
    config.write_text(f'log_path = "{tmp_path / "none.jsonl"}"\nstate_dir = "{blocked}"\n')
    done = cli("analyze", "--openclaw", str(SAMPLE), "--config", str(config), home=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert done.stderr.count("tunerd: warning: the digest of OpenClaw's history is not kept") == 1


def test_a_kept_digest_is_data_never_code(tmp_path: Path) -> None:
    """Whoever could write the state folder cannot make tunerd run anything by it."""
    keep = kept_digest(tmp_path / "tunerd", SAMPLE)
    keep.parent.mkdir(parents=True)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    keep.write_bytes(pickle.dumps(Payload()))
    now = the_end(SAMPLE)
    assert digested(SAMPLE, now, keep) == fresh(SAMPLE, now)
    assert not marker.exists()
    assert keep.read_bytes()[:2] != pickle.dumps(None)[:2]  # kept afresh, as plain data


@pytest.mark.parametrize(
    "change",
    ["latest beyond SQLite", "params beyond dates", "held backwards", "infinite durations"],
)
def test_a_digest_changed_by_hand_is_read_afresh_never_crashed_on(
    tmp_path: Path, change: str
) -> None:
    from tunerd.inputs.openclaw import _Kept

    state, keep, now = changed_copy(tmp_path, SAMPLE)
    expected = fresh(state, now)
    kept = msgspec.msgpack.decode(keep.read_bytes(), type=_Kept)
    job = next(iter(kept.jobs))
    if change == "latest beyond SQLite":
        kept.latest[job] = 2**63 - 1
    elif change == "params beyond dates":
        kept.params[job] = (2**62, {"configRevision": "x"})
    elif change == "held backwards":
        kept.held[job] = [Execution(job, 2_000_000_000_000, 1_000_000_000_000, False, "x")]
    else:
        shape = kept.jobs[job][0]
        shape.total = struct.pack("f", math.inf) * (len(shape.total) // 4)
    keep.write_bytes(msgspec.msgpack.encode(kept))
    assert digested(state, now, keep) == expected == fresh(state, now)


def changed_copy(tmp_path: Path, source: Path) -> tuple[Path, Path, float]:
    """A copy of ``source`` with a digest kept of it, and the time of that first command."""
    state = tmp_path / "openclaw.sqlite"
    shutil.copy(source, state)
    keep = kept_digest(tmp_path / "tunerd", state)
    now = the_end(state)
    assert digested(state, now, keep) == fresh(state, now)
    return state, keep, now


def run_again(db: sqlite3.Connection, job: str, shift_ms: int, store: str = "s") -> None:
    """The gateway runs ``job`` again: its first ten executions, ``shift_ms`` later."""
    rows = db.execute(
        "SELECT * FROM cron_run_receipts WHERE job_id = ? ORDER BY started_at_ms LIMIT 10", (job,)
    ).fetchall()
    for row in rows:
        moved = list(row)
        moved[0], moved[1], moved[9], moved[10] = (
            f"{row[0]}+",
            store,
            row[9] + shift_ms,
            row[10] + shift_ms,
        )
        db.execute("INSERT INTO cron_run_receipts VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", moved)


def test_a_database_copied_over_in_place_is_read_afresh(tmp_path: Path, busy: Path) -> None:
    """``cp`` of an older copy over the database keeps its inode: the digest is not its."""
    older = tmp_path / "older.sqlite"
    shutil.copy(busy, older)
    state, keep, now = changed_copy(tmp_path, busy)
    db = sqlite3.connect(older)
    with db:
        db.execute(
            "DELETE FROM cron_run_receipts WHERE started_at_ms > ?", (int(now * 1000) - 9e6,)
        )
    db.close()
    inode = state.stat().st_ino
    shutil.copyfile(older, state)
    assert state.stat().st_ino == inode
    later = now + 3600
    assert digested(state, later, keep) == fresh(state, later)


def test_a_job_moved_to_another_store_or_deleted_and_added_again_keeps_its_history(
    tmp_path: Path, busy: Path
) -> None:
    state, keep, now = changed_copy(tmp_path, busy)
    db = sqlite3.connect(state)
    job = db.execute("SELECT * FROM cron_jobs WHERE job_id = 'job-00001'").fetchone()
    with db:
        db.execute("UPDATE cron_jobs SET store_key = 's2' WHERE job_id = 'job-00000'")
        run_again(db, "job-00000", 3 * 86_400_000, store="s2")
        db.execute("DELETE FROM cron_jobs WHERE job_id = 'job-00001'")
    later = now + 4 * 86400
    assert digested(state, later, keep) == fresh(state, later)
    with db:
        db.execute(f"INSERT INTO cron_jobs VALUES ({','.join('?' * len(job))})", job)
    db.close()
    assert digested(state, later, keep) == fresh(state, later)


def test_skipped_executions_are_counted_once_and_nothing_new_rewrites_nothing(
    tmp_path: Path,
) -> None:
    state, keep, now = changed_copy(tmp_path, SAMPLE)
    db = sqlite3.connect(state)
    with db:  # the gateway writes an execution that ends before it starts: skipped, and said
        row = list(
            db.execute("SELECT * FROM cron_run_receipts ORDER BY started_at_ms").fetchall()[-1]
        )
        row[0], row[6], row[9], row[10] = (
            "bad",
            "ok",
            int(now * 1000) - 60_000,
            int(now * 1000) - 70_000,
        )
        db.execute("INSERT INTO cron_run_receipts VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", row)
    db.close()
    assert read_history(state, now).skipped == 1
    assert [read_native(state, now, keep).skipped for _ in range(3)] == [1, 1, 1]
    written = keep.stat().st_mtime_ns
    read_native(state, now, keep)
    assert keep.stat().st_mtime_ns == written


def test_analyze_keeps_the_digest_in_its_state_folder_and_shows_the_same(tmp_path: Path) -> None:
    state = tmp_path / "openclaw.sqlite"
    shutil.copy(SAMPLE, state)
    config = tmp_path / "tunerd.toml"
    config.write_text(f'log_path = "{tmp_path / "none.jsonl"}"\nstate_dir = "{tmp_path / "st"}"\n')

    def analyze() -> dict[str, Any]:
        done = cli(
            "analyze", "--openclaw", str(state), "--config", str(config), "--json", home=tmp_path
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    first = analyze()
    assert [p.name for p in (tmp_path / "st" / "openclaw").iterdir()] == [
        kept_digest(tmp_path / "st", state).name
    ]
    assert analyze() == first and first["crons"]
