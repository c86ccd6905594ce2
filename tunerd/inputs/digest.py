"""A gateway's runs as columns, kept between commands (pure: the shell reads and writes it).

A one-shot command (``analyze``, ``status`` without the daemon, the weekly cycle) would read the
gateway's whole history every time: at the retention cap, 2,000 executions of each of 1,000
jobs, about 40 s of rebuilding and counting runs one object at a time. A digest keeps the runs
already rebuilt, grouped by *shape* (outcome, reason, and each attempt's success and error: a
few per job, since the same errors recur) with one column per duration, so that counting them
is a few NumPy calls a job, and the next command reads only what the gateway wrote since.

Runs the gateway no longer has (it keeps 7 days, at most 2,000 executions a job) are dropped
as it drops them, and a deleted job's with it: the counts stay those of a fresh read.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from tunerd.inputs.gateway import REVISION, Execution, Job, context_of
from tunerd.records import Attempt, Entry
from tunerd.stats import CLEAN, LogStats

_Shape = tuple[str | None, str | None, bytes, tuple[tuple[bool, bytes], ...]]
_CLEAN: _Shape = ("success", None, b"", ((True, b""),))
_NEVER: tuple[int, dict[str, Any]] = (-1, {})


@dataclass(slots=True)
class _Runs:
    """The runs of one job with one shape: when each started and ended (ms), its duration,
    and each attempt's duration."""

    shape: Entry
    start: array[int] = field(default_factory=lambda: array("q"))
    end: array[int] = field(default_factory=lambda: array("q"))
    total: array[float] = field(default_factory=lambda: array("f"))
    attempts: list[array[float]] = field(default_factory=list)

    def keep_from(self, oldest: int) -> bool:
        """Drop the runs that started before ``oldest``; whether there were any."""
        import numpy as np

        starts = np.frombuffer(self.start, dtype=np.int64)
        if not len(starts) or starts.min() >= oldest:
            return False
        kept = starts >= oldest
        self.start = array("q", starts[kept].tobytes())
        self.end = array("q", np.frombuffer(self.end, dtype=np.int64)[kept].tobytes())
        self.total = array("f", np.frombuffer(self.total, dtype=np.float32)[kept].tobytes())
        self.attempts = [
            array("f", np.frombuffer(column, dtype=np.float32)[kept].tobytes())
            for column in self.attempts
        ]
        return True


class KeptShape(msgspec.Struct, array_like=True):
    """One job's runs of one shape as tunerd keeps them: plain values and bytes, no code."""

    type: str | None
    reason: str | None
    final_error: bytes
    attempts: list[tuple[bool, bytes]]
    start: bytes
    end: bytes
    total: bytes
    durations: list[bytes]


def _check(kept: KeptShape) -> None:
    """``ValueError`` for columns no reading could have given (times out of range, an end
    before its start, a duration that is not a finite number of ms, 0 to 60 days)."""
    import numpy as np

    start = np.frombuffer(kept.start, dtype=np.int64)
    end = np.frombuffer(kept.end, dtype=np.int64)
    if len(start) and (start.min() < 0 or end.max() > 2**53 or (end < start).any()):
        raise ValueError("times out of range")
    for column in (kept.total, *kept.durations):
        durations = np.frombuffer(column, dtype=np.float32)
        if not np.isfinite(durations).all() or ((durations < 0) | (durations > 5.2e9)).any():
            raise ValueError("durations out of range")


