"""``tunerd simulate``: the whole loop against simulated crons on a virtual clock.

Nothing here decides anything: the weekly cycle is ``run_cycle``, verifications and hourly harm
checks are ``settle``, changes go through the engine into a real params file (or, with
``ab = false``, real wrapper scripts: switchback experiments) and a real SQLite store, all in a
scratch directory. Only the crons and the clock are simulated: each run reads its parameters from
the target as Level 1 would (``level1``: the same code as ``tunerd exec``), is played out by
``scenario.simulate_run`` and appended to a real log. So a verdict in the simulator is the
verdict the daemon would give on the same log, and weeks take seconds.

Timers fire as the daemon's do: the weekly cycle on ``schedule`` (in UTC unless the scenario
sets ``timezone``), each experiment's verification at its time, a harm check every hour.
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

import msgspec

from tunerd.level1 import Arm, assign, encode_line, log_line, next_arm, resolve
from tunerd.notify import Notification
from tunerd.params import TUNABLE, Params, ParamsFileError, parse_params_file
from tunerd.scenario import CronSpec, Scenario, ScenarioError, simulate_run, world
from tunerd.timeparse import iso, parse_duration

WEEK: Final = 7 * 86400.0
HOUR: Final = 3600.0
_GOLDEN: Final = (math.sqrt(5) - 1) / 2
FIXED_SETTINGS: Final = frozenset(
    {"log_path", "state_dir", "params_file", "scripts", "discord", "max_line_bytes"}
)
"""Keys a scenario may not set: the simulation owns its files and never notifies anyone."""


@dataclass(frozen=True, slots=True)
class Event:
    """One line of the timeline."""

    at: float
    kind: str
    """cycle | noticed | experiment_started | review_requested | refused | extend | commit |
    rollback | harm_stop | advisory"""
    cron: str | None
    text: str

    def as_json(self) -> dict[str, Any]:
        return {"at": iso(self.at), "kind": self.kind, "cron": self.cron, "text": self.text}


class Timeline:
    """The notifier of a simulation: what would have gone to Discord, at its virtual time."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.events: list[Event] = []

    def send(self, notification: Notification) -> None:
        text = " — ".join([notification.title, *notification.lines[:1]])
        self.events.append(Event(self.clock(), notification.kind, notification.cron, text))

    def note(self, kind: str, cron: str | None, text: str) -> None:
        self.events.append(Event(self.clock(), kind, cron, text))

    def flush(self, budget: float = 10.0, retry_now: bool = False) -> int:
        return 0


@dataclass(slots=True)
class Tally:
    """Runs ended in one week (of one cron, or of all)."""

    runs: int = 0
    failures: int = 0
    retried: int = 0
    duration_ms: float = 0.0

    def add(self, line: dict[str, Any]) -> None:
        self.runs += 1
        self.failures += line["type"] != "success"
        self.retried += len(line["attempts"]) > 1
        self.duration_ms += line["totalDuration"]

    def as_json(self) -> dict[str, Any]:
        n = self.runs
        return {
            "runs": n,
            "final_failure_rate": round(self.failures / n, 6) if n else None,
            "retry_rate": round(self.retried / n, 6) if n else None,
            "mean_duration_ms": round(self.duration_ms / n, 1) if n else None,
        }


@dataclass(slots=True)
class SimulatedCron:
    spec: CronSpec
    index: int
    script: Path | None
    runs: int = 0
    trigger: Any = None
    """The crontab of a ``schedule`` cron (APScheduler's), made at its first run."""
    weeks: list[Tally] = field(default_factory=list)


