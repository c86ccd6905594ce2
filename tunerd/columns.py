"""Counting a block of runs column by column: the hot path of every whole-log read.

A whole-log read (``analyze``, a cycle's window, ``report``, ``simulate --from-log``) feeds
``LogStats`` thousands of entries at a time. Looking at each entry in a Python loop costs about a
microsecond a run; here the block is turned into columns by C-level iteration (``astuple`` and
``zip``, ``map`` over ``operator`` functions, ``chain``), classified with NumPy, and only the
rare rows (a new cron or time bucket, a run without a cron, a failed attempt, a final failure)
are looked at one by one. What the rows add up to is buffered as columns and folded into each
cron's ``RunStats`` per ``FOLD_ROWS`` rows: one ``bincount`` per counter and one ``extend`` per
sketch and cron, instead of one update per run.

The result is the same as ``LogStats``'s entry-by-entry loop (which the daemon uses for the few
lines it reads at a time, without NumPy); a property test holds the two equal.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from itertools import chain, repeat
from typing import TYPE_CHECKING, Any, Final

from tunerd.records import (
    Attempt,
    Entry,
    describe_error,
    failure_cause,
    non_retryable_at_first,
    to_datetime,
)

if TYPE_CHECKING:
    from tunerd.stats import LogStats

FOLD_ROWS: Final = 1 << 17
"""Rows buffered before they are folded into their crons (about 6 MB of columns)."""
_TIMESTAMP, _TYPE, _CONTEXT, _ATTEMPTS, _TOTAL, _PARAMS = map(
    operator.attrgetter, ("timestamp", "type", "context", "attempts", "total_duration", "params")
)
_CRON, _TZINFO, _SUCCESS, _DURATION, _ERROR = map(
    operator.attrgetter, ("cron", "tzinfo", "success", "duration", "error")
)
_BINS: Final = 1 << 12
"""More than ``TimedOut`` bins a duration up to ``MAX_DURATION_MS`` can fall in (about 450)."""
DURATION, FIRST, SUCCESS = range(3)
"""The sketches of a ``RunStats`` a stream value goes to: the run's duration, its first
attempt's, a successful attempt's."""


def _np() -> Any:
    import numpy

    return numpy


class Columns:
    """Rows counted but not yet folded into their crons, as lists of NumPy arrays."""

    __slots__ = (
        "at",
        "attempts",
        "errors",
        "keys",
        "retried",
        "rows",
        "slot",
        "succeeded",
        "timeouts",
        "values",
    )

    def __init__(self) -> None:
        self.slot: list[Any] = []
        self.at: list[Any] = []
        self.succeeded: list[Any] = []
        self.retried: list[Any] = []
        self.attempts: list[Any] = []
        self.keys: list[Any] = []
        """Per sketch value: ``slot * 3 + DURATION | FIRST | SUCCESS``."""
        self.values: list[Any] = []
        self.errors: list[tuple[Any, Any, list[bytes]]] = []
        """Failed attempts: their runs' slots, whether each was a retry, their raw errors."""
        self.timeouts: list[Any] = []
        """Timed-out attempts: ``slot * _BINS + TimedOut bin + 1``."""
        self.rows = 0

    def add(self, stats: LogStats, entries: Sequence[Entry], read_at: float) -> None:
        """Count ``entries`` into ``stats`` (``read_at`` dates the lines without a time)."""
        np = _np()
        n = len(entries)
        totals = stats.totals
        types = list(map(_TYPE, entries))
        contexts = list(map(_CONTEXT, entries))
        runs = list(map(_ATTEMPTS, entries))
        at = _seconds(list(map(_TIMESTAMP, entries)), read_at)
        keep = np.ones(n, bool) if stats.since is None else at >= stats.since_at
        skipped = n - int(np.count_nonzero(keep))
        totals.before_since += skipped
        others_before = totals.test_entries + totals.task_entries + totals.unattributed_entries

        try:
            names = list(map(_CRON, contexts))
        except AttributeError:  # some line has no context
            names = [None if c is None else c.cron for c in contexts]
        keys: list[Any] = names
        if stats.bucket_seconds is not None:
            buckets = (at // stats.bucket_seconds).astype(np.int64).tolist()
            keys = list(zip(names, buckets, strict=True))
        slot = np.fromiter(map(stats._slot_of.get, keys, repeat(-1)), np.int64, n)
        for i in np.flatnonzero((slot < 0) & keep).tolist():
            # A new cron or bucket (its first row), a run without a cron, a cron past the cap.
            name = names[i]
            if not name:
                stats._unattributed(entries[i])
                continue
            found = stats._slot_of.get(keys[i])
            if found is None:
                found = stats._new_slot(name, keys[i], contexts[i].schedule_text)
                if found is None:
                    totals.untracked_crons += 1
                    continue
            slot[i] = found
        tracked = keep & (slot >= 0)
        others = totals.test_entries + totals.task_entries + totals.unattributed_entries
        totals.entries += n - skipped
        totals.cron_entries += n - skipped - (others - others_before)
        if not tracked.any():
            return
        self._remember_params(stats, names, entries, at, tracked)

        # Attempts, flattened: the run each belongs to, whether it came first, how it went.
        counts = np.fromiter(map(len, runs), np.int64, n)
        flat = list(chain.from_iterable(runs))
        ends = np.cumsum(counts)
        tried = counts > 0
        a_ok = np.fromiter(map(_SUCCESS, flat), bool, len(flat))
        a_seconds = np.array(list(map(_DURATION, flat)), np.float64)  # None: NaN
        owner = np.repeat(np.arange(n), counts)
        first = np.zeros(len(flat), bool)
        first[(ends - counts)[tried]] = True
        last_ok = np.zeros(n, bool)
        last_ok[tried] = a_ok[ends[tried] - 1]
        succeeded = np.fromiter(map(operator.eq, types, repeat("success")), bool, n)
        if types.count(None):  # no type: the last attempt says
            typeless = np.fromiter(map(operator.is_, types, repeat(None)), bool, n)
            succeeded = np.where(typeless, last_ok, succeeded)

        slots = stats._slots
        rows = np.flatnonzero(tracked)
        for i in np.flatnonzero(tracked & ~succeeded).tolist():
            run = slots[slot[i]]
            entry = entries[i]
            cause = failure_cause(entry)
            if cause == "exhausted":
                run.exhausted += 1
            elif cause == "non_retryable":
                run.non_retryable += 1
                run.non_retryable_first += non_retryable_at_first(entry)
            if not counts[i]:
                run.errors.add(entry.final_error, False)
        a_tracked = tracked[owner]
        failed = np.flatnonzero(a_tracked & ~a_ok)
        if len(failed):
            self._failed(slot[owner[failed]], ~first[failed], failed, flat, a_seconds)

        # Durations: the run's (``totalDuration``, else its attempts' added up), its first
        # attempt's, its successful attempts'.
        total = np.array(list(map(_TOTAL, entries)), np.float64)
        for i in np.flatnonzero(np.isnan(total) & tracked).tolist():
            known = entries[i].duration
            if known is not None:
                total[i] = known
        known = ~np.isnan(a_seconds) & a_tracked
        streams = (
            (rows[~np.isnan(total[rows])], total, DURATION),
            (np.flatnonzero(known & first), a_seconds, FIRST),
            (np.flatnonzero(known & a_ok), a_seconds, SUCCESS),
        )
        for index, source, sketch in streams:
            owners = index if sketch == DURATION else owner[index]
            self.keys.append(slot[owners] * 3 + sketch)
            self.values.append(source[index].astype(np.float32))
        self.slot.append(slot[rows])
        self.at.append(at[rows])
        self.succeeded.append(succeeded[rows])
        self.retried.append(counts[rows] > 1)
        self.attempts.append(np.maximum(counts[rows], 1))
        self.rows += len(rows)
        if self.rows >= FOLD_ROWS:
            self.fold(stats)

    def _failed(
        self, slot: Any, retry: Any, index: Any, attempts: list[Attempt], seconds: Any
    ) -> None:
        """Buffer failed attempts: their errors by raw bytes, those that timed out (by the
        wrapper's classification of each distinct error, once) by their duration's bin."""
        from tunerd.stats import TimedOut  # stats imports this module

        np = _np()
        raws = list(map(bytes, map(_ERROR, map(attempts.__getitem__, index.tolist()))))
        self.errors.append((slot, retry, raws))
        timeout = {raw: describe_error(raw).kind == "timeout" for raw in set(raws)}
        timed_out = np.fromiter(map(timeout.__getitem__, raws), bool, len(raws))
        lasted = seconds[index]
        timed_out &= ~np.isnan(lasted)
        if not timed_out.any():
            return
        lasted = lasted[timed_out]
        bins = np.full(len(lasted), -1, np.int64)
        long = lasted >= 1
        # math.log, as TimedOut.add: NumPy's log may differ in the last bit at a bin's edge.
        logs = np.fromiter(map(math.log, lasted[long].tolist()), np.float64)
        bins[long] = np.floor(logs / TimedOut.WIDTH).astype(np.int64)
        self.timeouts.append(slot[timed_out] * _BINS + bins + 1)

    @staticmethod
    def _remember_params(
        stats: LogStats, names: list[Any], entries: Sequence[Entry], at: Any, tracked: Any
    ) -> None:
        """Each cron's latest ``params`` (the later line of two at the same time)."""
        np = _np()
        params = list(map(_PARAMS, entries))
        if params.count(None) == len(params):
            return
        carried = np.fromiter(map(operator.is_not, params, repeat(None)), bool, len(params))
        rows = np.flatnonzero(carried & tracked)
        if not len(rows):
            return
        rows = rows[np.argsort(at[rows], kind="stable")]
        latest = {names[i]: i for i in rows.tolist()}
        for name, i in latest.items():
            stats._remember_params(name, params[i], float(at[i]))

    def fold(self, stats: LogStats) -> None:
        """Hand the buffered rows to their crons: one ``bincount`` per counter, one ``extend``
        per sketch."""
        if not self.rows:
            return
        np = _np()
        slots = stats._slots
        size = len(slots)
        slot = np.concatenate(self.slot)
        at = np.concatenate(self.at)
        runs = np.bincount(slot, minlength=size)
        successes = np.bincount(slot[np.concatenate(self.succeeded)], minlength=size)
        retried = np.bincount(slot[np.concatenate(self.retried)], minlength=size)
        attempts = np.bincount(slot, np.concatenate(self.attempts), minlength=size)
        first_at = np.full(size, np.inf)
        last_at = np.full(size, -np.inf)
        np.minimum.at(first_at, slot, at)
        np.maximum.at(last_at, slot, at)
        used = np.flatnonzero(runs)
        for s, *counts in zip(
            used.tolist(),
            runs[used].tolist(),
            successes[used].tolist(),
            retried[used].tolist(),
            attempts[used].astype(np.int64).tolist(),
            first_at[used].tolist(),
            last_at[used].tolist(),
            strict=True,
        ):
            run = slots[s]
            run.runs += counts[0]
            run.successes += counts[1]
            run.retried += counts[2]
            run.attempts += counts[3]
            run.first_at = min(run.first_at, counts[4])
            run.last_at = max(run.last_at, counts[5])
        keys = np.concatenate(self.keys)
        values = np.concatenate(self.values)
        # A stable sort of 16-bit keys is a radix sort: several times quicker than of 64-bit ones.
        order = np.argsort(keys.astype(np.uint16) if size * 3 <= 0xFFFF else keys, kind="stable")
        keys, values = keys[order], values[order]
        starts = np.flatnonzero(np.diff(keys, prepend=-1))
        ends = [*starts[1:].tolist(), len(keys)] if len(keys) else []
        for key, start, end in zip(keys[starts].tolist(), starts.tolist(), ends, strict=True):
            run = slots[key // 3]
            target = (run.duration, run.first_attempt, run.success_attempt)[key % 3]
            target.extend(values[start:end].tobytes())
        tallies: Counter[tuple[int, bool, bytes]] = Counter()
        for slot_, retry, raws in self.errors:
            tallies.update(zip(slot_.tolist(), retry.tolist(), raws, strict=True))
        for (s, retry, raw), count in tallies.items():
            slots[s].errors.add(raw, retry, count)
        if self.timeouts:
            found, counts = np.unique(np.concatenate(self.timeouts), return_counts=True)
            for key, count in zip(found.tolist(), counts.tolist(), strict=True):
                s, bin_ = divmod(key, _BINS)
                bins = slots[s].timeout_attempt.bins
                bins[bin_ - 1] = bins.get(bin_ - 1, 0) + count
        for column in (
            self.errors,
            self.timeouts,
            self.slot,
            self.at,
            self.succeeded,
            self.retried,
            self.attempts,
            self.keys,
            self.values,
        ):
            column.clear()
        self.rows = 0


def _seconds(stamps: list[Any], read_at: float) -> Any:
    """Epoch seconds of each line's time: ISO times with an offset in one C-level pass, anything
    else (epoch milliseconds, times without an offset, which are UTC and not local, missing
    times) one by one, as ``to_datetime`` reads them."""
    np = _np()
    try:
        if list(map(_TZINFO, stamps)).count(None):
            raise TypeError("a time without an offset")
        return np.fromiter(map(datetime.timestamp, stamps), np.float64, len(stamps))
    except (TypeError, AttributeError):
        default = datetime.fromtimestamp(read_at, UTC)
        return np.fromiter((to_datetime(ts, default).timestamp() for ts in stamps), np.float64)
