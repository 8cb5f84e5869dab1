"""A restarted guard remembers a failure within down_grace (through the shared store)."""

from __future__ import annotations

from pathlib import Path

from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import GuardProcess, guard_toml
from tests.support.milterclient import MilterClient
from tests.support.redis_server import RedisServer
from tests.support.smtpserver import free_port


def rcpt(socket: str) -> str:
    with MilterClient(socket, timeout=2) as c:
        c.connect("client.example", "203.0.113.7", 40000)
        c.mail("<a@client.example>")
        reply = c.rcpt("<user@example.org>")
        c.abort()
    return reply.name


def test_restart_within_down_grace_keeps_the_primary_down(
        tmp_path: Path, redis_server: RedisServer) -> None:
    port = free_port()
    socket = f"unix:{tmp_path}/guard.sock"
    config = guard_toml(socket, port, store=redis_server.url)
    with GuardProcess(config, tmp_path, name="before") as before:
        before.start()
        before.wait_for_log(r"target 127\.0\.0\.1:\d+ is down")
    with FakePrimary(port=port), GuardProcess(config, tmp_path, name="after") as after:
        after.start()
        after.wait_for_log(r"target 127\.0\.0\.1:\d+ is up")
        # Up by its own probes, yet the failure seen before the restart still counts.
        assert rcpt(socket) == "continue"
        after.wait_for_log(r"action=flag reason=recently-down .*failed a probe within "
                           r"down_grace")
