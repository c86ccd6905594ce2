"""Discord notifications against a real HTTP server on 127.0.0.1 standing in for Discord."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tunerd.discord import (
    DESCRIPTION_MAX,
    EMBEDS_TOTAL_MAX,
    FIELD_MAX,
    TITLE_MAX,
    interpret,
    payload,
)
from tunerd.notify import Notification

from .test_engine_cli import as_json, setup, tunerd  # noqa: F401  (fixture)

TOKEN = "S3CRET-TOKEN-abcdef"


class FakeDiscord:
    """Answers each POST with the next scripted status (then 200), recording what arrived."""

    def __init__(self, script: list[int], port: int = 0, delay: float = 0.0) -> None:
        self.script = list(script)
        self.received: list[dict[str, Any]] = []
        self.paths: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                time.sleep(delay)
                status = fake.script.pop(0) if fake.script else 200
                fake.paths.append(self.path)
                if status == 429:
                    answer = json.dumps(
                        {"message": "You are being rate limited.", "retry_after": 0.3}
                    )
                elif status == 200:
                    fake.received.append(json.loads(body))
                    answer = json.dumps({"id": str(len(fake.received))})
                else:
                    answer = "{}"
                data = answer.encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def discord_config(setup: dict[str, Path]) -> Iterator[dict[str, Any]]:  # noqa: F811
    def configure(port: int) -> str:
        url = f"http://127.0.0.1:{port}/api/webhooks/123/{TOKEN}"
        text = setup["config"].read_text().split("[discord]")[0]
        setup["config"].write_text(text + f'[discord]\nwebhook_url = "{url}"\n')
        return url

    yield {"setup": setup, "configure": configure}


def titles(server: FakeDiscord) -> list[str]:
    """Each message's identity: title, cron and text (the timestamp aside)."""
    return [
        json.dumps({k: v for k, v in m["embeds"][0].items() if k != "timestamp"})
        for m in server.received
    ]


def test_429_then_success_delivers_everything_once_in_order(discord_config: dict[str, Any]) -> None:
    server = FakeDiscord([429])
    try:
        setup_ = discord_config["setup"]
        discord_config["configure"](server.port)
        done = tunerd(setup_, "cycle")
        assert done.returncode == 0, done.stderr
    finally:
        server.stop()
    got = titles(server)
    assert len(got) == len(set(got)) >= 5  # four experiments, one review, advisories
    assert any(json.loads(g)["title"].startswith("Experiment started") for g in got)
    assert all(m["allowed_mentions"] == {"parse": []} for m in server.received)
    assert all(p.endswith("?wait=true") for p in server.paths)
    everyone = [m for m in server.received if "everyone" in json.dumps(m)]
    assert everyone and all("\\\\@everyone" in json.dumps(m) for m in everyone)  # escaped
    assert TOKEN not in done.stdout + done.stderr
    assert "rate limited" in done.stderr


def test_a_discord_that_is_down_gets_everything_later(discord_config: dict[str, Any]) -> None:
    setup_ = discord_config["setup"]
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    discord_config["configure"](port)
    down = tunerd(setup_, "cycle")
    assert down.returncode == 0, down.stderr
    assert "ConnectError" in down.stderr and TOKEN not in down.stderr + down.stdout
    server = FakeDiscord([], port=port)  # back
    try:
        # Read-only commands never wait on Discord; the next command that acts delivers.
        assert tunerd(setup_, "history").returncode == 0 and not server.received
        review = json.loads(tunerd(setup_, "status", "--json").stdout)["pending"][0]["id"]
        later = tunerd(setup_, "reject", str(review))
        assert later.returncode == 0
        status = json.loads(tunerd(setup_, "status", "--json").stdout)
    finally:
        server.stop()
    assert status["notifications"]["pending"] == 0
    got = titles(server)
    assert len(got) == len(set(got)) >= 5  # each once
    assert any(json.loads(g)["title"].startswith("Experiment started") for g in got)
    assert TOKEN not in later.stderr


def test_two_processes_flushing_at_once_send_each_message_once(tmp_path: Path) -> None:
    """The daemon's outbox job and a command run by hand may flush together: one delivers."""
    from tunerd.discord import DiscordNotifier
    from tunerd.store import Store

    server = FakeDiscord([], delay=0.05)
    url = f"http://127.0.0.1:{server.port}/api/webhooks/1/{TOKEN}"
    queue = DiscordNotifier(Store(tmp_path), url)
    for i in range(10):
        queue.send(Notification("advisory", f"advisory {i}", "cron", [f"line {i}"]))
    counts: list[int] = []

    def flush() -> None:
        notifier = DiscordNotifier(Store(tmp_path), url)  # its own connection, as a process has
        counts.append(notifier.flush(budget=10))

    try:
        threads = [threading.Thread(target=flush) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        counts.append(queue.flush(budget=10))
    finally:
        server.stop()
    assert [m["embeds"][0]["title"] for m in server.received] == [
        f"advisory {i}" for i in range(10)
    ]
    assert sorted(counts) == [0, 0, 10]


def test_a_gone_webhook_is_not_retried(discord_config: dict[str, Any]) -> None:
    server = FakeDiscord([404])
    try:
        discord_config["configure"](server.port)
        done = tunerd(discord_config["setup"], "cycle")
    finally:
        server.stop()
    assert done.returncode == 0
    assert "no longer exists" in done.stderr and TOKEN not in done.stderr


def test_payload_stays_within_discord_limits() -> None:
    n = Notification(
        "rollback",
        "T" * 1000,
        "@everyone **" + "크" * 3000,
        ["<@123> `code` " + "x" * 9000, "> quote", "# header"],
    )
    body = payload(n, 0.0)
    (embed,) = body["embeds"]
    assert body["allowed_mentions"] == {"parse": []} and "content" not in body
    assert len(embed["title"]) <= TITLE_MAX
    assert len(embed["description"]) <= DESCRIPTION_MAX
    assert all(len(f["value"]) <= FIELD_MAX for f in embed["fields"])
    total = len(embed["title"]) + len(embed["description"]) + len(embed["footer"]["text"])
    total += sum(len(f["name"]) + len(f["value"]) for f in embed["fields"])
    assert total <= EMBEDS_TOTAL_MAX
    assert embed["fields"][0]["value"].startswith("\\@everyone \\*\\*")
    assert "\\<\\@123\\>" in embed["description"] and "\\`code\\`" in embed["description"]


def test_interpret_answers() -> None:
    assert interpret(204, {}, b"", 1).result == "delivered"
    limited = interpret(429, {"retry-after": "7"}, b'{"retry_after": 2.5}', 1)
    assert (limited.result, limited.delay) == ("retry", 2.5)
    assert interpret(429, {"retry-after": "7"}, b"not json", 1).delay == 7.0
    assert interpret(503, {}, b"", 4).delay == 8.0
    assert interpret(404, {}, b"", 1).result == "dead"
    assert interpret(400, {}, b'{"embeds": ["0"]}', 1).result == "dead"
