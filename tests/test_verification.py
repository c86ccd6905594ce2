"""Verdicts end to end: `tunerd verify` on a log, and experiments settled by `tunerd cycle`."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from .conftest import ERR_429, ERR_OTHER, run_line
from .test_engine_cli import as_json, setup, tunerd  # noqa: F401  (fixture)


def iso(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ab_lines(
    cron: str,
    exp_id: str,
    param: str,
    values: tuple[int, int],
    fails: tuple[int, int],
    runs: int = 150,
    at: datetime | None = None,
    tag: bool = True,
) -> list[str]:
    at = at or datetime.now(UTC)
    lines = []
    for arm, value, failed in zip(("control", "treatment"), values, fails, strict=True):
        for i in range(runs):
            ok = i >= failed
            extra = {"params": {param: value}}
            if tag:
                extra["experiment"] = {"id": exp_id, "arm": arm}
            durations = (800,) if ok and i % 5 else (800, 900)
            lines.append(
                run_line(
                    cron,
                    durations if ok else (800, 800, 800),
                    ok=ok,
                    error=ERR_OTHER,
                    ts=iso(at + timedelta(milliseconds=i)),
                    **extra,
                )
            )
    return lines


def verify(
    root: Path, log: Path, cron: str, param: str, control: int, treatment: int, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``tunerd verify`` with no configuration of its own."""
    (root / "none.toml").write_text("")
    setup_ = {"root": root, "config": root / "none.toml"}
    arms = ["--control", str(control), "--treatment", str(treatment)]
    return tunerd(setup_, "verify", str(log), "--cron", cron, "--param", param, *arms, *extra)


