"""Notifications: what tunerd tells the operator, and the interface that delivers them.

A ``Notification`` is plain data (what happened, to which cron, the lines that explain it). Until a
Discord webhook is configured, ``LogNotifier`` writes each one as a log line; the text of cron
names and errors is untrusted and is escaped for the terminal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from tunerd.report import safe_text

if TYPE_CHECKING:
    from tunerd.store import Store

log = logging.getLogger("tunerd.notify")


@dataclass(frozen=True, slots=True)
class Notification:
    kind: str
    """review_requested | experiment_started | refused | commit | rollback | harm_stop |
    advisory | report"""
    title: str
    cron: str | None = None
    lines: list[str] = field(default_factory=list)


class Notifier(Protocol):
    def send(self, notification: Notification) -> None:
        """Accept a notification (durably, where the notifier has a store)."""

    def flush(self, budget: float = 10.0, retry_now: bool = False) -> int:
        """Deliver what is pending for at most ``budget`` seconds; returns how many."""
        return 0


class LogNotifier:
    """Notifications as log lines (the default without a webhook): delivered as they are sent."""

    def flush(self, budget: float = 10.0, retry_now: bool = False) -> int:
        return 0

    def send(self, notification: Notification) -> None:
        subject = f" [{safe_text(notification.cron)}]" if notification.cron else ""
        detail = " | ".join(safe_text(line) for line in notification.lines)
        log.info(
            "%s%s: %s%s",
            notification.kind,
            subject,
            safe_text(notification.title),
            f" — {detail}" if detail else "",
        )


def notifier_for(store: Store, url: str | None) -> Notifier:
    """Discord through the store's outbox when a webhook is set, else the log."""
    if not url:
        return LogNotifier()
    from tunerd.discord import DiscordNotifier

    return DiscordNotifier(store, url)
