"""Reading a whole Level 1 log from disk (the shell around ``reader`` and ``stats``).

A large file is cut into byte ranges that start just after a newline and read by forked worker
processes in parallel; their statistics merge into exactly what one front-to-back read gives (the
counts are sums and the sketches are mergeable). Blocks are read at a fixed size, so memory does
not depend on the file's size or its longest line.
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import os
import re
import stat
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from tunerd.reader import DEFAULT_MAX_LINE_BYTES, Batch, LogReader
from tunerd.stats import LogStats

BLOCK = 1 << 20
PARALLEL_MIN_BYTES = 32 << 20
"""Below this a second process costs more than it saves."""


class LogFileError(Exception):
    """The log cannot be read at all (missing, a directory, no permission)."""


@dataclass(frozen=True, slots=True)
class ReadOptions:
    since: float | None = None
    read_at: float = 0.0
    """Epoch seconds of the read: given to lines without a timestamp; lines timestamped more
    than a day after it are malformed (0: not known, any time accepted)."""
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    max_crons: int = 10_000
    bucket_seconds: float | None = None
    """Time buckets of the statistics (None: one bucket for the whole read)."""
    workers: int | None = None
    """Processes for a large file; None: one per CPU (at most 4)."""


def open_log(path: Path) -> BinaryIO:
    """The log opened for reading, never blocking: a FIFO or a device at the path (a mistake in
    ``log_path``) would block ``open`` until a writer came, and reading one would never end.
    ``LogFileError`` names what the path is instead."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise LogFileError(f"cannot read the log {path}: {exc.strerror or exc}") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise LogFileError(f"cannot read the log {path}: it is {kind}, not a file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


_KINDS: Final = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def read_log(path: Path, options: ReadOptions) -> LogStats:
    """Statistics of the whole file at ``path`` (``LogFileError`` when it cannot be read)."""
    try:
        return _read_whole(path, options)
    except OSError as exc:  # a read that fails half-way: an I/O error, a special file
        raise LogFileError(f"cannot read the log {path}: {exc.strerror or exc}") from exc


def _read_whole(path: Path, options: ReadOptions) -> LogStats:
    with open_log(path) as f:
        size = os.fstat(f.fileno()).st_size
    workers = options.workers or min(os.cpu_count() or 1, 4)
    if workers < 2 or size < PARALLEL_MIN_BYTES:
        return _read_range(path, 0, None, options)
    bounds = _split(path, size, workers)
    ranges = list(itertools.pairwise(bounds))
    if len(ranges) < 2:
        return _read_range(path, 0, None, options)
    # Load NumPy before forking so the workers share its pages instead of each loading it
    # (it would be loaded for the first batch anyway). No BLAS thread pool: nothing here uses it.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import numpy  # noqa: F401

    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=len(ranges) - 1, mp_context=context) as pool:
        # This process reads the first range itself while the workers read the others.
        futures = [pool.submit(_read_range, path, start, end, options) for start, end in ranges[1:]]
        merged = _read_range(path, *ranges[0], options)
        for future in futures:
            merged.merge(future.result())
    return merged


_ROTATED = re.compile(r"^(?:\.\d+|-\d{8}(?:\d{2})?)$")
"""What logrotate appends to a rotated file's name: ``.1``, ``.2``..., or a date (``dateext``)."""


def rotated(path: Path, since: float | None) -> list[Path]:
    """The plain files logrotate made of ``path`` that were still written to at ``since`` or
    later (the window a cycle analyses, an experiment's runs), oldest first. Compressed ones
    (``.gz``) are not read: with ``delaycompress`` the latest rotation stays plain."""
    prefix = path.name
    found = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    for candidate in entries:
        name = candidate.name
        if not name.startswith(prefix) or not _ROTATED.match(name[len(prefix) :]):
            continue
        try:
            info = candidate.stat()
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and (since is None or info.st_mtime >= since):
            found.append((info.st_mtime, candidate))
    return [candidate for _, candidate in sorted(found)]


def read_window(path: Path, options: ReadOptions) -> LogStats:
    """``read_log`` of the log and of what rotation moved out of it since ``options.since``: the
    daemon's cycle sees the whole window even when logrotate cut it in two."""
    stats = read_log(path, options)
    for older in rotated(path, options.since):
        try:
            stats.merge(read_log(older, options))
        except LogFileError:
            continue  # rotated away again, or unreadable: the window is what remains
    return stats


def read_batches(
    path: Path, reader: LogReader, start: int = 0, end: int | None = None
) -> Iterator[Batch]:
    """What ``reader`` makes of the file's bytes from ``start`` (a line's start) to ``end`` (EOF
    when None), block by block, and last what it still held (an unterminated last line): the one
    loop every whole-file reader shares. ``OSError`` passes to the caller."""
    remaining = None if end is None else end - start
    with open_log(path) as f:
        f.seek(start)
        while remaining is None or remaining > 0:
            block = f.read(BLOCK if remaining is None else min(BLOCK, remaining))
            if not block:
                break
            if remaining is not None:
                remaining -= len(block)
            yield reader.feed(block)
    yield reader.finish()


def _read_range(path: Path, start: int, end: int | None, options: ReadOptions) -> LogStats:
    """Read ``[start, end)`` (to EOF when ``end`` is None); ``start`` is at a line's start."""
    stats = LogStats(
        since=options.since, bucket_seconds=options.bucket_seconds, max_crons=options.max_crons
    )
    reader = LogReader(start, options.max_line_bytes, options.read_at or None, columnar=True)
    # What reading allocates holds no reference cycles (the decoded structs are not even
    # tracked), but its lists and dicts would wake the cycle collector every few hundred lines
    # to walk everything young: paused for the read, about a tenth of its time.
    collecting = gc.isenabled()
    gc.disable()
    try:
        for batch in read_batches(path, reader, start, end):
            stats.add_entries(batch.entries, options.read_at)
            stats.add_malformed(batch.malformed)
    finally:
        if collecting:
            gc.enable()
    stats.offset = reader.offset
    return stats


def _split(path: Path, size: int, parts: int) -> list[int]:
    """Offsets ``0 = b0 < b1 < ... < size`` where each inner bound follows a newline."""
    bounds = [0]
    with path.open("rb") as f:
        for k in range(1, parts):
            f.seek(max(size * k // parts, bounds[-1]))
            position = f.tell()
            while True:
                block = f.read(1 << 16)
                if not block:
                    position = size
                    break
                newline = block.find(b"\n")
                if newline >= 0:
                    position += newline + 1
                    break
                position += len(block)
            if bounds[-1] < position < size:
                bounds.append(position)
    bounds.append(size)
    return bounds
