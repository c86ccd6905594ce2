"""Crontab expressions as APScheduler 3 triggers, with crontab's meaning kept (pure).

APScheduler 3 numbers the days of the week from Monday = 0, crontab from Sunday = 0 (and 7):
``CronTrigger.from_crontab("0 23 * * 0")`` would fire on Mondays. The day-of-week field is
therefore rewritten with names before it reaches APScheduler, and the time zone is always given
explicitly (``from_crontab`` would otherwise use the machine's zone, not the scheduler's).
"""

from __future__ import annotations

import re
from datetime import tzinfo

from apscheduler.triggers.cron import CronTrigger

_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def crontab_day_of_week(field: str) -> str:
    """Crontab's days of the week (0 or 7 = Sunday; lists, ranges, steps) as names in a list,
    which APScheduler reads the same way; names (``mon-fri``) are passed through."""
    if field == "*" or re.search(r"[a-z]", field, re.IGNORECASE):
        return field
    days: set[int] = set()
    for part in field.split(","):
        span, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if span == "*":
            low, high = 0, 6
        elif "-" in span:
            low_text, high_text = span.split("-", 1)
            low, high = int(low_text), int(high_text)
        else:
            low = high = int(span)
            if step_text:
                high = 7
        if not (0 <= low <= 7 and 0 <= high <= 7 and step >= 1):
            raise ValueError(f"{field!r} is not a crontab day of the week")
        days.update(d % 7 for d in range(low, high + 1, step))
    return ",".join(_DAYS[d] for d in sorted(days))


def cron_trigger(expression: str, timezone: tzinfo) -> CronTrigger:
    """``minute hour day month day_of_week``, as crontab means it."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"{expression!r} is not a crontab expression (five fields)")
    minute, hour, day, month, day_of_week = fields
    return CronTrigger(
        minute=minute,
        hour=hour,
        day=day,
        month=month,
        day_of_week=crontab_day_of_week(day_of_week),
        timezone=timezone,
    )
