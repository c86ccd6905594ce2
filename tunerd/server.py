"""``tunerd run``: the daemon. One asyncio process that owns the lifecycle (start, ready, reload,
stop) and wires the core to the world, as uvicorn's server does.

- **Follow** the log: watchfiles wakes the follower when the log's directory changes (events are
  only wake-ups; a timeout polls anyway), and every new run goes into the rolling statistics.
- **Checkpoint** the read position together with the statistics it produced, in one SQLite
  transaction, about once a second when something changed and on the way out: a restart after
  SIGTERM or SIGKILL neither loses nor double-counts a line.
- **Publish** a status snapshot (tail position, runs per cron in the window) for ``tunerd status``
  within 50 ms of reading new lines (and every minute, as the window moves).
- **Follow OpenClaw's history** when one is configured: when its database (or its WAL) changes,
  read what is new (read-only, at most every ``NATIVE_EVERY`` seconds, in a thread) and publish
  the native jobs' runs in the window beside the log's.
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
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from tunerd import systemd
from tunerd.config import ConfigError, Settings, load
from tunerd.follower import Checkpoint, Follower
from tunerd.logs import cause_of
from tunerd.notify import Notification
from tunerd.stats import LogStats
from tunerd.store import Store, StoreError, load_tail, save_tail, store_error
from tunerd.timeparse import human_duration
from tunerd.timeparse import iso as _iso

if TYPE_CHECKING:
    from tunerd.inputs.gateway import Job
    from tunerd.inputs.openclaw import HistoryFollower

log = logging.getLogger("tunerd.daemon")

DAY = 86400.0
HEARTBEAT = 1.0
"""Seconds between checkpoints and status snapshots (while something changes)."""
PUBLISH_EVERY = 0.01
"""At most this often, the status snapshot follows what was just read."""
NATIVE_EVERY = 5.0
"""At most this often, the daemon reads OpenClaw's history again (the gateway writes a few rows a
minute; a burst of writes is one read)."""
NATIVE_SHARE = 0.1
"""And never more than this share of the time: a history at the gateway's retention cap takes
seconds to read (docs/performance.md), and a gateway that writes all the time must not keep a
core busy."""
RESCAN = 5.0
"""Seconds after which the follower polls even without a file event (dropped events cost a delay,
never data)."""
DIGEST_EVERY = 3600.0
"""How often the daemon counts the native jobs afresh from the digest kept in its state folder,
bringing it up to date for the one-shot commands (in a child: about half a second at the
retention cap)."""


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


JOB_TIMEOUT = 3600.0
"""A timer job's child still running after this long is stopped (SIGKILL; its writes are
crash-safe) and counts as a failure: a job that hangs never holds the others."""
RETRY_FIRST, RETRY_MAX = 60.0, 3600.0
"""A failed job runs again after 1 min, then 2, 4, ... at most an hour apart, until its next
scheduled time: never at once, never in a loop."""
TELL_AFTER = 3
"""Failures in a row after which Discord hears of it (once, and once when it works again)."""
GIVE_UP = 600.0
"""Seconds the state store (or a task of the daemon) may keep failing before the daemon exits
with status 1, so that systemd restarts it: never a live process that quietly stopped."""
STALE: Final = {"follow": 120.0, "scheduler": 120.0}
"""Seconds without progress after which systemd's watchdog is no longer fed (the follower
wakes at least every ``RESCAN`` seconds, the scheduler's outbox job every 15)."""


def retry_delay(failures: int) -> float:
    return float(min(RETRY_MAX, RETRY_FIRST * 2.0 ** (failures - 1)))


@dataclass(slots=True)
class Failing:
    """A timer job that failed, until it works again."""

    cause: str
    failures: int
    since: float
    retry_at: float
    told: bool = False


