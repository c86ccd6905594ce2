"""One tuning cycle: analyse the window, decide, apply, queue, record, notify (the shell).

The daemon runs it weekly and ``tunerd cycle`` runs it now; both call ``run_cycle`` with the same
engine, so what the CLI does is what the daemon would do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from tunerd.analysis import Analysis, ParamsLookup, analyze
from tunerd.engine import TELL_EACH, Engine, EngineError, Start, check_state
from tunerd.logfile import ReadOptions, read_window
from tunerd.notify import Notification, Notifier
from tunerd.policy import Action, PolicySettings, SafetyError, StateView, decide
from tunerd.rules import Advisory
from tunerd.store import Store
from tunerd.targets import InForceReader, TargetError
from tunerd.verdict import Plan, plan
from tunerd.verification import Settled, settle

if TYPE_CHECKING:
    from tunerd.config import Settings
    from tunerd.stats import LogStats


DAY = 86400.0
"""Statistics buckets of a cycle: after a parameter change, a cron's analysis starts with the
first whole day under the new value."""


def build_engine(settings: Settings, notifier: Notifier, store: Store | None = None) -> Engine:
    """The engine of the configuration; ``StoreError`` when its state cannot be trusted
    (``engine.check_state``)."""
    engine = Engine(
        store or Store(settings.state_dir),
        settings.targets(),
        notifier,
        verify_after=settings.verify_after.total_seconds(),
        split=settings.split,
        cooldown=settings.cooldown.total_seconds(),
    )
    check_state(engine.store, engine.targets, engine.lock_path)
    return engine


@dataclass(slots=True)
class Outcome:
    action: Action
    result: str
    """started | queued | refused | held | dry_run | not_applied | error"""
    detail: str
    id: int | None = None


@dataclass(slots=True)
class CycleReport:
    at: float
    analysis: Analysis
    recovered: list[str] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    settled: list[Settled] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "recovered": self.recovered,
            "experiments": [
                {
                    "id": s.experiment.id,
                    "cron": s.experiment.cron,
                    "param": s.experiment.param,
                    "control": s.experiment.control,
                    "treatment": s.experiment.treatment,
                    "result": s.action,
                    "reason": s.reason,
                }
                for s in self.settled
            ],
            "runs_analysed": self.analysis.totals.cron_entries,
            "actions": [
                {
                    "kind": o.action.kind,
                    "result": o.result,
                    "id": o.id,
                    "cron": o.action.cron,
                    "param": o.action.param,
                    "current": o.action.current,
                    "proposed": o.action.proposed,
                    "reason": o.action.reason,
                    "detail": o.detail,
                }
                for o in self.outcomes
            ],
            "advisories": [
                {"type": a.type, "subject": a.subject, "count": a.count, "message": a.message}
                for a in self.analysis.advisories
            ],
        }


def state_view(store: Store, now: float) -> StateView:
    return StateView(
        running=frozenset(e.cron for e in store.experiments("starting", "running")),
        cooling=frozenset(store.cooldowns(now)),
        pending=frozenset((r.cron, r.param, r.proposed) for r in store.reviews("pending")),
    )


def run_cycle(settings: Settings, engine: Engine, now: float) -> CycleReport:
    """Holds the engine's lock throughout: decisions are made on the state they change."""
    from tunerd.stats import LogStats

    native_only = natives_only(settings)
    with engine.exclusive():
        recovered = engine.recover(now)
        settled = settle(
            engine,
            settings.log_path,
            settings.verdict_settings(),
            now,
            settings.max_line_bytes,
            log_missing_ok=native_only,
        )
        since = now - settings.window.total_seconds()
        options = ReadOptions(
            since=since,
            read_at=now,
            max_line_bytes=settings.max_line_bytes,
            max_crons=settings.max_crons,
            bucket_seconds=DAY,
        )
        if native_only:
            stats = LogStats(since, DAY, settings.max_crons)
        else:
            stats = read_window(settings.log_path, options)
        reader = InForceReader(engine.targets)
        in_force, warnings = _native(settings, stats, reader, now)
        if native_only:  # normal for a gateway's user: said here, not sent as a fault
            import logging

            logging.getLogger("tunerd").info(
                "the log %s does not exist: OpenClaw's native jobs only", settings.log_path
            )
        analysis = analyze(stats, in_force, since=since, changed_at=engine.store.last_changes())
        analysis.advisories[:0] = [
            *(
                Advisory("unreadable_target", str(path), 0, problem)
                for path, problem in reader.problems()
            ),
            *warnings,
        ]
        policy = PolicySettings(min_runs=settings.min_runs, cooldown_seconds=engine.cooldown)
        report = CycleReport(now, analysis, recovered, settled=settled)
        _supersede_unwritable(engine, in_force, now)
        actions = decide(analysis, state_view(engine.store, now), policy)
        report.outcomes = _carry_out(actions, settings, engine, now)
        tell_advisories(engine.notifier, analysis.advisories)
    return report


