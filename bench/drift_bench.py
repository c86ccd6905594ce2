#!/usr/bin/env python3
"""Do verdicts stay right when the world drifts? Known-truth trials, one switch against switchback.

usage: python bench/drift_bench.py [--trials 50] [--rates 5,1] [--seed 1]

Each trial is one cron and a `maxRetries` 3 -> 4 change whose effect is known: it does nothing
(`useless`), makes final failures 1.5x as likely (`harmful`) or halves them (`halves`), while the
world drifts for reasons of its own (the drifts of issue 11). Runs come every 5 minutes or every
minute; a run fails for good with probability 8 % x the drift x the effect.

Both designs are decided as the daemon decides: the verification period planned from the
cron's rate (`verdict.plan`), then up to two extensions as long, stopping at a commit or a
rollback, and at each look the same code as `tunerd verify`:

- **before** (what tunerd did before issue 11): the value switches at the start; equal windows
  before and after, runs judged as if independent (exact tests on runs), no placebo;
- **one switch** (`verify --switch-at` now): the same switch, clock hours as units, and the
  placebo test (a difference before the switch means no decision);
- **switchback** (`verify --schedule`): tunerd's own design flips the value hour by hour from
  the start; each run belongs to the value in force when it started.

It prints, per drift and rate, the wrong commits of useless and of harmful changes (target: at
most 2 %) and the power for halved failures (target: at least 80 %), side by side.
"""

from __future__ import annotations

import argparse
import random
import time
import zlib
from dataclasses import dataclass

import msgspec

from tunerd.drift import Drift, World
from tunerd.offline import verify
from tunerd.records import Attempt, Context, Entry
from tunerd.switchback import arm_at, flips
from tunerd.verdict import Arm, Independent, VerdictSettings, judge, plan

START = 1768172400.0  # Sunday 2026-01-11 23:00 UTC: a weekly cycle starts the experiment
DAY = 86400.0
BASE = 0.08
EFFECTS = {"useless": 1.0, "harmful": 1.5, "halves": 0.5}
ERROR = msgspec.Raw(b'{"type":"ECONNRESET","message":"socket hang up","retryable":true}')


