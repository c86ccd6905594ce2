"""The policy: from an analysis and what is already under way, what to do now (pure).

The seed's rules say what *could* change; the policy decides what *will*: automatic experiments
only for increases inside the safe range, one experiment per cron at a time, nothing for a cron
with too few runs to judge, nothing that was rolled back or rejected during its cooldown, a
decrease or anything outside the safe range to a human, anything beyond the absolute bounds
refused. ``check_automatic`` is the last guard, applied again right before a file is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunerd.analysis import Analysis, CronSummary
from tunerd.params import SPECS, classify_change
from tunerd.rules import Recommendation

PRIORITY = {"backoffBase": 0, "timeout": 1, "maxRetries": 2}
"""When one cron has several automatic candidates, the first tried: rate limiting is answered by
slowing down before retrying more, and a timeout that cuts runs short before adding attempts."""


@dataclass(frozen=True, slots=True)
class PolicySettings:
    min_runs: int = 30
    """Runs in the window below which a cron is not tuned (too little evidence)."""
    cooldown_seconds: float = 14 * 86400
    """After a rollback or a rejection, the same change is not proposed again for this long."""


@dataclass(frozen=True, slots=True)
class StateView:
    """What is already under way, from the state store."""

    running: frozenset[str] = frozenset()
    """Crons with an experiment in progress."""
    cooling: frozenset[tuple[str, str, int]] = frozenset()
    """(cron, param, value) changes in their cooldown."""
    pending: frozenset[tuple[str, str, int]] = frozenset()
    """(cron, param, value) changes waiting for a human."""


@dataclass(frozen=True, slots=True)
class Action:
    """One thing to do, with the recommendation and the evidence behind it."""

    kind: str
    """start | review | refuse | hold"""
    cron: str
    param: str
    current: int
    proposed: int
    reason: str
    why: str
    """Why this kind: the safety class's reason, or why it is held."""
    evidence: dict[str, Any] = field(default_factory=dict)
    rate_limited: bool = False
    """The change answers HTTP 429 (backoffBase may then go up to 5000 ms automatically)."""
    fallback: bool = False
    """A hold only because an earlier candidate of the same cron starts first: started instead
    if that one cannot be written after all (``cycle``)."""


class SafetyError(Exception):
    """An automatic change outside the safe range reached the point of writing: a bug, refused."""


def check_automatic(param: str, current: int, proposed: int, rate_limited: bool) -> None:
    decision, why = classify_change(param, current, proposed, rate_limited)
    if decision != "auto":
        raise SafetyError(f"refusing automatic {param} {current} -> {proposed}: {why}")


def check_approved(param: str, proposed: int) -> None:
    """An operator may approve beyond the safe range, never beyond the absolute bounds."""
    low, high = SPECS[param].absolute
    if not low <= proposed <= high:
        raise SafetyError(f"{param} {proposed} is beyond the absolute bounds {low}-{high}")


def evidence_of(summary: CronSummary) -> dict[str, Any]:
    d = summary.duration
    span = (summary.last_at or 0) - (summary.first_at or 0)
    runs = max(summary.runs, 1)
    return {
        "runs": summary.runs,
        "runs_per_hour": round(summary.runs / (span / 3600), 4) if span > 0 else None,
        "schedule": summary.schedule,
        "baseline": {  # the primary metric of each parameter, before the change
            "maxRetries": round(summary.reachable_failure_rate, 6),
            "timeout": round(min(1.0, summary.timeout / runs), 6),
            "backoffBase": round(min(1.0, summary.rate_limited_retries / runs), 6),
        },
        "retry_rate": round(summary.retry_rate, 6),
        "final_failure_rate": round(summary.final_failure_rate, 6),
        "final_failures": summary.failure_causes(),
        "params_assumed": summary.params.assumed,
        "duration_ms_mean": None if d is None else round(d.mean, 1),
        "duration_ms_p95": None if d is None else round(d.p95, 1),
        "errors": {
            "rate_limit": summary.rate_limit,
            "timeout": summary.timeout,
            "other": summary.other,
        },
    }


def _action(
    kind: str, why: str, r: Recommendation, evidence: dict[str, Any], fallback: bool = False
) -> Action:
    return Action(
        kind,
        r.cron,
        r.param,
        r.current,
        r.proposed,
        r.reason,
        why,
        evidence,
        rate_limited=r.pattern == "rate_limited",
        fallback=fallback,
    )


def _cooling(state: StateView, r: Recommendation) -> bool:
    """The same change was rolled back, rejected or refused recently: the same parameter of the
    same cron moved the same way from the same value (a timeout proposal differs a little every
    week; 15000 -> 23664 is the change that was rolled back as 15000 -> 23333)."""
    return any(
        cron == r.cron and param == r.param and (value - r.current) * (r.proposed - r.current) > 0
        for cron, param, value in state.cooling
    )


def decide(analysis: Analysis, state: StateView, settings: PolicySettings) -> list[Action]:
    """Actions for the analysis's recommendations. A change the cron's target cannot be written
    for is left out (``rules.advise_cron`` says what to add to the script): it never holds the
    cron's other candidates, nor waits for a person who could not apply it either."""
    summaries = {s.cron: s for s in analysis.crons}
    by_cron: dict[str, list[Recommendation]] = {}
    for r in analysis.recommendations:
        by_cron.setdefault(r.cron, []).append(r)
    actions: list[Action] = []
    for cron, recs in by_cron.items():
        summary = summaries[cron]
        evidence = evidence_of(summary)
        running = cron in state.running
        started = False
        for r in sorted(recs, key=lambda r: PRIORITY.get(r.param, 9)):
            if summary.params.unwritable(r.param) is not None:
                continue
            key = (cron, r.param, r.proposed)
            cooling = _cooling(state, r)
            kind, why, fallback = "", r.decision_reason, False
            if r.decision == "forbidden":
                kind = "refuse" if not cooling else ""
            elif summary.runs < settings.min_runs:
                kind = "hold"
                why = f"only {summary.runs} runs in the window (at least {settings.min_runs})"
            elif cooling:
                kind, why = "hold", "rolled back or rejected recently: in its cooldown"
            elif r.decision == "manual":
                kind = "review" if key not in state.pending else ""
            elif running or started:
                kind, why = "hold", "one experiment per cron at a time: another is under way"
                fallback = not running
            else:
                kind, started = "start", True
            if kind:
                actions.append(_action(kind, why, r, evidence, fallback))
    return actions
