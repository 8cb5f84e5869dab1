"""Log sinks: syslog over a real Unix datagram socket the test opens, the journald
format, and lines dropped under pressure (counted, reported once per episode)."""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from guard.config import ConfigError, LogConfig, LogTarget, parse_config
from guard.logsetup import Logs
from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import GuardProcess, guard_toml

log = logging.getLogger("guard.test")


@pytest.fixture
def syslog_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A syslog daemon's socket, as /dev/log is: a bound Unix datagram socket."""
    path = str(tmp_path / "log")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    try:
        yield path, sock
    finally:
        sock.close()


def dropped_total() -> float:
    return REGISTRY.get_sample_value("mxguard_log_dropped_total") or 0.0


@pytest.mark.parametrize(
    ("label", "facility", "level", "want_priority"),
    [
        ("default facility mail, warning", "mail", logging.WARNING, 2 * 8 + 4),
        ("mail, info", "mail", logging.INFO, 2 * 8 + 6),
        ("local3, error", "local3", logging.ERROR, 19 * 8 + 3),
        ("daemon, critical", "daemon", logging.CRITICAL, 3 * 8 + 2),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else "",
)
def test_syslog_datagram_has_priority_ident_and_message(
    syslog_socket: tuple[str, socket.socket], label: str, facility: str, level: int,
    want_priority: int,
) -> None:
    path, sock = syslog_socket
    logs = Logs("debug", background=True)
    try:
        logs.apply(LogConfig(target=LogTarget.SYSLOG, facility=facility, syslog_socket=path))
        log.log(level, "bypass from %s", "192.0.2.9")
    finally:
        logs.stop()
    want = (f"<{want_priority}>mx-guard[{os.getpid()}]: {logging.getLevelName(level)} "
            "guard.test: bypass from 192.0.2.9\0")
    assert sock.recv(65536).decode() == want, label


def test_stderr_under_journald_has_no_timestamp_but_a_priority(tmp_path: Path) -> None:
    with (tmp_path / "stderr").open("w+") as stream:
        st = os.fstat(stream.fileno())
        logs = Logs("info", background=False, stream=stream,
                    environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        log.warning("primary %s down", "mx1")
        logs.stop()
        stream.seek(0)
        assert stream.read() == "<4>WARNING guard.test: primary mx1 down\n"


@pytest.mark.parametrize("environ", [{}, {"JOURNAL_STREAM": "1:2"}, {"JOURNAL_STREAM": "x"}],
                         ids=["no journal", "journal elsewhere", "garbage"])
def test_stderr_elsewhere_keeps_the_timestamp(tmp_path: Path, environ: dict[str, str]) -> None:
    with (tmp_path / "stderr").open("w+") as stream:
        logs = Logs("info", background=False, stream=stream, environ=environ)
        log.warning("primary %s down", "mx1")
        logs.stop()
        stream.seek(0)
        line = stream.read()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING guard\.test: "
                        r"primary mx1 down\n", line), line


def test_lines_dropped_under_pressure_are_counted_and_reported_once(
    syslog_socket: tuple[str, socket.socket],
) -> None:
    """A syslog daemon that stops reading: its socket fills, the writer blocks, the
    queue fills, lines are dropped; none of it holds up the logging thread."""
    path, sock = syslog_socket
    sent = 3000
    before = dropped_total()
    logs = Logs("info", background=True, queue_max=50)
    logs.apply(LogConfig(target=LogTarget.SYSLOG, syslog_socket=path))
    for i in range(sent):
        log.info("line %d", i)
    received: list[str] = []
    while not any("log writer recovered" in line for line in received):
        received.append(sock.recv(65536).decode())  # reading lets the writer catch up
    logs.stop()
    dropped = logs.dropped.total
    assert dropped > 0, "the socket never filled: the test proves nothing"
    reports = [line for line in received if "log writer" in line]
    assert len(reports) == 2, reports
    assert "log writer failing: the log sink fell behind" in reports[0]
    assert re.search(rf"log writer recovered after \d+\.\ds, {dropped} line\(s\) dropped",
                     reports[1]), reports[1]
    assert len(received) - len(reports) + dropped == sent
    assert dropped_total() - before == dropped


def test_a_missing_syslog_socket_keeps_stderr_and_says_so(tmp_path: Path) -> None:
    with (tmp_path / "stderr").open("w+") as stream:
        logs = Logs("info", background=True, stream=stream, environ={})
        logs.apply(LogConfig(target=LogTarget.SYSLOG, syslog_socket=str(tmp_path / "none")))
        log.warning("still here")
        logs.stop()
        stream.seek(0)
        text = stream.read()
    assert f"cannot log to syslog at {tmp_path / 'none'}" in text
    assert "WARNING guard.test: still here" in text


@pytest.mark.parametrize(
    ("table", "want_error"),
    [
        ({"target": "journal"}, r"\[log\] target: must be one of stderr, syslog"),
        ({"facility": "mial"}, r"\[log\] facility: must be a syslog facility"),
        ({"syslog_socket": "dev/log"}, r"\[log\] syslog_socket: must be an absolute path"),
    ],
)
def test_bad_log_settings_are_refused(table: dict[str, str], want_error: str) -> None:
    with pytest.raises(ConfigError, match=want_error):
        parse_config({"log": table})


def test_run_logs_to_syslog_when_configured(tmp_path: Path,
                                            syslog_socket: tuple[str, socket.socket]) -> None:
    path, sock = syslog_socket
    extra = f'[log]\ntarget = "syslog"\nfacility = "local5"\nsyslog_socket = "{path}"'
    with FakePrimary() as mx1, GuardProcess(
        guard_toml(f"unix:{tmp_path}/guard.sock", mx1.port, extra), tmp_path
    ) as guard:
        guard.start()
        assert guard.proc is not None
        pid = guard.proc.pid
        while True:
            line = sock.recv(65536).decode()
            if "is up" in line:
                break
        assert line.startswith(f"<{21 * 8 + 6}>mx-guard[{pid}]: INFO guard."), line
    assert "is up" not in guard.log()  # syslog instead of stderr, not both