def test_verify_contract_and_decisions(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    lines = ab_lines("flaky", "9", "maxRetries", (3, 4), (18, 3), tag=False)
    lines += [run_line("other") for _ in range(5)]
    log.write_text("\n".join(lines) + "\n{bad\n")
    done = verify(tmp_path, log, "flaky", "maxRetries", 3, 4, "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["decision"] == "commit" and doc["reason"]
    assert doc["arms"]["control"]["runs"] == doc["arms"]["treatment"]["runs"] == 150
    assert set(doc["arms"]["treatment"]) >= {
        "runs",
        "final_failure_rate",
        "retry_rate",
        "duration_ms_mean",
    }
    assert doc["arms"]["control"]["final_failure_rate"] == pytest.approx(0.12)
    assert {t["metric"] for t in doc["tests"]} == {
        "reachable_failure_rate",
        "final_failure_rate",
        "first attempt",
    }
    assert all({"metric", "test", "p_value", "effect"} <= set(t) for t in doc["tests"])
    assert "malformed" in done.stderr

    text = verify(tmp_path, log, "flaky", "maxRetries", 3, 4)
    assert text.stdout.startswith("COMMIT") and "Boschloo" in text.stdout

    few = verify(tmp_path, log, "other", "timeout", 15000, 20000, "--json")
    assert json.loads(few.stdout)["decision"] == "extend"


def test_slower_work_breaks_the_guardrail_longer_waits_do_not(tmp_path: Path) -> None:
    """Runs whose successful attempts are 35 % slower are rolled back; a longer backoff that makes
    runs wait longer but cuts repeated 429s is committed."""
    at = datetime(2026, 2, 5, tzinfo=UTC)

    def line(arm: str, i: int, durations: tuple[int, ...], total: int) -> str:
        return run_line(
            "api",
            durations,
            error=ERR_429,
            ts=iso(at + timedelta(seconds=i)),
            total=total,
            experiment={"id": "1", "arm": arm},
        )

    slow = [line("control", i, (1000 + i % 7 * 30,), 1000) for i in range(150)]
    slow += [line("treatment", i, (1350 + i % 7 * 40,), 1400) for i in range(150)]
    log = tmp_path / "slow.jsonl"
    log.write_text("\n".join(slow) + "\n")
    doc = json.loads(verify(tmp_path, log, "api", "timeout", 15000, 20000, "--json").stdout)
    assert doc["decision"] == "rollback" and "slower" in doc["reason"]

    waits = []
    for i in range(150):
        again = i % 5 < 2  # 40 % of control runs meet a 429 again after waiting 1 s
        attempts = (100, 100, 1000 + i % 7 * 30) if again else (100, 1000 + i % 7 * 30)
        waits.append(line("control", i, attempts, 4200 if again else 2100))
    for i in range(150):
        again = i % 10 == 0  # 10 % after waiting 2 s
        attempts = (100, 100, 1000 + i % 7 * 30) if again else (100, 1000 + i % 7 * 30)
        waits.append(line("treatment", i, attempts, 7200 if again else 3100))
    log = tmp_path / "waits.jsonl"
    log.write_text("\n".join(waits) + "\n")
    doc = json.loads(verify(tmp_path, log, "api", "backoffBase", 1000, 2000, "--json").stdout)
    assert doc["decision"] == "commit", doc["reason"]
    assert doc["arms"]["treatment"]["duration_ms_mean"] > doc["arms"]["control"]["duration_ms_mean"]


def test_verify_sequential_by_switch_time(tmp_path: Path) -> None:
    start = datetime(2026, 2, 5, tzinfo=UTC)
    before = [  # as long again before the control window: the world did not move (placebo)
        run_line(
            "c",
            (800,) if i % 4 else (800, 800, 800),
            ok=bool(i % 4),
            error=ERR_OTHER,
            ts=iso(start - timedelta(minutes=200 - i)),
        )
        for i in range(200)
    ]
    lines = [
        run_line(
            "c",
            (800,) if i % 4 else (800, 800, 800),
            ok=bool(i % 4),
            error=ERR_OTHER,
            ts=iso(start + timedelta(minutes=i)),
        )
        for i in range(200)
    ]
    lines += [run_line("c", (800,), ts=iso(start + timedelta(minutes=200 + i))) for i in range(200)]
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(lines) + "\n")
    # Without the time before the control window, one switch cannot rule out the world:
    switch_at = iso(start + timedelta(minutes=200))
    short = json.loads(
        verify(tmp_path, log, "c", "maxRetries", 3, 4, "--switch-at", switch_at, "--json").stdout
    )
    assert short["decision"] == "extend" and "placebo" in short["reason"]
    log.write_text("\n".join(before + lines) + "\n")
    done = verify(tmp_path, log, "c", "maxRetries", 3, 4, "--switch-at", switch_at, "--json")
    doc = json.loads(done.stdout)
    # The treatment runs from the switch to the last run (199 min): the control is the 199 min
    # just before the switch, not all history before it.
    # Runs count by when they started: the one that ended at the switch began before it.
    assert (doc["arms"]["control"]["runs"], doc["arms"]["treatment"]["runs"]) == (199, 199)
    windows = {
        arm: [datetime.fromisoformat(x.replace("Z", "+00:00")).timestamp() for x in pair]
        for arm, pair in doc["windows"].items()
    }
    length = windows["treatment"][1] - windows["treatment"][0]
    assert windows["control"][1] - windows["control"][0] == pytest.approx(length, abs=1)
    assert windows["control"][1] == (start + timedelta(minutes=200)).timestamp()
    assert doc["decision"] == "commit"
    (placebo,) = [t for t in doc["tests"] if t["role"] == "placebo"]
    assert not placebo["passed"]  # the two windows before the switch agree
    bad = verify(tmp_path, log, "c", "retries", 3, 4)
    assert bad.returncode == 2


def test_verify_counts_only_the_runs_of_the_experiment(tmp_path: Path) -> None:
    """Runs from before the experiment carry the control value too, and an earlier experiment
    left tags of its own: neither belongs in the arms."""
    start = datetime(2026, 2, 5, tzinfo=UTC)
    before = [  # slower and failing more, under maxRetries 3, untagged
        run_line(
            "flaky",
            (3000,) if i % 3 else (3000, 3000, 3000),
            ok=bool(i % 3),
            ts=iso(start + timedelta(minutes=i)),
            params={"maxRetries": 3},
        )
        for i in range(300)
    ]
    earlier = ab_lines("flaky", "7", "maxRetries", (3, 4), (40, 40), runs=60, at=start)
    current = ab_lines("flaky", "9", "maxRetries", (3, 4), (18, 3), at=start + timedelta(hours=6))
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(before + earlier + current) + "\n")
    doc = json.loads(verify(tmp_path, log, "flaky", "maxRetries", 3, 4, "--json").stdout)
    assert doc["experiment"] == "9" and doc["decision"] == "commit"
    assert doc["arms"]["control"]["runs"] == doc["arms"]["treatment"]["runs"] == 150
    assert doc["arms"]["control"]["final_failure_rate"] == pytest.approx(0.12)
    assert doc["unassigned_runs"] == 300 + 120
    older = verify(tmp_path, log, "flaky", "maxRetries", 3, 4, "--experiment", "7", "--json")
    assert json.loads(older.stdout)["arms"]["treatment"]["runs"] == 60
    # Without tags, the recorded value tells the arms apart, and --since leaves out the runs
    # from before the experiment (a warning says so when it is missing).
    untagged = tmp_path / "untagged.jsonl"
    switched = start + timedelta(hours=6)
    plain = ab_lines("flaky", "9", "maxRetries", (3, 4), (18, 3), tag=False, at=switched)
    untagged.write_text("\n".join(before + plain) + "\n")
    mixed = verify(tmp_path, untagged, "flaky", "maxRetries", 3, 4, "--json")
    assert json.loads(mixed.stdout)["arms"]["control"]["runs"] == 450
    assert "give --since" in mixed.stderr
    clean = verify(
        tmp_path, untagged, "flaky", "maxRetries", 3, 4, "--since", iso(switched), "--json"
    )
    assert json.loads(clean.stdout)["arms"]["control"]["runs"] == 150
    assert "give --since" not in clean.stderr


