"""Applying changes to targets, crash-safely, with the history to show for it (the shell).

Every change follows one protocol: render the new file in memory; commit the intent (history row
``applying``, rollback point with the part of the old file the change touched and the whole old
file's hash, the new bytes' hash, the experiment row) in one transaction; write the file
atomically; commit the outcome. The experiments a cycle starts in one target are one write.
``recover`` settles an intent that a crash interrupted by looking at what the file holds: the
new bytes mean applied, the old mean not applied, anything else means someone else changed the
file (a conflict, reported).

All writers take one exclusive lock (``state_dir/apply.lock``), so a cycle, an approval and a
manual rollback never interleave, whether they run in the daemon or the CLI.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

from tunerd.faults import crash_point
from tunerd.notify import Notification, Notifier
from tunerd.params import InForce
from tunerd.policy import SafetyError, check_approved, check_automatic
from tunerd.store import Change, Experiment, Store, StoreError
from tunerd.switchback import arm_at
from tunerd.targets import (
    Edit,
    InForceReader,
    ParamsFileTarget,
    Target,
    TargetError,
    Targets,
    read_target,
    sha256,
)
from tunerd.timeparse import iso as _iso


class EngineError(Exception):
    """An operation cannot be done as asked; the message says why. Nothing was changed."""


TELL_EACH: Final = 10
"""More experiments than this started at once are told in one notification."""


@dataclass(frozen=True, slots=True)
class Start:
    """An experiment to start: the change, why, and who decided it."""

    cron: str
    param: str
    control: int
    treatment: int
    reason: str
    evidence: dict[str, Any]
    actor: str
    rate_limited: bool = False
    verify_after: float | None = None


class Item(NamedTuple):
    """One change of a write: its history row, its experiment row (a start), its edit."""

    change: dict[str, Any]
    experiment: dict[str, Any] | None
    edit: Edit


def check_state(store: Store, targets: Targets, lock_path: Path | None = None) -> None:
    """Refuse a state store that does not match the experiment blocks of the params file
    (``StoreError``): a block of an experiment the store does not know (the database was
    deleted, truncated, or restored from a backup older than the file) or of one that ended
    (the file restored from a backup older than the database). Level 1 follows such a block
    and nothing would ever verify or end it. A mismatch is looked at again under the writers'
    lock (``lock_path``) before it is refused: a writer between its two steps is not one."""
    found = _mismatched(store, targets)
    if found and lock_path is not None:
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            try:
                found = _mismatched(store, targets)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    if not found:
        return
    target = targets.params_file
    unknown, ended, total = found
    from tunerd.report import safe_text

    names = ", ".join(repr(safe_text(str(cron))[:40]) for cron in [*unknown, *ended][:3])
    count = len(unknown) + len(ended)
    more = f" and {count - 3} more" if count > 3 else ""
    what = []
    if unknown:
        what.append(f"{len(unknown)} of experiments the state store {store.path} does not know")
    if ended:
        what.append(f"{len(ended)} of experiments that ended")
    raise StoreError(
        f"the params file {target.path} holds {total} experiment blocks, {' and '.join(what)}"
        f" ({names}{more}); Level 1 still follows them: restore the newer of"
        f" {store.path.name} and the params file from a backup, or delete those entries of"
        ' "experiments" in the params file (those crons then run with their own values).'
        " tunerd changes nothing until then."
    )


def _mismatched(store: Store, targets: Targets) -> tuple[list[str], list[str], int] | None:
    """(crons whose block's experiment the store does not know, crons whose block's
    experiment ended, blocks in all), or None when the file and the store agree."""
    target = targets.params_file
    try:
        blocks = target.load(read_target(target.path))["experiments"]
    except TargetError:
        return None  # said by every command that reads it
    if not isinstance(blocks, dict) or not blocks:
        return None
    states = {str(row[0]): row[1] for row in store.db.execute("SELECT id, state FROM experiments")}
    unknown, ended = [], []
    for cron, block in blocks.items():
        state = states.get(str(block.get("id"))) if isinstance(block, dict) else None
        if state is None:
            unknown.append(cron)
        elif state not in ("starting", "running"):
            ended.append(cron)
    return (unknown, ended, len(blocks)) if unknown or ended else None


class Engine:
    def __init__(
        self,
        store: Store,
        targets: Targets,
        notifier: Notifier,
        verify_after: float,
        split: float = 0.5,
        cooldown: float = 14 * 86400,
        lock_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.targets = targets
        self.notifier = notifier
        self.verify_after = verify_after
        self.split = split
        self.cooldown = cooldown
        self.lock_path = (lock_dir or store.path.parent) / "apply.lock"

    @contextlib.contextmanager
    def exclusive(self, wait: bool = True) -> Iterator[bool]:
        """The one writer at a time, across processes. ``wait=False``: yields False at once
        when a writer is at work (a reading command does not wait for a cycle or a flip)."""
        with open(self.lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def current_params(self, cron: str) -> InForce:
        """What the cron runs with now, read afresh (see ``InForceReader`` for many crons)."""
        return InForceReader(self.targets)(cron)

    # --- the write protocol ----------------------------------------------------------------

    def _apply(self, target: Target, items: list[Item], now: float) -> list[tuple[int, int | None]]:
        """Write changes to one target in one atomic write (a cycle starting experiments on
        5,000 crons of the params file writes it once); returns (change id, experiment id) of
        each. TargetError: nothing written."""
        old = target.read()
        new, excerpts = target.apply(old, [item.edit for item in items])
        before, after = sha256(old), sha256(new)
        ids: list[tuple[int, int | None]] = []
        with self.store.transaction() as db:
            for item, excerpt in zip(items, excerpts, strict=True):
                experiment_id = item.change.get("experiment")
                if item.experiment is not None:
                    experiment_id = _insert(db, "experiments", item.experiment)
                point = _insert(
                    db,
                    "rollback_points",
                    {
                        "target": target.name,
                        "content": None if old is None else excerpt,  # NULL: no file yet
                        "sha256": before,
                        "created_at": now,
                    },
                )
                change_id = _insert(
                    db,
                    "changes",
                    {
                        **item.change,
                        "state": "applying",
                        "target": target.name,
                        "rollback_point": point,
                        "new_sha256": after,
                        "experiment": experiment_id,
                        "created_at": now,
                    },
                )
                ids.append((change_id, experiment_id))
        crash_point("after_rollback_point")
        try:
            target.write(new)
        except (OSError, TargetError) as exc:
            with self.store.transaction() as db:
                for change_id, _ in ids:
                    self._settle(db, change_id, "aborted", now)
            raise TargetError(f"could not write {target.name}: {exc}") from exc
        crash_point("before_history")
        with self.store.transaction() as db:
            for change_id, _ in ids:
                self._settle(db, change_id, "applied", now)
        return ids

    def _settle(self, db: sqlite3.Connection, change_id: int, outcome: str, now: float) -> None:
        """Record a change's outcome and what it means for its experiment (one transaction)."""
        row = db.execute("SELECT * FROM changes WHERE id = ?", (change_id,)).fetchone()
        db.execute(
            "UPDATE changes SET state = ?, settled_at = ? WHERE id = ?", (outcome, now, change_id)
        )
        experiment, action = row["experiment"], row["action"]
        if experiment is None:
            return
        applied = outcome == "applied"
        ended = {"commit": "committed", "rollback": "rolled_back", "manual_rollback": "aborted"}
        if action == "experiment_start":
            state = "running" if applied else "aborted"
            db.execute(
                "UPDATE experiments SET state = ?, ended_at = CASE WHEN ? = 'aborted' THEN ?"
                " ELSE ended_at END WHERE id = ?",
                (state, state, now, experiment),
            )
        elif applied and action in ended:
            db.execute(
                "UPDATE experiments SET state = ?, ended_at = ? WHERE id = ?"
                " AND state IN ('starting', 'running')",
                (ended[action], now, experiment),
            )
        if applied and action in ("rollback", "manual_rollback"):
            exp = db.execute("SELECT * FROM experiments WHERE id = ?", (experiment,)).fetchone()
            self.store.add_cooldown(
                exp["cron"],
                exp["param"],
                exp["treatment"],
                now + self.cooldown,
                f"{action} of change {change_id}",
                db,
            )

    def recover(self, now: float) -> list[str]:
        """Settle what a crash interrupted; returns what was found, for the log."""
        found = []
        for change in self.store.changes():
            if change.state != "applying":
                continue
            point = self.store.rollback_point(change.rollback_point or -1)
            try:
                target = self.targets.by_name(change.target or "")
                current = sha256(target.read())
                target.tidy()
            except (EngineError, TargetError) as exc:
                current, target = f"unreadable: {exc}", None
            if current == change.new_sha256:
                outcome = "applied"
            elif point is not None and current == point.sha256:
                outcome = "aborted"
            else:
                outcome = "conflict"
            with self.store.transaction() as db:
                self._settle(db, change.id, outcome, now)
            found.append(
                f"change {change.id} ({change.action} {change.param} of {change.cron!r}) was"
                f" interrupted: {outcome}"
                + (" (the file was changed by someone else)" if outcome == "conflict" else "")
            )
        return found

    # --- experiments -----------------------------------------------------------------------

    def start_experiment(
        self,
        cron: str,
        param: str,
        control: int,
        treatment: int,
        reason: str,
        evidence: dict[str, Any],
        actor: str,
        now: float,
        rate_limited: bool = False,
        verify_after: float | None = None,
    ) -> Experiment:
        """Start one experiment (``start_experiments``); its error is raised."""
        start = Start(
            cron, param, control, treatment, reason, evidence, actor, rate_limited, verify_after
        )
        (result,) = self.start_experiments([start], now)
        if isinstance(result, Exception):
            raise result
        return result

    def start_experiments(
        self, starts: list[Start], now: float
    ) -> list[Experiment | TargetError | EngineError | SafetyError]:
        """Start experiments, each target written once for all of its crons; each start's
        experiment, or why it did not start (the others start anyway). The safety checks run
        for each before anything is written."""
        results: dict[int, Experiment | TargetError | EngineError | SafetyError] = {}
        groups: dict[str, list[int]] = {}
        taken: set[str] = set()
        for i, start in enumerate(starts):
            try:
                if start.actor == "tunerd":
                    check_automatic(start.param, start.control, start.treatment, start.rate_limited)
                else:
                    check_approved(start.param, start.treatment)
                if start.cron in taken or self.store.running_experiment(start.cron) is not None:
                    raise EngineError(f"{start.cron!r} already has an experiment under way")
                target_name = self.targets.for_cron(start.cron).name
            except (EngineError, SafetyError, TargetError) as exc:
                results[i] = exc
                continue
            taken.add(start.cron)
            groups.setdefault(target_name, []).append(i)
        next_id = self._next_experiment_id()
        for name, indexes in groups.items():
            target = self.targets.by_name(name)
            items = []
            for i in indexes:
                items.append(self._start_item(starts[i], target, next_id, now))
                next_id += 1
            try:
                ids = self._apply(target, items, now)
            except TargetError as exc:
                results.update(dict.fromkeys(indexes, exc))
                continue
            told = []
            for i, (change_id, experiment_id) in zip(indexes, ids, strict=True):
                started = self.store.experiment(experiment_id or -1)
                assert started is not None and started.state == "running"
                results[i] = started
                told.append((starts[i], started, change_id))
            self._tell_started(told)
        return [results[i] for i in range(len(starts))]

    def _start_item(self, start: Start, target: Target, experiment_id: int, now: float) -> Item:
        period = start.verify_after or self.verify_after
        seed, written = None, start.treatment
        edit = Edit(
            "start",
            start.cron,
            start.param,
            block={
                "id": str(experiment_id),
                "param": start.param,
                "control": start.control,
                "treatment": start.treatment,
                "split": self.split,
                "started": _iso(now),
            },
        )
        if target.mode == "switchback":
            # tunerd takes turns itself: the script starts on the value of the current block
            seed = f"{experiment_id}:{now:.0f}"
            written = start.treatment if arm_at(seed, now) == "treatment" else start.control
            edit = Edit("set", start.cron, start.param, written)
        change = {
            "cron": start.cron,
            "param": start.param,
            "old_value": start.control,
            "new_value": written,
            "action": "experiment_start",
            "actor": start.actor,
            "reason": start.reason,
            "evidence": json.dumps(start.evidence, ensure_ascii=False, sort_keys=True),
        }
        experiment = {
            "id": experiment_id,
            "cron": start.cron,
            "param": start.param,
            "control": start.control,
            "treatment": start.treatment,
            "mode": target.mode,
            "split": self.split if target.mode == "ab" else 0.5,
            "target": target.name,
            "state": "starting",
            "reason": start.reason,
            "started_at": now,
            "verify_at": now + period,
            "seed": seed,
            "period": period,
        }
        return Item(change, experiment, edit)

    def _tell_started(self, started: list[tuple[Start, Experiment, int]]) -> None:
        """One notification per experiment; past ``TELL_EACH`` in one go, one that sums them
        up (5,000 messages would keep a webhook busy for hours)."""
        if len(started) > TELL_EACH:
            changes = Counter(
                f"{s.param} {s.control} → {s.treatment}" for s, _, _ in started
            ).most_common(5)
            self.notifier.send(
                Notification(
                    "experiment_started",
                    f"{len(started)} experiments started",
                    None,
                    [
                        ", ".join(f"{what} on {n} crons" for what, n in changes),
                        "each an increase inside the safe range; `tunerd status` lists them, and"
                        " `tunerd history` the change that undoes each",
                    ],
                )
            )
            return
        for start, experiment, change_id in started:
            self.notifier.send(
                Notification(
                    "experiment_started",
                    f"Experiment started: {start.param} {start.control} → {start.treatment}",
                    start.cron,
                    [
                        start.reason,
                        f"experiment {experiment.id}, mode {experiment.mode}, verdict due"
                        f" {_iso(experiment.verify_at)}; to undo it: tunerd rollback {change_id}",
                        "applied automatically: an increase inside the safe range"
                        if start.actor == "tunerd"
                        else f"approved by {start.actor}",
                    ],
                )
            )

    def end_experiment(
        self,
        experiment: Experiment,
        outcome: str,
        reason: str,
        verdict: dict[str, Any] | None,
        now: float,
    ) -> int:
        """Commit (the treatment becomes the cron's value) or roll back (the control stays)."""
        if outcome not in ("commit", "rollback"):
            raise ValueError(outcome)
        target = self.targets.by_name(experiment.target)
        cron, param = experiment.cron, experiment.param
        value = experiment.treatment if outcome == "commit" else experiment.control
        held = (
            self._held(experiment.id, experiment.control)
            if experiment.mode == "switchback"
            else experiment.treatment
            if outcome == "rollback"
            else experiment.control
        )

        if outcome == "rollback" and isinstance(target, ParamsFileTarget):
            edit = Edit("end", cron, param)  # the block goes: the cron's own value stays
        else:
            edit = Edit("set", cron, param, value)
        ((change_id, _),) = self._apply(
            target,
            [
                Item(
                    {
                        "cron": cron,
                        "param": param,
                        "old_value": held,
                        "new_value": value,
                        "action": outcome,
                        "actor": "tunerd",
                        "reason": reason,
                        "evidence": None
                        if verdict is None
                        else json.dumps(verdict, sort_keys=True),
                        "experiment": experiment.id,
                    },
                    None,
                    edit,
                )
            ],
            now,
        )
        if verdict is not None:
            with self.store.transaction() as db:
                db.execute(
                    "UPDATE experiments SET verdict = ? WHERE id = ?",
                    (json.dumps(verdict, sort_keys=True), experiment.id),
                )
        return change_id

    def _held(self, experiment_id: int, written: int | None) -> int | None:
        """The value an experiment's target holds now: a switchback's last flip, else what its
        start wrote (``written``, when the store has no trace of it)."""
        timeline = self.store.timeline(experiment_id)
        return timeline[-1][1] if timeline else written

    def flip(self, experiment: Experiment, value: int, now: float) -> int:
        """A switchback experiment's script takes ``value`` for the block that begins: one
        change like any other (rollback point, atomic write, history)."""
        target = self.targets.by_name(experiment.target)
        held = self._held(experiment.id, experiment.control)
        arm = "treatment" if value == experiment.treatment else "control"
        change = {
            "cron": experiment.cron,
            "param": experiment.param,
            "old_value": held,
            "new_value": value,
            "action": "flip",
            "actor": "tunerd",
            "reason": f"switchback: the {arm} block from {_iso(now)}",
            "evidence": None,
            "experiment": experiment.id,
        }
        edit = Edit("set", experiment.cron, experiment.param, value)
        ((change_id, _),) = self._apply(target, [Item(change, None, edit)], now)
        return change_id

    def _next_experiment_id(self) -> int:
        """After every id the store or the params file knows: a store restored from an older
        backup must not hand out an id a block in the file still carries."""
        row = self.store.db.execute("SELECT COALESCE(MAX(id), 0) + 1 AS n FROM experiments")
        known = int(row.fetchone()["n"])
        target = self.targets.params_file
        with contextlib.suppress(TargetError):
            for block in target.load(read_target(target.path))["experiments"].values():
                text = str(block.get("id", "")) if isinstance(block, dict) else ""
                if text.isdigit():
                    known = max(known, int(text) + 1)
        return known

    def manual_rollback(self, change_id: int, now: float, actor: str = "operator") -> Change:
        """Undo a change by hand: its parameter goes back to the value before it."""
        change = self.store.change(change_id)
        if change is None:
            raise EngineError(f"there is no change {change_id} (see `tunerd history`)")
        if change.state != "applied" or change.action not in ("experiment_start", "commit"):
            raise EngineError(
                f"change {change_id} is a {change.action} ({change.state}): only an applied"
                " experiment start or commit can be rolled back"
            )
        if change.old_value is None:
            raise EngineError(f"change {change_id} has no earlier value to go back to")
        experiment = self.store.db.execute(
            "SELECT state FROM experiments WHERE id = ?", (change.experiment,)
        ).fetchone()
        state = experiment["state"] if experiment else None
        if change.action == "experiment_start" and state not in ("starting", "running"):
            raise EngineError(
                f"change {change_id} started experiment {change.experiment}, which is {state}"
                + (
                    ": roll back its commit instead (see tunerd history)"
                    if state == "committed"
                    else ": nothing left to undo"
                )
            )
        superseded = [
            c.id
            for c in self.store.changes()
            if c.id > change.id
            and c.cron == change.cron
            and c.param == change.param
            and c.state == "applied"
        ]
        if change.action == "commit" and superseded:
            raise EngineError(
                f"{change.param} of {change.cron!r} changed again after change {change_id}"
                f" (change {superseded[-1]}): roll that one back instead"
            )
        target = self.targets.by_name(change.target or "")
        running = state in ("starting", "running")
        if running and isinstance(target, ParamsFileTarget):
            edit = Edit("end", change.cron, change.param)
        else:
            edit = Edit("set", change.cron, change.param, change.old_value)
        row = {
            "cron": change.cron,
            "param": change.param,
            "old_value": (
                self._held(change.experiment, change.new_value)
                if running and change.experiment is not None
                else change.new_value
            ),
            "new_value": change.old_value,
            "action": "manual_rollback",
            "actor": actor,
            "reason": f"manual rollback of change {change_id}",
            "evidence": None,
            "experiment": change.experiment,
        }
        ((new_id, _),) = self._apply(target, [Item(row, None, edit)], now)
        self.notifier.send(
            Notification(
                "rollback",
                f"Rolled back by hand: {change.param} {change.new_value} → {change.old_value}",
                change.cron,
                [f"change {change_id} undone by {actor} (history: change {new_id})"],
            )
        )
        result = self.store.change(new_id)
        assert result is not None
        return result


def _insert(db: sqlite3.Connection, table: str, row: dict[str, Any]) -> int:
    columns = ", ".join(row)
    marks = ", ".join("?" * len(row))
    cursor = db.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(row.values()))
    assert cursor.lastrowid is not None
    return cursor.lastrowid
