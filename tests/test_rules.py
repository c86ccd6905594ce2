"""The seed's rules: patterns exactly at the thresholds, decisions exactly by the safety table."""

from __future__ import annotations

import pytest

from tunerd.analysis import Analysis, analyze
from tunerd.params import Params, ParamsFile, classify_change, parse_params_file
from tunerd.reader import LogReader
from tunerd.stats import LogStats

from .conftest import ERR_429, ERR_OTHER, ERR_TIMEOUT, run_line


def analysis_of(lines: list[str], params: Params | None = None) -> Analysis:
    stats = LogStats()
    stats.add_entries(LogReader().feed(("\n".join(lines) + "\n").encode()).entries, 0)
    return analyze(stats, lambda cron, logged: params or Params().with_overrides(logged))


def runs(
    cron: str,
    clean: int,
    retried: int = 0,
    failed: int = 0,
    error: object = ERR_OTHER,
    duration: int = 1000,
) -> list[str]:
    return (
        [run_line(cron, (duration,)) for _ in range(clean)]
        + [run_line(cron, (duration, duration), error=error) for _ in range(retried)]
        + [run_line(cron, (duration,) * 3, ok=False, error=error) for _ in range(failed)]
    )


def test_high_retry_rate_is_strictly_above_ten_percent() -> None:
    at = analysis_of(runs("c", 90, retried=10))  # exactly 10 %
    assert at.patterns == []
    above = analysis_of(runs("c", 89, retried=11))
    assert [(p.type, p.value) for p in above.patterns] == [("high_retry_rate", 0.11)]
    assert above.recommendations == []  # no final failures: rule 1 needs > 1 %


def test_rule_one_adds_an_attempt_when_failures_remain() -> None:
    a = analysis_of(runs("flaky", 80, retried=15, failed=5))
    (r,) = a.recommendations
    assert (r.param, r.current, r.proposed, r.decision) == ("maxRetries", 3, 4, "auto")
    assert "20.0%" in r.reason and "5.0%" in r.reason


def test_rule_one_at_the_bound_is_forbidden() -> None:
    a = analysis_of(runs("flaky", 80, retried=15, failed=5), Params(maxRetries=5))
    (r,) = a.recommendations
    assert (r.proposed, r.decision) == (6, "forbidden")


@pytest.mark.parametrize(
    ("mean", "proposed", "decision"),
    [(12_001, 18_002, "auto"), (21_000, 31_500, "manual"), (45_000, 67_500, "forbidden")],
)
def test_rule_two_timeout(mean: int, proposed: int, decision: str) -> None:
    a = analysis_of([run_line("slow", (mean,)) for _ in range(20)])
    assert [p.type for p in a.patterns] == ["slow_response"]
    (r,) = a.recommendations
    assert (r.param, r.current, r.proposed, r.decision) == ("timeout", 15000, proposed, decision)


def test_slow_response_is_strictly_above_eighty_percent() -> None:
    assert analysis_of([run_line("ok", (12_000,)) for _ in range(5)]).patterns == []


def test_timeout_leaves_room_for_the_tail_of_successful_attempts() -> None:
    lines = [run_line("tail", (100,), total=13_000) for _ in range(90)]
    lines += [run_line("tail", (19_000,), total=19_000) for _ in range(10)]
    (r,) = analysis_of(lines).recommendations
    assert r.proposed == pytest.approx(19_000 * 1.2, rel=0.01)
    assert "p99" in r.reason


@pytest.mark.parametrize(
    ("backoff", "proposed", "decision"),
    [(1000, 2000, "auto"), (2000, 4000, "auto"), (3000, 6000, "forbidden")],
)
def test_rule_three_backoff_on_any_429(backoff: int, proposed: int, decision: str) -> None:
    a = analysis_of(runs("api", 99, retried=1, error=ERR_429), Params(backoffBase=backoff))
    assert [p.type for p in a.patterns] == ["rate_limited"]
    (r,) = a.recommendations
    assert (r.param, r.current, r.proposed, r.decision) == (
        "backoffBase",
        backoff,
        proposed,
        decision,
    )


def test_safety_table() -> None:
    assert classify_change("maxRetries", 3, 2)[0] == "manual"  # a decrease
    assert classify_change("maxRetries", 3, 5)[0] == "auto"
    assert classify_change("maxRetries", 3, 1)[0] == "forbidden"
    assert classify_change("timeout", 15000, 30000)[0] == "auto"
    assert classify_change("timeout", 15000, 30001)[0] == "manual"
    assert classify_change("timeout", 15000, 60001)[0] == "forbidden"
    assert classify_change("timeout", 5000, 8000)[0] == "manual"  # below the safe range
    assert classify_change("backoffBase", 1000, 4000)[0] == "manual"
    assert classify_change("backoffBase", 1000, 4000, rate_limited=True)[0] == "auto"
    assert classify_change("backoffBase", 1000, 400)[0] == "forbidden"


def test_level3_advisories() -> None:
    lines = runs("broken", 50, retried=11, error=ERR_OTHER)
    lines += runs("hangs", 94, retried=6, error=ERR_TIMEOUT)
    kinds = {(v.type, v.subject) for v in analysis_of(lines).advisories}
    assert kinds == {("recurring_error", "broken"), ("recurring_timeout", "hangs")}


def test_task_only_runs_are_named_in_an_advisory() -> None:
    lines = ['{"type":"success","context":{"task":"fetch TQQQ"},"attempts":[]}'] * 3
    (v,) = analysis_of(lines).advisories
    assert v.type == "missing_cron" and v.count == 3 and "fetch TQQQ" in v.message


def test_params_file_and_logged_params() -> None:
    pf = parse_params_file(
        b'{"defaults": {"timeout": 20000}, "crons": {"c": {"maxRetries": 0, "backoffBase": 2000}}}'
    )
    assert isinstance(pf, ParamsFile)
    assert pf.params_for("c") == Params(maxRetries=3, timeout=20000, backoffBase=2000)  # 0 means 3
    assert pf.params_for("other") == Params(timeout=20000)
    a = analysis_of([run_line("c", params={"maxRetries": 4, "timeout": 25000})])
    assert a.crons[0].params == Params(maxRetries=4, timeout=25000)
