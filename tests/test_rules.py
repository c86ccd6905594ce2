"""The seed's rules: patterns exactly at the thresholds, decisions exactly by the safety table."""

from __future__ import annotations

import pytest

from tunerd.analysis import Analysis, analyze
from tunerd.params import InForce, Params, ParamsFile, classify_change, parse_params_file
from tunerd.reader import LogReader
from tunerd.stats import LogStats

from .conftest import ERR_429, ERR_OTHER, ERR_TIMEOUT, run_line


def analysis_of(lines: list[str], params: Params | InForce | None = None) -> Analysis:
    stats = LogStats()
    stats.add_entries(LogReader().feed(("\n".join(lines) + "\n").encode()).entries, 0)
    if isinstance(params, Params):
        params = InForce.of(params, "test")
    return analyze(
        stats, lambda cron, logged: params or InForce.of(Params().with_overrides(logged), "logged")
    )


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
    """Near the top of the safe range one step is capped at 30 s; the tail of successful
    attempts asks for more (p99 × 1.2), which a person then approves."""
    lines = [run_line("tail", (27_000,)) for _ in range(50)]
    lines += [run_line("tail", (2000,)) for _ in range(47)]
    lines += [run_line("tail", (28_001, 27_000), error=ERR_TIMEOUT) for _ in range(3)]
    (r,) = analysis_of(lines, Params(timeout=28_000)).recommendations
    assert r.proposed == pytest.approx(27_000 * 1.2, rel=0.01) and r.decision == "manual"
    assert "p99" in r.reason


def test_a_slow_run_is_not_a_slow_attempt() -> None:
    """The timeout bounds each attempt: three quick attempts and the backoff between them make a
    long run, never a reason for a longer timeout."""
    own = {**ERR_TIMEOUT, "type": 1, "message": "Command failed: job\nread timeout"}
    lines = [run_line("retries", (250, 250, 250), total=1690, error=own) for _ in range(50)]
    a = analysis_of(lines, Params(timeout=2000))
    assert "timeout" not in {r.param for r in a.recommendations}
    # An increase from below the safe range lands at its bottom rather than being refused.
    slow = analysis_of([run_line("slow", (1900,)) for _ in range(20)], Params(timeout=2000))
    (r,) = slow.recommendations
    assert (r.proposed, r.decision) == (10_000, "auto") and "safe range" in r.reason


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
    lines += runs("hangs", 94)  # and six first attempts killed by the 15 s timeout:
    lines += [run_line("hangs", (15_000, 1000), error=ERR_TIMEOUT) for _ in range(6)]
    # At the top of the safe range a longer timeout needs a human: the timeouts are advised on.
    at_top = analysis_of(lines, Params(timeout=30000))
    kinds = {(v.type, v.subject) for v in at_top.advisories}
    assert kinds == {("recurring_error", "broken"), ("recurring_timeout", "hangs")}
    # Below it, tunerd tries one step up itself, and says nothing more.
    (r,) = analysis_of(lines).recommendations
    assert (r.cron, r.param, r.proposed, r.decision) == ("hangs", "timeout", 22500, "auto")
    assert {v.type for v in analysis_of(lines).advisories} == {"recurring_error"}


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
    numbered = parse_params_file(
        b'{"experiments": {"c": {"id": 4, "param": "timeout",'
        b' "control": 15000, "treatment": 20000}}}'
    )
    assert numbered.experiments["c"].id == 4  # a number written by a Node wrapper or a person
    a = analysis_of([run_line("c", params={"maxRetries": 4, "timeout": 25000})])
    assert a.crons[0].params == InForce(maxRetries=4, timeout=25000, source="logged")


EXIT_1 = {
    "type": 1,
    "message": "Command failed: ./job.sh\n",
    "retryable": False,
    "category": "unknown",
    "suggestedFix": "Unknown error",
}


def test_failures_the_wrapper_does_not_retry_call_for_no_more_attempts() -> None:
    """84 of 87 final failures were non-zero exits: one more attempt could rescue none of them."""
    lines = runs("flaky", 700, retried=100, failed=3)
    lines += [
        run_line("flaky", (900,), ok=False, error=EXIT_1, reason="Non-retryable error")
        for _ in range(84)
    ]
    a = analysis_of(lines)
    assert [p.type for p in a.patterns] == ["high_retry_rate"]
    assert a.recommendations == []
    (s,) = a.crons
    assert (s.failures, s.exhausted, s.non_retryable, s.non_retryable_first) == (87, 3, 84, 84)
    (v,) = [v for v in a.advisories if v.type != "recurring_error"]  # the retried ECONNRESETs
    assert v.type == "non_retryable" and v.count == 84
    assert "84 of 87 final failures" in v.message
    assert "exit 1: Command failed: ./job.sh" in v.message