def test_cycle_settles_due_experiments(setup: dict[str, Path]) -> None:  # noqa: F811
    with setup["config"].open("a") as f:
        f.write('verify_after = "2s"\n')
    as_json(setup, "cycle")
    experiments = {e["cron"]: e for e in as_json(setup, "status")["experiments"]}
    log = setup["root"] / "auto-retry.jsonl"
    with log.open("a") as f:  # Level 1 splits traffic for "flaky" only
        flaky = experiments["flaky"]
        f.write(
            "\n".join(ab_lines("flaky", str(flaky["id"]), "maxRetries", (3, 4), (18, 3))) + "\n"
        )
    time.sleep(2.5)
    report = as_json(setup, "cycle")
    results = {e["cron"]: e for e in report["experiments"]}
    assert results["flaky"]["result"] == "commit"
    assert results["api"]["result"] == "extend"
    assert "neither arm has runs" in results["api"]["reason"]  # no api runs since it began
    doc = json.loads(setup["params"].read_text())
    assert doc["crons"]["flaky"] == {"maxRetries": 4} and "flaky" not in doc["experiments"]
    assert "api" in doc["experiments"]
    history = as_json(setup, "history")
    commit = next(c for c in history["changes"] if c["action"] == "commit")
    assert (commit["cron"], commit["from"], commit["to"], commit["state"]) == (
        "flaky",
        3,
        4,
        "applied",
    )
    verdict = next(e for e in history["experiments"] if e["cron"] == "flaky")["verdict"]
    assert verdict["decision"] == "commit" and verdict["tests"][0]["p_value"] < 0.02
    # The api experiment never gets its runs: after the last extension it is rolled back.
    for _ in range(2):
        time.sleep(2.1)
        report = as_json(setup, "cycle")
    api = next(e for e in report["experiments"] if e["cron"] == "api")
    assert api["result"] == "rollback" and "never arrived" in api["reason"]
    doc = json.loads(setup["params"].read_text())
    assert (
        "api" not in doc["experiments"] and doc["crons"].get("api", {}).get("backoffBase") is None
    )

    report = as_json(setup, "report")
    verdicts = {v["cron"]: v for v in report["verdicts"]}
    assert verdicts["flaky"]["verdict"] == "commit" and verdicts["api"]["verdict"] == "rollback"
    assert verdicts["flaky"]["before"]["final_failure_rate"] == pytest.approx(0.12)
    assert verdicts["flaky"]["after"]["final_failure_rate"] == pytest.approx(0.02)
    metrics = report["metrics"]
    assert metrics["rollback_ratio"] == pytest.approx(3 / 4)  # api and the two hostile names
    assert metrics["share_needing_a_human"] == pytest.approx(1 / 5)  # the slow cron's review
    assert metrics["automatic_changes_outside_safe_range"] == 0
    assert metrics["mean_final_failure_drop_of_commits"] == pytest.approx(0.10)
    # One commit, at the first look's alpha: at most 0.012 false commits to expect.
    assert metrics["expected_false_commits_at_most"] == pytest.approx(0.012)
    text = tunerd(setup, "report")
    assert "rollback ratio 75.0%" in text.stdout and "100 % inside the safe range" in text.stdout
    assert tunerd(setup, "report", "--month", "2026-13").returncode == 2


