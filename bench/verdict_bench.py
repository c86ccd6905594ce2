#!/usr/bin/env python3
"""How often the verdict is wrong, on synthetic experiments whose truth is known.

usage: python bench/verdict_bench.py [--experiments 400] [--seed 1]

Each scenario generates experiments of a `maxRetries` change: per arm and per verification period,
`runs` runs whose final failures, retries and log-normal durations follow the scenario. The verdict
is taken at the verification time and again after each extension (each adds another period of
runs), exactly as the daemon does, at the default settings. The seed's own rule (commit when the
retry rate fell, or the failure rate fell, or runs are not 5 % slower and failures did not rise)
is applied to the first period's data for comparison.
"""

from __future__ import annotations

import argparse
import math
import random
import time

from tunerd.verdict import Arm, Independent, VerdictSettings, judge

SCENARIOS = {
    # name: (runs per arm and period, control (fail, retry, median ms), treatment (...), truth)
    "equal": (150, (0.07, 0.20, 1500), (0.07, 0.20, 1500), "no improvement"),
    "worse failures": (150, (0.07, 0.20, 1500), (0.15, 0.20, 1500), "worse"),
    "35% slower": (150, (0.07, 0.20, 1500), (0.07, 0.20, 2025), "worse"),
    "12% -> 2% failures": (150, (0.12, 0.30, 1500), (0.02, 0.30, 1500), "better"),
    "4 runs per arm": (4, (0.12, 0.30, 1500), (0.02, 0.30, 1500), "too little data"),
}


def period(
    rnd: random.Random, arm: Arm, runs: int, fail: float, retry: float, median: float
) -> None:
    for _ in range(runs):
        arm.runs += 1
        failed = rnd.random() < fail
        arm.failures += failed
        arm.retried += failed or rnd.random() < retry
        duration = median * rnd.lognormvariate(0, 0.3)
        arm.duration_total += duration
        arm.durations.append(duration)
        arm.firsts.append(duration)


def seed_rule(c: Arm, t: Arm) -> str:
    def change(before: float, after: float) -> float:
        if before == 0:
            return 0.0 if after == 0 else math.inf
        return (after - before) / before

    retry = change(c.retried / c.runs, t.retried / t.runs)
    fail = change(c.failures / c.runs, t.failures / t.runs)
    slower = change(c.duration_total / c.runs, t.duration_total / t.runs) * 100
    return "commit" if retry < 0 or fail < 0 or (slower < 5 and fail <= 0) else "rollback"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--experiments", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    settings = VerdictSettings()
    print(
        f"{args.experiments} experiments per scenario; alpha {settings.alpha} over "
        f"{1 + settings.max_extensions} looks, min {settings.min_runs} runs per arm\n"
    )
    print(
        f"{'scenario':<22}{'truth':<17}{'commit':>8}{'at look 1':>10}{'rollback':>9}{'looks':>7}"
        "   seed's rule commits"
    )
    start = time.perf_counter()
    for name, (runs, ctl, trt, truth) in SCENARIOS.items():
        rnd = random.Random(f"{args.seed}-{name}")
        outcome = {"commit": 0, "rollback": 0}
        looks = seed_commits = first_look_commits = 0
        never_arrived = 0
        for _ in range(args.experiments):
            control, treatment = Arm(), Arm()
            for look in range(1, settings.max_extensions + 2):
                period(rnd, control, runs, *ctl)
                period(rnd, treatment, runs, *trt)
                if look == 1:
                    seed_commits += seed_rule(control, treatment) == "commit"
                verdict = judge("maxRetries", Independent(control, treatment), look, settings)
                looks += 1
                first_look_commits += look == 1 and verdict.decision == "commit"
                if verdict.decision != "extend":
                    break
            outcome[verdict.decision] += 1
            never_arrived += "never arrived" in verdict.reason
        n = args.experiments
        extra = (
            f"  (all 'evidence never arrived': {never_arrived == n})"
            if runs < settings.min_runs
            else ""
        )
        print(
            f"{name:<22}{truth:<17}{outcome['commit'] / n:>8.1%}{first_look_commits / n:>10.1%}"
            f"{outcome['rollback'] / n:>9.1%}"
            f"{looks / n:>7.2f}   {seed_commits / n:.1%}{extra}"
        )
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
