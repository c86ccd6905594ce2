"""The acting commands as an operator runs them: real processes, a real SQLite store, real files,
and real crashes (SIGKILL at each step of a change)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import ERR_429, ERR_OTHER, ROOT, run_line

ENV = {k: v for k, v in os.environ.items() if not k.startswith("TUNERD_")}
HOSTILE = ["../../etc/passwd", "@everyone <@123> **bold**"]


def write_log(path: Path) -> None:
    lines = []
    for cron in ["flaky", *HOSTILE]:  # maxRetries 3 -> 4, automatic
        lines += [run_line(cron, (500,)) for _ in range(30)]
        lines += [run_line(cron, (500, 500), error=ERR_OTHER) for _ in range(8)]
        lines += [run_line(cron, (500, 500, 500), ok=False, error=ERR_OTHER) for _ in range(2)]
    lines += [run_line("slow", (25_000,)) for _ in range(40)]  # timeout 37500: manual
    lines += [run_line("api", (300,)) for _ in range(35)]  # backoffBase 1000 -> 2000, automatic
    lines += [run_line("api", (300, 300), error=ERR_429) for _ in range(5)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    write_log(tmp_path / "auto-retry.jsonl")
    params = tmp_path / "params.json"
    params.write_text('{"defaults": {"maxRetries": 3}, "crons": {}, "experiments": {}}\n')
    config = tmp_path / "tunerd.toml"
    config.write_text(
        f'log_path = "{tmp_path / "auto-retry.jsonl"}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'params_file = "{params}"\n'
        'window = "3650d"\nmin_runs = 10\n'
    )
    return {"root": tmp_path, "config": config, "params": params}


def cli(*args: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``tunerd ARGS`` as a user runs it: its own HOME, no TUNERD_ variables."""
    return subprocess.run(
        [sys.executable, "-m", "tunerd", *args],
        capture_output=True,
        text=True,
        env=dict(ENV, HOME=str(home)),
        cwd=ROOT,
        timeout=timeout,
    )


