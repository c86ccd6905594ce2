"""What every target shares: the edit a change makes, the error a target raises, and the
fingerprint a rollback point and crash recovery compare."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal


class TargetError(Exception):
    """A target cannot be read or written as asked; nothing was written."""


def sha256(data: bytes | None) -> str | None:
    import hashlib  # OpenSSL: 3.6 MB that `analyze`, which reads targets but never writes, skips

    return None if data is None else hashlib.sha256(data).hexdigest()


# --- edits ----------------------------------------------------------------------------------

EXCERPT_MAX: Final = 16 * 1024
"""What a rollback point keeps of the file before a change: the part the change touched, at most
this long (the whole params file of 5,000 crons, once per change, made a 2.2 GB database)."""


@dataclass(frozen=True, slots=True)
class Edit:
    """One change to one cron's entry in a target; ``Engine`` writes a list of them in one go."""

    kind: Literal["set", "start", "end"]
    """``set`` the parameter to ``value``; ``start`` the experiment ``block``; ``end`` it."""
    cron: str
    param: str
    value: int | None = None
    block: dict[str, Any] | None = None


class _Edits:
    """The one-edit forms, for the callers that make one change."""

    __slots__ = ()

    def apply(self, content: bytes | None, edits: list[Edit]) -> tuple[bytes, list[bytes]]:
        raise NotImplementedError

    def set_value(self, content: bytes | None, cron: str, param: str, value: int) -> bytes:
        return self.apply(content, [Edit("set", cron, param, value)])[0]

    def start_experiment(self, content: bytes | None, cron: str, block: dict[str, Any]) -> bytes:
        return self.apply(content, [Edit("start", cron, str(block.get("param")), block=block)])[0]

    def end_experiment(self, content: bytes | None, cron: str) -> bytes:
        return self.apply(content, [Edit("end", cron, "")])[0]


def _clip(data: bytes) -> bytes:
    return data if len(data) <= EXCERPT_MAX else data[: EXCERPT_MAX - 3] + b"..."
