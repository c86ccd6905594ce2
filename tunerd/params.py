"""The tunable parameters, their ranges, and the safety classification of a change.

The table is the seed's (SPEC section 3). ``maxRetries`` counts attempts in all, as the wrapper's
loop does (``attempt = 1 .. maxRetries``), and the wrapper treats ``maxRetries: 0`` as 3.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

Decision = Literal["auto", "manual", "forbidden"]
ParamName = Literal["maxRetries", "timeout", "backoffBase"]
TUNABLE: Final[tuple[ParamName, ...]] = ("maxRetries", "timeout", "backoffBase")


@dataclass(frozen=True, slots=True)
class ParamSpec:
    name: str
    default: int
    safe: tuple[int, int]
    """Automatic changes land only here."""
    absolute: tuple[int, int]
    """Never beyond, not even with a human's approval."""
    unit: str = ""
    safe_when_rate_limited: tuple[int, int] | None = None
    """A wider safe range when the change answers HTTP 429."""


SPECS: Final[dict[str, ParamSpec]] = {
    "maxRetries": ParamSpec("maxRetries", 3, safe=(2, 5), absolute=(2, 5)),
    "timeout": ParamSpec("timeout", 15000, safe=(10000, 30000), absolute=(5000, 60000), unit="ms"),
    "backoffBase": ParamSpec(
        "backoffBase",
        1000,
        safe=(1000, 3000),
        absolute=(500, 5000),
        unit="ms",
        safe_when_rate_limited=(1000, 5000),
    ),
}
DEFAULT_BACKOFF: Final = "exponential"
MAX_TIMER_MS: Final = 2**31 - 1
"""The longest delay a Node timer holds: a longer ``setTimeout`` fires at once."""


def untrusted(param: str, value: Any) -> str | None:
    """Why ``value``, written by a person where Level 1 reads ``param``, cannot be taken as the
    number Level 1 runs with (None when it can). Level 1 may use such a value as it is (a
    negative timeout, ``"three"`` retries) or fall back to a default: tunerd cannot tell which,
    so it neither reads it as a default nor tunes from it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{_shown(value)} is not a number"
    if not math.isfinite(value) or value != int(value):
        return f"{_shown(value)} is not a whole number"
    if value < 0:
        return f"{_shown(value)} is negative"
    if value == 0 and param != "maxRetries":  # maxRetries 0 is the wrapper's 3
        return "0 means no wait to one Level 1 and the default to another"
    if value > MAX_TIMER_MS:
        return f"{_shown(value)} is beyond {MAX_TIMER_MS:,}, the most a Node timer holds"
    return None


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:39] + "…"


@dataclass(frozen=True, slots=True)
class Params:
    """The parameters one cron runs with."""

    maxRetries: int = SPECS["maxRetries"].default
    timeout: int = SPECS["timeout"].default
    backoffBase: int = SPECS["backoffBase"].default
    backoff: str = DEFAULT_BACKOFF

    def get(self, name: str) -> int:
        value: int = getattr(self, name)
        return value

    def with_overrides(self, overrides: dict[str, Any] | None) -> Params:
        """These parameters with the numeric values of ``overrides`` on top (others ignored)."""
        if not overrides:
            return self
        values = {
            "maxRetries": self.maxRetries,
            "timeout": self.timeout,
            "backoffBase": self.backoffBase,
            "backoff": self.backoff,
        }
        for name in TUNABLE:
            value = overrides.get(name)
            if value is not None and untrusted(name, value) is None:
                values[name] = int(value)
        if name_ok := overrides.get("backoff"):
            values["backoff"] = str(name_ok)
        if values["maxRetries"] == 0:
            values["maxRetries"] = SPECS["maxRetries"].default  # the wrapper's own rule
        return Params(**values)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, int | str]:
        return {
            "maxRetries": self.maxRetries,
            "timeout": self.timeout,
            "backoffBase": self.backoffBase,
            "backoff": self.backoff,
        }


@dataclass(frozen=True, slots=True)
class InForce:
    """The parameters a cron runs with as far as tunerd can tell, and which of them its target
    can change: one answer for ``analyze``, ``status``, ``cycle`` and ``simulate --from-log``.

    A value is None when tunerd cannot tell it (a wrapper script with no ``timeout`` in its
    ``exec()`` options): shown as unknown, never tuned.
    """

    maxRetries: int | None = SPECS["maxRetries"].default
    timeout: int | None = SPECS["timeout"].default
    backoffBase: int | None = SPECS["backoffBase"].default
    backoff: str = DEFAULT_BACKOFF
    source: str = "assumed: the wrapper's defaults"
    """Where the values come from, for a person."""
    fixed: tuple[tuple[str, str], ...] = ()
    """(parameter, what to add to the target so that tunerd can change it) for each parameter
    the cron's target cannot be written for."""
    mode: str | None = None
    """The experiments its target allows: ``ab`` (the params file), ``switchback`` (a script),
    None (no target tunerd writes for it yet)."""
    assumed: bool = False
    """Nothing shows that the cron's Level 1 runs with these values: no script of its own, and
    its runs record no ``params`` (the user's wrapper reads no params file). Shown as assumed; an
    attempt is not judged against an assumed timeout."""
    untrusted: tuple[tuple[str, str], ...] = ()
    """(parameter, where and why) for each value its target holds that tunerd cannot take as
    the number Level 1 runs with (``untrusted``): unknown, not written, said to a person."""
    retrier: str = "the wrapper"
    timeout_step: int = 1
    """The smallest step its target takes a timeout in (ms): 1000 for the gateway, whose jobs
    set whole seconds."""
    """Who retries the cron's runs, as advisories name it (``the gateway`` for OpenClaw's own
    cron)."""

    @classmethod
    def of(cls, params: Params, source: str, mode: str | None = None) -> InForce:
        return cls(
            params.maxRetries, params.timeout, params.backoffBase, params.backoff, source, mode=mode
        )

    def get(self, name: str) -> int | None:
        value: int | None = getattr(self, name)
        return value

    @property
    def splits(self) -> bool:
        """Whether its runs can be dealt between two values at once (the params file's A/B);
        a script's cannot, nor a native job's, which the gateway runs."""
        return self.mode != "switchback" and self.retrier == "the wrapper"

    def unwritable(self, name: str) -> str | None:
        """Why ``name`` cannot be written, and what to add so that it can; None if it can."""
        return dict(self.fixed).get(name)

    def as_dict(self) -> dict[str, int | str | None]:
        return {
            "maxRetries": self.maxRetries,
            "timeout": self.timeout,
            "backoffBase": self.backoffBase,
            "backoff": self.backoff,
        }


