"""Incremental, tolerant framing and decoding of the Level 1 log (pure: bytes in, entries out).

``LogReader.feed`` takes whatever bytes arrived (a 1 MiB block of a file, or a partial write the
daemon just saw) and returns the entries of the lines they completed. An incomplete last line waits
for its newline; ``finish`` decodes it when the caller knows no more is coming (a whole-file read).
Feeding a file in one piece or byte by byte gives the same entries and the same malformed reports.

Malformed input is reported, never raised: bad JSON, invalid UTF-8, a non-object, a field of the
wrong type, a value outside what the format allows (a negative or absurd duration, a timestamp
past the reader's ``horizon``), or a line over ``max_line_bytes`` (which is skipped to its newline
without ever being held in memory whole). Each report carries the byte offset where the line
starts.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import msgspec

from tunerd.records import Entry, to_datetime

DEFAULT_MAX_LINE_BYTES: Final = 64 * 1024 * 1024
"""Well above the wrapper's 10 MB ``result`` buffer plus the rest of the line."""

FUTURE_SKEW: Final = 86400.0
"""How far ahead of the reader's clock a line may be (a clock set a little wrong). A line from
further ahead would stay in every window for years and drive proposals on its own: malformed."""

WHOLE_MIN_BYTES: Final = 256 * 1024
"""Blocks this long or longer are decoded whole by a columnar reader: a short log (or the end of
one) never pays for importing NumPy. (Bytes, not lines: counting newlines costs a third of
decoding them.)"""

EARLIEST: Final = datetime(2000, 1, 1, tzinfo=UTC)
"""No run of a Level 1 wrapper is older: a line from before (a clock reset to 1970, a
``0001-01-01``) would stretch every period it falls in and make rates meaningless."""
EARLIEST_MS: Final = EARLIEST.timestamp() * 1000.0

_DECODER: Final = msgspec.json.Decoder(Entry)
_BOM: Final = b"\xef\xbb\xbf"
_TIMESTAMP: Final = operator.attrgetter("timestamp")


@dataclass(frozen=True, slots=True)
class Malformed:
    offset: int
    """Byte offset of the start of the line in the file."""
    reason: str


@dataclass(slots=True)
class Batch:
    entries: list[Entry] = field(default_factory=list)
    malformed: list[Malformed] = field(default_factory=list)


