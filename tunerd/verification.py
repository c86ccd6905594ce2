"""Settling experiments: gather each experiment's runs from the log, judge, act (the shell).

``settle`` is what the daemon's verification timers and hourly looks call, and what ``tunerd
cycle`` runs first: an experiment whose verification time has passed gets its verdict (commit,
rollback, or one more period); one still running is checked for harm and for a cron that went
silent. ``keep_in_step`` flips each switchback experiment's script to the value of its block.

Verdicts due at the same moment are decided together: their commits pass a false-discovery
control (Benjamini-Hochberg over the primary p-values of every experiment judged), and when many
crons "improve" at once, a shared cause is likelier than many real improvements: their commits
wait one more period.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from tunerd.engine import Engine, EngineError
from tunerd.logfile import LogFileError, read_batches, rotated
from tunerd.notify import Notification
from tunerd.reader import DEFAULT_MAX_LINE_BYTES, LogReader
from tunerd.records import Entry
from tunerd.store import Experiment, Store
from tunerd.switchback import CARRYOVER, Clustered, Units, arm_at, attributed, gather, run_start
from tunerd.targets import TargetError
from tunerd.targets.gateway import PREFIX as GATEWAY
from tunerd.targets.gateway import GatewayTarget, JobGone, NotTunable
from tunerd.timeparse import human_duration, iso
from tunerd.verdict import (
    Arm,
    Design,
    Independent,
    Verdict,
    VerdictSettings,
    arm_of,
    harm_check,
    judge,
)

SILENT_AFTER: Final = 6
"""Without a crontab, a cron is silent after this many of its usual gaps (and three days)."""
MANY_AT_ONCE: Final = 3
"""This many commits in one look, most of those judged: held one more period."""


@dataclass(frozen=True, slots=True)
class Settled:
    experiment: Experiment
    action: str
    """commit | rollback | extend | harm_stop | silent | running | error"""
    reason: str


@dataclass(slots=True)
class Gathered:
    """What the log holds of one experiment: its A/B arms, or (switchback) its runs with the
    time each started, and the cron's latest run."""

    control: Arm = field(default_factory=Arm)
    treatment: Arm = field(default_factory=Arm)
    runs: list[tuple[float, Entry]] = field(default_factory=list)
    last_run: float | None = None
    units: Units | None = None
    """Switchback runs already put in their units (the simulator's stretches)."""

    def merge(self, other: Gathered) -> None:
        self.control.merge(other.control)
        self.treatment.merge(other.treatment)
        self.runs += other.runs
        if other.last_run is not None:
            self.last_run = max(self.last_run or other.last_run, other.last_run)
        if other.units is not None:
            if self.units is None:
                self.units = Units(other.units.seed)
            self.units.merge(other.units)


def gather_runs(
    log_path: Path,
    experiments: list[Experiment],
    now: float,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    skip_to: int = 0,
    stop_at: int | None = None,
) -> dict[int, Gathered]:
    """Each experiment's runs since it started, in one pass over the log: the whole of it, or
    the lines from byte ``skip_to`` up to byte ``stop_at`` (both line starts)."""
    take = _Taker(experiments, now)
    if not take.by_cron:
        return take.found
    reader = LogReader(skip_to, max_line_bytes, now, columnar=True)
    try:
        for batch in read_batches(log_path, reader, skip_to, stop_at):
            take(batch.entries)
    except OSError as exc:
        raise LogFileError(f"cannot read the log {log_path}: {exc.strerror or exc}") from exc
    return take.found


def gather_native(state: Path, experiments: list[Experiment], now: float) -> dict[int, Gathered]:
    """Each native job's experiment's runs since it started, from the gateway's history
    (``OpenClawError`` when it cannot be read)."""
    from tunerd.inputs.openclaw import native_runs, read_history

    take = _Taker(experiments, now)
    take(native_runs(read_history(state, now, set(take.by_cron)), now))
    return take.found


class _Taker:
    """Hands each run to the experiments of its cron that it falls in (ended between their
    start and now): an A/B run to its arm, a switchback run with its start time."""

    def __init__(self, experiments: list[Experiment], now: float) -> None:
        self.found = {e.id: Gathered() for e in experiments}
        self.by_cron: dict[str, list[Experiment]] = {}
        for e in experiments:
            self.by_cron.setdefault(e.cron, []).append(e)
        self.now = now
        self.read_at = datetime.fromtimestamp(now, UTC)

    def __call__(self, entries: list[Entry]) -> None:
        for entry in entries:
            for e in self.by_cron.get(entry.cron or "", ()):
                ended = entry.when(self.read_at).timestamp()
                if not e.started_at <= ended <= self.now:
                    continue
                got = self.found[e.id]
                got.last_run = ended if got.last_run is None else max(got.last_run, ended)
                if e.mode == "ab":
                    arm = arm_of(entry, e.param, e.control, e.treatment, str(e.id))
                    if arm is not None:
                        (got.control if arm == "control" else got.treatment).add(entry)
                else:
                    got.runs.append((run_start(entry, ended), entry))