class ExperimentBlock(msgspec.Struct):
    id: str | int
    """tunerd writes a string; a number (a Node wrapper's, a person's) is the same id."""
    param: str
    control: int
    treatment: int
    split: float = 0.5
    started: str | None = None


class ParamsFile(msgspec.Struct, forbid_unknown_fields=False):
    """What Level 1 reads before each run (SPEC section 3)."""

    defaults: dict[str, Any] = {}
    crons: dict[str, dict[str, Any]] = {}
    experiments: dict[str, ExperimentBlock] = {}

    def params_for(self, cron: str) -> Params:
        return Params().with_overrides(self.defaults).with_overrides(self.crons.get(cron))

    def untrusted(self, cron: str) -> dict[str, str]:
        """param -> where and why, for each value of the cron that ``params_for`` cannot use."""
        return untrusted_values(self.defaults, self.crons.get(cron))


def untrusted_values(defaults: Any, overrides: Any) -> dict[str, str]:
    """The values of ``defaults`` and a cron's ``overrides`` (a params file's) that cannot be
    trusted; a good override hides a bad default."""
    found: dict[str, str] = {}
    for where, values in (("in defaults", defaults), ("in the cron's entry", overrides)):
        if not isinstance(values, dict):
            continue
        for param in TUNABLE:
            if param in values:
                why = untrusted(param, values[param])
                if why is None:
                    found.pop(param, None)
                else:
                    found[param] = f"{param} {why} ({where})"
    return found


class ParamsFileError(ValueError):
    """The params file is not what Level 1 expects."""


def parse_params_file(data: bytes) -> ParamsFile:
    try:
        return msgspec.json.decode(data, type=ParamsFile)
    except msgspec.DecodeError as exc:
        raise ParamsFileError(str(exc)) from exc


def classify_change(
    param: str, current: int, proposed: int, rate_limited: bool = False
) -> tuple[Decision, str]:
    """Whether a change may be applied automatically, needs a human, or is refused, and why.

    Automatic only for an increase that lands inside the safe range; a decrease or a value outside
    the safe range goes to manual review; anything beyond the absolute bounds is refused outright.
    """
    spec = SPECS[param]
    low, high = spec.absolute
    if not low <= proposed <= high:
        return (
            "forbidden",
            f"{_fmt(proposed, spec)} is beyond the absolute bounds {_range(spec.absolute, spec)}",
        )
    safe = (
        spec.safe_when_rate_limited if rate_limited and spec.safe_when_rate_limited else spec.safe
    )
    if proposed < current:
        return "manual", "a decrease always needs a human"
    if not safe[0] <= proposed <= safe[1]:
        return "manual", f"{_fmt(proposed, spec)} is outside the safe range {_range(safe, spec)}"
    return "auto", f"an increase inside the safe range {_range(safe, spec)}"


def _fmt(value: int, spec: ParamSpec) -> str:
    return f"{value:,} {spec.unit}".rstrip()


def _range(bounds: tuple[int, int], spec: ParamSpec) -> str:
    return f"{bounds[0]:,}–{bounds[1]:,} {spec.unit}".rstrip()
