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
from tunerd.switchback import Clustered, gather, run_start
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
        notes = [f"{units.left_out} runs not counted (carry-over after a change, other values)"]
        return Offline(verdict, unassigned=len(runs) - len(inside) + units.left_out, notes=notes)
    if switch_at is not None:
        split = time_split(started, switch_at, since, until)
        verdict = judge(param, split.design, look, settings, "sequential")
        placebo = placebo_differs(split.placebo, PRIMARY[param][0])
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
