"""Where Level 1 and the gateway read a cron's parameters, and how tunerd changes them (the shell).

- ``files``: the params file and the wrapper scripts, written atomically;
- ``gateway``: an OpenClaw native job's timeout, changed through the ``openclaw`` command.

``Targets`` says which target holds a cron's parameters; ``InForceReader`` reads what each cron
runs with now, one rule for every command.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tunerd.inputs.gateway import Job, is_native
from tunerd.params import DEFAULT_BACKOFF, TUNABLE, InForce, Params, untrusted
from tunerd.targets.base import EXCERPT_MAX, Edit, TargetError, sha256
from tunerd.targets.files import (
    DEFAULT_PATTERNS,
    ParamsFileTarget,
    ScriptTarget,
    atomic_write,
    distrust,
    read_target,
    remove_stale_temporaries,
)
from tunerd.targets.gateway import PREFIX, Gateway, GatewayTarget

Target = ParamsFileTarget | ScriptTarget | GatewayTarget

__all__ = [
    "DEFAULT_PATTERNS",
    "EXCERPT_MAX",
    "Edit",
    "Gateway",
    "GatewayTarget",
    "InForceReader",
    "ParamsFileTarget",
    "ScriptTarget",
    "Target",
    "TargetError",
    "Targets",
    "atomic_write",
    "read_target",
    "remove_stale_temporaries",
    "sha256",
]


@dataclass(frozen=True, slots=True)
class Targets:
    params_file: ParamsFileTarget
    scripts: dict[str, ScriptTarget]
    """cron name -> its wrapper script (the cron's parameters live there, not in the params file)"""

    gateway: Gateway | None = None
    """OpenClaw's gateway, for its native jobs (named ``NAME (OpenClaw)``), when configured."""

    def for_cron(self, cron: str) -> Target:
        script = self.scripts.get(cron)
        if script is not None:
            return script
        if self.gateway is not None and is_native(cron):
            # a name the history gives a native job: never the params file's, even when the
            # gateway's state cannot be read or the job is gone
            job = self.gateway.jobs().get(cron)
            if job is None:
                raise TargetError(f"OpenClaw has no job named {cron!r}")
            return self.gateway.target(job.id)
        return self.params_file

    def by_name(self, name: str) -> Target:
        if name.startswith(PREFIX):
            if self.gateway is None:
                raise TargetError(f"{name}: OpenClaw's gateway is no longer configured")
            return self.gateway.target(name[len(PREFIX) :])
        targets: list[Target] = [self.params_file, *self.scripts.values()]
        for target in targets:
            if target.name == name:
                return target
        raise TargetError(f"{name} is no longer a configured target")


class InForceReader:
    """The parameters in force of any number of crons, each file read and parsed once.

    One rule for every command: a cron's wrapper script when one is configured; else the params
    file when it exists; else the parameters the cron's latest log line recorded; else the
    wrapper's defaults. A file that cannot be read makes its values unknown (and unwritable,
    with the reason), never an error: a cycle goes on with the other crons.
    """

    def __init__(self, targets: Targets | None) -> None:
        self.targets = targets
        self._contents: dict[Path, bytes | TargetError | None] = {}
        self._doc: dict[str, Any] | TargetError | None = None
        self._doc_read = False
        self._jobs: dict[str, Job] | TargetError | None = None

    def __call__(self, cron: str, logged: dict[str, Any] | None = None) -> InForce:
        targets = self.targets
        if targets is not None and (script := targets.scripts.get(cron)) is not None:
            content = self._content(script.path)
            try:
                if isinstance(content, TargetError):
                    raise content
                return script.in_force(content, cron)
            except TargetError as exc:
                return _unreadable(f"script {script.path}", str(exc))
        if targets is not None and targets.gateway is not None and is_native(cron):
            if self._jobs is None:
                try:
                    self._jobs = targets.gateway.jobs()
                except TargetError as exc:
                    self._jobs = exc
            if isinstance(self._jobs, TargetError):
                return _unreadable(f"OpenClaw's state {targets.gateway.state}", str(self._jobs))
            from tunerd.inputs.openclaw import in_force_of, no_job

            job = self._jobs.get(cron)
            return no_job(cron) if job is None else in_force_of(job, targets.gateway.can_edit)
        if targets is not None:
            doc = self._params_doc(targets.params_file)
            if isinstance(doc, TargetError):
                return _unreadable(f"params file {targets.params_file.path}", str(doc))
            if doc is not None:
                found = targets.params_file.in_force(doc, cron)
                if logged:
                    return found
                return replace(
                    found,
                    source=f"assumed: {found.source} (its runs record no params: whether its"
                    " Level 1 reads the file is not known)",
                    assumed=True,
                )
        if logged:
            source = "logged by its latest run"
            bad: dict[str, str] = {
                param: f"{param} {why} ({source})"
                for param in TUNABLE
                if param in logged and (why := untrusted(param, logged[param])) is not None
            }
            return distrust(InForce.of(Params().with_overrides(logged), source), bad)
        return InForce(assumed=True)

    def problems(self) -> list[tuple[Path, str]]:
        """The targets that cannot be read or trusted as a whole (a params file that is not
        valid, a script that cannot be read): every cron in them is left alone until a person
        fixes them, and a cycle says so rather than only "nothing to change"."""
        targets = self.targets
        if targets is None:
            return []
        found = []
        doc = self._params_doc(targets.params_file)
        if isinstance(doc, TargetError):
            found.append((targets.params_file.path, str(doc)))
        for script in {script.path: script for script in targets.scripts.values()}.values():
            content = self._content(script.path)
            if isinstance(content, TargetError):
                found.append((script.path, str(content)))
        return found

    def _content(self, path: Path) -> bytes | TargetError | None:
        if path not in self._contents:
            try:
                self._contents[path] = read_target(path)
            except TargetError as exc:
                self._contents[path] = exc
        return self._contents[path]

    def _params_doc(self, target: ParamsFileTarget) -> dict[str, Any] | TargetError | None:
        if not self._doc_read:
            self._doc_read = True
            content = self._content(target.path)
            try:
                if isinstance(content, TargetError):
                    raise content
                self._doc = None if content is None else target.load(content)
            except TargetError as exc:
                self._doc = exc
        return self._doc


def _unreadable(source: str, why: str) -> InForce:
    return InForce(None, None, None, DEFAULT_BACKOFF, source, tuple((p, why) for p in TUNABLE))
