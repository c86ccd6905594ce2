"""Switchback experiments: the design's balance, flips that survive a crash, a daemon that puts
a script back in step, a cron gone silent, a daily cron not started, verdicts decided together."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tunerd.switchback import BLOCK, OFFSET, arm_at, block_of, flips, next_flip

from .conftest import ERR_OTHER, ROOT, run_line
from .test_daemon import ENV, Daemon, eventually
from .test_engine_cli import as_json

MONDAY = datetime(2026, 1, 5, tzinfo=UTC).timestamp()


def test_the_design_balances_every_day_and_every_hour() -> None:
    for seed in ("a", "b", "7:1767571200"):
        for day in range(14):
            hours = [arm_at(seed, MONDAY + day * 86400 + h * 3600 + OFFSET + 60) for h in range(24)]
            assert Counter(hours) == {"control": 12, "treatment": 12}  # weekends included
            for h in range(24):  # each hour takes the other arm on the other day of its pair
                pair = day - day % 2
                first = arm_at(seed, MONDAY + pair * 86400 + h * 3600 + OFFSET + 60)
                second = arm_at(seed, MONDAY + (pair + 1) * 86400 + h * 3600 + OFFSET + 60)
                assert first != second
    changes = flips("a", MONDAY, MONDAY + 3 * 86400)
    assert all(a != b for (_, a), (_, b) in itertools.pairwise(changes))
    assert all((t - OFFSET) % BLOCK == 0 for t, _ in changes[1:])  # at 2.5 min past the hour
    t, arm = next_flip("a", MONDAY, arm_at("a", MONDAY))
    assert arm != arm_at("a", MONDAY) and block_of(t) > block_of(MONDAY)


SCRIPT = "const CONFIG = {\n  MAX_RETRIES: 3,\n};\nexec(c, { timeout: 15000 });\n"


@pytest.fixture
def script_setup(tmp_path: Path) -> dict[str, Path]:
    """A flaky cron on a wrapper script, with a switchback experiment under way."""
    log = tmp_path / "auto-retry.jsonl"
    lines = [run_line("flaky", (500,)) for _ in range(30)]
    lines += [run_line("flaky", (500, 500, 500), ok=False, error=ERR_OTHER) for _ in range(10)]
    log.write_text("\n".join(lines) + "\n")
    script = tmp_path / "flaky.js"
    script.write_text(SCRIPT)
    config = tmp_path / "tunerd.toml"
    config.write_text(
        f'log_path = "{log}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'params_file = "{tmp_path / "params.json"}"\nwindow = "3650d"\nmin_runs = 10\n'
        f'[[scripts]]\ncron = "flaky"\npath = "{script}"\n'
    )
    setup = {"root": tmp_path, "config": config, "script": script, "log": log}
    started = as_json(setup, "cycle")
    assert [a["result"] for a in started["actions"]] == ["started"]
    return setup


def _experiment(setup: dict[str, Path]) -> dict[str, Any]:
    (experiment,) = as_json(setup, "history")["experiments"]
    return experiment


def _in_python(setup: dict[str, Path], code: str, crash: str | None = None) -> int:
    """Run ``code`` with the engine of the configuration, in a process of its own."""
    program = (
        "from tunerd.config import load\nfrom tunerd.cycle import build_engine\n"
        "from tunerd.notify import LogNotifier\nfrom tunerd.verification import keep_in_step\n"
        f"engine = build_engine(load({str(setup['config'])!r}), LogNotifier())\n{code}\n"
    )
    env = dict(ENV, HOME=str(setup["root"]))
    if crash:
        env["TUNERD_CRASH_AT"] = crash
    return subprocess.run([sys.executable, "-c", program], env=env, cwd=ROOT).returncode


def _seed_out_of_step(setup: dict[str, Path], now: float) -> None:
    """Give the experiment a design whose block now calls for the value the script lacks."""
    import sqlite3

    held = 4 if "MAX_RETRIES: 4," in setup["script"].read_text() else 3
    seed = next(f"s{i}" for i in range(100) if (arm_at(f"s{i}", now) == "treatment") != (held == 4))
    with sqlite3.connect(setup["root"] / "state" / "tunerd.sqlite3") as db:
        db.execute("UPDATE experiments SET seed = ?", (seed,))


@pytest.mark.parametrize("point", ["after_rollback_point", "mid_write", "after_rename"])
def test_a_flip_survives_a_crash(script_setup: dict[str, Path], point: str) -> None:
    """SIGKILL in the middle of a flip: the script holds the old value or the new one, the
    history agrees after recovery, and the next look puts the script in step."""
    before = script_setup["script"].read_text()
    now = time.time()
    _seed_out_of_step(script_setup, now)
    assert _in_python(script_setup, f"keep_in_step(engine, {now})", crash=point) == -9
    after = script_setup["script"].read_text()
    assert after in (
        before,
        before.replace("MAX_RETRIES: 3", "MAX_RETRIES: 4"),
        before.replace("MAX_RETRIES: 4", "MAX_RETRIES: 3"),
    )
    history = as_json(script_setup, "history")  # recovery runs first
    flip = [c for c in history["changes"] if c["action"] == "flip"]
    assert len(flip) == 1 and flip[0]["state"] in ("applied", "aborted")
    held = 4 if "MAX_RETRIES: 4," in after else 3
    assert (flip[0]["state"] == "applied") == (held == flip[0]["to"])
    assert [p.name for p in script_setup["root"].iterdir() if p.name.startswith(".tunerd-")] == []
    # The next look flips it if the crash left it behind; the script is in step either way.
    assert _in_python(script_setup, f"keep_in_step(engine, {now})") == 0
    held = 4 if "MAX_RETRIES: 4," in script_setup["script"].read_text() else 3
    assert held == flip[0]["to"]


def test_the_daemon_puts_a_script_back_in_step(tmp_path: Path) -> None:
    """Stopped across a block boundary, the daemon flips at once when it starts again."""
    daemon = Daemon(tmp_path)
    setup = {"root": tmp_path, "config": daemon.config, "log": daemon.log}
    script = tmp_path / "flaky.js"
    script.write_text(SCRIPT)
    daemon.write_config(
        f'window = "3650d"\nmin_runs = 10\n[[scripts]]\ncron = "flaky"\npath = "{script}"\n'
    )
    lines = [run_line("flaky", (500,)) for _ in range(30)]
    lines += [run_line("flaky", (500, 500, 500), ok=False, error=ERR_OTHER) for _ in range(10)]
    daemon.log.write_text("\n".join(lines) + "\n")
    as_json(setup, "cycle")
    _seed_out_of_step(setup | {"script": script}, time.time())
    held = script.read_text()
    daemon.start()
    try:
        eventually(lambda: script.read_text() != held, timeout=20)
        flips_done = [c for c in as_json(setup, "history")["changes"] if c["action"] == "flip"]
        assert len(flips_done) == 1 and flips_done[0]["state"] == "applied"
    finally:
        assert daemon.stop() == 0


def test_a_cron_gone_silent_stops_its_experiment(script_setup: dict[str, Path]) -> None:
    """It ran every five minutes; nothing for three hours since the experiment began: rolled
    back with that reason, not left running blind until its verdict."""
    import sqlite3

    end = datetime.now(UTC) - timedelta(hours=3)
    lines = [
        run_line(
            "quiet",
            (500,) * (3 if i % 4 == 0 else 1),
            ok=i % 4 != 0,
            error=ERR_OTHER,
            ts=(end - timedelta(minutes=5 * i)).isoformat(),
        )
        for i in range(60)
    ]
    script_setup["log"].write_text("\n".join(lines) + "\n")
    quiet = script_setup["root"] / "quiet.js"
    quiet.write_text(SCRIPT)
    with script_setup["config"].open("a") as f:
        f.write(f'[[scripts]]\ncron = "quiet"\npath = "{quiet}"\n')
    report = as_json(script_setup, "cycle")
    assert ("quiet", "started") in {(a["cron"], a["result"]) for a in report["actions"]}
    with sqlite3.connect(script_setup["root"] / "state" / "tunerd.sqlite3") as db:
        db.execute("UPDATE experiments SET started_at = started_at - 3 * 3600 WHERE cron = 'quiet'")
    settled = {e["cron"]: e for e in as_json(script_setup, "cycle")["experiments"]}
    assert settled["quiet"]["result"] == "silent"
    assert (
        "went silent" in settled["quiet"]["reason"] and "no run for" in settled["quiet"]["reason"]
    )
    assert "MAX_RETRIES: 3," in quiet.read_text()  # rolled back to the control value


def test_a_daily_cron_is_not_started_automatically(tmp_path: Path) -> None:
    """Once a day, a halving could not be seen within any extension: a person decides."""
    end = datetime.now(UTC)
    lines = [
        run_line(
            "daily",
            (500,) * (3 if i % 5 == 0 else 1),
            ok=i % 5 != 0,
            error=ERR_OTHER,
            ts=(end - timedelta(days=i)).isoformat(),
        )
        for i in range(40)
    ]
    (tmp_path / "auto-retry.jsonl").write_text("\n".join(lines) + "\n")
    config = tmp_path / "tunerd.toml"
    config.write_text(
        f'log_path = "{tmp_path / "auto-retry.jsonl"}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'params_file = "{tmp_path / "params.json"}"\nwindow = "60d"\nmin_runs = 10\n'
    )
    setup = {"root": tmp_path, "config": config}
    (action,) = as_json(setup, "cycle")["actions"]
    assert (action["param"], action["result"]) == ("maxRetries", "queued")
    assert "cannot be verified in time" in action["detail"] and "runs per arm" in action["detail"]
    assert as_json(setup, "history")["experiments"] == []


def test_verdicts_due_together_are_decided_together() -> None:
    from tunerd.store import Experiment
    from tunerd.verdict import Arm, TestResult, Verdict, VerdictSettings
    from tunerd.verification import _together

    def due(i: int, p: float, decision: str = "commit") -> tuple[Experiment, Verdict]:
        e = Experiment(
            i, f"c{i}", "maxRetries", 3, 4, "ab", 0.5, "t", "running", "", 0, 0, 0, None, None
        )
        primary = TestResult("reachable_failure_rate", "t", p, -0.1, None, 0.012, "primary", True)
        return e, Verdict(decision, "better", Arm(), Arm(), [primary], 1, 0.012)

    settings = VerdictSettings()
    # Benjamini-Hochberg: p = 0.011 commits alone; beside a third experiment that found nothing
    # (m = 3), two at 0.011 are above 2/3 and 1/3 of 0.012: both wait.
    alone = _together([due(1, 0.011)], settings)
    assert [v.decision for _, v in alone] == ["commit"]
    three = _together([due(1, 0.011), due(2, 0.011), due(3, 0.5, "extend")], settings)
    assert [v.decision for _, v in three] == ["extend", "extend", "extend"]
    assert "false-discovery" in three[0][1].reason
    # Four crons improving at once: a shared cause is likelier; every commit waits.
    many = _together([due(i, 0.0001) for i in range(4)], settings)
    assert {v.decision for _, v in many} == {"extend"} and "at once" in many[0][1].reason


def test_a_cron_quiet_by_its_own_schedule_is_not_silent() -> None:
    """A weekday market-hours cron says nothing from Friday evening to Monday morning: its
    crontab says so, and its experiment goes on. A cron every 15 minutes quiet for 3 hours is
    silent."""
    from tzlocal import get_localzone

    from tunerd.store import Experiment
    from tunerd.verification import Gathered, _silent

    zone = get_localzone()
    friday = datetime(2026, 1, 9, 17, 0, tzinfo=zone).timestamp()
    e = Experiment(
        1,
        "m",
        "maxRetries",
        3,
        4,
        "switchback",
        0.5,
        "t",
        "running",
        "",
        friday - 86400,
        friday + 7 * 86400,
        0,
        None,
        None,
    )
    got = Gathered(last_run=friday)
    market = {"schedule": "0 9-17 * * 1-5", "runs_per_hour": 1.0}
    assert _silent(e, got, friday + 43 * 3600, market) == ""  # Sunday noon: nothing was due
    assert _silent(e, got, friday + 64.5 * 3600, market) == ""  # Monday 9:30: one time missed
    assert "3 of its scheduled times" in _silent(e, got, friday + 67 * 3600, market)  # noon
    busy = {"schedule": "*/15 * * * *", "runs_per_hour": 4.0}
    assert _silent(e, got, friday + 3600, busy) == ""  # under two hours
    assert "went by" in _silent(e, got, friday + 3 * 3600, busy)
    # Without a crontab: six usual gaps and three days.
    unknown = {"schedule": None, "runs_per_hour": 4.0}
    assert _silent(e, got, friday + 2 * 86400, unknown) == ""
    assert "times an hour" in _silent(e, got, friday + 3.5 * 86400, unknown)


def test_a_script_edited_by_hand_stops_its_experiment(script_setup: dict[str, Path]) -> None:
    """Someone sets MAX_RETRIES: 9 during the experiment: the next look stops it and leaves 9
    (a flip would have overwritten the person's value)."""
    text = script_setup["script"].read_text()
    held = "MAX_RETRIES: 4," if "MAX_RETRIES: 4," in text else "MAX_RETRIES: 3,"
    script_setup["script"].write_text(text.replace(held, "MAX_RETRIES: 9,"))
    _seed_out_of_step(script_setup, time.time())  # a flip would be due now
    as_json(script_setup, "cycle")
    assert "MAX_RETRIES: 9," in script_setup["script"].read_text()
    history = as_json(script_setup, "history")
    (experiment,) = history["experiments"]
    assert experiment["state"] == "aborted" and "edited by hand" in experiment["verdict"]["reason"]
    assert [c["action"] for c in history["changes"]][-1] == "abort"
    assert not [c for c in history["changes"] if c["action"] == "flip"]


def test_undoing_a_switchback_says_which_value_it_left(script_setup: dict[str, Path]) -> None:
    """After a flip, `tunerd rollback` of the start goes from the value the script held (not
    the start's) to the control, and the script says so."""
    now = time.time()
    _seed_out_of_step(script_setup, now)
    assert _in_python(script_setup, f"keep_in_step(engine, {now})") == 0
    changes = as_json(script_setup, "history")["changes"]
    (flip,) = [c for c in changes if c["action"] == "flip"]
    (start,) = [c for c in changes if c["action"] == "experiment_start"]
    as_json(script_setup, "rollback", str(start["id"]))
    last = as_json(script_setup, "history")["changes"][-1]
    assert (last["from"], last["to"]) == (flip["to"], 3)
    assert "MAX_RETRIES: 3," in script_setup["script"].read_text()