def test_harm_check_stops_a_bad_experiment_early(setup: dict[str, Path]) -> None:  # noqa: F811
    as_json(setup, "cycle")
    flaky = next(e for e in as_json(setup, "status")["experiments"] if e["cron"] == "flaky")
    with (setup["root"] / "auto-retry.jsonl").open("a") as f:
        f.write(
            "\n".join(ab_lines("flaky", str(flaky["id"]), "maxRetries", (3, 4), (2, 40), runs=100))
            + "\n"
        )
    report = as_json(setup, "cycle")
    result = next(e for e in report["experiments"] if e["cron"] == "flaky")
    assert result["result"] == "harm_stop" and "final failures up" in result["reason"]
    assert "flaky" not in json.loads(setup["params"].read_text())["experiments"]


def test_one_switch_takes_no_decision_when_the_world_moved_before_it(tmp_path: Path) -> None:
    """Failures tripled the day before the switch and came back after: the treatment looks
    better than its control, and the placebo (the control against the day before it) says the
    world moved on its own: no decision."""
    start = datetime(2026, 2, 2, tzinfo=UTC)
    rng = __import__("random").Random(5)
    lines = []
    for i in range(3 * 24 * 12):  # three days, a run every five minutes
        at = start + timedelta(minutes=5 * i)
        bad = 24 * 12 <= i < 2 * 24 * 12  # the middle day: the control window
        ok = rng.random() > (0.24 if bad else 0.08)
        lines.append(
            run_line("c", (800,) if ok else (800,) * 3, ok=ok, error=ERR_OTHER, ts=iso(at))
        )
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(lines) + "\n")
    switch = iso(start + timedelta(days=2))
    doc = json.loads(
        verify(tmp_path, log, "c", "maxRetries", 3, 4, "--switch-at", switch, "--json").stdout
    )
    assert doc["decision"] == "extend" and doc["reason"].startswith("no decision")
    (placebo,) = [t for t in doc["tests"] if t["role"] == "placebo"]
    assert placebo["test"] == "Welch t over clock hours" and placebo["p_value"] < 0.05
    primary = doc["tests"][0]
    assert primary["test"] == "Welch t over clock hours" and primary["passed"]  # fooled alone


def test_verify_a_schedule_of_values(tmp_path: Path) -> None:
    """A history of values off tunerd's hour grid (every six hours, numbers as epoch seconds):
    neighbouring stretches are paired for the randomization test, and runs before the first
    value are said to be left out."""
    start = datetime(2026, 2, 2, tzinfo=UTC)
    rng = __import__("random").Random(7)
    schedule = [
        {"at": (start + timedelta(hours=6 * k)).timestamp(), "value": 4 if k % 2 else 3}
        for k in range(16)
    ]
    lines = []
    for i in range(-12, 4 * 24 * 12):  # an hour before the schedule, then four days
        at = start + timedelta(minutes=5 * i + 1)
        treated = i >= 0 and (i // 72) % 2 == 1
        ok = rng.random() > (0.06 if treated else 0.18)
        lines.append(
            run_line("c", (800,) if ok else (800,) * 3, ok=ok, error=ERR_OTHER, ts=iso(at))
        )
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(lines) + "\n")
    plan = tmp_path / "schedule.json"
    plan.write_text(json.dumps(schedule))
    done = verify(tmp_path, log, "c", "maxRetries", 3, 4, "--schedule", str(plan), "--json")
    doc = json.loads(done.stdout)
    assert doc["decision"] == "commit", doc["reason"]
    assert doc["tests"][0]["test"] == "randomization test over hour blocks"
    assert "12 runs not counted: before" in done.stderr and "hour grid" in done.stderr
    assert doc["unassigned_runs"] >= 12
