"""The follower on real files: rotation, truncation, deletion, restarts, partial and huge lines.
Every scenario counts each line exactly once."""

from __future__ import annotations

import os
from pathlib import Path

from tunerd.follower import Checkpoint, Follower

from .conftest import run_line


def lines(n: int, start: int = 0, cron: str = "c") -> bytes:
    return "".join(run_line(f"{cron}{i}") + "\n" for i in range(start, start + n)).encode()


def names(follower: Follower, polls: int = 1) -> list[str]:
    out = []
    for _ in range(polls):
        out += [e.cron or "" for e in follower.poll().batch.entries]
    return out


def read_and_stop(log: Path) -> Checkpoint | None:
    """A daemon that read the log to its end, then stopped: where it would resume."""
    f = Follower(log)
    names(f)
    checkpoint = f.checkpoint()
    f.close()
    return checkpoint


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def test_partial_lines_wait_and_restarts_resume(tmp_path: Path) -> None:
    log = tmp_path / "auto-retry.jsonl"
    line = run_line("half").encode()
    log.write_bytes(lines(3) + line[:40])
    f = Follower(log)
    assert names(f) == ["c0", "c1", "c2"]
    checkpoint = f.checkpoint()
    assert checkpoint is not None and checkpoint.offset == len(lines(3))
    f.close()
    append(log, line[40:] + b"\n")
    g = Follower(log, checkpoint)  # as after a SIGKILL: the partial line is read again, whole
    assert names(g) == ["half"]
    assert names(g) == []


def test_waits_for_a_missing_file(tmp_path: Path) -> None:
    log = tmp_path / "auto-retry.jsonl"
    f = Follower(log)
    assert f.poll().batch.entries == []
    log.write_bytes(lines(2))
    assert names(f) == ["c0", "c1"]


def test_rename_rotation_while_writing(tmp_path: Path) -> None:
    log = tmp_path / "auto-retry.jsonl"
    log.write_bytes(lines(5))
    f = Follower(log)
    assert len(names(f)) == 5
    append(log, lines(3, 5))  # written, not yet read, then rotated away
    log.rename(tmp_path / "auto-retry.jsonl.1")
    log.write_bytes(lines(2, 100))
    poll = f.poll()
    assert "rotated" in poll.events
    assert [e.cron for e in poll.batch.entries] == ["c5", "c6", "c7", "c100", "c101"]


def test_rotation_while_stopped_drains_the_rotated_file_first(tmp_path: Path) -> None:
    log = tmp_path / "auto-retry.jsonl"
    log.write_bytes(lines(4))
    checkpoint = read_and_stop(log)
    append(log, lines(2, 4))
    log.rename(tmp_path / "auto-retry.jsonl.1")
    log.write_bytes(lines(3, 10))
    g = Follower(log, checkpoint)
    poll = g.poll()
    assert "rotated while stopped" in poll.events
    assert [e.cron for e in poll.batch.entries] == ["c4", "c5", "c10", "c11", "c12"]


def test_copytruncate(tmp_path: Path) -> None:
    log = tmp_path / "auto-retry.jsonl"
    log.write_bytes(lines(5))
    f = Follower(log)
    names(f)
    (tmp_path / "auto-retry.jsonl.1").write_bytes(log.read_bytes())  # the copy
    with log.open("r+b") as handle:  # the truncate, in place (same inode)
        handle.truncate(0)
    append(log, lines(2, 50))
    poll = f.poll()
    assert "truncated" in poll.events
    assert [e.cron for e in poll.batch.entries] == ["c50", "c51"]


def test_truncated_and_regrown_past_the_offset_with_the_same_first_line(tmp_path: Path) -> None:
    log = tmp_path / "auto-retry.jsonl"
    first = lines(1)
    log.write_bytes(first + lines(3, 1))
    f = Follower(log)
    assert len(names(f)) == 4
    with log.open("r+b") as handle:
        handle.truncate(0)
    append(log, first + lines(10, 200))  # same head, longer than before, different content
    poll = f.poll()
    assert "truncated" in poll.events
    assert [e.cron for e in poll.batch.entries] == ["c0"] + [f"c{i}" for i in range(200, 210)]


def test_replaced_while_stopped_with_the_same_header(tmp_path: Path) -> None:
    log = tmp_path / "auto-retry.jsonl"
    first = lines(1)
    log.write_bytes(first + lines(2, 1))
    checkpoint = read_and_stop(log)
    log.unlink()
    log.write_bytes(first + lines(6, 300))
    g = Follower(log, checkpoint)
    poll = g.poll()
    assert "replaced while stopped" in poll.events
    assert [e.cron for e in poll.batch.entries] == ["c0"] + [f"c{i}" for i in range(300, 306)]


def test_rewritten_in_place_while_stopped_is_read_from_the_start(tmp_path: Path) -> None:
    log = tmp_path / "auto-retry.jsonl"
    log.write_bytes(lines(3))
    checkpoint = read_and_stop(log)
    with log.open("r+b") as handle:  # same inode (as when an inode is reused), other content
        handle.truncate(0)
        handle.write(lines(5, 40))
    g = Follower(log, checkpoint)
    assert names(g) == [f"c{i}" for i in range(40, 45)]


