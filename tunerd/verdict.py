"""The verdict on an experiment, and the hourly harm check (pure; SciPy is imported when judging).

**What is compared.** Each arm is a set of runs. The *primary metric* is what the change is meant
to improve: the final-failure rate for ``maxRetries``, the share of runs with a timed-out attempt
for ``timeout``, the share of runs with a retry answered by HTTP 429 again for ``backoffBase``.
The *guardrails* hold for every change: the final-failure rate must not get worse, and runs must
not get more than 5 % slower. What "slower" measures depends on the change, because each one
changes durations by design. A retry change (``maxRetries``, ``backoffBase``) lengthens runs on
purpose — a longer backoff waits longer, one more attempt turns three quick 429s into a slower
success — so it is judged on the work when it succeeds: the successful attempts of successful
runs (the service must not get slower). A ``timeout`` change admits slower successes on purpose,
so it is judged on whole runs (``totalDuration``: a rescued run is one slow success instead of a
timeout, a wait and a retry; hung calls held longer make runs slower). The simulator showed both
failure modes of a single measure: on whole runs every working retry change was rolled back
("35 % slower", "44 % slower"); on successful attempts every working timeout change was.

**Tests.** Proportions: Boschloo's exact test (uniformly more powerful than Fisher's) while the
table is small, Fisher's exact test when it is large (Boschloo's cost grows with n1 x n2).
Durations: Welch's t-test on log-durations against a 5 % margin.

**Error control across looks.** An experiment is judged at its verification time and again after
each extension (at most ``max_extensions``): the same data are looked at repeatedly. The commit
test therefore spends a total one-sided ``alpha`` over the looks: ``first_look_share`` of it at
the first look (the planned horizon), the rest split evenly over the extensions. A look that does
not test (too few runs) spends nothing. By the union bound the chance of committing a change that
does not improve the primary metric stays below ``alpha`` however many looks are taken. The hourly
harm check only ever stops (rolls back), never commits; each of its looks uses the small
``harm_alpha`` so that a good change is rarely stopped by chance over a day of hourly looks.

**Inconclusive is an outcome.** Too few runs, or no significant improvement yet, extends the
experiment; after the last extension it is rolled back with the reason that the evidence never
arrived. An arm with no runs at all (Level 1 ignored the split) is reported as an error of the
experiment, not as evidence against the change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from tunerd.records import Entry, causes, describe_error, failure_cause, non_retryable_at_first
from tunerd.timeparse import human_duration

Decision = Literal["commit", "rollback", "extend"]
PRIMARY: Final = {
    "maxRetries": ("reachable_failure_rate", "final failures more attempts could reach"),
    "timeout": ("timeout_rate", "runs with a timed-out attempt"),
    "backoffBase": ("rate_limited_retry_rate", "runs whose retry hit HTTP 429 again"),
}
BOSCHLOO_MAX_CELLS: Final = 250_000
"""Above n1 x n2 this large, Fisher's exact test is used (Boschloo would take seconds)."""


@dataclass(frozen=True, slots=True)
class VerdictSettings:
    alpha: float = 0.015
    """One-sided error allowed for a wrong commit, over all looks together."""
    first_look_share: float = 0.8
    max_extensions: int = 2
    min_runs: int = 20
    """Per arm, before anything is tested."""
    min_improvement: float = 0.2
    """The primary metric must also fall by at least this share of the control's value."""
    guard_alpha: float = 0.05
    """A guardrail is broken when the treatment is worse at this one-sided level."""
    duration_margin: float = 0.05
    harm_alpha: float = 0.001
    harm_min_runs: int = 10

    def alpha_at(self, look: int) -> float:
        """Alpha spent at look ``look`` (1 = the planned verification time)."""
        if look <= 1:
            return self.alpha * self.first_look_share
        if look > 1 + self.max_extensions:
            return 0.0
        return self.alpha * (1 - self.first_look_share) / max(self.max_extensions, 1)


