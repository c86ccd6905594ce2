"""The systemd notify protocol: a datagram to ``$NOTIFY_SOCKET`` (no library needed).

``READY=1`` once the daemon follows the log, ``STATUS=`` a one-line summary, ``WATCHDOG=1`` every
half of ``$WATCHDOG_USEC`` from the event loop (so a stalled loop trips the watchdog),
``RELOADING=1`` with ``MONOTONIC_USEC`` around a reload (systemd 252 understands it even under
``Type=notify``), ``STOPPING=1`` on the way out. Without ``$NOTIFY_SOCKET`` every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ...) as one datagram; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # the abstract namespace
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError:
        return False
    return True


def reloading() -> bool:
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half the configured timeout), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 1e6 / 2, 0.05)
    except ValueError:
        return None
