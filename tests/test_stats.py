"""Per-cron statistics: exact counts, accurate durations, parallel reads equal to serial ones."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from tunerd import logfile
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
