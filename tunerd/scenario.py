"""Simulation scenarios (SPEC section 7), pure: the TOML model, and one simulated run of a cron.

A run is what the user's wrapper does, attempt by attempt, with the parameters Level 1 read: each
attempt is decided in this order — HTTP 429 (with probability ``p`` on the first attempt, and
``p * exp(-w / recovery_ms)`` on a retry that waited ``w`` ms; a 429 answer takes 100 ms), else a
lognormal duration that, beyond ``timeout``, is an ETIMEDOUT failure lasting ``timeout``, else a
transient failure with probability ``fail_p``, else a failure the wrapper does not retry with
probability ``fatal_p`` (a command's non-zero exit: the run ends there), else success. Up to
``maxRetries`` attempts, with the wrapper's backoff between them (``level1``).

Each run draws from its own generator, seeded by the scenario's seed, the cron and the run's
number: the same scenario gives the same runs, and a run's luck does not depend on what the
parameters made earlier runs draw (an arm's comparison is not muddied by a shifted stream).
"""

from __future__ import annotations

import math
import random
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import msgspec

from tunerd.drift import Drift, DriftError, World
from tunerd.level1 import attempts_allowed, backoff_ms, error_object
from tunerd.params import ParamName, Params
from tunerd.records import NON_RETRYABLE
from tunerd.timeparse import parse_duration

RATE_LIMIT_MS: Final = 100.0
"""How long an attempt answered with HTTP 429 takes."""

Probability = Annotated[float, msgspec.Meta(ge=0, le=1)]
Positive = Annotated[float, msgspec.Meta(gt=0)]


class Latency(msgspec.Struct):
    median: Positive
    sigma: Annotated[float, msgspec.Meta(ge=0, le=5)] = 0.25


class RateLimit(msgspec.Struct):
    p: Probability
    recovery_ms: Positive = 5000.0


class StartParams(msgspec.Struct, frozen=True):
    maxRetries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 3
    timeout: Annotated[int, msgspec.Meta(ge=1, le=3_600_000)] = 15000
    backoffBase: Annotated[int, msgspec.Meta(ge=0, le=600_000)] = 1000
    backoff: Literal["exponential", "linear", "fixed"] = "exponential"


class CronSpec(msgspec.Struct, rename={"latency": "latency_ms"}):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    latency: Latency
    every: str | None = None
    """One run per period (``15m``)..."""
    schedule: str | None = None
    """...or a crontab line (``50 16 * * 1-5``), in UTC."""
    fail_p: Probability = 0.0
    doomed_p: Probability = 0.0
    """A run whose every attempt fails (its upstream is down for it: HTTP 503, retryable)."""
    fatal_p: Probability = 0.0
    """An attempt that got past the 429 and the timeout fails for good (exit status 1, not
    retried) with this probability: the failures no retry parameter can change."""
    rate_limit: RateLimit | None = None
    params: StartParams = StartParams()
    unwritable: list[ParamName] = []
    """Parameters its script has no line for (``ab = false``): tunerd cannot change them."""


class Scenario(msgspec.Struct):
    cron: list[CronSpec]
    weeks: Annotated[int, msgspec.Meta(ge=1, le=104)] = 4
    seed: int = 1
    ab: bool = True
    """Can the simulated Level 1 split traffic? False: switchback experiments (script targets)."""
    start: str = "2026-01-05T00:00:00Z"
    """When the simulated time begins (a Monday: the first weekly cycle sees six days of runs)."""
    settings: dict[str, Any] = {}
    """tunerd's configuration keys for this scenario (``verify_after``, ``min_runs``, ...)."""
    drift: list[Drift] = []
    """The world changing for reasons that are not tunerd's parameters (``drift``)."""
    name: str = ""


class ScenarioError(ValueError):
    """The scenario cannot be simulated; the message says where and why."""


def parse_scenario(text: str, name: str = "") -> Scenario:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"not valid TOML: {exc}") from None
    try:
        scenario = msgspec.convert(document, Scenario)
    except msgspec.ValidationError as exc:
        raise ScenarioError(str(exc).replace("`$.", "`")) from None
    if not scenario.cron:
        raise ScenarioError("no [[cron]] to simulate")
    names = [c.name for c in scenario.cron]
    if len(set(names)) != len(names):
        raise ScenarioError("two [[cron]] have the same name")
    for c in scenario.cron:
        if (c.every is None) == (c.schedule is None):
            raise ScenarioError(f"cron {c.name!r}: give either every or schedule")
        if c.every is not None:
            try:
                if parse_duration(c.every).total_seconds() < 60:
                    raise ScenarioError(f"cron {c.name!r}: every is under a minute")
            except ValueError as exc:
                raise ScenarioError(f"cron {c.name!r}: every: {exc}") from None
    try:
        world(scenario)
    except DriftError as exc:
        raise ScenarioError(str(exc)) from None
    return msgspec.structs.replace(scenario, name=scenario.name or name)


