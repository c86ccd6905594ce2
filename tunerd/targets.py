"""The files Level 1 reads its parameters from, and how tunerd writes them.

Two kinds (SPEC section 3). The **params file** (JSON: ``defaults``, per-cron ``crons``
overrides, ``experiments``) can split traffic, so its experiments are A/B. A **wrapper script** has
its number replaced in place, only where the parameter's pattern matches exactly once; it cannot
split traffic, so its experiments are sequential (before/after).

Every write is atomic: a temporary file in the same directory, fsync, rename over the old one,
fsync of the directory; the old file's mode (and owner, when permitted) carry over. A target path
that is a symlink is refused rather than followed, and no path is ever built from a cron name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tunerd.faults import crash_point
from tunerd.params import TUNABLE, Params, ParamsFileError, parse_params_file

TEMP_PREFIX: Final = ".tunerd-"


class TargetError(Exception):
    """A target cannot be read or written as asked; nothing was written."""


def sha256(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


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


# --- the params file ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParamsFileTarget:
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

    def params_for(self, content: bytes | None, cron: str) -> Params:
        doc = self.load(content)
        return Params().with_overrides(doc["defaults"]).with_overrides(doc["crons"].get(cron))

    def start_experiment(self, content: bytes | None, cron: str, block: dict[str, Any]) -> bytes:
        doc = self.load(content)
        doc["experiments"][cron] = block
        return _dump(doc)

    def set_value(self, content: bytes | None, cron: str, param: str, value: int) -> bytes:
        """The cron's parameter set (a commit or a rollback), and the experiment block on that
        parameter, if any, removed (one on another parameter stays)."""
        doc = self.load(content)
        overrides = doc["crons"].setdefault(cron, {})
        if not isinstance(overrides, dict):
            raise TargetError(f"{self.path}: the entry of a cron is not an object")
        overrides[param] = value
        block = doc["experiments"].get(cron)
        if isinstance(block, dict) and block.get("param") == param:
            del doc["experiments"][cron]
        return _dump(doc)

    def end_experiment(self, content: bytes | None, cron: str) -> bytes:
        doc = self.load(content)
        doc["experiments"].pop(cron, None)
        return _dump(doc)


def _dump(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, ensure_ascii=False, indent=2, sort_keys=False) + "\n").encode()


# --- a wrapper script -----------------------------------------------------------------------

DEFAULT_PATTERNS: Final[dict[str, str]] = {
    # The user's scripts write MAX_RETRIES: 3, and timeout: 15000 inside exec() options; the seed's
    # applicator looks for maxRetries: 3. Both spellings match by default.
    "maxRetries": r"\b(?:maxRetries|MAX_RETRIES)\s*[:=]\s*(\d+)",
    "timeout": r"\b(?:timeout|TIMEOUT)\s*[:=]\s*(\d+)",
    "backoffBase": r"\b(?:backoffBase|baseDelay|BACKOFF_BASE|BASE_DELAY)\s*[:=]\s*(\d+)",
}


@dataclass(frozen=True, slots=True)
class ScriptTarget:
    """One cron's wrapper script: each parameter's number found by a pattern with one group."""

    path: Path
    cron: str
    patterns: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PATTERNS))
    mode: str = "sequential"

    @property
    def name(self) -> str:
        return str(self.path)

    def _match(self, text: str, param: str) -> re.Match[str]:
        pattern = re.compile(self.patterns.get(param, DEFAULT_PATTERNS[param]))
        found = list(pattern.finditer(text))
        if len(found) != 1:
            raise TargetError(
                f"{self.path}: the {param} pattern matches {len(found)} times, not exactly once;"
                " nothing was written"
            )
        return found[0]

    def _text(self, content: bytes | None) -> str:
        if content is None:
            raise TargetError(f"{self.path} does not exist")
        try:
            return content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TargetError(f"{self.path} is not UTF-8 text") from exc

    def params_for(self, content: bytes | None, cron: str) -> Params:
        text = self._text(content)
        values: dict[str, object] = {}
        for param in TUNABLE:
            with contextlib.suppress(TargetError):
                values[param] = int(self._match(text, param).group(1))
        return Params().with_overrides(values)

    def set_value(self, content: bytes | None, cron: str, param: str, value: int) -> bytes:
        text = self._text(content)
        match = self._match(text, param)
        return (text[: match.start(1)] + str(value) + text[match.end(1) :]).encode()

    def start_experiment(self, content: bytes | None, cron: str, block: dict[str, Any]) -> bytes:
        """Sequential: the treatment value simply takes effect."""
        return self.set_value(content, cron, block["param"], int(block["treatment"]))

    def end_experiment(self, content: bytes | None, cron: str) -> bytes:
        return self._text(content).encode()


Target = ParamsFileTarget | ScriptTarget
