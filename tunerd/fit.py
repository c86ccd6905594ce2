"""A scenario fitted to a real log, for ``tunerd simulate --from-log`` (pure).

Per cron, from the statistics of the whole log:

- **schedule**: the crontab line the wrapper logged in ``context.schedule``, else one run per
  the mean gap between its runs;
- **latency**: a lognormal for attempt durations. Attempts that timed out are known only to have
  lasted longer than the timeout, so the successful ones are a sample of the distribution cut at
  the timeout: with a share ``q`` of attempts timed out, the overall quantile ``u`` is their
  quantile ``u / (1 - q)``. The median and the 15.9 % quantile (one sigma below) give mu and sigma;
- **transient failures**: the share of attempts (neither rate limited nor timed out) that failed
  with an error the wrapper retries; **failures for good** (``fatal_p``): the share of the rest
  that failed with one it does not retry (a command's non-zero exit ends the run at once: fitted
  as a transient failure, it would be retried away and a 6.7 % failure rate would become 0.1 %);
- **rate limiting**: ``p`` is the share of first attempts answered with HTTP 429; the share of
  retries answered with 429 again after waiting ``backoffBase`` gives how fast it recovers
  (``p_retry = p * exp(-w / recovery)``);
- **parameters**: the ones in force (a configured script, the params file, else the last ones
  the log recorded); an unknown timeout is simulated as none when no attempt timed out, else as
  the default 15 s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final, Literal

from tunerd.analysis import KILLED_AT
from tunerd.params import SPECS, TUNABLE, InForce
from tunerd.records import ERROR_CLASSES
from tunerd.scenario import CronSpec, Latency, RateLimit, Scenario, StartParams
from tunerd.stats import LogStats, RunStats

ONE_SIGMA_BELOW: Final = 0.158655
NEVER_RECOVERS: Final = 1e12
_BACKOFFS: Final[dict[str, Literal["exponential", "linear", "fixed"]]] = {
    "linear": "linear",
    "fixed": "fixed",
}
NO_TIMEOUT: Final = 3_600_000
"""A job with no timeout, simulated: an hour (the most a scenario's timeout may be)."""
"""``recovery_ms`` of a limit that waiting a few seconds does not lift (a quota)."""


def fit_scenario(
    stats: LogStats,
    params_for: Callable[[str, dict[str, Any] | None], InForce],
    weeks: int,
    name: str,
) -> tuple[Scenario, list[str]]:
    """The scenario, and a note per cron that could not be fitted (too few runs)."""
    crons, skipped = [], []
    end = -math.inf
    scripts = 0
    for cron_name, cron in sorted(stats.crons.items()):
        run = cron.window(None, stats.bucket_seconds)
        if run.runs < 2 or not run.success_attempt.count:
            skipped.append(f"{cron_name}: {run.runs} runs, too few to fit")
            continue
        end = max(end, run.last_at)
        params = params_for(cron_name, cron.params)
        scripts += not params.splits
        crons.append(_fit_cron(cron_name, run, cron.schedule, params))
    if not crons:
        raise ValueError("no cron in the log has enough runs to fit (two, one of them a success)")
    start = datetime.fromtimestamp(math.ceil(end / 60) * 60, UTC)
    scenario = Scenario(
        cron=crons,
        weeks=weeks,
        seed=1,
        ab=not scripts,  # a script cannot split traffic
        start=start.isoformat().replace("+00:00", "Z"),
        name=name,
    )
    if scripts and scripts < len(crons):
        skipped.append(
            f"{scripts} of {len(crons)} crons cannot split their runs (their parameters are in a"
            " script, or OpenClaw's gateway runs them): every cron is simulated with switchback"
            " experiments (ab = false)"
        )
    return scenario, skipped


def _fit_cron(name: str, run: RunStats, schedule: str | None, params: InForce) -> CronSpec:
    every = None
    if not _valid_crontab(schedule):
        gap = (run.last_at - run.first_at) / max(run.runs - 1, 1)
        every = f"{max(1, round(gap / 60))}m"
        schedule = None
    errors = run.errors
    rate_limited = errors.count("rate_limit", retryable=True)
    plain = max(run.attempts - rate_limited, 1)  # attempts answered other than by a retried 429
    timeouts = errors.count("timeout", retryable=True)
    if params.timeout is not None and run.timeout_attempt is not None:
        # timeouts of the job's own are transient failures here
        timeouts = min(timeouts, run.timeout_attempt.count_at_least(params.timeout * KILLED_AT))
    timed_out = min(timeouts / plain, 0.9)
    latency = _latency(run, timed_out)
    answered = max(plain - timeouts, 1)
    transient = errors.count("other", retryable=True) + errors.count("timeout", True) - timeouts
    fatal = sum(errors.count(kind, retryable=False) for kind in ERROR_CLASSES)
    fail_p = min(transient / answered, 0.95)
    fatal_p = min(fatal / max(answered - transient, 1), 0.95)
    timeout = params.timeout
    if timeout is None:
        timeout = SPECS["timeout"].default if timeouts else NO_TIMEOUT
    return CronSpec(
        name=name,
        latency=latency,
        every=every,
        schedule=schedule,
        fail_p=round(fail_p, 4),
        fatal_p=round(fatal_p, 4),
        rate_limit=_rate_limit(run, params),
        unwritable=[p for p in TUNABLE if params.unwritable(p) and not params.splits],
        params=StartParams(
            maxRetries=params.maxRetries or SPECS["maxRetries"].default,
            timeout=timeout,
            backoffBase=params.backoffBase or SPECS["backoffBase"].default,
            backoff=_BACKOFFS.get(params.backoff, "exponential"),
        ),
    )


def _latency(run: RunStats, timed_out: float) -> Latency:
    sketch = run.success_attempt
    kept = 1 - timed_out
    median = max(sketch.quantile(min(0.5 / kept, 1.0)), 1.0)
    below = max(sketch.quantile(min(ONE_SIGMA_BELOW / kept, 1.0)), 1.0)
    sigma = math.log(median / below) if sketch.count >= 10 else 0.25
    return Latency(median=round(median, 1), sigma=round(min(max(sigma, 0.01), 3.0), 3))


def _rate_limit(run: RunStats, params: InForce) -> RateLimit | None:
    limited = run.errors.count("rate_limit", retryable=True)
    if not limited:
        return None
    first = max(limited - run.rate_limited_retries, 0)
    p = min(first / run.runs, 1.0)
    retries = max(run.attempts - run.runs, 1)
    again = run.rate_limited_retries / retries
    wait = max(params.backoffBase or SPECS["backoffBase"].default, 1)
    if p <= 0:
        return RateLimit(p=round(min(again, 1.0), 4), recovery_ms=NEVER_RECOVERS)
    if again <= 0:
        recovery = wait / math.log(20)  # never seen again: down to a twentieth after one wait
    elif again >= p:
        recovery = NEVER_RECOVERS
    else:
        recovery = wait / math.log(p / again)
    return RateLimit(p=round(p, 4), recovery_ms=round(min(max(recovery, 1.0), NEVER_RECOVERS), 1))


def _valid_crontab(schedule: str | None) -> bool:
    if not schedule:
        return False
    from tunerd.schedule import cron_trigger

    try:
        cron_trigger(schedule, UTC)
    except ValueError:
        return False
    return True
