"""A real SMTP listener on loopback standing in for a primary MX.

It greets, answers EHLO/HELO/QUIT, and can be told to misbehave the ways primaries do:
greet with 421, accept and never greet, close at once. Tests stop and start it to
make the primary go down and come back.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from enum import Enum
from types import TracebackType


class Behaviour(Enum):
    GREET = "220"
    BUSY = "421"  # 421 greeting: "try another MX"
    SILENT = "silent"  # accepts, never greets
    HANGUP = "hangup"  # accepts and closes at once
    RAMBLE = "ramble"  # sends a greeting line longer than any SMTP line, with no end


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        behaviour = self.server.behaviour
        self.server.connections += 1
        if behaviour is Behaviour.HANGUP:
            return
        if behaviour is Behaviour.RAMBLE:
            self.wfile.write(b"220" + b"x" * 70000)
            self.server.release.wait(30)
            return
        if behaviour is Behaviour.SILENT:
            self.server.release.wait(30)
            return
        if behaviour is Behaviour.BUSY:
            self.wfile.write(b"421 4.3.2 mx1 busy, try later\r\n")
            return
        self.wfile.write(b"220 mx1.test ESMTP fake primary\r\n")
        for raw in self.rfile:
            verb = raw[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.wfile.write(b"250-mx1.test\r\n250 8BITMIME\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 2.0.0 bye\r\n")
                return
            else:
                self.wfile.write(b"502 5.5.2 not a real server\r\n")


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = True

    def __init__(self, address: tuple[str, int], family: int, behaviour: Behaviour) -> None:
        self.address_family = family
        self.behaviour = behaviour
        self.connections = 0
        self.release = threading.Event()
        super().__init__(address, _Handler)


class FakePrimary:
    """``with FakePrimary(port=...) as mx1:``; ``stop()`` and ``start()`` at will."""

    def __init__(
        self, host: str = "127.0.0.1", port: int | None = None,
        behaviour: Behaviour = Behaviour.GREET,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.behaviour = behaviour
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def connections(self) -> int:
        return self._server.connections if self._server else 0

    def start(self) -> FakePrimary:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._server = _Server((self.host, self.port), family, self.behaviour)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.05})
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.release.set()
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> FakePrimary:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
