"""Switchback experiments: a target that cannot split traffic takes turns (pure).

A wrapper script holds one value for every run, so comparing the weeks before and after a change
compares two worlds as much as two values: a weekend, an outage or an upstream fix on one side
decides the verdict (issue 11 measured 45-50 wrong commits in 50 under such drift). Instead,
tunerd itself flips the script between the control and the treatment value, hour by hour, in an
order drawn at random but balanced in time, and compares the hours.

**The design.** Time is cut into blocks of one hour, starting ``OFFSET`` past each hour (2.5 min:
clear of crons at round minutes, so no run starts as the file is rewritten). Block ``k`` belongs
to day ``k // 24`` (UTC) at hour ``k % 24``. Blocks are grouped in **units** of two neighbouring
hours on two neighbouring days (day pair ``d // 2``, hour pair ``h // 2``): one fair coin per
unit, and

    arm(day, hour) = coin XOR (day mod 2) XOR (hour mod 2)

so each pair of neighbouring hours (0-1, 2-3, ...) holds one hour of each arm, each day (weekends
included) is half and half, and each hour of the day takes the other arm on the other day of its
pair of days. Neighbouring units may share an arm: the balance is within a unit, which is what the
randomization test permutes.

**The runs.** Each run belongs to the value in force when it started (``timestamp -
totalDuration``), read from the flips tunerd actually applied; runs that started within
``CARRYOVER`` of a flip are left out (what lingers from the other value: a throttled API, a cache);
a run whose value is not the one its block was drawn for (a flip applied late: the daemon was down)
is left out too, so the units keep the design's balance.

**The test.** A randomization test: under no effect, the coins could have fallen any other way,
each unit's blocks swapping arms together. The p-value is the share of ``PERMUTATIONS`` random
coin draws whose statistic is at least as extreme as the observed one. It is exact under the
design whatever the world does (drift, outages, runs that are not independent within an hour:
the unit is the block, never the run), and ``verify --schedule`` takes the same path.
"""

from __future__ import annotations

import bisect
import functools
import math
import random
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Final

from tunerd.inputs.gateway import REVISION
from tunerd.level1 import Arm as Side
from tunerd.records import Entry
from tunerd.verdict import (
    FIRST_ATTEMPT,
    MEAN_RUN,
    P95_RUN,
    Arm,
    TestResult,
)

BLOCK: Final = 3600.0
OFFSET: Final = 150.0
CARRYOVER: Final = 120.0
"""Runs that start this soon after a flip are not counted (a minute-by-minute cron loses two)."""
PERMUTATIONS: Final = 4000
"""Coin draws of the randomization test (the smallest p-value is 1 / 4001)."""


def block_of(t: float) -> int:
    return math.floor((t - OFFSET) / BLOCK)


def block_start(block: int) -> float:
    return block * BLOCK + OFFSET


def unit_of(block: int) -> tuple[int, int]:
    day, hour = divmod(block, 24)
    return day // 2, hour // 2


def _parity(block: int) -> int:
    day, hour = divmod(block, 24)
    return (day ^ hour) & 1


@functools.lru_cache(maxsize=1 << 16)
def coin(seed: str, unit: tuple[int, int]) -> int:
    """The design's coin for a unit (remembered: every run of the unit asks for it)."""
    return random.Random(f"{seed}:{unit[0]}:{unit[1]}").getrandbits(1)


def arm_at(seed: str, t: float) -> Side:
    """The arm the design draws for the block holding ``t``."""
    block = block_of(t)
    return "treatment" if coin(seed, unit_of(block)) ^ _parity(block) else "control"


def flips(seed: str, start: float, until: float) -> list[tuple[float, Side]]:
    """(time, arm) of every change of arm in ``(start, until]``, the arm at ``start`` first."""
    out: list[tuple[float, Side]] = [(start, arm_at(seed, start))]
    block = block_of(start) + 1
    while block_start(block) <= until:
        arm = arm_at(seed, block_start(block))
        if arm != out[-1][1]:
            out.append((block_start(block), arm))
        block += 1
    return out


def next_flip(seed: str, after: float, current: Side) -> tuple[float, Side]:
    """The first block boundary after ``after`` whose arm differs from ``current``."""
    block = block_of(after) + 1
    while True:
        arm = arm_at(seed, block_start(block))
        if arm != current:
            return block_start(block), arm
        block += 1


# --- the runs of a switchback experiment -------------------------------------------------------


