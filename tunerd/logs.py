"""Logging for the daemon: structlog, a JSON object per line under systemd, readable on a terminal.

Every module logs through the standard library; one ``ProcessorFormatter`` renders those records
(and APScheduler's, and httpx's) with the same small processors. A redaction processor removes
secrets (the webhook URL carries its token) from every event before it is rendered, whichever
library wrote it; httpx's own request log, which prints the full URL, is kept at WARNING.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

import structlog


def cause_of(exc: BaseException) -> str:
    """An error in one line, its kind and message: what the operator reads (a traceback is
    for the debug log)."""
    text = " ".join(str(exc).split()) or "no detail"
    return f"{type(exc).__name__}: {text[:300]}"


def _redactor(secrets: Iterable[str]) -> Any:
    hidden = [s for s in secrets if s]

    def redact(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        for key, value in event.items():
            if isinstance(value, str):
                for secret in hidden:
                    value = value.replace(secret, "<redacted>")
                event[key] = value
        return event

    return redact


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def wants_json() -> bool:
    """JSON under systemd (journald sets ``$JOURNAL_STREAM``) or whenever stderr is no terminal."""
    return bool(os.environ.get("JOURNAL_STREAM")) or not sys.stderr.isatty()


def configure(secrets: Iterable[str] = (), json_lines: bool | None = None) -> None:
    json_lines = wants_json() if json_lines is None else json_lines
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
        _redactor(secrets),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(ensure_ascii=False)
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Our own INFO lines; only warnings from libraries (SciPy's optimiser, behind Boschloo's
    # test, logs its every step at INFO; httpx's INFO lines carry the webhook URL).
    root.setLevel(logging.WARNING)
    level = os.environ.get("TUNERD_LOG_LEVEL", "info").upper()
    logging.getLogger("tunerd").setLevel(level if level in _LEVELS else logging.INFO)
    for noisy in ("httpx", "httpcore", "apscheduler", "watchfiles"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