def natives_only(settings: Settings) -> bool:
    """OpenClaw's native jobs alone: the gateway's history is there and the wrapper's log is
    not (yet), which is no reason to leave them untuned."""
    from tunerd.inputs.openclaw import configured_state, there

    return configured_state(settings.openclaw) is not None and not there(settings.log_path)


def tell_advisories(notifier: Notifier, advisories: list[Advisory]) -> None:
    """One notification per advisory; past ``TELL_EACH`` of one kind, one for the kind that
    names a few of its crons (`tunerd analyze` lists them all)."""
    by_type: dict[str, list[Advisory]] = {}
    for advisory in advisories:
        by_type.setdefault(advisory.type, []).append(advisory)
    for kind, found in by_type.items():
        title = kind.replace("_", " ")
        if len(found) <= TELL_EACH:
            for advisory in found:
                notifier.send(Notification("advisory", title, None, [advisory.message]))
            continue
        names = ", ".join(a.subject for a in found[:5])
        notifier.send(
            Notification(
                "advisory",
                f"{title}: {len(found)} crons",
                None,
                [
                    f"{names} and {len(found) - 5} more; the first says:",
                    found[0].message,
                    "`tunerd analyze` lists every one",
                ],
            )
        )


def _execute(action: Action, settings: Settings, engine: Engine, now: float) -> Outcome:
    store, notifier = engine.store, engine.notifier
    if action.kind == "hold":
        return Outcome(action, "held", action.why)
    if action.kind == "refuse":
        change = store.record(
            action.cron,
            action.param,
            action.current,
            action.proposed,
            "refused",
            "tunerd",
            f"{action.reason}; refused: {action.why}",
            action.evidence,
            now,
        )
        with store.transaction() as db:
            store.add_cooldown(
                action.cron, action.param, action.proposed, now + engine.cooldown, "refused", db
            )
        notifier.send(
            Notification(
                "refused",
                f"Refused: {action.param} {action.current} → {action.proposed}",
                action.cron,
                [action.reason, action.why],
            )
        )
        return Outcome(action, "refused", action.why, change)
    if action.kind == "start" and settings.dry_run:
        change = store.record(
            action.cron,
            action.param,
            action.current,
            action.proposed,
            "dry_run",
            "tunerd",
            f"{action.reason} (dry run: nothing written)",
            action.evidence,
            now,
        )
        return Outcome(action, "dry_run", "dry_run is set: nothing written", change)
    return _queue(action, engine, now, action.why)


def _carry_out(
    actions: list[Action], settings: Settings, engine: Engine, now: float
) -> list[Outcome]:
    """Each action's outcome, in order. The experiments are started together, each target
    written once for all of them; a cron whose start could not be written starts its next
    candidate (a held fallback) in another round."""
    outcomes: list[Outcome | None] = [None] * len(actions)
    fallbacks: dict[str, list[int]] = {}
    starts: list[int] = []
    for i, action in enumerate(actions):
        if action.fallback:
            fallbacks.setdefault(action.cron, []).append(i)
            outcomes[i] = Outcome(action, "held", action.why)
        elif action.kind == "start" and not settings.dry_run:
            starts.append(i)
        else:
            outcomes[i] = _execute(action, settings, engine, now)
    while starts:
        failed = _start_all(actions, starts, outcomes, settings, engine, now)
        starts = []
        for cron in failed:
            if fallbacks.get(cron):
                i = fallbacks[cron].pop(0)
                actions[i] = replace(actions[i], kind="start", fallback=False)
                starts.append(i)
    return [o for o in outcomes if o is not None]


