"""Per-cron statistics over time, in memory that does not grow with the log.

Each cron keeps one ``RunStats`` per time bucket (one bucket for a one-shot analysis, hourly or
daily buckets for the daemon's rolling window); a window is the merge of the buckets it covers and
old buckets are dropped whole. Every piece is mergeable, so a file read in parallel ranges and
merged gives the same counts as one read front to back.

The number of distinct crons, tasks and error signatures is capped too: names come from an untrusted
log, and a million distinct names must not mean a million entries in memory.
"""

from __future__ import annotations

import math
import pickle
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import msgspec

from tunerd.reader import Malformed
from tunerd.records import (
    Attempt,
    Context,
    Entry,
    ErrorClass,
    causes,
    describe_error,
    failure_cause,
    is_test,
    non_retryable_at_first,
    to_datetime,
)
from tunerd.sketch import DISCARD, QuantileSketch

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

CLEAN: Final = Entry(type="success", attempts=[Attempt(success=True, duration=0.0)])
"""The shape of a clean run: one attempt, which succeeded."""
MAX_SIGNATURES = 32
"""Distinct error signatures kept per cron and bucket; rarer ones are folded per class."""
MAX_RAW_ERRORS = 64
"""Distinct raw error objects counted before they are described and folded into signatures."""
MALFORMED_SAMPLES = 20


class Signature:
    """One recurring error: how often, how often on a retry, its class, whether the wrapper
    retries it, and the wrapper's fix."""

    __slots__ = ("count", "fix", "kind", "retries", "retryable")

    def __init__(self, kind: ErrorClass, fix: str | None, retryable: bool = True) -> None:
        self.count = self.retries = 0
        self.kind: ErrorClass = kind
        self.fix = fix
        self.retryable = retryable

    def __getstate__(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple):  # pickled before __getstate__: (None, slots)
            state = state[1]
        self.retryable = True  # checkpoints from before retryability was kept
        for name, value in state.items():
            setattr(self, name, value)


class ErrorTally:
    """The errors of a set of runs.

    Counting happens by the error's raw bytes, one dict update on the hot path; errors are decoded,
    classified and folded under their signature only when the counts are read or the number of
    distinct raw errors outgrows ``MAX_RAW_ERRORS`` (memory stays bounded either way).
    """

    __slots__ = ("_first", "_retry", "_signatures")

    def __init__(self) -> None:
        self._first: dict[bytes, int] = {}
        self._retry: dict[bytes, int] = {}
        self._signatures: dict[str, Signature] = {}

    def add(self, error: msgspec.Raw, retry: bool, count: int = 1) -> None:
        counts = self._retry if retry else self._first
        key = bytes(error)
        counts[key] = counts.get(key, 0) + count
        if len(counts) > MAX_RAW_ERRORS:
            self._compact()

    @property
    def signatures(self) -> dict[str, Signature]:
        self._compact()
        return self._signatures

    def count(self, kind: ErrorClass, retryable: bool | None = None) -> int:
        """Failed attempts of a class (only those the wrapper retries, or does not, if asked)."""
        return sum(
            s.count
            for s in self.signatures.values()
            if s.kind == kind and (retryable is None or s.retryable == retryable)
        )

    def retries(self, kind: ErrorClass) -> int:
        return sum(s.retries for s in self.signatures.values() if s.kind == kind)

    def merge(self, other: ErrorTally) -> None:
        for name, theirs in other.signatures.items():
            mine = self._slot(name, theirs.kind, theirs.fix, theirs.retryable)
            mine.count += theirs.count
            mine.retries += theirs.retries

    def _compact(self) -> None:
        for counts, retry in ((self._first, False), (self._retry, True)):
            for raw, n in counts.items():
                kind, name, fix, retryable = describe_error(raw)
                slot = self._slot(name, kind, fix, retryable)
                slot.count += n
                if retry:
                    slot.retries += n
            counts.clear()

    def _slot(self, name: str, kind: ErrorClass, fix: str | None, retryable: bool) -> Signature:
        slot = self._signatures.get(name)
        if slot is None:
            if len(self._signatures) >= MAX_SIGNATURES:
                name, fix = f"(other {kind} errors{'' if retryable else ', not retried'})", None
                slot = self._signatures.get(name)
            if slot is None:
                slot = self._signatures[name] = Signature(kind, fix, retryable)
        return slot

    def __getstate__(self) -> dict[str, Signature]:
        return self.signatures

    def __setstate__(self, state: dict[str, Signature]) -> None:
        self._first, self._retry, self._signatures = {}, {}, state


