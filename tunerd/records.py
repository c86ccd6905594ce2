"""The Level 1 log line, as the user's wrapper (``lib/auto-retry.js``) really writes it.

One msgspec model decodes a line straight into typed objects: unknown fields (the job's ``result``,
up to 10 MB of stdout) are skipped by the decoder without building anything, missing optional fields
take defaults, and a field of the wrong type makes the whole line malformed. The structs opt out of
the garbage collector (they hold no cycles), which matters at a million lines.

Error objects stay raw JSON until something asks about them: most attempts have none, the same few
errors recur thousands of times, and building a struct for each one was a third of decoding time.
``describe_error`` decodes and classifies each distinct error once (memoised on its bytes), and an
error of an unexpected shape is described by its text rather than making the run unreadable.
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, NamedTuple

import msgspec

MAX_DURATION_MS: Final = 30 * 86400 * 1000.0
"""A run or an attempt longer than 30 days is not a cron's run (the wrapper's timeouts are
minutes): such a value, or one that overflows to infinity, makes the line malformed."""
NonNegative = Annotated[float, msgspec.Meta(ge=0, le=MAX_DURATION_MS)]
EpochMs = Annotated[float, msgspec.Meta(ge=0, le=253402300799999)]
"""Epoch milliseconds up to the end of year 9999 (what ``datetime`` can hold)."""

ErrorClass = Literal["rate_limit", "timeout", "other"]
ERROR_CLASSES: Final[tuple[ErrorClass, ...]] = ("rate_limit", "timeout", "other")


class ErrorInfo(
    msgspec.Struct, gc=False, rename={"status_code": "statusCode", "suggested_fix": "suggestedFix"}
):
    """The wrapper's ``analyzeError`` object; ``type`` may be a Node code or an exit status."""

    type: str | int | float | None = None
    message: str | None = None
    status_code: int | str | None = None
    status: int | str | None = None
    code: int | str | None = None
    category: str | None = None
    suggested_fix: str | None = None
    reason: str | None = None
    retryable: bool | None = None


class Attempt(msgspec.Struct, gc=False):
    """One try. Its ``attempt`` number is not decoded: the position in the list says it."""

    success: bool = False
    duration: NonNegative | None = None
    error: msgspec.Raw = msgspec.Raw()
    """``ErrorInfo`` or a plain string, as raw JSON (``describe_error`` reads it)."""


class Context(msgspec.Struct, gc=False):
    """What the caller passed; only the keys tunerd uses are decoded."""

    cron: str | None = None
    task: str | None = None
    schedule: msgspec.Raw = msgspec.Raw()
    """Raw: read once per cron (``schedule_text``), not decoded into a string per run."""
    demo: msgspec.Raw = msgspec.Raw()
    test: msgspec.Raw = msgspec.Raw()

    @property
    def schedule_text(self) -> str | None:
        if not self.schedule:
            return None
        try:
            value = msgspec.json.decode(self.schedule)
        except msgspec.DecodeError:
            return None
        return value if isinstance(value, str) else None


class ExperimentTag(msgspec.Struct, gc=False):
    id: str | int | None = None
    arm: str | None = None


class Entry(
    msgspec.Struct,
    gc=False,
    rename={"total_duration": "totalDuration", "final_error": "finalError"},
):
    """One run of one job."""

    timestamp: datetime | EpochMs | None = None
    type: str | None = None
    context: Context | None = None
    attempts: list[Attempt] = []
    total_duration: NonNegative | None = None
    final_error: msgspec.Raw = msgspec.Raw()
    reason: str | None = None
    """``"Non-retryable error"`` when the wrapper gave up before its last attempt."""
    params: dict[str, Any] | None = None
    experiment: ExperimentTag | None = None

    @property
    def cron(self) -> str | None:
        return self.context.cron or None if self.context is not None else None

    @property
    def succeeded(self) -> bool:
        """``type == "success"``; without a type, whether the last attempt succeeded."""
        if self.type is not None:
            return self.type == "success"
        return bool(self.attempts) and self.attempts[-1].success

    @property
    def duration(self) -> float | None:
        """``totalDuration``, else the attempts' durations added up, else unknown."""
        if self.total_duration is not None:
            return self.total_duration
        known = [a.duration for a in self.attempts if a.duration is not None]
        return sum(known) if known else None

    def when(self, read_at: datetime) -> datetime:
        """When the run ended; ``read_at`` when the line carries no time."""
        return to_datetime(self.timestamp, read_at)

    @property
    def last_error(self) -> msgspec.Raw:
        """The error that ended a failed run: its last attempt's, else ``finalError``."""
        if self.attempts and not self.attempts[-1].success:
            return self.attempts[-1].error
        return self.final_error


