"""An OpenClaw native job's timeout, changed through the gateway (the shell).

The gateway owns its jobs: tunerd never writes its database or ``jobs.json``. A change is one
``openclaw cron edit ID --timeout-seconds N`` (the gateway applies it to the next run; a run in
flight keeps its value), then read back from the job's row, read-only, until it shows. The
target's content, what a rollback point keeps and crash recovery compares, is the job's
setting as canonical JSON (``{"job": ID, "timeoutSeconds": N}``): the new one after the edit,
the old one when it was refused, anything else a change by someone else.

A native job cannot split its runs, so its experiments take turns (switchback): each flip is one
edit, and each run is attributed to the value it ran with by its ``config_revision``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tunerd.inputs.gateway import SAFE_ID, Job
from tunerd.targets.base import Edit, TargetError

EDIT_SECONDS: Final = 60.0
"""How long the ``openclaw`` command may take to answer (it talks to the gateway)."""
READ_BACK_SECONDS: Final = 10.0
"""How long an accepted edit may take to show in the job's row."""
PREFIX: Final = "openclaw:"


class JobGone(TargetError):
    """The job is no longer in the gateway's state (deleted): nothing of it to change."""


class NotTunable(TargetError):
    """The job holds a timeout tunerd cannot take as a number (someone set it so)."""


def can_run(command: tuple[str, ...]) -> bool:
    """Whether the ``openclaw`` command is there to run."""
    import shutil

    return bool(command) and shutil.which(command[0]) is not None


@dataclass(frozen=True, slots=True)
class Gateway:
    """Where the gateway keeps its jobs, and the command that changes them."""

    state: Path
    command: tuple[str, ...]

    def target(self, job_id: str) -> GatewayTarget:
        if not SAFE_ID.fullmatch(job_id):
            raise TargetError(f"OpenClaw job id {job_id[:40]!r} is not one tunerd passes on")
        return GatewayTarget(job_id, self)

    @property
    def can_edit(self) -> bool:
        return can_run(self.command)

    def jobs(self) -> dict[str, Job]:
        """Native cron name (``NAME (OpenClaw)``) -> its job, as the history names them
        (TargetError when the state cannot be read)."""
        return {job.name: job for job in self.jobs_by_id().values()}

    def jobs_by_id(self) -> dict[str, Job]:
        from tunerd.inputs.openclaw import OpenClawError, read_jobs

        try:
            return read_jobs(self.state)
        except OpenClawError as exc:
            raise TargetError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class GatewayTarget:
    job_id: str
    gateway: Gateway
    mode: str = "switchback"

    @property
    def name(self) -> str:
        return PREFIX + self.job_id

    def read(self) -> bytes | None:
        """The job's timeout setting, as canonical JSON (TargetError: the job or the state
        cannot be read, or its value is not one tunerd can take)."""
        job = self.gateway.jobs_by_id().get(self.job_id)
        if job is None:
            raise JobGone(f"OpenClaw has no job {self.job_id} any more")
        if job.timeout_problem is not None:
            raise NotTunable(f"OpenClaw job {self.job_id}: {job.timeout_problem}")
        seconds = None if job.timeout_ms is None else job.timeout_ms // 1000
        return self._content(seconds)

    def held_ms(self) -> int | None:
        """The job's timeout now, in milliseconds (None: it sets none)."""
        seconds = json.loads(self.read() or b"{}").get("timeoutSeconds")
        return None if seconds is None else int(seconds) * 1000

    def tidy(self) -> None:
        """Nothing to clean up: the gateway writes its own state."""

    def apply(self, content: bytes | None, edits: list[Edit]) -> tuple[bytes, list[bytes]]:
        """The job's setting after ``edits`` (each a ``set`` of its timeout, in milliseconds
        that make whole seconds), and the setting before, for each rollback point."""
        if content is None:
            raise TargetError(f"OpenClaw job {self.job_id} cannot be read")
        new = content
        for edit in edits:
            if edit.kind != "set" or edit.param != "timeout" or edit.value is None:
                raise TargetError(
                    f"OpenClaw job {self.job_id}: only its timeout can be changed"
                    f" ({edit.kind} {edit.param})"
                )
            seconds, rest = divmod(edit.value, 1000)
            if rest or seconds < 1:
                raise TargetError(
                    f"OpenClaw job {self.job_id} takes its timeout in whole seconds, not"
                    f" {edit.value} ms"
                )
            new = self._content(seconds)
        return new, [content] * len(edits)

    def write(self, data: bytes) -> None:
        """Ask the gateway for the setting ``data`` holds, and wait until its row shows it.
        TargetError when the command fails or the gateway does not take it: the job keeps its
        old value then, or (a command that answered too late) the read-back says which."""
        seconds = json.loads(data)["timeoutSeconds"]
        argv = [
            *self.gateway.command,
            "cron",
            "edit",
            self.job_id,
            "--timeout-seconds",
            str(seconds),
        ]
        failure = None
        try:
            # a session of its own: a command that hangs is stopped with all it started (the
            # real CLI may run itself again as a child), so no edit lands after tunerd gave up
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except FileNotFoundError:
            raise TargetError(
                f"the command {self.gateway.command[0]!r} is not there: set [openclaw] cli"
            ) from None
        except OSError as exc:
            raise TargetError(f"cannot run {self.gateway.command[0]!r}: {exc.strerror}") from None
        try:
            stdout, stderr = process.communicate(timeout=EDIT_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            try:
                process.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a descendant that left the session holds a pipe
                for pipe in (process.stdout, process.stderr):
                    if pipe is not None:
                        pipe.close()
                process.wait()
            failure = f"`openclaw cron edit` did not answer within {EDIT_SECONDS:.0f} s"
        else:
            if process.returncode != 0:
                failure = (
                    f"`openclaw cron edit` failed (exit {process.returncode}):"
                    f" {_why(stdout, stderr).rstrip('.')}"
                )
        deadline = time.monotonic() + (0 if failure else READ_BACK_SECONDS)
        while True:
            held = self.read()
            if held == data:
                return  # taken (even when the command's answer came too late)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        shown = json.loads(held or b"{}").get("timeoutSeconds")
        why = failure or "the gateway did not take the change"
        raise TargetError(f"{why}; OpenClaw job {self.job_id} has timeoutSeconds {shown}")

    def _content(self, seconds: int | None) -> bytes:
        return json.dumps({"job": self.job_id, "timeoutSeconds": seconds}).encode()


def _why(stdout: bytes, stderr: bytes) -> str:
    """What the command said went wrong, on one line: its JSON ``error.message`` (the CLI
    prints ``{"ok": false, "error": {...}}``), else the first line of its stderr (the rest is
    advice for a person at a terminal: the gateway's address, its config file)."""
    text = ""
    try:
        error = json.loads(stdout).get("error")
        text = str(error.get("message", "")) if isinstance(error, dict) else ""
    except (ValueError, AttributeError):
        pass
    if not text.strip():
        text = stderr.decode("utf-8", "replace")
    from tunerd.report import safe_text

    line = next((line.strip() for line in text.splitlines() if line.strip()), "(no message)")
    return safe_text(line)[:300]
