"""Runs of OpenClaw's native cron, rebuilt from the gateway's executions (pure).

The gateway logs one execution per row and retries a transient failure on its own, at most
``len(BACKOFF_MS)`` times, at the end of the failed execution plus 30 s, 60 s, then 5 min. A retry
is just another execution, with no attempt number and no link to the run it retries: the timing
tells. An execution continues the run of the one before when that one failed, both were
scheduled (a manual run is never retried), and either the gateway planned its next run exactly
one backoff after the failure (``next_ms``, when the history records it) and the execution
started then, or (without ``next_ms``) the failure reads as transient and the execution started
one backoff after it. So a run here is what a run of the wrapper is: its attempts, its final
outcome, and why it failed (``exhausted`` after every retry, ``non_retryable`` for an error the
gateway does not retry).

A run whose retry is still due is in flight and left out; one whose retry never came (the job
was edited, disabled, or the gateway stopped) failed with the reason ``RETRY_NOT_RUN``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, NamedTuple

import msgspec

from tunerd.records import NON_RETRYABLE, Attempt, Context, Entry

BACKOFF_MS: Final = (30_000, 60_000, 300_000)
"""The gateway's fixed retry delays after a transient failure (OpenClaw 2026.8)."""
PLANNED_SLACK_MS: Final = 1_500
"""How far the planned next run may be from failure + backoff (the gateway rounds nothing, but
it writes the plan a moment after the execution's end)."""
START_SLACK_MS: Final = 5_000
"""How late after its planned time a retry may start (a busy gateway)."""
RETRY_NOT_RUN: Final = "Retry did not run"
MANUAL: Final = "Manual run, not retried"
INTERRUPTED: Final = "interrupted:"
"""How an execution the gateway did not finish (it stopped) starts its error text."""
_NONE: Final = msgspec.Raw(b"")
SAFE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
"""A job id tunerd passes to a command or suggests to a person: never one that could read as an
option or hold a shell's metacharacters (ids come from the gateway's state)."""
REVISION: Final = "configRevision"
"""The key of a native run's ``params`` that holds the job's ``config_revision`` it ran with."""

_TRANSIENT: Final = re.compile(
    r"rate.?limit|429|overloaded|network|ECONN|ETIMEDOUT|EAI_AGAIN|socket|timed? ?out|timeout"
    r"|server.?error|\b5\d\d\b",
    re.IGNORECASE,
)
_CLASS: Final = (
    (re.compile(r"rate.?limit|429", re.IGNORECASE), "rate_limit"),
    (re.compile(r"timed? ?out|timeout", re.IGNORECASE), "timeout"),
    (re.compile(r"overloaded", re.IGNORECASE), "overloaded"),
    (re.compile(r"network|ECONN|EAI_AGAIN|socket", re.IGNORECASE), "network"),
    (re.compile(r"server.?error|\b5\d\d\b", re.IGNORECASE), "server_error"),
)


class Execution(NamedTuple):
    """One execution of a native job, as the gateway's history records it (a tuple: a
    history holds up to 2,000 a job, built straight from database rows)."""

    job: str
    started_ms: int
    finished_ms: int
    ok: bool
    error: str | None = None
    reason: str | None = None
    """The gateway's classification of the error (``errorReason``: ``timeout``, ...), if kept."""
    manual: bool | None = None
    """Started by hand (``openclaw cron run``); None when the history does not say."""
    next_ms: int | None = None
    """When the gateway planned the job's next run, as it finished this one."""
    revision: str | None = None
    """The job's settings when it ran (``config_revision``)."""


@dataclass(frozen=True, slots=True)
class Job:
    """A native job: its name (what tunerd calls the cron), schedule and per-run timeout."""

    id: str
    name: str
    schedule: str | None = None
    timeout_ms: int | None = None
    enabled: bool = True
    consecutive_errors: int = 0
    timeout_problem: str | None = None
    """Why the job's ``timeoutSeconds`` cannot be taken as a number (then ``timeout_ms`` is
    None: unknown, not tuned, said to a person)."""
    timeout_off: bool = False
    """``timeoutSeconds: 0``: the gateway runs it with no timeout at all."""


def is_native(cron: str) -> bool:
    """Whether ``cron`` is named as the history names a native job (``NAME (OpenClaw)``)."""
    return cron.endswith(")") and " (OpenClaw" in cron


def transient(execution: Execution) -> bool:
    """Whether the gateway retries this failure: its own classification when kept, else the
    text (``command exited with code 1`` is permanent)."""
    return _transient(execution.error, execution.reason)


@functools.lru_cache(maxsize=4096)
def _transient(text: str | None, reason: str | None) -> bool:
    if reason is not None:
        return reason in {"rate_limit", "overloaded", "network", "timeout", "server_error"}
    return bool(_TRANSIENT.search(text or ""))


def _continues(previous: Execution, execution: Execution, retries: int) -> bool:
    """Whether ``execution`` is the gateway's retry of ``previous`` (both scheduled)."""
    due = _retry_due(previous, retries)
    return due is not None and abs(execution.started_ms - due) <= START_SLACK_MS


def runs(
    jobs: dict[str, Job],
    executions: Iterable[Execution],
    now_ms: int,
    running: dict[str, int] | None = None,
    pending: dict[str, list[Execution]] | None = None,
) -> Iterator[Entry]:
    """The runs of ``executions`` (any order), job by job, each as the wrapper would log it.
    ``running``: when each job's execution in progress started (its retry may be it).
    ``pending``: when given, receives the executions of each job's last run if it is still in
    flight (a follower rebuilds it again with what comes next; no other run can be)."""
    return (entry for _, _, entry in job_runs(jobs, executions, now_ms, running, pending))


