"""Settling experiments: gather each arm's runs from the log, judge, and act on the verdict (shell).

``settle`` is what the daemon's verification timers and hourly harm checks call, and what
``tunerd cycle`` runs first: an experiment whose verification time has passed gets its verdict
(commit, rollback, or one more period); one still running is checked for harm.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tunerd.engine import Engine, EngineError
from tunerd.logfile import LogFileError, read_batches, rotated
from tunerd.notify import Notification
from tunerd.reader import DEFAULT_MAX_LINE_BYTES, LogReader
from tunerd.records import Entry
from tunerd.store import Experiment
from tunerd.targets import TargetError
from tunerd.verdict import Arm, Verdict, VerdictSettings, arm_of, harm_check, judge


@dataclass(frozen=True, slots=True)
class Settled:
    experiment: Experiment
    action: str
    """commit | rollback | extend | harm_stop | running | error"""
    reason: str


def window_of(experiment: Experiment, now: float) -> tuple[float, float | None]:
    """(from, switch): A/B arms run side by side since the start; a sequential experiment
    compares the time since the switch with an equally long period before it."""
    if experiment.mode == "sequential":
        return experiment.started_at - (now - experiment.started_at), experiment.started_at
    return experiment.started_at, None


def gather_arms(
    log_path: Path,
    experiments: list[Experiment],
    now: float,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    skip_to: int = 0,
    stop_at: int | None = None,
) -> dict[int, tuple[Arm, Arm]]:
    """Each experiment's (control, treatment) runs, in one pass over the log: the whole of it,
    or the lines from byte ``skip_to`` up to byte ``stop_at`` (both line starts)."""
    arms = {e.id: (Arm(), Arm()) for e in experiments}
    by_cron: dict[str, list[Experiment]] = {}
    for e in experiments:
        by_cron.setdefault(e.cron, []).append(e)
    if not by_cron:
        return arms
    windows = {e.id: window_of(e, now) for e in experiments}
    read_at = datetime.fromtimestamp(now, UTC)

    def take(entries: list[Entry]) -> None:
        for entry in entries:
            for e in by_cron.get(entry.cron or "", ()):
                start, switch = windows[e.id]
                at = entry.when(read_at).timestamp()
                if not start <= at <= now:
                    continue
                arm = arm_of(entry, e.param, e.control, e.treatment, str(e.id), switch, at)
                control, treatment = arms[e.id]
                if arm == "control":
                    control.add(entry)
                elif arm == "treatment":
                    treatment.add(entry)

    reader = LogReader(offset=skip_to, max_line_bytes=max_line_bytes)
    try:
        for batch in read_batches(log_path, reader, skip_to, stop_at):
            take(batch.entries)
    except OSError as exc:
        raise LogFileError(f"cannot read the log {log_path}: {exc.strerror or exc}") from exc
    return arms


def settle(
    engine: Engine,
    log_path: Path,
    settings: VerdictSettings,
    now: float,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> list[Settled]:
    """Judge what is due and check the rest for harm. The caller holds ``engine.exclusive()``."""
    running = engine.store.experiments("running")
    if not running:
        return []
    arms = gather_arms(log_path, running, now, max_line_bytes)
    earliest = min(window_of(e, now)[0] for e in running)
    for older in rotated(log_path, earliest):  # what logrotate moved out during the experiments
        try:
            more = gather_arms(older, running, now, max_line_bytes)
        except LogFileError:
            continue
        for key, (control, treatment) in more.items():
            arms[key][0].merge(control)
            arms[key][1].merge(treatment)
    return settle_arms(engine, running, arms, now, settings)


def settle_arms(
    engine: Engine,
    running: list[Experiment],
    arms: dict[int, tuple[Arm, Arm]],
    now: float,
    settings: VerdictSettings,
) -> list[Settled]:
    """``settle`` with each running experiment's arms already gathered (the simulator gathers
    them hour by hour instead of reading the log again)."""
    out = []
    for experiment in running:
        control, treatment = arms[experiment.id]
        try:
            out.append(_settle_one(engine, experiment, control, treatment, settings, now))
        except (EngineError, TargetError) as exc:
            # e.g. its target was removed from the configuration, or the file became unreadable:
            # the experiment stays as it is, and says why, until a person looks.
            out.append(Settled(experiment, "error", str(exc)))
    return out


def _settle_one(
    engine: Engine,
    experiment: Experiment,
    control: Arm,
    treatment: Arm,
    settings: VerdictSettings,
    now: float,
) -> Settled:
    if experiment.verify_at <= now:
        verdict = judge(
            experiment.param,
            control,
            treatment,
            experiment.extensions + 1,
            settings,
            sequential=experiment.mode == "sequential",
        )
        return _act(engine, experiment, verdict, now)
    harm = harm_check(control, treatment, settings, experiment.param)
    if not harm.stop:
        return Settled(experiment, "running", harm.reason)
    engine.end_experiment(
        experiment,
        "rollback",
        f"harm check stopped it: {harm.reason}",
        {"harm": [t.as_json() for t in harm.tests]},
        now,
    )
    _notify(engine, experiment, "harm_stop", "Stopped early (harm)", harm.reason)
    return Settled(experiment, "harm_stop", harm.reason)


def _act(engine: Engine, experiment: Experiment, verdict: Verdict, now: float) -> Settled:
    document = verdict.as_json()
    if verdict.decision == "extend":
        with engine.store.transaction() as db:
            db.execute(
                "UPDATE experiments SET extensions = extensions + 1, verify_at = ?, verdict = ?"
                " WHERE id = ?",
                (now + engine.verify_after, _dumps(document), experiment.id),
            )
        engine.store.record(
            experiment.cron,
            experiment.param,
            experiment.control,
            experiment.treatment,
            "extend",
            "tunerd",
            verdict.reason,
            document,
            now,
        )
        _notify(engine, experiment, "extend", "Experiment extended", verdict.reason)
    else:
        engine.end_experiment(experiment, verdict.decision, verdict.reason, document, now)
        title = "Committed" if verdict.decision == "commit" else "Rolled back"
        _notify(engine, experiment, verdict.decision, title, verdict.reason, verdict)
    return Settled(experiment, verdict.decision, verdict.reason)


def _notify(
    engine: Engine,
    e: Experiment,
    kind: str,
    title: str,
    reason: str,
    verdict: Verdict | None = None,
) -> None:
    lines = [reason]
    if verdict is not None:
        c, t = verdict.control.summary(), verdict.treatment.summary()
        lines.append(
            f"runs {c['runs']} / {t['runs']}; final failures {c['final_failure_rate']:.1%} /"
            f" {t['final_failure_rate']:.1%}; retries {c['retry_rate']:.1%} / {t['retry_rate']:.1%}"
        )
    engine.notifier.send(
        Notification(kind, f"{title}: {e.param} {e.control} → {e.treatment}", e.cron, lines)
    )


def _dumps(document: object) -> str:
    import json

    return json.dumps(document, ensure_ascii=False, sort_keys=True)
