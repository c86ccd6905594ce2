"""Drift: the world changing for reasons that are not tunerd's parameters (pure; SPEC section 7).

Weekends, outages, an upstream that gets better or worse: a scenario's ``[[drift]]`` entries
multiply each cron's failure probabilities (``fail_p``, ``doomed_p``, ``rate_limit.p``, each
capped at 1) by ``factor`` and its median latency by ``latency`` while they hold. A verdict has
to stay right through them; the simulator plays them so that tests and benchmarks can check it.

- ``weekly``: on ``days`` (``["sat", "sun"]``) and/or in ``hours`` (``"0-6"``, ``"0-6,22-23"``),
  in the scenario's time zone (``settings.timezone``, else UTC);
- ``window``: from ``from`` for ``hours`` hours;
- ``step``: from ``at`` on;
- ``bursts``: ``per_day`` stretches of ``minutes`` minutes a day, at times the seed decides.
"""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, tzinfo
from typing import Annotated, Any, Final, Literal

import msgspec

DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class Drift(msgspec.Struct, rename={"start": "from"}):
    kind: Literal["weekly", "window", "step", "bursts"]
    crons: list[str] = msgspec.field(default_factory=lambda: ["*"])
    """Cron names, or ``"*"`` for all."""
    factor: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    latency: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    days: list[str] | None = None
    hours: str | float | None = None
    """``weekly``: hours of the day (``"0-6"``); ``window``: how long it lasts."""
    start: Any = None
    """``window``: when it begins (``from`` in the TOML; a TOML date-time or a string)."""
    at: Any = None
    per_day: Annotated[int, msgspec.Meta(ge=1, le=96)] | None = None
    minutes: Annotated[float, msgspec.Meta(gt=0, le=1440)] | None = None


class DriftError(ValueError):
    """A drift entry cannot be played; the message says which and why."""


def _time(text: Any, what: str) -> float:
    """A TOML date-time, a TOML date or an ISO 8601 string; naive means UTC."""
    if text is None:
        raise DriftError(f"{what} is missing")
    moment = text
    if isinstance(text, date) and not isinstance(text, datetime):
        moment = datetime(text.year, text.month, text.day)
    elif isinstance(text, str):
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise DriftError(f"{what}: {text!r} is not an ISO 8601 time") from None
    if not isinstance(moment, datetime):
        raise DriftError(f"{what}: {text!r} is not a time")
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _hours(text: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise DriftError(f'hours: {text!r} is not like "0-6" or "0-6,22-23"') from None
        if not 0 <= first <= last <= 23:
            raise DriftError(f"hours: {text!r} must lie within 0-23")
        out.update(range(first, last + 1))
    return frozenset(out)


class World:
    """Where the drift stands at any moment, for any cron."""

    def __init__(
        self, drifts: list[Drift], seed: int, zone: tzinfo = UTC, crons: set[str] | None = None
    ) -> None:
        """``crons``: the names a drift may name (the scenario's), checked when given."""
        self.zone = zone
        self.seed = seed
        self._rules: list[tuple[Drift, frozenset[int] | None, frozenset[int] | None, float]] = []
        for i, d in enumerate(drifts):
            where = f"drift[{i}] ({d.kind})"
            days = hours = None
            begin = 0.0
            try:
                if crons is not None and (strange := set(d.crons) - crons - {"*"}):
                    raise DriftError(f"crons: {sorted(strange)} are not crons of the scenario")
                if d.kind == "weekly":
                    if d.days is None and d.hours is None:
                        raise DriftError("give days and/or hours")
                    if d.days is not None:
                        unknown = [x for x in d.days if x.lower()[:3] not in DAYS]
                        if unknown or not d.days:
                            raise DriftError(f"days: {d.days} are not days ({', '.join(DAYS)})")
                        days = frozenset(DAYS.index(x.lower()[:3]) for x in d.days)
                    if d.hours is not None:
                        hours = _hours(
                            str(int(d.hours)) if isinstance(d.hours, int | float) else d.hours
                        )
                elif d.kind == "window":
                    begin = _time(d.start, "from")
                    if not isinstance(d.hours, int | float) or d.hours <= 0:
                        raise DriftError("hours: how long the window lasts, a number above 0")
                elif d.kind == "step":
                    begin = _time(d.at, "at")
                elif d.per_day is None or d.minutes is None:
                    raise DriftError("bursts need per_day and minutes")
            except DriftError as exc:
                raise DriftError(f"{where}: {exc}") from None
            self._rules.append((d, days, hours, begin))
        self._bursts: dict[tuple[int, int], list[float]] = {}

    def __bool__(self) -> bool:
        return bool(self._rules)

    def at(self, cron: str, t: float) -> tuple[float, float]:
        """(failure factor, latency factor) for ``cron`` at epoch second ``t``."""
        factor = latency = 1.0
        for i, (d, days, hours, begin) in enumerate(self._rules):
            if "*" not in d.crons and cron not in d.crons:
                continue
            if self._holds(i, d, days, hours, begin, t):
                factor *= d.factor
                latency *= d.latency
        return factor, latency

    def _holds(
        self,
        i: int,
        d: Drift,
        days: frozenset[int] | None,
        hours: frozenset[int] | None,
        begin: float,
        t: float,
    ) -> bool:
        if d.kind == "step":
            return t >= begin
        if d.kind == "window":
            return begin <= t < begin + float(d.hours or 0) * 3600
        local = datetime.fromtimestamp(t, self.zone)
        if d.kind == "weekly":
            return (days is None or local.weekday() in days) and (
                hours is None or local.hour in hours
            )
        day = int(t // 86400)
        length = (d.minutes or 0) * 60
        return any(  # a burst that began late the day before may still hold
            s <= t < s + length for n in (day - 1, day) for s in self._burst_starts(i, d, n)
        )

    def _burst_starts(self, i: int, d: Drift, day: int) -> list[float]:
        starts = self._bursts.get((i, day))
        if starts is None:
            rng = random.Random(f"{self.seed}:drift:{i}:{day}")
            starts = [day * 86400 + rng.random() * 86400 for _ in range(d.per_day or 0)]
            self._bursts[(i, day)] = starts
        return starts
