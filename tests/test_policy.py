"""The policy and the engine's last guard: no automatic change ever leaves the safe range."""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunerd.analysis import Analysis, CronSummary
from tunerd.cycle import _execute, state_view
from tunerd.engine import Engine, EngineError
from tunerd.notify import LogNotifier
from tunerd.params import SPECS, TUNABLE, InForce, classify_change
from tunerd.policy import PolicySettings, SafetyError, StateView, decide
from tunerd.rules import Recommendation
from tunerd.stats import Totals
from tunerd.store import Store
from tunerd.targets import ParamsFileTarget, Targets


def summary(cron: str, runs: int = 100) -> CronSummary:
    return CronSummary(
        cron=cron,
        params=InForce(),
        runs=runs,
        successes=runs,
        retried=0,
        attempts=runs,
        exhausted=0,
        non_retryable=0,
        non_retryable_first=0,
        duration=None,
        first_attempt=None,
        success_attempt=None,
        rate_limit=0,
        rate_limit_retried=0,
        timeout=0,
        killed=None,
        other=0,
        rate_limited_retries=0,
        signatures=[],
        first_at=None,
        last_at=None,
    )


def rec(
    cron: str, param: str, current: int, proposed: int, decision: str | None = None
) -> Recommendation:
    klass, why = classify_change(param, current, proposed)
    return Recommendation(
        cron,
        param,
        current,
        proposed,
        "because",
        decision or klass,
        why,  # type: ignore[arg-type]
        "high_retry_rate",
    )


def analysis(recs: list[Recommendation], runs: int = 100) -> Analysis:
    return Analysis(
        Totals(), [summary(c, runs) for c in {r.cron for r in recs}], recommendations=recs
    )


def test_one_experiment_per_cron_and_the_right_kinds() -> None:
    recs = [
        rec("a", "maxRetries", 3, 4),
        rec("a", "timeout", 15000, 20000),
        rec("b", "timeout", 15000, 8000),  # a decrease
        rec("c", "maxRetries", 5, 6),  # beyond the bounds
    ]
    actions = decide(analysis(recs), StateView(), PolicySettings())
    kinds = {(a.cron, a.param): a.kind for a in actions}
    assert kinds == {
        ("a", "timeout"): "start",  # a timeout before more attempts
        ("a", "maxRetries"): "hold",
        ("b", "timeout"): "review",
        ("c", "maxRetries"): "refuse",
    }


def test_too_few_runs_cooldown_and_pending_are_respected() -> None:
    r = rec("a", "maxRetries", 3, 4)
    assert decide(analysis([r], runs=29), StateView(), PolicySettings())[0].kind == "hold"
    cooling = StateView(cooling=frozenset({("a", "maxRetries", 4)}))
    assert decide(analysis([r]), cooling, PolicySettings())[0].kind == "hold"
    running = StateView(running=frozenset({"a"}))
    assert decide(analysis([r]), running, PolicySettings())[0].kind == "hold"
    manual = rec("a", "timeout", 15000, 40000)
    pending = StateView(pending=frozenset({("a", "timeout", 40000)}))
    assert decide(analysis([manual]), pending, PolicySettings()) == []


def make_engine(root: Path) -> Engine:
    return Engine(
        Store(root / "state"),
        Targets(ParamsFileTarget(root / "params.json"), {}),
        LogNotifier(),
        verify_after=86400,
    )


