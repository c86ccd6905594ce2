"""The verdict and the harm check on arms whose truth is known."""

from __future__ import annotations

import random

import pytest

from tunerd.verdict import Arm, Independent, VerdictSettings, harm_check, judge

SETTINGS = VerdictSettings()


def arm(runs: int, failures: int, median: float = 1500, seed: int = 1, **counts: int) -> Arm:
    rnd = random.Random(seed)
    a = Arm(runs=runs, failures=failures, retried=failures, **counts)
    for _ in range(runs):
        d = median * rnd.lognormvariate(0, 0.3)
        a.durations.append(d)
        a.firsts.append(d)
        a.duration_total += d
    return a


def ab(control: Arm, treatment: Arm) -> Independent:
    return Independent(control, treatment)


def test_a_clear_improvement_commits_with_its_evidence() -> None:
    v = judge("maxRetries", ab(arm(150, 18), arm(150, 3, seed=2)), 1, SETTINGS)
    assert v.decision == "commit"
    primary = v.tests[0]
    assert (primary.metric, primary.role, primary.test) == (
        "reachable_failure_rate",
        "primary",
        "Boschloo exact",
    )
    assert primary.p_value is not None and primary.p_value < SETTINGS.alpha_at(1)
    assert primary.effect == pytest.approx(-0.1)
    assert primary.ci is not None and primary.ci[0] < -0.1 < primary.ci[1] < 0
    assert "12.0% control vs 2.0% treatment" in v.reason
    doc = v.as_json()
    assert set(doc["arms"]["control"]) >= {
        "runs",
        "final_failure_rate",
        "retry_rate",
        "duration_ms_mean",
    }
    assert {"metric", "test", "p_value", "effect"} <= set(doc["tests"][0])


def test_no_difference_extends_then_rolls_back_at_the_last_look() -> None:
    same = (arm(150, 10), arm(150, 10, seed=2))
    assert judge("maxRetries", ab(*same), 1, SETTINGS).decision == "extend"
    last = judge("maxRetries", ab(*same), 1 + SETTINGS.max_extensions, SETTINGS)
    assert last.decision == "rollback" and "never arrived" in last.reason


def test_four_runs_always_extend() -> None:
    for look in range(1, SETTINGS.max_extensions + 1):
        v = judge("maxRetries", ab(arm(4, 2), arm(4, 0, seed=2)), look, SETTINGS)
        assert v.decision == "extend" and "too few runs" in v.reason and v.tests == []
    final = judge("maxRetries", ab(arm(4, 2), arm(4, 0)), 1 + SETTINGS.max_extensions, SETTINGS)
    assert final.decision == "rollback" and "evidence never arrived" in final.reason


def test_guardrails_roll_back() -> None:
    slower = judge("maxRetries", ab(arm(200, 20), arm(200, 2, median=2025, seed=2)), 1, SETTINGS)
    assert slower.decision == "rollback" and "slower" in slower.reason
    more_failures = judge("backoffBase", ab(arm(200, 10), arm(200, 30, seed=2)), 1, SETTINGS)
    assert more_failures.decision == "rollback" and "final failures up" in more_failures.reason


def test_primary_metric_follows_the_parameter() -> None:
    timeout = judge(
        "timeout", ab(arm(150, 5, timed_out=30), arm(150, 5, seed=2, timed_out=3)), 1, SETTINGS
    )
    assert timeout.decision == "commit" and timeout.tests[0].metric == "timeout_rate"
    backoff = judge(
        "backoffBase", ab(arm(150, 5, rate_limited_retry=25), arm(150, 5, seed=2)), 1, SETTINGS
    )
    assert backoff.decision == "commit" and backoff.tests[0].metric == "rate_limited_retry_rate"


def test_an_empty_arm_is_an_error_of_the_experiment_not_evidence() -> None:
    v = judge("maxRetries", ab(arm(150, 18), Arm()), 1, SETTINGS)
    assert v.decision == "extend" and "no runs" in v.reason and "not evidence" in v.reason


def test_a_significant_but_tiny_improvement_is_not_enough() -> None:
    v = judge("maxRetries", ab(arm(20000, 2000), arm(20000, 1800, seed=2)), 1, SETTINGS)
    assert v.tests[0].test == "Fisher exact" and v.tests[0].passed
    assert v.decision == "extend" and "only 10% fewer" in v.reason


def test_alpha_is_spent_over_the_looks() -> None:
    total = sum(SETTINGS.alpha_at(k) for k in range(1, SETTINGS.max_extensions + 2))
    assert total == pytest.approx(SETTINGS.alpha)
    assert SETTINGS.alpha_at(SETTINGS.max_extensions + 2) == 0


def test_harm_check_stops_only_clear_harm() -> None:
    assert not harm_check(ab(arm(100, 5), arm(100, 6, seed=2)), SETTINGS, "maxRetries").stop
    assert not harm_check(
        ab(arm(5, 0), arm(5, 5)), SETTINGS, "maxRetries"
    ).stop  # too few runs to say
    harm = harm_check(ab(arm(100, 2), arm(100, 40, seed=2)), SETTINGS, "maxRetries")
    assert harm.stop and "final failures up" in harm.reason


