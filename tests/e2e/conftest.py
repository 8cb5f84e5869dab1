"""pytest fixtures for the end-to-end MTA harness.

Fixtures (function-scoped; everything is stopped/removed at teardown):

    sink              SmtpSink started on a free 127.0.0.1 port (the MTAs' next hop)
    fake_primary_mx   factory(port=None, **kw) -> started FakePrimary (tests/fakeprimary.py)
    socket_dir        a short 0755 directory for milter sockets (smtp.make_socket_dir:
                      Postfix's smtpd runs as user postfix and must reach it;
                      Sendmail refuses a socket below a world-writable dir like /tmp)
    postfix_mta       factory(milter=None, **kw) -> started PostfixMTA
                      (next_hop defaults to the `sink` fixture)
    sendmail_mta      factory(milter=None, **kw) -> started SendmailMTA
                      (next_hop defaults to the `sink` fixture)
    milter_process    factory(script_text, socket, args=(), name="milter")
                      -> started MilterProcess running the script (written to
                      tmp_path) with this Python

A missing MTA or tool makes the MTA fixtures *fail* (not skip), telling to run
`sh tests/support/install-mtas.sh` as root.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support.fakeprimary import FakePrimary
from tests.support.mta import PrivateMTA
from tests.support.postfix import PostfixMTA, check_postfix_tools
from tests.support.sendmail import SendmailMTA, sendmail_paths
from tests.support.smtp import MilterProcess, make_socket_dir
from tests.support.smtpserver import SmtpSink

from .scenarios import require_harness

PostfixFactory = Callable[..., PostfixMTA]
SendmailFactory = Callable[..., SendmailMTA]
FakeMXFactory = Callable[..., FakePrimary]
MilterFactory = Callable[..., MilterProcess]
M = TypeVar("M", bound=PrivateMTA)


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as s:
        yield s


@pytest.fixture
def fake_primary_mx() -> Iterator[FakeMXFactory]:
    started: list[FakePrimary] = []

    def make(port: int | None = None, **kw: Any) -> FakePrimary:
        mx = FakePrimary(port=port, **kw)
        started.append(mx)
        return mx.start()

    yield make
    for mx in started:
        mx.stop()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    d = make_socket_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _mtas(cls: type[M], sink: SmtpSink) -> Iterator[Callable[..., M]]:
    started: list[M] = []

    def make(milter: str | None = None, **kw: Any) -> M:
        kw.setdefault("next_hop", sink.address)
        mta = cls(milter, **kw)
        started.append(mta)
        return mta.start()

    yield make
    for mta in reversed(started):
        mta.stop()


@pytest.fixture
def postfix_mta(sink: SmtpSink) -> Iterator[PostfixFactory]:
    require_harness(check_postfix_tools)
    yield from _mtas(PostfixMTA, sink)


@pytest.fixture
def sendmail_mta(sink: SmtpSink) -> Iterator[SendmailFactory]:
    require_harness(sendmail_paths)
    yield from _mtas(SendmailMTA, sink)


@pytest.fixture
def milter_process(tmp_path: Path) -> Iterator[MilterFactory]:
    started: list[MilterProcess] = []

    def make(script_text: str, socket: str, args: Sequence[str] = (),
             name: str = "milter") -> MilterProcess:
        script = tmp_path / f"{name}_{len(started)}.py"
        script.write_text(script_text)
        mp = MilterProcess(script, socket, args)
        started.append(mp)
        return mp.start()

    yield make
    for mp in started:
        mp.kill()