def _epoch(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ScenarioError(f"start: {text!r} is not an ISO 8601 time") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


SCRIPT: Final = (
    "// {name}: a wrapper script of the simulation (switchback experiments)\n",
    "const CONFIG = {{\n",
    "  MAX_RETRIES: {maxRetries},\n",
    "  BACKOFF: '{backoff}',\n",
    "  BASE_DELAY: {backoffBase},\n",
    "}};\n",
    "exec(command, {{ timeout: {timeout}, maxBuffer: 10 * 1024 * 1024 }});\n",
)
SCRIPT_LINE: Final = {"maxRetries": 2, "backoffBase": 4, "timeout": 6}
"""Which line of ``SCRIPT`` holds each parameter."""


def script_text(name: str, spec: CronSpec) -> str:
    """A wrapper script of the simulation, without the lines the real script lacks
    (``unwritable``): tunerd cannot change those here either, as in life."""
    left_out = {SCRIPT_LINE[p] for p in spec.unwritable if p in SCRIPT_LINE}
    lines = [line for i, line in enumerate(SCRIPT) if i not in left_out]
    return "".join(lines).format(name=name, **msgspec.structs.asdict(spec.params))


class Simulation:
    """One scenario played out in ``workdir`` (a directory of its own, kept or thrown away)."""

    def __init__(self, scenario: Scenario, workdir: Path) -> None:
        from tunerd.config import Settings
        from tunerd.cycle import build_engine
        from tunerd.store import Store

        self.scenario = scenario
        self.world = world(scenario)
        self.start = _epoch(scenario.start)
        self.end = self.start + scenario.weeks * WEEK
        self.now = self.start
        self.timeline = Timeline(lambda: self.now)
        self.crons = [
            SimulatedCron(
                spec,
                i,
                None if scenario.ab else workdir / f"cron-{i}.js",  # never named by the cron
                weeks=[Tally() for _ in range(scenario.weeks)],
            )
            for i, spec in enumerate(scenario.cron)
        ]
        self.weeks = [Tally() for _ in range(scenario.weeks)]
        bad = FIXED_SETTINGS & scenario.settings.keys()
        if bad:
            raise ScenarioError(f"settings: {', '.join(sorted(bad))} cannot be set by a scenario")
        unknown = scenario.settings.keys() - Settings.model_fields.keys()
        if unknown:
            raise ScenarioError(f"settings: unknown key(s) {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {"timezone": "UTC", **scenario.settings}
        values.update(
            log_path=workdir / "auto-retry.jsonl",
            state_dir=workdir / "state",
            params_file=workdir / "params.json",
            scripts=[{"cron": c.spec.name, "path": c.script} for c in self.crons if c.script],
            # simulated crons named like OpenClaw's jobs are the simulation's, never a gateway's
            openclaw={"history": False},
        )
        from pydantic import ValidationError

        from tunerd.config import problems

        try:
            self.settings = Settings.model_validate(values)
        except ValidationError as exc:
            raise ScenarioError(f"settings: {problems(exc)}") from None
        workdir.mkdir(parents=True, exist_ok=True)
        self._write_targets(workdir)
        self.engine = build_engine(self.settings, self.timeline, Store(self.settings.state_dir))
        self.arms: dict[str, list[str]] = {}
        self.arm_rngs: dict[str, random.Random] = {}
        self._params: dict[int, tuple[Params, Any]] = {}
        self.marks: list[tuple[float, int]] = [(self.start, 0)]
        """(time, log size then): every line after that offset ended after that time."""
        self._stretches: dict[tuple[int, int], Any] = {}

    def _write_targets(self, workdir: Path) -> None:
        for c in self.crons:
            if c.script is not None:
                c.script.write_text(script_text(f"cron {c.index}", c.spec), "utf-8")
        if self.scenario.ab:
            document = {
                "defaults": {},
                "crons": {c.spec.name: msgspec.structs.asdict(c.spec.params) for c in self.crons},
                "experiments": {},
            }
            self.settings.params_file.write_text(json.dumps(document, ensure_ascii=False), "utf-8")
        # The configuration the simulation ran with, for `tunerd status/history --config` on
        # a kept --workdir (a JSON scalar is a TOML value).
        keys = {
            "log_path": str(self.settings.log_path),
            "state_dir": str(self.settings.state_dir),
            "params_file": str(self.settings.params_file),
            "timezone": self.settings.timezone,
            **{k: v for k, v in self.scenario.settings.items() if not isinstance(v, dict | list)},
        }
        lines = [f"{key} = {json.dumps(value, ensure_ascii=False)}" for key, value in keys.items()]
        for c in self.crons:
            if c.script is not None:
                lines += [
                    "[[scripts]]",
                    f"cron = {json.dumps(c.spec.name, ensure_ascii=False)}",
                    f"path = {json.dumps(str(c.script))}",
                ]
        (workdir / "tunerd.toml").write_text("\n".join(lines) + "\n", "utf-8")

    # --- Level 1 ------------------------------------------------------------------------------

    def _level1_params(self, c: SimulatedCron) -> tuple[Params, Any]:
        """What Level 1 reads before a run (cached until tunerd next acts)."""
        cached = self._params.get(c.index)
        if cached is None:
            from tunerd.targets import ScriptTarget, read_target

            if c.script is not None:
                target = ScriptTarget(c.script, c.spec.name)
                found = target.params_for(read_target(c.script), c.spec.name)
                # what no line of the script holds, Level 1 still runs with: the wrapper's
                # defaults, or the gateway's fixed retries for a native job
                fixed: dict[str, Any] = {p: getattr(c.spec.params, p) for p in c.spec.unwritable}
                cached = (found.with_overrides(fixed), None)
            else:
                try:
                    doc = parse_params_file(self.settings.params_file.read_bytes())
                except (OSError, ParamsFileError):
                    doc = None
                cached = resolve(doc, c.spec.name)
            self._params[c.index] = cached
        return cached

    def _run(self, c: SimulatedCron, at: float) -> tuple[float, dict[str, Any]]:
        params, block = self._level1_params(c)
        assignment = None
        if block is not None:
            experiment = str(block.id)
            rng = self.arm_rngs.get(experiment)
            if rng is None:  # one stream per experiment: its arms do not depend on the others
                rng = self.arm_rngs[experiment] = random.Random(
                    f"{self.scenario.seed}:arms:{experiment}"
                )
            arm: Arm = next_arm(self.arms, experiment, block.split, rng)
            params, assignment = assign(params, block, arm)
        luck = random.Random(f"{self.scenario.seed}:{c.index}:{c.runs}")
        c.runs += 1
        factor, latency = self.world.at(c.spec.name, at) if self.world else (1.0, 1.0)
        run = simulate_run(c.spec, params, luck, factor, latency)
        ended = at + run.total_ms / 1000
        result = {"output": "ok\n", "stderr": ""} if run.attempts[-1]["success"] else None
        line = log_line(
            c.spec.name,
            {},
            run.attempts,
            run.total_ms,
            ended,
            params,
            assignment,
            result,
            run.reason,
        )
        return ended, line

    def _next_run(self, c: SimulatedCron, after: float) -> float:
        spec = c.spec
        if spec.every is not None:
            period = parse_duration(spec.every).total_seconds()
            if after < self.start:  # the first run: crons spread over their period
                return self.start + 60 * int(period * ((c.index + 1) * _GOLDEN % 1) // 60)
            return after + period
        if c.trigger is None:
            from tunerd.schedule import cron_trigger

            c.trigger = cron_trigger(spec.schedule or "", UTC)
        after = max(after, self.start - 1)
        fire = c.trigger.get_next_fire_time(None, datetime.fromtimestamp(after + 1e-3, UTC))
        return fire.timestamp() if fire else math.inf

    # --- the clock ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        from zoneinfo import ZoneInfo

        from tunerd.cycle import run_cycle
        from tunerd.schedule import cron_trigger

        weekly = cron_trigger(self.settings.schedule, ZoneInfo(self.settings.timezone or "UTC"))

        def next_cycle(after: float) -> float:
            fire = weekly.get_next_fire_time(None, datetime.fromtimestamp(after + 1e-3, UTC))
            return fire.timestamp() if fire else math.inf

        from tunerd.verification import keep_in_step, next_flip_at

        runs = [(self._next_run(c, -math.inf), c.index) for c in self.crons]
        heapq.heapify(runs)
        ended: list[tuple[float, int, int, dict[str, Any]]] = []  # runs still going, by end
        sequence = 0
        cycle_at, hour_at = next_cycle(self.start), self.start + HOUR
        with self.settings.log_path.open("ab") as log:
            while True:
                verify_at = self._next_verification()
                flip_at = next_flip_at(self.engine.store, self.now) or math.inf
                if flip_at <= self.now:  # a flip that failed just now: again in a while
                    flip_at = self.now + 900
                at = min(cycle_at, hour_at, verify_at, flip_at, self.end)
                while runs and runs[0][0] < at:
                    start, index = heapq.heappop(runs)
                    c = self.crons[index]
                    end, line = self._run(c, start)
                    heapq.heappush(ended, (end, sequence, index, line))
                    sequence += 1
                    heapq.heappush(runs, (self._next_run(c, start), index))
                self._write_ended(log, ended, at)
                self.now = at
                if at >= self.end:
                    break
                if at == cycle_at:
                    mark = len(self.timeline.events)
                    self._note_cycle(run_cycle(self.settings, self.engine, at), mark)
                    cycle_at = next_cycle(at)
                elif at == flip_at and at not in (hour_at, verify_at):
                    with self.engine.exclusive():  # a switchback block begins
                        keep_in_step(self.engine, at)
                else:
                    self._settle(at)
                if at == hour_at:
                    hour_at += HOUR
                self._params.clear()  # tunerd may have written a target: Level 1 reads anew
        return self.result()

    def _next_verification(self) -> float:
        due = [e.verify_at for e in self.engine.store.experiments("running")]
        later = [at for at in due if at > self.now]
        return min(later, default=math.inf)

    def _write_ended(
        self, log: IO[bytes], ended: list[tuple[float, int, int, dict[str, Any]]], until: float
    ) -> None:
        while ended and ended[0][0] <= until:
            end, _, index, line = heapq.heappop(ended)
            if end >= self.end:
                continue
            week = int((end - self.start) // WEEK)
            self.weeks[week].add(line)
            self.crons[index].weeks[week].add(line)
            log.write(encode_line(line))
        log.flush()
        self.marks.append((until, log.tell()))

    def _settle(self, at: float) -> None:
        """The verification and hourly look, as ``settle`` does them in the daemon."""
        from tunerd.verification import keep_in_step, settle_found

        engine = self.engine
        with engine.exclusive():
            keep_in_step(engine, at)
            running = engine.store.experiments("running")
            if running:
                found = {e.id: self._gathered(e) for e in running}
                settle_found(engine, running, found, at, self.settings.verdict_settings())

    def _gathered(self, experiment: Any) -> Any:
        """An experiment's runs: every line since it started, gathered stretch by stretch
        between the clock's marks (a stretch once gathered never changes: its lines all ended
        before now). What ``gather_runs`` finds reading the whole log, without reading days of
        it again every hour."""
        from tunerd.switchback import gather
        from tunerd.verification import Gathered, gather_runs

        first = max(bisect.bisect_left(self.marks, (experiment.started_at, -1)) - 1, 0)
        got = Gathered()
        for i in range(first, len(self.marks) - 1):
            key = (experiment.id, i)
            stretch = self._stretches.get(key)
            if stretch is None:
                (_, begin), (until, end) = self.marks[i], self.marks[i + 1]
                stretch = gather_runs(
                    self.settings.log_path,
                    [experiment],
                    until,
                    self.settings.max_line_bytes,
                    skip_to=begin,
                    stop_at=end,
                )[experiment.id]
                if experiment.mode != "ab":
                    # into hour units at once: the flips before ``until`` are all recorded, so
                    # a stretch's attribution never changes
                    stretch.units = gather(
                        stretch.runs,
                        self.engine.store.timeline(experiment.id),
                        experiment.control,
                        experiment.treatment,
                        experiment.seed,
                    )
                    stretch.runs = []
                self._stretches[key] = stretch
            got.merge(stretch)
        return got

    def _note_cycle(self, report: Any, mark: int) -> None:
        """What the cycle looked at, before what it did (its notifications, from ``mark`` on)."""
        noticed = [
            Event(self.now, "noticed", p.cron, f"{p.type.replace('_', ' ')}: {p.detail}")
            for p in report.analysis.patterns
        ]
        results = Counter(o.result for o in report.outcomes)
        held = f", {results['held']} held (an experiment runs)" if results["held"] else ""
        summary = Event(
            self.now,
            "cycle",
            None,
            f"weekly cycle: {report.analysis.totals.cron_entries:,} runs analysed,"
            f" {len(report.analysis.patterns)} patterns, {results['started']} changes tried"
            f"{held}",
        )
        self.timeline.events[mark:mark] = [summary, *noticed]

    # --- the result ---------------------------------------------------------------------------

    def result(self) -> dict[str, Any]:
        from tunerd.monthly import period_report

        store = self.engine.store
        experiments = store.experiments()
        changes = [
            {
                "cron": e.cron,
                "param": e.param,
                "from": e.control,
                "to": e.treatment,
                "verdict": _VERDICTS.get(e.state, e.state),
                "at": iso(e.started_at),
                "decided_at": iso(e.ended_at) if e.ended_at is not None else None,
                "mode": e.mode,
                "reason": json.loads(e.verdict).get("reason", e.reason) if e.verdict else e.reason,
            }
            for e in experiments
        ]
        summary = period_report(self.start, self.end, store.changes(), experiments, store.reviews())
        final = {}
        for c in self.crons:
            params = self.engine.current_params(c.spec.name)
            final[c.spec.name] = {name: params.get(name) for name in TUNABLE}
        return {
            "scenario": self.scenario.name,
            "seed": self.scenario.seed,
            "ab": self.scenario.ab,
            "start": iso(self.start),
            "end": iso(self.end),
            "changes": changes,
            "reviews": [r.as_json() for r in store.reviews()],
            "final_params": final,
            "weeks": [{"week": i + 1, **w.as_json()} for i, w in enumerate(self.weeks)],
            "crons": {
                c.spec.name: {
                    "first_week": c.weeks[0].as_json(),
                    "last_week": c.weeks[-1].as_json(),
                }
                for c in self.crons
            },
            "metrics": summary["metrics"],
            "timeline": [e.as_json() for e in self.timeline.events],
        }

    def close(self) -> None:
        self.engine.store.close()


_VERDICTS: Final = {"committed": "commit", "rolled_back": "rollback", "aborted": "rollback"}


def simulate(scenario: Scenario, workdir: Path) -> dict[str, Any]:
    simulation = Simulation(scenario, workdir)
    try:
        return simulation.run()
    finally:
        simulation.close()


TEXT_COLUMNS: Final = 160
"""A timeline event's text is cut here unless ``--verbose`` (reasons carry every number)."""
_DIGITS: Final = re.compile(r"\d[\d,.]*")
_LABELS: Final = {
    "cycle": "cycle",
    "noticed": "noticed",
    "experiment_started": "tried",
    "review_requested": "needs a human",
    "refused": "refused",
    "extend": "extended",
    "commit": "committed",
    "rollback": "rolled back",
    "harm_stop": "harm stop",
    "advisory": "advisory",
}


def timeline_text(result: dict[str, Any], verbose: bool = False) -> str:
    """The simulation for a person: what tunerd noticed, tried and decided, week by week, and
    the rates before and after. Advisories repeat every week: shown once unless ``verbose``."""
    from tunerd.report import fit, safe_text, width

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2%}"

    mode = "A/B experiments" if result["ab"] else "switchback experiments"
    lines = [
        f"tunerd simulate {safe_text(result['scenario'])}: {len(result['weeks'])} weeks from"
        f" {result['start'][:10]} (seed {result['seed']}, {mode}),"
        f" {len(result['final_params'])} crons",
        "",
    ]
    said: set[str] = set()
    noticed_before: set[str] = set()
    noticed_now: set[str] = set()
    last_time = ""
    for event in result["timeline"]:
        text = safe_text(event["text"])
        if event["kind"] == "cycle":
            noticed_before, noticed_now = noticed_now, set()
        if not verbose:
            # The same advisory every week, the same pattern every cycle: said when it is new.
            key = f"{event['kind']}|{event['cron']}|{_DIGITS.sub('#', text.split(':')[0])}"
            if event["kind"] == "noticed":
                noticed_now.add(key)
                if key in noticed_before:
                    continue
            elif event["kind"] == "advisory":
                if key in said:
                    continue
                said.add(key)
            if len(text) > TEXT_COLUMNS:
                text = text[: TEXT_COLUMNS - 1] + "…"
        when = event["at"][:16].replace("T", " ")
        shown = when if when != last_time else ""
        last_time = when
        who = f"{safe_text(event['cron'])}: " if event["cron"] else ""
        label = _LABELS.get(event["kind"], event["kind"])
        lines.append(f"{shown:<16}  {label:<13} {who}{text}")
    lines += ["", "Week by week, all crons:", " week     runs  final failures  retries  mean run"]
    for w in result["weeks"]:
        mean = "n/a" if w["mean_duration_ms"] is None else f"{w['mean_duration_ms']:,.0f} ms"
        lines.append(
            f" {w['week']:>4} {w['runs']:>8,}  {pct(w['final_failure_rate']):>14}"
            f"  {pct(w['retry_rate']):>7}  {mean:>8}"
        )
    lines += ["", "Per cron, first week → last week (final failures; retries) and parameters:"]
    column = max(width(safe_text(name)) for name in result["final_params"]) + 4
    for name, weeks in result["crons"].items():
        first, last = weeks["first_week"], weeks["last_week"]
        kept: dict[str, list[int]] = {}
        for c in result["changes"]:
            if c["cron"] == name and c["verdict"] == "commit":
                kept.setdefault(c["param"], [c["from"], c["to"]])[1] = c["to"]
        moved = [f"{param} {old} → {new}" for param, (old, new) in kept.items()]
        lines.append(
            f"  {fit(safe_text(name), column)}"
            f"{pct(first['final_failure_rate'])} → {pct(last['final_failure_rate'])};"
            f" {pct(first['retry_rate'])} → {pct(last['retry_rate'])};"
            f" {', '.join(moved) if moved else 'unchanged'}"
        )
    verdicts = Counter(c["verdict"] for c in result["changes"])
    m = result["metrics"]
    weeks = result["weeks"]
    lines += [
        "",
        f"Changes tried: {len(result['changes'])} ({verdicts['commit']} committed,"
        f" {verdicts['rollback']} rolled back, {verdicts['running']} still running at the end);"
        f" reviews for a person: {len(result['reviews'])}",
        f"Rollback ratio: {pct(m['rollback_ratio'])} (the seed's goal: under 10%);"
        f" safety: {m['safety_record']}",
        f"Final failures, first week → last week: {pct(weeks[0]['final_failure_rate'])}"
        f" → {pct(weeks[-1]['final_failure_rate'])}",
    ]
    return "\n".join(lines)
