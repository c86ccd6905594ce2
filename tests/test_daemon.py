"""The daemon as systemd runs it: a real subprocess, real signals, a real notify socket, real
file rotation; every line counted exactly once across SIGTERM and SIGKILL restarts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from .conftest import ERR_OTHER, ROOT, run_line

ENV = {k: v for k, v in os.environ.items() if not k.startswith("TUNERD_")}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Daemon:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "tunerd.toml"
        self.log = root / "logs" / "auto-retry.jsonl"
        self.log.parent.mkdir(exist_ok=True)
        if not self.config.exists():
            self.write_config()
        self.notify_path = root / "notify.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.written = 0
        self.env: dict[str, str] = {}
        """More environment for the daemon (a fault to inject, a log level)."""

    def write_config(self, extra: str = "") -> None:
        self.config.write_text(
            f'log_path = "{self.log}"\nstate_dir = "{self.root / "state"}"\n'
            f'params_file = "{self.root / "params.json"}"\n' + extra
        )

    def start(self, command: list[str] | None = None) -> None:
        """Start the daemon (``command``: another way of running ``tunerd run``)."""
        with __import__("contextlib").suppress(FileNotFoundError):
            self.notify_path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify_path))
        self.sock.settimeout(15)
        env = dict(ENV, HOME=str(self.root), NOTIFY_SOCKET=str(self.notify_path), **self.env)
        if "WATCHDOG_USEC" in os.environ:
            env["WATCHDOG_USEC"] = os.environ["WATCHDOG_USEC"]
        self.stderr = open(self.root / "daemon.err", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", "tunerd"]), "run", "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
            env=env,
            cwd=ROOT,
        )
        self.startup = self.messages_until("READY=1")

    def messages_until(self, wanted: str) -> str:
        assert self.sock is not None
        seen = ""
        while wanted not in seen:
            seen += self.sock.recv(4096).decode() + "\n"
        return seen

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        self.stderr.close()
        if self.sock:
            self.sock.close()
        return code

    def append(self, cron: str, n: int, partial: bool = False) -> None:
        with self.log.open("a") as f:
            for _ in range(n):
                f.write(run_line(cron, ts=now_iso()) + "\n")
        self.written += n

    def cli(self, *args: str) -> Any:
        done = subprocess.run(
            [sys.executable, "-m", "tunerd", *args, "--json", "--config", str(self.config)],
            capture_output=True,
            text=True,
            env=dict(ENV, HOME=str(self.root)),
            cwd=ROOT,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def runs(self) -> dict[str, int]:
        return {c["cron"]: c["runs"] for c in self.cli("status")["crons"]}

    def errors(self) -> str:
        return (self.root / "daemon.err").read_text()


def eventually(
    check: Callable[[], bool], timeout: float = 2.0, show: Callable[[], object] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within the time allowed: {show and show()}"
        time.sleep(0.05)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait()


def test_follows_in_real_time_and_stops_cleanly(daemon: Daemon) -> None:
    daemon.start()
    daemon.append("a", 5)
    eventually(lambda: daemon.runs().get("a") == 5)  # never more than 2 s behind
    with daemon.log.open("a") as f:
        f.write(run_line("a", (500,) * 3, ok=False, error=ERR_OTHER, ts=now_iso()) + "\n")
    eventually(lambda: daemon.runs().get("a") == 6)
    status = daemon.cli("status")
    [cron] = status["crons"]  # the daemon's own counts: one run of six failed, after retries
    assert cron["final_failure_rate"] == cron["retry_rate"] == round(1 / 6, 6)
    assert status["daemon"]["pid"] == daemon.proc.pid  # type: ignore[union-attr]
    assert status["tail"]["offset"] == daemon.log.stat().st_size
    second = subprocess.run(
        [sys.executable, "-m", "tunerd", "run", "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        env=dict(ENV, HOME=str(daemon.root)),
        cwd=ROOT,
        timeout=30,
    )
    assert second.returncode == 1 and "already runs" in second.stderr
    assert daemon.stop() == 0
    assert "stopped" in daemon.errors()


def test_exactly_once_across_rotation_and_restarts(daemon: Daemon) -> None:
    daemon.start()
    daemon.append("a", 10)
    eventually(lambda: daemon.runs().get("a") == 10)
    daemon.log.rename(daemon.log.with_name("auto-retry.jsonl.1"))  # rotation while running
    daemon.append("a", 7)
    eventually(lambda: daemon.runs().get("a") == 17)
    assert daemon.stop(signal.SIGKILL) == -9
    daemon.append("a", 3)  # written while down ...
    daemon.log.rename(daemon.log.with_name("auto-retry.jsonl.2"))  # ... then rotated while down
    daemon.append("a", 4)
    with daemon.log.open("a") as f:
        f.write(run_line("a", ts=now_iso())[:30])  # a partial line at the moment of a crash
    daemon.start()
    eventually(lambda: daemon.runs().get("a") == 24, timeout=5, show=daemon.runs)
    assert daemon.cli("status")["tail"]["entries"] == 24  # counted across the restart
    assert daemon.stop() == 0
    with daemon.log.open("a") as f:
        f.write(run_line("a", ts=now_iso())[30:] + "\n")
    daemon.start()
    eventually(lambda: daemon.runs().get("a") == 25, timeout=5)
    with daemon.log.open("r+b") as f:  # copytruncate
        f.truncate(0)
    daemon.append("a", 2)
    eventually(lambda: daemon.runs().get("a") == 27, timeout=5)
    assert daemon.stop() == 0


def test_sighup_keeps_a_valid_configuration(daemon: Daemon) -> None:
    daemon.start()
    daemon.append("a", 2)
    eventually(lambda: daemon.runs().get("a") == 2)
    valid = daemon.config.read_text()
    daemon.config.write_text(valid + 'verify_after = "soon"\n')
    daemon.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    assert "RELOADING=1" in daemon.messages_until("READY=1")
    eventually(lambda: "not reloaded" in daemon.errors())
    daemon.config.write_text(valid)  # (for the CLI below; the daemon is not told)
    daemon.append("a", 1)  # still following, with the old configuration
    eventually(lambda: daemon.runs().get("a") == 3)
    daemon.write_config('schedule = "0 22 * * 0"\n')
    daemon.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    eventually(lambda: "configuration reloaded" in daemon.errors())
    assert daemon.stop() == 0


def test_verification_timers_run_in_the_daemon(daemon: Daemon) -> None:
    daemon.write_config('verify_after = "2s"\nmin_runs = 10\nwindow = "30d"\n')
    with daemon.log.open("a") as f:
        for _ in range(30):
            f.write(run_line("flaky", (500,), ts=now_iso()) + "\n")
        for _ in range(10):
            f.write(
                run_line("flaky", (500, 500, 500), ok=False, error=ERR_OTHER, ts=now_iso()) + "\n"
            )
    daemon.start()
    started = daemon.cli("cycle")  # the CLI tells the daemon, which sets the verification timer
    assert [a["result"] for a in started["actions"]] == ["started"]
    experiment = daemon.cli("status")["experiments"][0]
    with daemon.log.open("a") as f:  # runs in both arms: the verdict runs SciPy's tests
        for arm, value in (("control", 3), ("treatment", 4)):
            for i in range(25):
                fails = arm == "control" and i % 4 == 0
                f.write(
                    run_line(
                        "flaky",
                        (500,) * (3 if fails else 1),
                        ok=not fails,
                        ts=now_iso(),
                        params={"maxRetries": value},
                        experiment={"id": experiment["id"], "arm": arm},
                    )
                    + "\n"
                )

    def settled() -> bool:
        return any(c["action"] == "commit" for c in daemon.cli("history")["changes"])

    eventually(settled, timeout=10)  # 28 % of failures against none: committed by the daemon
    assert daemon.proc is not None
    mapped = Path(f"/proc/{daemon.proc.pid}/maps").read_text()
    assert "scipy" not in mapped and "numpy" not in mapped  # the job ran in a child process
    assert daemon.stop() == 0
    assert "np.float64" not in daemon.errors()  # SciPy's optimiser logs nothing of its own


def test_watchdog_pings_and_the_system_unit_is_hardened(daemon: Daemon) -> None:
    import shutil

    os.environ["WATCHDOG_USEC"] = "400000"
    try:
        daemon.start()
        assert "WATCHDOG=1" in daemon.messages_until("WATCHDOG=1")
        assert "STATUS=following auto-retry.jsonl" in daemon.startup
    finally:
        del os.environ["WATCHDOG_USEC"]
    assert daemon.stop() == 0
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    score = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(ROOT / "systemd" / "tunerd.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = next(x for x in score.stdout.splitlines() if "Overall exposure level" in x)
    assert float(line.split(":")[1].split()[0]) <= 2.0


def missed_cycle_with_webhook(daemon: Daemon, port: int) -> None:
    """A flaky cron, a webhook on ``port``, and a weekly cycle that fell due while stopped."""
    import sqlite3

    from .test_discord import TOKEN

    url = f"http://127.0.0.1:{port}/api/webhooks/1/{TOKEN}"
    daemon.write_config(f'min_runs = 10\n[discord]\nwebhook_url = "{url}"\n')
    with daemon.log.open("a") as f:
        for _ in range(30):
            f.write(run_line("flaky", (500,), ts=now_iso()) + "\n")
        for _ in range(10):
            f.write(run_line("flaky", (500,) * 3, ok=False, error=ERR_OTHER, ts=now_iso()) + "\n")
    (daemon.root / "state").mkdir()
    daemon.cli("status")  # creates the store
    db = sqlite3.connect(daemon.root / "state" / "tunerd.sqlite3")
    db.execute(
        "INSERT OR REPLACE INTO meta VALUES ('last_cycle_at', ?)", (str(time.time() - 8 * 86400),)
    )
    db.commit()
    db.close()


def assert_heard_once_in_order(daemon: Daemon, received: list[dict[str, Any]]) -> None:
    from .test_discord import TOKEN

    titles = [m["embeds"][0]["title"] for m in received]
    assert titles[0] == "Experiment started: maxRetries 3 → 4"
    bodies = [json.dumps(m["embeds"][0]["description"]) for m in received]
    assert len(bodies) == len(set(bodies))  # nothing twice
    assert all(m["allowed_mentions"] == {"parse": []} for m in received)
    assert TOKEN not in daemon.errors()


def test_a_missed_weekly_cycle_runs_at_start_and_discord_hears_once(daemon: Daemon) -> None:
    from .test_discord import FakeDiscord

    server = FakeDiscord([429])
    missed_cycle_with_webhook(daemon, server.port)
    try:
        daemon.start()
        eventually(lambda: len(server.received) >= 2, timeout=15)  # experiment started, advisory
        time.sleep(1)
        assert daemon.stop() == 0
    finally:
        server.stop()
    assert_heard_once_in_order(daemon, server.received)
    assert "missed while stopped" in daemon.errors()


def test_discord_down_for_a_while_hears_everything_later_once(daemon: Daemon) -> None:
    """Nothing listens on the webhook's port while the job speaks, the daemon restarts, then
    Discord answers 500 once: every notification arrives once, in order, from the outbox."""
    from .test_discord import FakeDiscord

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    missed_cycle_with_webhook(daemon, port)
    daemon.start()
    eventually(lambda: "retrying in" in daemon.errors(), timeout=20, show=daemon.errors)
    assert daemon.stop() == 0  # the job in flight finishes first
    server = FakeDiscord([500], port=port)
    try:
        daemon.start()  # the outbox is delivered at start, then every 15 s
        eventually(lambda: len(server.received) >= 2, timeout=40, show=daemon.errors)
        time.sleep(1)
        assert daemon.stop() == 0
    finally:
        server.stop()
    assert_heard_once_in_order(daemon, server.received)
    assert "ConnectError" in daemon.errors() and "server error 500" in daemon.errors()


def test_the_watchfiles_fallback_follows_too(daemon: Daemon) -> None:
    """Where inotify is not available the daemon falls back to watchfiles."""
    runner = daemon.root / "no_inotify.py"
    runner.write_text(
        "import sys\n"
        "import tunerd.inotify as inotify\n"
        "def refuse(*args, **kwargs):\n"
        "    raise inotify.Unavailable('not in this test')\n"
        "inotify.DirectoryWatch = refuse\n"
        "from tunerd.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    daemon.start([sys.executable, str(runner)])
    daemon.append("w", 4)
    eventually(lambda: daemon.runs().get("w") == 4, timeout=5, show=daemon.runs)
    daemon.log.rename(daemon.log.with_name("auto-retry.jsonl.1"))
    daemon.append("w", 2)
    eventually(lambda: daemon.runs().get("w") == 6, timeout=5, show=daemon.runs)
    assert daemon.stop() == 0


def test_directory_watch_fires_only_for_the_log(tmp_path: Path) -> None:
    import asyncio

    from tunerd.inotify import DirectoryWatch

    async def scenario() -> list[bool]:
        watch = DirectoryWatch(tmp_path, "auto-retry.jsonl")
        try:
            (tmp_path / "other.log").write_text("x")
            quiet = await watch.changed(0.2)
            (tmp_path / "auto-retry.jsonl").write_text("x")
            woke = await watch.changed(2)
            (tmp_path / "auto-retry.jsonl").rename(tmp_path / "auto-retry.jsonl.1")
            rotated = await watch.changed(2)
            return [quiet, woke, rotated]
        finally:
            watch.close()

    assert asyncio.run(scenario()) == [False, True, True]


def test_the_daemon_follows_openclaws_history(daemon: Daemon) -> None:
    """`[openclaw] state` configured: the daemon reads the gateway's history when its database
    changes (read-only) and publishes the native jobs' runs; `tunerd status` shows them."""
    import shutil
    import sqlite3

    state = daemon.root / "openclaw" / "openclaw.sqlite"
    state.parent.mkdir()
    shutil.copy(ROOT / "tests" / "data" / "openclaw-cron.sqlite", state)
    daemon.write_config(f'window = "3650d"\n[openclaw]\nstate = "{state}"\n')
    daemon.start()

    def published() -> dict[str, Any]:
        db = sqlite3.connect(f"file:{daemon.root / 'state' / 'tunerd.sqlite3'}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT document FROM daemon_status WHERE id = 1").fetchone()
        finally:
            db.close()
        return (json.loads(row[0]).get("native") or {}) if row else {}

    flaky = "flaky-cmd (OpenClaw)"
    eventually(lambda: published().get("crons", {}).get(flaky, [0])[0] == 37, timeout=15)
    assert daemon.runs()[flaky] == 37
    # ...and keeps its digest for the one-shot commands, which then read only what is new
    assert len(list((daemon.root / "state" / "openclaw").glob("*.digest"))) == 1
    db = sqlite3.connect(state)
    with db:  # the gateway finishes one more run of flaky-cmd
        row = db.execute(
            "SELECT r.* FROM cron_run_receipts r JOIN cron_jobs j USING (job_id)"
            " WHERE j.name = 'flaky-cmd' AND r.status = 'ok' LIMIT 1"
        ).fetchone()
        started = int(time.time() * 1000) - 5000
        db.execute(
            "INSERT INTO cron_run_receipts VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            ("new-run", *row[1:5], "manual:new", *row[6:9], started, started + 1000, None),
        )
    db.close()
    eventually(lambda: published()["crons"][flaky][0] == 38, timeout=20)
    assert daemon.runs()[flaky] == 38
    db = sqlite3.connect(state)
    with db:  # deleted in OpenClaw: nobody's cron any more
        db.execute("DELETE FROM cron_jobs WHERE name = 'flaky-cmd'")
    db.close()
    eventually(lambda: flaky not in published()["crons"], timeout=20)
    assert flaky not in daemon.runs()
    db = sqlite3.connect(state)
    with db:  # renamed in OpenClaw: its runs go with it
        db.execute("UPDATE cron_jobs SET name = 'slow-renamed' WHERE name = 'slow-cmd'")
    db.close()
    renamed = "slow-renamed (OpenClaw)"
    eventually(lambda: published()["crons"].get(renamed, [0])[0] == 28, timeout=30)
    assert "slow-cmd (OpenClaw)" not in published()["crons"]
    fresh = state.with_name("fresh.sqlite")  # the database replaced whole: counted afresh
    shutil.copy(ROOT / "tests" / "data" / "openclaw-cron.sqlite", fresh)
    fresh.rename(state)
    eventually(lambda: published()["crons"].get(flaky, [0])[0] == 37, timeout=30)
    assert daemon.stop() == 0
