"""Targets: atomic writes that keep the file's mode, no symlinks, scripts edited exactly once."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tunerd.targets import (
    ParamsFileTarget,
    ScriptTarget,
    TargetError,
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
    assert target.params_for(json.dumps(committed).encode(), "c").maxRetries == 4


def test_an_unreadable_params_file_is_never_overwritten(tmp_path: Path) -> None:
    target = ParamsFileTarget(tmp_path / "p.json")
    with pytest.raises(TargetError, match="not a valid params file"):
        target.start_experiment(b"{not json", "c", {})
    with pytest.raises(TargetError, match="not a valid params file"):
        target.set_value(b'{"crons": []}', "c", "timeout", 20000)


def test_script_target_both_spellings(tmp_path: Path) -> None:
    target = ScriptTarget(tmp_path / "monitor.js", "TQQQ 15분 모니터링")
    content = SCRIPT.encode()
    assert target.params_for(content, target.cron).maxRetries == 3
    assert target.params_for(content, target.cron).timeout == 15000
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
