"""OpenClaw's native cron as an input (issue 14): the real sample a 2026.9.6 gateway wrote, the
older layouts, runs rebuilt from the gateway's own retries, and never in the gateway's way."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from tunerd.inputs.gateway import BACKOFF_MS, MANUAL, RETRY_NOT_RUN, Execution, Job, runs
from tunerd.inputs.openclaw import (
    RECEIPTS,
    RUN_FILES,
    RUN_LOGS,
    OpenClawError,
    native_runs,
    read_history,
)
from tunerd.records import NON_RETRYABLE, failure_cause

from .conftest import ROOT
from .test_engine_cli import cli

SAMPLE = ROOT / "tests" / "data" / "openclaw-cron.sqlite"
"""The cron tables a real OpenClaw 2026.9.6 gateway wrote (shared/data/openclaw-native)."""
NOW = time.time()


def independent_counts(path: Path) -> dict[str, tuple[int, int]]:
    """Per job name: finished executions, and those that were the gateway's retries, counted
    in SQL alone: it is scheduled, the scheduled one before it (same job; manual runs come
    between) failed, the gateway planned its next run one backoff after that failure, and
    this one started then."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    rows = db.execute(
        """
        WITH e AS (
          SELECT j.name, r.started_at_ms AS started, r.finished_at_ms AS finished, r.status,
                 r.request_run_id IS NULL AS scheduled,
                 json_extract(t.detail_json, '$.nextRunAtMs') AS planned
          FROM cron_run_receipts r JOIN cron_jobs j USING (job_id)
          LEFT JOIN task_runs t ON t.run_id = 'cron:' || r.job_id || ':' || r.started_at_ms
               || ':' || r.receipt_id || COALESCE(':' || r.request_run_id, '')
          WHERE r.status IN ('ok', 'error')
        ), ordered AS (
          SELECT *, LAG(status) OVER w AS p_status, LAG(finished) OVER w AS p_finished,
                 LAG(planned) OVER w AS p_planned
          FROM e WINDOW w AS (PARTITION BY name, scheduled ORDER BY started)
        )
        SELECT name || ' (OpenClaw)', COUNT(*),
               SUM(scheduled AND p_status = 'error'
                   AND p_planned - p_finished IN (30000, 60000, 300000)
                   AND ABS(started - p_planned) < 5000)
        FROM ordered GROUP BY name
        """
    ).fetchall()
    return {name: (executions, retries) for name, executions, retries in rows}


def test_every_run_of_the_real_sample_is_read() -> None:
    history = read_history(SAMPLE, NOW)
    assert history.version == RECEIPTS
    expected = independent_counts(SAMPLE)
    assert expected == {
        "flaky-cmd (OpenClaw)": (37, 0),
        "slow-cmd (OpenClaw)": (32, 4),
        "script-test (OpenClaw)": (6, 0),
    }
    entries = native_runs(history, NOW)
    by_job: dict[str, list] = {}
    for entry in entries:
        by_job.setdefault(entry.cron or "", []).append(entry)
    for name, (executions, retries) in expected.items():
        found = by_job[name]
        assert len(found) == executions - retries, name
        assert sum(len(e.attempts) for e in found) == executions, name
    # The gateway's own jobs (heartbeat, memory, skills) never ran: no runs, no noise.
    assert set(by_job) == set(expected)
    slow = by_job["slow-cmd (OpenClaw)"]
    retried = sorted((e for e in slow if len(e.attempts) > 1), key=lambda e: e.timestamp)
    assert [len(e.attempts) for e in retried] == [3, 3]
    # The first: two timeouts, then six manual runs and an edit while its second retry was
    # due; the retry still came, and succeeded. The second: three timeouts, and the history
    # ends with its last retry due and the job disabled: it never came.
    assert [e.type for e in retried] == ["success", "failure"]
    assert retried[1].reason == RETRY_NOT_RUN and failure_cause(retried[1]) == "other"
    flaky_failures = [e for e in by_job["flaky-cmd (OpenClaw)"] if e.type == "failure"]
    assert len(flaky_failures) == 13 and {e.reason for e in flaky_failures} == {NON_RETRYABLE}