def world(scenario: Scenario) -> World:
    """The scenario's drift, in its time zone."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    zone = scenario.settings.get("timezone") or "UTC"
    try:
        tz = ZoneInfo(str(zone))
    except (ZoneInfoNotFoundError, ValueError):
        raise DriftError(f"settings.timezone: {zone!r} is not a known time zone") from None
    return World(scenario.drift, scenario.seed, tz, {c.name for c in scenario.cron})


def unknown_keys(text: str) -> list[str]:
    """Keys of a scenario that nothing reads: ignored, so that a newer scenario still runs, but
    named (a typo such as ``weaks`` would otherwise pass unseen)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return []
    known = {
        "": set(Scenario.__struct_fields__),
        "cron": set(CronSpec.__struct_encode_fields__),
        "latency_ms": set(Latency.__struct_fields__),
        "rate_limit": set(RateLimit.__struct_fields__),
        "params": set(StartParams.__struct_fields__),
    }
    out = [key for key in document if key not in known[""]]
    for i, drift in enumerate(document.get("drift") or []):
        if isinstance(drift, dict):
            fields = set(Drift.__struct_encode_fields__)
            out += [f"drift[{i}].{key}" for key in drift if key not in fields]
    for i, cron in enumerate(document.get("cron") or []):
        if not isinstance(cron, dict):
            continue
        out += [f"cron[{i}].{key}" for key in cron if key not in known["cron"]]
        for table in ("latency_ms", "rate_limit", "params"):
            if isinstance(cron.get(table), dict):
                out += [f"cron[{i}].{table}.{k}" for k in cron[table] if k not in known[table]]
    return out


def dump_scenario(scenario: Scenario) -> str:
    """The scenario as TOML (what ``--from-log`` fitted, to keep and edit)."""
    lines = [
        f"# {scenario.name}" if scenario.name else "# tunerd scenario",
        f"weeks = {scenario.weeks}",
        f"seed = {scenario.seed}",
        f"ab = {'true' if scenario.ab else 'false'}",
        f'start = "{scenario.start}"',
    ]
    for c in scenario.cron:
        lines += ["", "[[cron]]", f"name = {_toml_string(c.name)}"]
        if c.every is not None:
            lines.append(f'every = "{c.every}"')
        if c.schedule is not None:
            lines.append(f"schedule = {_toml_string(c.schedule)}")
        lines.append(
            f"latency_ms = {{ median = {c.latency.median:g}, sigma = {c.latency.sigma:g} }}"
        )
        lines.append(f"fail_p = {c.fail_p:g}")
        if c.doomed_p:
            lines.append(f"doomed_p = {c.doomed_p:g}")
        if c.fatal_p:
            lines.append(f"fatal_p = {c.fatal_p:g}")
        if c.rate_limit is not None:
            rl = c.rate_limit
            lines.append(f"rate_limit = {{ p = {rl.p:g}, recovery_ms = {rl.recovery_ms:g} }}")
        p = c.params
        backoff = "" if p.backoff == "exponential" else f', backoff = "{p.backoff}"'
        lines.append(
            f"params = {{ maxRetries = {p.maxRetries}, timeout = {p.timeout},"
            f" backoffBase = {p.backoffBase}{backoff} }}"
        )
        if c.unwritable:
            lines.append(f"unwritable = {_toml_string_list(c.unwritable)}")
    return "\n".join(lines) + "\n"


def _toml_string_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(_toml_string(item) for item in items) + "]"


def _toml_string(text: str) -> str:
    import json

    return json.dumps(text, ensure_ascii=False)  # a JSON string is a TOML basic string


@dataclass(frozen=True, slots=True)
class SimulatedRun:
    attempts: list[dict[str, Any]]
    total_ms: float
    reason: str | None = None
    """``"Non-retryable error"`` when it ended early on a ``fatal_p`` failure."""


def simulate_run(
    cron: CronSpec,
    params: Params,
    rng: random.Random,
    factor: float = 1.0,
    latency: float = 1.0,
) -> SimulatedRun:
    """One run of ``cron`` under ``params`` (the order of SPEC section 7), in a world whose drift
    multiplies its failure probabilities by ``factor`` and its latency by ``latency``."""
    attempts: list[dict[str, Any]] = []
    elapsed = 0.0
    mu = math.log(cron.latency.median * latency)
    fail_p = min(cron.fail_p * factor, 1.0)
    # No draw without a chance of it: a scenario without doomed runs keeps its old luck.
    doomed = cron.doomed_p > 0 and rng.random() < min(cron.doomed_p * factor, 1.0)
    for number in range(1, attempts_allowed(params) + 1):
        waited = backoff_ms(params, number - 1) if number > 1 else 0.0
        elapsed += waited
        rate_limit = cron.rate_limit
        if rate_limit is not None:
            p = min(rate_limit.p * factor, 1.0)
            if number > 1:
                p *= math.exp(-waited / rate_limit.recovery_ms)
            if rng.random() < p:
                attempts.append(
                    _failed(number, RATE_LIMIT_MS, error_object("Error", "HTTP 429", 429))
                )
                elapsed += RATE_LIMIT_MS
                continue
        duration = rng.lognormvariate(mu, cron.latency.sigma)
        if duration > params.timeout:
            message = f"Command timed out after {params.timeout} ms"
            attempts.append(_failed(number, params.timeout, error_object("ETIMEDOUT", message)))
            elapsed += params.timeout
            continue
        elapsed += duration
        if doomed:
            error = error_object("Error", "HTTP 503 Service Unavailable", 503)
            attempts.append(_failed(number, duration, error))
            continue
        if rng.random() < fail_p:
            error = error_object("ECONNRESET", "socket hang up")
            attempts.append(_failed(number, duration, error))
            continue
        if cron.fatal_p and rng.random() < cron.fatal_p:  # no draw without it: old seeds hold
            attempts.append(_failed(number, duration, error_object(1, "Command failed: job\n")))
            last = number == attempts_allowed(params)
            return SimulatedRun(attempts, elapsed, None if last else NON_RETRYABLE)
        attempts.append({"attempt": number, "success": True, "duration": round(duration)})
        break
    return SimulatedRun(attempts, elapsed)


def _failed(number: int, duration: float, error: dict[str, Any]) -> dict[str, Any]:
    return {"attempt": number, "success": False, "duration": round(duration), "error": error}
