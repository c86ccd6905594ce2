#!/usr/bin/env python3
"""Writes deploy/example/auto-retry.jsonl: a week of a Level 1 log in the wrapper's real shape.

The user's own 63 real lines come first (../shared/data, copied into this file's output once),
followed by a synthetic week of four crons that each show something tunerd reacts to: a flaky
one (retries and final failures), a slow one (runs near the 15 s timeout), a rate-limited one
(HTTP 429), and a healthy one. Deterministic: the same output every time.

usage: python deploy/example/generate.py [REAL_LOG] > deploy/example/auto-retry.jsonl
"""

import json
import random
import sys
from datetime import UTC, datetime, timedelta

ERR_429 = {"type": "Error", "message": "HTTP 429", "statusCode": 429, "retryable": True,
           "category": "http", "suggestedFix": "Rate limit exceeded - increase backoff delay"}
ERR_TIMEOUT = {"type": "ETIMEDOUT", "message": "Command failed: node briefing.js", "retryable": True,
               "category": "network", "suggestedFix": "Network timeout - check connection or increase timeout"}
ERR_RESET = {"type": "ECONNRESET", "message": "socket hang up", "retryable": True,
             "category": "network", "suggestedFix": "Network error - retry later"}
CRONS = {
    # name: (every minutes, median ms, attempt failure p, error)
    "Market flaky watcher": (15, 900, 0.3, ERR_RESET),
    "일일 주식 브리핑": (60, 10500, 0.02, ERR_TIMEOUT),
    "GitHub rate-limited poll": (30, 400, 0.12, ERR_429),
    "Healthy heartbeat": (10, 250, 0.0, None),
}


def runs(rnd: random.Random, start: datetime):
    for name, (every, median, fail_p, error) in CRONS.items():
        t = start
        while t < start + timedelta(days=7):
            t += timedelta(minutes=every)
            attempts, total = [], 0
            for a in range(1, 4):  # maxRetries 3: three attempts in all
                d = int(rnd.lognormvariate(0, 0.25) * median)
                if error is ERR_TIMEOUT and d > 15000:
                    attempts.append({"attempt": a, "success": False, "duration": 15000, "error": error})
                    total += 15000 + (1000 * 2 ** (a - 1) if a < 3 else 0)
                    continue
                if rnd.random() < fail_p:
                    attempts.append({"attempt": a, "success": False, "duration": d, "error": error})
                    total += d + (1000 * 2 ** (a - 1) if a < 3 else 0)
                    continue
                attempts.append({"attempt": a, "success": True, "duration": d})
                total += d
                break
            ok = attempts[-1]["success"]
            rec = {"timestamp": t.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                   "type": "success" if ok else "failure",
                   "context": {"cron": name, "schedule": f"*/{every} * * * *"},
                   "attempts": attempts, "totalDuration": total}
            if ok:
                rec["result"] = {"output": "ok\n", "stderr": "", "duration": total}
            else:
                rec["finalError"] = attempts[-1]["error"]
            yield t, rec


def main() -> None:
    if len(sys.argv) > 1:
        with open(sys.argv[1], encoding="utf-8") as real:
            sys.stdout.write(real.read())
    rnd = random.Random(20260205)
    start = datetime(2026, 2, 6, tzinfo=UTC)
    for _, rec in sorted(runs(rnd, start), key=lambda r: r[0]):
        sys.stdout.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
