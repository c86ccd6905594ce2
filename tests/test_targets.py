"""Targets: atomic writes that keep the file's mode, no symlinks, scripts edited exactly once."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tunerd.targets import (
    InForceReader,
    ParamsFileTarget,
    ScriptTarget,
    TargetError,
    Targets,
    atomic_write,
    read_target,
    remove_stale_temporaries,
)

SCRIPT = """const CONFIG = {
  MAX_RETRIES: 3,
  BACKOFF: 'exponential',
};
exec(cmd, { timeout: 15000, maxBuffer: 10 * 1024 * 1024 });
"""


def test_atomic_write_keeps_mode_and_leaves_no_temporaries(tmp_path: Path) -> None:
    path = tmp_path / "params.json"
    path.write_text("{}")
    os.chmod(path, 0o640)
    atomic_write(path, b'{"defaults": {}}\n')
    assert path.read_bytes() == b'{"defaults": {}}\n'
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["params.json"]


def test_a_new_file_is_created_readable(tmp_path: Path) -> None:
    path = tmp_path / "params.json"
    atomic_write(path, b"{}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_symlinks_are_refused_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    link = tmp_path / "params.json"
    link.symlink_to(outside)
    with pytest.raises(TargetError, match="symlink"):
        atomic_write(link, b"{}")
    with pytest.raises(TargetError, match="symlink"):
        read_target(link)
    assert outside.read_text() == "{}"


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "params.json"
    (tmp_path / ".tunerd-params.json.abc123").write_text("{half")
    (tmp_path / "unrelated").write_text("keep")
    assert len(remove_stale_temporaries(path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrelated"]


def test_params_file_keeps_what_it_does_not_know(tmp_path: Path) -> None:
    target = ParamsFileTarget(tmp_path / "p.json")
    original = json.dumps({"defaults": {"timeout": 20000}, "crons": {}, "note": "mine"}).encode()
    block = {"id": "1", "param": "maxRetries", "control": 3, "treatment": 4, "split": 0.5}
    started = target.start_experiment(original, "c", block)
    doc = json.loads(started)
    assert doc["note"] == "mine" and doc["experiments"]["c"]["param"] == "maxRetries"
    committed = json.loads(target.set_value(started, "c", "maxRetries", 4))
    assert committed["crons"]["c"] == {"maxRetries": 4} and committed["experiments"] == {}
    in_force = target.in_force(target.load(json.dumps(committed).encode()), "c")
    assert (in_force.maxRetries, in_force.timeout, in_force.fixed) == (4, 20000, ())


def test_an_unreadable_params_file_is_never_overwritten(tmp_path: Path) -> None:
    target = ParamsFileTarget(tmp_path / "p.json")
    with pytest.raises(TargetError, match="not a valid params file"):
        target.start_experiment(b"{not json", "c", {})
    with pytest.raises(TargetError, match="not a valid params file"):
        target.set_value(b'{"crons": []}', "c", "timeout", 20000)


def test_script_target_both_spellings(tmp_path: Path) -> None:
    target = ScriptTarget(tmp_path / "monitor.js", "TQQQ 15분 모니터링")
    content = SCRIPT.encode()
    in_force = target.in_force(content, target.cron)
    assert (in_force.maxRetries, in_force.timeout) == (3, 15000)
    edited = target.set_value(content, target.cron, "maxRetries", 4).decode()
    assert (
        "MAX_RETRIES: 4," in edited and edited.replace("MAX_RETRIES: 4", "MAX_RETRIES: 3") == SCRIPT
    )
    seed_style = b"const opts = { maxRetries: 3 };"
    assert (
        target.set_value(seed_style, target.cron, "maxRetries", 5)
        == b"const opts = { maxRetries: 5 };"
    )


def test_script_target_must_match_exactly_once(tmp_path: Path) -> None:
    target = ScriptTarget(tmp_path / "monitor.js", "c")
    twice = (SCRIPT + "exec(other, { timeout: 9000 });").encode()
    with pytest.raises(TargetError, match="matches 2 times"):
        target.set_value(twice, "c", "timeout", 20000)
    with pytest.raises(TargetError, match="matches 0 times"):
        target.set_value(SCRIPT.encode(), "c", "backoffBase", 2000)


def test_a_script_says_what_it_holds_and_what_to_add(tmp_path: Path) -> None:
    """The user's scripts have MAX_RETRIES and an exec() timeout but no backoff line: the backoff
    runs at the wrapper's default, cannot be written, and the reason says what to add."""
    target = ScriptTarget(tmp_path / "monitor.js", "c")
    in_force = target.in_force(SCRIPT.replace("15000", "10000").encode(), "c")
    assert (in_force.maxRetries, in_force.timeout, in_force.backoffBase) == (3, 10000, 1000)
    assert in_force.backoff == "exponential" and in_force.unwritable("timeout") is None
    why = in_force.unwritable("backoffBase")
    assert why is not None and "BACKOFF_BASE: 1000," in why and "baseDelay" in why
    with pytest.raises(TargetError, match="BACKOFF_BASE"):
        target.set_value(SCRIPT.encode(), "c", "backoffBase", 2000)
    # No timeout in exec(): unknown, never the default; two matches: unknown and ambiguous.
    no_timeout = target.in_force(b"const CONFIG = { MAX_RETRIES: 0 };", "c")
    assert (no_timeout.maxRetries, no_timeout.timeout) == (3, None)  # 0 means 3, as `0 || 3`
    assert "timeout: 15000" in (no_timeout.unwritable("timeout") or "")
    twice = target.in_force(b"a({timeout: 1000}); b({timeout: 2000}); c({baseDelay: 2000});", "c")
    assert twice.timeout is None and "matches 2 times" in (twice.unwritable("timeout") or "")
    same = target.in_force(b"const A = { BACKOFF_BASE: 2000 }; x({ baseDelay: 2000 });", "c")
    assert same.backoffBase == 2000 and same.unwritable("backoffBase") is not None


def test_one_reader_for_every_command(tmp_path: Path) -> None:
    """A script when configured; else the params file; else what the log recorded; else the
    wrapper's defaults. A file that cannot be read leaves the values unknown."""
    script = tmp_path / "monitor.js"
    script.write_text(SCRIPT)
    params = tmp_path / "params.json"
    targets = Targets(ParamsFileTarget(params), {"s": ScriptTarget(script, "s")})
    logged = {"maxRetries": 4}
    assert InForceReader(targets)("s", logged).timeout == 15000
    assert InForceReader(targets)("p", logged).maxRetries == 4  # no params file yet: the log
    assumed = InForceReader(targets)("p")  # nothing says what its Level 1 runs with
    assert assumed.assumed and assumed.source.startswith("assumed: the wrapper's defaults")
    params.write_text('{"crons": {"p": {"timeout": 20000}}}')
    assert InForceReader(targets)("p", logged).as_dict()["timeout"] == 20000
    unread = InForceReader(targets)("p")  # its runs record no params: is the file read at all?
    assert unread.timeout == 20000 and unread.assumed and "not known" in unread.source
    script.unlink()
    gone = InForceReader(targets)("s")
    assert gone.as_dict() == {
        "maxRetries": None,
        "timeout": None,
        "backoffBase": None,
        "backoff": "exponential",
    }
    assert "does not exist" in (gone.unwritable("maxRetries") or "")
