"""OpenClaw's native jobs as a target (issue 14): a timeout changed through the `openclaw`
command, read back from the gateway's state, rolled back the same way; a command that fails,
a gateway that is down, ignores the edit or hangs leaves nothing half-done.

The `openclaw` here is a stand-in (tests/openclaw/openclaw) that changes the job's row as the
gateway does; the state database is a copy of what a real 2026.9.6 gateway wrote."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunerd.engine import Engine
from tunerd.notify import LogNotifier
from tunerd.store import Store
from tunerd.targets import Gateway, ParamsFileTarget, TargetError, Targets

from .conftest import ROOT
from .test_engine_cli import ENV, cli

SAMPLE = ROOT / "tests" / "data" / "openclaw-cron.sqlite"
STANDIN = ROOT / "tests" / "openclaw" / "openclaw"
SLOW = "slow-cmd (OpenClaw)"
SLOW_ID = "c1366be8-a60d-44bb-8fef-f3e80c21f774"


def gateway_state(tmp_path: Path) -> Path:
    """The real sample, with slow-cmd enabled (the gateway had stopped it by the end)."""
    state = tmp_path / "openclaw.sqlite"
    shutil.copy(SAMPLE, state)
    db = sqlite3.connect(state)
    with db:
        db.execute(
            "UPDATE cron_jobs SET enabled = 1, job_json = json_set(job_json, '$.enabled',"
            " json('true')) WHERE job_id = ?",
            (SLOW_ID,),
        )
    db.close()
    return state


def native_config(tmp_path: Path, state: Path, log: Path) -> Path:
    """A configuration with the wrapper's LOG, the gateway's STATE and the stand-in command."""
    config = tmp_path / "tunerd.toml"
    config.write_text(
        f'log_path = "{log}"\nstate_dir = "{tmp_path / "state"}"\nwindow = "3650d"\n'
        f'params_file = "{tmp_path / "params.json"}"\nmin_runs = 5\n'
        f'[openclaw]\nstate = "{state}"\ncli = "{STANDIN}"\n'
    )
    return config


def tunerd(config: Path, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`tunerd ARGS --config CONFIG` as a user runs it, the stand-in's gateway keeping STATE."""
    return subprocess.run(
        [sys.executable, "-m", "tunerd", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        env=dict(ENV, HOME=str(config.parent), OPENCLAW_STATE_DB=str(state)),
        cwd=ROOT,
        timeout=120,
    )


def held(state: Path) -> object:
    """slow-cmd's `timeoutSeconds` as the gateway's state holds it."""
    db = sqlite3.connect(f"file:{state}?mode=ro", uri=True)
    (value,) = db.execute(
        "SELECT json_extract(job_json, '$.payload.timeoutSeconds') FROM cron_jobs WHERE job_id = ?",
        (SLOW_ID,),
    ).fetchone()
    db.close()
    return value


def set_by_hand(state: Path, seconds: str) -> None:
    """A person sets slow-cmd's `timeoutSeconds` (a JSON value) behind tunerd's back."""
    db = sqlite3.connect(state)
    with db:
        db.execute(
            "UPDATE cron_jobs SET job_json = json_set(job_json, '$.payload.timeoutSeconds',"
            " json(?)) WHERE job_id = ?",
            (seconds, SLOW_ID),
        )
    db.close()


def timeout_seconds(state: Path) -> int:
    return int(held(state))  # type: ignore[call-overload]


@pytest.fixture
def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Engine, Path, Path]:
    state = gateway_state(tmp_path)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("OPENCLAW_STATE_DB", str(state))
    monkeypatch.setenv("OPENCLAW_STANDIN_CALLS", str(calls))
    engine = Engine(
        Store(tmp_path / "state"),
        Targets(ParamsFileTarget(tmp_path / "params.json"), {}, Gateway(state, (str(STANDIN),))),
        LogNotifier(),
        verify_after=86400,
    )
    return engine, state, calls


