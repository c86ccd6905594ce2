"""Faults for the tests that cannot produce them for real (a no-op unless a test asks).

``TUNERD_CRASH_AT=<point>`` makes the process SIGKILL itself when it reaches that point, so a test
can check what a real crash leaves behind: the params file still valid, the history in agreement
after recovery. The points are named where they are: ``after_rollback_point``, ``mid_write``,
``after_rename``, ``before_history``.

``TUNERD_FAULT_DISK_FULL=<file>``: while that file exists, every write to the state store fails
as SQLite fails on a full disk (for a machine where the test cannot mount a small tmpfs).
"""

from __future__ import annotations

import os
import signal
import sqlite3


def crash_point(name: str) -> None:
    if os.environ.get("TUNERD_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def storage_fault() -> None:
    flag = os.environ.get("TUNERD_FAULT_DISK_FULL")
    if flag and os.path.exists(flag):
        raise sqlite3.OperationalError("database or disk is full")
