"""The files Level 1 reads its parameters from, and how tunerd writes them.

Two kinds (SPEC section 3). The **params file** (JSON: ``defaults``, per-cron ``crons``
overrides, ``experiments``) can split traffic, so its experiments are A/B. A **wrapper script** has
its number replaced in place, only where the parameter's pattern matches exactly once; it cannot
split traffic, so tunerd flips it between the two values hour by hour (switchback).

Every write is atomic: a temporary file in the same directory, fsync, rename over the old one,
fsync of the directory; the old file's mode (and owner, when permitted) carry over. A target path
that is a symlink is refused rather than followed, and no path is ever built from a cron name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from tunerd.faults import crash_point
from tunerd.params import (
    DEFAULT_BACKOFF,
    TUNABLE,
    InForce,
    Params,
    ParamsFileError,
    parse_params_file,
    untrusted,
    untrusted_values,
)
from tunerd.targets.base import Edit, TargetError, _clip, _Edits

TEMP_PREFIX: Final = ".tunerd-"


def read_target(path: Path) -> bytes | None:
    """The file's bytes, or None when it does not exist yet."""
    _refuse_symlink(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TargetError(f"cannot read {path}: {exc.strerror or exc}") from exc


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file."""
    _refuse_symlink(path)
    directory = path.parent
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    except OSError as exc:
        raise TargetError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        fd, temp = tempfile.mkstemp(dir=directory, prefix=f"{TEMP_PREFIX}{path.name}.")
    except OSError as exc:
        raise TargetError(f"cannot write in {directory}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            f.flush()
            crash_point("mid_write")
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
            if old is not None:
                os.fchmod(f.fileno(), stat.S_IMODE(old.st_mode))
                with contextlib.suppress(PermissionError):
                    os.fchown(f.fileno(), old.st_uid, old.st_gid)
            else:
                os.fchmod(f.fileno(), 0o644)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    crash_point("after_rename")
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Temporary files a crash left beside ``path`` (never renamed, so never read by Level 1)."""
    removed = []
    with contextlib.suppress(OSError):
        for candidate in path.parent.glob(f"{TEMP_PREFIX}{path.name}.*"):
            with contextlib.suppress(OSError):
                candidate.unlink()
                removed.append(candidate)
    return removed


def _refuse_symlink(path: Path) -> None:
    if path.is_symlink():
        raise TargetError(
            f"{path} is a symlink: tunerd does not follow it; configure the real file's path"
        )


class _File:
    """How a file target is read, written and tidied after a crash: one protocol, the same as
    the gateway's target, for ``Engine``."""

    __slots__ = ()
    path: Path

    def read(self) -> bytes | None:
        return read_target(self.path)

    def write(self, data: bytes) -> None:
        atomic_write(self.path, data)

    def tidy(self) -> None:
        remove_stale_temporaries(self.path)


# --- the params file ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParamsFileTarget(_File, _Edits):
    """``{"defaults": {...}, "crons": {name: {...}}, "experiments": {name: {...}}}``."""

    path: Path
    mode: str = "ab"

    @property
    def name(self) -> str:
        return str(self.path)

    def load(self, content: bytes | None) -> dict[str, Any]:
        if content is None:
            return {"defaults": {}, "crons": {}, "experiments": {}}
        try:
            parse_params_file(content)  # validates the shape Level 1 relies on
            doc: dict[str, Any] = json.loads(content)
        except (ParamsFileError, ValueError) as exc:
            raise TargetError(
                f"{self.path} is not a valid params file ({exc}): fix or remove it; tunerd "
                "will not overwrite a file it cannot read"
            ) from exc
        for key in ("defaults", "crons", "experiments"):
            doc.setdefault(key, {})
        return doc

    def in_force(self, doc: dict[str, Any], cron: str) -> InForce:
        """The cron's values in a loaded document (``load``): ``defaults``, then its entry.
        Every parameter can be written here (A/B: Level 1 reads the file before each run), but
        one whose value cannot be trusted (``params.untrusted``)."""
        overrides = doc["crons"].get(cron)
        params = (
            Params()
            .with_overrides(doc["defaults"])
            .with_overrides(overrides if isinstance(overrides, dict) else None)
        )
        found = InForce.of(params, f"params file {self.path}", self.mode)
        bad = untrusted_values(doc["defaults"], overrides)
        return distrust(found, {p: f"params file {self.path}: {why}" for p, why in bad.items()})

    def apply(self, content: bytes | None, edits: list[Edit]) -> tuple[bytes, list[bytes]]:
        """The file after ``edits``, parsed and written once however many there are, and what
        each edit's rollback point keeps: its cron's entry and block, and the defaults, before.
        ``set`` also removes an experiment block on that parameter (a commit or a rollback);
        one on another parameter stays."""
        doc = self.load(content)
        excerpts = [self._excerpt(doc, edit.cron) for edit in edits]
        for edit in edits:
            if edit.kind == "start":
                doc["experiments"][edit.cron] = edit.block
            elif edit.kind == "end":
                doc["experiments"].pop(edit.cron, None)
            else:
                overrides = doc["crons"].setdefault(edit.cron, {})
                if not isinstance(overrides, dict):
                    raise TargetError(f"{self.path}: the entry of a cron is not an object")
                overrides[edit.param] = edit.value
                block = doc["experiments"].get(edit.cron)
                if isinstance(block, dict) and block.get("param") == edit.param:
                    del doc["experiments"][edit.cron]
        return _dump(doc), excerpts

    @staticmethod
    def _excerpt(doc: dict[str, Any], cron: str) -> bytes:
        part = {
            "defaults": doc["defaults"],
            "crons": {cron: doc["crons"].get(cron)},
            "experiments": {cron: doc["experiments"].get(cron)},
        }
        return _clip(json.dumps(part, ensure_ascii=False, sort_keys=True).encode())


def _dump(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, ensure_ascii=False, indent=2, sort_keys=False) + "\n").encode()


