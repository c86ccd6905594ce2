"""Following the Level 1 log across rotation, truncation and restarts (the shell around ``reader``).

``Follower.poll`` stats the path and reads whatever is new, to the end of the file; the daemon calls
it whenever watchfiles reports a change in the log's directory and on a timer (events are only
wake-ups: they can be dropped or merged, a poll never is). It handles what the trusted log shippers
learned to handle (Vector, Filebeat, Fluent Bit):

- **identity** is the device and inode *and* a hash of the file's first bytes, since inode numbers
  are reused after a delete and a create;
- **rotation by rename** (``log`` -> ``log.1``, new ``log``): the old handle is read to its end
  before the new file is read from its start;
- **copytruncate** and **truncation**: a size below the offset, or bytes before the offset that
  are not the ones read there (a hash of the last bytes read, Fluent Bit's offset marker: it catches
  a file truncated and regrown past the offset), restarts at 0;
- **deletion**: the open handle is drained, then the path is waited for;
- **restarts**: the checkpoint (identity, offset, marker) says where to resume; a file rotated while
  tunerd was down is found beside the path by its identity and drained first; a file rewritten
  with the same content (an editor's atomic replace) resumes at the same offset;
- **partial lines** stay in the reader until their newline; the checkpoint offset is always the
  end of the last complete line, so a restart re-reads the partial line rather than losing it.

Lines written between copytruncate's copy and its truncate are lost for every follower; the
operator guide says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tunerd.logfile import LogFileError, open_log
from tunerd.reader import DEFAULT_MAX_LINE_BYTES, Batch, LogReader

HEAD_BYTES = 1024
"""Bytes of the file's start that identify it (fewer while the file is shorter)."""
MARKER_BYTES = 64
"""Bytes before the offset whose hash must match on resume."""
BLOCK = 1 << 20
POLL_BYTES = 1 << 20
"""Bytes read by one poll at most: a catch-up after downtime goes in bounded steps, small enough
that their transient entries do not fragment the heap the daemon's long-lived statistics share
(8 MiB steps left ~17 MB more resident), large enough for hundreds of thousands of lines a
second."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where reading stopped, and how to recognise the file again."""

    path: str
    dev: int
    ino: int
    offset: int
    head_len: int
    head_hash: str
    marker_hash: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Poll:
    """What one poll read, and what happened to the file."""

    batch: Batch = field(default_factory=Batch)
    events: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """What keeps the log from being read (a FIFO at its path, a read error): said once each."""
    more: bool = False
    """Stopped at the byte budget with more to read: poll again."""
    budget: int = 0

    def take(self, other: Batch) -> None:
        self.batch.entries += other.entries
        self.batch.malformed += other.malformed


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pread(f: BinaryIO, offset: int, size: int) -> bytes:
    return os.pread(f.fileno(), size, offset)