def test_power_before_starting() -> None:
    from tunerd.verdict import plan

    busy = plan(0.5, runs_per_hour=12, verify_after=86400, split=0.5, settings=SETTINGS)
    assert busy.period == 86400 and busy.runs_per_arm == 144 and busy.note == ""
    assert busy.detectable is not None and 0.1 < busy.detectable < 0.25
    rare = plan(0.12, runs_per_hour=1 / 24, verify_after=86400, split=0.5, settings=SETTINGS)
    assert rare.period == 14 * 86400 and "may never be verified" in rare.note
    hourly = plan(0.0, runs_per_hour=1, verify_after=86400, split=0.5, settings=SETTINGS)
    assert hourly.period == 80 * 3600 and "instead of 24 h" in hourly.note
    # 12 % of failures at 12 runs an hour: a halving needs about 560 runs per arm, 4 days.
    flaky = plan(0.12, runs_per_hour=12, verify_after=86400, split=0.5, settings=SETTINGS)
    assert 540 <= flaky.runs_per_arm <= 580 and 90 * 3600 <= flaky.period <= 97 * 3600
    assert "halved with 80 % power" in flaky.note
    assert flaky.detectable is not None and flaky.detectable <= 0.06 + 1e-9


def test_an_empty_arm_is_explained_by_what_can_empty_it() -> None:
    empty, some = Arm(), arm(30, 3)
    split = judge("maxRetries", ab(some, empty), 1, SETTINGS).reason
    assert split.startswith("error of the experiment") and "params file" in split
    gone = judge("maxRetries", ab(some, empty), 1, SETTINGS, "sequential").reason
    assert "since the switch" in gone and "params file" not in gone
    flips = judge("maxRetries", ab(some, empty), 1, SETTINGS, "switchback").reason
    assert "treatment hours" in flips
    neither = judge("maxRetries", ab(Arm(), Arm()), 1, SETTINGS, "switchback").reason
    assert "neither arm" in neither and "stopped running" in neither


def test_a_timeout_raised_onto_hung_calls_is_caught_by_mean_and_p95() -> None:
    """Nine runs in ten as before, one in ten now hangs until a longer timeout: the geometric
    mean hardly moves (it let such changes through 26 times in 40), the mean and p95 run do."""
    control = arm(300, 10)
    treatment = arm(300, 10, seed=2)
    for i in range(0, 300, 10):
        treatment.durations[i] = 25_000.0
    treatment.duration_total = sum(treatment.durations)
    v = judge("timeout", ab(control, treatment), 1, SETTINGS)
    assert v.decision == "rollback"
    broken = {t.metric for t in v.tests if t.role == "guardrail" and t.passed}
    assert broken == {"mean run", "p95 run"}
    assert "the p95 run" in v.reason and "slower" in v.reason


def test_a_retry_change_is_not_blamed_for_the_slow_runs_it_rescues() -> None:
    """One more attempt turns slow failures into slow successes: later attempts and whole runs
    get slower by design; first attempts are what the service does, and they did not change."""
    control, treatment = arm(300, 30), arm(300, 10, seed=2)
    treatment.durations = [d * 1.6 for d in treatment.durations]  # rescued runs take longer
    v = judge("maxRetries", ab(control, treatment), 1, SETTINGS)
    assert v.decision == "commit"
    (first,) = [t for t in v.tests if t.metric == "first attempt"]
    assert not first.passed


def test_switchback_hours_are_judged_by_randomization_whatever_the_weekend() -> None:
    """A useless change through a weekend twice as bad: the design gives each day half its
    hours in each arm, and the randomization test over hour blocks finds nothing."""
    import json

    import msgspec

    from tunerd.level1 import log_line
    from tunerd.params import Params
    from tunerd.records import Entry
    from tunerd.switchback import Clustered, arm_at, flips, gather

    seed, start = "t", 1767600000.0  # 2026-01-05 08:00 UTC, a Monday
    timeline = [
        (at, 4 if a == "treatment" else 3) for at, a in flips(seed, start, start + 7 * 86400)
    ]
    runs = []
    rng = random.Random(3)
    for i in range(7 * 24 * 12):
        at = start + 300 * i + 30
        weekend = 5 <= (i // (24 * 12)) <= 6
        ok = rng.random() > (0.16 if weekend else 0.08)
        attempts = [{"attempt": 1, "success": ok, "duration": 800}]
        if not ok:
            attempts[0]["error"] = {"type": "ECONNRESET", "message": "reset", "retryable": True}
        line = log_line("c", {}, attempts, 800, at + 0.8, Params(), None)
        runs.append((at, msgspec.json.decode(json.dumps(line).encode(), type=Entry)))
    units = gather(runs, timeline, 3, 4, seed)
    design = Clustered(units)
    assert sum(units.left_out.values()) < len(runs) * 0.05  # carry-over, the first hour
    treated = sum(arm_at(seed, at) == "treatment" for at, _ in runs) / len(runs)
    assert 0.45 < treated < 0.55
    v = judge("maxRetries", design, 1, SETTINGS, "switchback")
    assert v.decision != "commit" and v.tests[0].test == "randomization test over hour blocks"
    assert v.tests[0].p_value is not None and v.tests[0].p_value > 0.05
