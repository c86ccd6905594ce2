"""The seed's three rules, its Level 3 conditions, and the reasons a person reads (pure).

Patterns are exactly what the thresholds define; a recommendation carries the numbers behind it and
its safety classification. Nothing here decides *whether* to act: that is the policy's job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from tunerd.params import SPECS, Decision, classify_change

if TYPE_CHECKING:
    from tunerd.analysis import CronSummary

PatternType = Literal["high_retry_rate", "slow_response", "rate_limited"]


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The seed's numbers (SPEC section 3 and seed section 8)."""

    retry_rate: float = 0.10
    final_failure_rate: float = 0.01
    slow_fraction: float = 0.8
    """slow_response: mean run duration above this fraction of the timeout..."""
    timeout_share: float = 0.02
    """...or more than this share of attempts timed out: the tail hits the timeout while the
    mean stays well below it (a lognormal API with a few slow calls)."""
    timeout_factor: float = 1.5
    """Rule 2: the new timeout leaves this much room over the mean run."""
    tail_padding: float = 1.2
    """...and this much over the p99 of successful attempts (Amazon Builders' Library)."""
    backoff_factor: int = 2
    recurring_error: int = 10
    """Level 3: the same error more often than this is a code problem, not a parameter one."""
    recurring_timeout: int = 5


DEFAULT_THRESHOLDS: Final = Thresholds()


@dataclass(frozen=True, slots=True)
class Pattern:
    type: PatternType
    cron: str
    value: float
    detail: str


@dataclass(frozen=True, slots=True)
class Recommendation:
    cron: str
    param: str
    current: int
    proposed: int
    reason: str
    decision: Decision
    decision_reason: str
    pattern: PatternType


AdvisoryType = Literal[
    "missing_cron",
    "recurring_error",
    "recurring_timeout",
    "rate_limited_at_max_backoff",
    "non_retryable",
    "cannot_apply",
    "rate_limit_not_retried",
    "untrusted_value",
    "unreadable_target",
    "disabled_soon",
]


@dataclass(frozen=True, slots=True)
class Advisory:
    """Something parameters cannot fix: said to a person, never applied."""

    type: AdvisoryType
    subject: str
    count: int
    message: str


def detect_patterns(s: CronSummary, t: Thresholds = DEFAULT_THRESHOLDS) -> list[Pattern]:
    found = []
    if s.runs and s.retry_rate > t.retry_rate:
        found.append(
            Pattern(
                "high_retry_rate",
                s.cron,
                s.retry_rate,
                f"{_pct(s.retry_rate)} of {s.runs} runs needed a retry"
                f" (threshold {_pct(t.retry_rate)})",
            )
        )
    timeout = s.params.timeout
    timed_out = _killed_share(s)
    at = f"its {_ms(timeout)} timeout" if timeout is not None else "a timeout tunerd cannot see"
    mean = s.attempt_mean
    if mean is not None and timeout is not None and mean > timeout * t.slow_fraction:
        found.append(
            Pattern(
                "slow_response",
                s.cron,
                mean,
                f"attempts take {_ms(mean)} on average, {_pct(mean / timeout)} of the"
                f" {_ms(timeout)} timeout each of them has (threshold {_pct(t.slow_fraction)})",
            )
        )
    elif mean is not None and timed_out > t.timeout_share:
        found.append(
            Pattern(
                "slow_response",
                s.cron,
                mean,
                f"{_pct(timed_out)} of {s.attempts} attempts were killed by {at}"
                f" (threshold {_pct(t.timeout_share)})",
            )
        )
    if s.rate_limit:
        found.append(
            Pattern(
                "rate_limited",
                s.cron,
                s.rate_limit,
                f"{s.rate_limit} attempts were answered with HTTP 429"
                f" ({s.rate_limited_retries} of them on a retry)",
            )
        )
    return found