def design_of(engine: Engine, experiment: Experiment, got: Gathered) -> Design:
    """A/B: runs dealt one by one. Switchback: hour blocks, from the flips really applied."""
    if experiment.mode == "ab":
        return Independent(got.control, got.treatment)
    units = got.units
    if units is None:
        timeline = engine.store.timeline(experiment.id)
        runs, other = got.runs, 0
        if experiment.target.startswith(GATEWAY):  # each run by the job's settings it ran with
            runs, other = attributed(runs, timeline, CARRYOVER)
        units = gather(runs, timeline, experiment.control, experiment.treatment, experiment.seed)
        for _ in range(other):
            units.leave_out("other revision")
    return Clustered(units)


def settle(
    engine: Engine,
    log_path: Path,
    settings: VerdictSettings,
    now: float,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    log_missing_ok: bool = False,
) -> list[Settled]:
    """Judge what is due and look at the rest. The caller holds ``engine.exclusive()``.
    ``log_missing_ok``: a log that does not exist has no runs (a gateway's native jobs alone);
    otherwise it is an error, never experiments judged on no runs."""
    adopt_sequential(engine, now)
    keep_in_step(engine, now)
    running = engine.store.experiments("running")
    if not running:
        return []
    if log_missing_ok and not log_path.exists():
        found = {e.id: Gathered() for e in running}
    else:
        found = gather_runs(log_path, running, now, max_line_bytes)
    out: list[Settled] = []
    native = [e for e in running if e.target.startswith(GATEWAY)]
    if native:
        from tunerd.inputs.openclaw import OpenClawError

        try:
            if engine.targets.gateway is None:
                raise OpenClawError(
                    "OpenClaw's history is off ([openclaw] history = false): its experiments"
                    " wait, neither judged nor changed"
                )
            for key, got in gather_native(engine.targets.gateway.state, native, now).items():
                found[key].merge(got)
        except OpenClawError as exc:  # not judged on the runs it could not see
            running = [e for e in running if e not in native]
            out += [Settled(e, "error", str(exc)) for e in native]
    earliest = min((e.started_at for e in running), default=now)
    for older in rotated(log_path, earliest):  # what logrotate moved out during the experiments
        try:
            more = gather_runs(older, running, now, max_line_bytes)
        except LogFileError:
            continue
        for key, got in more.items():
            found[key].merge(got)
    return out + settle_found(engine, running, found, now, settings)


def adopt_sequential(engine: Engine, now: float) -> None:
    """An experiment a tunerd before switchback started on a script (one switch, compared
    before and after) takes turns from now on: drift around one switch decides too many
    verdicts. Its runs so far were all treatment and do not count."""
    for e in engine.store.experiments("running"):
        if e.mode == "sequential":
            with engine.store.transaction() as db:
                db.execute(
                    "UPDATE experiments SET mode = 'switchback', seed = ?, period = ?,"
                    " started_at = ?, verify_at = ? WHERE id = ?",
                    (
                        f"{e.id}:{now:.0f}",
                        engine.verify_after,
                        now,
                        now + engine.verify_after,
                        e.id,
                    ),
                )


def keep_in_step(engine: Engine, now: float) -> list[int]:
    """Flip each switchback experiment whose script holds another value than the block now
    calls for; returns the experiments flipped. Run at every block boundary, and at every look
    (after the daemon was down, its flips are late: the runs of those hours are left out)."""
    flipped = []
    for e in engine.store.experiments("running"):
        if e.mode != "switchback" or e.seed is None or stopped_if_edited(engine, e, now):
            continue
        timeline = engine.store.timeline(e.id)
        held = timeline[-1][1] if timeline else e.control
        want = e.treatment if arm_at(e.seed, now) == "treatment" else e.control
        if held != want:
            try:
                engine.flip(e, want, now)
            except (EngineError, TargetError) as exc:
                # said at the next look as well: the experiment's runs keep being checked
                engine.notifier.send(
                    Notification("advisory", "Switchback flip failed", e.cron, [str(exc)])
                )
                continue
            flipped.append(e.id)
    return flipped