def test_a_timeout_goes_through_the_gateway_and_back(gateway: tuple[Engine, Path, Path]) -> None:
    engine, state, calls = gateway
    assert timeout_seconds(state) == 3
    experiment = engine.start_experiment(
        SLOW, "timeout", 3000, 10000, "timeouts", {}, "tunerd", 1_800_000_000.0
    )
    assert experiment.mode == "switchback" and experiment.target == f"openclaw:{SLOW_ID}"
    (start,) = engine.store.changes()
    assert start.state == "applied" and start.target == f"openclaw:{SLOW_ID}"
    # the block's coin decides which value the job starts on; the job holds it, read back
    assert timeout_seconds(state) * 1000 == start.new_value
    other = 13000 - start.new_value
    engine.flip(experiment, other, 1_800_003_600.0)
    assert timeout_seconds(state) * 1000 == other
    rollback = engine.manual_rollback(start.id, 1_800_007_200.0)
    assert rollback.state == "applied" and timeout_seconds(state) == 3
    argv = [json.loads(line) for line in calls.read_text().splitlines()]
    assert argv[-1] == ["cron", "edit", SLOW_ID, "--timeout-seconds", "3"]
    assert all(a[:3] == ["cron", "edit", SLOW_ID] for a in argv) and len(argv) == 3
    assert engine.store.experiment(experiment.id).state == "aborted"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        ("down", "ECONNREFUSED"),
        ("refuse", "invalid cron.update params"),
        ("ignore", "the gateway did not take the change"),
        ("hang", "did not answer within 1 s"),
    ],
)
def test_a_failing_gateway_leaves_nothing_half_done(
    gateway: tuple[Engine, Path, Path], monkeypatch: pytest.MonkeyPatch, mode: str, said: str
) -> None:
    engine, state, _ = gateway
    monkeypatch.setenv("OPENCLAW_STANDIN", mode)
    monkeypatch.setattr("tunerd.targets.gateway.EDIT_SECONDS", 1.0)
    monkeypatch.setattr("tunerd.targets.gateway.READ_BACK_SECONDS", 0.5)
    with pytest.raises(TargetError, match=said) as caught:
        engine.start_experiment(SLOW, "timeout", 3000, 10000, "r", {}, "tunerd", 1.8e9)
    assert "has timeoutSeconds 3" in str(caught.value)
    assert timeout_seconds(state) == 3
    (change,) = engine.store.changes()
    assert change.state == "aborted"
    assert engine.store.experiments("starting", "running") == []
    # and the next try, with the gateway back, works
    monkeypatch.delenv("OPENCLAW_STANDIN")
    engine.start_experiment(SLOW, "timeout", 3000, 10000, "r", {}, "tunerd", 1.8e9)
    assert timeout_seconds(state) in (3, 10)


def test_what_the_gateway_cannot_hold_is_refused_before_anything_runs(
    gateway: tuple[Engine, Path, Path],
) -> None:
    engine, state, calls = gateway
    target = engine.targets.for_cron(SLOW)
    assert target.name == f"openclaw:{SLOW_ID}"
    with pytest.raises(TargetError, match="whole seconds"):
        engine.start_experiment(SLOW, "timeout", 3000, 10500, "r", {}, "tunerd", 1.8e9)
    with pytest.raises(TargetError, match="only its timeout"):
        engine.start_experiment(SLOW, "maxRetries", 3, 4, "r", {}, "tunerd", 1.8e9)
    with pytest.raises(TargetError, match="not one tunerd passes on"):
        engine.targets.by_name("openclaw:--help")
    assert not calls.exists() and timeout_seconds(state) == 3


def test_a_crash_between_intent_and_edit_is_settled_by_reading_the_job(
    gateway: tuple[Engine, Path, Path],
) -> None:
    """The engine's one protocol: the rollback point is committed before the edit; at the next
    start, what the job holds says whether the edit happened."""
    engine, state, _ = gateway
    target = engine.targets.for_cron(SLOW)
    before = target.read()
    assert before is not None and json.loads(before)["timeoutSeconds"] == 3
    engine.start_experiment(SLOW, "timeout", 3000, 10000, "r", {}, "tunerd", 1.8e9)
    (change,) = engine.store.changes()
    with engine.store.transaction() as db:  # as if the process died before the outcome
        db.execute("UPDATE changes SET state = 'applying' WHERE id = ?", (change.id,))
    assert "interrupted: applied" in engine.recover(1.8e9 + 1)[0]
    with engine.store.transaction() as db:
        db.execute("UPDATE changes SET state = 'applying' WHERE id = ?", (change.id,))
    db2 = sqlite3.connect(state)
    with db2:  # someone else set another value meanwhile
        db2.execute(
            "UPDATE cron_jobs SET job_json = json_set(job_json, '$.payload.timeoutSeconds', 7)"
        )
    db2.close()
    assert "conflict" in engine.recover(1.8e9 + 2)[0]