class LogReader:
    """Turns a byte stream into entries, one complete line at a time."""

    def __init__(
        self,
        offset: int = 0,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        now: float | None = None,
        columnar: bool = False,
    ) -> None:
        """``now`` (epoch seconds): lines timestamped more than ``FUTURE_SKEW`` after it are
        malformed; None accepts any time (a reader of old logs has no clock to trust).
        ``columnar``: whole blocks are framed with NumPy and decoded in one call (a whole-log
        read, which imports NumPy anyway); the daemon's follower decodes line by line and never
        loads it."""
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be positive")
        self.max_line_bytes = max_line_bytes
        self.columnar = columnar
        self._horizon: tuple[float, datetime] | None = None
        self.set_now(now)
        self._offset = offset  # file offset of the first byte not yet consumed as a whole line
        self._partial = bytearray()  # an incomplete last line, while it is within the cap
        self._skipped: int | None = None  # bytes of an over-long line discarded so far

    def set_now(self, now: float | None) -> None:
        """The reader's clock moved on (a follower sets it before each read)."""
        if now is None:
            self._horizon = None
        else:
            limit = now + FUTURE_SKEW
            self._horizon = (limit * 1000.0, datetime.fromtimestamp(limit, UTC))

    @property
    def offset(self) -> int:
        """End of the last complete line consumed: where to resume after a restart."""
        return self._offset

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete last line held (or skipped) since ``offset``."""
        return self._skipped if self._skipped is not None else len(self._partial)

    def feed(self, data: bytes) -> Batch:
        batch = Batch()
        start = 0
        while start < len(data):
            first = data.find(b"\n", start)
            if first < 0:
                self._hold(data, start)
                break
            if self._skipped is not None:
                self._too_long(batch)
                self._offset += self._skipped + first + 1 - start
                self._skipped = None
            elif self._partial:
                self._partial += data[start : first + 1]
                self._decode_block(bytes(self._partial), batch)
                self._partial.clear()
            else:
                last = data.rfind(b"\n", start)
                self._decode_block(data[start : last + 1], batch)
                first = last
            start = first + 1
        return batch

    def finish(self) -> Batch:
        """Decode an unterminated last line: for a whole-file read, where nothing more will come."""
        batch = Batch()
        if self._skipped is not None:
            self._too_long(batch)
            self._offset += self._skipped
            self._skipped = None
        elif self._partial:
            self._decode_block(bytes(self._partial), batch)
            self._partial.clear()
        return batch

    def _hold(self, data: bytes, start: int) -> None:
        """Keep an incomplete line; past the cap, stop keeping it and only count its bytes."""
        if self._skipped is not None:
            self._skipped += len(data) - start
        elif len(self._partial) + len(data) - start > self.max_line_bytes:
            self._skipped = len(self._partial) + len(data) - start
            self._partial = bytearray()
        else:
            self._partial += data[start:]

    def _too_long(self, batch: Batch, offset: int | None = None) -> None:
        batch.malformed.append(
            Malformed(
                self._offset if offset is None else offset,
                f"line longer than the {self.max_line_bytes}-byte cap: skipped",
            )
        )

    def _decode_block(self, block: bytes, batch: Batch) -> None:
        """Decode the complete lines of ``block`` (which starts at ``offset``) and consume them.

        The fast path decodes line after line with no bookkeeping; at the first line it cannot
        take, the careful path takes over from that line, tracking offsets for the reports.
        """
        if self.columnar and len(block) >= WHOLE_MIN_BYTES and self._decode_whole(block, batch):
            self._offset += len(block)
            return
        lines = block.split(b"\n")
        if block.endswith(b"\n"):
            lines.pop()
        entries = batch.entries
        done = 0
        if len(block) <= self.max_line_bytes and _valid_utf8(block):
            before = len(entries)
            try:
                entries.extend(map(_DECODER.decode, lines))  # keeps what it got before a failure
            except (msgspec.DecodeError, RecursionError):
                done = len(entries) - before
            else:
                done = len(lines)
            if self._horizon is not None:
                self._drop_out_of_range(block, before, batch)
        if done < len(lines):
            offset = self._offset + sum(len(line) + 1 for line in lines[:done])
            for line in lines[done:]:
                self._decode_line(line, offset, batch)
                offset += len(line) + 1
        self._offset += len(block)

    def _decode_whole(self, block: bytes, batch: Batch) -> bool:
        """Decode ``block`` in one ``decode_lines`` call, if it is surely one object per line.

        ``decode_lines`` alone would take two objects on one line, or one object over several,
        as well as one per line. A raw newline cannot be inside a JSON string, so when every
        newline is preceded by ``}`` (or ``}\\r``) and followed by ``{`` (but the last), the
        decoder returns one item per newline, and every line is within the cap, each line was
        exactly one object. Anything else (a blank line, a BOM, a malformed line) is left to the
        line-by-line path, which reports it with its offset. False when not taken."""
        import numpy as np

        data = np.frombuffer(block, np.uint8)
        ends = np.flatnonzero(data == 0x0A)
        if not len(ends) or ends[-1] != len(data) - 1 or data[0] != 0x7B:
            return False
        closed = data[ends - 1] == 0x7D
        if not closed.all():
            closed |= (data[ends - 1] == 0x0D) & (data[np.maximum(ends - 2, 0)] == 0x7D)
            if not closed.all():
                return False
        if not (data[ends[:-1] + 1] == 0x7B).all() or not _valid_utf8(block):
            return False
        if len(block) > self.max_line_bytes:
            longest = int(np.diff(ends, prepend=-1).max()) - 1
            if longest > self.max_line_bytes:
                return False
        try:
            entries = _DECODER.decode_lines(block)
        except (msgspec.DecodeError, RecursionError):
            return False
        if len(entries) != len(ends):
            return False
        first = len(batch.entries)
        batch.entries += entries
        if self._horizon is not None:
            self._drop_out_of_range(block, first, batch)
        return True

    def _decode_line(self, line: bytes, offset: int, batch: Batch) -> None:
        if len(line) > self.max_line_bytes:
            self._too_long(batch, offset)
            return
        text = line.strip(b" \t\r\x00")
        if text.startswith(_BOM):
            text = text[len(_BOM) :].lstrip()
        if not text:
            return  # blank lines (and NUL padding left by copytruncate) are not data
        if not _valid_utf8(text):
            batch.malformed.append(Malformed(offset, "invalid UTF-8"))
            return
        try:
            entry = _DECODER.decode(text)
        except msgspec.ValidationError as exc:
            batch.malformed.append(Malformed(offset, f"wrong shape: {exc}"))
        except (msgspec.DecodeError, RecursionError) as exc:
            batch.malformed.append(Malformed(offset, f"not JSON: {exc}"))
        else:
            if self._horizon is not None and (why := _out_of_range(entry, self._horizon[1])):
                batch.malformed.append(Malformed(offset, why))
            else:
                batch.entries.append(entry)

    def _drop_out_of_range(self, block: bytes, first: int, batch: Batch) -> None:
        """Take the entries decoded from ``block`` (from ``first`` on, one per line) whose time
        is out of range (past the horizon, or before ``EARLIEST``) out of the batch, as
        malformed. The usual answer, none, costs a C-level ``min`` and ``max``; offsets are
        counted only when there is one to report."""
        assert self._horizon is not None
        limit_ms, limit = self._horizon
        entries = batch.entries
        try:
            stamps = list(map(_TIMESTAMP, entries[first:]))
            if not stamps:
                return
            latest, earliest = max(stamps), min(stamps)
            if isinstance(latest, float) and isinstance(earliest, float):
                if earliest >= EARLIEST_MS and latest <= limit_ms:
                    return
            elif to_datetime(earliest, limit) >= EARLIEST and to_datetime(latest, limit) <= limit:
                return
        except (TypeError, AttributeError):
            pass  # times of several kinds (text, epoch, none, naive): one by one
        wrong = [
            (i, why)
            for i in range(first, len(entries))
            if (why := _out_of_range(entries[i], limit)) is not None
        ]
        if not wrong:
            return
        offsets = [self._offset]
        for line in block.split(b"\n"):
            offsets.append(offsets[-1] + len(line) + 1)
        for i, why in reversed(wrong):
            entries.pop(i)
            batch.malformed.append(Malformed(offsets[i - first], why))
        batch.malformed.sort(key=lambda m: m.offset)


def _out_of_range(entry: Entry, limit: datetime) -> str | None:
    """Why the entry's time cannot be a run's (None when it can)."""
    if entry.timestamp is None:
        return None
    moment = to_datetime(entry.timestamp, limit)
    text = moment.isoformat(timespec="seconds").replace("+00:00", "Z")
    if moment > limit:
        return f"timestamp {text} is more than a day after the time it was read"
    if moment < EARLIEST:
        return f"timestamp {text} is before {EARLIEST.year}: a clock that was not set"
    return None


def _valid_utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
