"""``tunerd exec``: a Level 1 runner, a drop-in for the user's auto-retry wrapper (the shell).

It reads the params file before the run, as Level 1 must (defaults, the cron's overrides, and the
arm of a running experiment), runs the command with the timeout, retries with the backoff up to
``maxRetries`` attempts in all, and appends one line to the log with the parameters it used.

- **Timeout**: the command runs in its own process group; when time is up the whole group gets
  SIGTERM, then SIGKILL two seconds later, so a shell script's children die with it. The attempt
  fails as the wrapper's ``exec`` timeout does: ``ETIMEDOUT``.
- **Output**: passed through as it comes (cron mails it, a terminal shows it), and captured up to
  10 MB per stream, the wrapper's ``maxBuffer``, for the log line's ``result``; beyond the cap it
  is still passed through, not captured, and the run is not failed for it.
- **Exit status**: the last attempt's (124 after a timeout, 128+N after signal N, 127 when the
  command cannot be started); tunerd's own problems (no params file, an unwritable log) never
  change it and never stop the command from running: they are said on stderr.
- **Retries**: what the user's wrapper retries, and nothing more: a timeout (and a death by
  SIGTERM, which its scripts take for their timeout), or an error whose message says
  ``timeout``. A non-zero exit is final (``reason: "Non-retryable error"``), as it is for a
  command run through the wrapper's ``exec()``; ``--retry-exit`` names exit codes to retry
  anyway. SIGTERM, SIGINT or SIGHUP sent to the runner go to the command's group and end the
  run: no further attempt, and the line says why.
- **The log line** has the wrapper's bytes (``JSON.stringify``: compact, its key order), is
  written in one ``write`` to a file opened with ``O_APPEND``, under an exclusive ``flock`` on
  the log, so fifty runs ending at once leave fifty whole lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import selectors
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tunerd.level1 import (
    Arm,
    Assignment,
    assign,
    attempts_allowed,
    backoff_ms,
    encode_line,
    error_object,
    log_line,
    next_arm,
    resolve,
)
from tunerd.params import Params, ParamsFile, ParamsFileError, parse_params_file
from tunerd.records import NON_RETRYABLE, wrapper_retries

OUTPUT_CAP: Final = 10 * 1024 * 1024
"""Bytes of each stream kept for the log line (Node's ``maxBuffer`` in the user's scripts)."""
KILL_GRACE: Final = 2.0
"""Seconds between SIGTERM and SIGKILL to a command's group that outlived its timeout."""
STDERR_IN_MESSAGE: Final = 2000
"""Characters of the command's stderr (its end) in a failed attempt's error message."""
ARMS_FILE: Final = "exec-arms.json"
"""In tunerd's state directory (never the log's, which belongs to Level 1): each experiment's
block of arms still to hand out. Named by nothing from the log: cron names never become paths."""
_READ: Final = 1 << 16


def warn(message: str) -> None:
    print(f"tunerd exec: {message}", file=sys.stderr, flush=True)


@dataclass(slots=True)
class Captured:
    """What one stream of an attempt said: passed through, and kept up to the cap."""

    fd: int
    """Where it is passed through (1 or 2); -1 once that broke (a closed pipe)."""
    kept: bytearray = field(default_factory=bytearray)
    truncated: bool = False

    def take(self, data: bytes) -> None:
        room = OUTPUT_CAP - len(self.kept)
        if len(data) > room:
            self.truncated = True
        self.kept += data[: max(room, 0)]
        if self.fd >= 0:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view) :]
            except OSError:
                self.fd = -1  # our reader went away: keep running the command, keep the log

    def text(self) -> str:
        return self.kept.decode("utf-8", "replace")


@dataclass(slots=True)
class Outcome:
    """How one attempt ended."""

    status: int
    """The runner's exit status if this attempt is the last one."""
    duration_ms: float
    error: dict[str, Any] | None
    retryable: bool
    stdout: Captured
    stderr: Captured


class Interrupted:
    """Signals to the runner, forwarded to the command's process group."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.group: int | None = None

    def exit_status(self) -> int | None:
        """128 + N once signal N arrived (a method: handlers change it behind the code's back)."""
        return None if self.signum is None else 128 + self.signum

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.signum = signum
        if self.group is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.group, signum)


