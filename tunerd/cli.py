"""The ``tunerd`` command line: a thin layer that parses arguments and calls the core.

Each command imports what it needs when it runs, so ``tunerd --help`` and ``tunerd analyze`` on a
small log stay light (no SciPy, no daemon libraries; pydantic only when a configuration is in play).
Errors go to stderr as one sentence that says what to do, with exit status 1 (the work failed) or 2
(the command was wrong).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunerd import __version__
from tunerd.timeparse import iso as _iso

if TYPE_CHECKING:
    from tunerd.analysis import ParamsLookup
    from tunerd.config import Settings
    from tunerd.engine import Engine
    from tunerd.rules import Advisory
    from tunerd.stats import LogStats
    from tunerd.store import Experiment, Review
    from tunerd.targets import InForceReader

USAGE_ERROR = 2
FAILURE = 1


class CommandError(Exception):
    """A command cannot go on; ``status`` is the exit code."""

    def __init__(self, message: str, status: int = FAILURE) -> None:
        super().__init__(message)
        self.status = status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunerd",
        description="Level 2 tuner for a Level 1 auto-retry wrapper: reads its JSONL log, "
        "finds better retry parameters, tests and commits them.",
    )
    parser.add_argument("--version", action="version", version=f"tunerd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    analyze = commands.add_parser(
        "analyze",
        help="statistics, patterns and recommendations for a log (changes nothing)",
        description="One-shot analysis of a Level 1 log: per-cron statistics, the seed's "
        "patterns, recommended parameters with their safety class, and advisories.",
    )
    analyze.add_argument("log", nargs="?", metavar="LOG", help="the log (default: log_path)")
    analyze.add_argument(
        "--since",
        metavar="T",
        help="only runs from T on: ISO 8601 (2026-02-05, 2026-02-05T12:00Z) or a duration "
        "before now (24h, 7d)",
    )
    analyze.add_argument(
        "--params",
        metavar="F",
        help="the params file Level 1 reads, for the current parameters (default: params_file "
        "when configured; else the parameters logged by each run, else the wrapper's defaults)",
    )
    analyze.add_argument("--json", action="store_true", help="one JSON document on stdout")
    analyze.add_argument(
        "--jobs", type=int, metavar="N", help="processes for a large log (default: CPUs, max 4)"
    )
    analyze.add_argument(
        "--openclaw",
        metavar="STATE",
        help="OpenClaw's state database (or its cron folder): its native jobs' runs too"
        " (default: [openclaw] state when it exists)",
    )
    analyze.add_argument("--config", metavar="F", help="configuration file (TOML)")
    analyze.set_defaults(run=cmd_analyze)

    verify = commands.add_parser(
        "verify",
        help="offline verdict on an experiment recorded in a log",
        description="Judge an experiment from a log: arms told apart by each run's params[P] (or "
        "its experiment.arm), or by time around --switch-at for a Level 1 that records neither.",
    )
    verify.add_argument("log", metavar="LOG")
    verify.add_argument("--cron", required=True, metavar="C")
    verify.add_argument("--param", required=True, choices=("maxRetries", "timeout", "backoffBase"))
    verify.add_argument("--control", required=True, type=int, metavar="V")
    verify.add_argument("--treatment", required=True, type=int, metavar="V")
    verify.add_argument(
        "--experiment",
        metavar="ID",
        help="count the runs tagged with this experiment (default: the latest one in the log)",
    )
    verify.add_argument("--since", metavar="T", help="only runs from T on (ISO 8601 or 7d)")
    verify.add_argument("--until", metavar="T", help="only runs up to T (ISO 8601 or 1d)")
    verify.add_argument(
        "--schedule",
        metavar="FILE",
        help='switchback: the values in force, JSON [{"at": ISO time, "value": V}, ...]; each'
        " run counts for the value in force when it started, hour blocks are the units",
    )
    verify.add_argument(
        "--switch-at",
        metavar="T",
        help="one switch: runs from T on are the treatment, an equally long stretch before T the"
        " control, judged by clock hours, with a placebo test before it",
    )
    verify.add_argument(
        "--look",
        type=int,
        default=1,
        metavar="N",
        help="which look this is (1 = the planned verification time; later looks spend less alpha)",
    )
    verify.add_argument("--json", action="store_true", help="one JSON document on stdout")
    verify.add_argument("--config", metavar="F", help="configuration file (TOML)")
    verify.set_defaults(run=cmd_verify)

    def command(name: str, run: Any, help: str, json_flag: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        if json_flag:
            sub.add_argument("--json", action="store_true", help="one JSON document on stdout")
        sub.add_argument("--config", metavar="F", help="configuration file (TOML)")
        sub.set_defaults(run=run)
        return sub

    run_ = commands.add_parser(
        "exec",
        help="run a command as Level 1 does: params file, arm, timeout, retries, log line",
        description="A Level-1-compatible runner, a drop-in for the auto-retry wrapper: reads "
        "the params file, picks the experiment arm, runs CMD with the timeout (its whole process "
        "group), retries what the wrapper retries (a timeout; not a non-zero exit) up to "
        "maxRetries attempts in all with the backoff, passes CMD's output and exit status "
        "through and appends the wrapper's line to the log.",
        usage="tunerd exec --cron C [--context KEY=VALUE ...] [--retry-exit CODES] [--notify]"
        " [--config F] -- CMD [ARG ...]",
    )
    run_.add_argument("--cron", required=True, metavar="C", help="the cron's name in the log")
    run_.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more context for the log line, e.g. schedule='*/15 * * * *' (repeatable)",
    )
    run_.add_argument(
        "--retry-exit",
        metavar="CODES",
        default="",
        help="exit codes to retry as well (comma-separated, e.g. 75,22); the wrapper retries no"
        " non-zero exit",
    )
    run_.add_argument(
        "--notify",
        action="store_true",
        help="report a final failure to Discord ([discord] in the configuration), as the"
        " wrapper's executeWithNotifications does",
    )
    run_.add_argument("--log", metavar="F", help="the log to append to (default: log_path)")
    run_.add_argument("--params", metavar="F", help="the params file (default: params_file)")
    run_.add_argument("--config", metavar="F", help="configuration file (TOML)")
    run_.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="after --")
    run_.set_defaults(run=cmd_exec)

    sim = commands.add_parser(
        "simulate",
        help="the whole loop against simulated crons, weeks in seconds",
        description="Run tunerd's real policy, experiments and verdicts on a virtual clock "
        "against the simulated crons of SCENARIO (a TOML file, SPEC section 7), or against "
        "crons fitted to a real log with --from-log: what would tunerd do over the next weeks?",
    )
    sim.add_argument("scenario", nargs="?", metavar="SCENARIO", help="the scenario (TOML)")
    sim.add_argument("--from-log", metavar="LOG", help="fit the scenario to a real log instead")
    sim.add_argument(
        "--openclaw",
        metavar="STATE",
        help="fit OpenClaw's native jobs too, from the gateway's history (its state database or,"
        " before 2026.6, its cron folder); alone, or with --from-log",
    )
    sim.add_argument("--weeks", type=int, metavar="N", help="simulated weeks (default: scenario)")
    sim.add_argument("--seed", type=int, metavar="N", help="random seed (default: scenario)")
    sim.add_argument(
        "--params",
        metavar="F",
        help="with --from-log: the params file for the crons' current parameters",
    )
    sim.add_argument(
        "--save-scenario", metavar="F", help="with --from-log: write the fitted scenario (TOML)"
    )
    sim.add_argument(
        "--workdir",
        metavar="DIR",
        help="keep the simulation's log, params file and state here (a new directory)",
    )
    sim.add_argument("--verbose", action="store_true", help="every advisory, every week")
    sim.add_argument("--json", action="store_true", help="one JSON document on stdout")
    sim.add_argument("--config", metavar="F", help="configuration file (TOML)")
    sim.set_defaults(run=cmd_simulate)

    command("run", cmd_run, "the daemon: follow the log, tune weekly, verify, notify", False)
    command("cycle", cmd_cycle, "run a tuning cycle now: analyse, decide, apply, queue, notify")
    command("status", cmd_status, "parameters in force, experiments, pending approvals")
    command("history", cmd_history, "every change, verdict and rollback")
    command(
        "report", cmd_report, "the monthly report: changes, verdicts, success metrics"
    ).add_argument("--month", metavar="YYYY-MM", help="the month (default: this one)")
    for name, run, help in (
        ("approve", cmd_approve, "approve a pending review: its experiment starts"),
        ("reject", cmd_reject, "reject a pending review: it is not proposed again for a while"),
        ("rollback", cmd_rollback, "undo an applied change by hand (an ID from history)"),
    ):
        command(name, run, help).add_argument("id", metavar="ID", type=_row_id)
    return parser


def _row_id(text: str) -> int:
    """A review, change or experiment number (SQLite's integers stop at 2^63 - 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 1 << 63:
        raise argparse.ArgumentTypeError(f"no such number: {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.run(args)
        if (notifier := getattr(args, "notifier", None)) is not None:
            # A few seconds at most; what cannot be delivered now waits in the outbox.
            notifier.flush(budget=5.0, retry_now=True)
    except CommandError as exc:
        print(f"tunerd: error: {exc}", file=sys.stderr)
        return exc.status
    except sqlite3.Error as exc:  # met outside the store's own checks (a damaged page, a full disk)
        from tunerd.store import OPENED, store_error

        path = OPENED[-1] if OPENED else Path("tunerd.sqlite3")
        print(f"tunerd: error: {store_error(path, exc)}", file=sys.stderr)
        return FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tunerd analyze | head`
        sys.stderr.close()
        return FAILURE
    return status


def _settings(explicit: str | None) -> Settings:
    from tunerd.config import ConfigError, load

    try:
        return load(explicit)
    except ConfigError as exc:
        raise CommandError(str(exc), USAGE_ERROR) from None


def _in_force(params: str | None, settings: Settings | None) -> InForceReader:
    """Where ``analyze`` and ``simulate --from-log`` read each cron's parameters: the configured
    scripts and params file (``--params`` names another), as the cycle does; without a
    configuration, ``--params`` or what each cron's log lines recorded."""
    from tunerd.targets import InForceReader, ParamsFileTarget, Targets

    path = Path(params).expanduser() if params is not None else None
    if path is not None:
        _check_params_file(path, named=True)
    elif settings is not None:
        _check_params_file(settings.params_file, named=False)
    if settings is not None:
        return InForceReader(settings.targets(path))
    return InForceReader(None if path is None else Targets(ParamsFileTarget(path), {}))


def _check_params_file(path: Path, named: bool) -> None:
    """A params file named on the command line must exist; any params file must be valid."""
    from tunerd.params import ParamsFileError, parse_params_file

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if named:
            raise CommandError(f"params file {path} does not exist", USAGE_ERROR) from None
        return
    except OSError as exc:
        raise CommandError(f"cannot read params file {path}: {exc.strerror}") from None
    try:
        parse_params_file(data)
    except ParamsFileError as exc:
        raise CommandError(
            f"params file {path} is not valid: {exc} (expected "
            '{"defaults": {...}, "crons": {"<name>": {...}}, "experiments": {...}})'
        ) from None


def cmd_analyze(args: argparse.Namespace) -> int:
    from tunerd.analysis import analyze
    from tunerd.configfile import is_configured
    from tunerd.logfile import LogFileError, ReadOptions, read_log
    from tunerd.reader import DEFAULT_MAX_LINE_BYTES
    from tunerd.report import analysis_json, analysis_text, malformed_text
    from tunerd.stats import LogStats
    from tunerd.store import last_changes_of
    from tunerd.timeparse import parse_since

    now = datetime.now(UTC)
    settings = None
    if args.log is None or args.config or is_configured(args.config):
        settings = _settings(args.config)
    log = settings.log_path if args.log is None and settings else Path(args.log)
    since = None
    if args.since is not None:
        try:
            since = parse_since(args.since, now)
        except ValueError as exc:
            raise CommandError(f"--since: {exc}", USAGE_ERROR) from None
    if args.jobs is not None and args.jobs < 1:
        raise CommandError("--jobs must be at least 1", USAGE_ERROR)

    in_force = _in_force(args.params, settings)

    # As the cycle does: a cron's runs from before its last change say nothing of its values now
    # (day buckets, only when tunerd has changed something).
    changed = last_changes_of(settings.state_dir) if settings is not None else {}
    options = ReadOptions(
        since=since.timestamp() if since else None,
        read_at=time.time(),
        max_line_bytes=settings.max_line_bytes if settings else DEFAULT_MAX_LINE_BYTES,
        max_crons=settings.max_crons if settings else 10_000,
        bucket_seconds=86400.0 if changed else None,
        workers=args.jobs,
    )
    native = _native_state(args, settings)
    try:
        if native is not None and args.openclaw and args.log is None and not log.exists():
            stats = LogStats(options.since, options.bucket_seconds, options.max_crons)
            log = native  # the native history alone, as asked
        else:
            stats = read_log(log, options)
    except LogFileError as exc:
        hint = "" if args.log else " (set log_path in the configuration or pass LOG)"
        raise CommandError(f"{exc}{hint}") from None
    lookup: ParamsLookup = in_force
    warnings: list[Advisory] = []
    source = None
    if native is not None:
        explicit = args.openclaw is not None
        lookup, warnings, source = _with_native(
            stats, native, in_force, options.read_at, explicit, settings
        )
    result = analyze(stats, lookup, since=options.since, changed_at=changed)
    result.advisories[:0] = warnings
    for line in malformed_text(stats.totals.malformed, stats.malformed_samples):
        print(line, file=sys.stderr)
    if args.json:
        document = analysis_json(result, str(log), since, stats.malformed_samples)
        print(json.dumps(document | {"openclaw": source}, ensure_ascii=False, indent=2))
    else:
        label = str(log) if source is None else source if log == native else f"{log} and {source}"
        print(analysis_text(result, label, since))
    return 0


BEHIND_AFTER = 10.0
"""Seconds after which a daemon's snapshot that has not caught up with the log is said to be
behind (it publishes within a second of reading; an idle one has nothing to catch up)."""


def _behind(log: Path, offset: int, age: float) -> dict[str, Any]:
    """``{"behind": {"bytes", "seconds"}}`` when the log has grown past what the daemon last
    published, long ago: it reads but cannot save (its state store is failing)."""
    try:
        size = log.stat().st_size
    except OSError:
        return {}
    if size > offset and age > BEHIND_AFTER:
        return {"behind": {"bytes": size - offset, "seconds": round(age, 1)}}
    return {}


def _native_state(args: argparse.Namespace, settings: Settings | None) -> Path | None:
    """OpenClaw's state to read native runs from: ``--openclaw``, else the configured one when
    it exists."""
    from tunerd.inputs.openclaw import configured_state

    if getattr(args, "openclaw", None) is not None:
        return Path(args.openclaw).expanduser()
    return configured_state(settings.openclaw) if settings is not None else None


def _with_native(
    stats: LogStats,
    state: Path,
    in_force: ParamsLookup,
    now: float,
    explicit: bool,
    settings: Settings | None,
    can_edit: bool | None = None,
) -> tuple[ParamsLookup, list[Advisory], str | None]:
    """``count_native`` for a command, and what was read (for a person); a configured state
    that cannot be read is said and left out; one named by ``--openclaw`` is an error."""
    from tunerd.config import OpenClawSettings, Settings
    from tunerd.inputs.openclaw import (
        OpenClawError,
        count_native,
        kept_digest,
        read_native,
        skipped_text,
    )

    # without a configuration, where a configured tunerd would keep its state
    state_dir: Path = settings.state_dir if settings else Settings.model_fields["state_dir"].default
    keep = kept_digest(state_dir.expanduser(), state)
    try:
        native = read_native(state, now, keep)
    except OpenClawError as exc:
        if explicit:
            raise CommandError(str(exc)) from None
        print(f"tunerd: warning: native cron runs not read: {exc}", file=sys.stderr)
        return in_force, [], None
    for warning in (skipped_text(native.skipped) if native.skipped else None, native.unkept):
        if warning:
            print(f"tunerd: warning: {warning}", file=sys.stderr)
    source = (
        f"OpenClaw {state} ({native.version}: {native.executions:,} executions of"
        f" {len(native.jobs):,} jobs)"
    )
    if can_edit is None:
        can_edit = (settings.openclaw if settings is not None else OpenClawSettings()).can_edit
    return (*count_native(stats, native, in_force, can_edit), source)


# --- the commands that act (issue 3) ------------------------------------------------------------


def _engine(args: argparse.Namespace, acting: bool = False) -> tuple[Settings, Engine]:
    """The settings and the engine; ``acting`` commands (``cycle``, ``approve``, ``reject``,
    ``rollback``) deliver what they notified before exiting, within a few seconds; the others
    never wait on the network (the outbox is the daemon's, or the next acting command's)."""
    import logging

    from tunerd.cycle import build_engine
    from tunerd.notify import notifier_for
    from tunerd.store import Store, StoreError

    logging.basicConfig(level=logging.INFO, format="tunerd: %(message)s", stream=sys.stderr)
    settings = _settings(args.config)
    try:
        store = Store(settings.state_dir)
        notifier = notifier_for(store, settings.discord.url())
        engine = build_engine(settings, notifier, store)
    except StoreError as exc:
        raise CommandError(str(exc)) from None
    if acting:
        args.notifier = notifier
    # Whatever a crash interrupted is settled before anything is shown; a reading command does
    # not wait for a writer at work (a cycle, a flip): what it holds is not a crash's.
    with engine.exclusive(wait=acting) as ours:
        for found in engine.recover(time.time()) if ours else ():
            logging.getLogger("tunerd").warning("recovered: %s", found)
    return settings, engine


def _emit(args: argparse.Namespace, document: dict[str, Any], text: str) -> int:
    if getattr(args, "json", False):
        print(json.dumps(document, ensure_ascii=False, indent=2))
    else:
        print(text)
    return 0


def _operator() -> str:
    import getpass

    try:
        return f"operator:{getpass.getuser()}"
    except (KeyError, OSError):
        return "operator"


def cmd_cycle(args: argparse.Namespace) -> int:
    from tunerd.cycle import run_cycle
    from tunerd.logfile import LogFileError
    from tunerd.report import safe_text

    settings, engine = _engine(args, acting=True)
    try:
        report = run_cycle(settings, engine, time.time())
    except LogFileError as exc:
        raise CommandError(f"{exc} (log_path in the configuration)") from None
    _tell_daemon(settings)
    lines = [f"recovered: {r}" for r in report.recovered]
    for settled in report.settled:
        e = settled.experiment
        lines.append(
            f"  {settled.action:<8} experiment {e.id} ({safe_text(e.cron)}: {e.param}"
            f" {e.control:,} → {e.treatment:,}) — {safe_text(settled.reason)}"
        )
    lines.append(f"Analysed {report.analysis.totals.cron_entries:,} cron runs in the window.")
    kinds = {"queued": "review", "refused": "change", "dry_run": "change"}
    for o in report.outcomes:
        a = o.action
        what = f" ({kinds[o.result]} {o.id})" if o.id and o.result in kinds else ""
        lines.append(
            f"  {o.result:<11} {safe_text(a.cron)}: {a.param} {a.current:,} → {a.proposed:,}"
            f"{what} — {safe_text(o.detail)}"
        )
    if not report.outcomes:
        lines.append("  nothing to change")
    for advisory in report.analysis.advisories:
        if advisory.type == "unreadable_target":
            print(f"tunerd: warning: {safe_text(advisory.message)}", file=sys.stderr)
    return _emit(args, report.as_json(), "\n".join(lines))


def cmd_status(args: argparse.Namespace) -> int:
    from tunerd.logfile import LogFileError, ReadOptions, read_window
    from tunerd.records import causes
    from tunerd.report import params_text, safe_text
    from tunerd.server import daemon_pid
    from tunerd.stats import LogStats
    from tunerd.targets import InForceReader
    from tunerd.timeparse import human_duration

    settings, engine = _engine(args)
    now = time.time()
    store = engine.store
    pid = daemon_pid(settings.state_dir)
    snapshot = store.db.execute("SELECT * FROM daemon_status WHERE id = 1").fetchone()
    daemon: dict[str, Any] | None = None
    counts: dict[str, list[int | None]]
    logged: dict[str, dict[str, Any]]
    published_native: dict[str, Any] | None = None
    if pid is not None and snapshot is not None and snapshot["pid"] == pid:
        # The daemon publishes within a second of every change it reads: per cron runs, final
        # failures, retried, exhausted, non-retryable (an older daemon published fewer).
        published = json.loads(snapshot["document"])
        tail = published["tail"]
        counts = {
            name: [*(v if isinstance(v, list) else [v])][:5]
            for name, v in published["crons"].items()
        }
        logged = published.get("logged", {})
        published_native = published.get("native")
        daemon = {"pid": pid, "published_at": _iso(snapshot["updated_at"])}
        daemon |= _behind(settings.log_path, tail.get("offset", 0), now - snapshot["updated_at"])
    else:
        since = now - settings.window.total_seconds()
        try:
            stats = read_window(
                settings.log_path,
                ReadOptions(since=since, read_at=now, max_line_bytes=settings.max_line_bytes),
            )
            counts = {
                name: [*c.counts_since(since, stats.bucket_seconds)]
                for name, c in stats.crons.items()
            }
            logged = {name: c.params for name, c in stats.crons.items() if c.params is not None}
            tail = {
                "path": str(settings.log_path),
                "offset": stats.offset,
                "entries": stats.totals.entries + stats.totals.before_since,
                "malformed": stats.totals.malformed,
            }
        except LogFileError as exc:
            counts, logged = {}, {}
            tail = {
                "path": str(settings.log_path),
                "offset": 0,
                "entries": 0,
                "malformed": 0,
                "error": str(exc),
            }
    in_force: ParamsLookup = InForceReader(engine.targets)
    native = _native_state(args, settings)
    if (
        native is not None
        and published_native is not None
        and published_native.get("path") == str(native)
        and "error" not in published_native
    ):  # the daemon follows the gateway's history: its figures, and each job's value read afresh
        for name, values in published_native["crons"].items():
            counts[name] = [*values][:5]
    elif native is not None:  # the gateway's own jobs, read from its history here
        since = now - settings.window.total_seconds()
        native_stats = LogStats(since=since, bucket_seconds=86400.0)
        in_force, _, _ = _with_native(native_stats, native, in_force, now, False, settings)
        for name, c in native_stats.crons.items():
            counts[name] = [*c.counts_since(since, native_stats.bucket_seconds)]
    experiments = store.experiments("starting", "running")
    pending = store.reviews("pending")
    for e in experiments:
        counts.setdefault(e.cron, [0, 0, 0, 0, 0])
    for values in counts.values():
        values += [None] * (5 - len(values))
    outbox = dict.fromkeys(("pending", "dead"), 0) | {
        row["state"]: row["n"]
        for row in store.db.execute(
            "SELECT state, COUNT(*) AS n FROM outbox WHERE state != 'delivered' GROUP BY state"
        )
    }
    undo = {e.id: store.start_of(e.id) for e in experiments}
    crons: list[dict[str, Any]] = []
    for name, (runs, failures, retried, exhausted, non_retryable) in sorted(counts.items()):
        p = in_force(name, logged.get(name))
        crons.append(
            {
                "cron": name,
                "runs": runs or 0,
                "final_failure_rate": _share(failures, runs or 0),
                "final_failures": None
                if exhausted is None or failures is None or non_retryable is None
                else causes(failures, exhausted, non_retryable),
                "retry_rate": _share(retried, runs or 0),
                "params": p.as_dict(),
                "params_source": p.source,
                "params_assumed": p.assumed,
                "params_unwritable": dict(p.fixed),
            }
        )
    document = {
        "daemon": daemon,
        "tail": tail,
        "notifications": outbox,
        "crons": crons,
        "experiments": [_experiment_json(e) | {"change": undo[e.id]} for e in experiments],
        "pending": [r.as_json() for r in pending],
    }
    lines = [
        f"Log: {safe_text(str(tail['path']))} ({tail['entries']:,} entries, "
        f"{tail['malformed']:,} malformed, offset {tail['offset']:,})"
    ]
    if "error" in tail:
        lines.append(f"  ! {safe_text(str(tail['error']))}")
    if daemon is not None and "behind" in daemon:
        lag = daemon["behind"]
        lines.append(
            f"  ! the daemon's figures are {human_duration(lag['seconds'])} old and"
            f" {lag['bytes']:,} bytes of the log behind: it is not saving what it reads (a full"
            " disk? see its log: `journalctl -u tunerd`)"
        )
    lines.append(f"Crons ({len(crons)}):")
    for row in crons:
        failed, retries, by = row["final_failure_rate"], row["retry_rate"], row["final_failures"]
        rates = ""
        if failed is not None and retries is not None:
            why = (
                f" ({by['exhausted']} after every attempt, {by['non_retryable']} not"
                f" retryable, {by['other']} other)"
                if by and failed
                else ""
            )
            rates = f", {failed:.1%} failed{why}, {retries:.1%} retried"
        lines.append(f"  {safe_text(row['cron'])}: {row['runs']} runs{rates}")
        lines.append(f"    {params_text(in_force(row['cron'], logged.get(row['cron'])))}")
    lines.append(f"Experiments under way ({len(experiments)}):")
    for e in experiments:
        lines.append(
            f"  experiment {e.id}: {safe_text(e.cron)}: {e.param} {e.control:,} → {e.treatment:,}"
            f" ({e.mode}), verdict in {human_duration(e.verify_at - now)}"
            + (f"; to undo it: tunerd rollback {undo[e.id]}" if undo[e.id] else "")
        )
    if outbox["pending"] or outbox["dead"]:
        lines.append(
            f"Discord: {outbox['pending']} notifications waiting to be delivered,"
            f" {outbox['dead']} refused (see the log)"
        )
    lines.append(f"Waiting for approval ({len(pending)}):")
    for r in pending:
        lines.append(
            f"  review {r.id}: {safe_text(r.cron)}: {r.param} {r.current:,} → {r.proposed:,}"
            f" — {safe_text(r.why_manual)}  (tunerd approve {r.id} | tunerd reject {r.id})"
        )
    return _emit(args, document, "\n".join(lines))


def _share(part: int | None, whole: int) -> float | None:
    return round(part / whole, 6) if part is not None and whole else None


def cmd_history(args: argparse.Namespace) -> int:
    from tunerd.report import safe_text

    _, engine = _engine(args)
    store = engine.store
    changes = store.changes()
    document = {
        "changes": [
            {
                "id": c.id,
                "at": _iso(c.created_at),
                "cron": c.cron,
                "param": c.param,
                "from": c.old_value,
                "to": c.new_value,
                "action": c.action,
                "state": c.state,
                "actor": c.actor,
                "reason": c.reason,
                "target": c.target,
                "experiment": c.experiment,
                "evidence": json.loads(c.evidence) if c.evidence else None,
            }
            for c in changes
        ],
        "experiments": [
            _experiment_json(e)
            | {
                "ended_at": _iso(e.ended_at) if e.ended_at else None,
                "verdict": json.loads(e.verdict) if e.verdict else None,
            }
            for e in store.experiments()
        ],
        "reviews": [r.as_json() for r in store.reviews()],
    }
    decided = [r for r in store.reviews() if r.decided_at is not None]
    lines = [f"{len(changes)} changes, {len(decided)} decided reviews:"]
    entries = [
        (
            c.created_at,
            f"  change {c.id:<4} {_iso(c.created_at)} {c.action:<16} {c.state:<9} "
            f"{safe_text(c.cron)}: {c.param} {c.old_value} → {c.new_value}"
            f" by {c.actor} — {safe_text(c.reason)}",
        )
        for c in changes
    ]
    entries += [
        (
            r.decided_at or r.created_at,
            f"  review {r.id:<4} {_iso(r.decided_at or r.created_at)} {r.state:<26} "
            f"{safe_text(r.cron)}: {r.param} {r.current} → {r.proposed}"
            f" by {safe_text(r.decided_by or '?')} — {safe_text(r.reason)}",
        )
        for r in decided
    ]
    lines += [line for _, line in sorted(entries, key=lambda e: e[0])]
    if not entries:
        lines = ["No changes yet."]
    return _emit(args, document, "\n".join(lines))


def cmd_approve(args: argparse.Namespace) -> int:
    from tunerd.cycle import planned
    from tunerd.engine import EngineError
    from tunerd.policy import SafetyError, check_approved
    from tunerd.targets import TargetError

    settings, engine = _engine(args, acting=True)
    now = time.time()
    with engine.exclusive():
        engine.recover(now)
        review = _pending_review(engine, args.id, "approved")
        in_force = engine.current_params(review.cron)
        current = in_force.get(review.param)
        if (why := in_force.unwritable(review.param)) is not None:
            engine.store.decide_review(review.id, "superseded", _operator(), now)
            raise CommandError(f"review {args.id} cannot be applied: {why}")
        if current != review.current:
            engine.store.decide_review(review.id, "superseded", _operator(), now)
            raise CommandError(
                f"{review.param} of {review.cron!r} is {current} now, not {review.current} as"
                " when the review was queued: the review is superseded; the next cycle decides"
                " again"
            )
        evidence = json.loads(review.evidence or "{}")
        power, planned_words = planned(engine, settings, review.cron, review.param, evidence)
        try:
            check_approved(review.param, review.proposed)
            experiment = engine.start_experiment(
                review.cron,
                review.param,
                review.current,
                review.proposed,
                f"{review.reason} (approved review {review.id}){planned_words}",
                evidence,
                _operator(),
                now,
                verify_after=power.period,
            )
        except (EngineError, SafetyError, TargetError) as exc:
            raise CommandError(f"review {args.id} not approved: {exc}") from None
        engine.store.decide_review(review.id, "approved", _operator(), now)
    _tell_daemon(settings)
    return _emit(
        args,
        {
            "approved": review.id,
            "experiment": experiment.id,
            "verify_at": _iso(experiment.verify_at),
        },
        f"Approved review {review.id}: experiment {experiment.id} started"
        f" ({review.param} {review.current} → {review.proposed}),"
        f" verdict due {_iso(experiment.verify_at)}.",
    )


def _pending_review(engine: Engine, review_id: int, verb: str) -> Review:
    review = engine.store.review(review_id)
    if review is None or review.state != "pending":
        state = "no such review" if review is None else f"it is {review.state}"
        raise CommandError(f"review {review_id} cannot be {verb}: {state} (see tunerd status)")
    return review


def cmd_reject(args: argparse.Namespace) -> int:
    from tunerd.notify import Notification

    settings, engine = _engine(args, acting=True)
    now = time.time()
    with engine.exclusive():
        review = _pending_review(engine, args.id, "rejected")
        engine.store.decide_review(review.id, "rejected", _operator(), now)
        with engine.store.transaction() as db:
            engine.store.add_cooldown(
                review.cron,
                review.param,
                review.proposed,
                now + engine.cooldown,
                f"review {review.id} rejected",
                db,
            )
    engine.notifier.send(
        Notification(
            "review_rejected",
            f"Rejected (review {review.id}): {review.param} {review.current} → {review.proposed}",
            review.cron,
            [f"by {_operator()}"],
        )
    )
    _tell_daemon(settings)
    return _emit(
        args,
        {"rejected": review.id},
        f"Rejected review {review.id}; it will not be proposed again before"
        f" {_iso(now + engine.cooldown)}.",
    )


def cmd_rollback(args: argparse.Namespace) -> int:
    from tunerd.engine import EngineError
    from tunerd.targets import TargetError

    settings, engine = _engine(args, acting=True)
    now = time.time()
    with engine.exclusive():
        engine.recover(now)
        try:
            change = engine.manual_rollback(args.id, now, _operator())
        except (EngineError, TargetError) as exc:
            raise CommandError(f"change {args.id} not rolled back: {exc}") from None
    _tell_daemon(settings)
    return _emit(
        args,
        {
            "rolled_back": args.id,
            "change": change.id,
            "param": change.param,
            "value": change.new_value,
        },
        f"Rolled back change {args.id}: {change.param} of {change.cron!r} is"
        f" {change.new_value} again (history: change {change.id}).",
    )


def _experiment_json(e: Experiment) -> dict[str, Any]:
    return {
        "id": e.id,
        "cron": e.cron,
        "param": e.param,
        "control": e.control,
        "treatment": e.treatment,
        "mode": e.mode,
        "state": e.state,
        "extensions": e.extensions,
        "started_at": _iso(e.started_at),
        "verify_at": _iso(e.verify_at),
    }


def cmd_verify(args: argparse.Namespace) -> int:
    from tunerd.configfile import is_configured
    from tunerd.logfile import LogFileError, read_batches
    from tunerd.offline import verify
    from tunerd.reader import DEFAULT_MAX_LINE_BYTES, LogReader
    from tunerd.records import Entry
    from tunerd.report import safe_text
    from tunerd.timeparse import parse_since
    from tunerd.verdict import VerdictSettings

    if args.control == args.treatment:
        raise CommandError("--control and --treatment must differ", USAGE_ERROR)
    if args.look < 1:
        raise CommandError("--look counts from 1", USAGE_ERROR)
    settings = _settings(args.config) if args.config or is_configured(args.config) else None
    verdict_settings = settings.verdict_settings() if settings else VerdictSettings()
    now = datetime.now(UTC)
    times: dict[str, float | None] = {}
    for option in ("since", "until", "switch_at"):
        text = getattr(args, option)
        try:
            times[option] = None if text is None else parse_since(text, now).timestamp()
        except ValueError as exc:
            flag = "--" + option.replace("_", "-")
            raise CommandError(f"{flag}: {exc}", USAGE_ERROR) from None
    runs: list[tuple[float, Entry]] = []
    reader = LogReader(
        max_line_bytes=settings.max_line_bytes if settings else DEFAULT_MAX_LINE_BYTES,
        now=now.timestamp(),
        columnar=True,
    )
    malformed = 0
    try:
        for batch in read_batches(Path(args.log), reader):
            runs += [(e.when(now).timestamp(), e) for e in batch.entries if e.cron == args.cron]
            malformed += len(batch.malformed)
    except LogFileError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot read the log {args.log}: {exc.strerror or exc}") from None
    if malformed:
        print(f"warning: {malformed:,} malformed lines skipped", file=sys.stderr)
    schedule = _schedule(args.schedule, now) if args.schedule else None
    found = verify(
        runs,
        args.param,
        args.control,
        args.treatment,
        args.look,
        verdict_settings,
        args.experiment,
        times["since"],
        times["until"],
        times["switch_at"],
        schedule,
    )
    for note in found.notes:
        print(f"note: {note}", file=sys.stderr)
    verdict = found.verdict
    document = verdict.as_json() | {
        "cron": args.cron,
        "param": args.param,
        "control": args.control,
        "treatment": args.treatment,
        "experiment": found.experiment,
        "windows": None
        if found.windows is None
        else {arm: [_iso(a), _iso(b)] for arm, (a, b) in found.windows.items()},
        "unassigned_runs": found.unassigned,
        "notes": found.notes,
    }
    c, t = verdict.control.summary(), verdict.treatment.summary()
    lines = [
        f"{verdict.decision.upper()}: {safe_text(args.cron)}, {args.param} {args.control:,} →"
        f" {args.treatment:,}",
        f"  {safe_text(verdict.reason)}",
        f"  {'':<24}{'control':>12}{'treatment':>12}",
        f"  {'runs':<24}{c['runs']:>12,}{t['runs']:>12,}",
        f"  {'final failures':<24}{c['final_failure_rate']:>12.1%}{t['final_failure_rate']:>12.1%}",
        f"  {'retried runs':<24}{c['retry_rate']:>12.1%}{t['retry_rate']:>12.1%}",
        f"  {'mean duration ms':<24}{c['duration_ms_mean'] or 0:>12,.0f}"
        f"{t['duration_ms_mean'] or 0:>12,.0f}",
    ]
    for test in verdict.tests:
        ci = f", 95% CI {test.ci[0]:.3f} to {test.ci[1]:.3f}" if test.ci else ""
        p = "n/a" if test.p_value is None else f"{test.p_value:.4f}"
        effect = "n/a" if test.effect is None else f"{test.effect:+.3f}"
        if test.metric in ("mean run", "p95 run", "first attempt") and test.effect is not None:
            effect = f"×{test.effect:.3f}"
        lines.append(
            f"  {test.role}: {test.metric} by {test.test}: p = {p} (threshold"
            f" {test.threshold:.4f}), effect {effect}{ci}"
        )
    if found.experiment is not None:
        lines.append(f"  (runs tagged with experiment {safe_text(found.experiment)})")
    for arm, (a, b) in (found.windows or {}).items():
        lines.append(f"  ({arm}: {_iso(a)} → {_iso(b)})")
    if found.unassigned:
        lines.append(f"  ({found.unassigned:,} runs of the cron were not counted in either arm)")
    return _emit(args, document, "\n".join(lines))


def _schedule(path: str, now: datetime) -> list[tuple[float, int]]:
    """``--schedule FILE``: ``[{"at": ISO time, "value": V}, ...]``, as (epoch, value) in order."""
    from tunerd.timeparse import parse_since

    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CommandError(
            f"--schedule {path}: cannot read it as JSON ({exc})", USAGE_ERROR
        ) from None
    out = []
    try:
        for item in document:
            value, at = item["value"], item["at"]
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"value {value!r} is not a whole number")
            if isinstance(at, int | float) and not isinstance(at, bool):
                out.append((at / 1000 if at > 1e11 else float(at), value))  # epoch s or ms
            else:
                out.append((parse_since(str(at), now).timestamp(), value))
    except (TypeError, KeyError, ValueError) as exc:
        raise CommandError(
            f'--schedule {path}: expected [{{"at": ISO time, "value": V}}, ...] ({exc})',
            USAGE_ERROR,
        ) from None
    if not out:
        raise CommandError(f"--schedule {path}: no change of value in it", USAGE_ERROR)
    changes: list[tuple[float, int]] = []
    for at, value in sorted(out):  # a value repeated is no change
        if not changes or changes[-1][1] != value:
            changes.append((at, value))
    return changes


def cmd_report(args: argparse.Namespace) -> int:
    from tunerd.monthly import Month, monthly_report, report_text
    from tunerd.report import safe_text

    try:
        month = Month.parse(args.month) if args.month else Month.of(time.time())
    except ValueError as exc:
        raise CommandError(f"--month: {exc}", USAGE_ERROR) from None
    _, engine = _engine(args)
    store = engine.store
    report = monthly_report(month, store.changes(), store.experiments(), store.reviews())
    return _emit(args, report, report_text(report, safe_text))


def cmd_exec(args: argparse.Namespace) -> int:
    from tunerd.config import ConfigError, Settings, load
    from tunerd.runner import execute, warn

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise CommandError("no command to run: tunerd exec --cron C -- CMD [ARG ...]", USAGE_ERROR)
    context: dict[str, str] = {}
    for item in args.context:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandError(f"--context {item!r}: expected KEY=VALUE", USAGE_ERROR)
        context[key] = value
    try:
        retry = frozenset(int(c) for c in args.retry_exit.split(",") if c.strip())
    except ValueError:
        raise CommandError("--retry-exit: comma-separated exit codes", USAGE_ERROR) from None
    try:
        settings = load(args.config)
    except ConfigError as exc:
        # The job runs whatever tunerd's own state: with the built-in defaults.
        warn(f"{exc}; using the built-in defaults")
        settings = Settings.model_validate({})
    log_path = Path(args.log).expanduser() if args.log else settings.log_path
    params = Path(args.params).expanduser() if args.params else settings.params_file
    url = None
    if args.notify:
        url = settings.discord.url()
        if url is None:
            warn("--notify: no Discord webhook is configured ([discord] webhook_url)")
    return execute(args.cron, command, log_path, params, context, settings.state_dir, retry, url)


def cmd_simulate(args: argparse.Namespace) -> int:
    import msgspec

    from tunerd.scenario import ScenarioError, dump_scenario, parse_scenario, unknown_keys
    from tunerd.simulate import simulate, timeline_text

    fitting = args.from_log is not None or args.openclaw is not None
    if (args.scenario is None) == (not fitting):
        raise CommandError(
            "give a SCENARIO file, or --from-log LOG and/or --openclaw STATE (not both kinds)",
            USAGE_ERROR,
        )
    try:
        if fitting:
            scenario = _fitted_scenario(args)
        else:
            path = Path(args.scenario)
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise CommandError(f"cannot read scenario {path}: {exc}", USAGE_ERROR) from None
            scenario = parse_scenario(text, path.stem)
            for key in unknown_keys(text):
                print(f"tunerd: scenario {path}: unknown key {key!r} ignored", file=sys.stderr)
        changes: dict[str, Any] = {}
        if args.weeks is not None:
            if not 1 <= args.weeks <= 104:
                raise CommandError("--weeks: from 1 to 104", USAGE_ERROR)
            changes["weeks"] = args.weeks
        if args.seed is not None:
            changes["seed"] = args.seed
        scenario = msgspec.structs.replace(scenario, **changes)
        if args.save_scenario:
            Path(args.save_scenario).write_text(dump_scenario(scenario), encoding="utf-8")
        if args.workdir:
            workdir = Path(args.workdir)
            try:
                workdir.mkdir(parents=True)
            except FileExistsError:
                raise CommandError(
                    f"--workdir {workdir} exists: give a new one", USAGE_ERROR
                ) from None
            result = simulate(scenario, workdir)
        else:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="tunerd-simulate-") as scratch:
                result = simulate(scenario, Path(scratch))
    except ScenarioError as exc:
        raise CommandError(f"scenario: {exc}", USAGE_ERROR) from None
    return _emit(args, result, timeline_text(result, args.verbose))


def _fitted_scenario(args: argparse.Namespace) -> Any:
    """``--from-log`` and/or ``--openclaw``: the log read whole and the gateway's history, each
    cron fitted, with its parameters in force (a native job's: its timeout, and the gateway's
    fixed retries, which the simulation cannot change either)."""
    from tunerd.configfile import is_configured
    from tunerd.fit import fit_scenario
    from tunerd.logfile import LogFileError, ReadOptions, read_log
    from tunerd.stats import LogStats

    configured = args.config or is_configured(args.config)
    settings = _settings(args.config) if configured else None
    in_force: ParamsLookup = _in_force(args.params, settings)
    now = time.time()
    sources = []
    try:
        if args.from_log is not None:
            log = Path(args.from_log)
            stats = read_log(log, ReadOptions(read_at=now))
            sources.append(log.name)
        else:
            stats = LogStats()
    except LogFileError as exc:
        raise CommandError(str(exc)) from None
    if args.openclaw is not None:
        state = Path(args.openclaw).expanduser()
        # as tunerd would tune them with the `openclaw` command at hand (switchback)
        in_force, _, _ = _with_native(stats, state, in_force, now, True, settings, can_edit=True)
        sources.append(f"OpenClaw {state.name}")
    try:
        scenario, skipped = fit_scenario(
            stats, in_force, args.weeks or 4, f"from {' and '.join(sources)}"
        )
    except ValueError as exc:
        raise CommandError(f"{' and '.join(sources)}: {exc}") from None
    for note in skipped:
        print(f"tunerd: not simulated: {note}", file=sys.stderr)
    return scenario


def cmd_run(args: argparse.Namespace) -> int:
    from tunerd.server import run

    return run(args.config)


def _tell_daemon(settings: Settings) -> None:
    """A change made here takes effect in a running daemon at once (it rebuilds its timers)."""
    from tunerd.server import signal_daemon

    signal_daemon(settings.state_dir)