FailureCause = Literal["exhausted", "non_retryable", "other"]
FAILURE_CAUSES: Final[tuple[FailureCause, ...]] = ("exhausted", "non_retryable", "other")
NON_RETRYABLE: Final = "Non-retryable error"


def failure_cause(entry: Entry) -> FailureCause:
    """Why a failed run failed, as the wrapper decided it (SPEC section 2).

    ``non_retryable``: its last error is one the wrapper does not retry (``reason: "Non-retryable
    error"``, or an error marked ``retryable: false``, e.g. a command's non-zero exit): more
    attempts could not have rescued it. ``exhausted``: every attempt it was allowed failed and the
    last error was retryable: what ``maxRetries`` can change. ``other``: neither (no attempts
    logged, a run interrupted by a signal, a reason the wrapper does not write).
    """
    if entry.reason == NON_RETRYABLE:
        return "non_retryable"
    if not entry.attempts or entry.attempts[-1].success:
        return "other"
    if not describe_error(entry.attempts[-1].error).retryable:
        return "non_retryable"
    return "exhausted" if entry.reason is None else "other"


def causes(failures: int, exhausted: int, non_retryable: int) -> dict[str, int]:
    """Final failures by cause, as every command shows them (``other`` is the rest)."""
    return {
        "exhausted": exhausted,
        "non_retryable": non_retryable,
        "other": failures - exhausted - non_retryable,
    }


def non_retryable_at_first(entry: Entry) -> bool:
    """The run failed at its first attempt with an error the wrapper does not retry: no number
    of attempts changes such a run (what the ``maxRetries`` verdict leaves out)."""
    attempts = entry.attempts
    if not attempts or attempts[0].success:
        return False
    if len(attempts) == 1 and entry.reason == NON_RETRYABLE:
        return True
    return not describe_error(attempts[0].error).retryable


def to_datetime(ts: datetime | float | None, default: datetime) -> datetime:
    """ISO 8601 (naive means UTC) or epoch milliseconds, as an aware datetime."""
    if ts is None:
        return default
    if isinstance(ts, datetime):
        return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
    return datetime.fromtimestamp(ts / 1000.0, UTC)


def is_test(context: Context) -> bool:
    """Test and demo runs of the wrapper itself (``task: "test"``, a ``demo`` key, ...)."""
    if context.demo or context.test:
        return True
    return context.task is not None and context.task.strip().lower() in {"test", "demo"}


_RATE_LIMIT = re.compile(r"429|rate.?limit|too many requests", re.IGNORECASE)
_TIMEOUT = re.compile(r"timed? ?out", re.IGNORECASE)


def classify_error(error: msgspec.Raw | bytes) -> ErrorClass:
    """rate_limit / timeout / other (see ``describe_error``)."""
    return describe_error(error).kind


class ErrorDescription(NamedTuple):
    kind: ErrorClass
    signature: str
    """A short key under which the same error recurs (numbers folded, length capped)."""
    fix: str | None
    """The wrapper's ``suggestedFix``."""
    retryable: bool
    """Whether the wrapper retries it: its own ``retryable`` flag, else the wrapper's rule."""