def run_attempt(
    command: list[str],
    timeout_ms: int,
    interrupted: Interrupted,
    retry_exits: frozenset[int] = frozenset(),
) -> Outcome:
    started = time.monotonic()
    stdout, stderr = Captured(1), Captured(2)
    try:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        code = {2: "ENOENT", 13: "EACCES"}.get(exc.errno or 0, "Error")
        message = f"spawn {command[0]} {code}: {exc.strerror}"
        return Outcome(
            127 if code == "ENOENT" else 126,
            (time.monotonic() - started) * 1000,
            error_object(code, message),
            False,
            stdout,
            stderr,
        )
    interrupted.group = proc.pid
    deadline = started + timeout_ms / 1000
    timed_out = _pump(proc, {proc.stdout: stdout, proc.stderr: stderr}, deadline)
    if timed_out:
        _kill_group(proc)
    else:
        returncode = _wait(proc, deadline)
        if returncode is None:  # closed its output but kept running
            timed_out = True
            _kill_group(proc)
    interrupted.group = None
    duration = (time.monotonic() - started) * 1000
    shown = " ".join(command)
    if timed_out:
        message = f"Command timed out after {timeout_ms} ms: {shown}"
        return Outcome(124, duration, error_object("ETIMEDOUT", message), True, stdout, stderr)
    returncode = proc.returncode
    if returncode == 0:
        return Outcome(0, duration, None, False, stdout, stderr)
    # As the wrapper's scripts see it: Node's exec() error says `Command failed: CMD` and the
    # whole stderr, its code is the exit status (a number, not retryable), and a child killed by
    # SIGTERM is taken for their own timeout (`error.code = 'ETIMEDOUT'`). The wrapper then
    # retries only what its rule allows: `timeout` somewhere in that message.
    failed = f"Command failed: {shown}\n"
    retryable = wrapper_retries(None, None, failed + stderr.text())
    message = failed + stderr.text()[-STDERR_IN_MESSAGE:]
    if returncode < 0:
        name = signal.Signals(-returncode).name
        kind = "ETIMEDOUT" if name == "SIGTERM" else name
        error = error_object(kind, f"{message}\nkilled by {name}", None, retryable)
        return Outcome(128 - returncode, duration, error, error["retryable"], stdout, stderr)
    retryable = retryable or returncode in retry_exits
    error = error_object(returncode, message, None, retryable)
    if error["suggestedFix"] == "Unknown error":  # what the wrapper says; a runner knows more
        error["suggestedFix"] = f"The command exited with status {returncode}: see its stderr"
    return Outcome(returncode, duration, error, retryable, stdout, stderr)


def _pump(proc: subprocess.Popen[bytes], streams: dict[Any, Captured], deadline: float) -> bool:
    """Pass the command's output through until both pipes close; True if time ran out first."""
    with selectors.DefaultSelector() as selector:
        for pipe, captured in streams.items():
            os.set_blocking(pipe.fileno(), False)
            selector.register(pipe, selectors.EVENT_READ, captured)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for key in list(selector.get_map().values()):
                    key.fileobj.close()  # type: ignore[union-attr]
                return True
            for key, _ in selector.select(remaining):
                try:
                    data = os.read(key.fd, _READ)
                except BlockingIOError:
                    continue
                if data:
                    key.data.take(data)
                else:
                    selector.unregister(key.fileobj)
                    key.fileobj.close()  # type: ignore[union-attr]
    return False


def _wait(proc: subprocess.Popen[bytes], deadline: float) -> int | None:
    try:
        return proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for signum, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def read_params(path: Path) -> ParamsFile | None:
    """The params file, or None (the wrapper's defaults) when it is missing or unreadable: a
    broken file must not stop the job."""
    try:
        return parse_params_file(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ParamsFileError) as exc:
        warn(f"params file {path} unusable ({exc}); running with the defaults")
        return None


def choose_arm(state_dir: Path, doc: ParamsFile, experiment: str, split: float) -> Arm:
    """The next arm from the experiment's permuted block, kept in tunerd's state directory under
    a lock (a random draw when that file cannot be used: unbalanced, still unbiased)."""
    rng = random.SystemRandom()
    path = state_dir / ARMS_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            try:
                state = json.loads(f.read() or b"{}")
                if not isinstance(state, dict):
                    state = {}
            except ValueError:
                state = {}
            running = {str(block.id) for block in doc.experiments.values()}
            state = {k: v for k, v in state.items() if k in running}  # ended ones: forgotten
            arm = next_arm(state, experiment, split, rng)
            f.seek(0)
            f.truncate()
            f.write(json.dumps(state).encode())
            return arm
    except OSError as exc:
        warn(f"cannot keep the arm balance in {path} ({exc.strerror}): drawing at random")
        return "treatment" if rng.random() < split else "control"


def append_line(log_path: Path, line: dict[str, Any]) -> bool:
    data = encode_line(line)
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # Never blocks in open (a FIFO at the path); only a regular file is written.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
        fd = os.open(log_path, flags, 0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                warn(f"could not append the run to {log_path}: it is not a regular file")
                return False
            fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)  # releases the lock
    except OSError as exc:
        warn(f"could not append the run to {log_path}: {exc.strerror or exc}")
        return False
    return True