def job_runs(
    jobs: dict[str, Job],
    executions: Iterable[Execution],
    now_ms: int,
    running: dict[str, int] | None = None,
    pending: dict[str, list[Execution]] | None = None,
    clean: Callable[[Execution], None] | None = None,
) -> Iterator[tuple[str, int, Entry]]:
    """``runs``, each with its job's id and when its first execution started (what a digest
    of the history keeps, to drop the runs the gateway no longer has). ``clean``: when given,
    receives each run that is one execution that succeeded (most runs) instead, with no
    ``Entry`` built for it."""
    by_job: dict[str, list[Execution]] = {}
    for execution in executions:
        by_job.setdefault(execution.job, []).append(execution)
    for job_id, found in by_job.items():
        found.sort(key=lambda e: (e.started_ms, e.finished_ms))
        job = jobs.get(job_id) or Job(job_id, f"{job_id} (OpenClaw)")  # no jobs.json to name it
        context = context_of(job)
        chain: list[Execution] = []
        for execution in found:
            if execution.manual:  # one attempt, never retried, never a retry: a run of its own
                ended = [execution]
            elif chain and not _continues(chain[-1], execution, len(chain) - 1):
                ended, chain = chain, [execution]
            else:
                chain.append(execution)
                continue
            if clean is not None and len(ended) == 1 and ended[0].ok:
                clean(ended[0])
            elif (entry := _entry(job, context, ended, now_ms, True)) is not None:
                yield job_id, ended[0].started_ms, entry
        started = (running or {}).get(job_id)
        if not chain:
            continue
        if clean is not None and len(chain) == 1 and chain[0].ok:
            clean(chain[0])
        elif (entry := _entry(job, context, chain, now_ms, False, started)) is not None:
            yield job_id, chain[0].started_ms, entry
        elif pending is not None:
            pending[job_id] = chain


def context_of(job: Job) -> Context:
    """What a job's runs say of it: its name (the cron's) and its schedule."""
    schedule = json.dumps(job.schedule).encode() if job.schedule else b""
    return Context(cron=job.name, schedule=msgspec.Raw(schedule))


def _entry(
    job: Job,
    context: Context,
    chain: list[Execution],
    now_ms: int,
    followed: bool,
    running: int | None = None,
) -> Entry | None:
    """The run of ``chain``; None while its retry is still due or running (``followed``:
    another scheduled execution of the job came after it; ``running``: when the job's
    execution in progress started)."""
    last = chain[-1]
    retrying = _retry_due(last, len(chain) - 1)
    reason = None
    if not last.ok:
        if (last.error or "").startswith(INTERRUPTED):
            reason = "Interrupted"
        elif last.manual and transient(last):
            reason = MANUAL
        elif len(chain) > len(BACKOFF_MS) and transient(last):
            reason = None  # every retry failed: exhausted
        elif retrying is None:
            reason = NON_RETRYABLE
        elif not followed and running is not None and running >= last.finished_ms:
            return None  # its retry is running now
        elif followed or not job.enabled or now_ms > retrying + START_SLACK_MS:
            reason = RETRY_NOT_RUN  # superseded by an edit, a stop
        else:
            return None  # in flight: its retry is still due
    attempts = [
        Attempt(
            success=bool(e.ok),
            duration=float(max(e.finished_ms - e.started_ms, 0)),
            error=_NONE if e.ok else _error(e.error, e.reason),
        )
        for e in chain
    ]
    revisions = {e.revision for e in chain}
    return Entry(
        timestamp=datetime.fromtimestamp(last.finished_ms / 1000, UTC),
        type="success" if last.ok else "failure",
        context=context,
        attempts=attempts,
        total_duration=float(max(last.finished_ms - chain[0].started_ms, 0)),
        final_error=_NONE if last.ok else _error(last.error, last.reason),
        reason=reason,
        # what the run ran with, as the wrapper logs its params: the job's settings
        # (None: its attempts ran with two, a flip came between them)
        params=None
        if revisions == {None}
        else {REVISION: revisions.pop() if len(revisions) == 1 else None},
    )


def _retry_due(execution: Execution, retries: int) -> int | None:
    """When the gateway retries this execution's failure, or None if it does not: only a
    scheduled run's transient failure, one backoff after it (as planned, when the history
    says what the gateway planned: a regular run that happens to fall there is not a retry)."""
    if execution.ok or execution.manual or retries >= len(BACKOFF_MS):
        return None
    if not transient(execution):
        return None
    due = execution.finished_ms + BACKOFF_MS[retries]
    if execution.next_ms is not None and abs(execution.next_ms - due) > PLANNED_SLACK_MS:
        return None
    return due


@functools.lru_cache(maxsize=4096)
def _error(text: str | None, reason: str | None) -> msgspec.Raw:
    """The wrapper's error object for a failed execution: its text, its class, and whether the
    gateway retries it (the same few errors recur: each is built once)."""
    text = text or "(no error text)"
    kind = reason or next((k for p, k in _CLASS if p.search(text)), None)
    error = {
        "type": kind or "Error",
        "message": text,
        "retryable": _transient(text, reason),
        "category": kind or "other",
    }
    return msgspec.Raw(json.dumps(error, ensure_ascii=False).encode())
