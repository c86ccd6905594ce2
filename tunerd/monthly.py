"""The monthly report: what tunerd changed, what the verdicts said, and the seed's success metrics
(pure: it reads the history it is given).

The seed's goals (section 7): automatic tuning accurate (rollbacks under 10 % of verdicts), people
rarely needed (under 10 % of changes), 100 % of automatic changes inside the safe range, and a
real improvement (final failures down) where a change was kept.
"""

from __future__ import annotations

import json
from calendar import monthrange
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tunerd.params import classify_change
from tunerd.store import Change, Experiment, Review


@dataclass(frozen=True, slots=True)
class Month:
    year: int
    month: int

    @classmethod
    def parse(cls, text: str) -> Month:
        try:
            year, month = (int(part) for part in text.split("-"))
            datetime(year, month, 1)
        except ValueError:
            raise ValueError(f"{text!r} is not a month: use YYYY-MM, e.g. 2026-11") from None
        return cls(year, month)

    @classmethod
    def of(cls, epoch: float) -> Month:
        at = datetime.fromtimestamp(epoch, UTC)
        return cls(at.year, at.month)

    @property
    def bounds(self) -> tuple[float, float]:
        days = monthrange(self.year, self.month)[1]
        start = datetime(self.year, self.month, 1, tzinfo=UTC)
        return start.timestamp(), start.timestamp() + days * 86400

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def monthly_report(
    month: Month, changes: list[Change], experiments: list[Experiment], reviews: list[Review]
) -> dict[str, Any]:
    return {"month": str(month), **period_report(*month.bounds, changes, experiments, reviews)}


def period_report(
    start: float,
    end: float,
    changes: list[Change],
    experiments: list[Experiment],
    reviews: list[Review],
) -> dict[str, Any]:
    """What happened from ``start`` to ``end``: the monthly report's body, and the simulator's
    summary of a whole simulated run."""

    def within(at: float | None) -> bool:
        return at is not None and start <= at < end

    applied = [c for c in changes if within(c.created_at) and c.state in ("applied", "recorded")]
    starts = [c for c in applied if c.action == "experiment_start"]
    automatic = [c for c in starts if c.actor == "tunerd"]
    outside = [
        c.id
        for c in automatic
        if c.old_value is None
        or c.new_value is None
        or classify_change(c.param, c.old_value, c.new_value, _rate_limited(c))[0] != "auto"
    ]
    by_action: dict[str, int] = {}
    for c in applied:
        by_action[c.action] = by_action.get(c.action, 0) + 1
    month_reviews = [r for r in reviews if within(r.created_at)]
    verdicts: list[dict[str, Any]] = []
    for e in experiments:
        if not within(e.ended_at) or e.state not in ("committed", "rolled_back"):
            continue
        verdict = json.loads(e.verdict) if e.verdict else {}
        arms = verdict.get("arms", {})
        verdicts.append(
            {
                "experiment": e.id,
                "cron": e.cron,
                "param": e.param,
                "from": e.control,
                "to": e.treatment,
                "verdict": "commit" if e.state == "committed" else "rollback",
                "reason": verdict.get("reason") or "",
                "before": _rates(arms.get("control")),
                "after": _rates(arms.get("treatment")),
            }
        )
    commits = [v for v in verdicts if v["verdict"] == "commit"]
    rollbacks = [v for v in verdicts if v["verdict"] == "rollback"]
    # Each commit was a test at its look's alpha: were every committed change useless, at most
    # the sum of those alphas would have passed by chance (the expected false commits, a bound).
    false_commits = sum(
        (json.loads(e.verdict or "{}").get("alpha_at_look") or 0.0)
        for e in experiments
        if within(e.ended_at) and e.state == "committed"
    )
    drops = [
        v["before"]["final_failure_rate"] - v["after"]["final_failure_rate"]
        for v in commits
        if v["before"] and v["after"]
    ]
    return {
        "experiments_started": len(starts),
        "automatic": len(automatic),
        "approved_by_a_person": len(starts) - len(automatic),
        "reviews_requested": len(month_reviews),
        "reviews": {
            state: sum(r.state == state for r in month_reviews)
            for state in ("pending", "approved", "rejected", "superseded")
        },
        "actions": by_action,
        "verdicts": verdicts,
        "metrics": {
            "rollback_ratio": _ratio(len(rollbacks), len(verdicts)),
            "rollback_ratio_goal": 0.10,
            "share_needing_a_human": _ratio(
                len(month_reviews), len(automatic) + len(month_reviews)
            ),
            "share_needing_a_human_goal": 0.10,
            "automatic_changes_outside_safe_range": len(outside),
            "safety_record": "100 % inside the safe range"
            if not outside
            else f"VIOLATED: {outside}",
            "mean_final_failure_drop_of_commits": round(sum(drops) / len(drops), 6)
            if drops
            else None,
            "expected_false_commits_at_most": round(false_commits, 4),
        },
    }


def _rate_limited(change: Change) -> bool:
    """Whether the change answered HTTP 429 (its wider safe range applies): its evidence says."""
    try:
        evidence = json.loads(change.evidence or "{}")
        return bool(evidence.get("errors", {}).get("rate_limit"))
    except (ValueError, AttributeError):
        return False


def _rates(arm: dict[str, Any] | None) -> dict[str, Any] | None:
    if not arm:
        return None
    return {
        "runs": arm.get("runs", 0),
        "final_failure_rate": arm.get("final_failure_rate", 0.0),
        "retry_rate": arm.get("retry_rate", 0.0),
        "duration_ms_mean": arm.get("duration_ms_mean"),
    }


def report_text(report: dict[str, Any], safe: Any) -> str:
    """The report for a person; ``safe`` escapes untrusted names for the terminal."""
    m = report["metrics"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1%}"

    lines = [
        f"tunerd monthly report {report['month']}",
        f"Experiments started: {report['experiments_started']} ({report['automatic']} automatic,"
        f" {report['approved_by_a_person']} approved by a person); reviews requested:"
        f" {report['reviews_requested']}",
        f"Verdicts: {len(report['verdicts'])}",
    ]
    for v in report["verdicts"]:
        before, after = v["before"], v["after"]
        rates = ""
        if before and after:
            rates = (
                f"; final failures {before['final_failure_rate']:.1%}"
                f" → {after['final_failure_rate']:.1%},"
                f" retries {before['retry_rate']:.1%} → {after['retry_rate']:.1%}"
            )
        lines.append(
            f"  {v['verdict']:<8} {safe(v['cron'])}: {v['param']} {v['from']} → {v['to']}{rates}"
        )
    lines += [
        "Success metrics (the seed's goals):",
        f"  rollback ratio {pct(m['rollback_ratio'])} (goal under 10%)",
        f"  share needing a human {pct(m['share_needing_a_human'])} (goal under 10%)",
        f"  safety: {m['safety_record']}",
        "  mean drop of final failures where a change was kept:"
        f" {pct(m['mean_final_failure_drop_of_commits'])}",
        f"  false commits to expect among them: at most {m['expected_false_commits_at_most']:.2f}"
        " (each commit's alpha, added up)",
    ]
    return "\n".join(lines)
