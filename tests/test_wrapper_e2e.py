"""tunerd against the user's world: real `node` processes running a stand-in of the auto-retry
wrapper (written from its facts: compact lines, non-retryable exits, an exec timeout reported as
ETIMEDOUT) and real-style scripts (`MAX_RETRIES: 3,` in CONFIG, `timeout: 10000,` in the exec
options, no backoff line). The log they write is read exactly, and what tunerd makes of it is
what the wrapper's semantics call for."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tunerd.fit import fit_scenario
from tunerd.logfile import ReadOptions, read_log
from tunerd.params import Params
from tunerd.scenario import simulate_run
from tunerd.targets import InForceReader

from .conftest import ROOT
from .test_engine_cli import as_json
from .test_exec import ENV

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")
LEVEL1 = ROOT / "tests" / "level1"
SCRIPTS = {
    "flaky API": ("flaky-api-with-retry.js", 100),
    "slow job": ("slow-job-with-retry.js", 60),
    "quote API": ("rate-limited-api-with-retry.js", 40),
}


class QuoteApi:
    """An HTTP API on 127.0.0.1 that throttles: a third of the runs get one 429 first, one in
    ten gets nothing but 429s."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                run = int(self.path.rsplit("=", 1)[1])
                api.hits[str(run)] += 1
                limited = run % 10 == 1 or (run % 3 == 0 and api.hits[str(run)] == 1)
                body = b"" if limited else b'{"price": 49.76}'
                self.send_response(429 if limited else 200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The three scripts run through the stand-in wrapper, 200 runs, as their crons would."""
    home = tmp_path_factory.mktemp("home")
    openclaw = home / "openclaw"
    shutil.copytree(LEVEL1, openclaw)
    (home / "job-state").mkdir()
    api = QuoteApi()
    env = dict(ENV, HOME=str(home), JOB_STATE=str(home / "job-state"), QUOTE_API=api.url)
    runs = [(script, n) for script, count in SCRIPTS.values() for n in range(count)]
    random.Random(4).shuffle(runs)  # the crons' runs interleave in the log, as in life

    def run(item: tuple[str, int]) -> int:
        script, n = item
        argv = [str(NODE), str(openclaw / "scripts" / script), str(n)]
        return subprocess.run(argv, env=env, capture_output=True, timeout=120).returncode

    try:
        with ThreadPoolExecutor(16) as pool:
            exits = list(pool.map(run, runs))
    finally:
        api.stop()
    log = openclaw / "logs" / "auto-retry.jsonl"
    config = home / "tunerd.toml"
    scripts = "".join(
        f'[[scripts]]\ncron = "{cron}"\npath = "{openclaw / "scripts" / name}"\n'
        for cron, (name, _) in SCRIPTS.items()
    )
    config.write_text(
        f'log_path = "{log}"\nstate_dir = "{home / "state"}"\n'
        f'params_file = "{home / "params.json"}"\nmin_runs = 20\n{scripts}'
    )
    yield {"home": home, "log": log, "config": config, "exits": exits, "env": env}


def tunerd_json(world: dict[str, Any], *args: str) -> Any:
    return as_json({"root": world["home"], "config": world["config"]}, *args)


def independent_count(log: Path) -> dict[str, dict[str, int]]:
    """What the wrapper's lines say, counted here without tunerd."""
    counts: dict[str, Counter[str]] = {}
    for raw in log.read_bytes().splitlines():
        line = json.loads(raw)
        c = counts.setdefault(line["context"]["cron"], Counter())
        c["runs"] += 1
        c["attempts"] += len(line["attempts"])
        c["retried"] += len(line["attempts"]) > 1
        failed = [a for a in line["attempts"] if not a["success"]]
        c["timeout"] += sum(a["error"]["type"] == "ETIMEDOUT" for a in failed)
        c["rate_limit"] += sum(a["error"].get("statusCode") == 429 for a in failed)
        if line["type"] == "success":
            continue
        c["failures"] += 1
        if line.get("reason") == "Non-retryable error" or not line["finalError"]["retryable"]:
            c["non_retryable"] += 1
        else:
            c["exhausted"] += 1
    return {cron: dict(c) for cron, c in counts.items()}


def test_the_wrapper_s_log_is_read_exactly(world: dict[str, Any]) -> None:
    raw = world["log"].read_bytes()
    assert raw.count(b"\n") == 200 and b'"type":"failure"' in raw  # compact JSON.stringify
    expected = independent_count(world["log"])
    assert expected["flaky API"]["non_retryable"] == 20 and expected["flaky API"]["exhausted"] == 1
    assert expected["slow job"]["timeout"] == 11  # the runs hanging at their first attempt
    doc = tunerd_json(world, "analyze")
    assert doc["totals"]["malformed"] == 0 and doc["totals"]["cron_entries"] == 200
    for cron in doc["crons"]:
        want = expected[cron["cron"]]
        assert cron["runs"] == want["runs"]
        assert cron["failures"] == want.get("failures", 0)
        assert cron["retried"] == want.get("retried", 0)
        assert cron["final_failures"]["non_retryable"] == want.get("non_retryable", 0)
        assert cron["final_failures"]["exhausted"] == want.get("exhausted", 0)
        assert round(cron["attempts_per_run"] * cron["runs"]) == want["attempts"]
        assert cron["errors"]["rate_limit"] == want.get("rate_limit", 0)
    # The values in the scripts, not the defaults: 10 s, and the wrapper's own backoff.
    params = {c["cron"]: c for c in doc["crons"]}
    slow = params["slow job"]
    assert slow["params"]["timeout"] == 10000 and slow["params_source"].startswith("script ")
    assert "backoffBase" in params["quote API"]["params_unwritable"]


def test_analyze_proposes_what_the_wrapper_s_semantics_call_for(world: dict[str, Any]) -> None:
    doc = tunerd_json(world, "analyze")
    proposals = {(r["cron"], r["param"]): r for r in doc["recommendations"]}
    # 20 of 21 final failures of the flaky API were exits the wrapper does not retry: one more
    # attempt cannot rescue them (1 % exhausted), whatever the overall 21 % says.
    assert not any(cron == "flaky API" for cron, _ in proposals)
    advice = {(a["type"], a["subject"]): a["message"] for a in doc["advisories"]}
    assert "20 of 21 final failures" in advice[("non_retryable", "flaky API")]
    # The slow job's hung attempts were killed at 10 s: successful attempts cannot show how much
    # room they need, so the timeout goes one step up.
    timeout = proposals[("slow job", "timeout")]
    assert (timeout["current"], timeout["proposed"], timeout["decision"]) == (10000, 15000, "auto")
    # The quote API's 429s are retried by the wrapper: a longer backoff is the answer, but its
    # script has no backoff line: said, with what to add.
    assert proposals[("quote API", "backoffBase")]["proposed"] == 2000
    assert "BACKOFF_BASE" in advice[("cannot_apply", "quote API")]


def test_a_cycle_edits_the_scripts_and_they_still_run(world: dict[str, Any]) -> None:
    scripts = world["home"] / "openclaw" / "scripts"
    report = tunerd_json(world, "cycle")
    results = {(a["cron"], a["param"]): a["result"] for a in report["actions"]}
    # The backoff change cannot be written: it holds nothing, the next candidate starts.
    assert results == {("slow job", "timeout"): "started", ("quote API", "maxRetries"): "started"}
    # Switchback experiments: each script starts on the value of the hour block it began in.
    history = tunerd_json(world, "history")["changes"]
    first = {c["cron"]: c["to"] for c in history if c["action"] == "experiment_start"}
    assert first["slow job"] in (10000, 15000) and first["quote API"] in (3, 4)
    slow = (scripts / "slow-job-with-retry.js").read_text()
    quote = (scripts / "rate-limited-api-with-retry.js").read_text()
    assert f"timeout: {first['slow job']},  // 10초 타임아웃" in slow and "MAX_RETRIES: 3," in slow
    assert f"MAX_RETRIES: {first['quote API']}," in quote and "timeout: 10000" in quote
    for script in scripts.iterdir():
        assert subprocess.run([str(NODE), "--check", str(script)]).returncode == 0
    status = tunerd_json(world, "status")
    in_force = {c["cron"]: c["params"] for c in status["crons"]}
    assert in_force["slow job"]["timeout"] == first["slow job"]
    assert in_force["quote API"]["maxRetries"] == first["quote API"]
    assert {e["cron"]: e["mode"] for e in status["experiments"]} == {
        "slow job": "switchback",
        "quote API": "switchback",
    }
    undo = {e["cron"]: e["change"] for e in status["experiments"]}
    # The edited script runs with the value it holds: a hung first attempt is killed then.
    done = subprocess.run(
        [str(NODE), str(scripts / "slow-job-with-retry.js"), "61"],
        env=world["env"],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0
    last = json.loads(world["log"].read_bytes().splitlines()[-1])
    assert last["context"]["cron"] == "slow job"
    assert first["slow job"] <= last["attempts"][0]["duration"] < first["slow job"] + 1000
    # analyze, as the cycle, counts a cron's runs from its change on: the attempts killed at
    # 10 s are not judged against today's 15 s.
    after = tunerd_json(world, "analyze")
    assert set(after["counted_from"]) == {"slow job", "quote API"}
    assert not any(a["subject"] == "slow job" for a in after["advisories"])
    # What status shows is what rollback takes.
    back = tunerd_json(world, "rollback", str(undo["slow job"]))
    assert (
        back["value"] == 10000
        and "timeout: 10000," in (scripts / "slow-job-with-retry.js").read_text()
    )


def test_two_crons_on_one_script_are_refused(world: dict[str, Any]) -> None:
    """The user's own WRAPPER_MAP maps two crons to one file: one file, one experiment."""
    shared = world["home"] / "shared.toml"
    script = world["home"] / "openclaw" / "scripts" / "flaky-api-with-retry.js"
    shared.write_text(
        f'log_path = "{world["log"]}"\nstate_dir = "{world["home"] / "state2"}"\n'
        f'[[scripts]]\ncron = "TQQQ 15분 모니터링"\npath = "{script}"\n'
        f'[[scripts]]\ncron = "시장 급변 감지"\npath = "{script}"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "tunerd", "cycle", "--config", str(shared)],
        capture_output=True,
        text=True,
        env=dict(ENV, HOME=str(world["home"])),
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 2
    assert str(script) in done.stderr and "'TQQQ 15분 모니터링', '시장 급변 감지'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (world["home"] / "state2").exists()


def test_the_fitted_scenario_keeps_the_failures_retries_cannot_rescue(
    world: dict[str, Any],
) -> None:
    """Fitted as transient failures, the flaky API's exits would be retried away in the
    simulation (21 % would become well under 1 %)."""
    stats = read_log(world["log"], ReadOptions(read_at=0))
    from tunerd.config import load

    scenario, _ = fit_scenario(stats, InForceReader(load(str(world["config"])).targets()), 1, "t")
    specs = {c.name: c for c in scenario.cron}
    # Scripts cannot split traffic, and the quote API's has no backoff line: simulated so.
    assert scenario.ab is False and specs["quote API"].unwritable == ["backoffBase"]
    from tunerd.simulate import script_text

    quote = specs["quote API"]
    script = script_text("q", quote)
    assert f"MAX_RETRIES: {quote.params.maxRetries}," in script and "BASE_DELAY" not in script
    flaky = specs["flaky API"]
    assert flaky.fatal_p == pytest.approx(0.2, abs=0.02)
    assert specs["slow job"].params.timeout == 10000
    rng = random.Random(1)
    params = Params(timeout=flaky.params.timeout)
    simulated = [simulate_run(flaky, params, rng) for _ in range(4000)]
    failed = sum(not run.attempts[-1]["success"] for run in simulated) / len(simulated)
    assert failed == pytest.approx(21 / 100, abs=0.03)


def test_tunerd_exec_writes_the_wrapper_s_lines(world: dict[str, Any]) -> None:
    """The same job through the stand-in wrapper and through `tunerd exec`: the same shape, key
    by key, the same retry decisions, and bytes that `JSON.stringify` would write."""
    job = world["home"] / "openclaw" / "jobs" / "job.js"
    script = world["home"] / "openclaw" / "scripts" / "flaky-api-with-retry.js"
    exec_log = world["home"] / "exec.jsonl"
    pairs = {"non-retryable exit": (100, 105), "timeout in the message": (101, 108)}
    for wrapper_run, exec_run in pairs.values():
        subprocess.run([str(NODE), str(script), str(wrapper_run)], env=world["env"], timeout=60)
        subprocess.run(
            [
                *(sys.executable, "-m", "tunerd", "exec", "--cron", "flaky API"),
                *("--log", str(exec_log), "--params", str(world["home"] / "none.json")),
                *("--", str(NODE), str(job), "flaky", str(exec_run)),
            ],
            env=world["env"],
            cwd=ROOT,
            capture_output=True,
            timeout=60,
        )
    wrapper = [json.loads(x) for x in world["log"].read_bytes().splitlines()[-2:]]
    ours = [json.loads(x) for x in exec_log.read_bytes().splitlines()]
    for theirs, mine in zip(wrapper, ours, strict=True):
        assert list(mine)[: len(theirs)] == list(theirs)  # then tunerd's "params"
        assert mine["type"] == theirs["type"] and mine.get("reason") == theirs.get("reason")
        assert len(mine["attempts"]) == len(theirs["attempts"])
        for a, b in zip(mine["attempts"], theirs["attempts"], strict=True):
            assert list(a) == list(b) and a["success"] == b["success"]
            if "error" in a:
                assert list(a["error"]) == list(b["error"])
                for key in ("type", "retryable", "category"):
                    assert a["error"][key] == b["error"][key]
    stringify = "process.stdout.write(JSON.stringify(JSON.parse(require('fs').readFileSync(0))))"
    for raw in exec_log.read_bytes().splitlines():
        again = subprocess.run([str(NODE), "-e", stringify], input=raw, capture_output=True)
        assert again.stdout == raw