class Follower:
    def __init__(
        self,
        path: Path,
        checkpoint: Checkpoint | None = None,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> None:
        self.path = path
        self.max_line_bytes = max_line_bytes
        self._file: BinaryIO | None = None
        self._stat: os.stat_result | None = None
        self._reader = self._new_reader()
        self._resume = checkpoint
        self._mark: Checkpoint | None = None
        self._problem: str | None = None
        """Why the path could not be opened, last time (a FIFO, no permission)."""

    def _new_reader(self, offset: int = 0) -> LogReader:
        """A reader whose clock is the machine's: a line from more than a day ahead is
        malformed (``poll`` moves the clock on)."""
        return LogReader(offset, self.max_line_bytes, time.time())

    # --- state ----------------------------------------------------------------------------

    @property
    def offset(self) -> int:
        return self._reader.offset

    def checkpoint(self) -> Checkpoint | None:
        """Where to resume: the end of the last complete line read, with the file's identity as
        it was when those bytes were read (None before any file was seen)."""
        return self._mark if self._mark is not None else self._resume

    def _remember(self) -> None:
        """Note the identity and the offset marker of what was just read."""
        assert self._file is not None and self._stat is not None
        offset = self._reader.offset
        head_len = min(HEAD_BYTES, offset)
        marker_start = max(0, offset - MARKER_BYTES)
        self._mark = Checkpoint(
            str(self.path),
            self._stat.st_dev,
            self._stat.st_ino,
            offset,
            head_len,
            _hash(_pread(self._file, 0, head_len)),
            _hash(_pread(self._file, marker_start, offset - marker_start)),
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._stat = None

    # --- polling --------------------------------------------------------------------------

    def poll(self, max_bytes: int = POLL_BYTES) -> Poll:
        """Read what is new, up to about ``max_bytes`` (``more`` says whether to poll again at
        once): memory stays bounded however far behind the log is. Never raises for what the
        file system does to the log."""
        result = Poll(budget=max_bytes)
        self._reader.set_now(time.time())
        if self._file is None:
            self._open(result)
            if self._file is None:
                return result
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        assert self._stat is not None
        same = current is not None and (current.st_dev, current.st_ino) == (
            self._stat.st_dev,
            self._stat.st_ino,
        )
        if not same:
            # Renamed away or deleted: what was written to the old file before it went is ours.
            self._drain(result)
            if result.more:
                return result  # the rest of the old file first, at the next poll
            if current is None:
                result.events.append("deleted")
                # Moved away and back (the same bytes) goes on where it was; a new file from 0.
                self._resume, self._mark = self.checkpoint(), None
                self.close()
                return result
            result.events.append("rotated")
            mark = self._mark
            self.close()
            # A new file that holds what was read (an editor's atomic rewrite) goes on from there.
            if not self._open_new(result, resume_at=mark, quiet=True):
                return result
        elif self._truncated(current):
            result.events.append("truncated")
            self._restart(result)
        self._drain(result)
        return result

    def _truncated(self, current: os.stat_result | None) -> bool:
        """Smaller than what was read, or different where it was read (regrown past it)."""
        if current is None or self._stat is None:
            return False
        if current.st_size < self._reader.offset + self._reader.pending_bytes:
            return True
        if current.st_size == self._stat.st_size or self._mark is None or not self._mark.offset:
            return False
        assert self._file is not None
        return not self._matches(self._file, self._mark)

    @staticmethod
    def _matches(f: BinaryIO, checkpoint: Checkpoint) -> bool:
        size = os.fstat(f.fileno()).st_size
        if size < checkpoint.offset:
            return False
        head = _hash(_pread(f, 0, checkpoint.head_len))
        start = max(0, checkpoint.offset - MARKER_BYTES)
        marker = _hash(_pread(f, start, checkpoint.offset - start))
        return head == checkpoint.head_hash and marker == checkpoint.marker_hash

    def _restart(self, result: Poll) -> None:
        """Start the same file over from 0 (truncated); a held partial line is dropped."""
        self._reader = self._new_reader()
        self._mark = None

    def _open(self, result: Poll) -> None:
        """First open, or re-open after a deletion: resume from the checkpoint if it still fits.
        The checkpoint is kept until a file is actually open (the path may be missing a while)."""
        resume = self._resume
        if resume is not None:
            rotated = self._find_rotated(resume)
            if rotated is not None:
                result.events.append("rotated while stopped")
                result.budget = 1 << 62  # this catch-up spans files: it is read in one go
                f, st = rotated
                self._file, self._stat = f, st
                self._reader = self._new_reader(resume.offset)
                self._resume = None
                self._drain(result)
                self.close()
                # Rotated more than once: the files written after it, oldest first, whole.
                for later in self._rotated_after(st):
                    self._file, self._stat = later
                    self._reader = self._new_reader()
                    self._drain(result)
                    self.close()
                self._open_new(result, resume_at=None)
                return
        if self._open_new(result, resume_at=resume):
            self._resume = None

    def _open_new(self, result: Poll, resume_at: Checkpoint | None, quiet: bool = False) -> bool:
        """Open the file at the path (from 0, or at ``resume_at`` if it still fits)."""
        try:
            f = open_log(self.path)
        except LogFileError as exc:
            problem = None if isinstance(exc.__cause__, FileNotFoundError) else str(exc)
            if problem is not None and problem != self._problem:
                result.problems.append(problem)  # said once, not at every poll
            self._problem = problem
            return False
        self._problem = None
        st = os.fstat(f.fileno())
        offset = 0
        if resume_at is not None and resume_at.offset:
            if self._matches(f, resume_at):
                offset = resume_at.offset
            elif not quiet:
                result.events.append("replaced while stopped")
        self._file, self._stat = f, st
        self._reader = self._new_reader(offset)
        self._mark = None
        result.events.append(f"opened at byte {offset}")
        return True

    def _find_rotated(self, checkpoint: Checkpoint) -> tuple[BinaryIO, os.stat_result] | None:
        """The checkpointed file under another name beside the path (rotated while stopped)."""
        with contextlib.suppress(OSError):
            current = os.stat(self.path)
            if (current.st_dev, current.st_ino) == (checkpoint.dev, checkpoint.ino):
                return None  # still at its path
        try:
            candidates = [p for p in self.path.parent.iterdir() if p != self.path]
        except OSError:
            return None
        for candidate in candidates:
            try:
                st = os.stat(candidate)
                if (st.st_dev, st.st_ino) != (checkpoint.dev, checkpoint.ino):
                    continue
                f = open_log(candidate)
            except (OSError, LogFileError):
                continue
            if self._matches(f, checkpoint):
                return f, os.fstat(f.fileno())
            f.close()
        return None

    def _rotated_after(self, first: os.stat_result) -> list[tuple[BinaryIO, os.stat_result]]:
        """Rotated siblings (``name.1``, ``name-20260205``, not compressed ones) last written
        after ``first``: written while tunerd was down, after the file it was reading."""
        found = []
        for candidate in self.path.parent.iterdir():
            name = candidate.name
            if candidate == self.path or not name.startswith(
                (self.path.name + ".", self.path.name + "-")
            ):
                continue
            if name.endswith((".gz", ".bz2", ".xz", ".zst", ".tmp")):
                continue
            try:
                f = open_log(candidate)
            except LogFileError:
                continue
            st = os.fstat(f.fileno())
            is_first = (st.st_dev, st.st_ino) == (first.st_dev, first.st_ino)
            if is_first or st.st_mtime_ns < first.st_mtime_ns:  # open_log took regular files
                f.close()
                continue
            found.append((f, st))
        return sorted(found, key=lambda pair: pair[1].st_mtime_ns)

    def _drain(self, result: Poll) -> None:
        """Read the open file from where the reader stands to its end."""
        if self._file is None:
            return
        position = start = self._reader.offset + self._reader.pending_bytes
        while True:
            if result.budget <= 0:
                result.more = True
                break
            try:
                block = _pread(self._file, position, min(BLOCK, result.budget))
            except OSError as exc:
                result.problems.append(f"read error: {exc.strerror or exc}")
                return
            if not block:
                break
            position += len(block)
            result.budget -= len(block)
            result.take(self._reader.feed(block))
        self._stat = os.fstat(self._file.fileno())
        if position != start or self._mark is None:
            self._remember()