def drifts(start: float) -> dict[str, tuple[list[Drift], list[Drift]]]:
    """(one switch, switchback) worlds: the same change of the world, placed where each design
    looks (before the switch for the first; inside the experiment for the second)."""

    def at(t: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

    return {
        "stationary": ([], []),
        "a day 3x worse": (
            [Drift("window", start=at(start - DAY), hours=24, factor=3.0)],
            [Drift("window", start=at(start + DAY), hours=24, factor=3.0)],
        ),
        "upstream halves its failures": (
            [Drift("step", at=at(start + 3600), factor=0.5)],
            [Drift("step", at=at(start + DAY), factor=0.5)],
        ),
        "weekends 2x worse": (
            [Drift("weekly", days=["sat", "sun"], factor=2.0)],
            [Drift("weekly", days=["sat", "sun"], factor=2.0)],
        ),
        "a 6-hour outage": (
            [Drift("window", start=at(start - 7 * 3600), hours=6, factor=10.0)],
            [Drift("window", start=at(start + DAY), hours=6, factor=10.0)],
        ),
        "30-minute outages twice a day": (
            [Drift("bursts", per_day=2, minutes=30, factor=10.0)],
            [Drift("bursts", per_day=2, minutes=30, factor=10.0)],
        ),
    }


def run(t: float, failed: bool, attempts: int, rng: random.Random) -> tuple[float, Entry]:
    durations = [800 * rng.lognormvariate(0, 0.3) for _ in range(attempts if failed else 1)]
    if failed:
        tries = [Attempt(False, d, ERROR) for d in durations]
    else:
        tries = [Attempt(True, durations[0])]
    total = sum(durations) + (sum(1000 * 2**k for k in range(attempts - 1)) if failed else 0)
    entry = Entry(
        type="failure" if failed else "success",
        context=Context(cron="c"),
        attempts=tries,
        total_duration=total,
    )
    return t + total / 1000, entry


@dataclass(slots=True)
class Trial:
    design: str
    every: float
    effect: float
    world: World
    seed: int

    def decide(self, settings: VerdictSettings) -> str:
        rng = random.Random(self.seed)
        period = plan(BASE, 3600 / self.every, DAY, 0.5, settings).period
        schedule_seed = f"bench:{self.seed}"
        looks = 1 + settings.max_extensions
        switchback = self.design == "switchback"
        before = self.design == "before"
        begin = START if switchback else START - looks * period
        end = START + looks * period
        runs: list[tuple[float, Entry]] = []
        t = begin + rng.random() * self.every
        while t < end:
            treated = (arm_at(schedule_seed, t) == "treatment") if switchback else t >= START
            factor, _ = self.world.at("c", t)
            p = min(BASE * factor * (self.effect if treated else 1.0), 1.0)
            runs.append(run(t, rng.random() < p, 4 if treated else 3, rng))
            t += self.every
        schedule = [
            (at, 4 if arm == "treatment" else 3) for at, arm in flips(schedule_seed, START, end)
        ]
        for look in range(1, looks + 1):
            now = START + look * period
            seen = [(ended, e) for ended, e in runs if ended <= now]
            if switchback:
                found = verify(seen, "maxRetries", 3, 4, look, settings, schedule=schedule)
                decision = found.verdict.decision
            elif before:
                control, treatment = Arm(), Arm()
                for ended, e in seen:
                    start = ended - (e.total_duration or 0) / 1000
                    if START - (now - START) <= start < START:
                        control.add(e)
                    elif start >= START:
                        treatment.add(e)
                verdict = judge("maxRetries", Independent(control, treatment), look, settings)
                decision = verdict.decision
            else:
                found = verify(seen, "maxRetries", 3, 4, look, settings, switch_at=START, until=now)
                decision = found.verdict.decision
            if decision != "extend":
                return decision
        return "rollback"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--rates", default="5,1", help="minutes between runs, comma-separated")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    settings = VerdictSettings()
    began = time.monotonic()
    print(
        f"{args.trials} trials per cell; maxRetries 3 -> 4; 8 % of runs fail for good, times the"
        " drift, times the effect; decided as the daemon decides (planned period, 2 extensions)\n"
    )
    header = (
        f"{'world':<31}{'every':>6}  {'before issue 11: wrong commits, power':>38}"
        f"  {'one switch now: wrong commits, power':>38}"
        f"  {'switchback: wrong commits, power':>38}"
    )
    print(header)
    print("-" * len(header))
    totals: dict[str, list[int]] = {}
    for name, (before, inside) in drifts(START).items():
        for minutes in (float(x) for x in args.rates.split(",")):
            cells: list[str] = []
            for design, world in (
                ("before", before),
                ("one switch", before),
                ("switchback", inside),
            ):
                counts: dict[str, int] = {}
                for effect_name, effect in EFFECTS.items():
                    commits = 0
                    for i in range(args.trials):
                        key = f"{args.seed}:{name}:{minutes}:{effect_name}:{i}"
                        seed = zlib.crc32(key.encode())
                        trial = Trial(design, minutes * 60, effect, World(world, seed), seed)
                        commits += trial.decide(settings) == "commit"
                    counts[effect_name] = commits
                    totals.setdefault(f"{design}:{effect_name}", []).append(commits)
                n = args.trials
                cells.append(
                    f"{counts['useless']:>3}/{n} useless {counts['harmful']:>3}/{n} harmful"
                    f" {100 * counts['halves'] / n:>4.0f} %"
                )
            print(
                f"{name:<31}{minutes:>5.0f}m  {cells[0]:>38}  {cells[1]:>38}  {cells[2]:>38}",
                flush=True,
            )
    print()
    for design in ("before", "one switch", "switchback"):
        n = args.trials * len(totals[f"{design}:useless"])
        wrong = sum(totals[f"{design}:useless"]) + sum(totals[f"{design}:harmful"])
        power = sum(totals[f"{design}:halves"]) / n
        print(
            f"{design}: wrong commits {wrong}/{2 * n} = {100 * wrong / (2 * n):.1f} % (target at"
            f" most 2 %); power {100 * power:.0f} % (target at least 80 %)"
        )
    print(f"\n({time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()