@dataclass(slots=True)
class Arm:
    """The runs of one arm, reduced to what the tests need."""

    runs: int = 0
    failures: int = 0
    exhausted: int = 0
    non_retryable: int = 0
    non_retryable_first: int = 0
    """Failures at the first attempt by an error the wrapper does not retry: the same in both
    arms of a ``maxRetries`` change, so left out of its primary metric. (Counting only the
    *exhausted* failures would favour the treatment: a run that exhausts three attempts in the
    control and meets a non-retryable error at its fourth in the treatment would drop out.)"""
    retried: int = 0
    timed_out: int = 0
    rate_limited_retry: int = 0
    durations: list[float] = field(default_factory=list)
    """Each run's ``totalDuration`` (the guardrails of a timeout change: mean and p95 run)."""
    firsts: list[float] = field(default_factory=list)
    """Each run's first attempt (the guardrail of a retry change: the one attempt the change
    cannot select, so a slower one means a slower service, not more rescued runs)."""
    duration_total: float = 0.0
    """Sum of the runs' ``totalDuration`` (``duration_ms_mean``)."""

    def merge(self, other: Arm) -> None:
        """Add the runs of ``other`` (another stretch of the same arm)."""
        self.runs += other.runs
        self.failures += other.failures
        self.exhausted += other.exhausted
        self.non_retryable += other.non_retryable
        self.non_retryable_first += other.non_retryable_first
        self.retried += other.retried
        self.timed_out += other.timed_out
        self.rate_limited_retry += other.rate_limited_retry
        self.durations += other.durations
        self.firsts += other.firsts
        self.duration_total += other.duration_total

    def add(self, entry: Entry) -> None:
        self.runs += 1
        if not entry.succeeded:
            self.failures += 1
            cause = failure_cause(entry)
            self.exhausted += cause == "exhausted"
            self.non_retryable += cause == "non_retryable"
            self.non_retryable_first += non_retryable_at_first(entry)
        self.retried += len(entry.attempts) > 1
        timed_out = rate_limited_retry = False
        for i, attempt in enumerate(entry.attempts):
            if attempt.success:
                continue
            kind = describe_error(attempt.error).kind
            timed_out |= kind == "timeout"
            rate_limited_retry |= kind == "rate_limit" and i > 0
        if not entry.attempts and not entry.succeeded:
            timed_out = describe_error(entry.final_error).kind == "timeout"
        self.timed_out += timed_out
        self.rate_limited_retry += rate_limited_retry
        duration = entry.duration
        if duration is not None:
            self.duration_total += duration
            self.durations.append(duration)
        if entry.attempts and entry.attempts[0].duration is not None:
            self.firsts.append(entry.attempts[0].duration)

    def count(self, metric: str) -> int:
        return {
            "final_failure_rate": self.failures,
            "reachable_failure_rate": self.failures - self.non_retryable_first,
            "timeout_rate": self.timed_out,
            "rate_limited_retry_rate": self.rate_limited_retry,
        }[metric]

    def rate(self, metric: str) -> float:
        return self.count(metric) / self.runs if self.runs else 0.0

    def summary(self) -> dict[str, Any]:
        n = len(self.durations)
        return {
            "runs": self.runs,
            "final_failure_rate": round(self.rate("final_failure_rate"), 6),
            "final_failures": causes(self.failures, self.exhausted, self.non_retryable),
            "reachable_failure_rate": round(self.rate("reachable_failure_rate"), 6),
            "retry_rate": round(self.retried / self.runs, 6) if self.runs else 0.0,
            "timeout_rate": round(self.rate("timeout_rate"), 6),
            "rate_limited_retry_rate": round(self.rate("rate_limited_retry_rate"), 6),
            "duration_ms_mean": round(self.duration_total / n, 1) if n else None,
        }


