"""Applying changes to targets, crash-safely, with the history to show for it (the shell).

Every change follows one protocol: render the new file in memory; commit the intent (history row
``applying``, rollback point with the old bytes, the new bytes' hash, the experiment row) in one
transaction; write the file atomically; commit the outcome. ``recover`` settles an intent that a
crash interrupted by looking at what the file holds: the new bytes mean applied, the old mean
not applied, anything else means someone else changed the file (a conflict, reported).

All writers take one exclusive lock (``state_dir/apply.lock``), so a cycle, an approval and a
manual rollback never interleave, whether they run in the daemon or the CLI.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tunerd.faults import crash_point
from tunerd.notify import Notification, Notifier
from tunerd.params import InForce
from tunerd.policy import check_approved, check_automatic
from tunerd.store import Change, Experiment, Store
from tunerd.switchback import arm_at
from tunerd.targets import (
    InForceReader,
    ParamsFileTarget,
    Target,
    TargetError,
    Targets,
    atomic_write,
    read_target,
    remove_stale_temporaries,
    sha256,
)
from tunerd.timeparse import iso as _iso


class EngineError(Exception):
    """An operation cannot be done as asked; the message says why. Nothing was changed."""


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
    def exclusive(self) -> Iterator[None]:
        """The one writer at a time, across processes."""
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def current_params(self, cron: str) -> InForce:
        """What the cron runs with now, read afresh (see ``InForceReader`` for many crons)."""
        return InForceReader(self.targets)(cron)

    # --- the write protocol ----------------------------------------------------------------

    def _apply(
        self,
        target: Target,
        change: dict[str, Any],
        render: Callable[[bytes | None], bytes],
        experiment: dict[str, Any] | None,
        now: float,
    ) -> tuple[int, int | None]:
        """Write one change; returns (change id, experiment id). TargetError: nothing written."""
        old = read_target(target.path)
        new = render(old)
        with self.store.transaction() as db:
            experiment_id = change.get("experiment")
            if experiment is not None:
                experiment_id = _insert(db, "experiments", experiment)
            point = _insert(
                db,
                "rollback_points",
                {"target": target.name, "content": old, "sha256": sha256(old), "created_at": now},
            )
            change_id = _insert(
                db,
                "changes",
                {
                    **change,
                    "state": "applying",
                    "target": target.name,
                    "rollback_point": point,
                    "new_sha256": sha256(new),
                    "experiment": experiment_id,
                    "created_at": now,
                },
            )
        crash_point("after_rollback_point")
        try:
            atomic_write(target.path, new)
        except (OSError, TargetError) as exc:
            with self.store.transaction() as db:
                self._settle(db, change_id, "aborted", now)
            raise TargetError(f"could not write {target.name}: {exc}") from exc
        crash_point("before_history")
        with self.store.transaction() as db:
            self._settle(db, change_id, "applied", now)
        return change_id, experiment_id

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
                current = sha256(read_target(target.path))
                remove_stale_temporaries(target.path)
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
        if actor == "tunerd":
            check_automatic(param, control, treatment, rate_limited)
        else:
            check_approved(param, treatment)
        if self.store.running_experiment(cron) is not None:
            raise EngineError(f"{cron!r} already has an experiment under way")
        target = self.targets.for_cron(cron)
        block = {
            "id": None,
            "param": param,
            "control": control,
            "treatment": treatment,
            "split": self.split,
            "started": _iso(now),
        }
        period = verify_after or self.verify_after
        next_id = self._next_experiment_id()
        block["id"] = str(next_id)
        seed = None
        written = treatment
        if target.mode == "switchback":
            # tunerd takes turns itself: the script starts on the value of the current block
            seed = f"{next_id}:{now:.0f}"
            written = treatment if arm_at(seed, now) == "treatment" else control

        def render(content: bytes | None) -> bytes:
            if seed is not None:
                return target.set_value(content, cron, param, written)
            return target.start_experiment(content, cron, block)

        experiment = {
            "cron": cron,
            "param": param,
            "control": control,
            "treatment": treatment,
            "mode": target.mode,
            "split": self.split if target.mode == "ab" else 0.5,
            "target": target.name,
            "state": "starting",
            "reason": reason,
            "started_at": now,
            "verify_at": now + period,
            "seed": seed,
            "period": period,
        }
        change_id, experiment_id = self._apply(
            target,
            {
                "cron": cron,
                "param": param,
                "old_value": control,
                "new_value": written,
                "action": "experiment_start",
                "actor": actor,
                "reason": reason,
                "evidence": json.dumps(evidence, ensure_ascii=False, sort_keys=True),
            },
            render,
            experiment | {"id": next_id},
            now,
        )
        assert experiment_id == next_id
        started = self.store.running_experiment(cron)
        assert started is not None
        self.notifier.send(
            Notification(
                "experiment_started",
                f"Experiment started: {param} {control} → {treatment}",
                cron,
                [
                    reason,
                    f"experiment {started.id}, mode {started.mode}, verdict due"
                    f" {_iso(started.verify_at)}; to undo it: tunerd rollback {change_id}",
                    "applied automatically: an increase inside the safe range"
                    if actor == "tunerd"
                    else f"approved by {actor}",
                ],
            )
        )
        return started

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

        def render(content: bytes | None) -> bytes:
            if outcome == "rollback" and isinstance(target, ParamsFileTarget):
                return target.end_experiment(content, cron)
            return target.set_value(content, cron, param, value)

        change_id, _ = self._apply(
            target,
            {
                "cron": cron,
                "param": param,
                "old_value": held,
                "new_value": value,
                "action": outcome,
                "actor": "tunerd",
                "reason": reason,
                "evidence": None if verdict is None else json.dumps(verdict, sort_keys=True),
                "experiment": experiment.id,
            },
            render,
            None,
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
        change_id, _ = self._apply(
            target,
            {
                "cron": experiment.cron,
                "param": experiment.param,
                "old_value": held,
                "new_value": value,
                "action": "flip",
                "actor": "tunerd",
                "reason": f"switchback: the {arm} block from {_iso(now)}",
                "evidence": None,
                "experiment": experiment.id,
            },
            lambda content: target.set_value(content, experiment.cron, experiment.param, value),
            None,
            now,
        )
        return change_id

    def _next_experiment_id(self) -> int:
        row = self.store.db.execute("SELECT COALESCE(MAX(id), 0) + 1 AS n FROM experiments")
        return int(row.fetchone()["n"])

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
        old_value = change.old_value

        def render(content: bytes | None) -> bytes:
            if running and isinstance(target, ParamsFileTarget):
                return target.end_experiment(content, change.cron)
            return target.set_value(content, change.cron, change.param, old_value)

        new_id, _ = self._apply(
            target,
            {
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
            },
            render,
            None,
            now,
        )
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
