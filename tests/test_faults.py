"""Faults an operator's machine produces sooner or later (issue 12): absurd log lines, values a
person wrote that Level 1 reads, a FIFO where the log should be. Real processes, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, run_line
from .test_engine_cli import ENV, as_json, cli, setup, tunerd, write_log

__all__ = ["setup"]  # the fixture, shared


def test_an_absurd_line_is_malformed_not_a_crash(setup: dict[str, Path]) -> None:
    """`"totalDuration": 1e39` overflowed the float32 sketch and ended every cycle; a line dated
    9999-12-31 stayed in every window. Both are malformed lines now, named with their offset,
    and the cycle tunes the rest."""
    log = setup["root"] / "auto-retry.jsonl"
    offset = log.stat().st_size
    overflow = run_line("flaky", total=0).replace('"totalDuration": 0', '"totalDuration": 1e39')
    future = [run_line("ghost", (500, 500), ts="9999-12-31T23:59:59.000Z") for _ in range(40)]
    # ... and a clock that was not set: one such line stretched the period to year 1
    past = [run_line("flaky", ts="0001-01-01T00:00:00Z"), run_line("flaky", ts=0)]
    with log.open("a") as f:
        f.write("\n".join([overflow, *future, *past]) + "\n")
    report = as_json(setup, "analyze")
    assert report["totals"]["malformed"] == 43
    assert report["period"]["first"] >= "2000"
    assert report["malformed_samples"][0]["offset"] == offset
    assert "ghost" not in {c["cron"] for c in report["crons"]}
    cycle = as_json(setup, "cycle")
    assert {a["cron"] for a in cycle["actions"] if a["result"] == "started"} >= {"flaky", "api"}
    # simulate --from-log took the whole log as one that could not be simulated
    fitted = tunerd(setup, "simulate", "--from-log", str(log), "--weeks", "1", "--json")
    assert fitted.returncode == 0, fitted.stderr


UNTRUSTED = {
    "defaults": {"timeout": 0, "backoffBase": 1e19},
    "crons": {
        "flaky": {"maxRetries": "three"},
        "slow": {"maxRetries": -5},
        "api": {"maxRetries": True},
    },
    "experiments": {},
}


def test_hand_written_values_are_named_and_left_alone(setup: dict[str, Path]) -> None:
    """`timeout: 0` ended the cycle (division by zero), `backoffBase: 1e19` overflowed SQLite,
    and -5, "three" or true were silently read as the defaults. Each is named now; its
    parameter is not tuned and the file is not written."""
    setup["params"].write_text(json.dumps(UNTRUSTED))
    report = as_json(setup, "analyze")
    untrusted = {
        (a["subject"], a["message"].split(": ", 2)[2].split(" ")[0])
        for a in report["advisories"]
        if a["type"] == "untrusted_value"
    }
    assert untrusted == {
        (cron, param)
        for cron in ("flaky", "slow", "api", *(c["cron"] for c in report["crons"]))
        for param in ("timeout", "backoffBase")
    } | {("flaky", "maxRetries"), ("slow", "maxRetries"), ("api", "maxRetries")}
    # What is left to tune: the hostile-named crons' maxRetries (theirs is the trusted 3).
    assert {(r["cron"], r["param"]) for r in report["recommendations"]}.isdisjoint(untrusted)
    by_cron = {c["cron"]: c["params"] for c in report["crons"]}
    assert by_cron["flaky"]["maxRetries"] is None and by_cron["flaky"]["timeout"] is None
    cycle = tunerd(setup, "cycle", "--json")
    assert cycle.returncode == 0 and "Traceback" not in cycle.stderr, cycle.stderr
    started = {(a["cron"], a["param"]) for a in json.loads(cycle.stdout)["actions"]}
    assert started.isdisjoint(untrusted)
    after = json.loads(setup["params"].read_bytes())
    assert after["defaults"] == UNTRUSTED["defaults"] and after["crons"] == UNTRUSTED["crons"]
    status = tunerd(setup, "status")
    assert status.returncode == 0 and "Traceback" not in status.stderr


def test_a_script_value_tunerd_cannot_read_is_named(tmp_path: Path) -> None:
    """`MAX_RETRIES: -5,` (the wrapper loops from 1 to -5: no attempt at all) was read as the
    wrapper's default 3 with advice to add the line that is already there."""
    log = tmp_path / "auto-retry.jsonl"
    write_log(log)
    script = tmp_path / "flaky.js"
    text = "const CONFIG = {\n  MAX_RETRIES: -5,\n};\nexec(c, { timeout: 0 });\n"
    script.write_text(text)
    config = tmp_path / "tunerd.toml"
    config.write_text(
        f'log_path = "{log}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'params_file = "{tmp_path / "params.json"}"\nwindow = "3650d"\nmin_runs = 10\n'
        f'[[scripts]]\ncron = "flaky"\npath = "{script}"\n'
    )
    setup = {"root": tmp_path, "config": config}
    report = as_json(setup, "analyze")
    messages = [a["message"] for a in report["advisories"] if a["subject"] == "flaky"]
    assert any("maxRetries is '-5', not a number" in m for m in messages), messages
    assert any("timeout 0 means" in m for m in messages), messages
    assert not [r for r in report["recommendations"] if r["cron"] == "flaky"]
    as_json(setup, "cycle")
    assert script.read_text() == text


