"""Discord webhook notifications, delivered from a durable outbox.

Every notification is first written to the ``outbox`` table of the state store (one
transaction), then delivered in order. A 2xx answer marks it delivered (with ``?wait=true``
Discord returns the message, whose id is recorded); HTTP 429 waits the ``retry_after`` Discord
asks for; 5xx, timeouts and connection errors back off exponentially; 404 (the webhook is gone)
and other 4xx answers are final and said loudly. Nothing is lost across restarts: what is not
delivered stays in the outbox for the next process. One process delivers at a time (a lock beside
the database: the daemon and a command run by hand never post the same row), and nothing is sent
twice, except in the milliseconds between Discord's answer and the database commit if the
process dies exactly then.

Untrusted text (cron names, error messages) never pings anyone (``allowed_mentions`` parses
nothing), never breaks the message (Markdown escaped, every length within Discord's limits), and
the webhook URL, which holds its token, is never logged: httpx's request log is silenced and any
error text is redacted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from tunerd.notify import Notification
from tunerd.report import safe_text
from tunerd.store import Store

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("tunerd.discord")

TITLE_MAX: Final = 256
DESCRIPTION_MAX: Final = 4096
FIELD_MAX: Final = 1024
EMBEDS_TOTAL_MAX: Final = 6000
MAX_BACKOFF: Final = 300.0
COLORS: Final = {
    "commit": 0x2ECC71,
    "experiment_started": 0x3498DB,
    "review_requested": 0xF39C12,
    "extend": 0xF1C40F,
    "rollback": 0xE74C3C,
    "harm_stop": 0xC0392B,
    "refused": 0x992D22,
    "advisory": 0x95A5A6,
    "report": 0x9B59B6,
}
_MARKDOWN = re.compile(r"([\\*_~`|>#\[\]<@])")


def escape(text: str) -> str:
    """Untrusted text shown literally: control characters and Discord Markdown escaped."""
    return _MARKDOWN.sub(r"\\\1", safe_text(text))


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def payload(n: Notification, at: float) -> dict[str, Any]:
    """The webhook body: one embed within every limit, mentions disabled."""
    title = clip(n.title, TITLE_MAX)
    cron = clip(escape(n.cron), FIELD_MAX) if n.cron else ""
    fields = [{"name": "cron", "value": cron, "inline": True}] if cron else []
    used = len(title) + (len("cron") + len(cron) if cron else 0) + len("tunerd")
    description = clip(
        "\n".join(escape(line) for line in n.lines), min(DESCRIPTION_MAX, EMBEDS_TOTAL_MAX - used)
    )
    embed = {
        "title": title,
        "description": description,
        "color": COLORS.get(n.kind, 0x7F8C8D),
        "fields": fields,
        "footer": {"text": "tunerd"},
        "timestamp": datetime.fromtimestamp(at, UTC).isoformat(),
    }
    return {"username": "tunerd", "embeds": [embed], "allowed_mentions": {"parse": []}}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one delivery attempt means: delivered, retry after ``delay`` seconds, or dead."""

    result: str
    delay: float = 0.0
    detail: str = ""
    rate_limited: bool = False


def interpret(status: int, headers: dict[str, str], body: bytes, attempts: int) -> Outcome:
    """Discord's answer to a delivery attempt (pure: no clock, no I/O)."""
    if 200 <= status < 300:
        return Outcome("delivered")
    if status == 429:
        delay = None
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            delay = float(json.loads(body or b"{}").get("retry_after"))
        if delay is None or not math.isfinite(delay):
            try:
                delay = float(headers.get("retry-after", "1"))
            except ValueError:
                delay = 1.0
        return Outcome("retry", max(0.0, min(delay, 3600.0)), "rate limited (429)", True)
    if status >= 500:
        return Outcome("retry", backoff(attempts), f"server error {status}")
    if status == 404:
        return Outcome("dead", 0.0, "404: the webhook no longer exists; configure a new one")
    return Outcome("dead", 0.0, f"refused with {status}: {body[:200].decode('utf-8', 'replace')}")


def backoff(attempts: int) -> float:
    return min(MAX_BACKOFF, 2.0 ** max(attempts - 1, 0))