class TimedOut:
    """Durations of timed-out attempts, as counts in 5 % wide bins: enough to tell attempts
    killed by a timeout (they last as long as it) from timeouts of the job's own (much shorter),
    whatever the timeout turns out to be, in a few dict entries per cron."""

    __slots__ = ("bins",)
    WIDTH: Final = math.log(1.05)

    def __init__(self) -> None:
        self.bins: dict[int, int] = {}

    def add(self, duration: float) -> None:
        key = math.floor(math.log(duration) / self.WIDTH) if duration >= 1 else -1
        self.bins[key] = self.bins.get(key, 0) + 1

    def extend(self, durations: bytes) -> None:
        """Record many durations at once, given as native float32 bytes (binned by NumPy)."""
        import numpy as np

        values = np.frombuffer(durations, dtype=np.float32).astype(np.float64)
        keys: npt.NDArray[np.int64] = np.full(len(values), -1, dtype=np.int64)
        long = values >= 1
        keys[long] = np.floor(np.log(values[long]) / self.WIDTH)
        found, counts = np.unique(keys, return_counts=True)
        for key, count in zip(found.tolist(), counts.tolist(), strict=True):
            self.bins[key] = self.bins.get(key, 0) + count

    def merge(self, other: TimedOut) -> None:
        for key, count in other.bins.items():
            self.bins[key] = self.bins.get(key, 0) + count

    def count_at_least(self, value: float) -> int:
        """Attempts that lasted ``value`` or more (those in the bin holding ``value`` are left
        out: up to 5 % short)."""
        return sum(n for key, n in self.bins.items() if math.exp(key * self.WIDTH) >= value)

    def __getstate__(self) -> dict[int, int]:
        return self.bins

    def __setstate__(self, state: dict[int, int]) -> None:
        self.bins = state


class Rates:
    """The rates every summary of runs derives from its counts."""

    __slots__ = ()
    runs: int
    successes: int
    retried: int
    attempts: int
    exhausted: int
    """Final failures after every attempt allowed failed with a retryable error."""
    non_retryable: int
    """Final failures ended by an error the wrapper does not retry."""
    non_retryable_first: int
    """...of which at the first attempt: runs no ``maxRetries`` can change."""

    @property
    def failures(self) -> int:
        return self.runs - self.successes

    @property
    def exhausted_rate(self) -> float:
        """Final failures more attempts could have rescued, per run (the ``maxRetries`` rule)."""
        return self.exhausted / self.runs if self.runs else 0.0

    @property
    def reachable_failure_rate(self) -> float:
        """Final failures not ended at the first attempt by an error the wrapper does not retry:
        those a change of ``maxRetries`` can reach (its verdict's primary metric)."""
        return (self.failures - self.non_retryable_first) / self.runs if self.runs else 0.0

    def failure_causes(self) -> dict[str, int]:
        return causes(self.failures, self.exhausted, self.non_retryable)

    @property
    def retry_rate(self) -> float:
        return self.retried / self.runs if self.runs else 0.0

    @property
    def final_failure_rate(self) -> float:
        return self.failures / self.runs if self.runs else 0.0

    @property
    def attempts_per_run(self) -> float:
        return self.attempts / self.runs if self.runs else 0.0


