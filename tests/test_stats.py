"""Per-cron statistics: exact counts, accurate durations, parallel reads equal to serial ones."""

from __future__ import annotations

import json
import pickle
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunerd import logfile
from tunerd import stats as stats_module
from tunerd.logfile import LogFileError, ReadOptions, read_log
from tunerd.reader import LogReader
from tunerd.stats import LogStats

from .conftest import ERR_429, ERR_OTHER, ERR_TIMEOUT, REAL_SAMPLE, run_line


def synthetic_log(
    path: Path, lines: int, crons: int, seed: int = 1
) -> dict[str, dict[str, list[float]]]:
    """A log with every kind of run, and the exact truth computed alongside it."""
    rnd = random.Random(seed)
    truth: dict[str, dict[str, list[float]]] = {}
    with path.open("w", encoding="utf-8") as f:
        for i in range(lines):
            roll = rnd.random()
            if roll < 0.03:
                f.write(run_line(None) + "\n")
                continue
            if roll < 0.04:
                f.write("{garbage\n")
                continue
            cron = f"크론-{rnd.randrange(crons):03d}"
            n = rnd.choice([1, 1, 1, 1, 2, 3])
            ok = rnd.random() > 0.1 or n == 1
            error = rnd.choice([ERR_429, ERR_TIMEOUT, ERR_OTHER])
            durations = tuple(int(rnd.lognormvariate(7, 0.5)) for _ in range(n))
            ts = f"2026-02-{5 + i * 7 // lines:02d}T{rnd.randrange(24):02d}:00:00.000Z"
            f.write(run_line(cron, durations, ok=ok, error=error, ts=ts) + "\n")
            t = truth.setdefault(cron, {"total": [], "ok": [], "retried": [], "errors": []})
            t["total"].append(sum(durations))
            t["ok"].append(ok)
            t["retried"].append(n > 1)
            t["errors"].append(n - 1 if ok else n)
    return truth


