"""The daemon's timer jobs, each run in a child process: ``python -m tunerd.jobs KIND``.

A tuning cycle reads the whole window of the log, a verification imports SciPy; in the daemon's
own process that memory (80 MB and more) would stay resident for the rest of its life. A child
returns it to the system when it exits, and a crash in it is a failed job, not a dead daemon.

A job that fails prints why, in one line, on stdout: the daemon says it once and runs the job
again later (``server.Daemon._job_done``).

The daemon hands the child its own validated settings (pickled, on stdin: the webhook URL is in
them and must not travel in argv or the environment), so a configuration file edited but not yet
reloaded with SIGHUP changes nothing. The child ignores SIGTERM and SIGINT: systemd signals the
whole control group when it stops the service, and the job in flight is finished, as the daemon
promises; its writes are crash-safe anyway should a SIGKILL follow.
"""

from __future__ import annotations

import logging
import pickle
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from tunerd.config import Settings

log = logging.getLogger("tunerd.jobs")

DAY = 86400.0


def cycle(engine: Any, settings: Settings) -> None:
    from tunerd.cycle import run_cycle

    report = run_cycle(settings, engine, time.time())
    engine.store.set_meta("last_cycle_at", str(report.at))
    log.info(
        "tuning cycle: %d actions, %d experiments settled",
        len(report.outcomes),
        len(report.settled),
    )


def settle(engine: Any, settings: Settings) -> None:
    """The verification of due experiments and the hourly harm check of the others."""
    from tunerd.cycle import natives_only
    from tunerd.verification import settle

    with engine.exclusive():
        for s in settle(
            engine,
            settings.log_path,
            settings.verdict_settings(),
            time.time(),
            settings.max_line_bytes,
            log_missing_ok=natives_only(settings),
        ):
            if s.action != "running":
                log.info(
                    "experiment %d (%s): %s — %s",
                    s.experiment.id,
                    s.experiment.param,
                    s.action,
                    s.reason,
                )


def flip(engine: Any, settings: Settings) -> None:
    """A switchback block begins: each experiment's script takes the value of its block."""
    from tunerd.verification import keep_in_step

    with engine.exclusive():
        for experiment in keep_in_step(engine, time.time()):
            log.info("experiment %d: flipped for the block that begins", experiment)


def report(engine: Any, settings: Settings) -> None:
    from tunerd.monthly import Month, monthly_report, report_text
    from tunerd.notify import Notification
    from tunerd.report import safe_text

    last_month = Month.of(time.time() - 2 * DAY)
    store = engine.store
    store.set_meta("last_report_at", str(time.time()))
    monthly = monthly_report(last_month, store.changes(), store.experiments(), store.reviews())
    engine.notifier.send(
        Notification(
            "report",
            f"Monthly report {last_month}",
            None,
            report_text(monthly, safe_text).splitlines()[1:],
        )
    )


JOBS: dict[str, Callable[[Any, Settings], None]] = {
    "cycle": cycle,
    "verify": settle,
    "harm": settle,
    "flip": flip,
    "report": report,
}


def settings_payload(settings: Settings) -> bytes:
    """What the child is given: the daemon's settings as they are in force."""
    return pickle.dumps(settings.model_dump())


def main(argv: list[str]) -> int:
    from tunerd import logs
    from tunerd.cycle import build_engine
    from tunerd.notify import notifier_for
    from tunerd.store import Store, StoreError

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if len(argv) != 1 or argv[0] not in JOBS:
        print(f"usage: python -m tunerd.jobs {{{','.join(JOBS)}}} < settings", file=sys.stderr)
        return 2
    # The daemon's own pickle, through a pipe only it holds: trusted as its state files are.
    settings = Settings.model_validate(pickle.loads(sys.stdin.buffer.read()))
    url = settings.discord.url()
    logs.configure(secrets=[url or ""])
    try:
        store = Store(settings.state_dir)
        notifier = notifier_for(store, url)
        engine = build_engine(settings, notifier, store)
    except StoreError as exc:
        print(exc, flush=True)
        return 1
    try:
        JOBS[argv[0]](engine, settings)
    except Exception as exc:
        # One line on stdout, for the daemon to say (once) with what it does about it.
        log.debug("job %s", argv[0], exc_info=True)
        print(logs.cause_of(exc), flush=True)
        return 1
    finally:
        notifier.flush(budget=5.0)  # what the job said, delivered at once
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
