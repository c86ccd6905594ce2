"""Before and after one switch, judged honestly (pure): ``tunerd verify --switch-at``.

One switch cannot tell a change of value from a change of the world: a weekend, an outage or an
upstream fix on either side looks like an effect (issue 11: 45-50 wrong commits in 50). So this
design is only for looking back at a log, never for an automatic commit (the daemon takes turns
instead: ``switchback``), and it says when it cannot be trusted:

- **equal windows**: the treatment from the switch to the end, the control as long just before;
- **clock hours are the units**: runs within an hour share their world (an outage, a slow
  upstream), so each test compares hourly figures (Welch's t), not runs as if independent;
- **a placebo test**: the control window against the equally long window before it, where
  nothing changed. If those two already differ on the primary metric (two-sided, 5 %), the world
  moved on its own and no decision is taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

from tunerd.records import Entry
from tunerd.verdict import FIRST_ATTEMPT, MEAN_RUN, P95_RUN, Arm, TestResult

HOUR: Final = 3600.0
PLACEBO_ALPHA: Final = 0.05
PLACEBO_MIN_RUNS: Final = 20
NAME: Final = "Welch t over clock hours"


@dataclass(slots=True)
class TimeSplit:
    """Runs before and after a switch, hour by hour: a ``verdict.Design``."""

    before: dict[int, Arm] = field(default_factory=dict)
    after: dict[int, Arm] = field(default_factory=dict)

    def add(self, start: float, entry: Entry, after: bool) -> None:
        hours = self.after if after else self.before
        hour = math.floor(start / HOUR)
        arm = hours.get(hour)
        if arm is None:
            arm = hours[hour] = Arm()
        arm.add(entry)

    @property
    def control(self) -> Arm:
        return _pooled(self.before)

    @property
    def treatment(self) -> Arm:
        return _pooled(self.after)

    def rate_test(self, metric: str, alternative: str, threshold: float, role: str) -> TestResult:
        c = [a.rate(metric) for a in self.before.values() if a.runs]
        t = [a.rate(metric) for a in self.after.values() if a.runs]
        effect = self.treatment.rate(metric) - self.control.rate(metric)
        return _welch(metric, c, t, alternative, threshold, role, effect)

    def duration_tests(
        self, param: str, margin: float, threshold: float, role: str
    ) -> list[TestResult]:
        shrink = 1 / (1 + margin)

        def hourly(pick: str, stat: str) -> tuple[list[float], list[float]]:
            def value(a: Arm, scale: float) -> float | None:
                xs: list[float] = getattr(a, pick)
                if not xs:
                    return None
                if stat == "log":
                    return sum(math.log(max(x, 1.0) * scale) for x in xs) / len(xs)
                ordered = sorted(x * scale for x in xs)
                if stat == "p95":
                    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
                return sum(ordered) / len(ordered)

            before = [v for a in self.before.values() if (v := value(a, 1.0)) is not None]
            after = [v for a in self.after.values() if (v := value(a, shrink)) is not None]
            return before, after

        if param != "timeout":
            c, t = hourly("firsts", "log")
            return [_welch(FIRST_ATTEMPT, c, t, "greater", threshold, role)]
        out = []
        for metric, stat in ((MEAN_RUN, "mean"), (P95_RUN, "p95")):
            c, t = hourly("durations", stat)
            out.append(_welch(metric, c, t, "greater", threshold, role))
        return out


def _pooled(hours: dict[int, Arm]) -> Arm:
    total = Arm()
    for arm in hours.values():
        total.merge(arm)
    return total


def _welch(
    metric: str,
    control: list[float],
    treatment: list[float],
    alternative: str,
    threshold: float,
    role: str,
    effect: float | None = None,
) -> TestResult:
    """Welch's t on hourly figures (the treatment's already shrunk by any margin)."""
    from scipy import stats

    if len(control) < 2 or len(treatment) < 2:
        return TestResult(metric, NAME, None, None, None, threshold, role, False)
    result = stats.ttest_ind(treatment, control, equal_var=False, alternative=alternative)
    p = float(result.pvalue) if math.isfinite(result.pvalue) else 1.0
    if effect is None:
        effect = (sum(treatment) / len(treatment)) / max(sum(control) / len(control), 1e-9)
    return TestResult(metric, NAME, p, effect, None, threshold, role, p < threshold)


@dataclass(slots=True)
class Switch:
    """One switch, split for ``verify``: the design, its placebo, and what was left out."""

    design: TimeSplit
    placebo: TimeSplit
    windows: dict[str, tuple[float, float]]
    unassigned: int = 0
    notes: list[str] = field(default_factory=list)


def time_split(
    runs: list[tuple[float, Entry]],
    switch_at: float,
    since: float | None = None,
    until: float | None = None,
) -> Switch:
    """Runs (start time, entry) into the windows around ``switch_at``: the treatment to ``until``
    (or the last run), the control as long before the switch (cut at ``since``), and the
    placebo's earlier window as long again."""
    starts = [at for at, _ in runs if until is None or at <= until]
    end = until if until is not None else max(starts, default=switch_at)
    length = max(end - switch_at, 0.0)
    start = switch_at - length
    notes = []
    if since is not None and since > start:
        start = since
        notes.append("the control window was cut at --since")
    earlier = start - (switch_at - start)
    split = Switch(
        TimeSplit(),
        TimeSplit(),
        {"placebo": (earlier, start), "control": (start, switch_at), "treatment": (switch_at, end)},
        notes=notes,
    )
    for at, entry in runs:
        if switch_at <= at <= end:
            split.design.add(at, entry, after=True)
        elif start <= at < switch_at:
            split.design.add(at, entry, after=False)
            split.placebo.add(at, entry, after=True)
        elif earlier <= at < start and (since is None or at >= since):
            split.placebo.add(at, entry, after=False)
        else:
            split.unassigned += 1
    return split


def placebo_differs(placebo: TimeSplit, metric: str) -> TestResult | None:
    """The primary metric of the two windows before the switch, two-sided: a difference there
    is the world's own (None: too few runs or hours before the control window to tell)."""
    if placebo.control.runs < PLACEBO_MIN_RUNS or len(placebo.before) < 3:
        return None
    result = placebo.rate_test(metric, "two-sided", PLACEBO_ALPHA, "placebo")
    return result if result.p_value is not None else None