class Worker:
    """The timer jobs, one at a time in a thread: each heavy one in a child process
    (``tunerd.jobs``), the outbox in the thread itself (cheap, and every 15 s). Its database
    connection belongs to the thread."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tunerd-job")
        self._store: Store | None = None
        self._outbox: Any = None
        self._outbox_url: str | None = None
        self.busy_since: float | None = None
        """When the job in flight started (monotonic), None when idle."""
        self.closing = False

    def submit(self, kind: str) -> concurrent.futures.Future[str | None]:
        """Run job ``kind``; the future holds why it failed, None when it did its work."""

        def run() -> str | None:
            if self.closing:
                return None  # stopping: only the job already in flight finishes
            self.busy_since = time.monotonic()
            try:
                return self._flush_outbox() if kind == "outbox" else self._child(kind)
            except Exception as exc:
                log.debug("job %s", kind, exc_info=True)
                return cause_of(exc)
            finally:
                self.busy_since = None

        return self.executor.submit(run)

    def tell(self, notification: Notification) -> None:
        """Notify from the worker's thread (the outbox is its database connection's)."""

        def send() -> None:
            from tunerd.notify import notifier_for

            try:
                notifier_for(self._db(), self.daemon.settings.discord.url()).send(notification)
            except Exception as exc:
                log.error("could not queue the notification %r: %s", notification.title, exc)

        self.executor.submit(send)

    def _db(self) -> Store:
        if self._store is None:
            self._store = Store(self.daemon.settings.state_dir)
        return self._store

    def _child(self, kind: str) -> str | None:
        from tunerd.jobs import settings_payload

        started = time.monotonic()
        try:
            done = subprocess.run(
                [sys.executable, "-m", "tunerd.jobs", kind],
                input=settings_payload(self.daemon.settings),
                stdout=subprocess.PIPE,
                timeout=JOB_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"still running after {human_duration(JOB_TIMEOUT)}: stopped"
        if done.returncode == 0:
            log.debug("job %s done in %.1f s", kind, time.monotonic() - started)
            return None
        said = done.stdout.decode("utf-8", "replace").strip().splitlines()
        if said:
            return said[-1]  # the child's own one-line cause
        if done.returncode < 0:
            return f"killed by signal {-done.returncode}"
        return f"ended with exit status {done.returncode}"

    def _flush_outbox(self) -> str | None:
        """Deliver what an earlier job could not (Discord down, 429): only with a webhook and
        something pending, so an idle daemon without either imports and sends nothing."""
        url = self.daemon.settings.discord.url()
        if url != self._outbox_url:
            self._close_outbox()
            self._outbox_url = url
        if url is None:
            return None
        if self._outbox is None:
            from tunerd.discord import DiscordNotifier

            self._outbox = DiscordNotifier(self._db(), url)
        if self._outbox.pending():
            self._outbox.flush(budget=4.0)
        return None

    def _close_outbox(self) -> None:
        if self._outbox is not None:
            self._outbox.close()
            self._outbox = None

    def shutdown(self) -> None:
        """Let the job in flight finish, drop the ones not started, then close (in the worker's
        own thread: its database connection belongs to it)."""

        def close() -> None:
            with contextlib.suppress(Exception):  # stopping: what is left stays in the outbox
                if self._outbox is not None:
                    self._outbox.flush(budget=2.0)
            self._close_outbox()
            if self._store is not None:
                self._store.close()

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
        self._failing: dict[str, Failing] = {}
        self._beats: dict[str, float] = {}
        """When each part the watchdog vouches for last made progress (monotonic)."""
        self._storage_failing: float | None = None
        """Since when (monotonic) writing the state store fails; None while it works."""
        self._anchor = time.time()
        """The hourly harm check counts its hours from here, whatever rebuilds the timers."""
        self.exit_code = 0
        self.native: dict[str, Any] | None = None
        """The native jobs' runs in the window, as last read from the gateway's history."""
        self._native_stats: LogStats | None = None
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

    def _store_write(self, write: Callable[[], None]) -> bool:
        """Run one write of the daemon's loop (checkpoint, status). A storage error (disk full,
        database locked too long) is said once; reading goes on in memory, and the write is
        tried again at the next heartbeat, its data still pending. Failing for ``GIVE_UP``
        seconds ends the daemon with status 1 (systemd restarts it from the last checkpoint:
        nothing lost, nothing counted twice)."""
        try:
            write()
        except (sqlite3.Error, OSError) as exc:
            now = time.monotonic()
            if self._storage_failing is None:
                self._storage_failing = now
                log.error(
                    "cannot write the state store (%s): reading goes on, saved when it works again",
                    cause_of(exc),
                )
                systemd.notify(f"STATUS=cannot write the state store ({cause_of(exc)})")
            elif now - self._storage_failing > GIVE_UP:
                self._fail(f"the state store has failed for {human_duration(GIVE_UP)}")
            return False
        if self._storage_failing is not None:
            log.info(
                "the state store works again (after %s)",
                human_duration(time.monotonic() - self._storage_failing),
            )
            self._storage_failing = None
        return True

    def _fail(self, why: str) -> None:
        """Stop with status 1, so that systemd starts tunerd again."""
        if self.exit_code == 0:
            log.error("%s: exiting with status 1 so that systemd restarts tunerd", why)
            self.exit_code = 1
        self.stopping.set()

    def _save(self) -> None:
        self._store_write(self._write_tail)

    def _write_tail(self) -> None:
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
        if self._store_write(self._write_status):
            self._dirty_status = False

    def _write_status(self) -> None:
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
            "native": self.native,
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
        for problem in poll.problems:
            log.warning("log %s: %s", self.settings.log_path, problem)
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
            self._beat("follow")
            await asyncio.sleep(0)
        self._beat("follow")

    def _beat(self, part: str) -> None:
        self._beats[part] = time.monotonic()

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

    async def follow_native(self) -> None:
        """Read what is new in the gateway's history whenever its database or WAL changes
        (inotify on its folder, a look every ``RESCAN`` seconds anyway), at most every
        ``NATIVE_EVERY`` seconds. The first look, which reads all of it, runs in a process of
        its own: at the retention cap it takes hundreds of MB that a long-running daemon would
        keep. So does a look after the database was replaced or a job renamed (the figures are
        counted afresh), and one every ``DIGEST_EVERY``: it starts from the digest kept in the
        state folder and keeps it up to date, so that one-shot commands (the weekly cycle
        among them) read only what is new. A history that cannot be read is said once and
        tried again."""
        from tunerd.inotify import DirectoryWatch, Unavailable
        from tunerd.inputs.openclaw import configured_state, kept_digest

        seen: tuple[Any, ...] | None = None
        said = None
        took = 0.0
        follower: HistoryFollower | None = None
        inode: int | None = None
        names: dict[str, str] = {}
        afresh_at = 0.0
        while not self.stopping.is_set():
            state = configured_state(self.settings.openclaw)  # a reload may change it
            if state is None:
                if self.native is not None:
                    self.native, seen, follower = None, None, None
                    self._dirty_status = True
                await self._wait(RESCAN)
                continue
            now_seen = _fingerprint(state)
            if follower is not None and (follower.path != state or _inode(now_seen) != inode):
                follower = None  # another file now (a reload, a database replaced): afresh
            if follower is not None and time.monotonic() - afresh_at > DIGEST_EVERY:
                follower, seen = None, None  # the kept digest brought up to date
            inode = _inode(now_seen)
            if now_seen != seen:
                seen = now_seen
                started = time.monotonic()
                window = self.settings.window.total_seconds()
                if follower is None:
                    afresh_at = started
                    keep = kept_digest(self.settings.state_dir, state)
                    follower, look = await _in_child(state, window, keep)
                else:
                    look = await asyncio.to_thread(_look, follower, self._native_stats, window)
                self._native_stats, published, now_names = look
                self.native = published
                took = time.monotonic() - started
                self._dirty_status = True
                self._changed.set()
                if published.get("unkept"):
                    log.warning("%s", published["unkept"])
                error = published.get("error")
                if error and error != said:
                    log.warning("OpenClaw's history: %s", error)
                elif said and not error:
                    log.info("OpenClaw's history can be read again")
                said = error
                if error:
                    seen = None  # tried again at the next look, changed or not
                elif any(names.get(job, name) != name for job, name in now_names.items()):
                    follower, seen = None, None  # a job renamed: counted afresh at once
                names = now_names or names
            try:
                watch = DirectoryWatch(state.parent, state.name)
            except Unavailable:
                await self._wait(RESCAN)
            else:
                try:
                    await watch.changed(RESCAN)
                finally:
                    watch.close()
            await self._wait(max(NATIVE_EVERY, took / NATIVE_SHARE))

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def heartbeat(self) -> None:
        """Checkpoint at most once a second while lines arrive; sleep while none do."""
        last_evict = time.time()
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 60)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), HEARTBEAT)
            self._changed.clear()
            if why := self.store.replaced():
                self._fail(f"{why} under the running daemon")
                return
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
        """Feed systemd's watchdog only while the follower and the scheduler make progress (and
        no job hangs): a daemon that stopped doing its job is restarted, not kept alive."""
        interval = systemd.watchdog_interval()
        if interval is None:
            return
        said = None
        while not self.stopping.is_set():
            why = self._stalled()
            if why is None:
                systemd.notify("WATCHDOG=1")
            elif why != said:
                log.error("%s: the watchdog is no longer fed, systemd will restart tunerd", why)
            said = why
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval)

    def _stalled(self) -> str | None:
        """Why the daemon is not doing its job, or None."""
        now = time.monotonic()
        for part, limit in STALE.items():
            if now - self._beats.get(part, now) > limit:
                return f"the {part} has made no progress for {human_duration(limit)}"
        busy = self.worker.busy_since
        if busy is not None and now - busy > JOB_TIMEOUT + 300:
            return f"a job has run for {human_duration(now - busy)}"
        return None

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
            if due is None or due.timestamp() > now:
                continue
            at = max(now + 1, self._not_before(kind))
            following = trigger.get_next_fire_time(None, _utc(now))
            if following is not None and at >= following.timestamp():
                continue  # its next scheduled time comes first: that one runs
            if kind not in self._failing:
                log.info("the %s due at %s was missed while stopped: running it now", kind, due)
            scheduler.add_job(
                self._job,
                DateTrigger(run_date=_utc(at)),
                args=[kind],
                id=f"{kind}-missed",
                replace_existing=True,
            )
        scheduler.add_job(self._job, weekly, args=["cycle"], id="cycle")
        hourly = IntervalTrigger(hours=1, start_date=_utc(self._anchor), timezone=zone)
        scheduler.add_job(self._job, hourly, args=["harm"], id="harm")
        scheduler.add_job(self._job, monthly, args=["report"], id="report")
        scheduler.add_job(
            self._job, IntervalTrigger(seconds=15, timezone=zone), args=["outbox"], id="outbox"
        )
        for e in self.store.experiments("running"):
            # due while the daemon was down: at once; after a failure, at its retry
            at = max(e.verify_at, now + 0.5, self._not_before("verify"))
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
                flip_at = max(now + 0.5, self._flipped_at + FLIP_RETRY, self._not_before("flip"))
            scheduler.add_job(
                self._job, DateTrigger(run_date=_utc(flip_at)), args=["flip"], id="flip"
            )

    def _not_before(self, kind: str) -> float:
        """When a failed job may run again (0 when it has not failed)."""
        failing = self._failing.get(kind)
        return failing.retry_at if failing is not None else 0.0

    async def _job(self, kind: str) -> None:
        """Run by the scheduler on the event loop: hand the work to the worker thread; when it
        is done, note how it went and rebuild the timers after anything that may start or end
        an experiment. The hourly harm check with no experiment running has nothing to do: no
        child process is started for it."""
        self._beat("scheduler")
        if kind == "outbox" and time.time() < self._not_before(kind):
            return
        try:
            idle = kind in ("verify", "harm", "flip") and not self.store.experiments("running")
        except sqlite3.Error as exc:
            idle = False
            log.debug("cannot read the running experiments: %s", exc)
        if idle:
            return
        if kind == "flip":
            self._flipped_at = time.time()
        future = self.worker.submit(kind)
        loop = asyncio.get_running_loop()
        future.add_done_callback(lambda done: loop.call_soon_threadsafe(self._job_done, kind, done))

    def _job_done(self, kind: str, done: concurrent.futures.Future[str | None]) -> None:
        """A failed job is said once with its cause and tried again after 1, 2, 4 ... minutes
        (``retry_delay``) until its next scheduled time; Discord hears of it once it has failed
        ``TELL_AFTER`` times in a row, and again when it works."""
        cause = None if done.cancelled() else done.result()
        now = time.time()
        failing = self._failing.get(kind)
        if cause is None:
            if failing is not None:
                del self._failing[kind]
                log.info(
                    "job %s works again, after %d failures since %s",
                    kind,
                    failing.failures,
                    _iso(failing.since),
                )
                if failing.told:
                    self.worker.tell(
                        Notification("job_recovered", f"tunerd: the {kind} job works again")
                    )
        else:
            if failing is None:
                failing = self._failing[kind] = Failing(cause, 0, now, now)
            failing.failures += 1
            failing.retry_at = now + retry_delay(failing.failures)
            if failing.failures == 1 or cause != failing.cause:
                log.error(
                    "job %s failed: %s; it runs again in %s, then less often, until its next time",
                    kind,
                    cause,
                    human_duration(failing.retry_at - now),
                )
            else:
                log.debug("job %s failed again (%d): %s", kind, failing.failures, cause)
            failing.cause = cause
            if failing.failures >= TELL_AFTER and not failing.told:
                failing.told = True
                self.worker.tell(
                    Notification(
                        "job_failing",
                        f"tunerd: the {kind} job keeps failing",
                        None,
                        [
                            cause,
                            f"{failing.failures} failures in a row since {_iso(failing.since)};"
                            " tunerd keeps trying, less and less often, and says when it works",
                        ],
                    )
                )
        if kind != "outbox" and not self.stopping.is_set():
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
        tasks = [
            asyncio.create_task(self._supervise(name, run))
            for name, run in (
                ("follower", self.follow),
                ("history follower", self.follow_native),
                ("heartbeat", self.heartbeat),
                ("watchdog", self.watchdog),
            )
        ]
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
        return self.exit_code

    async def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run one of the daemon's tasks; an error is said (its cause, once) and the task
        started again after 1, 2, 4 ... 60 s. One that keeps failing for ``GIVE_UP`` seconds
        ends the daemon with status 1: never a live process whose follower quietly died."""
        failures, since, said = 0, 0.0, ""
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                await run()
                return
            except Exception as exc:
                cause = cause_of(exc)
                log.debug("the %s failed", name, exc_info=True)
            now = time.monotonic()
            if failures and now - started > 300:
                failures = 0  # it ran five minutes before failing: a new streak
            if failures == 0:
                since = now
            failures += 1
            if cause != said:
                log.error("the %s failed (%s): starting it again", name, cause)
                said = cause
            if now - since > GIVE_UP:
                self._fail(f"the {name} has kept failing for {human_duration(GIVE_UP)}")
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), min(60.0, 2.0 ** (failures - 1)))


