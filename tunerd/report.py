"""How an analysis is shown: the stable JSON of SPEC section 6, or a report for a person.

Cron names and error text come from an untrusted log. On a terminal they are shown with control
characters escaped (no escape sequence of theirs reaches the terminal) and cut to a fixed display
width that counts East Asian wide characters as two columns, so Korean names line up.
"""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Any

from tunerd.analysis import Analysis, CronSummary, Distribution
from tunerd.params import InForce
from tunerd.reader import Malformed
from tunerd.timeparse import iso


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def _distribution(d: Distribution | None) -> dict[str, float | None]:
    keys = ("mean", "p50", "p95", "p99", "max")
    if d is None:
        return dict.fromkeys(keys)
    return {k: _round(getattr(d, k), 1) for k in keys}


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else iso(epoch, "milliseconds")


def cron_json(s: CronSummary) -> dict[str, Any]:
    return {
        "cron": s.cron,
        "runs": s.runs,
        "successes": s.successes,
        "failures": s.failures,
        "retried": s.retried,
        "retry_rate": round(s.retry_rate, 6),
        "final_failure_rate": round(s.final_failure_rate, 6),
        "final_failures": s.failure_causes(),
        "attempts_per_run": round(s.attempts_per_run, 6),
        "duration_ms": _distribution(s.duration),
        "first_attempt_ms": _distribution(s.first_attempt),
        "errors": {"rate_limit": s.rate_limit, "timeout": s.timeout, "other": s.other},
        "rate_limited_retries": s.rate_limited_retries,
        "top_errors": [
            {"error": name, "class": sig.kind, "count": sig.count, "retryable": sig.retryable}
            for name, sig in s.signatures[:5]
        ],
        "params": s.params.as_dict(),
        "params_source": s.params.source,
        "params_assumed": s.params.assumed,
        "params_unwritable": dict(s.params.fixed),
        "schedule": s.schedule,
        "first_run": _iso(s.first_at),
        "last_run": _iso(s.last_at),
    }


def analysis_json(
    a: Analysis, log: str, since: datetime | None, malformed: list[Malformed]
) -> dict[str, Any]:
    t = a.totals
    return {
        "log": log,
        "since": since.isoformat() if since else None,
        "period": {"first": _iso(a.period[0]), "last": _iso(a.period[1])} if a.period else None,
        "totals": {
            "entries": t.entries,
            "cron_entries": t.cron_entries,
            "test_entries": t.test_entries,
            "task_entries": t.task_entries,
            "unattributed_entries": t.unattributed_entries,
            "malformed": t.malformed,
            "before_since": t.before_since,
            "untracked_crons": t.untracked_crons,
        },
        "crons": [cron_json(s) for s in a.crons],
        "patterns": [
            {"type": p.type, "cron": p.cron, "value": round(p.value, 6), "detail": p.detail}
            for p in a.patterns
        ],
        "recommendations": [
            {
                "cron": r.cron,
                "param": r.param,
                "current": r.current,
                "proposed": r.proposed,
                "reason": r.reason,
                "decision": r.decision,
                "decision_reason": r.decision_reason,
            }
            for r in a.recommendations
        ],
        "advisories": [
            {"type": v.type, "subject": v.subject, "count": v.count, "message": v.message}
            for v in a.advisories
        ],
        "tasks": a.tasks,
        "counted_from": {cron: _iso(at) for cron, at in a.counted_from.items()},
        "malformed_samples": [{"offset": m.offset, "reason": m.reason} for m in malformed],
    }


# --- for a person -------------------------------------------------------------------------------


def safe_text(text: str) -> str:
    """Untrusted text made harmless for a terminal: control and format characters escaped."""
    out = []
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def fit(text: str, columns: int) -> str:
    """``text`` cut (with an ellipsis) and padded to exactly ``columns`` display columns."""
    if width(text) > columns:
        cut, used = [], 0
        for ch in text:
            w = width(ch)
            if used + w > columns - 1:
                break
            cut.append(ch)
            used += w
        text = "".join(cut) + "…"
    return text + " " * (columns - width(text))


def params_text(p: InForce) -> str:
    """``maxRetries 3, timeout 10,000 ms, backoffBase 1,000 ms (script x.js; cannot change:
    backoffBase)``: unknown values say so."""

    def value(v: int | None, unit: str = "") -> str:
        return "unknown" if v is None else f"{v:,}{unit}"

    fixed = f"; cannot change: {', '.join(name for name, _ in p.fixed)}" if p.fixed else ""
    return (
        f"maxRetries {value(p.maxRetries)}, timeout {value(p.timeout, ' ms')}, backoffBase"
        f" {value(p.backoffBase, ' ms')} ({safe_text(p.source)}{fixed})"
    )


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