def stopped_if_edited(engine: Engine, experiment: Experiment, now: float) -> bool:
    """A switchback script someone edited by hand during the experiment: the experiment stops
    (nothing written: the person's value stays), notified. Whatever it held then is not what
    tunerd flipped, so its runs say nothing of either arm."""
    if experiment.mode != "switchback":
        return False
    timeline = engine.store.timeline(experiment.id)
    held = timeline[-1][1] if timeline else experiment.control
    where, gone = "the script", False
    try:
        target = engine.targets.by_name(experiment.target)
        if isinstance(target, GatewayTarget):
            # the job's own value, none (a timeout turned off) included
            where = f"OpenClaw job {target.job_id}"
            found = target.held_ms()
            if found == held:
                return False
        else:
            found = engine.current_params(experiment.cron).get(experiment.param)
            if found is None or found == held:
                return False  # a script whose line tunerd cannot read: said elsewhere
    except JobGone as exc:
        found, gone = None, True
        reason = f"{exc} (deleted): the experiment stops, with nothing to write"
    except NotTunable as exc:
        found = None
        reason = f"{exc}, not the {held} tunerd wrote: edited by hand, so the experiment stops"
    except TargetError:
        return False  # cannot tell now (the gateway's state cannot be read): said by settle
    else:
        shown = "none" if found is None else found
        reason = (
            f"{experiment.param} in {where} is {shown}, not the {held} tunerd wrote: edited by"
            f" hand, so the experiment stops and {where} stays as it is"
        )
    with engine.store.transaction() as db:
        db.execute(
            "UPDATE experiments SET state = 'aborted', ended_at = ?, verdict = ? WHERE id = ?",
            (now, _dumps({"decision": "abort", "reason": reason}), experiment.id),
        )
    engine.store.record(
        experiment.cron, experiment.param, held, found, "abort", "tunerd", reason, None, now
    )
    title = "job deleted" if gone else f"{where} edited"
    _notify(engine, experiment, "rollback", f"Experiment stopped ({title})", reason)
    return True


def next_flip_at(store: Store, now: float) -> float | None:
    """When a running switchback experiment's script must next take another value: now, if one
    is out of step (the daemon was down at a boundary), else the next block that changes arm."""
    from tunerd.switchback import next_flip

    times = []
    for e in store.experiments("running"):
        if e.mode != "switchback" or e.seed is None:
            continue
        timeline = store.timeline(e.id)
        held = timeline[-1][1] if timeline else e.control
        arm = arm_at(e.seed, now)
        if held != (e.treatment if arm == "treatment" else e.control):
            return now
        times.append(next_flip(e.seed, now, arm)[0])
    return min(times, default=None)


def settle_found(
    engine: Engine,
    running: list[Experiment],
    found: dict[int, Gathered],
    now: float,
    settings: VerdictSettings,
) -> list[Settled]:
    """``settle`` with each running experiment's runs already gathered (the simulator gathers
    them stretch by stretch instead of reading the log again)."""
    out: list[Settled] = []
    due: list[tuple[Experiment, Verdict]] = []
    for experiment in running:
        got = found[experiment.id]
        try:
            if stopped_if_edited(engine, experiment, now):
                out.append(Settled(experiment, "error", "its target was changed by someone else"))
                continue
            design = design_of(engine, experiment, got)
            if experiment.verify_at <= now:
                verdict = judge(
                    experiment.param, design, experiment.extensions + 1, settings, experiment.mode
                )
                due.append((experiment, verdict))
                continue
            out.append(_look(engine, experiment, design, got, settings, now))
        except (EngineError, TargetError) as exc:
            # e.g. its target was removed from the configuration, or the file became unreadable:
            # the experiment stays as it is, and says why, until a person looks.
            out.append(Settled(experiment, "error", str(exc)))
    for experiment, verdict in _together(due, settings):
        try:
            out.append(_act(engine, experiment, verdict, now))
        except (EngineError, TargetError) as exc:
            out.append(Settled(experiment, "error", str(exc)))
    return out


