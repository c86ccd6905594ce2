"""``tunerd run``: the daemon. One asyncio process that owns the lifecycle (start, ready, reload,
stop) and wires the core to the world, as uvicorn's server does.

- **Follow** the log: watchfiles wakes the follower when the log's directory changes (events are
  only wake-ups; a timeout polls anyway), and every new run goes into the rolling statistics.
- **Checkpoint** the read position together with the statistics it produced, in one SQLite
  transaction, about once a second when something changed and on the way out: a restart after
  SIGTERM or SIGKILL neither loses nor double-counts a line.
- **Publish** a status snapshot (tail position, runs per cron in the window) for ``tunerd status``
  within 50 ms of reading new lines (and every minute, as the window moves).
- **Timers** (APScheduler 3): the weekly tuning cycle, one verification timer per running
  experiment, the hourly harm check, the monthly report, the Discord outbox. They are rebuilt
  from the state store at start (a timer that fell due while the daemon was down runs at once)
  and on SIGUSR1 (``tunerd cycle``/``approve``/``reject``/``rollback`` send it). Timer work runs in
  one worker thread with its own database connection, one job at a time.
- **Signals**: SIGHUP re-reads and validates the configuration (an invalid one is logged and the
  old one kept), SIGTERM/SIGINT finish the job in flight, checkpoint and exit 0.
- **systemd**: READY, STATUS, WATCHDOG and RELOADING through the notify socket.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tunerd import systemd
from tunerd.config import ConfigError, Settings, load
from tunerd.follower import Checkpoint, Follower
from tunerd.stats import LogStats
from tunerd.store import Store, load_tail, save_tail

log = logging.getLogger("tunerd.daemon")

DAY = 86400.0
HEARTBEAT = 1.0
"""Seconds between checkpoints and status snapshots (while something changes)."""
PUBLISH_EVERY = 0.01
"""At most this often, the status snapshot follows what was just read."""
RESCAN = 5.0
"""Seconds after which the follower polls even without a file event (dropped events cost a delay,
never data)."""


class AlreadyRunning(Exception):
    pass


def daemon_pid(state_dir: Path) -> int | None:
    """The pid of the daemon that holds ``state_dir``, or None when none runs."""
    lock = state_dir / "daemon.lock"
    try:
        with open(lock, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                text = f.read().strip()
                return int(text) if text.isdigit() else None
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


def signal_daemon(state_dir: Path) -> bool:
    """Ask a running daemon to rebuild its timers from the store (after a change by the CLI)."""
    pid = daemon_pid(state_dir)
    if pid is None:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGUSR1)
        return True
    return False


class Worker:
    """The timer jobs, one at a time in a thread: each heavy one in a child process
    (``tunerd.jobs``), the outbox in the thread itself (cheap, and every 15 s)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tunerd-job")
        self._outbox: Any = None
        self._outbox_url: str | None = None
        self.closing = False

    def submit(self, kind: str) -> concurrent.futures.Future[None]:
        def run() -> None:
            if self.closing:
                return  # stopping: only the job already in flight finishes
            try:
                if kind == "outbox":
                    self._flush_outbox()
                else:
                    self._child(kind)
            except Exception:
                log.exception("job %s failed; it will run again at its next time", kind)

        return self.executor.submit(run)

    def _child(self, kind: str) -> None:
        from tunerd.jobs import settings_payload

        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "tunerd.jobs", kind],
            input=settings_payload(self.daemon.settings),
            stdout=subprocess.DEVNULL,
            check=False,
        )
        if done.returncode:
            log.error(
                "job %s ended with exit code %d; it will run again at its next time",
                kind,
                done.returncode,
            )
        else:
            log.debug("job %s done in %.1f s", kind, time.monotonic() - started)

    def _flush_outbox(self) -> None:
        """Deliver what an earlier job could not (Discord down, 429): only with a webhook and
        something pending, so an idle daemon without either imports and sends nothing."""
        url = self.daemon.settings.discord.url()
        if url != self._outbox_url:
            self._close_outbox()
            self._outbox_url = url
        if url is None:
            return
        if self._outbox is None:
            from tunerd.discord import DiscordNotifier

            self._outbox = DiscordNotifier(Store(self.daemon.settings.state_dir), url)
        if self._outbox.pending():
            self._outbox.flush(budget=4.0)

    def _close_outbox(self) -> None:
        if self._outbox is not None:
            self._outbox.close()
            self._outbox.store.close()
            self._outbox = None

    def shutdown(self) -> None:
        """Let the job in flight finish, drop the ones not started, then close (in the worker's
        own thread: its database connection belongs to it)."""

        def close() -> None:
            if self._outbox is not None:
                self._outbox.flush(budget=2.0)
            self._close_outbox()

        self.closing = True
        self.executor.submit(close)
        self.executor.shutdown(wait=True)