def test_the_engine_refuses_an_automatic_change_outside_the_safe_range(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    with pytest.raises(SafetyError):
        engine.start_experiment("a", "maxRetries", 3, 6, "r", {}, "tunerd", 0.0)
    with pytest.raises(SafetyError):
        engine.start_experiment("a", "timeout", 15000, 8000, "r", {}, "tunerd", 0.0)
    with pytest.raises(SafetyError):  # not even an operator goes beyond the absolute bounds
        engine.start_experiment("a", "timeout", 15000, 70000, "r", {}, "operator", 0.0)
    assert not (tmp_path / "params.json").exists()
    assert engine.store.changes() == []


VALUES = {"maxRetries": (0, 12), "timeout": (1000, 90000), "backoffBase": (100, 9000)}


@st.composite
def steps(draw: st.DrawFn) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for _ in range(draw(st.integers(1, 8))):
        if draw(st.booleans()):
            recs = []
            for _ in range(draw(st.integers(1, 4))):
                param = draw(st.sampled_from(TUNABLE))
                low, high = VALUES[param]
                current, proposed = draw(st.integers(low, high)), draw(st.integers(low, high))
                lie = draw(st.sampled_from([None, None, "auto"]))  # a buggy rule claiming "auto"
                recs.append(
                    rec(draw(st.sampled_from(["a", "b", "../x"])), param, current, proposed, lie)
                )
            out.append(("cycle", recs))
        else:
            out.append(
                (draw(st.sampled_from(["approve", "rollback", "end"])), draw(st.integers(1, 6)))
            )
    return out


@settings(max_examples=60, deadline=None)
@given(steps())
def test_no_sequence_makes_an_automatic_change_leave_the_safe_range(
    plan: list[tuple[str, object]],
) -> None:
    with tempfile.TemporaryDirectory() as root:
        engine = make_engine(Path(root))
        from tunerd.config import Settings

        config = Settings(log_path=Path(root) / "log", state_dir=Path(root) / "state")
        for now, (step, arg) in enumerate(plan):
            if step == "cycle":
                for action in decide(
                    analysis(arg), state_view(engine.store, now), PolicySettings()
                ):  # type: ignore[arg-type]
                    _execute(action, config, engine, float(now))
            elif step == "approve" and (review := engine.store.review(int(arg))):  # type: ignore[call-overload]
                with contextlib.suppress(EngineError, SafetyError):
                    engine.start_experiment(
                        review.cron,
                        review.param,
                        review.current,
                        review.proposed,
                        "ok",
                        {},
                        "operator",
                        float(now),
                    )
            elif step == "rollback":
                with contextlib.suppress(EngineError):
                    engine.manual_rollback(int(arg), float(now))  # type: ignore[call-overload]
            elif step == "end":  # an experiment ends (as a verdict would), freeing its cron
                for experiment in engine.store.experiments("running"):
                    if experiment.id == arg:
                        outcome = "commit" if now % 2 else "rollback"
                        engine.end_experiment(experiment, outcome, "verdict", None, float(now))
        for change in engine.store.changes():
            if change.state != "applied" or change.action != "experiment_start":
                continue
            assert change.new_value is not None and change.old_value is not None
            if change.actor == "tunerd":
                assert (
                    classify_change(change.param, change.old_value, change.new_value)[0] == "auto"
                )
            low, high = SPECS[change.param].absolute
            assert low <= change.new_value <= high
        running = [e.cron for e in engine.store.experiments("starting", "running")]
        assert len(running) == len(set(running))
        doc = (
            json.loads((Path(root) / "params.json").read_text())
            if (Path(root) / "params.json").exists()
            else {}
        )
        assert set(doc.get("experiments", {})) == set(running)
        for e in engine.store.experiments("running"):
            block = doc["experiments"][e.cron]
            assert (block["param"], block["control"], block["treatment"]) == (
                e.param,
                e.control,
                e.treatment,
            )


def test_a_cooldown_holds_the_same_move_whatever_its_exact_value() -> None:
    """A timeout proposal differs a little every week: the one rolled back as 15000 -> 23333 is
    the same change as 15000 -> 23664, and waits out the cooldown; a decrease does not."""
    from tunerd.policy import _cooling
    from tunerd.rules import Recommendation

    state = StateView(cooling=frozenset({("slow", "timeout", 23333)}))

    def rec(current: int, proposed: int, cron: str = "slow") -> Recommendation:
        return Recommendation(
            cron, "timeout", current, proposed, "why", "auto", "", "slow_response"
        )

    assert _cooling(state, rec(15000, 23664))
    assert _cooling(state, rec(15000, 20000))
    assert not _cooling(state, rec(25000, 30000))  # another starting point: another change
    assert not _cooling(state, rec(15000, 23664, cron="other"))
