"""The ``tunerd`` command line: a thin layer that parses arguments and calls the core.

Each command imports what it needs when it runs, so ``tunerd --help`` and ``tunerd analyze`` on a
small log stay light (no SciPy, no daemon libraries; pydantic only when a configuration is in play).
Errors go to stderr as one sentence that says what to do, with exit status 1 (the work failed) or 2
(the command was wrong).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from tunerd import __version__

if TYPE_CHECKING:
    from tunerd.config import Settings
    from tunerd.params import Params, ParamsFile

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
    analyze.add_argument("--config", metavar="F", help="configuration file (TOML)")
    analyze.set_defaults(run=cmd_analyze)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except CommandError as exc:
        print(f"tunerd: error: {exc}", file=sys.stderr)
        return exc.status
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


def _read_params_file(path: Path, named: bool) -> ParamsFile | None:
    from tunerd.params import ParamsFileError, parse_params_file

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if named:
            raise CommandError(f"params file {path} does not exist", USAGE_ERROR) from None
        return None
    except OSError as exc:
        raise CommandError(f"cannot read params file {path}: {exc.strerror}") from None
    try:
        return parse_params_file(data)
    except ParamsFileError as exc:
        raise CommandError(
            f"params file {path} is not valid: {exc} (expected "
            '{"defaults": {...}, "crons": {"<name>": {...}}, "experiments": {...}})'
        ) from None


def cmd_analyze(args: argparse.Namespace) -> int:
    from tunerd.analysis import analyze
    from tunerd.configfile import is_configured
    from tunerd.logfile import LogFileError, ReadOptions, read_log
    from tunerd.params import Params
    from tunerd.reader import DEFAULT_MAX_LINE_BYTES
    from tunerd.report import analysis_json, analysis_text, malformed_text
    from tunerd.timeparse import parse_since

    now = datetime.now(UTC)
    settings = None
    if args.log is None or args.config or (args.params is None and is_configured(args.config)):
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

    params_file = None
    if args.params is not None:
        params_file = _read_params_file(Path(args.params), named=True)
    elif settings is not None:
        params_file = _read_params_file(settings.params_file, named=False)

    def params_for(cron: str, logged: dict[str, object] | None) -> Params:
        if params_file is not None:
            return params_file.params_for(cron)
        return Params().with_overrides(logged)

    options = ReadOptions(
        since=since.timestamp() if since else None,
        read_at=time.time(),
        max_line_bytes=settings.max_line_bytes if settings else DEFAULT_MAX_LINE_BYTES,
        max_crons=settings.max_crons if settings else 10_000,
        workers=args.jobs,
    )
    try:
        stats = read_log(log, options)
    except LogFileError as exc:
        hint = "" if args.log else " (set log_path in the configuration or pass LOG)"
        raise CommandError(f"{exc}{hint}") from None
    result = analyze(stats, params_for, since=options.since)
    for line in malformed_text(stats.totals.malformed, stats.malformed_samples):
        print(line, file=sys.stderr)
    if args.json:
        document = analysis_json(result, str(log), since, stats.malformed_samples)
        print(json.dumps(document, ensure_ascii=False, indent=2))
    else:
        print(analysis_text(result, str(log), since))
    return 0