@dataclass(slots=True)
class Units:
    """The counted runs by unit, hour parity and arm.

    A unit whose two groups of hours took opposite arms is *permutable*: its coin could have
    fallen the other way. Any other unit (the experiment began or ended inside it; an offline
    schedule not drawn on this grid) keeps its arms in every draw: a conditional randomization
    test, still exact.
    """

    seed: str
    cells: dict[tuple[int, int], dict[tuple[int, Side], Arm]] = field(default_factory=dict)
    left_out: dict[str, int] = field(default_factory=dict)
    """Runs not counted, by why: ``carry-over`` (just after a flip), ``off plan`` (a value other
    than its block's: a late flip), ``other value`` (neither arm's), ``before`` (before the first
    value known)."""

    def add(self, unit: tuple[int, int], parity: int, entry: Entry, side: Side) -> None:
        cells = self.cells.setdefault(unit, {})
        arm = cells.get((parity, side))
        if arm is None:
            arm = cells[(parity, side)] = Arm()
        arm.add(entry)

    def leave_out(self, why: str) -> None:
        self.left_out[why] = self.left_out.get(why, 0) + 1

    def merge(self, other: Units) -> None:
        """Add the runs of ``other`` (another stretch of the same experiment)."""
        for unit, cells in other.cells.items():
            mine = self.cells.setdefault(unit, {})
            for key, arm in cells.items():
                if key not in mine:
                    mine[key] = Arm()
                mine[key].merge(arm)  # copies: ``other`` may be kept and merged again
        for why, n in other.left_out.items():
            self.left_out[why] = self.left_out.get(why, 0) + n

    def split(self) -> tuple[list[tuple[Arm, Arm, int]], Arm, Arm]:
        """(permutable units as (parity-0 arm, parity-1 arm, observed coin), fixed control,
        fixed treatment): the coin is 1 when parity 0 took the treatment."""
        permutable, control, treatment = [], Arm(), Arm()
        for cells in self.cells.values():
            sides = {parity: side for parity, side in cells}
            if len(cells) == 2 and set(sides) == {0, 1} and sides[0] != sides[1]:
                permutable.append(
                    (cells[(0, sides[0])], cells[(1, sides[1])], int(sides[0] == "treatment"))
                )
                continue
            for (_, side), arm in cells.items():
                (treatment if side == "treatment" else control).merge(arm)
        return permutable, control, treatment


def value_at(timeline: list[tuple[float, int]], t: float) -> tuple[float, int] | None:
    """The (applied at, value) in force at ``t``: the last flip applied before it."""
    i = bisect.bisect_right(timeline, (t, math.inf))
    return timeline[i - 1] if i else None


def on_grid(timeline: list[tuple[float, int]]) -> bool:
    """Whether every change after the first falls on a block boundary of the design's grid."""
    return all(
        abs((at - OFFSET) / BLOCK - round((at - OFFSET) / BLOCK)) * BLOCK < 1
        for at, _ in timeline[1:]
    )


