"""The control socket: the protocol table, the server's manners with bad and slow
clients, and status/explain asking a real running guard (memory:// store)."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from guard.config import parse_config
from guard.control import (
    MAX_CLIENTS,
    BadRequest,
    CommandTable,
    ControlError,
    ControlServer,
    ControlUnavailable,
    ask,
    control_socket_path,
)
from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import ROOT, GuardProcess, guard_toml
from tests.support.milterclient import MilterClient


def table() -> CommandTable:
    t = CommandTable()

    def echo(args: Mapping[str, Any]) -> Any:
        return dict(args)

    def picky(args: Mapping[str, Any]) -> Any:
        raise BadRequest("picky: wants nothing")

    def broken(args: Mapping[str, Any]) -> Any:
        raise KeyError("bug")

    t.add("echo", echo)
    t.add("picky", picky)
    t.add("broken", broken)
    return t


@pytest.mark.parametrize(
    ("label", "line", "want"),
    [
        ("ok", b'{"command": "echo", "args": {"a": 1}}', {"ok": True, "result": {"a": 1}}),
        ("args default to none", b'{"command": "echo"}', {"ok": True, "result": {}}),
        ("not JSON", b"status", {"ok": False, "error": "a request is one line of JSON"}),
        ("not UTF-8", b"\xff\xfe", {"ok": False, "error": "a request is one line of JSON"}),
        ("not an object", b'["echo"]', {"ok": False, "error": "must be a JSON object"}),
        ("no command", b'{"args": {}}', {"ok": False, "error": "'command' must be a string"}),
        ("unknown command", b'{"command": "stats"}',
         {"ok": False, "error": "unknown command 'stats' (known: broken, echo, picky)"}),
        ("unknown key", b'{"command": "echo", "arg": {}}',
         {"ok": False, "error": "unknown request key 'arg'"}),
        ("args not an object", b'{"command": "echo", "args": [1]}',
         {"ok": False, "error": "'args' must be a JSON object"}),
        ("handler refuses", b'{"command": "picky"}',
         {"ok": False, "error": "picky: wants nothing"}),
        ("handler bug", b'{"command": "broken"}',
         {"ok": False, "error": "internal error: KeyError"}),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_command_table_answers(label: str, line: bytes, want: dict[str, Any]) -> None:
    answer = table().answer(line)
    assert answer.endswith(b"\n") and answer.count(b"\n") == 1, label
    got = json.loads(answer)
    assert got["ok"] is want["ok"], label
    if want["ok"]:
        assert got["result"] == want["result"], label
    else:
        assert want["error"] in got["error"], (label, got)


def test_a_command_is_registered_once() -> None:
    t = table()
    with pytest.raises(ValueError, match="already registered"):
        t.add("echo", lambda args: None)


@pytest.mark.parametrize(
    ("label", "toml", "want"),
    [
        ("beside a unix milter socket", {"milter": {"socket": "unix:/var/spool/x/guard.sock"}},
         "/var/spool/x/guard.control.sock"),
        ("inet milter socket", {"milter": {"socket": "inet:9900@127.0.0.1"}},
         "/run/mx-guard/guard.control.sock"),
        ("its own key", {"control": {"socket": "/run/g/ctl.sock"}}, "/run/g/ctl.sock"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else "",
)
def test_control_socket_path(label: str, toml: dict[str, Any], want: str) -> None:
    assert control_socket_path(parse_config(toml)) == want, label


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ControlServer]:
    srv = ControlServer(str(tmp_path / "control.sock"), table(), timeout=1.0)
    assert srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_socket_is_mode_0660_and_answers(server: ControlServer) -> None:
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o660
    assert ask(server.path, "echo", {"x": "y"}) == {"x": "y"}
    with pytest.raises(ControlError, match="unknown command 'nope'"):
        ask(server.path, "nope")


def test_slow_clients_cost_nobody_else(server: ControlServer) -> None:
    """Clients that connect and send nothing hold a thread each until their timeout;
    beyond MAX_CLIENTS the guard says it is busy; nobody waits on them."""
    stuck = []
    for _ in range(MAX_CLIENTS):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(server.path)
        stuck.append(s)
    try:
        with pytest.raises(ControlError, match="busy"):
            ask(server.path, "echo")
        for s in stuck:
            s.settimeout(10)
            assert s.recv(100) == b""  # closed by the server when its time was up
        assert ask(server.path, "echo", {"after": 1}) == {"after": 1}
    finally:
        for s in stuck:
            s.close()


def test_an_oversized_request_is_refused(server: ControlServer) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(server.path)
        s.sendall(b"x" * 70000)
        assert b"request longer than" in s.recv(1000)


def test_a_stale_socket_is_replaced_and_a_live_one_kept(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays: what a killed guard leaves behind
    first = ControlServer(path, table(), timeout=1.0)
    assert first.start()
    try:
        second = ControlServer(path, table(), timeout=1.0)
        assert not second.start()  # another guard serves it: leave it alone
        assert ask(path, "echo") == {}
    finally:
        first.stop()
    assert not os.path.exists(path)
    with pytest.raises(ControlUnavailable, match="No such file"):
        ask(path, "echo")


# -- a real running guard ------------------------------------------------------------


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guard", *args, "-c", str(config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_status_and_explain_see_the_running_guard_through_an_outage(tmp_path: Path) -> None:
    socket_ = f"unix:{tmp_path}/guard.sock"
    with FakePrimary() as mx1, GuardProcess(guard_toml(socket_, mx1.port), tmp_path) as guard:
        guard.start()
        guard.wait_for_log(r"target 127\.0\.0\.1:\d+ is up")
        guard.wait_for_log(r"control socket on ")
        assert guard.proc is not None
        pid = guard.proc.pid

        up = cli(guard.config, "status")
        assert up.returncode == 0, up.stderr
        assert f"the running guard (node mx2, pid {pid})" in up.stdout
        assert re.search(r"127\.0\.0\.1:\d+ +UP +\d+ ok in a row \(rise 2\), 0 failed in a "
                         r"row \(fall 2\);.*no failure within down_grace", up.stdout), up.stdout

        mx1.stop()
        guard.wait_for_log(r"target 127\.0\.0\.1:\d+ is down")
        down = cli(guard.config, "status", "--json")
        assert down.returncode == 0, down.stderr
        data = json.loads(down.stdout)
        assert data["health_source"].startswith(f"the running guard (node mx2, pid {pid})")
        [prober] = data["prober"]
        assert prober["state"] == "down" and prober["failures"] >= 2
        assert prober["down_grace_until"] == pytest.approx(prober["last_fail"] + 1800.0)  # 30m
        assert [t["new"] for t in data["history"]] == ["up", "down"]  # the memory store's

        # The primary comes back: rise probes make it up, down_grace still remembers.
        with FakePrimary(port=mx1.port):
            guard.wait_for_log(r"target 127\.0\.0\.1:\d+ is up \(was down\)")
            text = cli(guard.config, "explain", "--client", "192.0.2.7", "--rcpt",
                       "a@example.org")
            assert text.returncode == 0, text.stderr
            assert "reason:  recently-down" in text.stdout, text.stdout  # flagged
            assert f"health:  the running guard (node mx2, pid {pid})" in text.stdout
            assert re.search(r"UP +\d+ ok in a row.*; down_grace until \S+", text.stdout)

            bad = cli(guard.config, "explain", "--client", "192.0.2.7", "--rcpt", "nobody")
            assert bad.returncode == 1 and "has no domain" in bad.stderr

            with MilterClient(socket_, timeout=5) as c:  # the milter agrees
                c.connect("client.example", "192.0.2.7", 40000)
                c.mail("<s@client.example>")
                assert c.rcpt("<a@example.org>").proceeds
    gone = cli(guard.config, "status")
    assert gone.returncode == 0, gone.stderr
    assert f"no running guard answers on {tmp_path}/guard.control.sock" in gone.stdout
    assert "probed once now" in gone.stdout


def test_milter_answers_while_control_clients_hang(tmp_path: Path) -> None:
    socket_ = f"unix:{tmp_path}/guard.sock"
    with FakePrimary() as mx1, GuardProcess(guard_toml(socket_, mx1.port), tmp_path) as guard:
        guard.start()
        guard.wait_for_log(r"target 127\.0\.0\.1:\d+ is up")
        guard.wait_for_log(r"control socket on ")
        hanging = []
        try:
            for _ in range(MAX_CLIENTS + 2):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(f"{tmp_path}/guard.control.sock")
                s.sendall(b'{"command": "sta')  # and never the rest
                hanging.append(s)
            with MilterClient(socket_, timeout=5) as c:
                c.connect("client.example", "192.0.2.7", 40000)
                c.mail("<s@client.example>")
                assert c.rcpt("<a@example.org>").is_tempfail  # a bypass, decided as ever
        finally:
            for s in hanging:
                s.close()
        # The memory store's trap list, which only the running guard can show.
        traps = cli(guard.config, "traps", "--format", "json")
        assert traps.returncode == 0, traps.stderr
        assert [t["address"] for t in json.loads(traps.stdout)["traps"]] == ["192.0.2.7"]
        assert "reading the store" not in traps.stderr
    fallback = cli(guard.config, "traps")
    assert fallback.returncode == 1
    assert f"no running guard answers on {tmp_path}/guard.control.sock" in fallback.stderr
