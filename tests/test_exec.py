"""`tunerd exec` with real subprocesses: timeouts that kill a whole process group, retries with
the backoff, 20 MB of output, fifty runs ending together, experiment arms, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT

ENV = {k: v for k, v in os.environ.items() if not k.startswith("TUNERD_")}


class Runner:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = root / "logs" / "auto-retry.jsonl"
        self.params = root / "params.json"
        self.config = root / "tunerd.toml"
        self.config.write_text(
            f'log_path = "{self.log}"\nparams_file = "{self.params}"\n'
            f'state_dir = "{root / "state"}"\n'
        )

    def set_params(self, document: dict[str, Any]) -> None:
        self.params.write_text(json.dumps(document))

    def argv(self, cron: str, *command: str, options: tuple[str, ...] = ()) -> list[str]:
        return [
            *(sys.executable, "-m", "tunerd", "exec", "--cron", cron),
            *("--config", str(self.config), *options, "--", *command),
        ]

    def exec(
        self, cron: str, *command: str, options: tuple[str, ...] = (), **kw: Any
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self.argv(cron, *command, options=options),
            capture_output=True,
            env=ENV,
            cwd=ROOT,
            timeout=120,
            **kw,
        )

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.log.read_bytes().splitlines()]


@pytest.fixture
def runner(tmp_path: Path) -> Runner:
    return Runner(tmp_path)


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaps, as in a container without an init, is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_command_past_its_timeout_dies_with_its_children(runner: Runner) -> None:
    runner.set_params({"defaults": {"timeout": 1000, "maxRetries": 2, "backoffBase": 100}})
    pids = runner.root / "pids"
    script = f"sleep 60 & echo $! >> {pids}; sleep 60"
    started = time.monotonic()
    done = runner.exec("slow", "sh", "-c", script)
    elapsed = time.monotonic() - started
    assert done.returncode == 124
    assert elapsed < 10  # two attempts of a second, not two minutes
    background = [int(p) for p in pids.read_text().split()]
    assert len(background) == 2
    time.sleep(0.2)
    assert not any(alive(p) for p in background)  # the whole group was killed
    [line] = runner.lines()
    assert line["type"] == "failure" and line["context"] == {"cron": "slow"}
    assert [a["error"]["type"] for a in line["attempts"]] == ["ETIMEDOUT", "ETIMEDOUT"]
    assert all(950 <= a["duration"] < 4000 for a in line["attempts"])
    assert line["finalError"]["type"] == "ETIMEDOUT" and "reason" not in line
    assert line["params"]["timeout"] == 1000
    report = subprocess.run(
        [sys.executable, "-m", "tunerd", "analyze", str(runner.log), "--json"],
        capture_output=True,
        env=ENV,
        cwd=ROOT,
        check=True,
    )
    [cron] = json.loads(report.stdout)["crons"]
    assert cron["errors"]["timeout"] == 2 and cron["failures"] == 1


def test_fails_twice_then_succeeds_with_the_backoff(runner: Runner) -> None:
    """An exit code named by --retry-exit is retried with the wrapper's backoff."""
    runner.set_params({"defaults": {"backoffBase": 200}, "crons": {"flaky": {"maxRetries": 4}}})
    count = runner.root / "count"
    script = (
        f'n=$(cat {count} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {count}; echo "try $n";'
        ' [ $n -ge 3 ] && exit 0; echo "HTTP 429 Too Many Requests" >&2; exit 3'
    )
    done = runner.exec("flaky", "sh", "-c", script, options=("--retry-exit", "3,75"))
    assert done.returncode == 0
    assert done.stdout == b"try 1\ntry 2\ntry 3\n"  # every attempt's output, passed through
    assert done.stderr.count(b"HTTP 429") == 2
    [line] = runner.lines()
    assert line["type"] == "success"
    assert [a["success"] for a in line["attempts"]] == [False, False, True]
    first = line["attempts"][0]["error"]
    # What the wrapper's exec() error would say (no statusCode: the wrapper never sees one),
    # retried because it was asked to; the 429 in the message still counts as a rate limit.
    assert (first["type"], first["retryable"], first["category"]) == (3, True, "unknown")
    assert "statusCode" not in first and "HTTP 429" in first["message"]
    assert line["totalDuration"] >= 200 + 400  # waited 200 ms, then 400 ms
    assert line["result"]["output"] == "try 3\n"
    assert line["params"] == {
        "maxRetries": 4,
        "timeout": 15000,
        "backoffBase": 200,
        "backoff": "exponential",
    }


def test_a_non_zero_exit_is_final_as_in_the_wrapper(runner: Runner) -> None:
    """The wrapper's scripts reject with the exit status as the error's code, which it does not
    retry: one attempt, `reason: "Non-retryable error"`, and the line's bytes are the wrapper's
    (compact `JSON.stringify`, its key order)."""
    done = runner.exec("usage", "sh", "-c", "echo bad flag >&2; exit 64")
    assert done.returncode == 64
    raw = runner.log.read_bytes()
    assert b'"type":"failure"' in raw and b", " not in raw.split(b'"attempts"')[0]
    [line] = runner.lines()
    assert list(line) == [
        "timestamp",
        "type",
        "context",
        "attempts",
        "totalDuration",
        "finalError",
        "reason",
        "params",
    ]
    assert len(line["attempts"]) == 1 and line["reason"] == "Non-retryable error"
    error = line["finalError"]
    assert list(error) == ["type", "message", "retryable", "category", "suggestedFix"]
    assert (error["type"], error["retryable"]) == (64, False)
    assert error["message"].startswith("Command failed: sh -c echo bad flag >&2; exit 64\n")
    # ...except when "timeout" is in the message: the wrapper's rule retries that.
    slow = runner.exec("slow", "sh", "-c", "echo read timeout >&2; exit 1")
    assert slow.returncode == 1
    assert [len(x["attempts"]) for x in runner.lines()] == [1, 3]
    assert "reason" not in runner.lines()[1]  # retries exhausted: the wrapper writes no reason