class DiscordNotifier:
    """Queues every notification durably, then delivers the queue in order."""

    def __init__(self, store: Store, url: str, timeout: float = 10.0) -> None:
        self.store = store
        self.url = url
        self.timeout = timeout
        for noisy in ("httpx", "httpcore"):  # their INFO lines carry the full URL, token and all
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self._client: httpx.Client | None = None

    def send(self, notification: Notification) -> None:
        now = time.time()
        log.info("%s queued for Discord: %s", notification.kind, safe_text(notification.title))
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO outbox (kind, payload, state, next_attempt_at, created_at)"
                " VALUES (?, ?, 'pending', ?, ?)",
                (notification.kind, json.dumps(payload(notification, now)), now, now),
            )

    def pending(self) -> int:
        query = "SELECT count(*) FROM outbox WHERE state = 'pending'"
        return int(self.store.db.execute(query).fetchone()[0])

    def redact(self, text: str) -> str:
        return text.replace(self.url, "<webhook>") if self.url else text

    def flush(self, budget: float = 10.0, retry_now: bool = False) -> int:
        """Deliver pending notifications in order for at most ``budget`` seconds; returns how
        many were delivered. What is left waits in the outbox for the next flush.

        ``retry_now``: a new process (a command a person just ran) tries the head of the queue
        at once instead of waiting out the backoff of an earlier failure; a wait Discord asked
        for with 429 is always honoured."""
        with open(self.store.path.with_name("outbox.lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # another process is delivering the queue, in order
            return self._deliver(time.monotonic() + budget, retry_now)

    def _deliver(self, deadline: float, retry_now: bool) -> int:
        import httpx

        delivered = 0
        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout)
        while True:
            row = self.store.db.execute(
                "SELECT * FROM outbox WHERE state = 'pending' ORDER BY id LIMIT 1"
            ).fetchone()
            if row is None:
                return delivered
            wait = row["next_attempt_at"] - time.time()
            if retry_now and not row["rate_limited"]:
                wait = 0.0
            retry_now = False
            if wait > 0:
                if time.monotonic() + wait > deadline:
                    return delivered
                time.sleep(wait)
            attempts = row["attempts"] + 1
            left = deadline - time.monotonic()
            if left < 0.1:
                return delivered
            try:
                response = self._client.post(
                    self.url,
                    params={"wait": "true"},
                    content=row["payload"],
                    headers={"content-type": "application/json"},
                    timeout=min(self.timeout, left),  # a hanging webhook holds no one past it
                )
                outcome = interpret(
                    response.status_code, dict(response.headers), response.content, attempts
                )
                message_id = (
                    _message_id(response.content) if outcome.result == "delivered" else None
                )
            except httpx.HTTPError as exc:
                outcome = Outcome(
                    "retry", backoff(attempts), f"{type(exc).__name__}: {self.redact(str(exc))}"
                )
                message_id = None
            self._record(row["id"], attempts, outcome, message_id)
            if outcome.result == "delivered":
                delivered += 1
            elif outcome.result == "dead":
                log.error("notification %d not delivered: %s", row["id"], outcome.detail)
            else:
                log.warning(
                    "notification %d: %s; retrying in %.1f s",
                    row["id"],
                    outcome.detail,
                    outcome.delay,
                )
            if time.monotonic() > deadline:
                return delivered

    def _record(
        self, outbox_id: int, attempts: int, outcome: Outcome, message_id: str | None
    ) -> None:
        now = time.time()
        with self.store.transaction() as db:
            if outcome.result == "delivered":
                db.execute(
                    "UPDATE outbox SET state = 'delivered', attempts = ?, delivered_at = ?,"
                    " message_id = ? WHERE id = ?",
                    (attempts, now, message_id, outbox_id),
                )
            elif outcome.result == "dead":
                db.execute(
                    "UPDATE outbox SET state = 'dead', attempts = ?, last_error = ? WHERE id = ?",
                    (attempts, outcome.detail, outbox_id),
                )
            else:
                db.execute(
                    "UPDATE outbox SET attempts = ?, next_attempt_at = ?, last_error = ?,"
                    " rate_limited = ? WHERE id = ?",
                    (
                        attempts,
                        now + outcome.delay,
                        outcome.detail,
                        outcome.rate_limited,
                        outbox_id,
                    ),
                )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _message_id(body: bytes) -> str | None:
    try:
        value = json.loads(body).get("id")
    except (ValueError, AttributeError):
        return None
    return str(value) if value is not None else None


def openclaw_webhook(home: Path, environ: dict[str, str]) -> str | None:
    """Where the user's Level 1 keeps its webhook: ``$OPENCLAW_DISCORD_WEBHOOK``, else
    ``~/.openclaw/monitoring.json`` ``webhook.url``."""
    if url := environ.get("OPENCLAW_DISCORD_WEBHOOK"):
        return url
    try:
        document = json.loads((home / ".openclaw" / "monitoring.json").read_text())
        url = document["webhook"]["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return url if isinstance(url, str) and url else None