def _together(
    due: list[tuple[Experiment, Verdict]], settings: VerdictSettings
) -> list[tuple[Experiment, Verdict]]:
    """Verdicts reached at one moment, decided together. Benjamini-Hochberg over the primary
    p-values of all of them: a commit stands only if its p-value is within its rank's share of
    its look's alpha. Then, if ``MANY_AT_ONCE`` or more commit and they are most of those judged,
    they wait one more period: many crons improving at once is likelier a change of the world."""
    tested = [(e, v) for e, v in due if v.tests and v.tests[0].p_value is not None]
    m = len(tested)
    ranked = sorted(tested, key=lambda ev: ev[1].tests[0].p_value or 1.0)
    keep = 0
    for rank, (_, v) in enumerate(ranked, 1):
        if (v.tests[0].p_value or 1.0) <= rank / m * v.alpha:
            keep = rank
    passing = {e.id for e, _ in ranked[:keep]}
    out = []
    for e, v in due:
        if v.decision == "commit" and e.id not in passing:
            v = _hold(
                v,
                f"{v.reason}; held by the false-discovery control over the {m} experiments"
                " judged together",
                settings,
            )
        out.append((e, v))
    commits = [v for _, v in out if v.decision == "commit"]
    if len(commits) >= MANY_AT_ONCE and len(commits) * 2 > len(out):
        out = [
            (
                e,
                _hold(
                    v,
                    f"{v.reason}; {len(commits)} of {len(out)} experiments improved at once:"
                    " a change of the world is likelier, so every commit waits one more period",
                    settings,
                )
                if v.decision == "commit"
                else v,
            )
            for e, v in out
        ]
    return out


def _hold(verdict: Verdict, reason: str, settings: VerdictSettings) -> Verdict:
    """A commit that waits: one more period, or a rollback when none is left."""
    if verdict.look >= 1 + settings.max_extensions:
        return replace(verdict, decision="rollback", reason=f"{reason}; no extension left")
    return replace(verdict, decision="extend", reason=reason)


def _look(
    engine: Engine,
    experiment: Experiment,
    design: Design,
    got: Gathered,
    settings: VerdictSettings,
    now: float,
) -> Settled:
    """The hourly look at an experiment not yet due: a cron gone silent, or clear harm."""
    silent = _silent(experiment, got, now, engine.store.start_evidence(experiment.id))
    if silent:
        reason = f"the cron went silent: {silent}; rolled back rather than left running blind"
        engine.end_experiment(experiment, "rollback", reason, {"silent": silent}, now)
        _notify(engine, experiment, "rollback", "Rolled back (no runs)", reason)
        return Settled(experiment, "silent", reason)
    harm = harm_check(design, settings, experiment.param)
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


def _silent(experiment: Experiment, got: Gathered, now: float, evidence: dict[str, Any]) -> str:
    """Why the cron looks silent ('' when it does not). With the crontab its runs logged (the
    wrapper's ``context.schedule``): three of its times passed without a run, and two hours. A
    market-hours cron is quiet every night by design; its schedule says so. Without one: no run
    for six of its usual gaps and three days (a weekend pause is not silence either)."""
    last = got.last_run if got.last_run is not None else experiment.started_at
    quiet = now - last
    if quiet < 7200:
        return ""
    since = "it started" if got.last_run is None else f"its last run at {iso(last)}"
    missed = _missed(evidence.get("schedule"), last, now)
    if missed is not None:
        if missed < 3:
            return ""
        return (
            f"no run for {human_duration(quiet)} since {since}: {missed} of its scheduled times"
            f" ({evidence['schedule']}) went by"
        )
    per_hour = evidence.get("runs_per_hour") or 0
    if per_hour <= 0 or quiet < max(3600.0 * SILENT_AFTER / per_hour, 3 * 86400.0):
        return ""
    return (
        f"no run for {human_duration(quiet)} since {since}, where it ran about"
        f" {per_hour:.2g} times an hour"
    )


def _missed(schedule: Any, last: float, now: float) -> int | None:
    """How many of the crontab's times (machine time) fell after ``last`` and before ``now``,
    counting up to four; None without a usable crontab."""
    if not isinstance(schedule, str):
        return None
    from tzlocal import get_localzone

    from tunerd.schedule import cron_trigger

    try:
        trigger = cron_trigger(schedule, get_localzone())
    except ValueError:
        return None
    missed, at = 0, datetime.fromtimestamp(last + 60, UTC)  # the run it made at `last` aside
    while missed < 4:
        fire = trigger.get_next_fire_time(None, at)
        if fire is None or fire.timestamp() >= now:
            break
        missed += 1
        at = fire + timedelta(seconds=1)
    return missed


def _act(engine: Engine, experiment: Experiment, verdict: Verdict, now: float) -> Settled:
    document = verdict.as_json()
    if verdict.decision == "extend":
        period = experiment.period or engine.verify_after
        with engine.store.transaction() as db:
            db.execute(
                "UPDATE experiments SET extensions = extensions + 1, verify_at = ?, verdict = ?"
                " WHERE id = ?",
                (now + period, _dumps(document), experiment.id),
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