# --- a wrapper script -----------------------------------------------------------------------

_KEYS: Final[dict[str, str]] = {
    # The user's scripts write MAX_RETRIES: 3, and timeout: 15000 inside exec() options; the seed's
    # applicator looks for maxRetries: 3. Both spellings match by default.
    "maxRetries": r"\b(?:maxRetries|MAX_RETRIES)\s*[:=]\s*",
    "timeout": r"\b(?:timeout|TIMEOUT)\s*[:=]\s*",
    "backoffBase": r"\b(?:backoffBase|baseDelay|BACKOFF_BASE|BASE_DELAY)\s*[:=]\s*",
}
DEFAULT_PATTERNS: Final[dict[str, str]] = {p: key + r"(\d+)" for p, key in _KEYS.items()}
_ANY_VALUE: Final = {p: re.compile(key + r"([^\s,;})]+)") for p, key in _KEYS.items()}
"""The key with whatever follows it: a value the number pattern does not take (``-5``,
``'three'``, ``CONFIG.TIMEOUT``) is one Level 1 reads and tunerd cannot."""
BACKOFF_KIND: Final = re.compile(
    r"\b(?:BACKOFF|backoff)\s*[:=]\s*['\"](exponential|linear|fixed)['\"]"
)
"""The backoff kind a script passes (``BACKOFF: 'exponential',``): shown, never tuned."""
WRAPPER_DEFAULTS: Final[dict[str, int | None]] = {
    "maxRetries": 3,  # `options.maxRetries || 3`
    "backoffBase": 1000,  # `options.baseDelay || 1000`
    "timeout": None,  # no timeout in exec() options: none, or one tunerd cannot see
}
"""What the wrapper runs with when a script does not say: the library's own defaults."""
TO_ADD: Final[dict[str, str]] = {
    "maxRetries": "add `MAX_RETRIES: 3,` to the script's CONFIG and pass it to the wrapper as"
    " `maxRetries: CONFIG.MAX_RETRIES`",
    "timeout": "give the script's exec() call a `timeout: 15000,` option",
    "backoffBase": "add `BACKOFF_BASE: 1000,` to the script's CONFIG and pass it to the wrapper"
    " as `baseDelay: CONFIG.BACKOFF_BASE`",
}


