"""Error classes and entry semantics, on the wrapper's real error objects."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from tunerd.records import Entry, classify_error, describe_error, is_test, to_datetime

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
    kind, signature, fix = describe_error(b"")
    assert (kind, fix) == ("other", None)
    assert signature


def test_signature_folds_numbers_and_keeps_the_fix() -> None:
    _, a, fix = describe_error(
        raw({"type": "E", "message": "port 8080 closed", "suggestedFix": "f"})
    )
    _, b, _ = describe_error(raw({"type": "E", "message": "port 9090 closed"}))
    assert a == b == "E: port # closed"
    assert fix == "f"


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