def test_counts_exact_and_durations_within_one_percent(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    truth = synthetic_log(log, 40_000, 7)
    stats = read_log(log, ReadOptions())
    assert stats.totals.malformed == pytest.approx(400, rel=0.2)
    for name, t in truth.items():
        w = stats.window(name)
        assert w.runs == len(t["total"])
        assert w.successes == sum(t["ok"])
        assert w.retried == sum(t["retried"])
        assert w.rate_limit + w.timeout + w.other == sum(t["errors"])
        assert w.duration.mean == pytest.approx(float(np.mean(t["total"])), rel=0.01)
        for q in (0.5, 0.95, 0.99):
            exact = float(np.percentile(t["total"], q * 100))
            assert w.duration.quantile(q) == pytest.approx(exact, rel=0.01)


def test_parallel_read_equals_serial_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "log.jsonl"
    synthetic_log(log, 20_000, 30)
    serial = read_log(log, ReadOptions(workers=1))
    monkeypatch.setattr(logfile, "PARALLEL_MIN_BYTES", 1)
    parallel = read_log(log, ReadOptions(workers=3))
    assert parallel.totals == serial.totals
    assert sorted(parallel.crons) == sorted(serial.crons)
    for name in serial.crons:
        a, b = serial.window(name), parallel.window(name)
        assert (a.runs, a.successes, a.retried, a.attempts) == (
            b.runs,
            b.successes,
            b.retried,
            b.attempts,
        )
        assert (a.rate_limit, a.timeout, a.other) == (b.rate_limit, b.timeout, b.other)
        assert a.duration.quantile(0.95) == pytest.approx(b.duration.quantile(0.95), rel=1e-9)
        assert (a.first_at, a.last_at) == (b.first_at, b.last_at)
    assert [m.offset for m in parallel.malformed_samples] == [
        m.offset for m in serial.malformed_samples
    ]


def test_real_sample_totals() -> None:
    stats = read_log(REAL_SAMPLE, ReadOptions())
    t = stats.totals
    assert (t.entries, t.cron_entries, t.test_entries, t.task_entries, t.malformed) == (
        63,
        54,
        3,
        6,
        0,
    )
    assert stats.tasks["fetch TQQQ price"] == 1
    github = stats.window("GitHub 감시")
    assert github.runs == 3 and github.duration.mean == pytest.approx((1203 + 370 + 446) / 3)
    assert stats.crons["GitHub 감시"].schedule == "50 16 * * 1-5"


def test_since_leaves_older_runs_out() -> None:
    since = 1770266655.848 + 1  # just after the first TQQQ run (2026-02-05T04:44:15.848Z)
    stats = read_log(REAL_SAMPLE, ReadOptions(since=since))
    assert stats.window("TQQQ 15분 모니터링").runs == 50
    assert stats.totals.before_since == 4  # the test, the two task runs and the demo before it


def test_crons_beyond_the_cap_are_counted_not_tracked() -> None:
    lines = "".join(run_line(f"cron {i}") + "\n" for i in range(50)).encode()
    stats = LogStats(max_crons=10)
    reader = LogReader()
    stats.add_entries(reader.feed(lines).entries, 0)
    assert len(stats.crons) == 10
    assert stats.totals.untracked_crons == 40
    assert stats.totals.cron_entries == 50


def test_time_buckets_make_a_rolling_window() -> None:
    hour = 3600
    lines = [run_line("c", ts=1770000000000 + i * hour * 1000) for i in range(48)]
    stats = LogStats(bucket_seconds=hour)
    stats.add_entries(LogReader().feed(("\n".join(lines) + "\n").encode()).entries, 0)
    assert stats.window("c").runs == 48
    assert stats.window("c", since=1770000000 + 24 * hour).runs == 24


def test_unreadable_logs_say_why(tmp_path: Path) -> None:
    with pytest.raises(LogFileError, match="No such file"):
        read_log(tmp_path / "missing.jsonl", ReadOptions())
    with pytest.raises(LogFileError, match="directory"):
        read_log(tmp_path, ReadOptions())


def test_timed_out_attempts_tell_a_killed_attempt_from_a_short_one() -> None:
    from tunerd.stats import TimedOut

    a, b = TimedOut(), TimedOut()
    for duration in (10_004, 10_020, 10_950, 150, 2000, 0.5):
        a.add(duration)
    b.add(15_003)
    a.merge(b)
    assert a.count_at_least(0.9 * 10_000) == 4  # killed at 10 s (and one at 15 s)
    assert a.count_at_least(0.9 * 15_000) == 1
    assert a.count_at_least(0) == 7
    assert pickle.loads(pickle.dumps(a)).bins == a.bins


def _state(stats: LogStats) -> object:
    """Everything a ``LogStats`` says, in comparable form."""
    crons = {}
    for name, cron in stats.crons.items():
        buckets = {}
        for key, b in cron.buckets.items():
            sketches = (b.duration, b.first_attempt, b.success_attempt)
            buckets[key] = (
                (b.runs, b.successes, b.retried, b.attempts, b.exhausted, b.non_retryable),
                (b.non_retryable_first, b.first_at, b.last_at),
                [(s.count, round(s.total, 3), s.quantiles((0, 0.5, 0.99, 1))) for s in sketches],
                sorted(
                    (k, v.count, v.retries, v.kind, v.retryable)
                    for k, v in b.errors.signatures.items()
                ),
                sorted(b.timeout_attempt.bins.items()) if b.timeout_attempt else None,
            )
        crons[name] = (buckets, cron.params, cron.params_at, cron.schedule)
    return crons, stats.totals, stats.tasks


RUN = st.fixed_dictionaries(
    {
        "cron": st.sampled_from(["a", "b", "크론", "", None, "c", "d"]),
        "task": st.sampled_from([None, "test", "fetch"]),
        "durations": st.lists(st.integers(0, 40_000), min_size=0, max_size=4),
        "ok": st.booleans(),
        "type": st.sampled_from(["ok", "ok", None, "weird"]),
        "error": st.sampled_from([ERR_429, ERR_TIMEOUT, ERR_OTHER, "plain text", None]),
        "ts": st.one_of(
            st.integers(1_770_000_000, 1_770_400_000).map(
                lambda s: datetime.fromtimestamp(s, UTC).isoformat().replace("+00:00", "Z")
            ),
            st.integers(1_770_000_000_000, 1_770_400_000_000),
            st.just("2026-02-05T04:44:15"),
            st.none(),
        ),
        "total": st.one_of(st.none(), st.integers(0, 90_000)),
        "params": st.one_of(st.none(), st.fixed_dictionaries({"maxRetries": st.integers(1, 9)})),
        "reason": st.sampled_from([None, None, "Non-retryable error"]),
    }
)


def _line(run: dict[str, Any]) -> str:
    attempts = []
    for i, d in enumerate(run["durations"], 1):
        ok = run["ok"] and i == len(run["durations"])
        attempt: dict[str, Any] = {"attempt": i, "success": ok, "duration": d}
        if not ok and run["error"] is not None:
            attempt["error"] = run["error"]
        attempts.append(attempt)
    line: dict[str, Any] = {"attempts": attempts}
    if run["ts"] is not None:
        line["timestamp"] = run["ts"]
    if run["type"] == "ok":
        line["type"] = "success" if run["ok"] else "failure"
    elif run["type"] is not None:
        line["type"] = run["type"]
    context = {k: run[k] for k in ("cron", "task") if run[k] is not None}
    if context:
        line["context"] = context
    for key in ("total", "params", "reason"):
        if run[key] is not None:
            line[{"total": "totalDuration"}.get(key, key)] = run[key]
    if not run["ok"] and run["error"] is not None:
        line["finalError"] = run["error"]
    return json.dumps(line)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(RUN, max_size=60),
    st.sampled_from([None, 1_770_200_000.0]),
    st.sampled_from([None, 3600.0, 86400.0]),
    st.integers(1, 5),
    st.integers(1, 40),
)
def test_columns_count_what_the_entry_loop_counts(
    runs: list[dict[str, Any]], since: float | None, bucket: float | None, cap: int, batch: int
) -> None:
    """Whole-log reads count column-wise; the daemon entry by entry: the same statistics."""
    data = "".join(_line(r) + "\n" for r in runs).encode()
    entries = LogReader().feed(data).entries
    read_at = 1_770_300_000.0
    results = []
    for columns_min in (1, 10**9):
        stats = LogStats(since=since, bucket_seconds=bucket, max_crons=cap)
        previous, stats_module.COLUMNS_MIN = stats_module.COLUMNS_MIN, columns_min
        try:
            for i in range(0, len(entries), batch):
                stats.add_entries(entries[i : i + batch], read_at)
        finally:
            stats_module.COLUMNS_MIN = previous
        results.append(_state(stats))
    assert results[0] == results[1]