@dataclass(frozen=True, slots=True)
class TestResult:
    metric: str
    test: str
    p_value: float | None
    effect: float | None
    """treatment minus control (rates), or treatment / control (duration, geometric means)"""
    ci: tuple[float, float] | None
    threshold: float
    role: str
    """primary | guardrail | harm"""
    passed: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "test": self.test,
            "p_value": None if self.p_value is None else round(self.p_value, 6),
            "effect": None if self.effect is None else round(self.effect, 6),
            "ci": None if self.ci is None else [round(x, 6) for x in self.ci],
            "threshold": self.threshold,
            "role": self.role,
            "passed": self.passed,
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    reason: str
    control: Arm
    treatment: Arm
    tests: list[TestResult]
    look: int
    alpha: float

    def as_json(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "reason": self.reason,
            "look": self.look,
            "alpha_at_look": round(self.alpha, 6),
            "arms": {"control": self.control.summary(), "treatment": self.treatment.summary()},
            "tests": [t.as_json() for t in self.tests],
        }


# --- the tests ------------------------------------------------------------------------------


def proportion_test(
    metric: str, control: Arm, treatment: Arm, alternative: str, threshold: float, role: str
) -> TestResult:
    """Is the treatment's rate lower (``"less"``) or higher (``"greater"``) than the control's?

    When the rates point the other way (or not at all), the one-sided p-value is above one half
    whichever exact test computes it, and no threshold is met: Fisher's, a hundred times cheaper
    than Boschloo's, gives it (the hourly harm check mostly sees such tables)."""
    from scipy import stats

    c, t = control.count(metric), treatment.count(metric)
    table = [[t, treatment.runs - t], [c, control.runs - c]]
    diff = treatment.rate(metric) - control.rate(metric)
    towards = diff > 0 if alternative == "greater" else diff < 0
    if (
        towards
        and treatment.runs * control.runs <= BOSCHLOO_MAX_CELLS
        and 0 < c + t < control.runs + treatment.runs
    ):
        name, p = (
            "Boschloo exact",
            float(stats.boschloo_exact(table, alternative=alternative).pvalue),
        )
    else:
        name, p = "Fisher exact", float(stats.fisher_exact(table, alternative=alternative).pvalue)
    ci = _newcombe(t, treatment.runs, c, control.runs)
    return TestResult(metric, name, p, diff, ci, threshold, role, p < threshold)


MEAN_RUN: Final = "mean run"
P95_RUN: Final = "p95 run"
FIRST_ATTEMPT: Final = "first attempt"
BOOTSTRAP_DRAWS: Final = 4000
"""Enough for the harm check's 0.001 (the smallest p-value is 1 / 4001)."""


def first_attempt_test(
    control: Arm, treatment: Arm, margin: float, threshold: float, role: str
) -> TestResult:
    """Welch's t on log-durations of first attempts: is the service more than ``margin`` slower
    under a retry change? Only the first attempt: later ones are the runs a change selects (one
    more attempt rescues the slow runs, which is not harm)."""
    from scipy import stats

    name = "Welch t on log-durations of first attempts"
    a = [math.log(max(x, 1.0)) for x in treatment.firsts]
    b = [math.log(max(x, 1.0)) for x in control.firsts]
    if len(a) < 2 or len(b) < 2:
        return TestResult(FIRST_ATTEMPT, name, None, None, None, threshold, role, False)
    shift = math.log1p(margin)
    result = stats.ttest_ind([x - shift for x in a], b, equal_var=False, alternative="greater")
    low, high = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    p = float(result.pvalue) if math.isfinite(result.pvalue) else 1.0
    return TestResult(
        FIRST_ATTEMPT,
        name,
        p,
        math.exp(sum(a) / len(a) - sum(b) / len(b)),
        (math.exp(float(low)), math.exp(float(high))) if math.isfinite(low) else None,
        threshold,
        role,
        p < threshold,
    )