def _start_all(
    actions: list[Action],
    indexes: list[int],
    outcomes: list[Outcome | None],
    settings: Settings,
    engine: Engine,
    now: float,
) -> list[str]:
    """Start the experiments of ``actions[i]`` for each of ``indexes`` (their outcomes filled
    in); returns the crons whose start could not be written."""
    starts, planned_at = [], []
    for i in indexes:
        action = actions[i]
        power, words = planned(engine, settings, action.cron, action.param, action.evidence)
        if not power.verifiable:
            # A coin toss is not an experiment: a person decides whether to try it anyway.
            outcomes[i] = _queue(
                action, engine, now, f"it cannot be verified in time: {power.note}"
            )
            continue
        reason = f"{action.reason}{words}"
        if action.evidence.get("params_assumed") and _mode(engine, action.cron) == "ab":
            reason += (
                "; its runs record no params: unless its Level 1 reads the params file, the"
                " treatment arm gets no runs (map the cron to its script under [[scripts]], or"
                " run it through tunerd exec)"
            )
        starts.append(
            Start(
                action.cron,
                action.param,
                action.current,
                action.proposed,
                reason,
                action.evidence,
                "tunerd",
                action.rate_limited,
                power.period,
            )
        )
        planned_at.append(i)
    failed = []
    for i, result in zip(planned_at, engine.start_experiments(starts, now), strict=True):
        action = actions[i]
        if isinstance(result, TargetError):
            # The file changed since it was read (a pattern that no longer matches once, a file
            # gone): approving would fail the same way, so nobody is asked; the cron's next
            # candidate is tried, and the next cycle looks again.
            engine.notifier.send(
                Notification(
                    "advisory",
                    f"Not applied: {action.param} {action.current} → {action.proposed}",
                    action.cron,
                    [action.reason, str(result)],
                )
            )
            outcomes[i] = Outcome(action, "not_applied", str(result))
            failed.append(action.cron)
        elif isinstance(result, EngineError | SafetyError):
            outcomes[i] = Outcome(action, "error", str(result))
        else:
            undo = engine.store.start_of(result.id)
            outcomes[i] = Outcome(
                action,
                "started",
                f"experiment {result.id} (to undo it: tunerd rollback {undo})",
                result.id,
            )
    return failed


def _mode(engine: Engine, cron: str) -> str:
    """The experiments the cron's target takes; a native job the gateway's state does not show
    (its start fails and says why) takes turns, as every native job does."""
    try:
        return engine.targets.for_cron(cron).mode
    except TargetError:
        return "switchback"


def planned(
    engine: Engine, settings: Settings, cron: str, param: str, evidence: dict[str, Any]
) -> tuple[Plan, str]:
    """How long an experiment on ``cron`` needs (power before starting), and the words that say
    so, for an automatic change and an approved one alike. A switchback experiment gives each
    arm half the hours."""
    mode = _mode(engine, cron)
    power = plan(
        evidence.get("baseline", {}).get(param, 0.0),
        evidence.get("runs_per_hour") or 0.0,
        engine.verify_after,
        engine.split if mode == "ab" else 0.5,
        settings.verdict_settings(),
    )
    words = ""
    if power.detectable is not None:
        words += (
            f"; about {power.runs_per_arm} runs per arm expected, enough to detect a drop of"
            f" {power.detectable:.1%} or more"
        )
    if power.note:
        words += f"; {power.note}"
    return power, words


def _native(
    settings: Settings, stats: LogStats, in_force: ParamsLookup, now: float
) -> tuple[ParamsLookup, list[Advisory]]:
    """The gateway's native jobs in the cycle's analysis, when its history is configured and
    there (their timeouts are changed through ``[openclaw] cli`` when it is there, else
    advised). A history that cannot be read is an advisory, never a failed cycle."""
    from tunerd.inputs.openclaw import (
        OpenClawError,
        configured_state,
        count_native,
        kept_digest,
        read_native,
        skipped_text,
    )

    state = configured_state(settings.openclaw)
    if state is None:
        return in_force, []

    try:
        native = read_native(state, now, kept_digest(settings.state_dir, state))
    except OpenClawError as exc:
        return in_force, [Advisory("unreadable_target", str(state), 0, str(exc))]
    if native.unkept:
        logging.getLogger("tunerd").warning("%s", native.unkept)
    lookup, warnings = count_native(stats, native, in_force, settings.openclaw.can_edit)
    if native.skipped:
        warnings.append(
            Advisory("unreadable_target", str(state), native.skipped, skipped_text(native.skipped))
        )
    return lookup, warnings


def _supersede_unwritable(engine: Engine, in_force: ParamsLookup, now: float) -> None:
    """Pending reviews of a change the cron's target cannot be written for (queued before its
    script was known to lack the line) are withdrawn: approving them could only fail."""
    for review in engine.store.reviews("pending"):
        if in_force(review.cron, None).unwritable(review.param) is not None:
            engine.store.decide_review(review.id, "superseded", "tunerd", now)


def _queue(action: Action, engine: Engine, now: float, why: str) -> Outcome:
    review = engine.store.queue_review(
        action.cron,
        action.param,
        action.current,
        action.proposed,
        action.reason,
        why,
        action.evidence,
        now,
    )
    if review is None:
        return Outcome(action, "held", "the same change already waits for a human")
    engine.notifier.send(
        Notification(
            "review_requested",
            f"Approval needed (review {review}): {action.param} {action.current} →"
            f" {action.proposed}",
            action.cron,
            [
                action.reason,
                f"why a human: {why}",
                f"tunerd approve {review} / tunerd reject {review}",
            ],
        )
    )
    return Outcome(action, "queued", why, review)