def test_a_timeout_that_cuts_attempts_off_is_raised_one_step() -> None:
    """Successful attempts all fit under the timeout by construction: their p99 can never call
    for more room, however many attempts are killed."""
    killed = {**ERR_TIMEOUT, "message": "Command failed: ./slow.sh\n"}
    lines = runs("slow", 60, duration=3000)
    lines += [run_line("slow", (10_004, 3000), error=killed) for _ in range(25)]
    lines += [run_line("slow", (10_004,) * 3, ok=False, error=killed) for _ in range(5)]
    a = analysis_of(lines, Params(timeout=10000))
    (r,) = [r for r in a.recommendations if r.param == "timeout"]
    assert (r.current, r.proposed, r.decision) == (10000, 15000, "auto")
    assert "cannot be seen" in r.reason and "guardrail" in r.reason
    # Had the timeout been 11 s, these attempts would not have been killed by it.
    assert "timeout" not in {
        r.param for r in analysis_of(lines, Params(timeout=11500)).recommendations
    }


def test_only_rate_limits_the_wrapper_retries_call_for_a_longer_backoff() -> None:
    exit_429 = {**EXIT_1, "message": "Command failed: ./api.sh\nHTTP 429 Too Many Requests\n"}
    lines = runs("api", 90, retried=0)
    lines += [
        run_line("api", (100,), ok=False, error=exit_429, reason="Non-retryable error")
        for _ in range(10)
    ]
    a = analysis_of(lines)
    assert [p.type for p in a.patterns] == ["rate_limited"]
    assert a.recommendations == []
    assert {v.type for v in a.advisories} == {"non_retryable", "rate_limit_not_retried"}


def test_a_change_the_script_cannot_take_is_an_advisory_not_a_hold() -> None:
    script = InForce(
        source="script x.js",
        fixed=(("backoffBase", "x.js: add `BACKOFF_BASE: 1000,` ..."),),
    )
    a = analysis_of(runs("api", 80, retried=15, failed=5, error=ERR_429), script)
    assert {r.param for r in a.recommendations} == {"backoffBase", "maxRetries"}
    (v,) = [v for v in a.advisories if v.type == "cannot_apply"]
    assert "backoffBase 1,000 → 2,000" in v.message and "BACKOFF_BASE" in v.message


def test_an_unknown_value_is_never_proposed_from() -> None:
    lines = runs("slow", 60, retried=25, failed=5, error=ERR_TIMEOUT, duration=6000)
    unknown = InForce(timeout=None, source="script x.js")
    a = analysis_of(lines, unknown)
    assert [p.type for p in a.patterns] == ["high_retry_rate", "slow_response"]
    assert "a timeout tunerd cannot see" in a.patterns[1].detail
    assert [r.param for r in a.recommendations] == ["maxRetries"]


def test_a_timeout_of_the_job_s_own_is_not_the_wrapper_s() -> None:
    """ "read timeout" after 100 ms is a timeout inside the job: raising the exec() timeout from
    10 s cannot help, and the advisory says so."""
    own = {**ERR_TIMEOUT, "type": 1, "message": "Command failed: ./api.sh\nread timeout"}
    lines = runs("api", 60, retried=25, error=own, duration=100)
    a = analysis_of(lines, Params(timeout=10000))
    assert [p.type for p in a.patterns] == ["high_retry_rate"]
    assert [r.param for r in a.recommendations] == []
    (v,) = [v for v in a.advisories if v.type == "recurring_timeout"]
    assert "25 of them ended well before the 10,000 ms timeout" in v.message


def test_an_assumed_timeout_judges_no_attempt() -> None:
    """Nothing says the cron runs with 15 s (no script, no params recorded): its timed-out
    attempts are not called its own timeouts for ending before it."""
    killed = [run_line("c", (2000, 500), error=ERR_TIMEOUT) for _ in range(10)]
    a = analysis_of(killed + runs("c", 40, duration=500), InForce(assumed=True))
    assert a.crons[0].killed is None
    assert not any("well before" in v.message for v in a.advisories)
    assert [r.param for r in a.recommendations] == ["timeout"]  # every timeout counts then