def test_twenty_megabytes_of_output_pass_through_and_ten_are_logged(runner: Runner) -> None:
    program = "import sys; sys.stdout.write('x' * 20_000_000 + 'end')"
    done = runner.exec("chatty", sys.executable, "-c", program)
    assert done.returncode == 0
    assert len(done.stdout) == 20_000_003 and done.stdout.endswith(b"end")
    [line] = runner.lines()
    assert len(line["result"]["output"]) == 10 * 1024 * 1024
    assert line["result"]["truncated"] is True


def test_fifty_runs_ending_together_leave_fifty_whole_lines(runner: Runner) -> None:
    at = time.time() + 4
    program = (
        f"import sys, time; time.sleep(max(0, {at} - time.time()));"
        " sys.stdout.write(sys.argv[1] * 200_000)"
    )
    procs = [
        subprocess.Popen(
            runner.argv(f"cron {i % 5}", sys.executable, "-c", program, f"{i:02d}"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=ENV,
            cwd=ROOT,
        )
        for i in range(50)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read() if p.stderr else None
        if p.stderr:
            p.stderr.close()
    lines = runner.lines()  # every line is whole JSON
    assert len(lines) == 50
    outputs = sorted(line["result"]["output"][:2] for line in lines)
    assert outputs == [f"{i:02d}" for i in range(50)]  # each run once
    assert all(len(line["result"]["output"]) == 400_000 for line in lines)


def test_experiment_arms_are_balanced_and_recorded(runner: Runner) -> None:
    block = {"id": "7", "param": "timeout", "control": 15000, "treatment": 20000, "split": 0.5}
    runner.set_params({"crons": {"ab": {"timeout": 15000}}, "experiments": {"ab": block}})
    for _ in range(20):
        assert runner.exec("ab", "true").returncode == 0
    lines = runner.lines()
    arms = [line["experiment"] for line in lines]
    assert Counter(a["arm"] for a in arms) == {"control": 10, "treatment": 10}
    assert all(a["id"] == "7" for a in arms)
    for line in lines:
        expected = 20000 if line["experiment"]["arm"] == "treatment" else 15000
        assert line["params"]["timeout"] == expected
    # Each block of ten runs holds five of each arm, kept in tunerd's state, not beside the log.
    first = Counter(a["arm"] for a in arms[:10])
    assert first == {"control": 5, "treatment": 5}
    assert [p.name for p in runner.log.parent.iterdir()] == ["auto-retry.jsonl"]
    assert (runner.root / "state" / "exec-arms.json").exists()
    verdict = subprocess.run(
        [
            *(sys.executable, "-m", "tunerd", "verify", str(runner.log), "--cron", "ab"),
            *("--param", "timeout", "--control", "15000", "--treatment", "20000", "--json"),
        ],
        capture_output=True,
        env=ENV,
        cwd=ROOT,
        check=True,
    )
    document = json.loads(verdict.stdout)
    assert document["arms"]["control"]["runs"] == document["arms"]["treatment"]["runs"] == 10


def test_sigterm_ends_the_run_and_its_command(runner: Runner) -> None:
    pids = runner.root / "pids"
    proc = subprocess.Popen(
        runner.argv("long", "sh", "-c", f"echo $$ > {pids}; sleep 60"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 20
    while not pids.exists() or not pids.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert not alive(int(pids.read_text()))
    [line] = runner.lines()
    assert line["type"] == "failure" and len(line["attempts"]) == 1  # no retry after a signal
    assert line["reason"] == "interrupted by SIGTERM"


def test_a_missing_command_is_not_retried_and_a_bad_params_file_is_survived(
    runner: Runner,
) -> None:
    runner.params.write_text("{not json")
    done = runner.exec("typo", "no-such-command-anywhere")
    assert done.returncode == 127
    assert b"unusable" in done.stderr  # said, and the run went on with the defaults
    [line] = runner.lines()
    assert len(line["attempts"]) == 1 and line["reason"] == "Non-retryable error"
    assert line["finalError"]["type"] == "ENOENT"
    assert line["params"]["maxRetries"] == 3


def test_a_final_failure_is_reported_through_the_outbox(runner: Runner) -> None:
    """--notify: the failure reaches a webhook (a real server on 127.0.0.1), pinging nobody."""
    from .test_discord import TOKEN, FakeDiscord

    fake = FakeDiscord([])
    try:
        url = f"http://127.0.0.1:{fake.port}/api/webhooks/1/{TOKEN}"
        with runner.config.open("a") as f:
            f.write(f'[discord]\nwebhook_url = "{url}"\n')
        name = "@everyone nightly"
        done = runner.exec(name, "sh", "-c", "exit 2", options=("--notify",))
        assert done.returncode == 2
        assert TOKEN.encode() not in done.stderr
        (message,) = fake.received
        assert message["allowed_mentions"] == {"parse": []}
        text = json.dumps(message)
        assert "Final failure" in text and "nightly" in text and "Non-retryable error" in text
        ok = runner.exec("fine", "true", options=("--notify",))
        assert ok.returncode == 0 and len(fake.received) == 1  # successes are not reported
    finally:
        fake.stop()
