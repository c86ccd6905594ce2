"""`tunerd analyze` as a user runs it: a real subprocess, real files, real exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ERR_429, REAL_SAMPLE, ROOT, run_line

ENV = {k: v for k, v in os.environ.items() if not k.startswith("TUNERD_")}


def tunerd(
    *args: str, env: dict[str, str] | None = None, home: Path | None = None
) -> subprocess.CompletedProcess[str]:
    environment = dict(ENV, **(env or {}))
    if home is not None:
        environment["HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "tunerd", *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
        timeout=120,
    )


def test_analyze_json_contract(tmp_path: Path) -> None:
    done = tunerd("analyze", str(REAL_SAMPLE), "--json", home=tmp_path)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["totals"] == doc["totals"] | {
        "entries": 63,
        "cron_entries": 54,
        "test_entries": 3,
        "malformed": 0,
    }
    tqqq = next(c for c in doc["crons"] if c["cron"] == "TQQQ 15분 모니터링")
    assert {
        "cron",
        "runs",
        "successes",
        "failures",
        "retried",
        "retry_rate",
        "final_failure_rate",
        "duration_ms",
        "errors",
    } <= tqqq.keys()
    assert tqqq["runs"] == 51 and tqqq["failures"] == 0
    assert set(tqqq["duration_ms"]) >= {"mean", "p50", "p95", "p99", "max"}
    assert tqqq["duration_ms"]["max"] == 4842
    assert set(tqqq["errors"]) == {"rate_limit", "timeout", "other"}
    assert doc["patterns"] == [] and doc["recommendations"] == []
    assert [a["type"] for a in doc["advisories"]] == ["missing_cron"]


def test_recommendations_in_json(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    lines = [run_line("api", (300, 300), error=ERR_429) for _ in range(20)]
    lines += [run_line("api", (300,)) for _ in range(80)]
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    doc = json.loads(tunerd("analyze", str(log), "--json", home=tmp_path).stdout)
    assert {(p["type"], p["cron"]) for p in doc["patterns"]} == {
        ("high_retry_rate", "api"),
        ("rate_limited", "api"),
    }
    (rec,) = doc["recommendations"]
    assert rec | {"reason": ""} == {
        "cron": "api",
        "param": "backoffBase",
        "current": 1000,
        "proposed": 2000,
        "reason": "",
        "decision": "auto",
        "decision_reason": rec["decision_reason"],
    }
    assert "429" in rec["reason"]


def test_params_file_sets_the_current_values(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(run_line("slow", (13_000,)) for _ in range(10)) + "\n")
    params = tmp_path / "params.json"
    params.write_text('{"defaults": {}, "crons": {"slow": {"timeout": 20000}}, "experiments": {}}')
    doc = json.loads(
        tunerd("analyze", str(log), "--params", str(params), "--json", home=tmp_path).stdout
    )
    assert doc["patterns"] == [] and doc["crons"][0]["params"]["timeout"] == 20000
    params.write_text('{"crons": []}')
    bad = tunerd("analyze", str(log), "--params", str(params), home=tmp_path)
    assert bad.returncode == 1 and "params file" in bad.stderr and "not valid" in bad.stderr


def test_since_narrows_the_window(tmp_path: Path) -> None:
    doc = json.loads(
        tunerd(
            "analyze", str(REAL_SAMPLE), "--since", "2026-02-05T07:00:00Z", "--json", home=tmp_path
        ).stdout
    )
    assert doc["totals"]["before_since"] > 0
    assert all(c["first_run"] >= "2026-02-05T07:00" for c in doc["crons"])


def test_text_report_escapes_hostile_names(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    names = ["\x1b[31m@everyone\x1b[0m", "../../etc/passwd", "right\u202eleft"]
    log.write_text("\n".join(run_line(n) for n in names) + "\n{bad line\n", encoding="utf-8")
    done = tunerd("analyze", str(log), home=tmp_path)
    assert done.returncode == 0
    assert "\x1b" not in done.stdout and "\u202e" not in done.stdout
    assert "\\x1b[31m@everyone" in done.stdout and "../../etc/passwd" in done.stdout
    assert "1 malformed line skipped" in done.stderr and "at byte" in done.stderr
    assert not (tmp_path / "etc").exists()


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["analyze", "/nonexistent/log.jsonl"], 1, "cannot read the log"),
        (["analyze", str(REAL_SAMPLE), "--since", "last tuesday"], 2, "--since"),
        (["analyze", str(REAL_SAMPLE), "--params", "/nonexistent.json"], 2, "does not exist"),
        (["analyze", str(REAL_SAMPLE), "--config", "/nonexistent.toml"], 2, "does not exist"),
        (["analyze", str(REAL_SAMPLE), "--jobs", "0"], 2, "--jobs"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_bad_arguments_fail_clearly(
    tmp_path: Path, args: list[str], status: int, message: str
) -> None:
    done = tunerd(*args, home=tmp_path)
    assert done.returncode == status
    assert message in done.stderr
    assert done.stdout == ""


def test_log_path_from_environment_and_config(tmp_path: Path) -> None:
    done = tunerd("analyze", "--json", env={"TUNERD_LOG_PATH": str(REAL_SAMPLE)}, home=tmp_path)
    assert done.returncode == 0 and json.loads(done.stdout)["totals"]["entries"] == 63
    config = tmp_path / "tunerd.toml"
    config.write_text(f'log_path = "{REAL_SAMPLE}"\nverify_after = "5s"\n')
    done = tunerd("analyze", "--json", "--config", str(config), home=tmp_path)
    assert done.returncode == 0 and json.loads(done.stdout)["log"] == str(REAL_SAMPLE)
    config.write_text('verify_after = "soon"\n')
    bad = tunerd("analyze", str(REAL_SAMPLE), "--config", str(config), home=tmp_path)
    assert bad.returncode == 2 and "verify_after" in bad.stderr
    missing_default = tunerd("analyze", home=tmp_path)
    assert missing_default.returncode == 1 and "log_path" in missing_default.stderr


def test_help_and_small_analyze_stay_light(tmp_path: Path) -> None:
    probe = (
        "import sys, runpy\n"
        "sys.argv = ['tunerd'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('tunerd', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "heavy = {'scipy', 'numpy', 'pydantic', 'pydantic_settings', 'httpx', 'apscheduler',"
        " 'watchfiles', 'structlog'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}), file=sys.stderr)\n"
    )
    for args in (["--help"], ["analyze", str(REAL_SAMPLE)]):
        done = subprocess.run(
            [sys.executable, "-c", probe, *args],
            capture_output=True,
            text=True,
            env=dict(ENV, HOME=str(tmp_path)),
            cwd=ROOT,
            timeout=60,
        )
        assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr


def test_configuration_keys_env_and_secrets(tmp_path: Path) -> None:
    from tunerd.config import load

    config = tmp_path / "tunerd.toml"
    config.write_text(
        'log_path = "~/x.jsonl"\nverify_after = "5s"\nfuture_key = 1\n'
        '[discord]\nwebhook_url = "https://discord.com/api/webhooks/1/FILESECRET"\n'
    )
    os.environ["TUNERD_DISCORD__WEBHOOK_URL"] = "https://discord.com/api/webhooks/2/ENVSECRET"
    os.environ["TUNERD_STATE_DIR"] = str(tmp_path / "state")
    try:
        settings = load(str(config))
    finally:
        del os.environ["TUNERD_DISCORD__WEBHOOK_URL"], os.environ["TUNERD_STATE_DIR"]
    assert settings.verify_after.total_seconds() == 5
    assert settings.log_path == Path("~/x.jsonl").expanduser()
    assert settings.state_dir == tmp_path / "state"
    assert settings.discord.webhook_url is not None
    assert settings.discord.webhook_url.get_secret_value().endswith("ENVSECRET")
    assert "SECRET" not in repr(settings) and "SECRET" not in str(settings.model_dump())
    done = tunerd("analyze", str(REAL_SAMPLE), "--config", str(config), home=tmp_path)
    assert done.returncode == 0
    assert "unknown key 'future_key'" in done.stderr and "SECRET" not in done.stderr + done.stdout
