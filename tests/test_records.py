"""Error classes and entry semantics, on the wrapper's real error objects."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import msgspec
import pytest

from tunerd.records import (
    Entry,
    classify_error,
    describe_error,
    failure_cause,
    is_test,
    non_retryable_at_first,
    to_datetime,
)

from .conftest import ERR_429, ERR_OTHER, ERR_TIMEOUT, run_line


def raw(value: object) -> bytes:
    return msgspec.json.encode(value)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ERR_429, "rate_limit"),
        ({"type": "Error", "message": "boom", "status": "429"}, "rate_limit"),
        ({"type": "Error", "message": "boom", "code": 429}, "rate_limit"),
        ({"message": "Too Many Requests"}, "rate_limit"),
        ({"message": "upstream rate-limit hit"}, "rate_limit"),
        ("HTTP 429 from api", "rate_limit"),
        # The wrapper maps a child killed by its timeout to ETIMEDOUT but labels it "network".
        (ERR_TIMEOUT, "timeout"),
        ({"type": "Error", "message": "x", "code": "ETIMEDOUT"}, "timeout"),
        ({"type": "Error", "message": "x", "category": "timeout"}, "timeout"),
        ({"message": "request timed out"}, "timeout"),
        ("Timeout awaiting 'request'", "timeout"),
        (ERR_OTHER, "other"),
        ({"type": 1, "message": "Command failed: exit code 1"}, "other"),
        ({"type": "Error", "message": "x", "category": "network"}, "other"),
        (None, "other"),
        (42, "other"),
        (["odd"], "other"),
    ],
)
def test_error_classes(error: object, expected: str) -> None:
    assert classify_error(raw(error)) == expected


def test_missing_error_is_other_with_a_signature() -> None:
    kind, signature, fix, retryable = describe_error(b"")
    assert (kind, fix, retryable) == ("other", None, False)
    assert signature


def test_signature_folds_numbers_and_keeps_the_fix() -> None:
    _, a, fix, _ = describe_error(
        raw({"type": "E", "message": "port 8080 closed", "suggestedFix": "f"})
    )
    _, b, _, _ = describe_error(raw({"type": "E", "message": "port 9090 closed"}))
    assert a == b == "E: port # closed"
    assert fix == "f"


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        # the wrapper's own flag wins
        ({"type": 1, "message": "Command failed: job", "retryable": False}, False),
        ({"type": "Error", "message": "HTTP 429", "statusCode": 429, "retryable": True}, True),
        # without it, the wrapper's rule: a network code, a transient status, "timeout"
        ({"type": "ECONNRESET", "message": "socket hang up"}, True),
        ({"type": "Error", "message": "bad gateway", "statusCode": 502}, True),
        ({"type": "Error", "message": "HTTP 404", "statusCode": 404}, False),
        ({"type": 1, "message": "Command failed: job\nread timeout"}, True),
        ({"type": 1, "message": "Command failed: job\nTimeout"}, False),  # case-sensitive
        ({"type": 1, "message": "Command failed: job"}, False),
        ("ETIMEDOUT while fetching", False),
        ("socket timeout", True),
    ],
)
def test_retryable_as_the_wrapper_decides(error: object, retryable: bool) -> None:
    assert describe_error(raw(error)).retryable is retryable


def _entry(line: dict[str, object]) -> Entry:
    return msgspec.json.decode(json.dumps(line).encode(), type=Entry)


NOT_RETRIED = {"type": 1, "message": "Command failed: job", "retryable": False}
RETRIED = {"type": "ETIMEDOUT", "message": "Command failed: job", "retryable": True}


@pytest.mark.parametrize(
    ("attempts", "reason", "cause", "at_first"),
    [
        ([RETRIED, RETRIED, RETRIED], None, "exhausted", False),
        ([NOT_RETRIED], "Non-retryable error", "non_retryable", True),
        ([RETRIED, NOT_RETRIED], "Non-retryable error", "non_retryable", False),
        # at the last attempt the wrapper writes no reason, even for an error it does not retry
        ([RETRIED, RETRIED, NOT_RETRIED], None, "non_retryable", False),
        ([NOT_RETRIED], None, "non_retryable", True),  # maxRetries 1
        ([RETRIED], "interrupted by SIGTERM", "other", False),
        ([], None, "other", False),
    ],
)
def test_failure_causes(
    attempts: list[dict[str, object]], reason: str | None, cause: str, at_first: bool
) -> None:
    line: dict[str, object] = {
        "type": "failure",
        "attempts": [{"attempt": i, "success": False, "error": e} for i, e in enumerate(attempts)],
    }
    if reason:
        line["reason"] = reason
    entry = _entry(line)
    assert failure_cause(entry) == cause
    assert non_retryable_at_first(entry) is at_first


def test_test_entries() -> None:
    decode = msgspec.json.Decoder(Entry).decode
    assert is_test(decode(b'{"context": {"task": "test"}}').context)  # type: ignore[arg-type]
    assert is_test(decode(b'{"context": {"demo": "simulated failure"}}').context)  # type: ignore[arg-type]
    assert not is_test(decode(b'{"context": {"task": "fetch TQQQ"}}').context)  # type: ignore[arg-type]


def test_timestamps_iso_epoch_naive_missing() -> None:
    decode = msgspec.json.Decoder(Entry).decode
    default = datetime(2030, 1, 1, tzinfo=UTC)
    iso = decode(run_line(ts="2026-02-05T04:44:15.848Z").encode())
    epoch = decode(run_line(ts=1770266655848).encode())
    naive = decode(run_line(ts="2026-02-05T04:44:15.848").encode())
    missing = decode(b'{"type": "success"}')
    assert iso.when(default) == epoch.when(default) == naive.when(default)
    assert iso.when(default).timestamp() == pytest.approx(1770266655.848)
    assert missing.when(default) == default
    assert to_datetime(None, default) is default


def test_succeeded_and_duration_fallbacks() -> None:
    decode = msgspec.json.Decoder(Entry).decode
    untyped = decode(
        b'{"attempts": [{"success": false, "duration": 5}, {"success": true, "duration": 7}]}'
    )
    assert untyped.succeeded and untyped.duration == 12
    assert not decode(b'{"type": "error"}').succeeded  # anything but "success" is a failure
