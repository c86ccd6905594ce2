"""Against a real OpenClaw gateway, when one is installed (skipped otherwise): tunerd changes a
native job's timeout through the real `openclaw cron edit`, reads it back from the gateway's
state, flips it and rolls it back; with the gateway stopped, the edit fails and nothing changes.

How to install one (Node 24 and the `openclaw` package, about a minute, 650 MB): docs/openclaw.md.
The gateway runs on a scratch HOME, offline, on loopback port 18789 (skipped if that is taken).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tunerd.engine import Engine
from tunerd.notify import LogNotifier
from tunerd.store import Store
from tunerd.targets import Gateway, ParamsFileTarget, TargetError, Targets

OPENCLAW = shutil.which("openclaw")
PORT = 18789
ONBOARD = [
    "onboard",
    "--non-interactive",
    "--accept-risk",
    "--mode",
    "local",
    "--auth-choice",
    "skip",
    "--gateway-bind",
    "loopback",
    "--skip-channels",
    "--no-install-daemon",
    "--skip-health",
    "--skip-skills",
    "--skip-search",
    "--skip-ui",
]  # offline: no model, no channel, no daemon unit


def _usable() -> str | None:
    """Why the real gateway cannot be tried here, or None."""
    if OPENCLAW is None:
        return "no openclaw command on the PATH (docs/openclaw.md says how to install one)"
    try:
        done = subprocess.run([OPENCLAW, "--version"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"openclaw does not run: {exc}"
    if done.returncode != 0:
        return f"openclaw --version failed: {done.stderr.decode(errors='replace')[:200]}"
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", PORT)) == 0:
            return f"port {PORT} is taken (another gateway?)"
    return None


WHY_NOT = _usable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


def openclaw(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    assert OPENCLAW is not None
    return subprocess.run(
        [OPENCLAW, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


@pytest.fixture
def real_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    home = tmp_path / "home"
    (home / "tmp").mkdir(parents=True)
    env = dict(os.environ, HOME=str(home), TMPDIR=str(home / "tmp"))
    for key, value in (("HOME", str(home)), ("TMPDIR", str(home / "tmp"))):
        monkeypatch.setenv(key, value)  # tunerd's own calls of openclaw see the same HOME
    onboard = openclaw(
        *ONBOARD,
        env=env,
    )
    assert onboard.returncode == 0, onboard.stderr
    gateway_log = home / "logs" / "openclaw.log"
    openclaw("config", "set", "logging.file", str(gateway_log), env=env)
    out = (home / "gateway.out").open("w")
    assert OPENCLAW is not None
    process = subprocess.Popen(
        [OPENCLAW, "gateway", "run", "--port", str(PORT), "--bind", "loopback"],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while openclaw("cron", "list", "--json", env=env).returncode != 0:  # ready: it answers
            assert process.poll() is None, (home / "gateway.out").read_text()[-2000:]
            assert time.monotonic() < deadline, "the gateway did not start within 2 minutes"
            time.sleep(1)
        yield {"home": str(home), "pid": str(process.pid)} | {"env": json.dumps(env)}
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        out.close()


def test_a_real_gateway_takes_the_timeout_and_gives_it_back(
    real_gateway: dict[str, str], tmp_path: Path
) -> None:
    env = json.loads(real_gateway["env"])
    added = openclaw(
        "cron",
        "add",
        *("--name", "e2e-slow", "--every", "1h", "--no-deliver", "--timeout-seconds", "3"),
        "--command-argv",
        '["sh", "-c", "sleep 1"]',
        env=env,
    )
    assert added.returncode == 0, added.stderr
    job = json.loads(added.stdout)["id"]
    state = Path(real_gateway["home"]) / ".openclaw" / "state" / "openclaw.sqlite"

    def seconds() -> int:
        db = sqlite3.connect(f"file:{state}?mode=ro", uri=True)
        try:
            (value,) = db.execute(
                "SELECT json_extract(job_json, '$.payload.timeoutSeconds') FROM cron_jobs"
                " WHERE job_id = ?",
                (job,),
            ).fetchone()
        finally:
            db.close()
        return int(value)

    assert OPENCLAW is not None
    engine = Engine(
        Store(tmp_path / "state"),
        Targets(ParamsFileTarget(tmp_path / "params.json"), {}, Gateway(state, (OPENCLAW,))),
        LogNotifier(),
        verify_after=86400,
    )
    cron = "e2e-slow (OpenClaw)"
    experiment = engine.start_experiment(cron, "timeout", 3000, 10000, "e2e", {}, "tunerd", 1.8e9)
    assert experiment.target == f"openclaw:{job}"
    (start,) = engine.store.changes()
    assert seconds() * 1000 == start.new_value
    engine.flip(experiment, 13000 - start.new_value, 1.8e9 + 3600)
    assert seconds() * 1000 == 13000 - start.new_value
    engine.manual_rollback(start.id, 1.8e9 + 7200)
    assert seconds() == 3
    os.kill(int(real_gateway["pid"]), 15)  # the gateway stops: the next edit cannot be made
    time.sleep(5)
    with pytest.raises(TargetError, match="Gateway not reachable"):
        engine.start_experiment(cron, "timeout", 3000, 10000, "e2e", {}, "tunerd", 1.8e9 + 9000)
    assert seconds() == 3
