"""A real SMTP listener on loopback standing in for a primary MX.

It greets, answers EHLO/HELO/NOOP/RSET/QUIT, and can be told to misbehave the ways
primaries do: greet with 421, accept and never greet, close at once. Tests stop and
start it (on the same port) to make the primary go down and come back; everything
else is tests/smtpserver.py's SmtpServer: ``connections`` and ``commands`` record
who probed it, ``ehlo_reply`` refuses chosen EHLO names (a primary one prober cannot
use), ``greeting_delay``, and MAIL/RCPT/DATA get ``mail_reply`` (451) unless
``accept_mail``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import Enum
from typing import Any, Self

from tests.support.smtpserver import LOCALHOST, SmtpServer, free_port


class Behaviour(Enum):
    GREET = "220"
    BUSY = "421"  # 421 greeting: "try another MX"
    SILENT = "silent"  # accepts, never greets
    HANGUP = "hangup"  # accepts and closes at once
    RAMBLE = "ramble"  # sends a greeting line longer than any SMTP line, with no end


class FakePrimary(SmtpServer):
    """``with FakePrimary(port=...) as mx1:``; ``stop()`` and ``start()`` at will.

    The port is picked when it is created (unless given), so it is known before
    start() and stays the same across restarts.
    """

    def __init__(self, host: str = LOCALHOST, port: int | None = None,
                 behaviour: Behaviour = Behaviour.GREET, *,
                 accept_mail: bool = False, hostname: str = "mx1.test.example",
                 **kw: Any) -> None:
        super().__init__(port or free_port(host), host, hostname=hostname, **kw)
        self.behaviour = behaviour
        self.accept_mail = accept_mail
        self._release = threading.Event()  # set by stop(): held connections end

    def _greet(self, write: Callable[[bytes], object]) -> bool:
        release, behaviour = self._release, self.behaviour
        if behaviour is Behaviour.HANGUP:
            return False
        if behaviour is Behaviour.RAMBLE:
            write(b"220" + b"x" * 70000)
            release.wait(30)
            return False
        if behaviour is Behaviour.SILENT:
            release.wait(30)
            return False
        if behaviour is Behaviour.BUSY:
            write(b"421 4.3.2 mx1 busy, try later\r\n")
            return False
        return super()._greet(write)

    def start(self) -> Self:
        if not self.running:
            self._release = threading.Event()
        return super().start()

    def stop(self) -> None:
        self._release.set()
        super().stop()
