"""Shared helpers: log lines in the wrapper's real shape, and the real sample."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
REAL_SAMPLE = ROOT / "tests" / "data" / "real-auto-retry.jsonl"

ERR_429 = {
    "type": "Error",
    "message": "HTTP 429",
    "statusCode": 429,
    "retryable": True,
    "category": "http",
    "suggestedFix": "Rate limit exceeded - increase backoff delay",
}
ERR_TIMEOUT = {
    "type": "ETIMEDOUT",
    "message": "Command failed: yf TQQQ",
    "retryable": True,
    "category": "network",
    "suggestedFix": "Network timeout - check connection",
}
ERR_OTHER = {
    "type": "ECONNRESET",
    "message": "socket hang up 12",
    "retryable": True,
    "category": "network",
    "suggestedFix": "retry later",
}


def run_line(
    cron: str | None = "c",
    durations: tuple[int, ...] = (1000,),
    ok: bool = True,
    error: Any = ERR_OTHER,
    ts: Any = "2026-02-05T04:44:15.848Z",
    total: int | None = None,
    **extra: Any,
) -> str:
    """One wrapper line: failed attempts first, the last one succeeding when ``ok``."""
    attempts = []
    for i, d in enumerate(durations, 1):
        last_ok = ok and i == len(durations)
        a: dict[str, Any] = {"attempt": i, "success": last_ok, "duration": d}
        if not last_ok:
            a["error"] = error
        attempts.append(a)
    rec: dict[str, Any] = {"timestamp": ts, "type": "success" if ok else "failure"}
    if cron is not None:
        rec["context"] = {"cron": cron, "schedule": "*/15 * * * *"}
    rec["attempts"] = attempts
    rec["totalDuration"] = sum(durations) if total is None else total
    if ok:
        rec["result"] = {"output": "x" * 10, "stderr": ""}
    else:
        rec["finalError"] = error
    rec.update(extra)
    return json.dumps(rec, ensure_ascii=False)


@pytest.fixture
def real_sample() -> Path:
    return REAL_SAMPLE