def gather(
    runs: list[tuple[float, Entry]],
    timeline: list[tuple[float, int]],
    control: int,
    treatment: int,
    seed: str | None,
    carryover: float = CARRYOVER,
) -> Units:
    """The runs (start time, entry) of a switchback experiment into its units. ``timeline``:
    (applied at, value) of the experiment's start and every flip (or an offline schedule's
    changes), in order. With the design's ``seed``, a run whose value is not the one its block
    was drawn for (a flip applied late) is left out.

    Units: on the design's hour grid, two hours on two days (``unit_of``). A schedule off the
    grid (an offline history of values) pairs its consecutive stretches instead: each stretch
    between two changes is a block, and two neighbours, which hold different values, a unit."""
    units = Units(seed or "schedule")
    grid = on_grid(timeline)
    starts = [at for at, _ in timeline]
    for start, entry in runs:
        held = value_at(timeline, start)
        if held is None:
            units.leave_out("before")
            continue
        side: Side | None = (
            "treatment" if held[1] == treatment else "control" if held[1] == control else None
        )
        if side is None:
            units.leave_out("other value")
        elif start - held[0] < carryover:
            units.leave_out("carry-over")
        elif seed is not None and side != arm_at(seed, start):
            units.leave_out("off plan")
        elif grid:
            block = block_of(start)
            units.add(unit_of(block), _parity(block), entry, side)
        else:
            stretch = bisect.bisect_right(starts, start) - 1
            units.add((stretch // 2, 0), stretch % 2, entry, side)
    return units


def attributed(
    runs: list[tuple[float, Entry]], timeline: list[tuple[float, int]], settled: float
) -> tuple[list[tuple[float, Entry]], int]:
    """OpenClaw's native runs (start, entry) of an experiment that ran with the value ``timeline``
    (applied at, value) held at their start, told by their ``config_revision``; and how many
    were left out.

    The gateway's revision is a hash of its own, so which value a revision stands for is
    learnt: the runs that started at least ``settled`` seconds after a change (the gateway had
    it) vote, and a revision stands for a value when all of its votes agree. A run is kept when
    its revision stands for the value of its stretch. Left out: a run that started before a
    flip reached the gateway, one whose retries ran across a flip (two revisions), one of a
    revision that never stood for one value (a person changed the job meanwhile). Runs from a
    history that keeps no revision are kept as they are (their start time decides)."""
    votes: dict[str, set[int]] = {}
    for start, entry in runs:
        revision = (entry.params or {}).get(REVISION)
        held = value_at(timeline, start)
        if isinstance(revision, str) and held is not None and start - held[0] >= settled:
            votes.setdefault(revision, set()).add(held[1])
    stands = {
        revision: next(iter(values)) for revision, values in votes.items() if len(values) == 1
    }
    kept = []
    for start, entry in runs:
        params = entry.params
        if params is None or REVISION not in params:
            kept.append((start, entry))
            continue
        held = value_at(timeline, start)
        if held is not None and stands.get(params[REVISION]) == held[1]:
            kept.append((start, entry))
    return kept, len(runs) - len(kept)


def run_start(entry: Entry, ended: float) -> float:
    """When a run started: its end less its ``totalDuration`` (the value it read then)."""
    duration = entry.duration
    return ended - (duration or 0.0) / 1000


# --- the randomization tests -------------------------------------------------------------------


@dataclass(slots=True)
class Clustered:
    """A switchback experiment's runs as a ``verdict.Design``: hour blocks are the units."""

    units: Units
    control: Arm = field(init=False)
    treatment: Arm = field(init=False)
    _permutable: list[tuple[Arm, Arm, int]] = field(init=False)
    _fixed: tuple[Arm, Arm] = field(init=False)
    _draws: Any = field(init=False, default=None)
    _anti: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._permutable, fixed_c, fixed_t = self.units.split()
        self._fixed = (fixed_c, fixed_t)
        self.control, self.treatment = Arm(), Arm()
        for even, odd, c in self._permutable:
            self.treatment.merge(even if c else odd)
            self.control.merge(odd if c else even)
        self.control.merge(fixed_c)
        self.treatment.merge(fixed_t)

    def _coins(self) -> Any:
        """Coin draws, one row per draw over the permutable units, the observed draw first
        (as floats: every use multiplies them by per-unit figures)."""
        if self._draws is None:
            import numpy as np

            rng = np.random.default_rng(zlib.crc32(self.units.seed.encode()))
            n = len(self._permutable)
            draws = rng.integers(0, 2, (PERMUTATIONS, n)).astype(float)
            observed = np.array([c for _, _, c in self._permutable], dtype=float)
            self._draws = np.vstack([observed, draws])
            self._anti = 1.0 - self._draws
        return self._draws

    def _split(self, value: Any) -> tuple[Any, Any]:
        """Per draw: (treatment total, control total) of ``value(arm, treated)``, where
        ``treated`` says whether the design gave that group of runs the treatment."""
        import numpy as np

        even = np.array([value(e, c == 1) for e, _, c in self._permutable], dtype=float)
        odd = np.array([value(o, c == 0) for _, o, c in self._permutable], dtype=float)
        fixed_c, fixed_t = self._fixed
        draws, anti = self._coins(), self._anti
        treatment = draws @ even + anti @ odd + value(fixed_t, True)
        control = draws @ odd + anti @ even + value(fixed_c, False)
        return treatment, control

    def rate_test(self, metric: str, alternative: str, threshold: float, role: str) -> TestResult:
        """Each unit votes: the difference of its two groups' rates over their sum, between -1
        and 1, so an outage hour (both arms failing ten times as often) counts no more than a
        calm one; the statistic is the votes' sum with the treatment's sign. The effect reported
        is the pooled difference of rates."""
        import numpy as np

        def rate(a: Arm) -> float:
            return a.count(metric) / a.runs if a.runs else 0.0

        votes = np.array(
            [
                (rate(e) - rate(o)) / (rate(e) + rate(o)) if rate(e) + rate(o) else 0.0
                for e, o, _ in self._permutable
            ]
        )
        stats = (2 * self._coins() - 1) @ votes
        result = _result(metric, stats, alternative, threshold, role)
        effect = self.treatment.rate(metric) - self.control.rate(metric)
        return replace(result, effect=effect)

    def duration_tests(
        self, param: str, margin: float, threshold: float, role: str
    ) -> list[TestResult]:
        """As ``verdict.Independent``'s, by randomization: the treatment's durations are first
        divided by ``1 + margin`` (the slowdown allowed), so what the coins cannot explain is
        slowness beyond it."""
        import numpy as np

        shrink = 1 / (1 + margin)
        if param != "timeout":

            def logs(a: Arm, treated: bool) -> float:
                shift = math.log(shrink) if treated else 0.0
                return sum(math.log(max(x, 1.0)) + shift for x in a.firsts)

            n_t, n_c = self._split(lambda a, _: len(a.firsts))
            if min(n_t[0], n_c[0]) < 2:
                return [_untested(FIRST_ATTEMPT, threshold, role)]
            logs_t, logs_c = self._split(logs)
            ratio = np.exp(logs_t / np.maximum(n_t, 1) - logs_c / np.maximum(n_c, 1))
            return [_result(FIRST_ATTEMPT, ratio, "greater", threshold, role, 1 + margin)]
        n_t, n_c = self._split(lambda a, _: len(a.durations))
        if min(n_t[0], n_c[0]) < 2:
            return [_untested(MEAN_RUN, threshold, role), _untested(P95_RUN, threshold, role)]
        sums_t, sums_c = self._split(
            lambda a, treated: sum(a.durations) * (shrink if treated else 1.0)
        )
        mean = (sums_t / np.maximum(n_t, 1)) / np.maximum(sums_c / np.maximum(n_c, 1), 1e-9)
        return [
            _result(MEAN_RUN, mean, "greater", threshold, role, 1 + margin),
            _result(P95_RUN, self._p95_ratios(shrink), "greater", threshold, role, 1 + margin),
        ]

    def _p95_ratios(self, shrink: float) -> Any:
        """The p95 run's ratio (nearest rank) under each draw, all draws at once: the runs are
        sorted once, and each draw's treated runs are found along that order by a running
        count."""
        import numpy as np

        def durations(a: Arm, treated: bool) -> Any:
            return np.asarray(a.durations, dtype=float) * (shrink if treated else 1.0)

        values = [
            durations(arm, treated)
            for e, o, c in self._permutable
            for arm, treated in ((e, c == 1), (o, c == 0))
        ]
        fixed_c, fixed_t = self._fixed
        values += [durations(fixed_t, True), durations(fixed_c, False)]
        sizes = [len(v) for v in values]
        every = np.concatenate(values)
        order = np.argsort(every, kind="stable")
        ordered = every[order]
        owner = np.repeat(np.arange(len(values)), sizes)[order]
        draws = self._coins()[: 1 + PERMUTATIONS // 4].astype(np.int64)
        # per draw, per group: treated? (group 2u is unit u's parity 0, the treatment when the
        # coin says 1; the two fixed groups last)
        groups = np.concatenate(
            [
                np.stack([draws, 1 - draws], axis=2).reshape(len(draws), -1),
                np.tile([1, 0], (len(draws), 1)),
            ],
            axis=1,
        )
        treated = groups[:, owner].astype(bool)

        def p95(mask: Any) -> Any:
            count = np.cumsum(mask, axis=1)
            rank = np.maximum(np.ceil(0.95 * count[:, -1]), 1)[:, None]
            return ordered[np.argmax(count >= rank, axis=1)]

        return p95(treated) / np.maximum(p95(~treated), 1e-9)


NAME: Final = "randomization test over hour blocks"


def _untested(metric: str, threshold: float, role: str) -> TestResult:
    return TestResult(metric, NAME, None, None, None, threshold, role, False)


def _result(
    metric: str,
    stats: Any,
    alternative: str,
    threshold: float,
    role: str,
    scale: float = 1.0,
) -> TestResult:
    """``stats[0]`` is the design's own statistic, the rest its randomization distribution; the
    effect reported is ``stats[0] * scale`` (a ratio measured on margin-shrunk data)."""
    import numpy as np

    observed = float(stats[0])
    others = stats[1:]
    if alternative == "less":
        extreme = np.count_nonzero(others <= observed + 1e-12)
    else:
        extreme = np.count_nonzero(others >= observed - 1e-12)
    p = (int(extreme) + 1) / (len(others) + 1)
    return TestResult(metric, NAME, p, observed * scale, None, threshold, role, p < threshold)