Look = tuple[LogStats | None, dict[str, Any], dict[str, str]]
"""What a look gives: the native jobs' statistics, the figures to publish, each job's name."""


async def _in_child(state: Path, window: float, keep: Path) -> tuple[HistoryFollower | None, Look]:
    """``_first_look`` in a process spawned for it (not forked: the daemon runs threads)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    loop = asyncio.get_running_loop()
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return await loop.run_in_executor(pool, _first_look, state, window, keep)
    except Exception as exc:  # the child died (memory, a signal): said, tried again
        failed = {"path": str(state), "error": f"reading failed: {exc}", "crons": {}}
        return None, (None, failed, {})


def _first_look(state: Path, window: float, keep: Path) -> tuple[HistoryFollower | None, Look]:
    """The history as the kept digest has it and what the gateway wrote since (the whole of
    it when there is none), counted afresh; the digest is kept for the next one-shot command."""
    from tunerd.inputs.openclaw import OpenClawError, read_native

    now = time.time()
    found: dict[str, Any] = {"path": str(state), "read_at": now}
    try:
        native = read_native(state, now, keep)
    except OpenClawError as exc:
        return None, (None, found | {"error": str(exc), "crons": {}}, {})
    stats = LogStats(bucket_seconds=DAY, durations=False)
    native.digest.count(stats, native.jobs)
    if native.unkept:
        found["unkept"] = native.unkept
    published = _publish(stats, found, native.version, native.jobs, native.skipped, window)
    return native.follower, published


def _look(follower: HistoryFollower, stats: LogStats | None, window: float) -> Look:
    """What is new in the history, counted into the native jobs' statistics (only one look
    at a time touches them), and their runs in the window to publish, or why not."""
    from tunerd.inputs.openclaw import OpenClawError

    now = time.time()
    found: dict[str, Any] = {"path": str(follower.path), "read_at": now}
    try:
        update = follower.poll(now)
    except OpenClawError as exc:
        return stats, found | {"error": str(exc), "crons": {}}, {}
    if update.whole or stats is None:  # a layout read whole at every look
        stats = LogStats(bucket_seconds=DAY, durations=False)
    stats.add_entries(update.runs, now)
    return _publish(stats, found, update.version, update.jobs, update.skipped, window)


def _publish(
    stats: LogStats,
    found: dict[str, Any],
    version: str,
    jobs: dict[str, Job],
    skipped: int,
    window: float,
) -> Look:
    """The native jobs' runs in the window, to publish (older days dropped)."""
    since = float(found["read_at"]) - window
    stats.evict(since - DAY)
    names = {job.name for job in jobs.values()}
    published = found | {
        "version": version,
        "jobs": len(jobs),
        "skipped": skipped,
        "crons": {
            name: c.counts_since(since, DAY)
            for name, c in stats.crons.items()
            if name in names or not names  # a job deleted since is nobody's now
        },
    }
    return stats, published, {job.id: job.name for job in jobs.values()}


def _fingerprint(state: Path) -> tuple[Any, ...]:
    """What changes when the gateway writes: the database's and its WAL's size and time."""
    found: list[Any] = []
    for path in (state, state.with_name(state.name + "-wal")):
        try:
            info = path.stat()
        except OSError:
            found.append(None)
        else:
            found.append((info.st_ino, info.st_size, info.st_mtime_ns))
    return tuple(found)


def _inode(seen: tuple[Any, ...]) -> int | None:
    """Which file the database is: a new inode is a database replaced, not one written to."""
    return seen[0][0] if seen[0] is not None else None


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
    from tunerd.engine import check_state

    try:
        try:
            daemon = Daemon(config, settings)
            check_state(daemon.store, settings.targets(), settings.state_dir / "apply.lock")
        except sqlite3.Error as exc:
            raise store_error(settings.state_dir / "tunerd.sqlite3", exc) from None
    except StoreError as exc:
        # 2: a person must act (systemd does not restart it: RestartPreventExitStatus=2)
        log.error("%s", exc)
        return 1 if exc.transient else 2
    try:
        return asyncio.run(daemon.serve())
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return 1