_COLUMNS = (
    ("runs", 7),
    ("fail", 6),
    ("exh", 5),
    ("n-r", 5),
    ("retry", 6),
    ("att/run", 7),
    ("mean ms", 9),
    ("p95 ms", 9),
    ("p99 ms", 9),
    ("max ms", 9),
    ("429", 5),
    ("t/o", 5),
    ("other", 5),
)


def _cells(s: CronSummary) -> tuple[str, ...]:
    d = s.duration
    return (
        f"{s.runs:,}",
        _pct(s.final_failure_rate),
        str(s.exhausted),
        str(s.non_retryable),
        _pct(s.retry_rate),
        f"{s.attempts_per_run:.2f}",
        *(_ms(getattr(d, k) if d else None) for k in ("mean", "p95", "p99", "max")),
        str(s.rate_limit),
        str(s.timeout),
        str(s.other),
    )


def analysis_text(a: Analysis, log: str, since: datetime | None) -> str:
    t = a.totals
    lines = [f"tunerd analyze: {safe_text(log)}"]
    if a.period:
        lines.append(
            f"Period: {_iso(a.period[0])} → {_iso(a.period[1])}"
            + (f" (since {since.isoformat()})" if since else "")
        )
    lines.append(
        f"Entries: {t.entries:,} — {t.cron_entries:,} cron runs, {t.test_entries:,} tests, "
        f"{t.task_entries:,} task-only, {t.unattributed_entries:,} other; "
        f"{t.malformed:,} malformed lines skipped"
        + (f"; {t.before_since:,} before --since" if t.before_since else "")
    )
    if t.untracked_crons:
        lines.append(
            f"Note: {t.untracked_crons:,} runs of crons beyond the tracked maximum"
            " were counted but not analysed."
        )
    if a.counted_from:
        lines.append(
            "Runs before a parameter change left out (they say nothing of the values now): "
            + ", ".join(
                f"{safe_text(cron)} from {_iso(at)}" for cron, at in sorted(a.counted_from.items())
            )
        )
    lines.append("")
    if not a.crons:
        lines.append("No cron runs in this window.")
    else:
        name_width = max(4, min(max(width(safe_text(s.cron)) for s in a.crons), 32))
        header = fit("cron", name_width) + "".join(f"  {title:>{w}}" for title, w in _COLUMNS)
        lines += [header, "─" * width(header)]
        for s in a.crons:
            cells = _cells(s)
            lines.append(
                fit(safe_text(s.cron), name_width)
                + "".join(f"  {cell:>{w}}" for cell, (_, w) in zip(cells, _COLUMNS, strict=True))
            )
        lines.append(
            "(fail: final failures; exh: of them after every attempt failed, n-r: ended by an"
            " error the wrapper does not retry)"
        )
        lines += ["", "Parameters in force"]
        for s in a.crons:
            lines.append(f"  {safe_text(s.cron)}: {params_text(s.params)}")
    lines.append("")
    if a.patterns:
        lines.append("Patterns")
        lines += [f"  • {p.type}: {safe_text(p.cron)} — {safe_text(p.detail)}" for p in a.patterns]
        lines.append("")
    if a.recommendations:
        lines.append("Recommendations")
        for r in a.recommendations:
            lines.append(
                f"  [{r.decision}] {safe_text(r.cron)}: {r.param} {r.current:,} → {r.proposed:,}"
            )
            lines.append(f"      why: {safe_text(r.reason)}")
            lines.append(f"      {r.decision}: {r.decision_reason}")
        lines.append("")
    elif a.crons:
        lines += ["No parameter change needed: every cron is inside the seed's thresholds.", ""]
    if a.advisories:
        lines.append("Advisories")
        lines += [f"  ! {v.type}: {safe_text(v.message)}" for v in a.advisories]
        lines.append("")
    return "\n".join(lines)


def malformed_text(total: int, samples: list[Malformed], shown: int = 5) -> list[str]:
    """Warnings for stderr, rate-limited to the first few lines."""
    if not total:
        return []
    out = [f"warning: {total:,} malformed line{'s' if total != 1 else ''} skipped"]
    out += [f"  at byte {m.offset:,}: {safe_text(m.reason)}" for m in samples[:shown]]
    if total > shown:
        out.append(f"  … and {total - min(shown, len(samples)):,} more")
    return out