EXEC = (sys.executable, "-m", "tunerd", "exec", "--cron", "c")


def test_exec_says_which_value_it_could_not_use(tmp_path: Path) -> None:
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"defaults": {"timeout": -5}, "crons": {}}))
    log = tmp_path / "auto-retry.jsonl"
    done = subprocess.run(
        [*EXEC, "--log", str(log), "--params", str(params), "--", "true"],
        capture_output=True,
        text=True,
        env=dict(ENV, HOME=str(tmp_path)),
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "timeout -5 is negative (in defaults); running with timeout 15000" in done.stderr
    (line,) = log.read_text().splitlines()
    assert json.loads(line)["params"]["timeout"] == 15000


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_a_fifo_as_the_log_is_refused_at_once(setup: dict[str, Path]) -> None:
    """`analyze`, `status` and `verify` blocked forever in open() on a FIFO."""
    pipe = fifo(setup["root"] / "pipe.jsonl")
    started = time.monotonic()
    analyze = tunerd(setup, "analyze", str(pipe))
    assert analyze.returncode == 1
    assert "it is a named pipe (FIFO), not a file" in analyze.stderr
    verify = tunerd(
        setup,
        "verify",
        str(pipe),
        "--cron",
        "c",
        "--param",
        "maxRetries",
        "--control",
        "3",
        "--treatment",
        "4",
    )
    assert verify.returncode == 1 and "named pipe" in verify.stderr
    setup["config"].write_text(
        setup["config"].read_text().replace(str(setup["root"] / "auto-retry.jsonl"), str(pipe))
    )
    status = as_json(setup, "status")
    assert "named pipe" in status["tail"]["error"]
    assert time.monotonic() - started < 30


@pytest.mark.skipif(not Path("/bin/true").exists(), reason="needs /bin/true")
def test_exec_does_not_block_on_a_fifo_log(tmp_path: Path) -> None:
    pipe = fifo(tmp_path / "pipe.jsonl")
    done = subprocess.run(
        [*EXEC, "--log", str(pipe), "--params", str(tmp_path / "none.json"), "--", "true"],
        capture_output=True,
        text=True,
        env=dict(ENV, HOME=str(tmp_path)),
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0
    assert "could not append the run" in done.stderr


@pytest.mark.parametrize(
    ("snippet", "says"),
    [
        ('verify_after = "0s"', "verify_after: 0 s is not between 1 s and 90 d"),
        ('verify_after = "99999999999d"', "longer than any duration"),
        ('cooldown = "400d"', "cooldown: 400 d is not between 0 s and 366 d"),
        ('schedule = "61 25 * * 9"', "schedule '61 25 * * 9'"),
        ('[discord]\nwebhook_url = "file:///SECRETTOKEN"', "must be http(s)://host/"),
        ('[discord]\nwebhook_url = "not a url SECRETTOKEN"', "must be http(s)://host/"),
        (
            '[discord]\nwebhook_url = "https://example.com/api/webhooks/1/SECRETTOKEN"',
            "not a Discord webhook",
        ),
        ('[discord]\nwebhook_url = "http://127.0.0.1:notaport/SECRETTOKEN"', "not a URL"),
    ],
)
def test_configuration_that_would_misbehave_is_refused_by_every_command(
    setup: dict[str, Path], snippet: str, says: str
) -> None:
    """Accepted before, then: extend, extend, rollback on the same data (0s); an OverflowError
    from every command; fatal only at `run`; a webhook retried forever or failing a cycle after
    it applied its changes. Refused now at load, the same way by every command, in one line,
    and a webhook's token is never shown."""
    text = setup["config"].read_text()
    setup["config"].write_text(text + snippet + "\n" if "[" in snippet else snippet + "\n" + text)
    for command in ("status", "cycle", "run"):
        done = tunerd(setup, command)
        assert done.returncode == 2, (command, done.stderr)
        assert says in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "SECRETTOKEN" not in done.stderr + done.stdout


def test_a_webhook_elsewhere_needs_saying_so(setup: dict[str, Path]) -> None:
    setup["config"].write_text(
        setup["config"].read_text()
        + '[discord]\nwebhook_url = "https://relay.example/hook"\nallow_any_url = true\n'
    )
    assert tunerd(setup, "status").returncode == 0


class HangingWebhook:
    """Accepts connections and never answers (a webhook that hangs)."""

    def __init__(self) -> None:
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.port = self.socket.getsockname()[1]

    def close(self) -> None:
        self.socket.close()


def test_read_only_commands_never_wait_on_discord(setup: dict[str, Path]) -> None:
    """With notifications waiting and the webhook hanging, `tunerd status` took 10.5 s: every
    command flushed the outbox on its way out. Only the commands that act deliver now, and
    within their budget."""
    hanging = HangingWebhook()
    try:
        setup["config"].write_text(
            setup["config"].read_text()
            + f'[discord]\nwebhook_url = "http://127.0.0.1:{hanging.port}/api/webhooks/1/T"\n'
        )
        started = time.monotonic()
        assert tunerd(setup, "cycle").returncode == 0
        assert time.monotonic() - started < 9  # 5 s of delivery at most, then the outbox
        for command in ("status", "history", "report"):
            started = time.monotonic()
            done = tunerd(setup, command, "--json")
            assert done.returncode == 0, done.stderr
            assert time.monotonic() - started < 3, command
        assert json.loads(tunerd(setup, "status", "--json").stdout)["notifications"]["pending"]
    finally:
        hanging.close()


# --- the daemon -------------------------------------------------------------------------------


def small_disk(path: Path) -> bool:
    """A 3 MB tmpfs at ``path`` where the machine allows mounting one (root in a container)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def fill(path: Path) -> Path:
    filler = path / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_stalls_nothing(tmp_path: Path) -> None:
    """One "database or disk is full" ended the follower and the heartbeat while the process
    lived on (4,620 lines in the log, 660 counted). Now it is said once, reading goes on, and
    everything is saved when space returns."""
    from .test_daemon import Daemon, eventually

    state = tmp_path / "state"
    mounted = small_disk(state)
    daemon = Daemon(tmp_path)
    flag = tmp_path / "disk-is-full"
    if not mounted:
        daemon.env["TUNERD_FAULT_DISK_FULL"] = str(flag)
    try:
        daemon.start()
        daemon.append("a", 20)
        eventually(lambda: daemon.runs().get("a") == 20, timeout=5)
        filler = fill(state) if mounted else flag
        if not mounted:
            flag.touch()
        daemon.append("a", 4600)
        eventually(lambda: "cannot write the state store" in daemon.errors(), timeout=10)
        time.sleep(3)  # a few heartbeats, each failing
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert daemon.errors().count("cannot write the state store") == 1
        time.sleep(8)  # status then says the daemon's figures are behind the log, and why
        behind = daemon.cli("status")["daemon"]["behind"]
        assert behind["bytes"] > 0 and behind["seconds"] > 10
        filler.unlink()  # space returns
        eventually(lambda: daemon.runs().get("a") == 4620, timeout=15, show=daemon.runs)
        assert "works again" in daemon.errors()
        assert daemon.cli("status")["tail"]["entries"] == 4620
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.errors()
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
        if mounted:
            subprocess.run(["umount", "-l", str(state)], check=False)


def test_a_failing_job_is_not_run_again_at_once(tmp_path: Path) -> None:
    """A cycle that failed (its log missing) ran again at once, forever: 35 children in 90 s.
    It is said once now, with its cause, and tried again a minute later."""
    import sqlite3

    from .test_daemon import Daemon

    daemon = Daemon(tmp_path)
    daemon.env["TUNERD_LOG_LEVEL"] = "debug"
    daemon.start()
    assert daemon.stop() == 0
    with sqlite3.connect(tmp_path / "state" / "tunerd.sqlite3") as db:
        db.execute(
            "UPDATE meta SET value = ? WHERE key = 'last_cycle_at'", (str(time.time() - 8 * 86400),)
        )
    assert not daemon.log.exists()
    daemon.start()
    try:
        time.sleep(8)
        errors = daemon.errors()
        assert errors.count("job cycle failed: LogFileError") == 1, errors
        assert "cannot read the log" in errors and "runs again in 1 min" in errors
        assert "failed again" not in errors and "Traceback" not in errors
        assert daemon.proc is not None and daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0


def test_failures_back_off_until_the_next_time_and_discord_hears_once(tmp_path: Path) -> None:
    """The daemon's bookkeeping of a failing job, in-process: 1, 2, 4 ... minutes apart, a
    missed cycle's retry only before the next scheduled one, Discord told once, and once more
    when it works."""
    import concurrent.futures

    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    from tunerd.config import Settings
    from tunerd.server import Daemon

    settings = Settings(
        log_path=tmp_path / "log.jsonl",
        state_dir=tmp_path / "state",
        params_file=tmp_path / "params.json",
    )
    daemon = Daemon(None, settings)
    daemon.scheduler = AsyncIOScheduler()  # not started: it only holds the jobs
    daemon.store.set_meta("last_cycle_at", str(time.time() - 8 * 86400))
    told: list[str] = []
    daemon.worker.tell = lambda n: told.append(n.kind)  # type: ignore[method-assign]

    def done(cause: str | None) -> concurrent.futures.Future[str | None]:
        future: concurrent.futures.Future[str | None] = concurrent.futures.Future()
        future.set_result(cause)
        return future

    delays = []
    for _ in range(5):
        daemon._job_done("cycle", done("LogFileError: cannot read the log"))
        failing = daemon._failing["cycle"]
        delays.append(round((failing.retry_at - time.time()) / 60))
        (retry,) = [j for j in daemon.scheduler.get_jobs() if j.id == "cycle-missed"]
        assert abs(retry.trigger.run_date.timestamp() - failing.retry_at) < 1
    assert delays == [1, 2, 4, 8, 16]
    assert told == ["job_failing"]
    for _ in range(4):  # 32, 60, 60 minutes ... still before next Sunday's cycle
        daemon._job_done("cycle", done("LogFileError: cannot read the log"))
    assert round((daemon._failing["cycle"].retry_at - time.time()) / 60) == 60
    daemon._job_done("cycle", done(None))
    assert "cycle" not in daemon._failing and told == ["job_failing", "job_recovered"]
    daemon.worker.executor.shutdown()
    daemon.store.close()


def test_a_state_store_deleted_under_the_daemon_stops_it(tmp_path: Path) -> None:
    """The daemon went on with the deleted file while commands used a new one; it exits with
    status 1 now (systemd starts it again on the file that is there)."""
    from .test_daemon import Daemon, eventually

    daemon = Daemon(tmp_path)
    daemon.start()
    daemon.append("a", 3)
    eventually(lambda: daemon.runs().get("a") == 3)
    (tmp_path / "state" / "tunerd.sqlite3").unlink()
    daemon.append("a", 1)
    assert daemon.proc is not None
    assert daemon.proc.wait(timeout=90) == 1
    assert "was deleted under the running daemon" in daemon.errors()
    daemon.stderr.close()


def test_state_that_cannot_be_trusted_is_refused_with_what_to_do(setup: dict[str, Path]) -> None:
    """A truncated database beside a params file with experiment blocks was silently a new one
    (the next cycle reused the blocks' ids); a damaged one printed a traceback."""
    as_json(setup, "cycle")  # experiments started: blocks in the params file
    before = setup["params"].read_bytes()
    assert json.loads(before)["experiments"]
    database = setup["root"] / "state" / "tunerd.sqlite3"
    for suffix in ("-wal", "-shm"):
        database.with_name(database.name + suffix).unlink(missing_ok=True)
    database.write_bytes(b"")  # truncated
    for command in ("cycle", "status", "run"):
        done = tunerd(setup, command)
        assert done.returncode in (1, 2), done.stderr
        assert "the state store" in done.stderr and "does not know" in done.stderr
        assert "restore" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert setup["params"].read_bytes() == before
    database.write_bytes(b"this is not a database" * 100)
    for command in ("status", "run"):
        done = tunerd(setup, command)
        assert done.returncode in (1, 2) and "is damaged" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_values_logged_by_a_run_are_trusted_no_more_than_hand_written_ones(
    setup: dict[str, Path],
) -> None:
    """A run that logs `"timeout": -5` in its params: Level 1 ran with something tunerd cannot
    tell; the proposal read "15,000 -> 22,500" as if it were the default."""
    log = setup["root"] / "auto-retry.jsonl"
    bad = {"maxRetries": 3, "timeout": -5, "backoffBase": 1000}
    log.write_text(
        "".join(run_line("slow", (25_000,), params=bad) + "\n" for _ in range(40)),
        encoding="utf-8",
    )
    setup["params"].unlink()
    report = as_json(setup, "analyze")
    slow = next(c for c in report["crons"] if c["cron"] == "slow")
    assert slow["params"]["timeout"] is None and slow["params"]["maxRetries"] == 3
    assert any(
        a["type"] == "untrusted_value" and "timeout -5 is negative" in a["message"]
        for a in report["advisories"]
    )
    assert not any(r["param"] == "timeout" for r in report["recommendations"])


def test_a_store_older_than_the_params_file_is_refused(setup: dict[str, Path]) -> None:
    """Restored from a backup older than an experiment: the next cycle overwrote the block
    it no longer knew, silently."""
    as_json(setup, "cycle")
    doc = json.loads(setup["params"].read_bytes())
    doc["experiments"]["newer"] = dict(next(iter(doc["experiments"].values())), id="99")
    setup["params"].write_text(json.dumps(doc))
    before = setup["params"].read_bytes()
    for command in ("cycle", "status", "run"):
        done = tunerd(setup, command)
        assert done.returncode in (1, 2), done.stderr
        assert "1 of experiments the state store" in done.stderr and "'newer'" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert setup["params"].read_bytes() == before


def test_a_params_file_older_than_the_store_is_refused(setup: dict[str, Path]) -> None:
    """The mirror case: a params file restored from before a rollback still holds the block of
    an experiment that ended; Level 1 kept splitting runs onto its treatment, unverified."""
    as_json(setup, "cycle")
    with_blocks = setup["params"].read_bytes()
    status = as_json(setup, "status")
    experiment = status["experiments"][0]
    done = tunerd(setup, "rollback", str(experiment["change"]))
    assert done.returncode == 0, done.stderr
    setup["params"].write_bytes(with_blocks)  # the old file back
    done = tunerd(setup, "status")
    assert done.returncode == 1 and "of experiments that ended" in done.stderr, done.stderr
    assert repr(experiment["cron"]) in done.stderr or experiment["cron"] in done.stderr


def test_a_damaged_page_or_a_full_disk_mid_command_is_one_line(setup: dict[str, Path]) -> None:
    """A database whose header is fine but whose pages are not, and a disk that fills during a
    cycle: raw tracebacks from every command before."""
    flag = setup["root"] / "full"
    flag.touch()
    done = tunerd(setup, "cycle", TUNERD_FAULT_DISK_FULL=str(flag))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("the disk is full")
    assert json.loads(setup["params"].read_bytes())["experiments"] == {}
    flag.unlink()
    as_json(setup, "cycle")
    database = setup["root"] / "state" / "tunerd.sqlite3"
    tunerd(setup, "status")  # checkpoints the write-ahead log into the file
    assert database.stat().st_size > 8 * 4096
    with database.open("r+b") as f:
        f.seek(3 * 4096)
        f.write(os.urandom(5 * 4096))
    for command in ("status", "history", "cycle", "run"):
        done = tunerd(setup, command)
        assert done.returncode in (1, 2) and "Traceback" not in done.stderr, done.stderr
        assert "damaged" in done.stderr and "restore it from a backup" in done.stderr


def test_a_disk_full_at_start_is_not_called_damaged(tmp_path: Path) -> None:
    """SQLite says "disk I/O error" when it cannot create its write-ahead log on a full disk:
    that was reported as a damaged database, exit 2, and systemd never restarted tunerd."""
    from .test_daemon import Daemon

    state = tmp_path / "state"
    if not small_disk(state):
        pytest.skip("cannot mount a tmpfs here")
    try:
        daemon = Daemon(tmp_path)
        daemon.append("a", 5)
        daemon.cli("status")  # the database exists, and holds a little
        assert (state / "tunerd.sqlite3").stat().st_size > 0
        for name in os.listdir(state):
            if name.endswith(("-wal", "-shm")):
                (state / name).unlink()
        fill(state)
        done = cli("run", "--config", str(daemon.config), home=tmp_path)
        assert done.returncode == 1, done.stderr
        assert "the disk is full" in done.stderr and "damaged" not in done.stderr
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_a_cycle_names_a_params_file_it_cannot_read(setup: dict[str, Path]) -> None:
    """A params file that is not valid as a whole left every cron alone and the cycle said only
    "nothing to change"."""
    setup["params"].write_text("[1, 2, 3]\n")
    done = tunerd(setup, "cycle")
    assert done.returncode == 0, done.stderr
    assert "is not a valid params file" in done.stderr and "nothing to change" in done.stdout
    report = json.loads(tunerd(setup, "cycle", "--json").stdout)
    assert [a["type"] for a in report["advisories"]][:1] == ["unreadable_target"]
    assert setup["params"].read_text() == "[1, 2, 3]\n"


def test_a_log_that_fails_half_way_is_one_line(setup: dict[str, Path]) -> None:
    """A read that fails after the open (an I/O error; here a special file) printed a
    traceback."""
    if not Path("/proc/self/mem").exists():
        pytest.skip("no /proc here")
    done = tunerd(setup, "analyze", "/proc/self/mem")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert (
        done.stderr.strip()
        == "tunerd: error: cannot read the log /proc/self/mem: Input/output error"
    )