@dataclass(slots=True)
class Digest:
    """Every run of a gateway's history rebuilt so far, job by job, shape by shape."""

    jobs: dict[str, dict[_Shape, _Runs]] = field(default_factory=dict)
    params: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    """Job id -> when its latest run that says what it ran with ended, and that."""
    added: int = 0
    """Runs taken in so far (a command keeps the digest again only when it took some)."""

    def clear(self) -> None:
        self.jobs.clear()
        self.params.clear()

    def add_clean(self, execution: Execution) -> None:
        """A run that is one execution that succeeded (most runs: no ``Entry`` built)."""
        shapes = self.jobs.get(execution.job)
        if shapes is None:
            shapes = self.jobs[execution.job] = {}
        runs = shapes.get(_CLEAN)
        if runs is None:
            runs = shapes[_CLEAN] = _Runs(CLEAN, attempts=[array("f")])
        start, end = execution.started_ms, execution.finished_ms
        duration = float(max(end - start, 0))
        runs.start.append(start)
        runs.end.append(end)
        runs.total.append(duration)
        runs.attempts[0].append(duration)
        self.added += 1
        revision = execution.revision
        if revision is not None and end >= self.params.get(execution.job, _NEVER)[0]:
            self.params[execution.job] = (end, {REVISION: revision})

    def add(self, job: str, start: int, entry: Entry) -> None:
        """One run of ``job`` (a native run: every duration known, ``timestamp`` a datetime)."""
        attempts = entry.attempts
        key = (  # a clean run's is _CLEAN: add_clean's runs and these are one shape
            entry.type,
            entry.reason,
            bytes(entry.final_error),
            tuple((a.success, bytes(a.error)) for a in attempts),
        )
        shapes = self.jobs.get(job)
        if shapes is None:
            shapes = self.jobs[job] = {}
        runs = shapes.get(key)
        if runs is None:
            shape = msgspec.structs.replace(entry, context=None, params=None, timestamp=None)
            runs = shapes[key] = _Runs(shape, attempts=[array("f") for _ in attempts])
        assert isinstance(entry.timestamp, datetime)
        end = round(entry.timestamp.timestamp() * 1000)
        runs.start.append(start)
        runs.end.append(end)
        runs.total.append(entry.total_duration or 0.0)
        for column, attempt in zip(runs.attempts, attempts, strict=True):
            column.append(attempt.duration or 0.0)
        self.added += 1
        if entry.params is not None and end >= self.params.get(job, _NEVER)[0]:
            self.params[job] = (end, entry.params)

    def keep(self, oldest: dict[str, int]) -> bool:
        """Keep the runs of the jobs in ``oldest`` that started at or after its value for
        them (the job's oldest execution the gateway still has); whether any were dropped."""
        dropped = False
        for job in list(self.jobs):
            if job not in oldest:
                del self.jobs[job]
                self.params.pop(job, None)
                dropped = True
                continue
            for shape, runs in list(self.jobs[job].items()):
                dropped |= runs.keep_from(oldest[job])
                if not runs.start:
                    del self.jobs[job][shape]
        return dropped

    def kept(self) -> dict[str, list[KeptShape]]:
        """The runs as ``KeptShape`` values, job by job (to keep in a file)."""
        found: dict[str, list[KeptShape]] = {}
        for job, shapes in self.jobs.items():
            found[job] = [
                KeptShape(
                    key[0],
                    key[1],
                    key[2],
                    list(key[3]),
                    r.start.tobytes(),
                    r.end.tobytes(),
                    r.total.tobytes(),
                    [column.tobytes() for column in r.attempts],
                )
                for key, r in shapes.items()
            ]
        return found

    @classmethod
    def from_kept(
        cls, jobs: dict[str, list[KeptShape]], params: dict[str, tuple[int, dict[str, Any]]]
    ) -> Digest:
        """What ``kept`` gave (``ValueError`` when its columns do not fit together)."""
        digest = cls(params=dict(params))
        for job, shapes in jobs.items():
            found = digest.jobs[job] = {}
            for kept in shapes:
                runs = len(kept.start) // 8
                sizes = {len(kept.start), len(kept.end), 2 * len(kept.total)}
                sizes |= {2 * len(column) for column in kept.durations}
                if sizes != {8 * runs} or len(kept.durations) != len(kept.attempts):
                    raise ValueError(f"job {job!r}: columns of different lengths")
                _check(kept)
                key: _Shape = (kept.type, kept.reason, kept.final_error, tuple(kept.attempts))
                shape = Entry(
                    type=kept.type,
                    reason=kept.reason,
                    final_error=msgspec.Raw(kept.final_error),
                    attempts=[
                        Attempt(success=ok, duration=0.0, error=msgspec.Raw(error))
                        for ok, error in kept.attempts
                    ],
                )
                found[key] = _Runs(
                    shape,
                    array("q", kept.start),
                    array("q", kept.end),
                    array("f", kept.total),
                    [array("f", column) for column in kept.durations],
                )
        return digest

    @property
    def executions(self) -> int:
        return sum(
            len(runs.start) * max(len(runs.attempts), 1)
            for shapes in self.jobs.values()
            for runs in shapes.values()
        )

    def count(self, stats: LogStats, jobs: dict[str, Job]) -> None:
        """Count the runs of ``jobs`` into ``stats``, as ``add_entries`` counts them."""
        import numpy as np

        for job_id, shapes in self.jobs.items():
            job = jobs.get(job_id) or Job(job_id, f"{job_id} (OpenClaw)")  # no jobs.json
            context = context_of(job)
            for runs in shapes.values():
                at = np.frombuffer(runs.end, dtype=np.int64) / 1000.0
                stats.add_runs(
                    context,
                    runs.shape,
                    at,
                    np.frombuffer(runs.total, dtype=np.float32),
                    [np.frombuffer(a, dtype=np.float32) for a in runs.attempts],
                )
            if job_id in self.params:
                end, params = self.params[job_id]
                stats.remember_params(job.name, params, datetime.fromtimestamp(end / 1000, UTC))