def test_deleted_with_a_backlog_then_recreated(tmp_path: Path) -> None:
    log = tmp_path / "auto-retry.jsonl"
    log.write_bytes(lines(2))
    f = Follower(log)
    names(f)
    append(log, lines(3, 2))
    log.unlink()
    poll = f.poll()
    assert "deleted" in poll.events and [e.cron for e in poll.batch.entries] == ["c2", "c3", "c4"]
    assert f.poll().batch.entries == []
    log.write_bytes(lines(1, 9))
    assert names(f) == ["c9"]


def test_moved_away_and_back_is_not_read_twice(tmp_path: Path) -> None:
    """`mv log away; mv away log` while the daemon runs: the same bytes go on where they were."""
    log = tmp_path / "auto-retry.jsonl"
    log.write_bytes(lines(3))
    f = Follower(log)
    assert names(f) == ["c0", "c1", "c2"]
    away = tmp_path / "elsewhere.jsonl"
    log.rename(away)
    assert "deleted" in f.poll().events
    away.rename(log)
    append(log, lines(1, 3))
    assert names(f) == ["c3"]


def test_an_editors_atomic_rewrite_is_not_read_twice(tmp_path: Path) -> None:
    log = tmp_path / "auto-retry.jsonl"
    log.write_bytes(lines(4))
    f = Follower(log)
    names(f)
    temporary = tmp_path / ".auto-retry.jsonl.swp"
    temporary.write_bytes(lines(4) + lines(2, 4))
    os.replace(temporary, log)
    poll = f.poll()
    assert "rotated" in poll.events
    assert [e.cron for e in poll.batch.entries] == ["c4", "c5"]


def test_a_huge_line_between_good_ones_under_a_small_cap(tmp_path: Path) -> None:
    log = tmp_path / "auto-retry.jsonl"
    huge = run_line("huge", result={"output": "y" * (5 << 20)}).encode() + b"\n"
    log.write_bytes(lines(1) + huge + lines(1, 1))
    f = Follower(log, max_line_bytes=1 << 20)
    poll = f.poll(max_bytes=8 << 20)  # the whole file in one poll
    assert [e.cron for e in poll.batch.entries] == ["c0", "c1"]
    assert [m.offset for m in poll.batch.malformed] == [len(lines(1))]
    assert f.offset == log.stat().st_size


def test_rotated_twice_while_stopped(tmp_path: Path) -> None:
    log = tmp_path / "auto-retry.jsonl"
    log.write_bytes(lines(3))
    checkpoint = read_and_stop(log)
    append(log, lines(1, 3))
    log.rename(tmp_path / "auto-retry.jsonl.1")
    os.utime(tmp_path / "auto-retry.jsonl.1", (1_000_000, 1_000_000))  # the older file
    log.write_bytes(lines(2, 10))
    log.rename(tmp_path / "auto-retry.jsonl.2")  # (a numbering that does not say the order)
    (tmp_path / "auto-retry.jsonl.9.gz").write_bytes(b"\x1f\x8b compressed, not ours")
    log.write_bytes(lines(1, 20))
    g = Follower(log, checkpoint)
    assert names(g) == ["c3", "c10", "c11", "c20"]


def test_a_long_backlog_is_read_in_bounded_steps(tmp_path: Path) -> None:
    log = tmp_path / "auto-retry.jsonl"
    log.write_bytes(lines(2000))
    f = Follower(log)
    steps, seen = 0, []
    while True:
        poll = f.poll(max_bytes=64 << 10)
        seen += [e.cron for e in poll.batch.entries]
        steps += 1
        assert len(poll.batch.entries) < 2000
        if not poll.more:
            break
    assert seen == [f"c{i}" for i in range(2000)] and steps > 3
    log.rename(tmp_path / "auto-retry.jsonl.1")  # rotation with a backlog in the old file
    append(tmp_path / "auto-retry.jsonl.1", lines(1500, 5000))
    log.write_bytes(lines(3, 9000))
    seen = []
    while True:
        poll = f.poll(max_bytes=64 << 10)
        seen += [e.cron for e in poll.batch.entries]
        if not poll.more:
            break
    assert seen == [f"c{i}" for i in range(5000, 6500)] + ["c9000", "c9001", "c9002"]


def test_a_fifo_at_the_path_is_a_problem_said_once(tmp_path: Path) -> None:
    """The daemon logs a problem as a warning, once; the follower never blocks on it and picks
    up a real file that takes its place."""
    log = tmp_path / "auto-retry.jsonl"
    os.mkfifo(log)
    f = Follower(log)
    first = f.poll()
    assert [p for p in first.problems if "named pipe" in p] and not first.events
    assert f.poll().problems == []
    log.unlink()
    log.write_bytes(lines(2))
    assert names(f) == ["c0", "c1"]
