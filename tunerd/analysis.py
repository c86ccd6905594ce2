"""One analysis of a log window: per-cron summaries, patterns, recommendations, advisories (pure).

``analyze`` is what ``tunerd analyze`` prints and what the tuning cycle decides on, so both see the
same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunerd.params import InForce
from tunerd.rules import (
    DEFAULT_THRESHOLDS,
    Advisory,
    Pattern,
    Recommendation,
    Thresholds,
    advise_cron,
    advise_tasks,
    detect_patterns,
    recommend,
)
from tunerd.sketch import QuantileSketch
from tunerd.stats import LogStats, Rates, RunStats, Signature, Totals


@dataclass(frozen=True, slots=True)
class Distribution:
    count: int
    mean: float
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, sketch: QuantileSketch) -> Distribution | None:
        if not sketch.count:
            return None
        p50, p95, p99 = sketch.quantiles((0.50, 0.95, 0.99))
        return cls(sketch.count, sketch.mean, p50, p95, p99, sketch.max)


KILLED_AT = 0.9
"""A timed-out attempt that lasted this share of the timeout or more was killed by it (the
wrapper's exec() kills at the timeout; a few milliseconds either way)."""


@dataclass(frozen=True, slots=True)
class CronSummary(Rates):
    """The statistics of one cron over the window, with the parameters it runs with."""

    cron: str
    params: InForce
    runs: int
    successes: int
    retried: int
    attempts: int
    exhausted: int
    non_retryable: int
    non_retryable_first: int
    duration: Distribution | None
    first_attempt: Distribution | None
    success_attempt: Distribution | None
    rate_limit: int
    rate_limit_retried: int
    """Attempts answered with HTTP 429 that the wrapper retries (a longer backoff can help)."""
    timeout: int
    killed: int | None
    """Timed-out attempts that lasted at least ``KILLED_AT`` of the timeout in force: killed by
    it (the rest hit a timeout of the job's own). None when the timeout or the durations are
    unknown."""
    other: int
    rate_limited_retries: int
    signatures: list[tuple[str, Signature]]
    """Most frequent first."""
    first_at: float | None
    last_at: float | None
    schedule: str | None = None

    @classmethod
    def of(cls, cron: str, run: RunStats, params: InForce, schedule: str | None) -> CronSummary:
        signatures = sorted(run.errors.signatures.items(), key=lambda kv: (-kv[1].count, kv[0]))
        return cls(
            cron=cron,
            params=params,
            runs=run.runs,
            successes=run.successes,
            retried=run.retried,
            attempts=run.attempts,
            exhausted=run.exhausted,
            non_retryable=run.non_retryable,
            non_retryable_first=run.non_retryable_first,
            duration=Distribution.of(run.duration),
            first_attempt=Distribution.of(run.first_attempt),
            success_attempt=Distribution.of(run.success_attempt),
            rate_limit=run.rate_limit,
            rate_limit_retried=run.errors.count("rate_limit", retryable=True),
            timeout=run.timeout,
            killed=None
            if params.timeout is None or params.assumed or run.timeout_attempt is None
            else run.timeout_attempt.count_at_least(params.timeout * KILLED_AT),
            other=run.other,
            rate_limited_retries=run.rate_limited_retries,
            signatures=signatures,
            first_at=run.first_at if math.isfinite(run.first_at) else None,
            last_at=run.last_at if math.isfinite(run.last_at) else None,
            schedule=schedule,
        )

    @property
    def duration_mean(self) -> float | None:
        return self.duration.mean if self.duration else None

    @property
    def attempt_mean(self) -> float | None:
        """The mean first attempt: what a per-attempt timeout is compared with (a run's whole
        duration adds every retry and backoff wait), else the mean run."""
        return self.first_attempt.mean if self.first_attempt else self.duration_mean

    @property
    def success_p99(self) -> float | None:
        return self.success_attempt.p99 if self.success_attempt else None


@dataclass(slots=True)
class Analysis:
    totals: Totals
    crons: list[CronSummary]
    patterns: list[Pattern] = field(default_factory=list)
    recommendations: list[Recommendation] = field(default_factory=list)
    advisories: list[Advisory] = field(default_factory=list)
    tasks: dict[str, int] = field(default_factory=dict)
    period: tuple[float, float] | None = None
    counted_from: dict[str, float] = field(default_factory=dict)
    """Crons whose runs count only from this time on: their parameters changed then."""


ParamsLookup = Callable[[str, dict[str, Any] | None], InForce]
"""(cron, the params its latest log line carried) -> the parameters it runs with
(``targets.InForceReader``)."""


def analyze(
    stats: LogStats,
    params_for: ParamsLookup,
    since: float | None = None,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    changed_at: dict[str, float] | None = None,
) -> Analysis:
    """``changed_at``: when a cron's parameters last changed. Only its runs from the first whole
    time bucket after that count: runs under the old parameters say nothing about the new ones."""
    result = Analysis(stats.totals, [], tasks=dict(stats.tasks), period=stats.period)
    for name in sorted(stats.crons):
        cron = stats.crons[name]
        cron_since = since
        if changed_at and name in changed_at:
            bucket = stats.bucket_seconds or 1.0
            after = math.ceil(changed_at[name] / bucket) * bucket
            if since is None or after > since:
                cron_since = result.counted_from[name] = after
        summary = CronSummary.of(
            name,
            cron.window(cron_since, stats.bucket_seconds),
            params_for(name, cron.params),
            cron.schedule,
        )
        if not summary.runs:
            continue
        patterns = detect_patterns(summary, thresholds)
        recommendations = recommend(summary, patterns, thresholds)
        result.crons.append(summary)
        result.patterns += patterns
        result.recommendations += recommendations
        result.advisories += advise_cron(summary, recommendations, thresholds)
    result.advisories += advise_tasks(stats.tasks)
    return result