def analyze_json(*args: str, home: Path) -> dict:
    done = cli("analyze", *args, "--json", home=home)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_timeouts_of_slow_cmd_are_found_and_a_longer_timeout_proposed(tmp_path: Path) -> None:
    report = analyze_json("--openclaw", str(SAMPLE), home=tmp_path)
    assert "2026.8 or later, cron_run_receipts: 75 executions of 6 jobs" in report["openclaw"]
    crons = {c["cron"]: c for c in report["crons"]}
    slow, flaky = crons["slow-cmd (OpenClaw)"], crons["flaky-cmd (OpenClaw)"]
    assert set(crons) == {"flaky-cmd (OpenClaw)", "slow-cmd (OpenClaw)", "script-test (OpenClaw)"}
    assert slow["params"]["timeout"] == 3000
    assert slow["runs"] == 28 and flaky["runs"] == 37
    db = sqlite3.connect(f"file:{SAMPLE}?mode=ro", uri=True)
    (timed_out,) = db.execute(
        "SELECT COUNT(*) FROM cron_run_receipts r JOIN cron_jobs USING (job_id)"
        " WHERE name = 'slow-cmd' AND error_text LIKE '%timed out%'"
    ).fetchone()
    assert slow["errors"]["timeout"] == timed_out == 15
    proposed = [
        r
        for r in report["recommendations"]
        if r["cron"] == "slow-cmd (OpenClaw)" and r["param"] == "timeout"
    ]
    assert len(proposed) == 1 and proposed[0]["proposed"] > 3000
    # The gateway's retries cannot be set: never proposed, and said why.
    assert not any(r["param"] in ("maxRetries", "backoffBase") for r in report["recommendations"])
    assert "cron.retry" in slow["params_unwritable"]["maxRetries"]
    permanent = [a for a in report["advisories"] if a["type"] == "non_retryable"]
    assert permanent and all("the gateway does not retry" in a["message"] for a in permanent)


def test_the_gateway_is_never_blocked_nor_written(tmp_path: Path) -> None:
    """A writer holds a transaction open while tunerd reads (WAL, as the gateway runs, and the
    old rollback journal): tunerd reads what was committed, the writer commits after, and the
    file's bytes are what the gateway wrote."""
    for mode in ("wal", "delete"):
        state = tmp_path / mode / "openclaw.sqlite"
        state.parent.mkdir()
        shutil.copy(SAMPLE, state)
        gateway = sqlite3.connect(state, isolation_level=None)
        gateway.execute(f"PRAGMA journal_mode={mode}")
        gateway.execute("BEGIN IMMEDIATE")
        gateway.execute("UPDATE cron_jobs SET name = 'renamed' WHERE name = 'flaky-cmd'")
        started = time.monotonic()
        history = read_history(state, NOW)
        assert time.monotonic() - started < 2
        assert "flaky-cmd (OpenClaw)" in {job.name for job in history.jobs.values()}
        gateway.execute("COMMIT")  # not blocked by the reader
        before = hashlib.sha256(state.read_bytes()).hexdigest()
        read_history(state, NOW)
        assert hashlib.sha256(state.read_bytes()).hexdigest() == before
        assert "renamed (OpenClaw)" in {job.name for job in read_history(state, NOW).jobs.values()}
        gateway.close()


