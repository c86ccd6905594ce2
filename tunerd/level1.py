"""Level 1's side of the contract, pure: the parameters a run uses, its experiment arm, the wait
before each retry, the error object of a failed attempt, and the log line it appends.

``tunerd exec`` (real processes) and the simulator (simulated ones) both run on this module, so a
simulated run behaves as an exec'd one, and both as the user's wrapper (``lib/auto-retry.js``):
``maxRetries`` is the number of attempts in all (0 means 3), the delay before retry k is
``backoffBase * 2^(k-1)`` (exponential), ``* k`` (linear) or flat (fixed), and the line has the
wrapper's shape (SPEC section 2) plus the ``params`` and ``experiment`` the run used.
"""

from __future__ import annotations

import json
import random
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from tunerd.params import TUNABLE, ExperimentBlock, Params, ParamsFile
from tunerd.records import HTTP_FIX, NETWORK_FIX, wrapper_retries
from tunerd.timeparse import iso

Arm = Literal["control", "treatment"]

BLOCK_RUNS: Final = 10
"""Runs per block of the arm sequence: each block holds ``round(split * 10)`` treatment runs in a
random order, so the arms stay balanced over any stretch of ten runs (time of day, weekdays and
traffic peaks fall on both alike) and no periodic schedule lines up with the alternation."""


@dataclass(frozen=True, slots=True)
class Assignment:
    """A run's place in an experiment: what ``experiment`` in its log line says."""

    experiment: str
    arm: Arm

    def as_json(self) -> dict[str, str]:
        return {"id": self.experiment, "arm": self.arm}


def next_arm(
    state: MutableMapping[str, list[str]], experiment: str, split: float, rng: random.Random
) -> Arm:
    """The next arm of ``experiment``, from permuted blocks kept in ``state`` (experiment id ->
    the arms left in its block). The caller keeps ``state`` between runs: in memory for the
    simulator, in a small locked file for ``tunerd exec``."""
    left = state.get(experiment)
    if not left or any(arm not in ("control", "treatment") for arm in left):
        treatment = min(BLOCK_RUNS, max(0, round(split * BLOCK_RUNS)))
        left = ["treatment"] * treatment + ["control"] * (BLOCK_RUNS - treatment)
        rng.shuffle(left)
    arm: Arm = "treatment" if left.pop() == "treatment" else "control"
    state[experiment] = left
    return arm


def resolve(doc: ParamsFile | None, cron: str) -> tuple[Params, ExperimentBlock | None]:
    """The cron's parameters (defaults, then its overrides) and its experiment block, if the
    block names a tunable parameter."""
    if doc is None:
        return Params(), None
    block = doc.experiments.get(cron)
    if block is not None and block.param not in TUNABLE:
        block = None
    return doc.params_for(cron), block


def assign(params: Params, block: ExperimentBlock, arm: Arm) -> tuple[Params, Assignment]:
    """The parameters of a run in ``arm`` of the experiment ``block``."""
    value = block.treatment if arm == "treatment" else block.control
    return (
        params.with_overrides({block.param: value}),
        Assignment(str(block.id), arm),
    )


def attempts_allowed(params: Params) -> int:
    return params.maxRetries if params.maxRetries > 0 else 3


def backoff_ms(params: Params, retry: int) -> float:
    """The wait before retry ``retry`` (1: before the second attempt), as the wrapper has it."""
    if params.backoff == "exponential":
        return float(params.backoffBase * 2 ** (retry - 1))
    if params.backoff == "linear":
        return float(params.backoffBase * retry)
    return float(params.backoffBase)


def error_object(
    error_type: str | int, message: str, status: int | None = None, retryable: bool = False
) -> dict[str, Any]:
    """The wrapper's ``analyzeError`` result for an error with this code or name, message and
    HTTP status, keys in its order; ``retryable`` marks errors the caller retries besides the
    wrapper's own (``tunerd exec --retry-exit``)."""
    info: dict[str, Any] = {
        "type": error_type,
        "message": message,
        "statusCode": status,
        "retryable": retryable,
        "category": "unknown",
        "suggestedFix": "Unknown error",
    }
    if error_type in NETWORK_FIX:
        info.update(retryable=True, category="network", suggestedFix=NETWORK_FIX[str(error_type)])
    if status in HTTP_FIX:
        info.update(retryable=True, category="http", suggestedFix=HTTP_FIX[status])
    if wrapper_retries(None, None, message):
        info.update(
            retryable=True, category="timeout", suggestedFix="Increase timeout or check network"
        )
    if status is None:
        del info["statusCode"]  # JSON.stringify drops undefined
    return info


def encode_line(line: dict[str, Any]) -> bytes:
    """A log line as the wrapper's ``JSON.stringify`` writes it: compact, keys in the order
    given, non-ASCII as UTF-8, one newline (the user's own scripts grep
    ``'"type":"failure"'``)."""
    text = json.dumps(line, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (text + "\n").encode("utf-8", "surrogatepass")


def log_line(
    cron: str,
    context: dict[str, Any],
    attempts: list[dict[str, Any]],
    total_ms: float,
    ended_at: float,
    params: Params,
    assignment: Assignment | None,
    result: Any = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """One run's line, keys in the wrapper's order (timestamp, type, context, attempts,
    totalDuration, then result or finalError and reason), then tunerd's ``params`` and
    ``experiment``: success when its last attempt succeeded, else a final failure with the last
    error, and ``reason`` when the run ended before its last attempt (the wrapper writes
    ``"Non-retryable error"``)."""
    succeeded = bool(attempts) and attempts[-1]["success"]
    line: dict[str, Any] = {
        "timestamp": iso(ended_at, "milliseconds"),
        "type": "success" if succeeded else "failure",
        "context": {"cron": cron, **{k: v for k, v in context.items() if k != "cron"}},
        "attempts": attempts,
        "totalDuration": round(total_ms),
    }
    if succeeded:
        line["result"] = result
    else:
        line["finalError"] = attempts[-1]["error"] if attempts else None
        if reason:
            line["reason"] = reason
    line["params"] = params.as_dict()
    if assignment is not None:
        line["experiment"] = assignment.as_json()
    return line