_ERROR_DECODER: Final = msgspec.json.Decoder(ErrorInfo | str | None)
NO_DETAIL: Final = "(no error detail)"
# The wrapper's retryable error codes and HTTP statuses, with the fix it suggests for each.
NETWORK_FIX: Final = {
    "ETIMEDOUT": "Network timeout - check connection or increase timeout",
    "ECONNRESET": "Connection reset - server may be restarting",
    "ENOTFOUND": "DNS lookup failed - check hostname",
    "EAI_AGAIN": "DNS temporary failure - retry should work",
    "ECONNREFUSED": "Connection refused - check if service is running",
}
HTTP_FIX: Final = {
    408: "Request timeout - increase timeout",
    429: "Rate limit exceeded - increase backoff delay",
    500: "Internal server error - temporary, retry should work",
    502: "Bad gateway - upstream server issue",
    503: "Service unavailable - server overloaded",
    504: "Gateway timeout - upstream server timeout",
}


RETRYABLE_CODES: Final = tuple(NETWORK_FIX)
RETRYABLE_STATUS: Final = tuple(HTTP_FIX)


def wrapper_retries(code: object, status: object, message: str | None) -> bool:
    """The wrapper's ``analyzeError`` rule: a network code, a transient HTTP status, or
    ``timeout`` in the message (case-sensitive, as ``String.includes``)."""
    return (
        code in RETRYABLE_CODES
        or (isinstance(status, int) and not isinstance(status, bool) and status in RETRYABLE_STATUS)
        or (message is not None and "timeout" in message)
    )


def describe_error(error: msgspec.Raw | bytes) -> ErrorDescription:
    """Class, signature, suggested fix and retryability of an attempt's raw ``error``.

    The class keys on the status code and ``type`` before the message: the wrapper labels a child
    killed by its timeout ``category: "network"`` but ``type: "ETIMEDOUT"``.
    """
    return _describe_raw(bytes(error))


@functools.lru_cache(maxsize=4096)
def _describe_raw(raw: bytes) -> ErrorDescription:
    try:
        error = _ERROR_DECODER.decode(raw) if raw else None
    except msgspec.DecodeError:
        error = raw.decode("utf-8", "replace")  # some other JSON value: go by its text
    if error is None:
        return ErrorDescription("other", NO_DETAIL, None, False)
    if isinstance(error, str):
        kind, signature = _describe(error, None, None, None, None, None)
        return ErrorDescription(kind, signature, None, wrapper_retries(None, None, error))
    kind, signature = _describe(
        error.message, error.type, error.status_code, error.status, error.code, error.category
    )
    retryable = error.retryable
    if retryable is None:
        retryable = wrapper_retries(
            error.code if error.code is not None else error.type,
            _number(error.status_code),
            error.message,
        )
    fix = error.suggested_fix if error.suggested_fix is not None else error.reason
    return ErrorDescription(kind, signature, fix, retryable)


_DIGITS = re.compile(r"(?<!HTTP )(?<!HTTP/1.1 )(?<!\d)\d+")


def _describe(
    message: str | None,
    kind: str | int | float | None,
    status_code: int | str | None,
    status: int | str | None,
    code: int | str | None,
    category: str | None,
) -> tuple[ErrorClass, str]:
    text = message or ""
    klass: ErrorClass
    if 429 in (_number(status_code), _number(status), _number(code)) or _RATE_LIMIT.search(text):
        klass = "rate_limit"
    elif (
        kind == "ETIMEDOUT" or code == "ETIMEDOUT" or category == "timeout" or _TIMEOUT.search(text)
    ):
        klass = "timeout"
    else:
        klass = "other"
    # The type is kept whole (an exit status tells errors apart); numbers in the text are
    # folded, but an HTTP status; line breaks (a command's stderr) become spaces.
    if kind is None:
        label = ""
    elif isinstance(kind, int | float) and not isinstance(kind, bool):
        label = f"exit {kind:g}: "
    else:
        label = f"{_DIGITS.sub('#', str(kind))}: "
    text = " ".join(_DIGITS.sub("#", text).split())
    signature = (label + text).strip()[:120] or "(empty message)"
    return klass, signature


def _number(value: int | str | None) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None
