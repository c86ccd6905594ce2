"""``tunerd verify``: the verdict on an experiment read from a log, by its design (pure).

Three ways a log tells the arms apart, each judged as the design calls for:

- **tags or recorded params** (A/B: Level 1 split the runs): runs are the units
  (``verdict.split_runs``, exact tests);
- **a schedule of values** (``--schedule``: the script took turns, as in a switchback
  experiment): each run belongs to the value in force when it started, hour blocks are the units
  (``switchback``, a randomization test);
- **one switch** (``--switch-at``): equal windows, clock hours as units, and a placebo test
  (``sequential``): a difference where nothing changed means no decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tunerd.records import Entry
from tunerd.sequential import placebo_differs, time_split
from tunerd.switchback import Clustered, gather, on_grid, run_start
from tunerd.timeparse import human_duration
from tunerd.verdict import (
    PRIMARY,
    Design,
    Independent,
    Verdict,
    VerdictSettings,
    between,
    judge,
    split_runs,
)


@dataclass(slots=True)
class Offline:
    verdict: Verdict
    experiment: str | None = None
    windows: dict[str, tuple[float, float]] | None = None
    unassigned: int = 0
    notes: list[str] = field(default_factory=list)


def verify(
    runs: list[tuple[float, Entry]],
    param: str,
    control: int,
    treatment: int,
    look: int,
    settings: VerdictSettings,
    experiment: str | None = None,
    since: float | None = None,
    until: float | None = None,
    switch_at: float | None = None,
    schedule: list[tuple[float, int]] | None = None,
) -> Offline:
    """The runs (end time, entry) of one cron, judged. ``schedule``: (time, value) of every
    change of value, in order."""
    started = [(run_start(entry, ended), entry) for ended, entry in runs]
    if schedule is not None:
        inside = between(started, since, until)
        units = gather(inside, schedule, control, treatment, None)
        design: Design = Clustered(units)
        verdict = judge(param, design, look, settings, "switchback")
        notes = [f"{n} runs not counted: {why}" for why, n in sorted(units.left_out.items())]
        if not on_grid(schedule):
            notes.append(
                "the changes are not on tunerd's hour grid: each stretch between two changes is"
                " a block, and two neighbouring stretches a unit of the randomization test"
            )
        unassigned = len(runs) - len(inside) + sum(units.left_out.values())
        return Offline(verdict, unassigned=unassigned, notes=notes)
    if switch_at is not None:
        split = time_split(started, switch_at, since, until)
        verdict = judge(param, split.design, look, settings, "sequential")
        placebo = placebo_differs(split.placebo, PRIMARY[param][0])
        first = min((at for at, _ in started), default=None)
        control_from = split.windows["control"][0]
        if first is not None and first > control_from + 3600:
            split.notes.append(
                f"the log begins {human_duration(first - control_from)} after the control"
                " window does: the control has fewer hours than the treatment"
            )
        if placebo is None and verdict.decision == "commit":
            verdict = replace(
                verdict,
                decision="extend",
                reason="no decision: too few runs before the control window for the placebo"
                " test, so a change of the world cannot be ruled out (one switch is only"
                f" trusted with one); {verdict.reason}",
            )
        if placebo is not None:
            verdict = replace(verdict, tests=[*verdict.tests, placebo])
            if placebo.passed and verdict.decision != "rollback":
                verdict = replace(
                    verdict,
                    decision="extend",
                    reason=f"no decision: the two windows before the switch already differ"
                    f" (placebo p = {placebo.p_value:.4f}): the world changed on its own;"
                    f" {verdict.reason}",
                )
        return Offline(verdict, None, split.windows, split.unassigned, split.notes)
    ab = split_runs(runs, param, control, treatment, experiment, since, until)
    verdict = judge(param, Independent(ab.control, ab.treatment), look, settings)
    return Offline(verdict, ab.experiment, None, ab.unassigned, ab.notes)