@dataclass(slots=True)
class Run:
    attempts: list[dict[str, Any]]
    total_ms: float
    last: Outcome
    reason: str | None
    """Why it ended before ``maxRetries`` attempts with a failure, if it did."""


def execute(
    cron: str,
    command: list[str],
    log_path: Path,
    params_path: Path,
    context: dict[str, Any],
    state_dir: Path,
    retry_exits: frozenset[int] = frozenset(),
    notify: str | None = None,
) -> int:
    """Run ``command`` as Level 1 would; returns the exit status to leave with. ``notify``: the
    webhook a final failure is reported to (through tunerd's outbox), as the wrapper's
    ``executeWithNotifications`` does."""
    interrupted = Interrupted()
    interrupted.install()
    doc = read_params(params_path)
    params, block = resolve(doc, cron)
    for param, why in (doc.untrusted(cron) if doc is not None else {}).items():
        warn(f"params file {params_path}: {why}; running with {param} {params.get(param)}")
    assignment: Assignment | None = None
    if block is not None and doc is not None:
        arm = choose_arm(state_dir, doc, str(block.id), block.split)
        params, assignment = assign(params, block, arm)
    if (status := interrupted.exit_status()) is not None:
        return status  # stopped before the command started: nothing ran, nothing to log
    run = _run(command, params, interrupted, retry_exits)
    result = None
    if run.last.error is None:
        out, err = run.last.stdout, run.last.stderr
        result = {
            "output": out.text(),
            "stderr": err.text(),
            "duration": round(run.last.duration_ms),
        }
        if out.truncated or err.truncated:
            result["truncated"] = True
    line = log_line(
        cron,
        context,
        run.attempts,
        run.total_ms,
        time.time(),
        params,
        assignment,
        result,
        run.reason,
    )
    append_line(log_path, line)
    if notify is not None and run.last.error is not None:
        notify_failure(state_dir, notify, cron, run)
    status = interrupted.exit_status()
    return run.last.status if status is None else status


def notify_failure(state_dir: Path, url: str, cron: str, run: Run) -> None:
    """The final failure, to Discord through the outbox in tunerd's state (delivered now if it
    can be within a few seconds, else by the daemon). The job's exit status never depends on it."""
    from tunerd.notify import Notification, notifier_for
    from tunerd.store import Store, StoreError

    error = run.last.error or {}
    message = str(error.get("message", "")).strip()
    lines = [
        f"{len(run.attempts)} attempt(s); {run.reason or 'no attempt left'}",
        message[:300] + ("…" if len(message) > 300 else ""),
        f"suggested fix: {error.get('suggestedFix', 'none')}",
    ]
    try:
        with Store(state_dir) as store:
            notifier = notifier_for(store, url)
            notifier.send(Notification("run_failed", "Final failure", cron, lines))
            notifier.flush(budget=5.0, retry_now=True)
    except (StoreError, OSError, sqlite3.Error) as exc:
        warn(f"could not queue the failure notification in {state_dir}: {exc}")


def _run(
    command: list[str], params: Params, interrupted: Interrupted, retry_exits: frozenset[int]
) -> Run:
    """Up to ``maxRetries`` attempts, with the backoff between them; an error the wrapper does
    not retry ends the run at once."""
    started = time.monotonic()
    attempts: list[dict[str, Any]] = []
    allowed = attempts_allowed(params)
    for number in range(1, allowed + 1):
        outcome = run_attempt(command, params.timeout, interrupted, retry_exits)
        record: dict[str, Any] = {
            "attempt": number,
            "success": outcome.error is None,
            "duration": round(outcome.duration_ms),
        }
        reason = None
        if outcome.error is not None:
            if interrupted.signum is not None:
                name = signal.Signals(interrupted.signum).name
                outcome.error = error_object(name, f"interrupted by {name}: {' '.join(command)}")
                reason = f"interrupted by {name}"
            elif not outcome.retryable:
                reason = NON_RETRYABLE
            record["error"] = outcome.error
        attempts.append(record)
        if outcome.error is None or reason is not None or number == allowed:
            last_reason = reason if number < allowed or interrupted.signum else None
            return Run(attempts, (time.monotonic() - started) * 1000, outcome, last_reason)
        _sleep(backoff_ms(params, number) / 1000, interrupted)
        if interrupted.signum is not None:
            name = signal.Signals(interrupted.signum).name
            return Run(
                attempts, (time.monotonic() - started) * 1000, outcome, f"interrupted by {name}"
            )
    raise AssertionError("unreachable: the loop returns at its last attempt")


def _sleep(seconds: float, interrupted: Interrupted) -> None:
    """The backoff, cut short by a signal."""
    deadline = time.monotonic() + seconds
    while interrupted.signum is None and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))