def bootstrap_ratio_test(
    metric: str,
    control: list[float],
    treatment: list[float],
    margin: float,
    threshold: float,
    role: str,
) -> TestResult:
    """Is the treatment's mean (``MEAN_RUN``) or 95th percentile (``P95_RUN``) run more than
    ``margin`` above the control's? A run-level bootstrap of the ratio: unlike geometric means,
    it sees a timeout raised onto calls that hang (a few runs much longer)."""
    import numpy as np

    name = f"bootstrap ratio of the {metric}"
    if len(control) < 2 or len(treatment) < 2:
        return TestResult(metric, name, None, None, None, threshold, role, False)
    c, t = np.asarray(control, dtype=float), np.asarray(treatment, dtype=float)
    rng = np.random.default_rng(len(c) * 1_000_003 + len(t))  # the same data, the same answer

    def stat(x: Any) -> Any:
        return x.mean(axis=-1) if metric == MEAN_RUN else np.percentile(x, 95, axis=-1)

    ratios = []
    chunk = max(1, 2_000_000 // (len(c) + len(t)))
    for done in range(0, BOOTSTRAP_DRAWS, chunk):
        n = min(chunk, BOOTSTRAP_DRAWS - done)
        num = stat(t[rng.integers(0, len(t), (n, len(t)))])
        den = stat(c[rng.integers(0, len(c), (n, len(c)))])
        ratios.append(num / np.maximum(den, 1e-9))
    ratio = np.concatenate(ratios)
    observed = float(stat(t) / max(float(stat(c)), 1e-9))
    p = (int(np.count_nonzero(ratio <= 1 + margin)) + 1) / (len(ratio) + 1)
    low, high = np.percentile(ratio, [2.5, 97.5])
    return TestResult(
        metric, name, p, observed, (float(low), float(high)), threshold, role, p < threshold
    )


def _newcombe(
    x1: int, n1: int, x2: int, n2: int, z: float = 1.959964
) -> tuple[float, float] | None:
    """95 % CI of p1 - p2 from Wilson score intervals (Newcombe's hybrid method)."""
    if not n1 or not n2:
        return None

    def wilson(x: int, n: int) -> tuple[float, float]:
        p = x / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return centre - half, centre + half

    (l1, u1), (l2, u2) = wilson(x1, n1), wilson(x2, n2)
    p1, p2 = x1 / n1, x2 / n2
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt(
        (u1 - p1) ** 2 + (p2 - l2) ** 2
    )


# --- designs: what a unit of randomization is ------------------------------------------------


class Design(Protocol):
    """The runs of an experiment and the tests its way of splitting them calls for."""

    @property
    def control(self) -> Arm: ...

    @property
    def treatment(self) -> Arm: ...

    def rate_test(self, metric: str, alternative: str, threshold: float, role: str) -> TestResult:
        """Is the treatment's ``metric`` rate lower (``less``) or higher (``greater``)?"""
        ...

    def duration_tests(
        self, param: str, margin: float, threshold: float, role: str
    ) -> list[TestResult]:
        """Is the treatment more than ``margin`` slower, as a change of ``param`` can be?"""
        ...


@dataclass(frozen=True, slots=True)
class Independent:
    """Runs dealt into the arms one at a time (A/B, permuted blocks of ten runs): every run is a
    unit, and runs of both arms share every hour, so exact tests on runs are right."""

    control: Arm
    treatment: Arm

    def rate_test(self, metric: str, alternative: str, threshold: float, role: str) -> TestResult:
        return proportion_test(metric, self.control, self.treatment, alternative, threshold, role)

    def duration_tests(
        self, param: str, margin: float, threshold: float, role: str
    ) -> list[TestResult]:
        """A timeout change: the mean and the p95 run (it admits slower successes on purpose;
        calls that hang longer show in both). A retry change: first attempts."""
        if param == "timeout":
            c, t = self.control.durations, self.treatment.durations
            return [
                bootstrap_ratio_test(m, c, t, margin, threshold, role) for m in (MEAN_RUN, P95_RUN)
            ]
        return [first_attempt_test(self.control, self.treatment, margin, threshold, role)]


# --- verdict and harm check -----------------------------------------------------------------


def judge(
    param: str, design: Design, look: int, settings: VerdictSettings, mode: str = "ab"
) -> Verdict:
    """commit, rollback or extend, with the evidence. ``look`` counts from 1; ``mode`` (``ab``,
    ``switchback``, ``sequential``) says what an empty arm can mean."""
    control, treatment = design.control, design.treatment
    final = look >= 1 + settings.max_extensions
    alpha = settings.alpha_at(look)

    def verdict(decision: Decision, reason: str, tests: list[TestResult], spent: float) -> Verdict:
        if decision == "extend" and final:
            decision = "rollback"
            reason += (
                f"; no extension left ({settings.max_extensions} used): the evidence never arrived"
            )
        return Verdict(decision, reason, control, treatment, tests, look, spent)

    if not control.runs or not treatment.runs:
        return verdict(
            "extend",
            f"error of the experiment: {_empty(control, treatment, mode)}"
            "; not evidence against the change",
            [],
            0.0,
        )
    if min(control.runs, treatment.runs) < settings.min_runs:
        return verdict(
            "extend",
            f"too few runs to decide: {control.runs} control and {treatment.runs} treatment"
            f" (at least {settings.min_runs} each)",
            [],
            0.0,
        )
    metric, words = PRIMARY[param]
    guards = [
        design.rate_test("final_failure_rate", "greater", settings.guard_alpha, "guardrail"),
        *design.duration_tests(param, settings.duration_margin, settings.guard_alpha, "guardrail"),
    ]
    broken = [g for g in guards if g.passed]  # "passed" the test for harm: the guardrail is broken
    primary = design.rate_test(metric, "less", alpha, "primary")
    tests = [primary, *guards]
    c_rate, t_rate = control.rate(metric), treatment.rate(metric)
    change = f"{words}: {c_rate:.1%} control vs {t_rate:.1%} treatment"
    if broken:
        what = "; ".join(_guard_words(g, settings) for g in broken)
        return verdict("rollback", f"guardrail broken: {what} ({change})", tests, alpha)
    improvement = (c_rate - t_rate) / c_rate if c_rate else 0.0
    if primary.passed and improvement >= settings.min_improvement:
        return verdict(
            "commit",
            f"{change}, {improvement:.0%} fewer (p = {primary.p_value:.4f} < {alpha:.4f},"
            f" {primary.test}); no guardrail broken",
            tests,
            alpha,
        )
    if primary.passed:
        why = (
            f"{change}: significant but only {improvement:.0%} fewer"
            f" (at least {settings.min_improvement:.0%} needed)"
        )
    else:
        why = (
            f"{change}: not a significant improvement yet"
            f" (p = {primary.p_value:.4f}, needs < {alpha:.4f})"
        )
    return verdict("extend", why, tests, alpha)


def _empty(control: Arm, treatment: Arm, mode: str) -> str:
    empty = "treatment" if not treatment.runs else "control"
    if not control.runs and not treatment.runs:
        return "neither arm has runs (has the cron stopped running, or changed its name?)"
    if mode == "switchback":
        return (
            f"no run counted in the {empty} hours (do the flips fail? runs right after a flip"
            " are not counted)"
        )
    if mode == "sequential" and not treatment.runs:
        return "no runs since the switch (has the cron stopped running?)"
    if mode == "sequential":
        return "no runs in the stretch before the switch (does the log reach back that far?)"
    return (
        f"the {empty} arm has no runs (does Level 1 read the params file and record"
        " params/experiment in its log lines?)"
    )


def _guard_words(test: TestResult, settings: VerdictSettings) -> str:
    if test.metric in (MEAN_RUN, P95_RUN, FIRST_ATTEMPT):
        what = {MEAN_RUN: "the mean run", P95_RUN: "the p95 run"}.get(test.metric, "first attempts")
        return (
            f"{what} {((test.effect or 1) - 1):.0%} slower"
            f" (more than {settings.duration_margin:.0%}, p = {test.p_value:.4f})"
        )
    return f"final failures up by {(test.effect or 0):.1%} (p = {test.p_value:.4f})"


@dataclass(frozen=True, slots=True)
class Harm:
    stop: bool
    reason: str
    tests: list[TestResult]


def harm_check(design: Design, settings: VerdictSettings, param: str) -> Harm:
    """Run hourly during an experiment: ``stop`` when the treatment is already clearly worse."""
    if min(design.control.runs, design.treatment.runs) < settings.harm_min_runs:
        return Harm(False, "too few runs to judge harm yet", [])
    tests = [
        design.rate_test("final_failure_rate", "greater", settings.harm_alpha, "harm"),
        *design.duration_tests(param, settings.duration_margin, settings.harm_alpha, "harm"),
    ]
    harmful = [t for t in tests if t.passed]
    if harmful:
        return Harm(True, "harm: " + "; ".join(_guard_words(t, settings) for t in harmful), tests)
    return Harm(False, "no harm detected", tests)


# --- arms from log entries ------------------------------------------------------------------


def arm_of(
    entry: Entry,
    param: str,
    control: int,
    treatment: int,
    experiment_id: str | None = None,
) -> str | None:
    """Which arm of an A/B experiment a run of its cron belongs to, or None (neither): the
    run's ``experiment`` tag (``arm``, with a matching ``id`` when one is given), else the value
    of ``params[param]`` it recorded."""
    tag = entry.experiment
    if (
        tag is not None
        and tag.arm in ("control", "treatment")
        and (experiment_id is None or tag.id is None or str(tag.id) == experiment_id)
    ):
        return tag.arm
    if entry.params is not None:
        value = entry.params.get(param)
        if isinstance(value, int | float) and not isinstance(value, bool):
            if value == treatment:
                return "treatment"
            if value == control:
                return "control"
    return None


@dataclass(slots=True)
class Split:
    """The runs of an A/B experiment, told apart offline (``tunerd verify``)."""

    control: Arm
    treatment: Arm
    unassigned: int
    """Runs of the cron that belong to neither arm (another experiment, outside the windows)."""
    experiment: str | None
    """The experiment whose tagged runs were counted."""
    notes: list[str]


def between(
    runs: list[tuple[float, Entry]], since: float | None, until: float | None
) -> list[tuple[float, Entry]]:
    """The runs (time, entry) from ``since`` to ``until`` (either open)."""
    return [
        (at, e)
        for at, e in runs
        if (since is None or at >= since) and (until is None or at <= until)
    ]


def split_runs(
    runs: list[tuple[float, Entry]],
    param: str,
    control: int,
    treatment: int,
    experiment: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> Split:
    """A cron's runs (time, entry) into the arms of one experiment, counting nothing else.

    Runs tagged with an experiment count by their tag, only those of ``experiment`` (default:
    the latest one tagged); without any tag, by the value of ``params[param]`` they recorded,
    which runs from before the experiment carry as well, hence ``since``. (One switch in time:
    ``sequential.time_split``; a schedule of values: ``switchback.gather``.)
    """
    inside = between(runs, since, until)
    split = Split(Arm(), Arm(), len(runs) - len(inside), None, [])
    tagged = [
        (at, e)
        for at, e in inside
        if e.experiment is not None and e.experiment.arm in ("control", "treatment")
    ]
    if tagged:
        if experiment is None:
            latest = max(tagged, key=lambda run: run[0])[1].experiment
            experiment = None if latest is None or latest.id is None else str(latest.id)
        split.experiment = experiment
        for _, entry in inside:
            tag = entry.experiment
            if (
                tag is not None
                and tag.arm in ("control", "treatment")
                and (experiment is None or str(tag.id) == experiment)
            ):
                (split.control if tag.arm == "control" else split.treatment).add(entry)
            else:
                split.unassigned += 1
        return split
    if experiment is not None:
        split.notes.append(f"no run carries an experiment tag: --experiment {experiment} ignored")
    if since is None:
        split.notes.append(
            f"runs are told apart by the {param} they recorded, and runs from before the"
            " experiment recorded the control value too: give --since (the experiment's start)"
        )
    for _, entry in inside:
        arm = arm_of(entry, param, control, treatment)
        if arm is None:
            split.unassigned += 1
        else:
            (split.control if arm == "control" else split.treatment).add(entry)
    return split


# --- power before starting ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    period: float
    """Seconds of verification to plan for."""
    runs_per_arm: int
    """Expected runs per arm in that period."""
    detectable: float | None
    """Smallest drop of the primary rate (absolute) detectable with 80 % power at look 1."""
    note: str
    verifiable: bool = True
    """Within ``max_period`` enough runs arrive to see the primary rate halved: otherwise the
    experiment is not started automatically (a person decides)."""


EXPECTED_DROP: Final = 0.5
"""The effect an experiment is planned to see: the primary rate halved (the seed's expectation
for final failures, "-50 %"). Smaller effects may still be seen; this sets how long to look."""


def plan(
    baseline: float,
    runs_per_hour: float,
    verify_after: float,
    split: float,
    settings: VerdictSettings,
    max_period: float = 14 * 86400,
) -> Plan:
    """How long to verify, and what the experiment can detect (the canary tools' lesson: power
    before starting). The period is ``verify_after``, or longer, up to ``max_period``, when the
    cron runs too rarely for ``min_runs`` per arm or for a halving of its primary rate
    (``baseline``) to be seen with 80 % power at the first look; the note says so. The hourly
    harm check guards the longer period."""
    rate = runs_per_hour / 3600 * min(split, 1 - split) if split < 1 else runs_per_hour / 3600
    if rate <= 0:
        return Plan(verify_after, 0, None, "the cron's run rate is unknown")
    z = _power_z(settings)
    needed = 2 * settings.min_runs  # some margin over the minimum, so look 1 can decide
    why = f"{needed} runs per arm"
    if 0 < baseline < 1:
        effect = EXPECTED_DROP * baseline
        for_effect = math.ceil(z * z * 2 * baseline * (1 - baseline) / effect**2)
        if for_effect > needed:
            needed = for_effect
            why = f"about {needed} runs per arm to see its {baseline:.1%} halved with 80 % power"
    period = verify_after
    note = ""
    verifiable = True
    if rate * period < needed:
        period = min(max_period, needed / rate)
        note = (
            f"this cron runs {runs_per_hour:.2g} times an hour and needs {why}: verification"
            f" planned over {human_duration(period)} instead of {human_duration(verify_after)}"
        )
        # Every look together (the extensions last as long) must give a halving an even
        # chance at least; the first alone must reach the minimum of runs.
        looks = 1 + settings.max_extensions
        even_chance = needed * (_alpha_z(settings) / z) ** 2
        if rate * period < settings.min_runs:
            note += f" (still under {settings.min_runs} runs per arm: it may never be verified)"
            verifiable = False
        elif rate * period * looks < even_chance:
            note += (
                f" (even with {settings.max_extensions} extensions as long, a halving would be"
                " seen less than half the time)"
            )
            verifiable = False
        elif rate * period < needed:
            note += " (a halving may take the extensions to be seen)"
    n = int(rate * period)
    detectable = None
    if n >= 2 and 0 < baseline < 1:
        detectable = min(baseline, z * math.sqrt(2 * baseline * (1 - baseline) / n))
    return Plan(period, n, detectable, note, verifiable)


def _alpha_z(settings: VerdictSettings) -> float:
    """z for a one-sided test at the first look's alpha (50 % power)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - settings.alpha_at(1))


def _power_z(settings: VerdictSettings) -> float:
    """z for a one-sided test at the first look's alpha, plus z for 80 % power."""
    from statistics import NormalDist

    return _alpha_z(settings) + NormalDist().inv_cdf(0.8)