@dataclass(frozen=True, slots=True)
class ScriptTarget(_File, _Edits):
    """One cron's wrapper script: each parameter's number found by a pattern with one group."""

    path: Path
    cron: str
    patterns: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PATTERNS))
    mode: str = "switchback"

    @property
    def name(self) -> str:
        return str(self.path)

    def _matches(self, text: str, param: str) -> list[re.Match[str]]:
        return list(re.compile(self.patterns.get(param, DEFAULT_PATTERNS[param])).finditer(text))

    def _match(self, text: str, param: str) -> re.Match[str]:
        found = self._matches(text, param)
        if len(found) != 1:
            raise TargetError(
                f"{self.path}: the {param} pattern matches {len(found)} times, not exactly once;"
                f" nothing was written ({self._advice(param, len(found))})"
            )
        return found[0]

    def _advice(self, param: str, matches: int) -> str:
        if not matches:
            return TO_ADD[param]
        return (
            f"its {param} pattern matches {matches} times: give [[scripts]] `patterns.{param}` a"
            " pattern that matches exactly once"
        )

    def _text(self, content: bytes | None) -> str:
        if content is None:
            raise TargetError(f"{self.path} does not exist")
        try:
            return content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TargetError(f"{self.path} is not UTF-8 text") from exc

    def in_force(self, content: bytes | None, cron: str) -> InForce:
        """The script's numbers; where a parameter's pattern does not match, the wrapper's own
        default (the timeout: unknown), and what to add to the script so that tunerd can tune
        it. A pattern that matches more than once cannot be written, and its value is unknown
        unless every match holds the same number."""
        text = self._text(content)
        values: dict[str, int | None] = {}
        fixed = []
        bad: dict[str, str] = {}
        for param in TUNABLE:
            found = self._matches(text, param)
            if len(found) == 1:
                values[param] = int(found[0].group(1))
                if (why := untrusted(param, values[param])) is not None:
                    bad[param] = f"{self.path}: {param} {why}"
                continue
            numbers = {int(m.group(1)) for m in found}
            if not found:
                values[param] = WRAPPER_DEFAULTS[param]
                if (other := self._other_value(text, param)) is not None:
                    bad[param] = f"{self.path}: {param} is {other!r}, not a number"
                    continue
            else:  # known if every match says the same, never writable
                values[param] = numbers.pop() if len(numbers) == 1 else None
            fixed.append((param, f"{self.path}: {self._advice(param, len(found))}"))
        if values["maxRetries"] == 0:
            values["maxRetries"] = WRAPPER_DEFAULTS["maxRetries"]  # `0 || 3`
        kind = BACKOFF_KIND.search(text)
        found_in = InForce(
            values["maxRetries"],
            values["timeout"],
            values["backoffBase"],
            kind.group(1) if kind else DEFAULT_BACKOFF,
            f"script {self.path}",
            tuple(fixed),
            self.mode,
        )
        return distrust(found_in, bad)

    def _other_value(self, text: str, param: str) -> str | None:
        """What the script gives ``param`` where its (default) pattern finds no number."""
        if self.patterns.get(param, DEFAULT_PATTERNS[param]) != DEFAULT_PATTERNS[param]:
            return None  # a pattern of the operator's: its key is not known
        found = _ANY_VALUE[param].findall(text)
        return found[0][:40] if len(found) == 1 else None

    def params_for(self, content: bytes | None, cron: str) -> Params:
        """What a run of the script uses (the simulator's Level 1): unknown values as the
        defaults of ``tunerd exec``."""
        force = self.in_force(content, cron)
        return Params().with_overrides({k: v for k, v in force.as_dict().items() if v is not None})

    def apply(self, content: bytes | None, edits: list[Edit]) -> tuple[bytes, list[bytes]]:
        """The script after ``edits`` (each number replaced where its pattern matches exactly
        once; ``start`` writes the treatment, ``end`` leaves the file as it is), and what each
        edit's rollback point keeps: the lines its pattern matched, before."""
        text = self._text(content)
        excerpts = [
            _clip("\n".join(m.group(0) for m in self._matches(text, e.param)).encode())
            if e.param in TUNABLE
            else b""
            for e in edits
        ]
        for edit in edits:
            if edit.kind == "end":
                continue
            value = edit.value if edit.kind == "set" else int((edit.block or {})["treatment"])
            match = self._match(text, edit.param)
            text = text[: match.start(1)] + str(value) + text[match.end(1) :]
        return text.encode(), excerpts


Target = ParamsFileTarget | ScriptTarget


def distrust(found: InForce, bad: dict[str, str]) -> InForce:
    """``found`` with each untrusted value unknown and unwritable, and said why."""
    if not bad:
        return found
    advice = "set a whole number by hand; tunerd leaves it alone until then"
    unknown: dict[str, Any] = dict.fromkeys(bad)
    return replace(
        found,
        **unknown,
        fixed=(*found.fixed, *((p, f"{why}: {advice}") for p, why in bad.items())),
        untrusted=tuple(bad.items()),
    )