def test_the_cycle_changes_a_native_timeout_through_the_command(tmp_path: Path) -> None:
    """`tunerd cycle` with `[openclaw] cli`: slow-cmd's timeouts lead to an experiment on its
    timeout, made by `openclaw cron edit`; `status` shows it, `rollback` undoes it the same way.
    Without the command, the same change is advised with the command to run."""
    from .conftest import REAL_SAMPLE

    state = gateway_state(tmp_path)
    config = native_config(tmp_path, state, REAL_SAMPLE)
    done = tunerd(config, state, "cycle", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    native = [o for o in report["actions"] if o["cron"] == SLOW]
    assert native and native[0]["param"] == "timeout", report["actions"]
    status = json.loads(tunerd(config, state, "status", "--json").stdout)
    (experiment,) = [e for e in status["experiments"] if e["cron"] == SLOW]
    assert experiment["mode"] == "switchback"
    history = json.loads(tunerd(config, state, "history", "--json").stdout)
    (start,) = [c for c in history["changes"] if c["cron"] == SLOW]
    assert timeout_seconds(state) * 1000 == start["to"]
    undone = tunerd(config, state, "rollback", str(start["id"]))
    assert undone.returncode == 0, undone.stderr
    assert timeout_seconds(state) == 3


def add_runs(state: Path, runs: list[tuple[float, float, bool, str]]) -> None:
    """Scheduled executions of slow-cmd as the gateway records them: (start s, end s, timed
    out, config_revision)."""
    db = sqlite3.connect(state)
    store_key, agent = db.execute(
        "SELECT store_key, agent_id FROM cron_run_receipts WHERE job_id = ? LIMIT 1", (SLOW_ID,)
    ).fetchone()
    with db:
        db.executemany(
            "INSERT INTO cron_run_receipts VALUES (?,?,?,?,?,NULL,?,1,NULL,?,?,?)",
            [
                (
                    f"test-{n}",
                    store_key,
                    SLOW_ID,
                    revision,
                    agent,
                    "error" if timed_out else "ok",
                    int(start * 1000),
                    int(end * 1000),
                    "cron: job execution timed out" if timed_out else None,
                )
                for n, (start, end, timed_out, revision) in enumerate(runs)
            ],
        )
    db.close()


def test_a_native_experiment_is_judged_on_the_runs_of_each_value_by_revision(
    gateway: tuple[Engine, Path, Path], tmp_path: Path
) -> None:
    """Three days of switchback on slow-cmd's timeout, one run a minute: at 3 s half of the
    runs time out, at 10 s none. Each run counts for the value its config_revision stands for:
    a run that started after a flip but before the gateway had it (the old revision) is left
    out. The verdict commits 10 s, through the gateway."""
    from tunerd.switchback import flips
    from tunerd.verdict import VerdictSettings
    from tunerd.verification import design_of, gather_native, settle

    engine, state, _ = gateway
    engine.verify_after = 3 * 86400.0
    t0 = 1_790_000_000.0
    experiment = engine.start_experiment(SLOW, "timeout", 3000, 10000, "r", {}, "tunerd", t0)
    assert experiment.seed is not None
    end = t0 + 3 * 86400
    schedule = flips(experiment.seed, t0, end)
    for at, arm in schedule[1:]:
        engine.flip(experiment, 10000 if arm == "treatment" else 3000, at)
    revision = {3000: "sha256:three", 10000: "sha256:ten"}
    changes = [(at, 10000 if arm == "treatment" else 3000) for at, arm in schedule]
    runs, late = [], 0
    minute = 0
    while (start := t0 + 200 + 60 * minute) < end - 600:
        minute += 1
        value = [v for at, v in changes if at <= start][-1]
        before = [v for at, v in changes if at <= start - 30][-1]
        if before != value:  # the first minute after a flip: the gateway had not taken it
            runs.append((start, start + 2, False, revision[before]))
            late += 1
            continue
        timed_out = value == 3000 and minute % 2 == 0
        runs.append((start, start + (3 if timed_out else 2), timed_out, revision[value]))
    add_runs(state, runs)

    now = end + 60
    native = gather_native(state, [experiment], now)[experiment.id]
    assert len(native.runs) == len(runs)
    units = design_of(engine, experiment, native).units  # type: ignore[attr-defined]
    assert units.left_out.get("other revision") == late > 0
    log = tmp_path / "auto-retry.jsonl"
    log.write_text("")
    (settled,) = settle(engine, log, VerdictSettings(), now)
    assert settled.action == "commit", settled.reason
    assert timeout_seconds(state) == 10


def test_simulate_fits_native_jobs_from_the_gateways_history(tmp_path: Path) -> None:
    """`simulate --openclaw STATE`: the native jobs fitted from their history and tuned as
    tunerd would with the command at hand: switchback (the gateway cannot split runs), the
    timeout only (its retries are fixed)."""
    state = gateway_state(tmp_path)
    done = cli("simulate", "--openclaw", str(state), "--weeks", "2", "--json", home=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ab"] is False
    assert set(result["crons"]) == {SLOW, "flaky-cmd (OpenClaw)", "script-test (OpenClaw)"}
    tried = [c for c in result["changes"] if c["cron"] == SLOW]
    assert tried and {c["param"] for c in tried} == {"timeout"}
    assert all(c["mode"] == "switchback" for c in tried)


def test_a_timeout_the_gateway_turned_off_is_left_alone(tmp_path: Path) -> None:
    """`timeoutSeconds: 0` is the gateway's "no timeout": not an untrusted value, and never
    changed by tunerd (turning a timeout on could cut a job that needs hours)."""
    from tunerd.inputs.openclaw import in_force_of, read_jobs

    state = gateway_state(tmp_path)
    set_by_hand(state, "0")
    job = read_jobs(state)[SLOW_ID]
    found = in_force_of(job, can_edit=True)
    assert found.timeout is None and not found.untrusted
    assert "turns its timeout off" in (found.unwritable("timeout") or "")


def test_a_hung_command_is_stopped_with_what_it_started(
    gateway: tuple[Engine, Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The real CLI may run itself again as a child: giving up kills the whole session, so no
    edit can land after the change was recorded as not made."""
    engine, state, _ = gateway
    pidfile = tmp_path / "child.pid"
    monkeypatch.setenv("OPENCLAW_STANDIN", "hang-child")
    monkeypatch.setenv("OPENCLAW_STANDIN_PIDFILE", str(pidfile))
    monkeypatch.setattr("tunerd.targets.gateway.EDIT_SECONDS", 2.0)
    with pytest.raises(TargetError, match="did not answer"):
        engine.start_experiment(SLOW, "timeout", 3000, 10000, "r", {}, "tunerd", 1.8e9)
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists():
        status = Path(f"/proc/{child}/status").read_text()
        if "State:\tZ" in status:
            break  # dead, waiting for its reaper
        assert time.monotonic() < deadline, "the command's child outlived it"
        time.sleep(0.05)
    assert timeout_seconds(state) == 3


def test_a_native_experiment_survives_an_unreadable_state_and_stops_on_a_deleted_job(
    gateway: tuple[Engine, Path, Path], tmp_path: Path
) -> None:
    """The gateway's state cannot be read for a while: the experiment goes on (said, not
    judged), never taken for an edit by hand. The job deleted: it stops, nothing written."""
    from tunerd.verdict import VerdictSettings
    from tunerd.verification import settle

    engine, state, calls = gateway
    experiment = engine.start_experiment(SLOW, "timeout", 3000, 10000, "r", {}, "tunerd", 1.8e9)
    log = tmp_path / "auto-retry.jsonl"
    log.write_text("")
    aside = state.with_name("aside.sqlite")
    state.rename(aside)
    (found,) = settle(engine, log, VerdictSettings(), 1.8e9 + 600)
    assert found.action == "error" and "does not exist" in found.reason
    assert engine.store.experiment(experiment.id).state == "running"  # type: ignore[union-attr]
    aside.rename(state)
    db = sqlite3.connect(state)
    with db:
        db.execute("DELETE FROM cron_jobs WHERE job_id = ?", (SLOW_ID,))
    db.close()
    edits = len(calls.read_text().splitlines())
    settle(engine, log, VerdictSettings(), 1.8e9 + 1200)  # the flip check stops it first
    stopped = engine.store.experiment(experiment.id)
    assert stopped is not None and stopped.state == "aborted"
    assert "deleted" in (stopped.verdict or "")
    assert len(calls.read_text().splitlines()) == edits  # nothing was written
    # and its history is nobody's cron now: not shown under its bare id
    from tunerd.inputs.openclaw import native_runs, read_history

    crons = {e.cron for e in native_runs(read_history(state, 1.8e9), 1.8e9)}
    assert SLOW not in crons and not any(SLOW_ID in (c or "") for c in crons)


def test_hostile_job_ids_are_never_suggested_as_commands(tmp_path: Path) -> None:
    from tunerd.inputs.gateway import Job
    from tunerd.inputs.openclaw import in_force_of

    for job_id, shown in (
        ("x; touch /tmp/PWNED #", "OpenClaw's own tools"),
        ("--help", "OpenClaw's own tools"),
        ("abc-123", "`openclaw cron edit abc-123 --timeout-seconds N`"),
    ):
        found = in_force_of(Job(job_id, "j (OpenClaw)", timeout_ms=3000), can_edit=False)
        advice = found.unwritable("timeout") or ""
        assert shown in advice and "PWNED" not in advice and "cron edit --help" not in advice


def test_a_timeout_of_a_fraction_of_a_second_is_left_alone(tmp_path: Path) -> None:
    """2.5 s could be set to 10 s, never set back (the CLI takes whole seconds): untrusted."""
    from tunerd.inputs.openclaw import in_force_of, read_jobs

    state = gateway_state(tmp_path)
    set_by_hand(state, "2.5")
    found = in_force_of(read_jobs(state)[SLOW_ID], can_edit=True)
    assert found.timeout is None and found.untrusted
    assert "whole number of seconds" in (found.unwritable("timeout") or "")


def test_the_cli_setting_expands_home(tmp_path: Path) -> None:
    from tunerd.config import OpenClawSettings

    settings = OpenClawSettings(cli="~/bin/openclaw --profile work")
    assert settings.command == (str(Path.home() / "bin" / "openclaw"), "--profile", "work")


def test_native_jobs_alone_are_tuned_without_a_wrapper_log(tmp_path: Path) -> None:
    """An OpenClaw user with no auto-retry wrapper: no log, the gateway's history only."""
    state = gateway_state(tmp_path)
    config = native_config(tmp_path, state, tmp_path / "none" / "auto-retry.jsonl")
    done = tunerd(config, state, "cycle", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [a["cron"] for a in report["actions"] if a["result"] == "started"] == [SLOW]
    assert not [a for a in report["advisories"] if a["type"] == "unreadable_target"]


@pytest.mark.parametrize(("value", "said"), [("0", "is none"), ("2.5", "not a whole number")])
def test_a_timeout_changed_by_hand_stops_the_experiment_and_stays(
    gateway: tuple[Engine, Path, Path], value: str, said: str
) -> None:
    """Someone turns the timeout off (0) or sets 2.5 s during an experiment: the experiment
    stops and their value stays; the next flip never overwrites it."""
    from tunerd.verification import keep_in_step

    engine, state, calls = gateway
    experiment = engine.start_experiment(SLOW, "timeout", 3000, 10000, "r", {}, "tunerd", 1.8e9)
    set_by_hand(state, value)
    edits = len(calls.read_text().splitlines())
    for hour in range(1, 6):
        keep_in_step(engine, 1.8e9 + hour * 3600)
    stopped = engine.store.experiment(experiment.id)
    assert stopped is not None and stopped.state == "aborted" and said in (stopped.verdict or "")
    assert len(calls.read_text().splitlines()) == edits
    assert str(held(state)) == value


def test_a_wrapper_cron_named_like_a_missing_native_job_is_left_alone(tmp_path: Path) -> None:
    """A log line whose cron is `ghost (OpenClaw)` with no such job: counted, never tuned
    (nothing known of it), and the cycle goes on."""
    from .conftest import run_line

    state = gateway_state(tmp_path)
    log = tmp_path / "auto-retry.jsonl"
    log.write_text(
        "".join(
            run_line("ghost (OpenClaw)", (9000, 9000), ts=f"2026-11-2{d}T0{h}:00:00Z") + "\n"
            for d in range(3, 9)
            for h in range(10)
        )
    )
    config = native_config(tmp_path, state, log)
    done = tunerd(config, state, "cycle", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert not [a for a in report["actions"] if a["cron"] == "ghost (OpenClaw)"]
    assert not (tmp_path / "params.json").exists()


def test_an_unreadable_jobs_file_is_not_every_job_deleted(tmp_path: Path) -> None:
    """The layout before 2026.6: a `jobs.json` that cannot be read is an error to a target,
    never "the job is gone"."""
    from tunerd.inputs.openclaw import OpenClawError, read_jobs
    from tunerd.targets import Gateway

    folder = tmp_path / "cron"
    (folder / "runs").mkdir(parents=True)
    (folder / "jobs.json").write_text('{"jobs": [{"id": "j1", "name": "a", "payload": {}}]}')
    assert set(read_jobs(folder)) == {"j1"}
    (folder / "jobs.json").write_text("{not json")
    with pytest.raises(OpenClawError, match="no list of jobs"):
        read_jobs(folder)
    with pytest.raises(TargetError) as caught:
        Gateway(folder, ("openclaw",)).target("j1").read()
    assert "any more" not in str(caught.value)