FLIP_RETRY = 900.0
"""Seconds before a switchback flip that failed is tried again (the hourly look says why)."""


class Daemon:
    def __init__(self, config: str | None, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.store = Store(settings.state_dir)
        self.stopping = asyncio.Event()
        self._changed = asyncio.Event()
        self.worker = Worker(self)
        self.scheduler: Any = None
        self._lock_file: Any = None
        self._dirty = False
        self._dirty_status = False
        self._published_at = 0.0
        self._publish_pending = False
        self._changed_crons: set[str] = set()
        self._flipped_at = -math.inf
        """When the last flip job started: one that could not put a script in step is tried
        again after ``FLIP_RETRY``, never in a loop."""
        self.stats, self.follower = self._restore()

    # --- state ------------------------------------------------------------------------------

    def _restore(self) -> tuple[LogStats, Follower]:
        checkpoint, shell, crons = load_tail(self.store)
        stats = None
        if shell is not None:
            try:
                stats = LogStats.load(shell, crons)
                stats.durations = False
            except Exception:
                log.warning("the saved statistics could not be read: starting them afresh")
                checkpoint = None
        if checkpoint is not None and checkpoint.get("path") != str(self.settings.log_path):
            checkpoint, stats = None, None  # another log now
        if stats is None:
            stats = self._fresh_stats()
            self._changed_crons = set(crons)  # rows of another log or state: replace them all
        resume = Checkpoint(**checkpoint) if checkpoint else None
        follower = Follower(self.settings.log_path, resume, self.settings.max_line_bytes)
        return stats, follower

    def _fresh_stats(self) -> LogStats:
        return LogStats(bucket_seconds=DAY, max_crons=self.settings.max_crons, durations=False)

    def _save(self) -> None:
        checkpoint = self.follower.checkpoint()
        names = self._changed_crons
        shell, changed = self.stats.dump(names)
        save_tail(
            self.store,
            checkpoint.as_dict() if checkpoint else None,
            shell,
            changed,
            names - changed.keys(),
            time.time(),
        )
        self._changed_crons = set()
        self._dirty = False
        if len(changed) > 100:  # after a big catch-up: give the freed heap back to the system
            _trim_heap()

    def _publish(self) -> None:
        self._dirty_status = False
        now = self._published_at = time.time()
        since = now - self.settings.window.total_seconds()
        crons = {name: c.counts_since(since, DAY) for name, c in self.stats.crons.items()}
        checkpoint = self.follower.checkpoint()
        document = {
            "tail": {
                "path": str(self.settings.log_path),
                "offset": checkpoint.offset if checkpoint else 0,
                "entries": self.stats.totals.entries,  # since the first start: checkpointed
                "malformed": self.stats.totals.malformed,
            },
            "crons": {name: counts for name, counts in crons.items() if counts[0]},
            # what Level 1 last said it ran with, where it says (tunerd status reads parameters
            # as every command does: a script, the params file, this, the defaults)
            "logged": {
                name: c.params for name, c in self.stats.crons.items() if c.params is not None
            },
        }
        with self.store.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO daemon_status (id, pid, document, updated_at)"
                " VALUES (1, ?, ?, ?)",
                (os.getpid(), json.dumps(document, ensure_ascii=False), now),
            )
        experiments = len(self.store.experiments("running"))
        systemd.notify(
            f"STATUS=following {self.settings.log_path.name}: {self.stats.totals.entries} lines,"
            f" {len(crons)} crons, {experiments} experiments"
        )

    # --- the log ----------------------------------------------------------------------------

    def _poll(self) -> bool:
        """Read what is new (a bounded step); True when there is more to read at once."""
        poll = self.follower.poll()
        for event in poll.events:
            log.info("log %s: %s", self.settings.log_path, event)
        if poll.batch.entries or poll.batch.malformed:
            self.stats.add_entries(poll.batch.entries, time.time())
            self._changed_crons.update(e.cron for e in poll.batch.entries if e.cron)
            self.stats.add_malformed(poll.batch.malformed)
            for m in poll.batch.malformed[:5]:
                log.warning("malformed line at byte %d skipped: %s", m.offset, m.reason)
        if poll.events:
            # Another file, or the same one cut short: checkpoint now, not within the second,
            # so that a crash cannot leave the checkpoint on a file whose successor was read.
            self._save()
            self._dirty_status = True
        elif poll.batch.entries or poll.batch.malformed:
            self._dirty = self._dirty_status = True
            self._changed.set()
        if self._dirty_status:
            wait = self._published_at + PUBLISH_EVERY - time.time()
            if wait <= 0:
                self._publish()
            elif not self._publish_pending:
                self._publish_pending = True
                asyncio.get_running_loop().call_later(wait, self._publish_later)
        return poll.more

    async def _catch_up(self) -> None:
        """Poll until the end of the log, letting the event loop breathe between steps."""
        while self._poll():
            await asyncio.sleep(0)

    def _publish_later(self) -> None:
        self._publish_pending = False
        if self._dirty_status:
            self._publish()

    async def follow(self) -> None:
        """Poll the log whenever its directory changes, and every ``RESCAN`` seconds anyway."""
        from tunerd.inotify import DirectoryWatch, Unavailable

        await self._catch_up()
        while not self.stopping.is_set():
            directory = self.settings.log_path.parent
            name = self.settings.log_path.name
            try:
                watch = DirectoryWatch(directory, name)
            except Unavailable as exc:
                if directory.is_dir():
                    await self._follow_with_watchfiles(directory, name)
                else:
                    log.warning(
                        "cannot watch %s (%s): polling every %.0f s", directory, exc, RESCAN
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stopping.wait(), RESCAN)
                    await self._catch_up()
            else:
                try:
                    while not self.stopping.is_set() and not self._reload_follower:
                        await watch.changed(RESCAN)
                        await self._catch_up()
                finally:
                    watch.close()
            self._reload_follower = False

    async def _follow_with_watchfiles(self, directory: Path, name: str) -> None:
        """Where inotify is not at hand (watchfiles polls its queue every ``step`` ms)."""
        from watchfiles import awatch

        def ours(_change: object, path: str) -> bool:
            # The log and what rotation makes of it; not the daemon's own files beside it.
            base = os.path.basename(path)
            return base == name or base.startswith(name + ".")

        with contextlib.suppress(OSError):
            async for _changes in awatch(
                directory,
                watch_filter=ours,
                recursive=False,
                debounce=20,
                step=20,
                rust_timeout=int(RESCAN * 1000),
                yield_on_timeout=True,
                stop_event=self.stopping,
            ):
                await self._catch_up()
                if self._reload_follower:
                    return

    _reload_follower = False

    async def heartbeat(self) -> None:
        """Checkpoint at most once a second while lines arrive; sleep while none do."""
        last_evict = time.time()
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 60)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), HEARTBEAT)
            self._changed.clear()
            if self._dirty:
                self._save()
            if self._dirty_status or time.time() - self._published_at > 60:  # the window moves
                self._publish()
            if time.time() - last_evict > 3600:
                last_evict = time.time()
                changed, gone = self.stats.evict(
                    time.time() - self.settings.window.total_seconds() - DAY
                )
                if changed or gone:
                    self._changed_crons |= changed | gone
                    self._save()

    async def watchdog(self) -> None:
        interval = systemd.watchdog_interval()
        if interval is None:
            return
        while not self.stopping.is_set():
            systemd.notify("WATCHDOG=1")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval)

    # --- timers -----------------------------------------------------------------------------

    def _timezone(self) -> Any:
        from zoneinfo import ZoneInfo

        if self.settings.timezone:
            return ZoneInfo(self.settings.timezone)
        from tzlocal import get_localzone

        return get_localzone()

    def build_timers(self) -> None:
        """(Re)build every timer from the configuration and the state store."""
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.date import DateTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        from tunerd.schedule import cron_trigger

        scheduler, zone = self.scheduler, self._timezone()
        scheduler.remove_all_jobs()
        weekly = cron_trigger(self.settings.schedule, zone)
        monthly = CronTrigger(day=1, hour=8, timezone=zone)
        now = time.time()
        for kind, trigger in (("cycle", weekly), ("report", monthly)):
            # A run that fell due while the daemon was down runs at once.
            last = self.store.meta(f"last_{kind}_at")
            if last is None:
                self.store.set_meta(f"last_{kind}_at", str(now))  # counting from the first start
                continue
            due = trigger.get_next_fire_time(None, _utc(float(last)))
            if due is not None and due.timestamp() <= now:
                log.info("the %s due at %s was missed while stopped: running it now", kind, due)
                scheduler.add_job(
                    self._job,
                    DateTrigger(run_date=_utc(now + 1)),
                    args=[kind],
                    id=f"{kind}-missed",
                    replace_existing=True,
                )
        scheduler.add_job(self._job, weekly, args=["cycle"], id="cycle")
        scheduler.add_job(
            self._job, IntervalTrigger(hours=1, timezone=zone), args=["harm"], id="harm"
        )
        scheduler.add_job(self._job, monthly, args=["report"], id="report")
        scheduler.add_job(
            self._job, IntervalTrigger(seconds=15, timezone=zone), args=["outbox"], id="outbox"
        )
        for e in self.store.experiments("running"):
            at = max(e.verify_at, now + 0.5)  # due while the daemon was down: at once
            scheduler.add_job(
                self._job,
                DateTrigger(run_date=_utc(at)),
                args=["verify"],
                id=f"verify-{e.id}",
                replace_existing=True,
            )
        from tunerd.verification import next_flip_at

        flip_at = next_flip_at(self.store, now)
        if flip_at is not None:  # the next switchback block; the flip job sets the one after
            if flip_at <= now:  # out of step: at once, unless a flip just failed to mend it
                flip_at = max(now + 0.5, self._flipped_at + FLIP_RETRY)
            scheduler.add_job(
                self._job, DateTrigger(run_date=_utc(flip_at)), args=["flip"], id="flip"
            )

    async def _job(self, kind: str) -> None:
        """Run by the scheduler on the event loop: hand the work to the worker thread, and
        rebuild the timers after anything that may start or end an experiment. The hourly harm
        check with no experiment running has nothing to do: no child process is started for it."""
        if kind in ("verify", "harm", "flip") and not self.store.experiments("running"):
            return
        if kind == "flip":
            self._flipped_at = time.time()
        future = self.worker.submit(kind)
        if kind in ("cycle", "verify", "harm", "flip"):
            loop = asyncio.get_running_loop()
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._rebuild_soon))

    def _rebuild_soon(self) -> None:
        if not self.stopping.is_set():
            self.build_timers()

    # --- signals ----------------------------------------------------------------------------

    def reload(self) -> None:
        systemd.reloading()
        try:
            settings = load(self.config)
        except ConfigError as exc:
            log.error("configuration not reloaded, the old one stays: %s", exc)
            systemd.notify("READY=1")
            return
        old = self.settings
        self.settings = settings
        if settings.log_path != old.log_path:
            self.follower.close()
            self._changed_crons |= set(self.stats.crons)
            self.stats = self._fresh_stats()
            self.follower = Follower(settings.log_path, None, settings.max_line_bytes)
            self._reload_follower = True
            self._dirty = True
        self.build_timers()
        log.info("configuration reloaded")
        systemd.notify("READY=1")

    # --- lifecycle --------------------------------------------------------------------------

    def _take_lock(self) -> None:
        path = self.settings.state_dir / "daemon.lock"
        self._lock_file = open(path, "a+")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(
                f"a tunerd daemon already runs on {self.settings.state_dir}"
            ) from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()

    async def serve(self) -> int:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        self._take_lock()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self.build_timers)
        self.scheduler = AsyncIOScheduler(
            job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1}
        )
        self.build_timers()
        self.scheduler.start()
        self.worker.submit("outbox")  # what an earlier process could not deliver, at once
        self._poll()
        self._save()
        self._publish()
        systemd.notify("READY=1")
        log.info("following %s", self.settings.log_path)
        tasks = [asyncio.create_task(t) for t in (self.follow(), self.heartbeat(), self.watchdog())]
        await self.stopping.wait()
        systemd.notify("STOPPING=1")
        log.info("stopping: finishing the job in flight")
        self.scheduler.shutdown(wait=False)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(self.worker.shutdown)
        self._poll()
        self._save()
        self._publish()
        self.follower.close()
        self.store.close()
        log.info("stopped")
        return 0


def _trim_heap() -> None:
    """glibc keeps freed memory for reuse; after reading hundreds of MB of log at start that is
    tens of MB the daemon will not need again."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def _utc(epoch: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC)


def run(config: str | None) -> int:
    """The ``tunerd run`` command."""
    from tunerd import logs

    try:
        settings = load(config)
    except ConfigError as exc:
        logs.configure()
        log.error("%s", exc)
        return 2
    logs.configure(secrets=[settings.discord.url() or ""])
    try:
        daemon = Daemon(config, settings)
        return asyncio.run(daemon.serve())
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return 1