def test_an_unknown_schema_is_refused_with_a_message(tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE things (id INTEGER)")
    with pytest.raises(OpenClawError, match="no cron history tunerd knows"):
        read_history(other, NOW)
    odd = tmp_path / "odd.sqlite"
    db = sqlite3.connect(odd)
    db.execute("CREATE TABLE cron_jobs (job_id TEXT, name TEXT)")
    db.execute("CREATE TABLE cron_run_receipts (receipt_id TEXT)")
    db.commit()
    with pytest.raises(OpenClawError, match="has no column"):
        read_history(odd, NOW)
    done = cli("analyze", "--openclaw", str(other), home=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "no cron history tunerd knows" in done.stderr


def finished(job: str, at: int, ok: bool, planned: int | None, error: str = "") -> dict:
    entry = {"ts": at + 500, "jobId": job, "action": "finished", "status": "ok" if ok else "error"}
    entry |= {"runAtMs": at, "durationMs": 500, "nextRunAtMs": planned}
    return entry | ({} if ok else {"error": error, "errorReason": "timeout"})


T0 = 1_780_000_000_000
RETRIED = [  # a timeout, its retry 30 s after the end, which succeeds; then a clean run
    finished("j1", T0, False, T0 + 500 + 30_000, "cron: job execution timed out"),
    finished("j1", T0 + 30_500, True, T0 + 60_000),
    finished("j1", T0 + 60_000, True, T0 + 120_000),
]


def test_the_2026_6_table_and_the_older_files_are_read(tmp_path: Path) -> None:
    state = tmp_path / "openclaw.sqlite"
    db = sqlite3.connect(state)
    db.execute(
        "CREATE TABLE cron_jobs (store_key TEXT, job_id TEXT, name TEXT, enabled INTEGER,"
        " job_json TEXT, state_json TEXT)"
    )
    db.execute(
        "CREATE TABLE cron_run_logs (store_key TEXT, job_id TEXT, seq INTEGER, entry_json TEXT)"
    )
    job = {"id": "j1", "name": "nightly", "payload": {"kind": "command", "timeoutSeconds": 60}}
    db.execute(
        "INSERT INTO cron_jobs VALUES ('s', 'j1', 'nightly', 1, ?, '{}')", (json.dumps(job),)
    )
    for seq, entry in enumerate(RETRIED):
        db.execute("INSERT INTO cron_run_logs VALUES ('s', 'j1', ?, ?)", (seq, json.dumps(entry)))
    db.commit()
    history = read_history(state, NOW)
    assert history.version == RUN_LOGS and history.jobs["j1"].timeout_ms == 60_000
    entries = native_runs(history, NOW)
    assert [(e.cron, e.type, len(e.attempts)) for e in entries] == [
        ("nightly (OpenClaw)", "success", 2),
        ("nightly (OpenClaw)", "success", 1),
    ]
    folder = tmp_path / "cron"
    (folder / "runs").mkdir(parents=True)
    (folder / "jobs.json").write_text(json.dumps({"version": 1, "jobs": [job]}))
    (folder / "runs" / "j1.jsonl").write_text("".join(json.dumps(e) + "\n" for e in RETRIED))
    old = read_history(folder, NOW)
    assert old.version == RUN_FILES
    assert [(e.cron, len(e.attempts)) for e in native_runs(old, NOW)] == [
        ("nightly (OpenClaw)", 2),
        ("nightly (OpenClaw)", 1),
    ]


def test_one_jobs_history_is_read_alone_as_the_whole_read_has_it(tmp_path: Path) -> None:
    """An experiment's verdict reads its job's executions only (through the gateway's index):
    the same runs the whole read has for it, none of another job's."""
    whole = native_runs(read_history(SAMPLE, NOW), NOW)
    for name in ("slow-cmd (OpenClaw)", "flaky-cmd (OpenClaw)"):
        alone = native_runs(read_history(SAMPLE, NOW, {name}), NOW)
        assert alone == [e for e in whole if e.cron == name] and alone
    assert native_runs(read_history(SAMPLE, NOW, {"gone (OpenClaw)"}), NOW) == []
    folder = tmp_path / "cron"
    (folder / "runs").mkdir(parents=True)
    jobs = [{"id": j, "name": j.upper(), "payload": {"kind": "command"}} for j in ("a", "b")]
    (folder / "jobs.json").write_text(json.dumps({"jobs": jobs}))
    for job in ("a", "b"):
        lines = [dict(e, jobId=job) for e in RETRIED]
        (folder / "runs" / f"{job}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    found = native_runs(read_history(folder, NOW, {"B (OpenClaw)"}), NOW)
    assert [(e.cron, len(e.attempts)) for e in found] == [("B (OpenClaw)", 2), ("B (OpenClaw)", 1)]


def test_retries_are_told_by_their_timing() -> None:
    """Without the planned next run (older history), a transient failure's retry is the
    scheduled execution one backoff after it; a permanent failure is never retried."""
    jobs = {"j": Job("j", "job", enabled=True)}
    at = T0
    chain = []
    for delay in (0, *BACKOFF_MS):  # a failure and its three retries, all timing out
        at += delay
        chain.append(Execution("j", at, at + 1000, False, "cron: job execution timed out"))
        at += 1000
    permanent = Execution("j", at + 60_000, at + 61_000, False, "command exited with code 1")
    after = Execution("j", at + 90_000, at + 91_000, True)  # 29 s later: not a retry of it
    found = list(runs(jobs, [*chain, permanent, after], int(NOW * 1000)))
    assert [len(e.attempts) for e in found] == [4, 1, 1]
    assert [failure_cause(e) for e in found[:2]] == ["exhausted", "non_retryable"]
    # A transient failure whose retry is still due is in flight: not counted yet.
    pending = Execution("j", T0, T0 + 1000, False, "HTTP 429 rate limited")
    assert list(runs(jobs, [pending], T0 + 2000)) == []
    assert len(list(runs(jobs, [pending], T0 + 1000 + 60_000))) == 1  # its retry never came


def test_both_inputs_at_once_from_the_configuration(tmp_path: Path) -> None:
    """The wrapper's log and the gateway's history in one analysis; a configured history that
    cannot be read is said and left out, never the end of the analysis."""
    from .conftest import REAL_SAMPLE

    config = tmp_path / "tunerd.toml"
    config.write_text(
        f'log_path = "{REAL_SAMPLE}"\nstate_dir = "{tmp_path / "state"}"\nwindow = "3650d"\n'
        f'[openclaw]\nstate = "{SAMPLE}"\n'
    )
    report = analyze_json("--config", str(config), home=tmp_path)
    names = {c["cron"] for c in report["crons"]}
    assert {"slow-cmd (OpenClaw)", "flaky-cmd (OpenClaw)", "TQQQ 15분 모니터링"} <= names
    status = cli("status", "--config", str(config), "--json", home=tmp_path)
    assert status.returncode == 0, status.stderr
    rows = {c["cron"]: c for c in json.loads(status.stdout)["crons"]}
    slow = rows["slow-cmd (OpenClaw)"]
    assert slow["params"]["timeout"] == 3000 and "native cron" in slow["params_source"]
    broken = tmp_path / "broken.sqlite"
    sqlite3.connect(broken).execute("CREATE TABLE x (y)")
    config.write_text(config.read_text().replace(str(SAMPLE), str(broken)))
    done = cli("analyze", "--config", str(config), "--json", home=tmp_path)
    assert done.returncode == 0 and "native cron runs not read" in done.stderr
    assert "TQQQ 15분 모니터링" in {c["cron"] for c in json.loads(done.stdout)["crons"]}


def hostile_copy(tmp_path: Path) -> Path:
    """The sample with what a damaged or hand-edited state holds: absurd times, an end before
    its start, a failure's details that are not JSON, an error text cut inside a character,
    impossible timeouts, and a job of the same name as the wrapper's cron."""
    state = tmp_path / "hostile.sqlite"
    shutil.copy(SAMPLE, state)
    db = sqlite3.connect(state)
    row = db.execute("SELECT * FROM cron_run_receipts WHERE status = 'error' LIMIT 1").fetchone()
    for n, (started, finished) in enumerate(
        [(row[9], 9223372036854775807), (-5_000_000_000_000_000, row[10]), (row[10], row[9])]
    ):
        db.execute(
            "INSERT INTO cron_run_receipts VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (f"bad-{n}", *row[1:9], started, finished, row[11]),
        )
    db.execute("UPDATE task_runs SET detail_json = '{not json' WHERE status = 'failed'")
    db.execute(
        "UPDATE cron_run_receipts SET error_text = CAST(x'ff41' AS TEXT) WHERE receipt_id ="
        " (SELECT receipt_id FROM cron_run_receipts WHERE status = 'error' LIMIT 1 OFFSET 1)"
    )
    for name, seconds in (("flaky-cmd", "1e999"), ("script-test", "0.0001")):
        db.execute(
            "UPDATE cron_jobs SET job_json = json_set(job_json, '$.payload.timeoutSeconds',"
            f" json('{seconds}')) WHERE name = ?",
            (name,),
        )
    db.execute("UPDATE cron_jobs SET name = 'TQQQ 15분 모니터링' WHERE name = 'slow-cmd'")
    db.commit()
    return state


def test_a_damaged_history_loses_no_good_run_and_merges_nothing(tmp_path: Path) -> None:
    from .conftest import REAL_SAMPLE

    state = hostile_copy(tmp_path)
    done = cli("analyze", str(REAL_SAMPLE), "--openclaw", str(state), "--json", home=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "3 native executions skipped" in done.stderr
    report = json.loads(done.stdout)
    crons = {c["cron"]: c for c in report["crons"]}
    # The wrapper's cron and the native job of the same name stay two crons.
    assert crons["TQQQ 15분 모니터링"]["runs"] == 51
    assert crons["TQQQ 15분 모니터링 (OpenClaw)"]["runs"] == 28
    assert crons["flaky-cmd (OpenClaw)"]["runs"] == 37  # the cut error text did not lose it
    for name in ("flaky-cmd (OpenClaw)", "script-test (OpenClaw)"):
        assert crons[name]["params"]["timeout"] is None
    untrusted = {a["subject"] for a in report["advisories"] if a["type"] == "untrusted_value"}
    assert {"flaky-cmd (OpenClaw)", "script-test (OpenClaw)"} <= untrusted


def test_a_retry_running_now_is_not_a_final_failure(tmp_path: Path) -> None:
    """The last chain of slow-cmd waits for its retry; with the job enabled and that retry
    running, the run is in flight: not counted yet."""
    state = tmp_path / "running.sqlite"
    shutil.copy(SAMPLE, state)
    db = sqlite3.connect(state)
    db.execute("UPDATE cron_jobs SET enabled = 1 WHERE name = 'slow-cmd'")
    (job, last) = db.execute(
        "SELECT job_id, MAX(finished_at_ms) FROM cron_run_receipts JOIN cron_jobs USING (job_id)"
        " WHERE name = 'slow-cmd'"
    ).fetchone()
    db.execute(
        "INSERT INTO cron_run_receipts (receipt_id, store_key, job_id, config_revision, agent_id,"
        " status, owner_pid, started_at_ms) VALUES ('now', 's', ?, 'r', 'main', 'running', 1, ?)",
        (job, last + 300_000),
    )
    db.commit()
    runs_now = [e for e in native_runs(read_history(state, NOW), NOW) if "slow" in (e.cron or "")]
    assert len(runs_now) == 27  # 28 less the one whose retry runs


def test_a_regular_run_after_a_permanent_failure_is_not_its_retry() -> None:
    """A job every 30 s fails for good; its next regular run falls where a retry would, and
    the history says the gateway planned it: still two runs (the gateway retries only
    transient failures)."""
    jobs = {"j": Job("j", "job")}
    failed = Execution(
        "j", T0, T0 + 40, False, "command exited with code 1", None, False, T0 + 30_040
    )
    regular = Execution("j", T0 + 30_040, T0 + 30_080, True, None, None, False)
    found = list(runs(jobs, [failed, regular], int(NOW * 1000)))
    assert [(e.type, len(e.attempts)) for e in found] == [("failure", 1), ("success", 1)]


def test_manual_runs_in_the_older_layouts_are_told_by_their_run_id(tmp_path: Path) -> None:
    folder = tmp_path / "cron"
    (folder / "runs").mkdir(parents=True)
    manual = [e | {"runId": f"manual:j1:{e['runAtMs']}:1"} for e in RETRIED]
    (folder / "runs" / "j1.jsonl").write_text("".join(json.dumps(e) + "\n" for e in manual))
    found = native_runs(read_history(folder, NOW), NOW)
    assert [len(e.attempts) for e in found] == [1, 1, 1]
    assert found[0].reason == MANUAL


def test_a_missing_log_is_not_hidden_by_a_history_that_cannot_be_read(tmp_path: Path) -> None:
    broken = tmp_path / "broken.sqlite"
    sqlite3.connect(broken).execute("CREATE TABLE x (y)")
    config = tmp_path / "tunerd.toml"
    config.write_text(
        f'log_path = "{tmp_path / "missing.jsonl"}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[openclaw]\nstate = "{broken}"\n'
    )
    done = cli("analyze", "--config", str(config), home=tmp_path)
    assert done.returncode == 1 and "missing.jsonl" in done.stderr


def test_the_cycle_advises_a_native_change_and_writes_nothing(tmp_path: Path) -> None:
    """The weekly cycle sees the native jobs too; no target writes a native job yet, so the
    timeout it finds is advised with the command that sets it, and nothing is written."""
    from .conftest import REAL_SAMPLE

    params = tmp_path / "params.json"
    params.write_text('{"defaults": {}, "crons": {}, "experiments": {}}\n')
    before = params.read_bytes()
    config = tmp_path / "tunerd.toml"
    config.write_text(
        f'log_path = "{REAL_SAMPLE}"\nstate_dir = "{tmp_path / "state"}"\nwindow = "3650d"\n'
        f'params_file = "{params}"\nmin_runs = 5\n[openclaw]\nstate = "{SAMPLE}"\n'
    )
    done = cli("cycle", "--config", str(config), "--json", home=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert not [a for a in report["actions"] if "(OpenClaw)" in a["cron"]]
    advised = [
        a
        for a in report["advisories"]
        if a["type"] == "cannot_apply" and a["subject"] == "slow-cmd (OpenClaw)"
    ]
    assert len(advised) == 1 and "openclaw cron edit c1366be8" in advised[0]["message"]
    assert params.read_bytes() == before
    history = cli("history", "--config", str(config), "--json", home=tmp_path)
    assert "(OpenClaw)" not in history.stdout


def test_the_default_state_is_read_when_it_is_there(tmp_path: Path) -> None:
    """`[openclaw] state` left out: ~/.openclaw/state/openclaw.sqlite (expanded, not taken as
    a relative path)."""
    from .conftest import REAL_SAMPLE

    default = tmp_path / ".openclaw" / "state" / "openclaw.sqlite"
    default.parent.mkdir(parents=True)
    shutil.copy(SAMPLE, default)
    config = tmp_path / "tunerd.toml"
    config.write_text(f'log_path = "{REAL_SAMPLE}"\nstate_dir = "{tmp_path / "state"}"\n')
    report = analyze_json("--config", str(config), home=tmp_path)
    assert report["openclaw"] is not None and str(default) in report["openclaw"]


def test_a_state_tunerd_may_not_look_at_is_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's folder belongs to another user: Python 3.11 raises PermissionError where
    it cannot look (root here can look anywhere, so the refusal is simulated)."""
    from tunerd.inputs import openclaw

    def denied(self: Path, *args: object, **kwargs: object) -> bool:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "exists", denied)
    monkeypatch.setattr(Path, "is_dir", denied)
    assert openclaw.there(tmp_path / "x")
    with pytest.raises(OpenClawError, match="cannot look at OpenClaw's state"):
        read_history(tmp_path / "x", NOW)


def test_following_the_history_look_by_look_gives_what_one_read_gives(tmp_path: Path) -> None:
    """The daemon's follower reads only what is new at each look; whatever the moments of the
    looks (between a failure and its retry, while a retry runs), the runs it gives add up to
    those of one read of the whole history at the end."""
    from tunerd.inputs.openclaw import HistoryFollower

    state = tmp_path / "openclaw.sqlite"
    shutil.copy(SAMPLE, state)
    db = sqlite3.connect(state)
    rows = db.execute("SELECT * FROM cron_run_receipts ORDER BY started_at_ms").fetchall()
    db.execute("DELETE FROM cron_run_receipts")
    db.execute("UPDATE cron_jobs SET enabled = 1")  # as they were while they ran
    db.commit()
    starts = sorted({row[9] for row in rows})
    follower = HistoryFollower(state)
    got: list[tuple[object, ...]] = []

    def key(entry: object) -> tuple[object, ...]:
        return (
            entry.cron,  # type: ignore[attr-defined]
            entry.timestamp,  # type: ignore[attr-defined]
            entry.type,  # type: ignore[attr-defined]
            len(entry.attempts),  # type: ignore[attr-defined]
            entry.reason,  # type: ignore[attr-defined]
        )

    ends = {row[10] for row in rows if row[10] is not None}
    looks = sorted(set(starts) | ends | {end + 15_000 for end in ends})  # also while a retry is due
    for n, cut in enumerate(looks):
        with db:
            for row in rows:
                if row[9] <= cut:  # started by now: running until its end has passed
                    done = row[10] is not None and row[10] <= cut
                    values = list(row)
                    if not done:
                        values[6], values[10], values[11] = "running", None, None
                    db.execute(
                        "INSERT OR REPLACE INTO cron_run_receipts VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        values,
                    )
        update = follower.poll(cut / 1000)
        assert update.whole == (n == 0)
        got += [key(e) for e in update.runs]
    with db:
        db.execute("DELETE FROM cron_run_receipts")
        db.executemany("INSERT INTO cron_run_receipts VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    db.close()
    later = starts[-1] / 1000 + 3600
    got += [key(e) for e in follower.poll(later).runs]
    whole = [key(e) for e in native_runs(read_history(state, later), later)]
    assert sorted(got, key=repr) == sorted(whole, key=repr)
    assert len(whole) == 37 + 28 + 6
