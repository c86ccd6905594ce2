"""Durations ("24h", "5s", "7d") and points in time ("2026-02-05", "7d" ago) from people (pure)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """``"90s"``, ``"15m"``, ``"24h"``, ``"7d"``, ``"2w"`` (a bare number means seconds)."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration: use a number and a unit, e.g. 24h, 15m, 7d")
    value, unit = float(match.group(1)), (match.group(2) or "s").lower()
    try:
        return timedelta(seconds=value * _UNIT_SECONDS[unit])
    except OverflowError:
        raise ValueError(f"{text!r} is longer than any duration tunerd can use") from None


def parse_since(text: str, now: datetime) -> datetime:
    """A time ``--since`` means: ISO 8601 (naive is UTC; a date is its midnight), or a duration
    meaning that long before ``now``."""
    if _DURATION.match(text):
        return now - parse_duration(text)
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a time nor a duration: use e.g. 2026-02-05, "
            "2026-02-05T12:00:00Z or 7d"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def iso(epoch: float, timespec: str = "seconds") -> str:
    """Epoch seconds as ISO 8601 in UTC with a ``Z``, the way tunerd writes every time."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def human_duration(seconds: float) -> str:
    """A period for a person: ``45 s``, ``18 min``, ``5 h 20 min``, ``3 d 4 h``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"
