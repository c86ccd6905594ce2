"""Crash points for the crash-consistency tests (a no-op unless the tests ask for one).

``TUNERD_CRASH_AT=<point>`` makes the process SIGKILL itself when it reaches that point, so a test
can check what a real crash leaves behind: the params file still valid, the history in agreement
after recovery. The points are named where they are: ``after_rollback_point``, ``mid_write``,
``after_rename``, ``before_history``.
"""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("TUNERD_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