def tunerd(
    setup: dict[str, Path], *args: str, crash: str | None = None, **extra: str
) -> subprocess.CompletedProcess[str]:
    env = dict(ENV, HOME=str(setup["root"]), **extra)
    if crash:
        env["TUNERD_CRASH_AT"] = crash
    return subprocess.run(
        [sys.executable, "-m", "tunerd", *args, "--config", str(setup["config"])],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def as_json(setup: dict[str, Path], *args: str) -> Any:
    done = tunerd(setup, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_cycle_starts_experiments_and_queues_reviews(setup: dict[str, Path]) -> None:
    report = as_json(setup, "cycle")
    results = {(a["cron"], a["param"]): a["result"] for a in report["actions"]}
    assert results == {
        ("flaky", "maxRetries"): "started",
        (HOSTILE[0], "maxRetries"): "started",
        (HOSTILE[1], "maxRetries"): "started",
        ("api", "backoffBase"): "started",
        ("slow", "timeout"): "queued",
    }
    doc = json.loads(setup["params"].read_text())
    assert set(doc["experiments"]) == {"flaky", "api", *HOSTILE}
    assert doc["experiments"]["api"] | {"id": "", "started": ""} == {
        "id": "",
        "param": "backoffBase",
        "control": 1000,
        "treatment": 2000,
        "split": 0.5,
        "started": "",
    }
    assert doc["defaults"] == {"maxRetries": 3}  # what tunerd did not change stays
    # These runs record no params: the start says what happens if Level 1 ignores the file.
    start = next(c for c in as_json(setup, "history")["changes"] if c["cron"] == "flaky")
    assert "its runs record no params" in start["reason"]
    # Cron names are data: nothing was created outside the params file and the state dir.
    assert sorted(p.name for p in setup["root"].iterdir()) == [
        "auto-retry.jsonl",
        "params.json",
        "state",
        "tunerd.toml",
    ]

    # Nothing new: the crons under experiment have no runs since their change, and the slow
    # cron's review is already waiting.
    again = as_json(setup, "cycle")
    assert again["actions"] == []

    status = as_json(setup, "status")
    assert set(status["tail"]) >= {"path", "offset", "entries", "malformed"}
    assert status["tail"]["offset"] == (setup["root"] / "auto-retry.jsonl").stat().st_size
    runs = {c["cron"]: c["runs"] for c in status["crons"]}
    assert runs["flaky"] == 40 and runs["slow"] == 40
    assert {
        (e["cron"], e["param"], e["control"], e["treatment"], e["mode"])
        for e in status["experiments"]
    } >= {("flaky", "maxRetries", 3, 4, "ab")}
    assert all(e["verify_at"] > e["started_at"] for e in status["experiments"])
    (pending,) = status["pending"]
    assert (pending["cron"], pending["param"], pending["current"], pending["proposed"]) == (
        "slow",
        "timeout",
        15000,
        37500,
    )
    assert set(pending) >= {"id", "reason"}


def test_approve_reject_and_rollback(setup: dict[str, Path]) -> None:
    as_json(setup, "cycle")
    review = as_json(setup, "status")["pending"][0]["id"]
    approved = as_json(setup, "approve", str(review))
    assert approved["experiment"]
    assert json.loads(setup["params"].read_text())["experiments"]["slow"]["treatment"] == 37500
    twice = tunerd(setup, "approve", str(review))
    assert twice.returncode == 1 and "approved" in twice.stderr

    history = as_json(setup, "history")
    start = next(c for c in history["changes"] if c["cron"] == "flaky")
    rolled = as_json(setup, "rollback", str(start["id"]))
    assert rolled["rolled_back"] == start["id"]
    doc = json.loads(setup["params"].read_text())
    assert "flaky" not in doc["experiments"] and "flaky" not in doc["crons"]
    history = as_json(setup, "history")
    assert [c["action"] for c in history["changes"] if c["cron"] == "flaky"] == [
        "experiment_start",
        "manual_rollback",
    ]
    assert next(e for e in history["experiments"] if e["cron"] == "flaky")["state"] == "aborted"
    # Not proposed again: only runs after the rollback count, and the change is in its cooldown.
    again = as_json(setup, "cycle")
    assert [a for a in again["actions"] if a["cron"] == "flaky"] == []
    with setup["params"].open() as f:
        assert "flaky" not in json.load(f)["experiments"]
    missing = tunerd(setup, "rollback", "999")
    assert missing.returncode == 1 and "no change 999" in missing.stderr


def test_rejected_reviews_are_not_proposed_again(setup: dict[str, Path]) -> None:
    as_json(setup, "cycle")
    review = as_json(setup, "status")["pending"][0]["id"]
    as_json(setup, "reject", str(review))
    assert as_json(setup, "status")["pending"] == []
    slow = next(a for a in as_json(setup, "cycle")["actions"] if a["cron"] == "slow")
    assert slow["result"] == "held" and "cooldown" in slow["detail"]
    # The rejection is in the history, as a person reads it.
    history = tunerd(setup, "history").stdout
    assert f"review {review}" in history and "rejected" in history and "operator:" in history


def test_what_status_prints_is_what_a_person_types(setup: dict[str, Path]) -> None:
    """Experiment, review and change ids are told apart: status names the change that undoes
    each experiment, and a period under an hour is said in minutes."""
    with setup["config"].open("a") as f:
        f.write('verify_after = "20m"\n')
    as_json(setup, "cycle")
    text = tunerd(setup, "status").stdout
    doc = as_json(setup, "status")
    flaky = next(e for e in doc["experiments"] if e["cron"] == "flaky")
    line = next(x for x in text.splitlines() if x.startswith(f"  experiment {flaky['id']}: flaky"))
    assert "verdict in 19 min" in line or "verdict in 20 min" in line
    assert line.endswith(f"to undo it: tunerd rollback {flaky['change']}")
    review = doc["pending"][0]["id"]
    assert f"(tunerd approve {review} | tunerd reject {review})" in text
    undone = as_json(setup, "rollback", str(flaky["change"]))
    assert undone["rolled_back"] == flaky["change"]
    assert "flaky" not in {e["cron"] for e in as_json(setup, "status")["experiments"]}


def test_script_target_takes_turns_and_is_exact(setup: dict[str, Path]) -> None:
    good = setup["root"] / "flaky.js"
    good.write_text("const CONFIG = {\n  MAX_RETRIES: 3,\n};\nexec(c, { timeout: 15000 });\n")
    ambiguous = setup["root"] / "api.js"
    ambiguous.write_text("const a = { BACKOFF_BASE: 1000 };\nconst b = { baseDelay: 1000 };\n")
    with setup["config"].open("a") as f:
        f.write(f'[[scripts]]\ncron = "flaky"\npath = "{good}"\n')
        f.write(f'[[scripts]]\ncron = "api"\npath = "{ambiguous}"\n')
    report = as_json(setup, "cycle")
    results = {a["cron"]: (a["result"], a["detail"]) for a in report["actions"]}
    assert results["flaky"][0] == "started"
    # A switchback experiment: the script starts on the value of the hour block it began in.
    start = next(c for c in as_json(setup, "history")["changes"] if c["cron"] == "flaky")
    assert start["to"] in (3, 4) and f"MAX_RETRIES: {start['to']}," in good.read_text()
    # A change the script cannot take is said, not queued for a person who could not apply it.
    assert "api" not in results
    (advice,) = [a for a in report["advisories"] if a["type"] == "cannot_apply"]
    assert advice["subject"] == "api" and "matches 2 times" in advice["message"]
    assert ambiguous.read_text().count("1000") == 2
    modes = {e["cron"]: e["mode"] for e in as_json(setup, "status")["experiments"]}
    assert modes["flaky"] == "switchback"


@pytest.mark.parametrize(
    "point", ["after_rollback_point", "mid_write", "after_rename", "before_history"]
)
def test_a_crash_at_any_step_leaves_old_or_new_and_history_agrees(
    setup: dict[str, Path], point: str
) -> None:
    before = setup["params"].read_text()
    crashed = tunerd(setup, "cycle", crash=point)
    assert crashed.returncode == -9
    doc = json.loads(setup["params"].read_text())  # always valid JSON
    assert setup["params"].read_text() == before or len(doc["experiments"]) == 4
    history = as_json(setup, "history")  # recovery runs first
    changes = history["changes"]  # the cycle's starts are one write: all of them, or none
    assert len(changes) == 4 and len({c["state"] for c in changes}) == 1
    assert changes[0]["state"] in {"applied", "aborted"}
    applied = changes[0]["state"] == "applied"
    assert set(doc["experiments"]) == ({c["cron"] for c in changes} if applied else set())
    states = {e["state"] for e in history["experiments"]}
    assert states == {"running" if applied else "aborted"}
    assert [p.name for p in setup["root"].iterdir() if p.name.startswith(".tunerd-")] == []
    # After recovery the daemon's next cycle goes on as if nothing happened.
    report = as_json(setup, "cycle")
    assert all(a["result"] in {"started", "queued", "held"} for a in report["actions"])
    doc = json.loads(setup["params"].read_text())
    assert set(doc["experiments"]) == {"flaky", "api", *HOSTILE}


def test_concurrent_cycles_start_each_experiment_once(setup: dict[str, Path]) -> None:
    env = dict(ENV, HOME=str(setup["root"]))
    cmd = [sys.executable, "-m", "tunerd", "cycle", "--json", "--config", str(setup["config"])]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [o[1] for o in outputs]
    started = [
        a for out, _ in outputs for a in json.loads(out)["actions"] if a["result"] == "started"
    ]
    assert sorted(a["cron"] for a in started) == sorted(["flaky", "api", *HOSTILE])
    history = as_json(setup, "history")
    assert len([c for c in history["changes"] if c["action"] == "experiment_start"]) == 4
    assert len(history["reviews"]) == 1


def test_a_newer_store_is_refused_clearly(setup: dict[str, Path]) -> None:
    import sqlite3

    as_json(setup, "history")
    db = sqlite3.connect(setup["root"] / "state" / "tunerd.sqlite3")
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    done = tunerd(setup, "status")
    assert done.returncode == 1 and "newer than this tunerd" in done.stderr


def test_an_older_store_is_migrated(setup: dict[str, Path]) -> None:
    import sqlite3

    from tunerd.store import SCHEMA

    (setup["root"] / "state").mkdir()
    db = sqlite3.connect(setup["root"] / "state" / "tunerd.sqlite3")
    db.executescript(SCHEMA[0])
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute(
        "INSERT INTO reviews (cron, param, current, proposed, reason, why_manual, state,"
        " created_at)"
        " VALUES ('old', 'timeout', 15000, 40000, 'kept', 'manual', 'pending', 0)"
    )
    db.commit()
    db.close()
    status = as_json(setup, "status")
    assert status["pending"][0]["cron"] == "old"
    assert status["notifications"] == {"pending": 0, "dead": 0}
    db = sqlite3.connect(setup["root"] / "state" / "tunerd.sqlite3")
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
        str(len(SCHEMA)),
    )


def test_a_missing_log_is_a_clear_error_even_with_experiments_running(
    setup: dict[str, Path],
) -> None:
    as_json(setup, "cycle")
    (setup["root"] / "auto-retry.jsonl").rename(setup["root"] / "gone.jsonl")
    done = tunerd(setup, "cycle")
    assert done.returncode == 1
    assert "cannot read the log" in done.stderr and "Traceback" not in done.stderr
    status = as_json(setup, "status")  # status still shows what is under way
    assert len(status["experiments"]) == 4 and "error" in status["tail"]


def test_a_cycle_reads_what_logrotate_moved_out_of_the_window(setup: dict[str, Path]) -> None:
    """Rotated by rename (`.1`, plain) during the window: counted; compressed, or older than
    the window: not read."""
    import gzip
    import os
    import time

    log = setup["root"] / "auto-retry.jsonl"
    before = len(log.read_text().splitlines())
    log.rename(log.with_name("auto-retry.jsonl.1"))
    log.write_text(run_line("flaky", (500,)) + "\n")
    stale = log.with_name("auto-retry.jsonl.2")
    stale.write_text(run_line("flaky", (500,)) + "\n")
    old = time.time() - 4000 * 86400  # before the 3650-day window
    os.utime(stale, (old, old))
    with gzip.open(log.with_name("auto-retry.jsonl.3.gz"), "wt") as f:
        f.write(run_line("flaky", (500,)) + "\n")
    report = as_json(setup, "cycle")
    assert report["runs_analysed"] == before + 1
    status = as_json(setup, "status")
    assert sum(c["runs"] for c in status["crons"]) == before + 1


def test_an_approved_change_is_planned_like_an_automatic_one(setup: dict[str, Path]) -> None:
    """A cron that runs hourly cannot be verified in 24 h: an approved change gets the longer
    period an automatic one would, and says why."""
    from datetime import UTC, datetime, timedelta

    end = datetime.now(UTC)
    log = setup["root"] / "auto-retry.jsonl"
    log.write_text(
        "\n".join(
            run_line("hourly", (25_000,), ts=(end - timedelta(hours=i)).isoformat())
            for i in range(40)
        )
        + "\n"
    )
    as_json(setup, "cycle")
    (review,) = as_json(setup, "status")["pending"]
    assert (review["param"], review["proposed"]) == ("timeout", 37500)
    as_json(setup, "approve", str(review["id"]))
    (experiment,) = as_json(setup, "history")["experiments"]
    started = datetime.fromisoformat(experiment["started_at"].replace("Z", "+00:00"))
    verify = datetime.fromisoformat(experiment["verify_at"].replace("Z", "+00:00"))
    assert verify - started > timedelta(hours=48)
    start = next(c for c in as_json(setup, "history")["changes"] if c["cron"] == "hourly")
    assert "instead of 24 h" in start["reason"]