def recommend(
    s: CronSummary, patterns: list[Pattern], t: Thresholds = DEFAULT_THRESHOLDS
) -> list[Recommendation]:
    """The seed's rules, one recommendation per rule that fires and would change something,
    read with the wrapper's semantics: only failures more attempts could rescue call for more
    attempts, only rate limits the wrapper retries call for a longer backoff, and a timeout that
    cuts attempts off is raised even though the log cannot show how long they would have taken.
    A parameter whose current value is unknown is never proposed."""
    out = []
    for p in patterns:
        if p.type == "high_retry_rate":
            current = s.params.maxRetries
            if current is None or s.exhausted_rate <= t.final_failure_rate:
                continue
            reason = (
                f"{p.detail}, and {_pct(s.exhausted_rate)} of runs still failed after all"
                f" {current} attempts with an error {s.params.retrier} retries"
                f" (threshold {_pct(t.final_failure_rate)}): allow one more attempt"
            )
            out.append(_recommendation(s, "maxRetries", current + 1, reason, p.type))
        elif p.type == "slow_response" and s.params.timeout is not None:
            proposed, reason = _timeout_proposal(s, p, s.params.timeout, t)
            step = s.params.timeout_step
            proposed = -(-proposed // step) * step  # up, to what the target can hold
            if proposed > s.params.timeout:
                out.append(_recommendation(s, "timeout", proposed, reason, p.type))
        elif p.type == "rate_limited" and s.params.backoffBase is not None and s.rate_limit_retried:
            current = s.params.backoffBase
            reason = f"{p.detail}: wait longer between attempts (backoffBase × {t.backoff_factor})"
            out.append(
                _recommendation(s, "backoffBase", current * t.backoff_factor, reason, p.type)
            )
    return out


def _timeout_proposal(s: CronSummary, p: Pattern, current: int, t: Thresholds) -> tuple[int, str]:
    """Rule 2 with a robust tail: ``max(ceil(mean × 1.5), ceil(p99 × 1.2))`` of the successful
    attempts. When attempts are being killed by the timeout, both are blind to them (a killed
    attempt's duration is only known to exceed the timeout, and every successful one fits under
    it by construction), so the proposal is one step up, into the safe range."""
    low, high = SPECS["timeout"].safe
    proposed = math.ceil(p.value * t.timeout_factor)
    reason = f"{p.detail}: timeout = ceil(mean × {t.timeout_factor})"
    if s.success_p99 is not None and math.ceil(s.success_p99 * t.tail_padding) > proposed:
        proposed = math.ceil(s.success_p99 * t.tail_padding)
        reason = (
            f"{p.detail}; successful attempts reach {_ms(s.success_p99)} at p99: "
            f"timeout = ceil(p99 × {t.tail_padding})"
        )
    if _killed_share(s) <= t.timeout_share:
        return _into_safe_range(proposed, current, reason)
    step = math.ceil(current * t.timeout_factor / 500) * 500
    step = max(step, low) if current >= high else min(max(step, low), high)
    if step <= proposed:
        return _into_safe_range(proposed, current, reason)
    return step, (
        f"{p.detail}. How long those attempts would have taken cannot be seen (each was stopped"
        f" at {_ms(current)}), and every successful attempt fits under the timeout by"
        f" construction, so the log cannot say how much room is needed: try one step up to"
        f" {_ms(step)} and let the experiment decide (its guardrail, runs no more than 5 %"
        " slower, stops it if the calls simply hang longer)"
    )


def _into_safe_range(proposed: int, current: int, reason: str) -> tuple[int, str]:
    """An increase from below the safe range goes at least to its bottom: 2,000 → 2,536 would
    be refused as beyond the absolute bounds, and an increase is what the evidence asks for."""
    low = SPECS["timeout"].safe[0]
    if current < proposed < low:
        return low, f"{reason}, at least the safe range's {_ms(low)}"
    return proposed, reason


def _killed_share(s: CronSummary) -> float:
    """The share of attempts killed by the cron's timeout; every timed-out attempt when their
    durations or the timeout are unknown."""
    killed = s.timeout if s.killed is None else s.killed
    return killed / s.attempts if s.attempts else 0.0


def _recommendation(
    s: CronSummary, param: str, proposed: int, reason: str, pattern: PatternType
) -> Recommendation:
    current = s.params.get(param)
    assert current is not None  # the rules propose nothing from an unknown value
    decision, why = classify_change(
        param, current, proposed, rate_limited=pattern == "rate_limited"
    )
    return Recommendation(s.cron, param, current, proposed, reason, decision, why, pattern)


def advise_cron(
    s: CronSummary, recommendations: list[Recommendation], t: Thresholds = DEFAULT_THRESHOLDS
) -> list[Advisory]:
    """Seed section 8: when tuning parameters is not enough, suggest a code change; what a
    person must add to a script before tunerd can make a change it found; and a value a person
    wrote that tunerd cannot trust (it leaves that parameter to them)."""
    out = [
        Advisory(
            "untrusted_value",
            s.cron,
            1,
            f"{s.cron}: {why}. Its Level 1 may run with it as written or fall back to a default:"
            f" tunerd cannot tell which, so it does not tune {param} until a person sets a"
            " whole number.",
        )
        for param, why in s.params.untrusted
    ]
    for r in recommendations:
        why = s.params.unwritable(r.param)
        if why is not None:
            out.append(
                Advisory(
                    "cannot_apply",
                    s.cron,
                    1,
                    f"{s.cron}: {r.param} {r.current:,} → {r.proposed:,} was found"
                    f" ({r.pattern.replace('_', ' ')}) but cannot be written: {why}."
                    " tunerd tries the cron's other changes meanwhile.",
                )
            )
    if s.non_retryable >= 2 and s.non_retryable / s.runs > t.final_failure_rate:
        top = next(((n, sig) for n, sig in s.signatures if not sig.retryable), None)
        error = f" (most often {top[0]} ×{top[1].count})" if top else ""
        out.append(
            Advisory(
                "non_retryable",
                s.cron,
                s.non_retryable,
                f"{s.cron}: {s.non_retryable} of {s.failures} final failures"
                f" ({_pct(s.non_retryable / s.runs)} of runs) were errors"
                f" {s.params.retrier} does not retry{error}. Retry parameters cannot fix them:"
                " the job itself fails (for a command, a non-zero exit); its code or its"
                " dependency needs a look.",
            )
        )
    for name, sig in s.signatures:
        if sig.kind == "other" and sig.retryable and sig.count > t.recurring_error:
            fix = f" The wrapper suggests: {sig.fix}." if sig.fix else ""
            out.append(
                Advisory(
                    "recurring_error",
                    s.cron,
                    sig.count,
                    f"{s.cron}: the same error failed {sig.count} attempts ({name}). Retry "
                    "parameters cannot fix it: the job's code or its dependency needs a look."
                    + fix,
                )
            )
    auto_timeout = any(
        r.param == "timeout" and r.decision == "auto" and s.params.unwritable("timeout") is None
        for r in recommendations
    )
    if s.timeout > t.recurring_timeout and not auto_timeout:
        own = s.timeout - (s.timeout if s.killed is None else s.killed)
        why = (
            f"{own} of them ended well before the {_ms(s.params.timeout or 0)} timeout: the job"
            " hit a timeout of its own (or its API's), which no parameter here changes"
            if own * 2 > s.timeout
            else "a longer timeout cannot be applied automatically"
        )
        out.append(
            Advisory(
                "recurring_timeout",
                s.cron,
                s.timeout,
                f"{s.cron}: {s.timeout} attempts timed out and {why}: if the API is simply slow,"
                " cache its answers or change the code.",
            )
        )
    if s.rate_limit and not s.rate_limit_retried:
        out.append(
            Advisory(
                "rate_limit_not_retried",
                s.cron,
                s.rate_limit,
                f"{s.cron}: {s.rate_limit} attempts were answered with HTTP 429, and"
                f" {s.params.retrier} retried none of them (they reached it as an error it does"
                " not retry, such as a command's exit status), so a longer backoff cannot help:"
                " have the script reject with the HTTP status as the error's `statusCode` (under"
                " `tunerd exec`, name the command's exit status in `--retry-exit`), or run the"
                " job less often.",
            )
        )
    backoff = s.params.backoffBase
    if s.rate_limit_retried and backoff is not None and backoff >= SPECS["backoffBase"].absolute[1]:
        out.append(
            Advisory(
                "rate_limited_at_max_backoff",
                s.cron,
                s.rate_limit,
                f"{s.cron}: still rate limited ({s.rate_limit} × HTTP 429) with backoffBase at its "
                f"{_ms(backoff)} maximum: spread the schedule or cache the answers.",
            )
        )
    return out


def advise_tasks(tasks: dict[str, int]) -> list[Advisory]:
    """Real jobs that log only ``task`` are counted, never silently dropped: say so."""
    if not tasks:
        return []
    runs = sum(tasks.values())
    top = sorted(tasks.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    names = ", ".join(f"{name!r} ×{count}" for name, count in top)
    more = f" and {len(tasks) - len(top)} more" if len(tasks) > len(top) else ""
    return [
        Advisory(
            "missing_cron",
            "(tasks)",
            runs,
            f"{runs} runs were logged with a task but no cron ({names}{more}): add `cron` to the "
            "wrapper's context so tunerd can tune them.",
        )
    ]


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def _ms(x: float) -> str:
    return f"{x:,.0f} ms"