class RunStats(Rates):
    """What the runs of one cron in one stretch of time did."""

    __slots__ = (
        "attempts",
        "duration",
        "errors",
        "exhausted",
        "first_at",
        "first_attempt",
        "last_at",
        "non_retryable",
        "non_retryable_first",
        "retried",
        "runs",
        "success_attempt",
        "successes",
        "timeout_attempt",
    )

    def __init__(self, durations: bool = True) -> None:
        self.runs = self.successes = self.retried = self.attempts = 0
        self.exhausted = self.non_retryable = self.non_retryable_first = 0
        self.duration = QuantileSketch() if durations else DISCARD
        """``totalDuration`` of each run, backoff sleeps included."""
        self.first_attempt = QuantileSketch() if durations else DISCARD
        self.success_attempt = QuantileSketch() if durations else DISCARD
        """Durations of the attempts that succeeded: what a timeout must leave room for."""
        self.timeout_attempt: TimedOut | None = TimedOut() if durations else None
        """Durations of the attempts that timed out: those near the timeout were killed by it;
        much shorter ones hit a timeout of the job's own."""
        self.errors = ErrorTally()
        """Failed attempts (and failed runs that logged no attempts), by class and signature."""
        self.first_at = math.inf
        self.last_at = -math.inf

    def add(self, entry: Entry, when: datetime) -> None:
        """Count one run (any run; ``LogStats`` batches the clean ones through ``add_many``)."""
        self.runs += 1
        if not self.runs & 255:
            self.duration.settle()
            self.first_attempt.settle()
            self.success_attempt.settle()
        at = when.timestamp()
        if at < self.first_at:
            self.first_at = at
        if at > self.last_at:
            self.last_at = at
        attempts = entry.attempts
        n = len(attempts)
        kind = entry.type
        succeeded = kind == "success" if kind is not None else n > 0 and attempts[-1].success
        if succeeded:
            self.successes += 1
        else:
            cause = failure_cause(entry)
            if cause == "exhausted":
                self.exhausted += 1
            elif cause == "non_retryable":
                self.non_retryable += 1
                self.non_retryable_first += non_retryable_at_first(entry)
        self.attempts += n or 1
        duration = entry.total_duration
        if duration is None:
            duration = entry.duration
        if duration is not None:
            self.duration.add(duration)
        if not n:
            if not succeeded:
                self.errors.add(entry.final_error, False)
            return
        if attempts[0].duration is not None:
            self.first_attempt.add(attempts[0].duration)
        if n > 1:
            self.retried += 1
        retry = False
        timeouts = self.timeout_attempt
        for attempt in attempts:
            if attempt.success:
                if attempt.duration is not None:
                    self.success_attempt.add(attempt.duration)
            else:
                self.errors.add(attempt.error, retry)
                if (
                    timeouts is not None
                    and attempt.duration is not None
                    and describe_error(attempt.error).kind == "timeout"
                ):
                    timeouts.add(attempt.duration)
            retry = True

    def add_many(
        self, shape: Entry, first_at: float, last_at: float, totals: bytes, attempts: list[bytes]
    ) -> None:
        """Runs shaped like ``shape`` (the same outcome, reason, and attempts that failed or
        succeeded with the same errors), counted as ``add`` counts each, as columns of float32
        bytes: ``totals`` their durations, ``attempts[i]`` those of their ``i``-th attempts
        (every duration known). The clean runs of a log, and every run a digest keeps."""
        count = len(totals) // 4
        self.runs += count
        self.first_at = min(self.first_at, first_at)
        self.last_at = max(self.last_at, last_at)
        shaped = shape.attempts
        if shape.succeeded:
            self.successes += count
        else:
            cause = failure_cause(shape)
            if cause == "exhausted":
                self.exhausted += count
            elif cause == "non_retryable":
                self.non_retryable += count
                self.non_retryable_first += count * non_retryable_at_first(shape)
        self.attempts += count * (len(shaped) or 1)
        self.duration.extend(totals)
        if not shaped:
            if not shape.succeeded:
                self.errors.add(shape.final_error, False, count)
            return
        self.first_attempt.extend(attempts[0])
        if len(shaped) > 1:
            self.retried += count
        for i, (attempt, durations) in enumerate(zip(shaped, attempts, strict=True)):
            if attempt.success:
                self.success_attempt.extend(durations)
                continue
            self.errors.add(attempt.error, i > 0, count)
            if self.timeout_attempt is not None and describe_error(attempt.error).kind == "timeout":
                self.timeout_attempt.extend(durations)

    def merge(self, other: RunStats) -> None:
        self.runs += other.runs
        self.successes += other.successes
        self.retried += other.retried
        self.attempts += other.attempts
        self.exhausted += other.exhausted
        self.non_retryable += other.non_retryable
        self.non_retryable_first += other.non_retryable_first
        self.duration.merge(other.duration)
        self.first_attempt.merge(other.first_attempt)
        self.success_attempt.merge(other.success_attempt)
        if self.timeout_attempt is not None and other.timeout_attempt is not None:
            self.timeout_attempt.merge(other.timeout_attempt)
        self.errors.merge(other.errors)
        self.first_at = min(self.first_at, other.first_at)
        self.last_at = max(self.last_at, other.last_at)

    @property
    def rate_limit(self) -> int:
        return self.errors.count("rate_limit")

    @property
    def timeout(self) -> int:
        return self.errors.count("timeout")

    @property
    def other(self) -> int:
        return self.errors.count("other")

    @property
    def rate_limited_retries(self) -> int:
        """Retries that were answered with HTTP 429 again: what a longer backoff should cut."""
        return self.errors.retries("rate_limit")

    def __getstate__(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.exhausted = self.non_retryable = self.non_retryable_first = 0  # older checkpoints
        self.timeout_attempt = None
        for name, value in state.items():
            setattr(self, name, value)


@dataclass(slots=True)
class CronStats:
    """One cron: its buckets, and what its log lines say about it beyond counts."""

    name: str
    buckets: dict[int, RunStats] = field(default_factory=dict)
    params: dict[str, Any] | None = None
    """The ``params`` of its latest line that carried them (what Level 1 last used)."""
    params_at: float = -math.inf
    schedule: str | None = None

    def counts_since(self, since: float | None, bucket_seconds: float | None) -> list[int]:
        """Runs, final failures, retried runs, exhausted and non-retryable final failures that
        ``window`` would hold, without merging anything (what the daemon's status shows, at most
        a hundred times a second)."""
        counts = [0, 0, 0, 0, 0]
        for key, b in self.buckets.items():
            if since is None or bucket_seconds is None or (key + 1) * bucket_seconds > since:
                counts[0] += b.runs
                counts[1] += b.runs - b.successes
                counts[2] += b.retried
                counts[3] += b.exhausted
                counts[4] += b.non_retryable
        return counts

    def window(self, since: float | None, bucket_seconds: float | None) -> RunStats:
        """The merge of the buckets from ``since`` on (bucket granularity)."""
        total = RunStats()
        for key, bucket in self.buckets.items():
            if since is None or bucket_seconds is None or (key + 1) * bucket_seconds > since:
                total.merge(bucket)
        return total


@dataclass(slots=True)
class Totals:
    entries: int = 0
    """Lines that decoded to a run (whatever kind)."""
    cron_entries: int = 0
    test_entries: int = 0
    task_entries: int = 0
    """Real jobs logged without ``cron`` (only ``task``)."""
    unattributed_entries: int = 0
    """Neither cron, task nor test: counted, not analysed."""
    before_since: int = 0
    """Valid entries older than the window, left out."""
    malformed: int = 0
    untracked_crons: int = 0
    """Runs of crons beyond ``max_crons`` distinct names: counted here, not analysed."""

    def merge(self, other: Totals) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


FOLD_RUNS = 1 << 15
"""Clean runs buffered column-wise before they are folded into their crons in one pass."""
NUMPY_FOLD_MIN = 4096
"""From this many buffered runs on, NumPy sorts them (below, Python's sort is as quick)."""


class _CleanRuns:
    """Runs that succeeded at their first attempt (the common case), buffered column-wise.

    Touching a cron's counters and three sketches for each such run costs cache misses once there
    are many crons; appending four numbers to four flat arrays does not. ``LogStats._fold`` groups
    the buffer by slot with NumPy and hands each cron its runs in one call.
    """

    __slots__ = ("at", "duration", "first", "slot")

    def __init__(self) -> None:
        # Lists, not typed arrays: ``array.append`` parses its argument like a C call's (several
        # hundred instructions a value); a list append is a pointer store.
        self.slot: list[int] = []
        self.at: list[datetime] = []
        self.duration: list[float] = []
        self.first: list[float] = []

    def __len__(self) -> int:
        return len(self.slot)

    def clear(self) -> None:
        for column in (self.slot, self.at, self.duration, self.first):
            del column[:]


def _bucket(when: datetime, bucket_seconds: float) -> int:
    return int(when.timestamp() // bucket_seconds)


class LogStats:
    """Everything an analysis needs from a log, fed batch by batch.

    Read the results through ``crons``, ``window`` and ``merge`` (each folds buffered runs first).
    """

    def __init__(
        self,
        since: float | None = None,
        bucket_seconds: float | None = None,
        max_crons: int = 10_000,
        max_tasks: int = 1_000,
        durations: bool = True,
    ) -> None:
        self.since = since
        self.durations = durations
        """False: count runs, outcomes and errors, keep no durations, and fold small batches in
        Python. The daemon's way: a tuning cycle reads durations from the log in a child
        process, and what the daemon holds (NumPy's 12 MB included) stays resident for good."""
        self._since = None if since is None else datetime.fromtimestamp(since, UTC)
        self.bucket_seconds = bucket_seconds
        self.max_crons = max_crons
        self.max_tasks = max_tasks
        self.totals = Totals()
        self.offset = 0
        """Where reading stopped: the end of the last complete line."""
        self._crons: dict[str, CronStats] = {}
        self.tasks: dict[str, int] = {}
        self.malformed_samples: list[Malformed] = []
        self._slot_of: dict[str | tuple[str, int], int] = {}
        self._slots: list[RunStats] = []
        self._clean = _CleanRuns()

    @property
    def crons(self) -> dict[str, CronStats]:
        self._fold()
        return self._crons

    @property
    def period(self) -> tuple[float, float] | None:
        """First and last run of any cron (epoch seconds), or None before the first."""
        buckets = [b for c in self.crons.values() for b in c.buckets.values() if b.runs]
        if not buckets:
            return None
        return min(b.first_at for b in buckets), max(b.last_at for b in buckets)

    def add_entries(self, entries: Sequence[Entry], read_at: float) -> None:
        """Count each entry once; ``read_at`` (epoch seconds) dates lines that carry no time.

        The hot path of every read: one pass over locals, no call for a clean run, and times kept
        as the decoded datetimes (converted to epoch seconds per cron and batch, not per line).
        """
        totals = self.totals
        since = self._since
        bucket_seconds = self.bucket_seconds
        slot_of, slots, clean = self._slot_of, self._slots, self._clean
        clean_slot, clean_at = clean.slot.append, clean.at.append
        clean_duration, clean_first = clean.duration.append, clean.first.append
        default_when = datetime.fromtimestamp(read_at, UTC)
        skipped_before = totals.before_since
        others_before = totals.test_entries + totals.task_entries + totals.unattributed_entries
        for entry in entries:
            when = entry.timestamp
            if when.__class__ is not datetime or when.tzinfo is None:
                when = to_datetime(when, default_when)
            if since is not None and when < since:
                totals.before_since += 1
                continue
            context = entry.context
            if context is None or not (name := context.cron):
                self._unattributed(entry)
                continue
            key = name if bucket_seconds is None else (name, _bucket(when, bucket_seconds))
            slot = slot_of.get(key)
            if slot is None:
                slot = self._new_slot(name, key, context.schedule_text)
                if slot is None:
                    totals.untracked_crons += 1
                    continue
            if entry.params is not None:
                self._remember_params(name, entry.params, when)
            attempts = entry.attempts
            if len(attempts) == 1 and entry.type == "success":
                first = attempts[0]
                first_duration = first.duration
                if first.success and first_duration is not None:
                    total = entry.total_duration
                    clean_slot(slot)
                    clean_at(when)
                    clean_duration(first_duration if total is None else total)
                    clean_first(first_duration)
                    continue
            slots[slot].add(entry, when)
        # Counted here rather than per entry: every entry was skipped, unattributed, or a cron's.
        counted = len(entries) - (totals.before_since - skipped_before)
        others = totals.test_entries + totals.task_entries + totals.unattributed_entries
        totals.entries += counted
        totals.cron_entries += counted - (others - others_before)
        if len(clean) >= (FOLD_RUNS if self.durations else NUMPY_FOLD_MIN):
            self._fold()

    def add_runs(
        self,
        context: Context,
        shape: Entry,
        at: npt.NDArray[np.float64],
        totals: npt.NDArray[np.float32],
        attempts: list[npt.NDArray[np.float32]],
    ) -> None:
        """Runs of one cron shaped like ``shape`` (``RunStats.add_many``) as columns: when
        each ended (epoch seconds), its duration, those of its attempts. Counted as
        ``add_entries`` counts the same runs, a time bucket at a time (a digest of a gateway's
        history: no run is an object)."""
        import numpy as np

        name = context.cron
        if self._since is not None:
            keep = at >= self._since.timestamp()
            self.totals.before_since += len(at) - int(keep.sum())
            at, totals, attempts = at[keep], totals[keep], [a[keep] for a in attempts]
        if not len(at) or not name:
            return
        self.totals.entries += len(at)
        self.totals.cron_entries += len(at)
        keys: npt.NDArray[np.int64]
        starts: npt.NDArray[np.int64]
        if self.bucket_seconds is None:
            keys, starts = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
        else:
            buckets = np.floor_divide(at, self.bucket_seconds).astype(np.int64)
            order = np.argsort(buckets, kind="stable")
            at, totals, buckets = at[order], totals[order], buckets[order]
            attempts = [a[order] for a in attempts]
            keys, starts = np.unique(buckets, return_index=True)
        ends = [*starts[1:].tolist(), len(at)]
        for key, start, end in zip(keys.tolist(), starts.tolist(), ends, strict=True):
            slot_key = name if self.bucket_seconds is None else (name, key)
            slot = self._slot_of.get(slot_key)
            if slot is None:
                slot = self._new_slot(name, slot_key, context.schedule_text)
                if slot is None:
                    self.totals.untracked_crons += end - start
                    continue
            self._slots[slot].add_many(
                shape,
                float(at[start:end].min()),
                float(at[start:end].max()),
                totals[start:end].tobytes(),
                [a[start:end].tobytes() for a in attempts],
            )

    def remember_params(self, name: str, params: dict[str, Any], when: datetime) -> None:
        """What the cron's latest counted run ran with (``add_entries`` does it for each)."""
        if name in self._crons and (self._since is None or when >= self._since):
            self._remember_params(name, params, when)

    def _new_slot(self, name: str, key: str | tuple[str, int], schedule: str | None) -> int | None:
        """A new cron, or a new time bucket of one (its schedule is noted here, not per run)."""
        cron = self._crons.get(name)
        if cron is None:
            if len(self._crons) >= self.max_crons:
                return None
            cron = self._crons[name] = CronStats(name)
        cron.schedule = schedule or cron.schedule
        bucket = cron.buckets.setdefault(
            0 if isinstance(key, str) else key[1], RunStats(self.durations)
        )
        self._slot_of[key] = len(self._slots)
        self._slots.append(bucket)
        return self._slot_of[key]

    def _remember_params(self, name: str, params: dict[str, Any], when: datetime) -> None:
        cron = self._crons[name]
        at = when.timestamp()
        if at >= cron.params_at:
            cron.params, cron.params_at = params, at

    def _fold(self) -> None:
        """Hand the buffered clean runs to their crons: one sort by slot, one call per slot.

        A large buffer is sorted by NumPy; a small one (a short log, the daemon's latest lines)
        in Python, so that reading a few lines never pays for importing NumPy.
        """
        clean = self._clean
        n = len(clean)
        if not n:
            return
        duration: Any
        first: Any
        if n >= NUMPY_FOLD_MIN and self.durations:
            import numpy as np

            order_array = np.argsort(np.array(clean.slot, dtype=np.intc), kind="stable")
            order: list[int] = order_array.tolist()
            duration = np.array(clean.duration, dtype=np.float32)[order_array]
            first = np.array(clean.first, dtype=np.float32)[order_array]
        else:
            order = sorted(range(n), key=clean.slot.__getitem__)
            duration = array("f", [clean.duration[i] for i in order])
            first = array("f", [clean.first[i] for i in order])
        slot = [clean.slot[i] for i in order]
        at = [clean.at[i] for i in order]
        start = 0
        for end in range(1, n + 1):
            if end < n and slot[end] == slot[start]:
                continue
            runs = at[start:end]
            self._slots[slot[start]].add_many(
                CLEAN,
                min(runs).timestamp(),
                max(runs).timestamp(),
                duration[start:end].tobytes(),
                [first[start:end].tobytes()],
            )
            start = end
        clean.clear()

    def _unattributed(self, entry: Entry) -> None:
        context = entry.context
        if context is not None and is_test(context):
            self.totals.test_entries += 1
        elif context is not None and context.task:
            self.totals.task_entries += 1
            if context.task in self.tasks or len(self.tasks) < self.max_tasks:
                self.tasks[context.task] = self.tasks.get(context.task, 0) + 1
        else:
            self.totals.unattributed_entries += 1

    def add_malformed(self, malformed: Iterable[Malformed]) -> None:
        for item in malformed:
            self.totals.malformed += 1
            if len(self.malformed_samples) < MALFORMED_SAMPLES:
                self.malformed_samples.append(item)

    def merge(self, other: LogStats) -> None:
        """Fold in the statistics of a later stretch of the same log (``other`` is consumed)."""
        self._fold()
        self.totals.merge(other.totals)
        self.offset = max(self.offset, other.offset)
        for name, theirs in other.crons.items():
            mine = self._crons.get(name)
            if mine is None:
                if len(self._crons) >= self.max_crons:
                    self.totals.untracked_crons += sum(b.runs for b in theirs.buckets.values())
                    continue
                mine = self._crons[name] = CronStats(name)
            for key, bucket in theirs.buckets.items():
                if key in mine.buckets:
                    mine.buckets[key].merge(bucket)
                else:
                    mine.buckets[key] = bucket
                    slot_key = name if self.bucket_seconds is None else (name, key)
                    self._slot_of[slot_key] = len(self._slots)
                    self._slots.append(bucket)
            if theirs.params is not None and theirs.params_at >= mine.params_at:
                mine.params, mine.params_at = theirs.params, theirs.params_at
            mine.schedule = theirs.schedule or mine.schedule
        for task, count in other.tasks.items():
            if task in self.tasks or len(self.tasks) < self.max_tasks:
                self.tasks[task] = self.tasks.get(task, 0) + count
        room = MALFORMED_SAMPLES - len(self.malformed_samples)
        self.malformed_samples.extend(other.malformed_samples[: max(room, 0)])

    def evict(self, before: float) -> tuple[set[str], set[str]]:
        """Drop the time buckets that ended before ``before`` (the rolling window's old edge);
        returns the crons that lost buckets and those that are gone."""
        if self.bucket_seconds is None:
            return set(), set()
        self._fold()
        keep_from = int(before // self.bucket_seconds)
        changed, gone = set(), set()
        for name in list(self._crons):
            cron = self._crons[name]
            kept = {k: b for k, b in cron.buckets.items() if k >= keep_from}
            if len(kept) != len(cron.buckets):
                changed.add(name)
                cron.buckets = kept
            if not cron.buckets:
                del self._crons[name]
                gone.add(name)
        self._reindex()
        return changed - gone, gone

    def window(self, cron: str, since: float | None = None) -> RunStats:
        return self.crons[cron].window(since, self.bucket_seconds)

    def __getstate__(self) -> dict[str, Any]:
        self._fold()
        state = dict(self.__dict__)
        del state["_clean"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.durations = True  # checkpoints written before the setting existed
        self.__dict__.update(state)
        self._clean = _CleanRuns()

    def dump(self, names: Iterable[str]) -> tuple[bytes, dict[str, bytes]]:
        """Everything but the crons as one pickle, and the named crons one pickle each: a
        daemon rewrites only the crons that changed since its last checkpoint."""
        self._fold()
        shell = dict(self.__getstate__(), _crons={}, _slot_of={}, _slots=[])
        crons = {name: pickle.dumps(self._crons[name]) for name in names if name in self._crons}
        return pickle.dumps(shell), crons

    @classmethod
    def load(cls, shell: bytes, crons: dict[str, bytes]) -> LogStats:
        """What ``dump`` wrote (tunerd's own state: the pickles never come from elsewhere)."""
        stats: LogStats = cls.__new__(cls)
        stats.__setstate__(pickle.loads(shell))
        stats._crons = {name: pickle.loads(blob) for name, blob in crons.items()}
        stats._reindex()
        return stats

    def _reindex(self) -> None:
        self._slot_of = {}
        self._slots = []
        for name, cron in self._crons.items():
            for key, bucket in cron.buckets.items():
                slot_key: str | tuple[str, int] = (
                    name if self.bucket_seconds is None else (name, key)
                )
                self._slot_of[slot_key] = len(self._slots)
                self._slots.append(bucket)
